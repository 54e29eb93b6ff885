"""Probe how transformers' decoders call a registered attention function, mask function and KV cache.

For each tiny architecture (float32) it:
  1. registers an attention ("probe") and a mask function under the same name, runs one packed forward
     ([1, T]: 3 sequences back to back, position_ids restarting at 0) with an extra ``probe_ctx`` kwarg,
     and records what reaches the attention function;
  2. compares those packed logits (attention restricted to each sequence through the ctx's cu_seqlens)
     with per-sequence stock forwards, and also the stock model fed the same packed input;
  3. runs prefill + one decode step with a recording ``DynamicCache`` subclass (which methods HF calls,
     with what) and with a minimal ``Cache`` subclass (update / get_seq_length / get_mask_sizes only).

A benchmark-style script, not a test: it prints tables. Run with the transformers under study:
    python benchmarks/probe_packed.py [--archs llama,gpt2] [--save ref.pt | --compare ref.pt] [--verbose]
``--save`` stores weights + stock logits; ``--compare`` (other transformers version) loads the same
weights and reports how far its stock logits are from the saved ones.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from hf_turbo.testing import TINY_ARCHS, tiny_model

LENGTHS = (5, 11, 7)  # 11 > sliding window 8
PROBE = "probe"


@dataclass
class Ctx:
    """What the caller threads through ``**kwargs`` to the attention function."""

    cu_seqlens: torch.Tensor  # [N + 1], int64


@dataclass
class Record:
    attn: list[dict[str, Any]] = field(default_factory=list)
    masks: list[dict[str, Any]] = field(default_factory=list)
    mask_objs: list[torch.Tensor] = field(default_factory=list)  # kept alive so ids stay unique
    ctx: Ctx | None = None


STATE = Record()


def _short(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return f"T{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_short(v) for v in x) if len(x) < 6 else f"{type(x).__name__}[{len(x)}]"
    if isinstance(x, Cache):
        return type(x).__name__
    if callable(x):
        return getattr(x, "__name__", type(x).__name__)
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    return type(x).__name__


def packed_mask(cu_seqlens: torch.Tensor, window: int | None) -> torch.Tensor:
    """[S, S] bool: query i may see key j (same sequence, j <= i, and i - j < window)."""
    total = int(cu_seqlens[-1])
    idx = torch.arange(total)
    seq = torch.bucketize(idx, cu_seqlens[1:], right=True)  # sequence id of each token
    pos = idx - cu_seqlens[seq]
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    return allowed


def probe_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over packed sequences; records what HF passes. query [B, H, S, D], k/v [B, Hkv, S, D]."""
    ctx = kwargs.get("probe_ctx")
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    scaling = kwargs.get("scaling")
    hf_mask_ok = None
    cu = (ctx if isinstance(ctx, Ctx) else STATE.ctx).cu_seqlens
    # queries are the last q_len tokens of the kv sequence (prefill: all of them, decode: the new ones)
    mine = packed_mask(cu, window)[-query.shape[2] :, : key.shape[2]]
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        hf_mask_ok = attention_mask.shape[-2:] == mine.shape and bool(torch.equal(attention_mask[0, 0], mine))
    STATE.attn.append(
        {
            "module": type(module).__name__,
            "layer": getattr(module, "layer_idx", None),
            "kwargs": tuple(sorted(kwargs)),
            "q": tuple(query.shape),
            "k": tuple(key.shape),
            "v": tuple(value.shape),
            "scaling": scaling,
            "sliding_window": window,
            "softcap": softcap,
            "ctx": isinstance(ctx, Ctx) and ctx is STATE.ctx,
            "mask": "from mask fn"
            if any(attention_mask is m for m in STATE.mask_objs)
            else _short(attention_mask),
            "hf_mask_ok": hf_mask_ok,
            "module_scaling": getattr(module, "scaling", None),
        }
    )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (query @ key.transpose(-1, -2)).float() * scaling  # [B, H, S, S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mine, float("-inf"))
    out = scores.softmax(-1).to(value.dtype) @ value  # [B, H, S, D]
    return out.transpose(1, 2).contiguous(), None  # [B, S, H, D]


def probe_mask(*args, **kwargs):
    """Records the mask-interface call, returns the materialised sdpa (bool) mask."""
    STATE.masks.append({"nargs": len(args), "kwargs": {k: _short(v) for k, v in sorted(kwargs.items())}})
    kwargs["allow_is_causal_skip"] = False
    mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)
    STATE.mask_objs.append(mask)
    return mask


class RecordingCache(DynamicCache):
    """DynamicCache that logs every public attribute HF touches from outside the cache itself."""

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_log", [])
        object.__setattr__(self, "_depth", 0)
        super().__init__(*args, **kwargs)
        self._log.clear()

    def __getattribute__(self, name):
        if name.startswith("_") or object.__getattribute__(self, "_depth") > 0:
            return object.__getattribute__(self, name)
        frame = sys._getframe(1)
        caller = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
        object.__setattr__(self, "_depth", 1)
        try:
            attr = object.__getattribute__(self, name)
        finally:
            object.__setattr__(self, "_depth", 0)
        log = object.__getattribute__(self, "_log")
        if not callable(attr) or isinstance(attr, (list, tuple)):
            log.append((caller, name, "attr", _short(attr)))
            return attr

        def wrapped(*args, **kwargs):
            log.append((caller, name, _short(args), _short(kwargs)))
            object.__setattr__(self, "_depth", 1)
            try:
                return attr(*args, **kwargs)
            finally:
                object.__setattr__(self, "_depth", 0)

        return wrapped


class MinimalCache(Cache):
    """Keeps every key/value; implements only update, get_seq_length and get_mask_sizes."""

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.update_args: set[str] = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.update_args.add(f"args={_short(args)} kwargs={_short(kwargs)}")
        # key_states: [B, Hkv, S_new, D]
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        q = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.get_seq_length(layer_idx) + q, 0


def _cache_kwarg_names(model, cache) -> dict[str, list[str]]:
    """Which keyword each module class receives the cache under (first layer's modules)."""
    seen: dict[str, set[str]] = collections.defaultdict(set)
    hooks = []
    for _, mod in model.named_modules():

        def hook(mod, args, kwargs, _name=type(mod).__name__):
            for k, v in kwargs.items():
                if v is cache:
                    seen[_name].add(k)
            if any(a is cache for a in args):
                seen[_name].add("<positional>")

        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def probe_arch(arch: str, saved: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": arch}
    stock = tiny_model(arch)
    if saved is not None and arch in saved:
        missing, unexpected = stock.load_state_dict(saved[arch]["state"], strict=False)
        row["load"] = f"missing={len(missing)} unexpected={len(unexpected)}"
    impl = stock.config._attn_implementation
    row["impl"] = impl
    vocab = stock.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (1, n), generator=gen) for n in LENGTHS]
    packed = torch.cat(seqs, dim=1)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])

    with torch.no_grad():
        ref = torch.cat([stock(input_ids=s, use_cache=False).logits for s in seqs], dim=1)
        row["stock_packed"] = _max_diff(
            stock(input_ids=packed, position_ids=pos, use_cache=False).logits, ref
        )
    row["ref"] = ref
    if saved is not None and arch in saved:
        row["vs_saved"] = _max_diff(ref, saved[arch]["logits"])

    # -- 1 + 2: registered attention + mask function on a packed batch
    model = tiny_model(arch)
    model.load_state_dict(stock.state_dict())
    try:
        model.set_attn_implementation(PROBE)
        row["set_impl"] = "ok"
    except Exception as e:  # a probe reports whatever breaks
        row["set_impl"] = f"{type(e).__name__}: {str(e)[:80]}"
    if model.config._attn_implementation != PROBE:  # e.g. gptj on 5.17 keeps "eager" without a word
        row["set_impl"] = f"kept {model.config._attn_implementation}; forced config"
        model.config._attn_implementation = PROBE
    STATE.attn.clear(), STATE.masks.clear(), STATE.mask_objs.clear()
    STATE.ctx = Ctx(cu)
    try:
        with torch.no_grad():
            out = model(input_ids=packed, position_ids=pos, use_cache=False, probe_ctx=STATE.ctx).logits
        row["packed"] = _max_diff(out, ref)
    except Exception as e:
        row["packed"] = f"{type(e).__name__}: {str(e)[:100]}"
    calls = STATE.attn
    row["attn_calls"] = len(calls)
    row["ctx"] = f"{sum(c['ctx'] for c in calls)}/{len(calls)}" if calls else "never called"
    row["mask_calls"] = len(STATE.masks)
    row["mask_reaches"] = sorted({c["mask"] for c in calls}) if calls else "-"
    row["hf_mask_ok"] = sorted({c["hf_mask_ok"] for c in calls}, key=str) if calls else "-"
    row["kwargs"] = sorted({k for c in calls for k in c["kwargs"]})
    row["shapes"] = sorted({(c["q"], c["k"], c["v"]) for c in calls})
    row["scaling"] = sorted({(c["scaling"], c["module_scaling"]) for c in calls}, key=str)
    row["sliding"] = [c["sliding_window"] for c in calls]
    row["softcap"] = sorted({c["softcap"] for c in calls}, key=str)
    row["mask_kwargs"] = STATE.masks[0] if STATE.masks else None
    row["mask_qkv"] = sorted(
        {(m["kwargs"].get("q_length"), m["kwargs"].get("kv_length")) for m in STATE.masks}, key=str
    )

    # -- 3: KV cache, stock attention: prefill 6 tokens then decode 1, without position_ids
    ids = torch.cat(seqs, dim=1)[:, :7]
    with torch.no_grad(), warnings.catch_warnings(record=True) as warns:
        warnings.simplefilter("always")
        full = stock(input_ids=ids, use_cache=False).logits[:, -1]
        cache = RecordingCache(config=stock.config)
        seen, hooks = _cache_kwarg_names(stock, cache)
        try:
            stock(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)
            pre = list(cache._log)
            cache._log.clear()
            dec = stock(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits[:, -1]
            row["cache_decode"] = _max_diff(dec, full)
        except Exception as e:
            pre, row["cache_decode"] = list(cache._log), f"{type(e).__name__}: {str(e)[:100]}"
        for h in hooks:
            h.remove()
        row["cache_prefill_log"], row["cache_decode_log"] = pre, list(cache._log)
        row["cache_kw"] = {k: sorted(v) for k, v in seen.items()}
        try:
            mini = MinimalCache()
            stock(input_ids=ids[:, :6], past_key_values=mini, use_cache=True)
            dec = stock(input_ids=ids[:, 6:], past_key_values=mini, use_cache=True).logits[:, -1]
            row["minimal_cache"] = _max_diff(dec, full)
        except Exception as e:
            row["minimal_cache"] = f"{type(e).__name__}: {str(e)[:100]}"
        # minimal cache + probe attention (what an engine would do): decode through the registered fn
        try:
            mini = MinimalCache()
            STATE.ctx = Ctx(torch.tensor([0, 6]))
            model(input_ids=ids[:, :6], past_key_values=mini, use_cache=True, probe_ctx=STATE.ctx)
            STATE.attn.clear()
            STATE.ctx = Ctx(torch.tensor([0, 7]))
            dec = model(input_ids=ids[:, 6:], past_key_values=mini, use_cache=True, probe_ctx=STATE.ctx)
            row["probe_decode"] = _max_diff(dec.logits[:, -1], full)
            row["probe_decode_calls"] = sorted(
                {(c["q"], c["k"], c["ctx"], c["mask"], c["hf_mask_ok"]) for c in STATE.attn}, key=str
            )
            row["update_args"] = sorted(mini.update_args)
        except Exception as e:
            row["probe_decode"] = f"{type(e).__name__}: {str(e)[:100]}"
            row["probe_decode_calls"], row["update_args"] = [], []
    row["cache_warn"] = sorted({str(w.message)[:100] for w in warns if "cache" in str(w.message).lower()})
    row["state"] = {k: v.clone() for k, v in stock.state_dict().items()}
    return row


def _fmt(x: Any) -> str:
    return f"{x:.1e}" if isinstance(x, float) else str(x)


def _summarize_log(log: list) -> list[str]:
    """One line per distinct call; model file names and key/value shapes are folded so archs group."""
    out, seen = [], set()
    for caller, name, args, kwargs in log:
        if caller.startswith("modeling_"):
            caller = "modeling_*.py:" + caller.split(":", 1)[1]
        if name == "update" and isinstance(args, tuple) and len(args) >= 3:
            args = ("key[B,Hkv,S_new,D]", "value", f"layer_idx:{type(args[2]).__name__}", *args[3:])
        line = f"{caller} -> {name}" + (f" = {kwargs}" if args == "attr" else f"{args} {kwargs}")
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(TINY_ARCHS))
    ap.add_argument("--save", help="write weights + stock logits here")
    ap.add_argument("--compare", help="load weights from a --save file and diff stock logits")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    AttentionInterface.register(PROBE, probe_attention)
    AttentionMaskInterface.register(PROBE, probe_mask)
    saved = torch.load(args.compare, weights_only=False) if args.compare else None

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, lengths {LENGTHS}\n")
    rows = []
    for arch in args.archs.split(","):
        try:
            rows.append(probe_arch(arch, saved))
        except Exception as e:
            print(f"{arch}: FAILED {type(e).__name__}: {e}")
    head = (
        "arch         impl   set_impl ctx->attn  mask->attn        hf_mask  packed   stock_pk  "
        "cache_dec minicache"
    )
    print(head + ("  vs_saved" if saved else ""))
    for r in rows:
        print(
            f"{r['arch']:12s} {r['impl']:6s} {r['set_impl'][:8]:8s} {r['ctx']:10s} "
            f"{str(r['mask_reaches'])[:17]:17s} {str(r['hf_mask_ok'])[:8]:8s} {_fmt(r['packed'])[:8]:8s} "
            f"{_fmt(r['stock_packed']):9s} {_fmt(r['cache_decode'])[:9]:9s} {_fmt(r['minimal_cache'])[:9]:9s}"
            + (f" {_fmt(r.get('vs_saved'))}" if saved else "")
        )
    print("\n-- attention calls")
    for r in rows:
        print(f"{r['arch']}: calls={r['attn_calls']} kwargs={r['kwargs']}")
        print(f"    shapes(q,k,v)={r['shapes']} scaling(passed, module)={r['scaling']}")
        print(
            f"    sliding_window per call={r['sliding']} softcap={r['softcap']} mask calls={r['mask_calls']}"
        )
        if not isinstance(r["packed"], float) or r["set_impl"] != "ok":
            print(f"    set_attn_implementation: {r['set_impl']}; packed: {r['packed']}")
        print(
            f"    decode, probe attn + MinimalCache: diff={_fmt(r['probe_decode'])} {r['probe_decode_calls']}"
        )
        print(f"    MinimalCache.update got: {r['update_args']}")
    print("\n-- mask function call (first), (q_length, kv_length) seen")
    for r in rows:
        print(f"{r['arch']}: {r['mask_qkv']} {r['mask_kwargs'] if args.verbose or r is rows[0] else ''}")
    print("\n-- cache: keyword the modules receive it under; warnings")
    for r in rows:
        print(f"{r['arch']}: {r['cache_kw']} {r['cache_warn']}")
    print("\n-- cache calls (caller -> method(args, kwargs)), deduplicated")
    groups: dict[str, list[str]] = {}
    for r in rows:
        text = "\n".join(
            ["  prefill:", *("    " + s for s in _summarize_log(r["cache_prefill_log"]))]
            + ["  decode:", *("    " + s for s in _summarize_log(r["cache_decode_log"]))]
        )
        groups.setdefault(text, []).append(r["arch"])
    for text, archs in groups.items():
        print(f"[{', '.join(archs)}]\n{text}")
    if args.save:
        torch.save({r["arch"]: {"state": r["state"], "logits": r["ref"]} for r in rows}, args.save)
        print(f"\nsaved weights + stock logits to {args.save}")


if __name__ == "__main__":
    main()
