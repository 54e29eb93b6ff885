"""The engine's packed forward for stock Llama-structured decoders, without the module machinery.

Calling ``model(...)`` on a transformers decoder spends a good part of a small decode step in
Python around the ops: ``nn.Module.__call__`` for every module, the ``deprecate_kwarg`` /
``capture_outputs`` / ``can_return_tuple`` wrappers, keyword dictionaries passed down every layer,
the mask and attention interface lookups and the output dataclasses. For the architectures in
``FAMILIES``, when every module is the stock class and no module carries a hook,
:class:`LeanForward` walks the same modules and computes the same values in the same order with the
same shapes: the embedding and rotary modules, each projection called as the stock forward calls it (an
``nn.Linear``, a quantizer's subclass of it such as bitsandbytes' ``Linear8bitLt``/``Linear4bit``, or an
``nn.Linear`` over a quantized weight tensor such as torchao's), the modeling module's ``apply_rotary_pos_emb``,
the cache's ``update``, the "hf_turbo" attention, the norms' ``forward`` and the MLP's
``down(act(gate(x)) * up(x))``. Each op sees the inputs it sees in the stock forward, so the logits are bitwise
the model's.

The norms, the rotary embedding, the MLP's ``act(gate) * up`` and the projections come from the
backend's fused-op table (``backend.fused_ops``, :mod:`hf_turbo.backends.base`): the stock ops, or on
the CPU backend in float32 one-call versions checked bit for bit against what they replace (and
projections on weights packed once for MKL where the packed product equals ``F.linear``).

The runner (``engine/runner.py``) does not take that on trust: before its first step it runs both
forwards on two short sequences over a scratch cache and compares the logits bit for bit; on any
difference it logs a warning and calls the model itself from then on.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

from hf_turbo.backends.base import is_plain_linear
from hf_turbo.patches.attention import ATTN_NAME, turbo_attention

__all__ = ["FAMILIES", "LeanForward", "linear_kind"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """How one architecture's layers differ from Llama's.

    ``prefix``: its classes' name prefix in its modeling module (``LlamaAttention``, ...).
    ``qk_norm``: an RMSNorm over each head of q and k before the transpose (Qwen3).
    ``window``: where the attention's sliding window comes from: ``"none"`` (never passed),
    ``"config"`` (``config.sliding_window``) or ``"module"`` (the attention's ``sliding_window``).
    """

    prefix: str
    qk_norm: bool = False
    window: str = "none"


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", window="config"),
    "qwen2": Family("Qwen2", window="module"),
    "qwen3": Family("Qwen3", qk_norm=True, window="module"),
}


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module does more than its class's ``forward`` (hooks, a patched forward)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__ or hasattr(module, "_hf_hook"))


def linear_kind(module: nn.Linear) -> str:
    """What computes ``module(x)``: ``nn.Linear``, a quantizer's subclass (``bitsandbytes Linear8bitLt``) or
    ``nn.Linear`` over a quantized weight tensor (torchao's ``Int8Tensor``)."""
    if type(module) is not nn.Linear:
        return f"{type(module).__module__.split('.')[0]} {type(module).__name__}"
    if not is_plain_linear(module):
        return f"nn.Linear over {type(module.weight).__name__}"
    return "nn.Linear"


def _global_hooks() -> bool:
    m = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(getattr(m, name, None) for name in names)


class LeanForward:
    """``logits = lean(input_ids [1, T], position_ids [1, T], logits_to_keep [N], ctx)``: the stock
    forward's ops for a packed engine forward; build with :meth:`build`."""

    def __init__(self, model: nn.Module, family: Family, modeling) -> None:
        self.model = model
        self.family = family
        self.apply_rope = modeling.apply_rotary_pos_emb

    @classmethod
    def why_not(cls, model: nn.Module) -> str | None:
        """None when ``model`` qualifies; otherwise the reason, for the log."""
        config = getattr(model, "config", None)
        family = FAMILIES.get(getattr(config, "model_type", None))
        if family is None:
            return f"model_type {getattr(config, 'model_type', None)!r} is not one of {sorted(FAMILIES)}"
        modeling = sys.modules.get(type(model).__module__)
        p = family.prefix
        expected = {name: getattr(modeling, p + name, None)
                    for name in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm",
                                 "RotaryEmbedding")}
        if type(model) is not expected["ForCausalLM"]:
            return f"{type(model).__name__} is not the stock {p}ForCausalLM"
        base = getattr(model, "model", None)
        if type(base) is not expected["Model"]:
            return f"model.model is a {type(base).__name__}, not the stock {p}Model"
        if not isinstance(model.lm_head, nn.Linear) or type(base.embed_tokens) is not nn.Embedding:
            return "the embedding is not a plain nn.Embedding or the LM head not an nn.Linear"
        if type(base.norm) is not expected["RMSNorm"] or type(base.rotary_emb) is not expected["RotaryEmbedding"]:
            return "the final norm or the rotary embedding is not the stock module"
        for i, layer in enumerate(base.layers[: config.num_hidden_layers]):
            attn = layer.self_attn
            if (type(layer) is not expected["DecoderLayer"] or type(attn) is not expected["Attention"]
                    or type(layer.mlp) is not expected["MLP"]
                    or type(layer.input_layernorm) is not expected["RMSNorm"]
                    or type(layer.post_attention_layernorm) is not expected["RMSNorm"]):
                return f"layer {i} has a module that is not the stock {p} class"
            mlp = layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                           mlp.down_proj)
            if any(not isinstance(lin, nn.Linear) for lin in projections):
                return f"layer {i} has a projection that is not an nn.Linear (an adapter?)"
            if family.qk_norm and (type(attn.q_norm) is not expected["RMSNorm"]
                                   or type(attn.k_norm) is not expected["RMSNorm"]):
                return f"layer {i} has a q/k norm that is not the stock module"
        hooked = next((name for name, mod in model.named_modules() if _hooked(mod)), None)
        if hooked is not None:
            return f"module {hooked or type(model).__name__!r} has hooks or a patched forward"
        return None

    @classmethod
    def describe(cls, model: nn.Module) -> str:
        """One line for the log: the lean forward and the kinds of linear layers it calls, or why not."""
        why = cls.why_not(model)
        if why is not None:
            return f"the model's own forward ({why})"
        kinds = sorted({linear_kind(m) for m in model.modules() if isinstance(m, nn.Linear)})
        family = FAMILIES[model.config.model_type].prefix
        return f"the lean forward ({family} family; linear layers: {', '.join(kinds)})"

    @classmethod
    def build(cls, model: nn.Module) -> LeanForward | None:
        """A lean forward for ``model``, or None (logged at DEBUG with the reason) when it does not qualify."""
        why = cls.why_not(model)
        if why is not None:
            logger.debug("lean forward off: %s", why)
            return None
        return cls(model, FAMILIES[model.config.model_type], sys.modules[type(model).__module__])

    def usable(self) -> bool:
        """Per step: the model still runs the "hf_turbo" attention and no global module hook appeared."""
        return self.model.config._attn_implementation == ATTN_NAME and not _global_hooks()

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor,
                 ctx) -> torch.Tensor:
        """Logits [1, N, V] of the ``logits_to_keep`` positions, as ``model(...).logits`` gives them."""
        model, family = self.model, self.family
        base = model.model
        config = model.config
        cache = ctx.cache
        hidden = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        n = input_ids.shape[1]
        ops = ctx.backend.fused_ops(model, hidden)
        norm, linear, act_mul = ops.norm, ops.linear, ops.act_mul
        rope = ops.rope or self.apply_rope
        extra = {}
        if family.window == "config":
            extra["sliding_window"] = getattr(config, "sliding_window", None)
        for layer in base.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            x = norm(layer.input_layernorm, hidden)
            shape = (1, n, -1, attn.head_dim)
            q = linear(attn.q_proj)(x).view(shape)
            k = linear(attn.k_proj)(x).view(shape)
            if family.qk_norm:
                q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = linear(attn.v_proj)(x).view(shape).transpose(1, 2)
            q, k = rope(q, k, cos, sin)
            k, v = cache.update(k, v, attn.layer_idx)
            if family.window == "module":
                extra["sliding_window"] = attn.sliding_window
            out, _ = turbo_attention(attn, q, k, v, None, dropout=attn.attention_dropout if attn.training else 0.0,
                                     scaling=attn.scaling, turbo_ctx=ctx, **extra)
            out = out.reshape(1, n, -1).contiguous()
            hidden = residual + linear(attn.o_proj)(out)
            residual = hidden
            x = norm(layer.post_attention_layernorm, hidden)
            # the stock MLP's forward: down_proj(act_fn(gate_proj(x)) * up_proj(x))
            gate, up = linear(mlp.gate_proj)(x), linear(mlp.up_proj)(x)
            hidden = residual + linear(mlp.down_proj)(act_mul(mlp.act_fn, gate, up))
        hidden = norm(base.norm, hidden)
        return linear(model.lm_head)(hidden[:, logits_to_keep, :])
