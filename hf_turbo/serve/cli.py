"""``hf-turbo serve``: an OpenAI-compatible HTTP server over one model (uvicorn + FastAPI).

Weights load from safetensors only; repository code runs only with ``--trust-remote-code``. The
default bind address is loopback; serving on another address without ``--api-key`` logs a warning.
"""

from __future__ import annotations

import argparse
import logging
import os

from hf_turbo.serve.tools import PARSERS

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "build_app", "serve_app"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="fixture",
                        help="local model dir, hub id, or 'fixture' (the built-in trained fixture; default)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients send as 'model' (default: the --model value)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", default=os.environ.get("HF_TURBO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $HF_TURBO_API_KEY)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="token budget of one engine step (TurboConfig.max_num_batched_tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="cap on the running batch")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="waiting-queue bound; requests beyond it get HTTP 429")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized by memory)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 above)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client may take to send a request's headers (default 10)")
    parser.add_argument("--keep-alive-timeout", type=float, default=5.0,
                        help="seconds an idle keep-alive connection stays open (default 5)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request's body; 408 after (default 30)")
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template (a file path or the template text) for tokenizers without one")
    parser.add_argument("--tool-call-parser", default="auto", choices=["auto", *sorted(PARSERS)],
                        help="how tool_choice auto reads tool calls (default: from the chat template)")
    parser.add_argument("--draft-model", default=None,
                        help="draft model (path, hub id or 'fixture:draft') for speculative decoding")
    parser.add_argument("--num-speculative-tokens", type=int, default=4,
                        help="tokens the draft proposes per step (with --draft-model)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repository's own Python code to run")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | bfloat16 | float16 (auto, the default: the checkpoint's dtype on "
                             "CUDA, bfloat16 for a float32 checkpoint; float32 on the CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="fraction of the GPU's memory for weights, a step's activations and the KV cache; "
                             "the KV pool gets what is left after a profiling forward (default 0.85)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap on prompt + generated tokens per request (default: the model's maximum)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over N ranks (one GPU each; gloo processes on the CPU), started by "
                             "this command; the model's config needs a tp_plan (docs/scaling.md)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="N engine replicas behind Ray Serve (needs the 'ray' extra; docs/scaling.md)")
    parser.add_argument("--ray-address", default=None,
                        help="an existing Ray cluster for --replicas (default: a local Ray instance started here)")


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
                                   ("gpu_memory_fraction", args.gpu_memory_utilization)) if v is not None}
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


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.tensor_parallel_size > 1:
        from hf_turbo.serve.launch import run_tensor_parallel

        return run_tensor_parallel(args)
    if args.replicas > 1 or args.ray_address:
        from hf_turbo.serve.replicas import run_replicas

        return run_replicas(args)
    return serve_app(build_app(args), args)


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
