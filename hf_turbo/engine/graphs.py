"""Decode steps as CUDA graphs: the lean forward captured per (batch bucket, table width), replayed on static buffers.

A decode-only step (every scheduled sequence computes exactly one new token and samples it) has the same
shape every time, up to its batch size and the width of its block tables. :class:`DecodeGraphs` pads the
batch up to a bucket (``graph_buckets``: 1, 2, 4, 8, then every 8 up to ``max_num_seqs``) and the tables
up to a width class (``512`` tokens times a power of two, up to the longest sequence the pool can hold),
writes the step's metadata into static device buffers with one non-blocking copy per dtype from pinned
host mirrors, and replays the graph captured for that (bucket, width) (captured lazily, the first time
the pair is seen, into one memory pool shared by every graph; Triton's split-K scratch is preallocated
for the largest bucket and width (``Backend.decode_workspace``), so the captured region allocates
nothing of its own beyond its activations).

Padding rows compute token 0 at position 0 with a context of one token whose K/V they write to, and read
from, the cache's scratch block (``PagedKVCache`` block ``num_blocks - 1``, which the engine's block pool
never hands out), so they never touch a live block. Every kernel of the lean forward computes a row from
that row's inputs alone, except the matmuls, whose kernel choice may depend on the row count: padding to
the bucket therefore happens in the eager run too (``capture=False``, the CPU's way of running this
class, and the warm-up before each capture), so a graph's logits equal the eager padded step's bit for
bit. A batch above the largest bucket or a table wider than the widest class runs the ordinary eager step.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import replace

import torch

from hf_turbo.backends.mirror import HostMirror
from hf_turbo.cache.paged_cache import ForwardContext
from hf_turbo.engine.request import Request

__all__ = ["DecodeGraphs", "DeviceIds", "decode_graphs", "graph_buckets", "graphs_unavailable", "is_decode_only",
           "width_classes"]

logger = logging.getLogger(__name__)

# a step's input ids already on the device: (tokens [m], the row in them of each sequence); engine/lookahead.py
DeviceIds = tuple[torch.Tensor, list[int]]

WIDTH_UNIT_TOKENS = 512  # the narrowest table width class, in tokens (the split-K partition size)


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8, up to and including ``max_num_seqs``."""
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def width_classes(block_size: int, max_blocks: int) -> list[int]:
    """Block-table widths (in blocks) that get a graph: ``512`` tokens doubling, the last one ``max_blocks``."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    w = max(1, -(-WIDTH_UNIT_TOKENS // block_size))
    out = []
    while w < max_blocks:
        out.append(w)
        w *= 2
    return out + [max_blocks]


def is_decode_only(scheduled: list[tuple[Request, int]], logit_rows: list[list[int]] | None) -> bool:
    """Every sequence computes one token of its own (no proposals) and samples it."""
    for i, (req, n) in enumerate(scheduled):
        if n != 1 or req.num_computed + 1 != len(req.token_ids) or req.spec_tokens \
                or (logit_rows is not None and logit_rows[i] != [0]):
            return False
    return bool(scheduled)


class DecodeGraphs:
    """Padded decode steps of ``runner``'s lean forward on static buffers; CUDA graphs when ``capture``.

    ``max_blocks``: the widest block table captured (wider steps run eagerly). The cache's last block is
    the padding rows' scratch block.
    """

    def __init__(self, runner, max_num_seqs: int, max_blocks: int, capture: bool) -> None:
        cache = runner.cache
        self.runner = runner
        self.buckets = graph_buckets(max_num_seqs)
        self.widths = width_classes(cache.block_size, max_blocks)
        self.capture = capture
        self.scratch_block = cache.num_blocks - 1
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_replays = 0
        self.num_eager = 0
        self.failed: str | None = None  # why capturing failed (then every step runs the plain eager path)
        self.sampler = None  # the sampler's graphs on these buckets (engine/graph_sampler.py), made on first use
        big, wide = self.buckets[-1], self.widths[-1]
        dev = runner.device
        # static buffers, packed by dtype so each step is two host-to-device copies: int64 [ids | positions |
        # slots | sliding slots | each row's row in the device ids (engine/lookahead.py)] (5 x big); int32
        # [context lens (big) | table (bucket x width, row-major) | the sliding layers' table (bucket x width)]
        # (the last part: a cache that releases sliding blocks)
        self.sliding = cache.sliding
        self.i64 = torch.zeros(5 * big, dtype=torch.int64, device=dev)
        self.i32 = torch.zeros(big + 2 * big * wide, dtype=torch.int32, device=dev)
        self.host64, self.host32 = HostMirror(self.i64), HostMirror(self.i32)  # pinned, two in turn
        self.cu = torch.arange(big + 1, dtype=torch.int32, device=dev)  # one token per sequence, always
        self.keep = torch.arange(big, dtype=torch.int64, device=dev)  # every row is sampled
        config = runner.model.config
        heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.workspace = cache.backend.decode_workspace(big, heads, head_dim, wide * cache.block_size, dev)

    def plan(self, num_seqs: int, num_blocks: int) -> tuple[int, int] | None:
        """(bucket, width) for a step of ``num_seqs`` sequences whose longest table has ``num_blocks`` blocks."""
        b = bisect.bisect_left(self.buckets, num_seqs)
        w = bisect.bisect_left(self.widths, num_blocks)
        if b == len(self.buckets) or w == len(self.widths):
            return None
        return self.buckets[b], self.widths[w]

    def _fill(self, seqs: list[Request], bucket: int, width: int, ids_from: DeviceIds | None = None
              ) -> tuple[list[int], int]:
        """Write the padded step into the host mirrors and copy it to the static buffers; returns the
        context lengths (padding rows' included) and the longest. ``ids_from`` (device tokens, row of each
        sequence in them): the input ids, gathered on the device after the copy."""
        n, big, bs = len(seqs), self.buckets[-1], self.runner.block_size
        h64, h32 = self.host64.begin(), self.host32.begin()
        pos = [len(r.token_ids) - 1 for r in seqs]
        ids, slots, pos_pad = h64[:big], h64[2 * big:3 * big], h64[big:2 * big]
        ids[:n] = [r.token_ids[-1] for r in seqs]
        pos_pad[:n] = pos
        slots[:n] = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(seqs, pos)]
        ids[n:bucket], pos_pad[n:bucket], slots[n:bucket] = 0, 0, self.scratch_block * bs
        lens = h32[:big]
        lens[:n] = [p + 1 for p in pos]
        lens[n:bucket] = 1
        table = h32[big:big + bucket * width].reshape(bucket, width)
        table[:] = 0
        for i, r in enumerate(seqs):
            table[i, :len(r.block_ids)] = r.block_ids
        table[n:, 0] = self.scratch_block
        if self.sliding is not None:  # the sliding layers' holds moved to this step, their slots and table mapped
            self.sliding.plan([(r, 1) for r in seqs])
            h64[3 * big:3 * big + bucket] = self.sliding.map_slots(slots[:bucket])
            h32[big + bucket * width:big + 2 * bucket * width] = self.sliding.map_table(table).reshape(-1)
        if ids_from is not None:
            h64[4 * big:4 * big + n] = ids_from[1]
        host_lens = lens[:bucket].tolist()
        self.host64.push()
        self.host32.push(big + 2 * bucket * width)
        if ids_from is not None:  # stream-ordered after the copy above and before the forward reads the ids
            self.i64[:n].copy_(ids_from[0].index_select(0, self.i64[4 * big:4 * big + n]))
        return host_lens, max(host_lens)

    def _context(self, bucket: int, width: int, host_lens: list[int], max_len: int) -> ForwardContext:
        big = self.buckets[-1]
        cache = self.runner.cache
        ctx = ForwardContext(
            cache=cache, slot_mapping=self.i64[2 * big:2 * big + bucket], cu_seqlens_q=self.cu[:bucket + 1],
            context_lens=self.i32[:bucket], block_tables=self.i32[big:big + bucket * width].view(bucket, width),
            max_seqlen_q=1, max_context_len=max_len, host_cu_seqlens_q=list(range(bucket + 1)),
            host_context_lens=host_lens, backend=cache.backend, seqs=None)
        ctx.meta = self.workspace
        if self.sliding is not None:
            at = big + bucket * width
            ctx.sliding = replace(ctx, slot_mapping=self.i64[3 * big:3 * big + bucket],
                                  block_tables=self.i32[at:at + bucket * width].view(bucket, width))
        return ctx

    def _forward(self, ctx: ForwardContext, bucket: int) -> torch.Tensor:
        big, lean = self.buckets[-1], self.runner.lean
        ids, pos = self.i64[None, :bucket], self.i64[None, big:big + bucket]
        return self.runner._run(lambda c: lean(ids, pos, self.keep[:bucket], c), ctx)[0]  # [bucket, V]

    def run(self, seqs: list[Request], ids_from: DeviceIds | None = None) -> torch.Tensor | None:
        """Logits [len(seqs), V] of a decode-only step (a view of a static buffer on CUDA: read it before
        the next step), or None when the step is outside the buckets and widths. ``ids_from``: the step's input
        ids are on the device (``(tokens, row in tokens of each sequence)``), not the sequences' last ids."""
        shape = self.plan(len(seqs), max(len(r.block_ids) for r in seqs))
        if shape is None or self.failed is not None:
            return None
        bucket, width = shape
        host_lens, max_len = self._fill(seqs, bucket, width, ids_from)
        if not self.capture:
            self.num_eager += 1
            return self._forward(self._context(bucket, width, host_lens, max_len), bucket)[:len(seqs)]
        graph = self.graphs.get(shape)
        if graph is None:
            try:
                graph = self.graphs[shape] = self._capture(bucket, width)
            except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: eager from now on
                self.failed = f"{type(exc).__name__}: {exc}"
                logger.warning("CUDA graph capture failed at batch %d (%s); decode steps run eagerly", bucket,
                               self.failed)
                return None
        graph[0].replay()
        self.num_replays += 1
        return graph[1][:len(seqs)]

    def _capture(self, bucket: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (Triton compiles, cuBLAS picks its kernels) on a side stream, then capture. The table width
        fixes the split-K grid, so the context is built with the class's full capacity as its bound."""
        ctx = self._context(bucket, width, [1] * bucket, width * self.runner.block_size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(ctx, bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(ctx, bucket)
        logger.info("captured the decode step at batch %d, table width %d blocks", bucket, width)
        return graph, out


def graphs_unavailable(runner, tp_size: int = 1) -> str | None:
    """Why ``runner``'s decode steps cannot be captured, or None when they can."""
    from hf_turbo.engine.lean import LeanForward

    if runner.device.type != "cuda":
        return f"the model is on {runner.device}, not a CUDA device"
    if runner.backend.name != "triton":
        return f"the attention backend is {runner.backend.name!r}, not 'triton'"
    if runner.lean is None:
        why = LeanForward.why_not(runner.model)
        return "TurboConfig.lean_forward is False" if why is None else f"there is no lean forward: {why}"
    if tp_size > 1:
        return f"the model is tensor-parallel ({tp_size} ranks)"
    return None


def decode_graphs(runner, cuda_graphs: bool | None, max_num_seqs: int, max_model_len: int | None,
                  pool_blocks: int, tp_size: int = 1) -> DecodeGraphs | None:
    """``TurboConfig.cuda_graphs`` resolved: graphs for ``runner`` (None: off). True where they cannot run:
    ValueError naming the field and the reason; None (the default): on where they can run."""
    if cuda_graphs is False:
        return None
    why = graphs_unavailable(runner, tp_size)
    if why is not None:
        if cuda_graphs:
            raise ValueError(f"TurboConfig.cuda_graphs=True cannot be honoured: {why}")
        logger.debug("CUDA graphs off: %s", why)
        return None
    bs = runner.block_size
    max_blocks = pool_blocks if max_model_len is None else min(pool_blocks, -(-max_model_len // bs))
    return DecodeGraphs(runner, max_num_seqs, max_blocks, capture=True)
