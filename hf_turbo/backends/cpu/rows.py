"""A contiguous copy of each running sequence's K/V: the CPU attention path reads it without gathering blocks.

On the CPU the paged attention reference would otherwise gather every sequence's blocks into a
contiguous tensor in every layer of every step: that copy moved three times the bytes the attention
itself reads, and decode on a CPU is bound by memory traffic. Here every running sequence owns one
row (a *slot*) of a per-layer arena ``[slots, H_kv, capacity, D]`` that mirrors its positions
``[0, length)`` in the pool, head-major, so that each head's keys are one contiguous run (the CPU
SDPA kernel streams them ~20% faster than rows strided by ``H_kv * D``). A forward appends its new
tokens to every sequence with one ``ext.scatter_kv`` call per layer (else one ``index_copy_`` per
layer and tensor), and attention reads ``arena[slot, :, first_key:end]`` as a view.

The pool stays the source of truth (prefix caching, copy-on-write, the Triton kernels and the
invariants use only the pool): a mirror that is behind the pool (a request admitted on cached
prefix blocks) is filled from the pool once, and one that is ahead (speculative tokens rejected, a
preempted request recomputing) is cut back to where the forward starts writing. Sequences are keyed
weakly, so a slot is reclaimed once its sequence is gone; the engine also drops them when a request
releases its blocks, and the arenas are freed when no sequence is left. The values are bitwise the
pool's (same K/V, copied), so outputs do not change.

**Shared prefix pages** (Linux, CPU, when one block of one head is a whole number of memory pages,
e.g. 16 positions x 64 dims x fp32 = 4 KiB): a request admitted on cached prefix blocks does not copy
them into its row. Each layer has a page store (``backends/cpu/vmem.py``) with a page run per (K or V, head,
pool block); the first such request copies a cached block from the pool into the store once, and
every request adopting it maps those store pages into its own row. Sequences sharing a prompt
prefix then share its memory, and decode reads the prefix once from the CPU caches instead of once
per sequence from DRAM. A sequence's own positions stay private (no mapping per decode block). A
block written again from its first position (a new owner) is no longer trusted in the store.
Without page-aligned blocks, or past half of the kernel's per-process mapping limit, the arenas stay
plain copies.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import Tensor

from hf_turbo.backends.cpu import ext, vmem
from hf_turbo.backends.cpu.plan import MirrorPlan, SeqState
from hf_turbo.backends.torch_kernels import gather_keys

__all__ = ["ContiguousKV", "MirrorPlan"]

logger = logging.getLogger(__name__)

_MIN_CAPACITY = 64
_MIN_SLOTS = 8
_SMALL_PLAN = 256  # decode steps up to this many sequences build their arena index from Python ints


class ContiguousKV:
    """Per-layer arenas holding a contiguous, head-major copy of each running sequence's K/V.

    ``num_blocks`` (the pool's block count) enables shared prefix pages where the platform and the
    layout allow it.
    """

    def __init__(self, num_layers: int, block_size: int, num_blocks: int | None = None) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._seqs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # seq -> _SeqState
        self._free: list[int] = []
        self._next_slot = 0  # slot ids handed out so far (ids below it are live or in _free)
        self._num_slots = 0
        self._capacity = 0
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers
        # shared prefix pages: on while None or True, decided by the first layer's layout
        self._share: bool | None = None if num_blocks is not None and vmem.supported() else False
        self._windows: list[tuple[vmem.Window, vmem.Window] | None] = [None] * num_layers
        self._stores: list[tuple[vmem.PageStore, Tensor] | None] = [None] * num_layers  # store, [2, H, NB, bs, D]
        self._stored: list[bytearray] = [bytearray(num_blocks or 0) for _ in range(num_layers)]
        self._slot_maps: dict[int, int] = {}  # slot -> mmap calls its row holds
        self._map_budget = vmem.map_count_budget() if self._share is None else 0

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs

    @property
    def shares_pages(self) -> bool:
        """Whether requests admitted on cached blocks map shared store pages (decided by the first forward)."""
        return bool(self._share)

    def drop(self, seq: object) -> None:
        """Forget a sequence's copy (it finished, was aborted or preempted); its slot is reused."""
        state = self._seqs.pop(seq, None)
        if state is not None:
            self._free.append(state.slot)
            if self._slot_maps.get(state.slot):
                self._unmap_slot(state.slot)
        if not self._seqs:
            self._release_arenas()

    def clear(self) -> None:
        """Forget every sequence and free the arenas and the page stores."""
        self._seqs.clear()
        self._release_arenas()
        self._stores = [None] * self.num_layers
        self._stored = [bytearray(self.num_blocks or 0) for _ in range(self.num_layers)]

    def invalidate(self) -> None:
        """The pool was written without this mirror (a forward without ``seqs``): trust nothing it holds."""
        for state in self._seqs.values():
            state.valid = [0] * self.num_layers
        if any(any(stored) for stored in self._stored):
            self._stored = [bytearray(self.num_blocks or 0) for _ in range(self.num_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)

    def _release_arenas(self) -> None:
        self._free = []
        self._next_slot = self._num_slots = self._capacity = 0
        self._k = [None] * self.num_layers
        self._v = [None] * self.num_layers
        self._windows = [None] * self.num_layers
        self._slot_maps = {}
        for state in self._seqs.values():
            state.adopted = [[] for _ in range(self.num_layers)]

    # -- per forward ---------------------------------------------------------------------------
    def plan(self, seqs: list, context_lens: list[int], cu: list[int],
             block_ids: list[list[int]] | None = None) -> MirrorPlan:
        """Give every sequence a slot, grow the arenas to fit, and index the forward's new tokens.

        ``block_ids[i]``: sequence i's pool blocks; with them, a new sequence maps the shared store
        pages of the full blocks before its first new position instead of copying them.
        """
        states, slots, starts = [], [], []
        adopt: list[tuple[int, list[int]]] = []
        bs = self.block_size
        # only blocks some store holds can go stale (a store starts with nothing trusted)
        track_fresh = block_ids is not None and any(self._stores)
        for i, seq in enumerate(seqs):
            state = self._seqs.get(seq)
            start = context_lens[i] - (cu[i + 1] - cu[i])
            if state is None:
                state = self._seqs[seq] = SeqState(self._take_slot(), self.num_layers)
                if self._share is not False and block_ids is not None and start >= bs:
                    adopt.append((i, list(block_ids[i][: start // bs])))
            elif state.adopted[0] and start < len(state.adopted[0]) * bs:
                # about to write inside its shared pages (never done by the engine): make the row private again
                self._unmap_slot(state.slot)
                state.adopted = [[] for _ in range(self.num_layers)]
                state.valid = [0] * self.num_layers
            states.append(state)
            slots.append(state.slot)
            starts.append(start)
            if track_fresh:
                # blocks this forward writes from their first position hold a new owner's content
                for j in range(-(-start // bs), -(-context_lens[i] // bs)):
                    b = block_ids[i][j]
                    for stored in self._stored:
                        stored[b] = 0
        need = max(context_lens, default=0)
        if need > self._capacity or self._next_slot > self._num_slots:
            self._grow(need)
        total = cu[-1] if cu else 0
        if total <= _SMALL_PLAN and total == len(seqs) and all(c1 - c0 == 1 for c0, c1 in zip(cu, cu[1:])):
            pos_slot = (starts, slots)  # decode: each sequence's one new token sits at its start
        else:
            counts = torch.tensor([cu[i + 1] - cu[i] for i in range(len(seqs))], dtype=torch.int64)
            # position of each new token: start of its sequence + offset within the sequence's rows
            offsets = torch.tensor([s - c for s, c in zip(starts, cu[:-1], strict=True)], dtype=torch.int64)
            pos = torch.repeat_interleave(offsets, counts, output_size=total) + torch.arange(total, dtype=torch.int64)
            slot_t = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int64), counts, output_size=total)
            pos_slot = torch.stack([pos, slot_t])
        return MirrorPlan(states, slots, starts, list(context_lens), self._capacity, pos_slot, adopt=adopt)

    def append(self, layer: int, plan: MirrorPlan, new_k: Tensor, new_v: Tensor, k_pool: Tensor,
               v_pool: Tensor, block_tables: Tensor) -> tuple[Tensor, Tensor]:
        """Write this forward's new K/V ([T, H_kv, D]) for every planned sequence; return the arenas.

        A sequence whose copy is behind its first new position first maps the shared pages of its
        cached blocks (where pages are shared) and copies the rest from its blocks (``block_tables``
        row i) in the pool.
        """
        h, d = new_k.shape[1], new_k.shape[2]
        ka, va = self._k[layer], self._v[layer]
        if ka is None or ka.shape[1] != h or ka.shape[3] != d:
            ka, va = self._allocate(layer, h, d, new_k)
        if plan.capacity != self._capacity:
            raise RuntimeError("ContiguousKV grew after this forward was planned")
        if plan.adopt and self._share:
            self._adopt(layer, plan, k_pool, v_pool)
            ka, va = self._k[layer], self._v[layer]  # past the mapping budget they became private copies
        for i, state in enumerate(plan.states):
            start, valid = plan.starts[i], state.valid[layer]
            if valid < start:  # behind the pool: copy the missing positions from their blocks once
                ka[state.slot, :, valid:start] = gather_keys(k_pool, block_tables[i], valid, start).transpose(0, 1)
                va[state.slot, :, valid:start] = gather_keys(v_pool, block_tables[i], valid, start).transpose(0, 1)
            state.valid[layer] = plan.ends[i]  # anything past end (rejected, recomputed) is no longer valid
        scatter = ext.scatter_kv() if ka.device.type == "cpu" else None
        if new_k.shape[0] and scatter is not None:
            scatter(new_k, new_v, ka, va, plan.flat_index(), self._capacity)
        elif new_k.shape[0]:
            idx = plan.index(h, ka.device)
            ka.view(-1, d).index_copy_(0, idx, new_k.reshape(-1, d))
            va.view(-1, d).index_copy_(0, idx, new_v.reshape(-1, d))
        return ka, va

    def extend(self, layer: int, seq: object, start: int, new_k: Tensor, new_v: Tensor, k_pool: Tensor,
               v_pool: Tensor, block_row: Tensor) -> tuple[Tensor, Tensor]:
        """One sequence: hold positions ``[0, start + n)`` and return them as ``[start + n, H_kv, D]`` views.

        new_k/new_v: [n, H_kv, D], the K/V of positions ``[start, start + n)`` (already in the pool).
        """
        n = new_k.shape[0]
        plan = self.plan([seq], [start + n], [0, n], [block_row.tolist()])
        ka, va = self.append(layer, plan, new_k, new_v, k_pool, v_pool, block_row[None])
        slot, end = plan.slots[0], start + n
        return ka[slot, :, :end].transpose(0, 1), va[slot, :, :end].transpose(0, 1)

    # -- shared prefix pages -------------------------------------------------------------------
    def _adopt(self, layer: int, plan: MirrorPlan, k_pool: Tensor, v_pool: Tensor) -> None:
        """Map the store pages of new sequences' cached blocks into their rows (filling the store once)."""
        try:
            store, pages = self._store(layer, k_pool)
            stored = self._stored[layer]
            missing = sorted({b for _, blocks in plan.adopt for b in blocks if not stored[b]})
            if missing:  # pool [n, bs, H, D] -> store [H, n, bs, D]
                idx = torch.tensor(missing, dtype=torch.int64, device=k_pool.device)
                pages[0][:, idx] = k_pool.index_select(0, idx).permute(2, 0, 1, 3)
                pages[1][:, idx] = v_pool.index_select(0, idx).permute(2, 0, 1, 3)
                for b in missing:
                    stored[b] = 1
            for i, blocks in plan.adopt:
                state = plan.states[i]
                state.adopted[layer] = blocks
                self._map_row(layer, state.slot, blocks)
                state.valid[layer] = max(state.valid[layer], len(blocks) * self.block_size)
        except OSError as err:  # no memfd, no address space, too many mappings: copies from here on
            logger.warning("CPU K/V rows: sharing prefix pages failed (%s); using private copies", err)
            self._stop_sharing()
            return
        if sum(self._slot_maps.values()) > self._map_budget:
            self._stop_sharing()

    def _store(self, layer: int, like: Tensor) -> tuple[vmem.PageStore, Tensor]:
        entry = self._stores[layer]
        if entry is None:  # (a layer changing shape stops sharing, so a store keeps its layout)
            h, d = self._k[layer].shape[1], self._k[layer].shape[3]
            nbytes = 2 * h * self.num_blocks * self.block_size * d * like.element_size()
            store = vmem.PageStore(nbytes)
            view = vmem.Window(nbytes, like.dtype)
            view.map(0, store, 0, nbytes)
            pages = view.tensor[: nbytes // like.element_size()].view(2, h, self.num_blocks, self.block_size, d)
            entry = self._stores[layer] = (store, pages)
            self._stored[layer] = bytearray(self.num_blocks)
        return entry

    def _map_row(self, layer: int, slot: int, blocks: list[int]) -> None:
        """Point block indices 0.. of ``slot``'s row (K and V, every head) at these blocks' store pages."""
        store, _ = self._stores[layer]
        win = self._windows[layer]
        heads, cap = self._k[layer].shape[1], self._capacity // self.block_size
        page = self.block_size * self._k[layer].shape[3] * self._k[layer].element_size()
        j = 0
        while j < len(blocks):
            n = 1
            while j + n < len(blocks) and blocks[j + n] == blocks[j] + n:
                n += 1  # consecutive pool blocks are one mapping
            for kv, window in enumerate(win):
                for h in range(heads):
                    window.map(((slot * heads + h) * cap + j) * page, store,
                               ((kv * heads + h) * self.num_blocks + blocks[j]) * page, n * page)
            self._slot_maps[slot] = self._slot_maps.get(slot, 0) + 2 * heads
            j += n

    def _unmap_slot(self, slot: int) -> None:
        """Give a slot's row back its private pages (a new sequence must not write into shared ones)."""
        for layer, win in enumerate(self._windows):
            if win is not None and slot < self._num_slots:
                row = self._k[layer][0].numel() * self._k[layer].element_size()
                for window in win:
                    window.unmap(slot * row, row)
        self._slot_maps.pop(slot, None)

    def _stop_sharing(self) -> None:
        """Every row becomes a private copy of what it shows, for good (mapping budget spent, the OS refused,
        or a layer of another layout)."""
        for arenas in (self._k, self._v):
            for layer, arena in enumerate(arenas):
                if arena is not None:
                    arenas[layer] = arena.clone()
        self._windows = [None] * self.num_layers
        self._stores = [None] * self.num_layers
        self._slot_maps = {}
        for state in self._seqs.values():
            state.adopted = [[] for _ in range(self.num_layers)]
        self._share = False

    # -- storage -------------------------------------------------------------------------------
    def _take_slot(self) -> int:
        if not self._free and self._next_slot > len(self._seqs):  # slots of collected sequences come back
            live = {state.slot for state in self._seqs.values()}
            self._free = [s for s in range(self._next_slot - 1, -1, -1) if s not in live]
        slot = self._free.pop() if self._free else self._next_slot
        if slot == self._next_slot:
            self._next_slot += 1
        if self._slot_maps.get(slot):  # a collected sequence left shared pages mapped in this row
            self._unmap_slot(slot)
        return slot

    def _new_arena(self, shape: tuple[int, ...], like: Tensor) -> tuple[tuple | None, tuple[Tensor, Tensor]]:
        """(windows or None, (K arena, V arena)): windows while prefix pages are shared, else plain tensors."""
        if self._share:
            numel = shape[0] * shape[1] * shape[2] * shape[3]
            try:
                nbytes = numel * like.element_size()
                win = (vmem.Window(nbytes, like.dtype), vmem.Window(nbytes, like.dtype))
                return win, (win[0].tensor[:numel].view(shape), win[1].tensor[:numel].view(shape))
            except OSError as err:
                logger.warning("CPU K/V rows: reserving address space failed (%s); using private copies", err)
                self._stop_sharing()
        return None, (torch.empty(shape, dtype=like.dtype, device=like.device),
                      torch.empty(shape, dtype=like.dtype, device=like.device))

    def _grow(self, length_needed: int) -> None:
        """Reallocate every arena with room for all handed-out slots and ``length_needed`` positions."""
        slots, cap = self._num_slots, self._capacity
        if self._next_slot > slots:
            slots = max(self._next_slot, 2 * slots, _MIN_SLOTS)
        if length_needed > cap:
            cap = max(length_needed, 2 * cap, _MIN_CAPACITY)
            cap = -(-cap // self.block_size) * self.block_size
        old_slots, old_cap = self._num_slots, self._capacity
        self._num_slots, self._capacity = slots, cap
        self._slot_maps = {}
        for layer in range(self.num_layers):
            old_k, old_v = self._k[layer], self._v[layer]
            if old_k is None:
                continue
            win, (new_k, new_v) = self._new_arena((slots, old_k.shape[1], cap, old_k.shape[3]), old_k)
            old_k, old_v = self._k[layer], self._v[layer]  # (private copies if sharing just stopped)
            new_k[:old_slots, :, :old_cap] = old_k
            new_v[:old_slots, :, :old_cap] = old_v
            self._k[layer], self._v[layer] = new_k, new_v
            if win is not None:
                self._windows[layer] = win
                try:
                    for state in self._seqs.values():
                        if state.adopted[layer]:
                            self._map_row(layer, state.slot, state.adopted[layer])
                except OSError as err:
                    logger.warning("CPU K/V rows: remapping prefix pages failed (%s); using private copies", err)
                    self._stop_sharing()

    def _allocate(self, layer: int, h: int, d: int, like: Tensor) -> tuple[Tensor, Tensor]:
        if self._share is None:  # the first layer decides: blocks of whole pages, on the CPU
            page = self.block_size * d * like.element_size()
            self._share = like.device.type == "cpu" and page % vmem.PAGE_SIZE == 0
        elif self._share and (self._k[layer] is not None
                              or (self.block_size * d * like.element_size()) % vmem.PAGE_SIZE):
            self._stop_sharing()  # a layer of another layout (or one changing shape): keep it simple
        shape = (self._num_slots, h, self._capacity, d)
        win, (self._k[layer], self._v[layer]) = self._new_arena(shape, like)
        self._windows[layer] = win
        for state in self._seqs.values():  # a fresh arena holds nothing yet
            state.valid[layer] = 0
        return self._k[layer], self._v[layer]
