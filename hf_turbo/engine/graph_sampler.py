"""The sampler inside the decode graph: a decode step whose rows need no host-side work goes from token ids to
sampled token ids on the device, and the only device-to-host copy of the step is the sampled ids.

:class:`GraphSampler` runs after :class:`~hf_turbo.engine.graphs.DecodeGraphs`' padded forward: the step's
logits are copied into a static float32 buffer ``[max bucket, V]``, the rows' sampling parameters (temperature,
top-k/p, min-p, the keyed noise's keys from seed x position) go to static buffers with one non-blocking copy
per dtype (``sampling/static.py``), and a second CUDA graph, captured per (bucket, mode) (``mode``: greedy,
keyed draw, which filters; see ``static_mode``), replays :func:`~hf_turbo.sampling.static.sample_static` into a
static token buffer. On the CPU (``capture=False``) the same ops run eagerly on the padded bucket.

A step qualifies when every row is a plain decode row (``ModelRunner.graph_ready``) and ``static_mode`` finds no
processor to run, no row asks for logprobs or collected scores and none follows a grammar; any other step
runs the usual path (graph forward, then the eager ``sample()``). Tokens equal ``sample()``'s bit for bit.
"""

from __future__ import annotations

import logging

import torch

from hf_turbo.engine.bookkeeping import StepPlan
from hf_turbo.engine.graphs import DecodeGraphs, DeviceIds
from hf_turbo.engine.request import Request
from hf_turbo.sampling import RowState, SampleResult
from hf_turbo.sampling.static import StaticRowParams, sample_static, static_mode

__all__ = ["GraphSampler", "GraphSampled", "sample_in_graph", "sample_static_eager", "static_sampling"]

logger = logging.getLogger(__name__)


class GraphSampled:
    """A step sampled on the device: ``tokens`` (int64 [n], a view of a static buffer on CUDA: read by
    :meth:`result` before the next step runs)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def result(self) -> SampleResult:
        """The tokens on the host (the step's one device-to-host copy) as a :class:`SampleResult` without scores
        (no row of such a step asks for them)."""
        return SampleResult(self.tokens.cpu(), self.tokens, {})


class GraphSampler:
    """Static buffers and lazily captured sampler graphs for ``decode``'s buckets (``vocab`` columns)."""

    def __init__(self, decode: DecodeGraphs, vocab: int) -> None:
        self.decode = decode
        big, dev = decode.buckets[-1], decode.runner.device
        self.params = StaticRowParams(big, vocab, dev)
        self.scores = torch.zeros(big, vocab, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: str | None = None  # why capturing failed (then the sampler runs eagerly, still sync-free)
        self.num_replays = 0
        self.num_eager = 0
        self.num_static_eager = 0  # eager steps' logits sampled by the same ops (sample_static_eager)

    @torch.inference_mode()
    def run(self, seqs: list[Request], rows: list[RowState], mode: int, ids_from: DeviceIds | None = None
            ) -> torch.Tensor | None:
        """Sampled tokens (int64 [len(seqs)], on the device) of a decode-only step, or None when the step is
        outside the decode graphs' buckets and widths (nothing ran). ``ids_from``: see ``DecodeGraphs.run``."""
        shape = self.decode.plan(len(seqs), max(len(r.block_ids) for r in seqs))
        if shape is None or self.decode.failed is not None:
            return None
        logits = self.decode.run(seqs, ids_from)
        if logits is None:  # the forward's capture failed just now
            return None
        n, bucket = len(seqs), shape[0]
        self.scores[:n].copy_(logits)  # rows n..bucket keep older finite scores: padding, never read back
        self.params.fill(rows, bucket)
        if not self.decode.capture or self.failed is not None:
            self.num_eager += 1
            return sample_static(self.scores[:bucket], self.params, mode)[:n]
        graph = self.graphs.get((bucket, mode))
        if graph is None:
            try:
                graph = self.graphs[(bucket, mode)] = self._capture(bucket, mode)
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: eager from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                logger.warning("capturing the sampler failed at batch %d (%s); it runs eagerly", bucket, self.failed)
                return sample_static(self.scores[:bucket], self.params, mode)[:n]
        graph[0].replay()
        self.num_replays += 1
        return graph[1][:n]

    def _capture(self, bucket: int, mode: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture into the decode graphs' memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            sample_static(self.scores[:bucket], self.params, mode)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.decode.pool, capture_error_mode="thread_local"):
            out = sample_static(self.scores[:bucket], self.params, mode)
        logger.info("captured the sampler at batch %d, mode %d", bucket, mode)
        return graph, out


def _eligible(plan: StepPlan, rows: list[RowState]) -> int | None:
    """The step's sampler mode, or None when a row needs the eager sampler or the bookkeeper's logits."""
    for _, req in plan.sampled:
        if req.params.logprobs is not None or req.scores is not None or req.grammar is not None:
            return None
    return static_mode(rows)


def static_sampling(engine, plan: StepPlan) -> tuple[int, list[RowState]] | None:
    """(sampler mode, rows) of ``plan``'s sampled rows when the static sampler can take them without a graph (see
    :func:`sample_static_eager`), else None."""
    graphs = engine.runner.graphs
    if graphs is None or len(plan.sampled) > graphs.buckets[-1] \
            or any(len(plan.rows[i]) != 1 for i, _ in plan.sampled):
        return None
    rows = plan.row_states()
    mode = _eligible(plan, rows)
    return None if mode is None else (mode, rows)


def sample_static_eager(engine, plan: StepPlan, logits: torch.Tensor,
                        how: tuple[int, list[RowState]] | None = None) -> GraphSampled | None:
    """An eager step's tokens from its ``logits`` by the graph sampler's ops, no graph and no host sync (engine/
    lookahead.py keeps such a step in flight), or None where :func:`static_sampling` (``how``, when the caller has
    it) says no (nothing ran)."""
    how = how or static_sampling(engine, plan)
    if how is None:
        return None
    mode, rows = how
    graphs = engine.runner.graphs
    if graphs.sampler is None:
        graphs.sampler = GraphSampler(graphs, engine.vocab_size)
    if not rows:
        return GraphSampled(torch.empty(0, dtype=torch.int64, device=logits.device))
    graphs.sampler.params.fill(rows, len(rows))
    graphs.sampler.num_static_eager += 1
    return GraphSampled(sample_static(logits, graphs.sampler.params, mode))


def sample_in_graph(engine, plan: StepPlan, ids_from: DeviceIds | None = None) -> GraphSampled | None:
    """Run ``plan``'s forward and sampler on the device when it qualifies (see the module doc); None: it does
    not (nothing ran, unless a capture failed after the step's buffers were filled). ``ids_from``: the input ids
    are on the device (``DecodeGraphs.run``)."""
    runner = engine.runner
    graphs = runner.graphs
    scheduled = plan.sched.scheduled
    if graphs is None or len(plan.sampled) != len(scheduled) or not runner.graph_ready(scheduled, plan.rows):
        return None
    rows = plan.row_states()
    mode = _eligible(plan, rows)
    if mode is None:
        return None
    if graphs.sampler is None:
        graphs.sampler = GraphSampler(graphs, engine.vocab_size)
    tokens = graphs.sampler.run([req for req, _ in scheduled], rows, mode, ids_from)
    return None if tokens is None else GraphSampled(tokens)
