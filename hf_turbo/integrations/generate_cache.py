"""The cache a ``generate()`` call returns and the one it continues from, as stock transformers has them.

Stock ``generate(return_dict_in_generate=True)`` returns its ``DynamicCache``: per layer, K/V
``[B, H_kv, W - 1, D]`` over the whole padded output ``sequences`` (``W`` columns) but its last
column, which no forward has seen. Masked columns (left padding, holes) hold K/V nobody attends to;
columns of a row that stopped early hold the K/V of the pad tokens stock kept feeding it, which a
continued generation does attend to. :func:`export_cache` rebuilds that: each row's attended columns
run as one engine request (its generated tokens and pad tail included) whose K/V is read back from
its blocks when it finishes. With the prefix cache on, the blocks this call already computed are
reused and only each row's last partial block and pad tail are computed again. Masked columns are
zeros.

:func:`import_rows` is the way back: ``generate(..., past_key_values=cache)`` continues a cache by
writing each row's attended cached columns into its blocks (``Engine.add_request(kv_import=...)``),
so the engine computes only the positions the cache does not hold, as stock does.
"""

from __future__ import annotations

import torch

from hf_turbo.sampling import SamplingParams

__all__ = ["export_cache", "import_rows", "importable_reason"]


def export_cache(model, engine, sequences: torch.Tensor, mask: torch.Tensor, row_inputs: list | None = None):
    """A ``DynamicCache`` like stock's for ``sequences`` [B, W] under the full 2-D ``mask`` [B, W];
    ``row_inputs[i]``: row i's per-token model inputs of its prompt (``Engine.add_request(model_inputs=)``)."""
    from transformers import DynamicCache

    batch, width = sequences.shape
    cols = [mask[i, : width - 1].nonzero().flatten() for i in range(batch)]
    rows: list[list | None] = [None] * batch
    rids = []

    def keep(i: int, n: int):
        def on_finish(req) -> None:
            rows[i] = engine.read_kv(req, n)
        return on_finish

    params = SamplingParams(max_new_tokens=1, ignore_eos=True, speculative=False)
    try:
        for i in range(batch):
            if cols[i].numel():
                rids.append(engine.add_request(sequences[i, cols[i]].tolist(), params, on_finish=keep(i, len(cols[i])),
                                               model_inputs=row_inputs[i] if row_inputs else None))
        engine.run_to_completion(rids)
    except BaseException:
        for rid in rids:
            engine.abort(rid)
        raise
    cache = DynamicCache(config=model.config)
    first = next(r for r in rows if r is not None)
    for layer in range(len(first)):
        k0 = first[layer][0]
        shape = (batch, k0.shape[1], width - 1, k0.shape[2])
        keys = torch.zeros(shape, dtype=k0.dtype, device=sequences.device)
        values = torch.zeros_like(keys)
        for i in range(batch):
            if rows[i] is None:  # no attended column
                continue
            k, v = rows[i][layer]  # [n, H, D]
            keys[i, :, cols[i]] = k.transpose(0, 1).to(keys.device)
            values[i, :, cols[i]] = v.transpose(0, 1).to(keys.device)
        cache.update(keys, values, layer)
    return cache


def importable_reason(cache, engine, batch: int, width: int) -> str | None:
    """Why ``cache`` cannot be continued on the engine (None if it can): it must be a transformers
    ``Cache`` whose every layer holds plain K/V ``[batch, H_kv, c, D]`` for the same ``c`` < ``width``
    columns (a sliding-window layer that dropped columns cannot be replayed)."""
    if engine.cache.sliding is not None:
        return "the engine's sliding layers release blocks (CacheConfig.sliding_release)"
    layers = getattr(cache, "layers", None)
    if not layers or len(layers) != engine.cache.num_layers:
        return "past_key_values (not a per-layer K/V cache of this model)"
    lengths = set()
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4 \
                or k.shape[0] != batch or v.shape[:3] != k.shape[:3]:
            return "past_key_values (a layer without [batch, heads, length, dim] K/V)"
        lengths.add(k.shape[2])
    if len(lengths) != 1 or next(iter(lengths)) >= width or next(iter(lengths)) == 0:
        return "past_key_values (layers of different lengths, or as long as the input)"
    return None


def import_rows(cache, mask: torch.Tensor, prompt_lens: list[int]) -> list[list | None]:
    """Per row, the ``kv_import`` of its attended cached columns (None where it has none).

    ``mask`` [B, W] is the input's 2-D mask; at least the last prompt position is left to compute."""
    c = cache.layers[0].keys.shape[2]
    out: list[list | None] = []
    for i, n in enumerate(prompt_lens):
        cols = mask[i, :c].nonzero().flatten()[: n - 1]
        if cols.numel() == 0:
            out.append(None)
            continue
        out.append([(layer.keys[i, :, cols].transpose(0, 1).contiguous(),
                     layer.values[i, :, cols].transpose(0, 1).contiguous()) for layer in cache.layers])
    return out
