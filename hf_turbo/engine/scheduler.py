"""The scheduler: which requests run this step, with how many tokens, on which KV blocks.

One step has a token budget (``max_num_batched_tokens``) and a cap on running sequences. Running
requests go first, in arrival order (decode tokens and the rest of chunked prefills), then waiting
requests are admitted in arrival order while blocks and budget last; a request that does not fit
stops admission, so nobody behind it overtakes it (FCFS, no starvation). When a running request
needs a block and none is free, the most recently arrived running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later, which gives the same
output because sampling is keyed by position. With prefix caching, a newly admitted request first
takes every cached full block of its prefix; and one whose next uncached block is still being
computed by a running request's prefill waits (admission stops there, FCFS) until that prefill
has cached it, instead of computing the same prefix a second time in the same steps.

Speculation: a running request's ``spec_tokens`` ride along in its chunk (verification). They are
optional work: cut to fit the token budget, dropped rather than taking a block a later running
request may need (so they never cause a preemption), and gone with the request's blocks when it is
preempted. ``commit`` only ever sees accepted tokens (the engine shortens the chunk first), so
prefix-cache hashes never cover a rejected one; ``trim`` then frees blocks that held only rejected
slots.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

__all__ = ["Scheduler", "SchedulerOutput"]


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.on_release: Callable[[Request], None] | None = None  # called when a request gives its blocks back
        # writes a request's imported K/V into the blocks it was just given (Request.kv_import)
        self.on_import: Callable[[Request], None] | None = None
        # copy-on-write of a prompt's last partial block: on_copy(src block, dst block) copies its K/V
        self.on_copy: Callable[[int, int], None] | None = None
        # a cache whose sliding layers release blocks (cache/sliding.py): how many blocks of a prefix hit a new
        # request can take (it then holds them), and how many requests may run at once
        self.on_prefix_hit: Callable[[Request, list[int]], int] | None = None
        self.max_running: int | None = None

    # -- queue management -----------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, status: RequestStatus = RequestStatus.FINISHED) -> None:
        """Remove a request from the queues and release its blocks."""
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._release(req)
        req.status = status

    def _release(self, req: Request) -> None:
        if self.on_release is not None:
            self.on_release(req)
        self.pool.free(reversed(req.block_ids))
        req.block_ids = []
        req.num_computed = 0
        req.spec_tokens.clear()

    def trim(self, req: Request) -> None:
        """Free the blocks past ``req.num_tokens`` (they held only rejected speculative slots)."""
        keep = -(-req.num_tokens // self.block_size)
        if len(req.block_ids) > keep:
            self.pool.free(reversed(req.block_ids[keep:]))
            del req.block_ids[keep:]

    def _blocks_needed(self, req: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids))

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self._release(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        logger.debug("preempted %s", victim.request_id)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self, skip: Collection[Request] = ()) -> SchedulerOutput:
        """This step's work; ``skip``: running requests left out of it (they may still be preempted for another's
        block)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req in skip:
                i += 1
                continue
            n = min(req.num_tokens + len(req.spec_tokens) - req.num_computed, budget)
            del req.spec_tokens[max(n - (req.num_tokens - req.num_computed), 0):]  # what the budget left
            need = self._blocks_needed(req, req.num_computed + n)
            # speculation is optional: it takes blocks only while every later running request can
            # still get one, so it never causes a preemption
            if req.spec_tokens and need > self.pool.num_free - (len(self.running) - i - 1):
                n -= len(req.spec_tokens)
                req.spec_tokens.clear()
                need = self._blocks_needed(req, req.num_computed + n)
            while need > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            if need:
                req.block_ids.extend(self.pool.allocate(need))
            out.scheduled.append((req, n))
            budget -= n
            i += 1

        producing: set[bytes] | None = None
        max_running = self.max_num_seqs if self.max_running is None else min(self.max_num_seqs, self.max_running)
        while self.waiting and budget > 0 and len(self.running) < max_running and not out.preempted:
            req = self.waiting[0]
            imported = req.num_imported
            if imported and req.num_computed == 0 and not req.block_ids:
                # the caller's K/V for the first positions (a continued cache): blocks now, written below
                if -(-imported // self.block_size) > self.pool.num_free:
                    break
                req.block_ids = self.pool.allocate(-(-imported // self.block_size))
                req.num_computed = imported
                if self.on_import is not None:
                    self.on_import(req)
            elif req.num_computed == 0 and not req.block_ids and self.enable_prefix_caching \
                    and not req.no_prefix_cache:
                hashes = req.reusable_prefix_hashes(self.block_size)
                hit = self.pool.peek_prefix(hashes)
                if hit < len(hashes):
                    if producing is None:
                        producing = self._blocks_in_production()
                    if hashes[hit] in producing:
                        break  # a running prefill is computing this prefix: wait for it, do not compute it twice
                cached = self.pool.match_prefix(hashes)
                if cached and self.on_prefix_hit is not None:
                    keep = self.on_prefix_hit(req, cached)
                    if keep < len(cached):
                        self.pool.free(reversed(cached[keep:]))
                        del cached[keep:]
                req.block_ids = cached
                req.num_computed = len(cached) * self.block_size
                self._copy_partial_block(req)
                req.num_cached_tokens = max(req.num_cached_tokens, req.num_computed)
            n = min(req.num_tokens - req.num_computed, budget)
            need = self._blocks_needed(req, req.num_computed + n)
            if need > self.pool.num_free:
                if req.block_ids:  # give back the prefix we took; retry next step
                    self._release(req)
                break
            if need:
                req.block_ids.extend(self.pool.allocate(need))
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
            if producing is not None:  # it is now a running prefill too
                producing.update(self._unfinished_block_hashes(req))
        return out

    def _copy_partial_block(self, req: Request) -> None:
        """After a prefix hit: when a running request (one of ``n`` samples, or the same prompt) has computed
        the rest of this prompt but its last token in the block after the shared ones, copy that block
        instead of computing it again (the last token is computed for its logits)."""
        k, bs, end = len(req.block_ids), self.block_size, req.num_tokens - 1
        if self.on_copy is None or k == 0 or not k * bs < end <= (k + 1) * bs or not self.pool.num_free:
            return
        for src in self.running:
            if len(src.block_ids) > k and src.block_ids[k - 1] == req.block_ids[k - 1] \
                    and src.num_computed >= end and src.token_ids[k * bs:end] == req.token_ids[k * bs:end]:
                block = self.pool.allocate(1)[0]
                self.on_copy(src.block_ids[k], block)
                req.block_ids.append(block)
                req.num_computed = end
                return

    def _blocks_in_production(self) -> set[bytes]:
        """Hashes of the full blocks that running prefills have yet to compute (and will then cache)."""
        producing: set[bytes] = set()
        for req in self.running:
            producing.update(self._unfinished_block_hashes(req))
        return producing

    def _unfinished_block_hashes(self, req: Request) -> list[bytes]:
        if req.no_prefix_cache or req.num_tokens - req.num_computed <= 1:  # publishes nothing / decoding
            return []
        return req.full_block_hashes(self.block_size)[req.num_computed // self.block_size:]

    def commit(self, out: SchedulerOutput) -> None:
        """After the forward: advance progress and publish newly full blocks to the prefix cache."""
        for req, n in out.scheduled:
            before = req.num_computed
            req.num_computed += n
            if self.enable_prefix_caching and not req.no_prefix_cache:
                first_full = before // self.block_size
                last_full = req.num_computed // self.block_size
                if last_full > first_full:
                    hashes = req.full_block_hashes(self.block_size)
                    for b in range(first_full, min(last_full, len(hashes))):
                        self.pool.cache_block(req.block_ids[b], hashes[b])
