"""``hf-turbo serve``: an OpenAI-compatible HTTP server over one model (uvicorn + FastAPI).

Weights load from safetensors only; repository code runs only with ``--trust-remote-code``. The
default bind address is loopback; serving on another address without ``--api-key`` logs a warning.
"""

from __future__ import annotations

import argparse
import logging
import os

from hf_turbo.config import KV_DTYPES
from hf_turbo.serve.build import _check, build_app, serve_app
from hf_turbo.serve.tools import PARSERS

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "build_app", "serve_app"]

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
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_DTYPES),
                        help="KV cache storage: auto (the model's dtype, default) or 8 bits with a scale per token "
                             "and head (int8, fp8_e4m3, fp8_e5m2): about 2x the blocks of bf16 in the same memory; "
                             "outputs then differ from the unquantized model's (hf-turbo eval reports by how much)")
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


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.tensor_parallel_size > 1:
        from hf_turbo.serve.launch import run_tensor_parallel

        return run_tensor_parallel(args)
    if args.replicas > 1 or args.ray_address:
        from hf_turbo.serve.replicas import run_replicas

        return run_replicas(args)
    return serve_app(build_app(args), args)
