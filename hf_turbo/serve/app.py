"""The OpenAI-compatible HTTP server: ``create_app(engine, model_name, ...)`` builds a FastAPI app.

Routes: ``GET /health`` (never needs the key), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON, or SSE with ``stream: true``), ``GET /metrics`` (Prometheus),
``GET /openapi.json`` (the routes and their request models).

The request body is read by hand (content type, size, a deadline) on the event loop; everything
after that (JSON, validation, chat template, tokenization: :mod:`hf_turbo.serve.prepare`) and the
formatting of whole responses run in a thread pool, so a large prompt never stalls ``/health`` or
other streams. Every bad request gets a 4xx in OpenAI's error shape and nothing reaches the engine
unvalidated. A request is submitted to the :class:`~hf_turbo.engine.AsyncEngine` and its first delta
awaited before the response starts, so that engine-side rejections (a full queue: 429 with
``Retry-After``) are still HTTP errors. A client that goes away aborts its request: streaming
responses close the engine stream when Starlette stops them; non-streaming ones race the generation
against ``http.disconnect``. An unexpected error becomes a JSON 500 that is counted in ``/metrics``
and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hf_turbo.engine import AsyncEngine, EngineOverloaded
from hf_turbo.serve.choices import Choices
from hf_turbo.serve.metrics import Metrics
from hf_turbo.serve.openapi import install_openapi
from hf_turbo.serve.prepare import Prepared, RequestPreparer, param_of
from hf_turbo.serve.protocol import APIError, ResponseFormatter, error_body, json_bytes
from hf_turbo.serve.tools import parser_for_template

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_LARGE_BODY = 64 * 1024  # bytes: a body this large may take 100s of ms of CPU to tokenize
_RETRY_AFTER_S = 1  # what a 429 asks the client to wait: the queue drains at the engine's step rate


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               chat_template: str | None = None, body_timeout: float = 30.0, tool_call_parser: str = "auto") -> FastAPI:
    """An app serving ``engine`` as ``model_name``; the app starts and stops the engine (lifespan).

    ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    ``max_body_bytes``: larger request bodies get 413. ``chat_template``: a Jinja template used
    instead of the tokenizer's. ``body_timeout``: seconds a client may take to send its body (408
    after). The queue bound (429) is the engine's ``TurboConfig.max_waiting``. ``tool_call_parser``:
    how ``tool_choice`` auto reads tool calls ("auto": from the chat template, or a name in
    ``hf_turbo.serve.tools.PARSERS``).
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if not isinstance(body_timeout, (int, float)) or not body_timeout > 0:
        raise ValueError(f"body_timeout must be a positive number of seconds, got {body_timeout!r}")
    if engine.engine.tokenizer is None:
        raise ValueError("engine has no tokenizer: build the AsyncEngine with one to serve text")

    template = chat_template or getattr(engine.engine.tokenizer, "chat_template", None)
    parser = parser_for_template(template if isinstance(template, str) else None, tool_call_parser)
    metrics = Metrics()
    server = _Server(engine, model_name, metrics, max_body_bytes, chat_template, float(body_timeout), parser)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown(timeout=30)
            server.shutdown()

    app = FastAPI(title="hf_turbo", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.hf_turbo = server

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return _error(APIError(404, f"The model '{model_id}' does not exist.", "model", code="model_not_found"))
        return server.model_card()

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats(), model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", openapi_extra=_body_schema("CompletionRequest"))
    async def completions(request: Request):
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema("ChatCompletionRequest"))
    async def chat_completions(request: Request):
        return await server.handle(request, chat=True)

    install_openapi(app, model_name)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    return app


def _body_schema(model: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _error(exc: APIError) -> Response:
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(json_bytes(exc.body()), status_code=exc.status, headers=headers, media_type="application/json")


class _Guard:
    """Outermost of our ASGI layers: bearer-key check, request counting by route and status, and the
    last catch: an error that escapes a route becomes a counted JSON 500 instead of Starlette's
    plain-text one, which leaves the keep-alive connection in a broken state."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_request(path, message["status"])
            await send(message)

        if self.key is not None and path != "/health":
            problem = self._auth_problem(scope)
            if problem is not None:
                await _error(APIError(401, problem, None, code="invalid_api_key"))(scope, receive, counting_send)
                return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            logger.exception("hf_turbo serve: unhandled error on %s", path)
            if started:  # the body is cut short: only closing the connection tells the client
                raise
            await _error(APIError(500, "The server had an error while processing your request.",
                                  type="server_error"))(scope, receive, counting_send)

    def _auth_problem(self, scope) -> str | None:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        if header is None:
            return "You didn't provide an API key: send it as 'Authorization: Bearer <key>'."
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return "Incorrect API key provided."
        return None


class _ClientGone(Exception):
    """The client disconnected before the response started."""


class _DisconnectWatch:
    """Races an awaitable against the client's ``http.disconnect`` (for work before the response)."""

    def __init__(self, request: Request) -> None:
        self.task = asyncio.ensure_future(self._wait(request))

    @staticmethod
    async def _wait(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def run(self, awaitable):
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({work, self.task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        if work.done():
            return work.result()
        work.cancel()
        with suppress(asyncio.CancelledError):
            await work
        raise _ClientGone

    async def stop(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body and the engine stream behind it, so a request
    whose client went away is aborted at once (not whenever the generators are garbage collected)."""

    def __init__(self, content, engine_stream, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.engine_stream = engine_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.engine_stream.aclose()


def _event(obj) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


def _end_events(fmt: ResponseFormatter, index: int, final) -> bytes:
    return b"".join(_event(e) for e in fmt.end_events(index, final))


class _Server:
    """The state and handlers behind the generation routes."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics, max_body_bytes: int,
                 chat_template: str | None, body_timeout: float, tool_parser) -> None:
        self.engine = engine
        self.tool_parser = tool_parser
        self.tokenizer = engine.engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.created = int(time.time())
        sync = engine.engine
        kv_tokens = sync.pool.num_blocks * sync.pool.block_size
        self.context_limit = min(sync.max_model_len or kv_tokens, kv_tokens)
        self.preparer = RequestPreparer(self.tokenizer, model_name, self.context_limit, sync.vocab_size,
                                        chat_template, sync.grammar)
        # tokenization, templates and response formatting: off the event loop, a few at a time; large
        # bodies one at a time in a lane of their own, so that they neither queue the small ones nor take
        # every core from the engine thread (whose steps stall when its threads are starved)
        self.pool = ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 1)),
                                       thread_name_prefix="hf-turbo-serve")
        self.large_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-turbo-serve-large")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "hf_turbo",
                "max_model_len": self.context_limit}

    async def _in_pool(self, fn, *args, large: bool = False):
        return await asyncio.get_running_loop().run_in_executor(self.large_pool if large else self.pool, fn, *args)

    def shutdown(self) -> None:
        for pool in (self.pool, self.large_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type")
        mime = (ctype or "").split(";")[0].strip().lower()
        if mime != "application/json":
            raise APIError(415, f"Unsupported content type {ctype!r}: send 'Content-Type: application/json'.")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"The request body has {int(length)} bytes; the limit is {self.max_body_bytes}.")
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > self.max_body_bytes:
                    raise APIError(413, f"The request body is over the limit of {self.max_body_bytes} bytes.")

        try:
            await asyncio.wait_for(read(), self.body_timeout)  # a slow client must not hold the handler
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.body_timeout:g} s.",
                           headers={"Connection": "close"}) from None
        return bytes(body)

    # -- generation -----------------------------------------------------------------------------
    async def handle(self, request: Request, chat: bool):
        t0 = time.perf_counter()
        try:
            raw = await self._read_body(request)
            prepared = await self._in_pool(self.preparer.prepare, raw, chat, large=len(raw) > _LARGE_BODY)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            return await self._generate(request, prepared, chat, rid, t0)
        except APIError as exc:
            return _error(exc)
        except ClientDisconnect:
            self.metrics.count_disconnect()
            return Response(status_code=499)
        except Exception:
            logger.exception("hf_turbo serve: request failed")
            return _error(APIError(500, "The server had an error while processing your request.",
                                   type="server_error"))

    async def _generate(self, request: Request, prepared: Prepared, chat: bool, rid: str, t0: float):
        req, prompt_ids = prepared.req, prepared.prompt_ids
        stream = Choices(self.engine, prompt_ids, prepared.params, rid)
        watch = _DisconnectWatch(request)
        handed_off = False
        try:
            try:
                firsts = await watch.run(stream.start())
            except ValueError as exc:
                # the engine's own length checks name max_new_tokens; the rest is about the prompt
                default = "max_tokens" if "max_new_tokens" in str(exc) else ("messages" if chat else "prompt")
                param = param_of(exc, default)
                raise APIError(400, f"Invalid '{param}': {exc}", param) from None
            except EngineOverloaded as exc:
                raise APIError(429, f"The server is overloaded ({exc}); retry later.", type="rate_limit_error",
                               code="server_overloaded", headers={"Retry-After": str(_RETRY_AFTER_S)}) from None
            if firsts[0].token_ids:
                self.metrics.observe_ttft(time.perf_counter() - t0)
            fmt = ResponseFormatter(self.tokenizer, self.model_name, req, chat, rid, len(prompt_ids), self.tool_parser)
            if req.stream:
                await watch.stop()  # from here Starlette's StreamingResponse watches for the disconnect
                handed_off = True
                return _SSEResponse(self._sse(stream, fmt), stream, media_type="text/event-stream",
                                    headers=_SSE_HEADERS)
            finals = await watch.run(stream.finals())
            self.metrics.count_tokens(len(prompt_ids), sum(len(f.output.token_ids) for f in finals))
            # logprobs decode one token at a time and the JSON can be large: both off the loop
            body = await self._in_pool(lambda: json_bytes(fmt.response(finals)))
            return Response(body, media_type="application/json")
        except _ClientGone:
            self.metrics.count_disconnect()
            return Response(status_code=499)
        finally:
            await watch.stop()
            if not handed_off:
                await stream.aclose()

    async def _sse(self, stream: Choices, fmt: ResponseFormatter):
        completed = False
        try:
            for event in fmt.start_events():
                yield _event(event)
            finals = [None] * len(stream.streams)
            async for i, delta in stream.merged():
                for event in fmt.delta_events(i, delta):
                    yield _event(event)
                if delta.finished:
                    finals[i] = delta
                    yield await self._in_pool(_end_events, fmt, i, delta)
            self.metrics.count_tokens(fmt.prompt_tokens, sum(len(f.output.token_ids) for f in finals))
            yield b"".join(_event(e) for e in fmt.usage_events(finals))
            yield b"data: [DONE]\n\n"
            completed = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the engine failed mid-stream: the status is sent, so report in-band
            logger.exception("hf_turbo serve: stream %s failed", fmt.rid)
            yield _event(error_body(f"generation failed: {exc}", type="server_error"))
            yield b"data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:
                self.metrics.count_disconnect()
            await stream.aclose()
