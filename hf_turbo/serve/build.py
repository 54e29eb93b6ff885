"""Build the ``hf-turbo serve`` app from its parsed arguments (model, engine, routes) and serve it with uvicorn:
the one-process server, each tensor-parallel rank (``launch.py``) and each Ray Serve replica (``replicas.py``)."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["build_app", "serve_app"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch_tokens", "max_num_seqs", "max_waiting", "num_blocks", "max_body_bytes",
                 "num_speculative_tokens", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("header_timeout", "keep_alive_timeout", "body_timeout"):
        value = getattr(args, name)
        if not value > 0:  # NaN too
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:  # NaN too
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if not (isinstance(args.dtype, str) and args.dtype.lower() == "auto"):
        from hf_turbo.loading import parse_dtype

        try:
            parse_dtype(args.dtype)
        except ValueError:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype!r}") from None
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    for name in ("tensor_parallel_size", "replicas"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if getattr(args, "tensor_parallel_size", 1) > 1 and (getattr(args, "replicas", 1) > 1
                                                         or getattr(args, "ray_address", None)):
        raise ValueError("--tensor-parallel-size with --replicas is not supported yet: use one or the other")


def _check_max_model_len(value: int | None, model) -> None:
    """Refuse a cap above the model's positions: past them its outputs are not the model's."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if value is not None and limit is not None and value > limit:
        raise ValueError(f"--max-model-len {value} exceeds the model's max_position_embeddings {limit}")


def _chat_template(value: str | None) -> str | None:
    if value is None or "{" in value:
        return value
    if not os.path.isfile(value):
        raise ValueError(f"--chat-template {value!r} is neither a template nor an existing file")
    with open(value, encoding="utf-8") as f:
        return f.read()


def build_app(args: argparse.Namespace):
    """Load the model and build the app (separate from :func:`run` so it can be tested)."""
    from hf_turbo.config import SpeculativeConfig, TurboConfig
    from hf_turbo.engine import AsyncEngine
    from hf_turbo.loading import load_model_and_tokenizer
    from hf_turbo.serve.app import create_app

    _check(args)
    template = _chat_template(args.chat_template)
    overrides = {k: v for k, v in (("max_num_batched_tokens", args.max_batch_tokens),
                                   ("max_num_seqs", args.max_num_seqs), ("max_waiting", args.max_waiting),
                                   ("num_blocks", args.num_blocks), ("max_model_len", args.max_model_len),
                                   ("gpu_memory_fraction", args.gpu_memory_utilization),
                                   ("kv_dtype", getattr(args, "kv_cache_dtype", None))) if v is not None}
    config = TurboConfig().replace(**overrides)
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device,
                                          trust_remote_code=args.trust_remote_code,
                                          tp_plan="auto" if getattr(args, "tensor_parallel_size", 1) > 1 else None)
    _check_max_model_len(args.max_model_len, model)
    if args.draft_model is not None:
        # the target's resolved dtype: "auto" could pick another for the draft's checkpoint
        draft, draft_tok = load_model_and_tokenizer(args.draft_model, dtype=model.dtype, device=args.device,
                                                    trust_remote_code=args.trust_remote_code)
        spec = SpeculativeConfig(method="draft", draft_model=draft, draft_tokenizer=draft_tok,
                                 num_tokens=args.num_speculative_tokens)
        config = config.replace(speculative=spec)
    engine = AsyncEngine(model, tok, config)
    name = args.served_model_name or args.model
    return create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                      chat_template=template, body_timeout=args.body_timeout,
                      tool_call_parser=args.tool_call_parser)


def serve_app(app, args: argparse.Namespace) -> int:
    """Serve a built app with uvicorn until it stops, then close its engine (a TP group's followers leave)."""
    import uvicorn

    from hf_turbo.serve.transport import server_config

    if args.host not in _LOOPBACK and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    print(f"hf-turbo serve: {args.served_model_name or args.model} on http://{args.host}:{args.port}/v1",
          flush=True)
    config = server_config(app, host=args.host, port=args.port, header_timeout=args.header_timeout,
                           keep_alive_timeout=args.keep_alive_timeout, timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.hf_turbo.engine.engine.close()
    return 0
