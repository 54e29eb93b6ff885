"""Proposers: cheap guesses of a request's next tokens, checked afterwards by one target forward.

``NgramProposer`` (prompt lookup) finds the longest suffix n-gram of a request's tokens earlier in
its own prompt + output and proposes what followed it. ``DraftModelProposer`` runs a smaller HF
causal LM with the target's vocabulary on its own paged KV cache, batched across requests: one
packed forward per proposed token for every speculating request (the first one also catches the
draft up on the tokens the target accepted since). A draft proposal at output position ``p`` is
drawn with the request's own keyed noise of position ``p`` (``hf_turbo.sampling``), so where the
draft's distribution is close to the target's the two pick the same token (coupled sampling).

Both take ``propose(requests, ks)`` and return, per request, at most ``ks[i]`` token ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hf_turbo.backends import get_backend
from hf_turbo.cache.block_pool import BlockPool
from hf_turbo.cache.paged_cache import PagedKVCache
from hf_turbo.engine.attach import attach, detach, state_of
from hf_turbo.engine.request import Request
from hf_turbo.engine.runner import ModelRunner
from hf_turbo.sampling import RowState, sample

logger = logging.getLogger(__name__)

__all__ = ["DraftModelProposer", "NgramProposer", "validate_draft"]


class NgramProposer:
    """Prompt lookup: the longest suffix n-gram (``n_max`` down to ``n_min``) matched earlier in the
    request's tokens, its most recent occurrence, and the k tokens that followed it.

    Where those run into the end of the sequence (a match just behind the suffix: a loop, a run of
    one token) the proposal goes on with itself, i.e. the repetition is assumed to continue. A
    per-request index (token -> positions) keeps the search proportional to the number of
    occurrences of the last token, not to the sequence length.
    """

    def __init__(self, n_max: int = 3, n_min: int = 1) -> None:
        self.n_max, self.n_min = n_max, n_min
        self._index: dict[str, tuple[dict[int, list[int]], list[int]]] = {}  # id -> (positions, count)

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        return [self.lookup(req, k) for req, k in zip(reqs, ks)]

    def lookup(self, req: Request, k: int) -> list[int]:
        tokens = req.token_ids
        last = len(tokens) - 1
        positions, seen = self._index.setdefault(req.request_id, ({}, [0]))
        for i in range(seen[0], last):  # index every token but the last (a match must end before it)
            positions.setdefault(tokens[i], []).append(i)
        seen[0] = max(seen[0], last)
        best_end, best_len = -1, 0
        for end in reversed(positions.get(tokens[last], ())):
            n = 1  # tokens[end] == tokens[last]; extend the match backwards
            while n < self.n_max and end - n >= 0 and tokens[end - n] == tokens[last - n]:
                n += 1
            if n > best_len:
                best_end, best_len = end, n
                if n == self.n_max:
                    break
        if best_len < self.n_min:
            return []
        out = tokens[best_end + 1:min(best_end + 1 + k, last + 1)]
        period = last - best_end
        while len(out) < k:  # past the end: the tokens that follow are the proposal's own
            out.append(out[len(out) - period])
        return out

    def release(self, req: Request) -> None:
        self._index.pop(req.request_id, None)

    def close(self) -> None:
        self._index.clear()


def validate_draft(draft, target, draft_tokenizer=None, target_tokenizer=None) -> None:
    """ValueError naming the problem if ``draft`` cannot propose tokens for ``target``."""
    from transformers import PreTrainedModel

    if not isinstance(draft, PreTrainedModel) or draft.get_output_embeddings() is None:
        raise ValueError(f"draft model must be a transformers causal LM with an LM head, got {type(draft).__name__}")
    draft_vocab = draft.get_output_embeddings().weight.shape[0]
    head = target.get_output_embeddings()
    target_vocab = head.weight.shape[0] if head is not None else target.config.vocab_size
    if draft_vocab != target_vocab:
        raise ValueError(f"draft model vocabulary size {draft_vocab} differs from the target's {target_vocab}: "
                         "the draft must share the target's tokenizer")
    if draft_tokenizer is not None and target_tokenizer is not None \
            and draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError("draft tokenizer differs from the target's (their vocabularies map tokens to different "
                         "ids)")
    d, t = next(draft.parameters()), next(target.parameters())
    if d.device != t.device:
        raise ValueError(f"draft model device {d.device} differs from the target's {t.device}")
    if d.dtype != t.dtype:
        raise ValueError(f"draft model dtype {d.dtype} differs from the target's {t.dtype}")


@dataclass(eq=False)
class _DraftSeq:
    """The draft's copy of one request: the target's tokens then its own guesses, and its KV blocks.

    Exposes what ``ModelRunner`` reads of a request. ``token_ids[:confirmed]`` are final target
    tokens, so the draft's KV there stays valid whatever the target accepts next.
    """

    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    confirmed: int = 0
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full confirmed blocks
    published: int = 0  # leading blocks already in the draft pool's prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    """Proposals from a draft HF model on its own ``PagedKVCache`` + ``BlockPool`` + ``ModelRunner``.

    The draft is switched to the "hf_turbo" attention (``engine/attach.py``; unless it already runs it)
    and switched back by :meth:`close`. Its pool has ``num_blocks`` blocks of the
    target's block size (the engine sizes both pools from one budget). When the pool runs dry a
    request simply gets fewer (or no) proposals.
    """

    def __init__(self, draft, num_blocks: int, block_size: int, backend: str = "auto",
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True, lean: bool = True) -> None:
        self.model = draft
        self._owns_patch = state_of(draft) is None
        attach(draft)
        param = next(draft.parameters())
        num_layers = draft.config.get_text_config().num_hidden_layers
        self.cache = PagedKVCache(num_blocks, block_size, num_layers, param.dtype, param.device,
                                  backend=get_backend(backend, param.device))
        self.pool = BlockPool(num_blocks, block_size)
        self.runner = ModelRunner(draft, self.cache, lean=lean)
        self.max_num_batched_tokens = max_num_batched_tokens
        # full blocks of target tokens are cached in the draft's pool too: requests sharing a prompt
        # prefix (or one that comes back after preemption) make the draft compute it once
        self.prefix_caching = prefix_caching
        self.max_len = getattr(draft.config.get_text_config(), "max_position_embeddings", None)
        self.seqs: dict[str, _DraftSeq] = {}
        self.forward_seconds = 0.0  # EWMA of one proposal round (forward + sampling), for the cost model
        self._rounds = 0

    def propose(self, reqs: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        seqs = [self._sync(req) for req in reqs]
        starts = [s.num_tokens for s in seqs]
        ks = [k if self.max_len is None else min(k, self.max_len - s.num_tokens) for k, s in zip(ks, seqs)]
        for j in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if k > j and seqs[i].num_tokens == starts[i] + j]
            if not live:
                break
            t0 = time.perf_counter()
            done, logits = self._forward([seqs[i] for i in live])
            rows = [RowState(reqs[i].params, seqs[i].num_tokens - reqs[i].num_prompt_tokens, reqs[i].seed,
                             seqs[i].token_ids if reqs[i].params.needs_history else None, reqs[i].eos_ids)
                    for i, ok in zip(live, done) if ok]
            if rows:
                tokens = sample(logits, rows).tolist()
                for i, tok in zip((i for i, ok in zip(live, done) if ok), tokens):
                    seqs[i].token_ids.append(tok)
            dt = time.perf_counter() - t0
            self._rounds += 1
            if self._rounds > 1:  # the first one allocates the draft's KV pool
                self.forward_seconds = dt if not self.forward_seconds else 0.8 * self.forward_seconds + 0.2 * dt
        return [s.token_ids[start:] for s, start in zip(seqs, starts)]

    def _sync(self, req: Request) -> _DraftSeq:
        """Bring the draft's copy up to the request's tokens, keeping the KV of the accepted guesses."""
        seq = self.seqs.get(req.request_id)
        bs = self.pool.block_size
        if seq is None:
            seq = self.seqs[req.request_id] = _DraftSeq(list(req.token_ids))
            if self.prefix_caching:
                seq.block_ids = self.pool.match_prefix(req.reusable_prefix_hashes(bs))
                seq.published = len(seq.block_ids)
                seq.num_computed = seq.published * bs
        else:
            valid = min(seq.confirmed, seq.num_computed)
            limit = min(seq.num_computed, req.num_tokens)
            while valid < limit and seq.token_ids[valid] == req.token_ids[valid]:
                valid += 1
            # the KV past ``valid`` held rejected guesses (overwritten next); the last token is always
            # recomputed, for its logits
            valid = min(valid, req.num_tokens - 1)
            seq.num_computed = valid
            del seq.token_ids[valid:]
            seq.token_ids.extend(req.token_ids[valid:])
        seq.confirmed = req.num_tokens
        if self.prefix_caching:
            seq.hashes = req.full_block_hashes(bs)
        return seq

    def _publish(self, seq: _DraftSeq) -> None:
        """Cache the blocks that now hold only computed, confirmed tokens (never rewritten after)."""
        full = min(seq.num_computed, seq.confirmed) // self.pool.block_size
        for b in range(seq.published, min(full, len(seq.hashes))):
            self.pool.cache_block(seq.block_ids[b], seq.hashes[b])
        seq.published = max(seq.published, min(full, len(seq.hashes)))

    def _forward(self, seqs: list[_DraftSeq]) -> tuple[list[bool], torch.Tensor]:
        """Compute every seq up to its last token, packed into forwards within the token budget.

        Returns ``done[i]`` (False: no free block, the seq proposes nothing more this step) and the
        last-token logits [sum(done), V] of the done seqs, in order.
        """
        pending = list(range(len(seqs)))
        out: dict[int, torch.Tensor] = {}
        failed: set[int] = set()
        while pending:
            batch: list[tuple[int, int]] = []
            budget = self.max_num_batched_tokens
            for i in pending:
                if budget == 0:
                    break
                seq = seqs[i]
                n = min(seq.num_tokens - seq.num_computed, budget)
                need = -(-(seq.num_computed + n) // self.pool.block_size) - len(seq.block_ids)
                if need > self.pool.num_free:
                    failed.add(i)
                    continue
                seq.block_ids.extend(self.pool.allocate(max(need, 0)))
                batch.append((i, n))
                budget -= n
            if batch:
                logits = self.runner.execute([(seqs[i], n) for i, n in batch])
                row = 0
                for i, n in batch:
                    seqs[i].num_computed += n
                    if self.prefix_caching:
                        self._publish(seqs[i])
                    if seqs[i].num_computed == seqs[i].num_tokens:  # the runner kept this seq's logits
                        out[i] = logits[row]
                        row += 1
            pending = [i for i in pending if i not in out and i not in failed]
        done = [i in out for i in range(len(seqs))]
        return done, torch.stack([out[i] for i in sorted(out)]) if out else torch.empty(0)

    def release(self, req: Request) -> None:
        seq = self.seqs.pop(req.request_id, None)
        if seq is not None:
            self.cache.backend.release(self.cache, seq)
            self.pool.free(reversed(seq.block_ids))

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owned = sum(len(s.block_ids) for s in self.seqs.values())
        refs = sum(self.pool.ref_counts)
        if owned != refs:
            raise AssertionError(f"draft pool: {refs} block references held but sequences own {owned}")

    def close(self) -> None:
        """Free every draft block and give the draft model back its own attention (if we switched it)."""
        for seq in self.seqs.values():
            self.pool.free(reversed(seq.block_ids))
        self.seqs.clear()
        self.cache.forget_sequences()
        if self._owns_patch:
            state = state_of(self.model)
            if state is not None and not state.generate_installed:  # nobody accelerated it since
                detach(self.model)
            self._owns_patch = False
