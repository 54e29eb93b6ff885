"""``hf-turbo serve --replicas N``: N engine replicas behind Ray Serve, with the one-engine server's routes.

Each replica is a Ray Serve deployment replica that builds the same FastAPI app as ``hf-turbo serve``
(:func:`hf_turbo.serve.build.build_app`: model, engine, OpenAI routes, API key, body limits, ``/metrics``)
and is mounted through Ray Serve's FastAPI ingress; Ray's HTTP proxy listens on ``--host``/``--port`` and
routes each request to a replica. Ray restarts a replica that dies (its health check is the engine
thread's); requests in flight on it get a 5xx from the proxy, to which :class:`RetryHint` adds
``Retry-After``.

``/metrics`` is per replica: each scrape is answered by one replica, whose id is in the
``X-HF-Turbo-Replica`` header (on every response) and in ``hf_turbo_replica_info``. Ray's own metrics
endpoint aggregates the request counts of all replicas.

Ray is an optional extra (``pip install hf_turbo[ray]``). A local Ray instance is started on demand, or
``--ray-address`` joins an existing cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading

logger = logging.getLogger(__name__)

__all__ = ["build_deployment", "start_replicas", "run_replicas", "RetryHint", "REPLICA_HEADER", "APP_NAME"]

REPLICA_HEADER = "x-hf-turbo-replica"
APP_NAME = "hf_turbo"
RETRY_AFTER_S = 2  # about what Ray takes to route to a healthy replica again
# the proxy's middleware, found by Ray through this variable (read where its proxy actor starts)
_PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ImportError("--replicas needs Ray Serve: pip install 'hf_turbo[ray]'") from None
    return ray, serve


class RetryHint:
    """ASGI middleware: a 5xx or 503 without ``Retry-After`` gets one (a replica that died mid-request, a
    deployment that is restarting), so clients know to retry; our own 429s already carry it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def hinting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if message["status"] >= 500 and not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", str(RETRY_AFTER_S).encode())]}
            await send(message)

        try:
            await self.app(scope, receive, hinting_send)
        except Exception as exc:
            if started:
                raise
            logger.warning("hf_turbo replicas: request failed in the proxy: %r", exc)
        if not started:  # the replica died under the request: Ray's proxy logs it and sends nothing
            body = (b'{"error":{"message":"The replica serving this request stopped; retry.","type":"server_error",'
                    b'"param":null,"code":"replica_unavailable"}}')
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"retry-after", str(RETRY_AFTER_S).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """What Ray's HTTP proxy runs around every request (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(RetryHint)]


class _ReplicaTag:
    """ASGI middleware inside a replica: its id on every response, and in ``/metrics``."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self.replica_id = replica_id.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = scope.get("path") == "/metrics"

        async def tagging_send(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not (metrics and k.lower() == b"content-length")]  # the body grows by a line
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), self.replica_id)]}
            elif metrics and message["type"] == "http.response.body" and not message.get("more_body"):
                line = b'hf_turbo_replica_info{replica="' + self.replica_id + b'"} 1\n'
                message = {**message, "body": message.get("body", b"") + line}
            await send(message)

        await self.app(scope, receive, tagging_send)


def build_deployment(args: argparse.Namespace, num_replicas: int):
    """The Ray Serve application: ``num_replicas`` replicas of the server that ``args`` describe."""
    _, serve = _import_ray()
    cuda = (args.device or "").startswith("cuda")
    # on the CPU, each replica gets its share of the cores (its torch threads), as Ray accounts for them
    threads = max(1, (os.cpu_count() or 1) // num_replicas)
    options = {"num_gpus": 1} if cuda else {"num_cpus": 0}

    @serve.deployment(name="hf_turbo", num_replicas=num_replicas, ray_actor_options=options,
                      health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
                      max_ongoing_requests=1024)
    @serve.ingress()
    class HFTurboReplica:
        def __init__(self, server_args: argparse.Namespace) -> None:
            self.args = server_args
            self.engine = None

        def __serve_build_asgi_app__(self):
            import torch

            from hf_turbo.serve.build import build_app

            if not cuda:
                torch.set_num_threads(threads)
            app = build_app(self.args)
            self.engine = app.state.hf_turbo.engine
            context = serve.get_replica_context()
            replica_id = getattr(getattr(context, "replica_id", None), "unique_id", None) or str(os.getpid())
            app.add_middleware(_ReplicaTag, replica_id=replica_id)
            return app

        def check_health(self) -> None:
            thread = getattr(self.engine, "_thread", None)
            if self.engine is not None and thread is not None and not thread.is_alive():
                raise RuntimeError("the engine thread stopped")

    return HFTurboReplica.bind(args)


def start_replicas(args: argparse.Namespace) -> str:
    """Start (or join) Ray, deploy ``args.replicas`` replicas and return the server's base URL; returns once
    every replica has loaded its model."""
    ray, serve = _import_ray()
    if not ray.is_initialized():
        os.environ.setdefault(_PROXY_CALLBACK, "hf_turbo.serve.replicas.proxy_middlewares")
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_deployment(args, args.replicas), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def run_replicas(args: argparse.Namespace) -> int:
    """``hf-turbo serve --replicas N``: serve until Ctrl-C, then tear the deployment down."""
    ray, serve = _import_ray()
    if args.port == 0:
        raise ValueError("--port 0 is not supported with --replicas: Ray's proxy needs a fixed port")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    url = start_replicas(args)
    print(f"hf-turbo serve: {args.served_model_name or args.model} x {args.replicas} replicas (Ray Serve) on "
          f"{url}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if args.ray_address is None:
            serve.shutdown()
            ray.shutdown()
    return 0
