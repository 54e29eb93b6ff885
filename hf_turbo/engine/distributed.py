"""Tensor parallelism: one rank decides, every rank runs the same forward.

A model loaded with transformers' ``tp_plan="auto"`` under ``torchrun`` (or ``hf-turbo serve
--tensor-parallel-size N``) has its projections sharded over the ranks, and every forward holds
collectives: all ranks must run the same forwards, with the same inputs, in the same order. Rank 0's
:class:`~hf_turbo.engine.Engine` is the only one that schedules, speculates, preempts, samples and
draws seeds; before each forward it broadcasts the step's plan (:class:`PlanSender`) over a CPU
(gloo) group: the scheduled requests' new token ids, block tables, computed counts and proposals, and
the requests whose blocks were released since the last plan. The other ranks' engines never schedule:
a :class:`~hf_turbo.engine.follower.Follower` replays each plan on shadow requests through the same
runner and cache, so every rank's paged pools and CPU mirrors hold the same blocks.

Because sampling is keyed by (seed, position, token) (``sampling/noise.py``), a follower can also
sample its own rows from the broadcast seeds and check that it picks rank 0's tokens
(``TurboConfig.debug_checks``); nothing depends on it, since the tokens themselves travel in the plan.

Pools are sized by the local number of KV heads (:func:`local_kv_layout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from hf_turbo.backends.kv_quant import kv_bytes_per_token_head
from hf_turbo.cache.paged_cache import kv_layout

logger = logging.getLogger(__name__)

__all__ = ["TPGroup", "PlanSender", "local_kv_layout", "kv_bytes_per_block", "agree_num_blocks", "model_tp_size",
           "attach", "STOP", "STEP", "RUN_END"]

STEP = "step"
STOP = "stop"
RUN_END = "run_end"  # rank 0's run_to_completion ended: (RUN_END, outputs or None, error text or None)
# Followers wait for rank 0's next plan for as long as the server is idle: the group's timeout only bounds a
# rank 0 that is alive but silent (a dead one closes its sockets, which ends the wait at once).
IDLE_TIMEOUT = timedelta(days=30)


def model_tp_size(model) -> int:
    """The number of ranks ``model``'s weights are sharded over (1 for a model not loaded with a ``tp_plan``)."""
    size = getattr(model, "tp_size", None) or 1
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"model has tp_size {size} but torch.distributed is not initialized")
    return int(size)


def _kv_sharded(model) -> bool:
    plan = getattr(model, "_tp_plan", None) or getattr(model, "tp_plan", None) or {}
    return any(key.endswith(("k_proj", "v_proj")) and str(style).startswith("colwise") for key, style in plan.items())


def local_kv_layout(model) -> tuple[int, int, int]:
    """(num_layers, KV heads on this rank, head_dim): ``kv_layout`` of the config, with the KV heads divided
    over the ranks when the model's TP plan shards the key/value projections. ValueError when they do not
    divide evenly (transformers would then replicate some heads, which the pools do not model)."""
    layers, heads, head_dim = kv_layout(model.config)
    size = model_tp_size(model)
    if size == 1 or not _kv_sharded(model):
        return layers, heads, head_dim
    if heads % size:
        raise ValueError(f"tensor parallel size {size} does not divide the model's {heads} KV heads")
    return layers, heads // size, head_dim


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
    """Bytes of one KV block on this rank (every layer's K and V, the local KV heads only; with an 8-bit
    ``kv_dtype`` one byte per value plus the scales)."""
    layers, heads, head_dim = local_kv_layout(model)
    return 2 * layers * block_size * heads * kv_bytes_per_token_head(kv_dtype, head_dim, dtype)


def agree_num_blocks(model, blocks: int) -> int:
    """The smallest KV block count of all ranks (each sized its own from its free memory); ``blocks`` as is
    for a model that is not sharded."""
    if model_tp_size(model) == 1:
        return blocks
    t = torch.tensor([blocks], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=TPGroup.default().group)
    return int(t.item())


class TPGroup:
    """The CPU (gloo) process group that carries plans from rank 0 to the other ranks of a TP group.

    Built over every rank of the default group (one TP group per world, as ``torchrun`` launches it);
    :meth:`default` is the one every engine of the process shares.
    """

    _default: TPGroup | None = None

    @classmethod
    def default(cls) -> TPGroup:
        """The process's group (built on first use: a collective call, so every rank must reach it)."""
        if cls._default is None or cls._default.world_size != dist.get_world_size():
            cls._default = cls()
        return cls._default

    def __init__(self, timeout: timedelta = IDLE_TIMEOUT) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TPGroup needs torch.distributed to be initialized (torchrun or init_process_group)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=timeout)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def send(self, message: tuple) -> None:
        """Rank 0: broadcast one message (a picklable tuple) to the other ranks."""
        dist.broadcast_object_list([message], src=0, group=self.group, device=torch.device("cpu"))

    def recv(self) -> tuple:
        """Other ranks: wait for rank 0's next message."""
        holder = [None]
        dist.broadcast_object_list(holder, src=0, group=self.group, device=torch.device("cpu"))
        return holder[0]

    def check_same(self, name: str, value: int) -> None:
        """Raise on every rank (not only on some, which would leave the others waiting) unless all ranks
        hold the same ``value`` (the KV block count: the plans address the same blocks everywhere)."""
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        low, high = int(t[0]), -int(t[1])
        if low != high:
            raise ValueError(f"{name} differs between the tensor-parallel ranks ({low} to {high}): pass it explicitly")


@dataclass
class _Sent:
    """What rank 0 has told the followers about one request (reset when its blocks are released)."""

    num_tokens: int = 0


class PlanSender:
    """Rank 0's runner: broadcasts each step's plan, then runs the forward (a drop-in for ``ModelRunner``).

    Chained to the scheduler's ``on_release`` so that the next plan tells the followers which shadow
    requests to drop (finished, aborted or preempted: their mirrors and slots go too).
    """

    def __init__(self, runner, scheduler, group: TPGroup, check_sampling: bool = False) -> None:
        self.runner = runner
        self.group = group
        self.check_sampling = check_sampling
        self._sent: dict[str, _Sent] = {}
        self._released: list[tuple[str, int, list[int]]] = []
        self._copies: list[tuple[int, int]] = []
        self.num_copies = 0  # block copies sent to the followers
        self._closed = False
        previous = scheduler.on_release

        def on_release(req) -> None:
            if previous is not None:
                previous(req)
            self._release(req)

        scheduler.on_release = on_release
        copy = getattr(scheduler, "on_copy", None)
        if copy is not None:  # copy-on-write of a block: the followers copy it in their pools too

            def on_copy(src: int, dst: int) -> None:
                copy(src, dst)
                self._copies.append((src, dst))
                self.num_copies += 1

            scheduler.on_copy = on_copy

    def __getattr__(self, name: str):  # lean_verified, lean, model, cache, ...: the wrapped runner's
        return getattr(self.runner, name)

    def _release(self, req) -> None:
        sent = self._sent.pop(req.request_id, None)
        if sent is not None:  # the tokens it gained since the last plan: for the followers' sampling check
            self._released.append((req.request_id, sent.num_tokens, req.token_ids[sent.num_tokens:]))

    def plan(self, scheduled: list, rows: list[list[int]] | None) -> tuple:
        """The message for one step: (STEP, released, copies, entries, rows); ``copies`` are the (src, dst) block
        copies made since the last plan, in order; each entry is ``(request id,
        num_computed, n, tail start, tail tokens, block ids, proposals, first-sight fields or None)``."""
        if any(req.kv_import is not None for req, _ in scheduled):  # before any state changes: nothing is sent
            raise ValueError("an imported KV cache (generate() continuing past_key_values) cannot be split "
                             "over tensor-parallel ranks")
        entries = []
        for req, n in scheduled:
            sent = self._sent.get(req.request_id)
            first = None
            if sent is None:
                sent = self._sent[req.request_id] = _Sent()
                first = {"prompt_len": req.num_prompt_tokens, "model_inputs": req.model_inputs}
                if self.check_sampling:
                    # rows that rank 0 alone constrains (generate()'s processors, a grammar) are not checked
                    hooked = req.logits_hook is not None or getattr(req, "grammar", None) is not None
                    first.update(params=req.params, seed=req.seed, eos_ids=req.eos_ids, hooked=hooked)
            start = sent.num_tokens
            entries.append((req.request_id, req.num_computed, n, start, req.token_ids[start:], list(req.block_ids),
                            list(req.spec_tokens), first))
            sent.num_tokens = len(req.token_ids)
        released, self._released = self._released, []
        copies, self._copies = self._copies, []
        return (STEP, released, copies, entries, rows)

    def execute(self, scheduled: list, logit_rows: list[list[int]] | None = None) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("the tensor-parallel group is closed: this engine cannot run another step")
        self.group.send(self.plan(scheduled, logit_rows))
        return self.runner.execute(scheduled, logit_rows)

    def run_to_completion(self, run, request_ids, on_output=None) -> list:
        """Rank 0's ``Engine.run_to_completion``: ``run`` it, then send its outputs (or its error) to the
        followers, whose own call returns them (a script that runs the same calls on every rank)."""
        try:
            outputs = run(request_ids, on_output)
        except BaseException as exc:
            if not self._closed:
                self.group.send((RUN_END, None, f"{type(exc).__name__}: {exc}"))
            raise
        if not self._closed:
            self.group.send((RUN_END, outputs, None))
        return outputs

    def close(self) -> None:
        """Tell the followers to leave their loops (idempotent)."""
        if not self._closed:
            self._closed = True
            self.group.send((STOP,))


class _FollowerRunner:
    """A follower engine's runner as its own users see it: it refuses to run a step (only rank 0 schedules);
    the follower loop uses the real one (``runner``)."""

    def __init__(self, runner, rank: int) -> None:
        self.runner = runner
        self.rank = rank

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, *args, **kwargs):
        raise RuntimeError(f"rank {self.rank} follows rank 0 in a tensor-parallel group: requests go to rank 0's "
                           "engine; call engine.follow() here")


def attach(engine, group: TPGroup | None = None) -> PlanSender:
    """Make ``engine`` rank 0 of a TP group: its runner broadcasts each step's plan first."""
    group = group or TPGroup.default()
    if not group.is_driver:
        raise RuntimeError("attach() is for rank 0; the other ranks follow (hf_turbo.engine.follower.follow)")
    group.check_same("num_blocks", engine.pool.num_blocks)
    sender = PlanSender(engine.runner, engine.scheduler, group, check_sampling=engine.config.debug_checks)
    engine.runner = sender
    return sender
