"""Engine: continuous batching over the user's own HF model, in process.

``Engine(model, tokenizer).generate(prompts, params)`` runs a list of prompts to completion with a
tqdm bar; ``add_request`` / ``step`` / ``abort`` drive custom loops (the async engine and the
``generate()`` wrapper are built on them). Every step is one packed forward.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Sequence

import torch

from hf_turbo.backends import get_backend
from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.cache.paged_cache import PagedKVCache
from hf_turbo.config import TurboConfig
from hf_turbo.engine.attach import attach
from hf_turbo.engine.bookkeeping import Bookkeeper, StepPlan, plan_step
from hf_turbo.engine.distributed import agree_num_blocks, local_kv_layout, model_tp_size
from hf_turbo.engine.follower import tensor_parallel
from hf_turbo.engine.graph_sampler import GraphSampled, sample_in_graph
from hf_turbo.engine.graphs import decode_graphs
from hf_turbo.engine.lookahead import Launch, lookahead_for
from hf_turbo.engine.memory import layer_devices, model_max_len, num_kv_blocks, plan_sliding_release
from hf_turbo.engine.request import Request, RequestOutput, check_kv_import, encode_prompt, eos_ids
from hf_turbo.engine.runner import ModelRunner
from hf_turbo.engine.scheduler import Scheduler
from hf_turbo.engine.sliding_wiring import sliding_blocks, wire_sliding
from hf_turbo.engine.spec.decoder import SpecDecoder
from hf_turbo.engine.spec.proposers import validate_draft
from hf_turbo.grammar.steps import StepGrammar
from hf_turbo.sampling import SamplingParams, random_seed, sample, validate_vocab

logger = logging.getLogger(__name__)

__all__ = ["Engine", "num_kv_blocks"]

PromptType = str | Sequence[int]


class Engine:
    """Continuous-batching engine over a stock transformers causal LM.

    Args:
        model: an ``AutoModelForCausalLM`` (accelerated in place if it is not already).
        tokenizer: needed for string prompts, ``text`` outputs and stop strings.
        config: a :class:`TurboConfig`; keyword ``overrides`` replace its fields
            (``max_num_batched_tokens=...``, ``num_blocks=...``, ...).
    """

    def __init__(self, model, tokenizer=None, config: TurboConfig | None = None, **overrides) -> None:
        config = (config or TurboConfig()).replace(**overrides) if overrides else (config or TurboConfig())
        spec = config.speculative
        draft = spec.draft_model if spec is not None and spec.method == "draft" else None
        if draft is not None:  # before anything is patched or allocated
            validate_draft(draft, model, spec.draft_tokenizer, tokenizer)
        attach(model, config)  # the "hf_turbo" attention, after the probe (a model already attached keeps its own)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        param = next(model.parameters())
        self.device = param.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() \
            is not None else model.config.vocab_size
        self.max_model_len = config.max_model_len or model_max_len(model)
        self.eos_ids = eos_ids(model)
        draft_bytes = 0 if draft is None else PagedKVCache.bytes_per_block(draft.config, config.cache.block_size,
                                                                           next(draft.parameters()).dtype)
        nblocks = agree_num_blocks(model, num_kv_blocks(model, config, draft_bytes))
        num_layers = model.config.get_text_config().num_hidden_layers
        _, kv_heads, head_dim = local_kv_layout(model)
        # sliding layers that release the blocks their window left (cache/sliding.py): fewer blocks for them
        backend, sliding = plan_sliding_release(model, config, nblocks, config.backend, self.device, grow=not draft
                                                and config.cache.num_blocks is None and layer_devices(model) is None)
        nblocks = nblocks if sliding is None else sliding.num_blocks
        self.pool = BlockPool(nblocks, config.cache.block_size)
        # the attention backend (hf_turbo.backends): TurboConfig.backend, HF_TURBO_BACKEND overriding it
        self.backend = get_backend(backend, self.device, config.cache.kv_dtype)
        # one block more than the pool hands out: the scratch block of padded decode steps (engine/graphs.py)
        self.cache = PagedKVCache(nblocks + 1, config.cache.block_size, num_layers, param.dtype, self.device,
                                  kv_shape=(kv_heads, head_dim), backend=self.backend, kv_dtype=config.cache.kv_dtype,
                                  layer_devices=layer_devices(model),  # device_map: each layer's on its device
                                  sliding=sliding_blocks(sliding, self.pool, config.max_num_batched_tokens))
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.cache.enable_prefix_caching)
        self.scheduler.on_release = lambda req: self.backend.release(self.cache, req)
        self.scheduler.on_import = self._write_imported
        wire_sliding(self)
        self.runner = ModelRunner(model, self.cache, lean=config.lean_forward)
        self.runner.graphs = decode_graphs(self.runner, config.cuda_graphs, config.max_num_seqs, self.max_model_len,
                                           nblocks, model_tp_size(model))
        self.spec = None if spec is None else SpecDecoder(spec, config, nblocks)
        self.book = Bookkeeper(self.scheduler, tokenizer, None if self.spec is None else self.spec.accept,
                               None if self.spec is None else self.spec.release)
        self.requests: dict[str, Request] = self.book.requests
        self.grammar = StepGrammar(tokenizer, self.vocab_size, self.eos_ids, self.device)  # structured output
        self._ids = itertools.count()
        self.num_steps = 0
        self._step_start = 0.0  # when the running step's forward began (speculation's cost model)
        self.num_prompt_tokens = 0
        self.scheduler.on_copy = self.cache.copy_block  # copy-on-write of a shared prompt's last block
        self.tp = tensor_parallel(self)  # None, or this rank's part in a tensor-parallel group
        self.lookahead = lookahead_for(self)  # async scheduling: step N+1 queued before step N's tokens are known
        logger.info("Engine: %d KV blocks of %d tokens (%s, KV %s, %s, %s backend)", nblocks, config.cache.block_size,
                    param.dtype, config.cache.kv_dtype, self.device, self.backend.name)

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, *, stop_checker=None, collect_scores: bool = False,
                    logits_hook=None, on_finish=None, kv_import=None, model_inputs=None) -> str:
        """Validate and queue one request; returns its id. ValueError on bad input.

        ``stop_checker(output_ids) -> bool`` adds a stop rule (finish_reason 'stop');
        ``collect_scores`` keeps each step's raw logits and processed scores on the request;
        ``logits_hook(scores [1, V]) -> scores`` runs after the built-in processors and before the
        warpers (generate()'s extra HF processors; such a request does not speculate);
        ``on_finish(request)`` is called when it finishes, while its blocks still hold its K/V
        (``read_kv``); ``kv_import`` (per layer ``(k, v)``, each ``[m, H_kv, D]``, ``m`` < prompt length)
        gives the K/V of the first ``m`` prompt positions instead of computing them; ``model_inputs``
        (``token_type_ids`` [n], ``inputs_embeds`` [n, hidden]) are per-token inputs of the first n prompt
        tokens that the forward passes to the model (later tokens: the last type, their own embedding).
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self.requests:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = encode_prompt(prompt, self.tokenizer, self.vocab_size)
        validate_vocab(params, self.vocab_size)
        total = len(ids) + params.max_new_tokens
        if self.max_model_len is not None and total > self.max_model_len:
            raise ValueError(f"prompt length {len(ids)} + max_new_tokens {params.max_new_tokens} = {total} "
                             f"exceeds the model's maximum length {self.max_model_len}")
        need = math.ceil(total / self.pool.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"prompt length {len(ids)} + max_new_tokens {params.max_new_tokens} needs {need} KV "
                             f"blocks but the pool has {self.pool.num_blocks}")
        if self.config.max_waiting is not None and len(self.scheduler.waiting) >= self.config.max_waiting:
            raise OverflowError(f"too many waiting requests ({len(self.scheduler.waiting)})")
        if kv_import is not None:
            check_kv_import(kv_import, len(ids), self.cache)
        for name, value in (model_inputs or {}).items():
            if name not in ("token_type_ids", "inputs_embeds") or not isinstance(value, torch.Tensor) \
                    or not 0 < value.shape[0] <= len(ids) or value.dim() != (1 if name == "token_type_ids" else 2):
                raise ValueError(f"model_inputs[{name!r}] must be token_type_ids [n] or inputs_embeds [n, hidden] "
                                 f"for the first n <= {len(ids)} prompt tokens")
        if logits_hook is not None and params.speculative:
            params = dataclasses.replace(params, speculative=False)
        if params.n != 1:
            raise ValueError(f"SamplingParams.n is {params.n}: add_request queues one sample; queue "
                             "params.samples() (or call generate), which share the prompt's KV blocks")
        grammar = self.grammar.state_for(params)
        seed = params.seed if params.seed is not None else random_seed()
        req = Request(request_id, ids, params, seed, () if params.ignore_eos else self.eos_ids,
                      stop_checker=stop_checker, logits_hook=logits_hook, on_finish=on_finish,
                      kv_import=kv_import, model_inputs=model_inputs or None)
        req.grammar = grammar
        if collect_scores:
            req.scores, req.raw_logits = [], []
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its output (finish_reason 'abort')."""
        return self.book.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; returns outputs of requests that got tokens or finished.

        With speculation, running requests first get proposals (``spec_tokens``) that the same
        forward verifies; a request may then gain several tokens in one step (``hf_turbo.engine.spec``).
        """
        return self.finish_step(self.launch_step())

    def launch_step(self) -> tuple[StepPlan, torch.Tensor] | Launch | None:
        """The first half of :meth:`step`: schedule and queue the forward (on CUDA it runs while this returns).
        The caller may do host work (stream the previous step's outputs) before :meth:`finish_step`, but must
        not add, abort or step in between. With async scheduling (``engine/lookahead.py``) the step may be
        queued before the previous one's tokens are known; :meth:`finish_step` then returns that one's outputs."""
        if self.lookahead is not None:
            return self.lookahead.launch()
        return self.launch_plain()

    def launch_plain(self, plan: StepPlan | None = None) -> tuple[StepPlan, torch.Tensor] | None:
        """Schedule (unless ``plan`` is given) and queue one step once every earlier step's tokens are known."""
        plan = self._schedule() if plan is None else plan
        return None if plan is None else (plan, self._run(plan))

    def finish_step(self, launched: tuple[StepPlan, torch.Tensor] | Launch | None) -> list[RequestOutput]:
        """The second half of :meth:`step`: sample (the step's one wait for the device) and apply the tokens."""
        if isinstance(launched, Launch):
            return self._after_step(self.lookahead.finish(launched))
        if launched is None:
            return []
        plan, logits = launched
        return self._after_step(self.postprocess(plan, logits))

    def _schedule(self) -> StepPlan | None:
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, len(self.scheduler.waiting))
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler cannot admit the first waiting request (KV pool too small)")
            return None
        return plan_step(sched)

    def _run(self, plan: StepPlan) -> torch.Tensor:
        self._step_start = time.perf_counter()
        self.grammar.start(plan)  # the constrained rows' masks fill on the CPU while the forward runs
        try:
            logits = sample_in_graph(self, plan)  # a plain decode step: forward and sampler on the device
            if logits is None:
                logits = self.runner.execute(plan.sched.scheduled, plan.rows)
        except Exception as exc:
            self.book.fail(plan.sched.scheduled, exc)
            raise
        self.num_steps += 1
        return logits

    def postprocess(self, plan: StepPlan, logits: torch.Tensor) -> list[RequestOutput]:
        """Sample ``plan``'s rows from ``logits`` (or take a :class:`GraphSampled` step's tokens), apply them."""
        if not plan.sampled:
            self.scheduler.commit(plan.sched)
            return []
        result = logits.result() if isinstance(logits, GraphSampled) else \
            sample(logits, self.grammar.apply(plan.row_states()), return_scores=True)
        if self.spec is not None:
            self.spec.observe_step(plan.sched.num_tokens, time.perf_counter() - self._step_start)
        return self.book.postprocess(plan, result, logits)

    def _write_imported(self, req: Request) -> None:
        for layer, (k, v) in enumerate(req.kv_import):
            self.cache.write_tokens(layer, req.block_ids, k, v)

    def read_kv(self, req: Request, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the K/V (``[num_tokens, H_kv, D]`` copies) of a running or finishing request's first
        positions (call from ``on_finish``, before its blocks are released)."""
        if num_tokens > req.num_computed:
            raise ValueError(f"request {req.request_id} has K/V for {req.num_computed} positions, not {num_tokens}")
        return [self.cache.read_tokens(layer, req.block_ids, num_tokens) for layer in range(self.cache.num_layers)]

    @property
    def num_generated_tokens(self) -> int:
        return self.book.num_generated_tokens

    def _after_step(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        if self.config.debug_checks:
            self.check_invariants()
        return outputs

    def check_invariants(self) -> None:
        """Block-pool bookkeeping plus: every block reference is held by a running request (waiting and
        finished requests hold none; prefix-cached blocks nobody uses have no reference)."""
        self.pool.check_invariants()
        owned = sum(len(r.block_ids) for r in self.scheduler.running)
        refs = sum(self.pool.ref_counts)
        if refs != owned:
            raise AssertionError(f"KV blocks leaked: {refs} block references but running requests hold {owned}")
        for r in self.scheduler.running:
            if len(r.block_ids) > -(-r.num_tokens // self.pool.block_size):
                raise AssertionError(f"{r.request_id} holds {len(r.block_ids)} blocks for {r.num_tokens} tokens")
        if self.spec is not None:
            self.spec.check_invariants()
        if self.cache.sliding is not None:
            self.cache.sliding.check_invariants()

    def close(self) -> None:
        """Release what the engine holds outside itself (a draft model's attention switch)."""
        if self.spec is not None:
            self.spec.close()
        if self.tp is not None:  # rank 0: the followers leave their loops
            self.tp.close()
        self.grammar.close()

    def follow(self) -> None:
        """On a rank other than 0 of a tensor-parallel group: run rank 0's steps until its engine closes."""
        if self.tp is None or not hasattr(self.tp, "run"):
            raise RuntimeError("follow() is for the ranks other than 0 of a tensor-parallel model")
        self.tp.run()

    # -- offline --------------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts to completion; outputs in input order (a prompt whose params have ``n > 1``: its n
        samples in a row, sample i with seed ``seed + i``)."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"params has {len(params)} entries for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.extend(self.add_request(prompt, s) for s in p.samples())
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="hf_turbo", unit="req", dynamic_ncols=True)
        try:
            return self.run_to_completion(ids, None if bar is None else lambda out: out.finished and bar.update(1))
        finally:
            if bar is not None:
                bar.close()

    def run_to_completion(self, request_ids: Sequence[str], on_output=None) -> list[RequestOutput]:
        """Step until every request in ``request_ids`` has finished; outputs in that order.

        ``on_output(out)`` sees each of their step outputs (streaming). On any error or interrupt the
        unfinished ones are aborted (their blocks freed) before it propagates. In a tensor-parallel group
        every rank calls it: rank 0 runs the requests, the others follow and return rank 0's outputs."""
        if self.tp is not None:
            return self.tp.run_to_completion(self._run_to_completion, request_ids, on_output)
        return self._run_to_completion(request_ids, on_output)

    def _run_to_completion(self, request_ids: Sequence[str], on_output=None) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        unknown = sorted(pending - self.requests.keys())
        if unknown:  # finished earlier (or never added): stepping would wait for them forever
            raise ValueError(f"request_ids {unknown[:3]} are not unfinished requests of this engine")
        try:
            while pending:
                for out in self.step():
                    if out.request_id not in pending:
                        continue
                    if on_output is not None:
                        on_output(out)
                    if out.finished:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
        except BaseException:
            for rid in pending:
                self.abort(rid)
            raise
        return [results[rid] for rid in request_ids]

    def stats(self) -> dict:
        pool = self.pool
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_used": pool.num_used,
            "kv_blocks_free": pool.num_free,
            "kv_blocks_cached": pool.num_cached,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": pool.prefix_queries,
            "prefix_cache_hits": pool.prefix_hits,
            "prefix_cache_hit_rate": pool.prefix_hits / pool.prefix_queries if pool.prefix_queries else 0.0,
            "steps": self.num_steps,
            "steps_launched_ahead": 0 if self.lookahead is None else self.lookahead.num_ahead,
            "generated_tokens": self.book.num_generated_tokens,
            **(self.spec.stats() if self.spec is not None else SpecDecoder.idle_stats()),
            **self.grammar.stats(),
        }
