"""The OpenAI-compatible HTTP server: ``create_app(engine, model_name, ...)`` builds a FastAPI app.

Routes: ``GET /health`` (never needs the key), ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON, or SSE with ``stream: true``), ``GET /metrics`` (Prometheus).

The request body is read and checked by hand (content type, size, UTF-8, JSON object) so that every
bad request gets a 4xx in OpenAI's error shape and nothing reaches the engine unvalidated. A
request is submitted to the :class:`~hf_turbo.engine.AsyncEngine` and its first delta awaited
before the response starts, so that engine-side rejections (a full queue: 429) are still HTTP
errors. A client that goes away aborts its request: streaming responses close the engine stream
when Starlette stops them; non-streaming ones race the generation against ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hf_turbo.engine import AsyncEngine, EngineOverloaded
from hf_turbo.sampling import SamplingParams
from hf_turbo.serve.metrics import Metrics
from hf_turbo.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormatter,
    decode_json_body,
    error_body,
    parse_request,
)

logger = logging.getLogger(__name__)

__all__ = ["create_app"]

_DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# SamplingParams field -> the HTTP parameter a user sets it with
_PARAM_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "logprobs": "logprobs",
                "repetition_penalty": "repetition_penalty"}


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               chat_template: str | None = None) -> FastAPI:
    """An app serving ``engine`` as ``model_name``; the app starts and stops the engine (lifespan).

    ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    ``max_body_bytes``: larger request bodies get 413. ``chat_template``: a Jinja template used
    instead of the tokenizer's. The queue bound (429) is the engine's ``TurboConfig.max_waiting``.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if engine.engine.tokenizer is None:
        raise ValueError("engine has no tokenizer: build the AsyncEngine with one to serve text")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown(timeout=30)

    app = FastAPI(title="hf_turbo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    server = _Server(engine, model_name, metrics, max_body_bytes, chat_template)
    app.state.hf_turbo = server

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

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

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, chat=True)

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    return app


def _error(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class _Guard:
    """Outermost ASGI layer: bearer-key check and request counting by route and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        if self.key is not None and path != "/health":
            problem = self._auth_problem(scope)
            if problem is not None:
                await _error(APIError(401, problem, None, code="invalid_api_key"))(scope, receive, counting_send)
                return
        await self.app(scope, receive, counting_send)

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


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _Server:
    """The state and handlers behind the generation routes."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: Metrics, max_body_bytes: int,
                 chat_template: str | None) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.chat_template = chat_template
        self.created = int(time.time())
        sync = engine.engine
        kv_tokens = sync.pool.num_blocks * sync.pool.block_size
        self.max_model_len = sync.max_model_len
        self.context_limit = min(self.max_model_len or kv_tokens, kv_tokens)
        self.vocab_size = sync.vocab_size

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "hf_turbo",
                "max_model_len": self.context_limit}

    # -- request parsing ------------------------------------------------------------------------
    async def _read_json(self, request: Request) -> dict:
        ctype = request.headers.get("content-type")
        mime = (ctype or "").split(";")[0].strip().lower()
        if mime != "application/json":
            raise APIError(415, f"Unsupported content type {ctype!r}: send 'Content-Type: application/json'.")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise APIError(413, f"The request body has {int(length)} bytes; the limit is {self.max_body_bytes}.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"The request body is over the limit of {self.max_body_bytes} bytes.")
        return decode_json_body(bytes(body))

    def _prompt_ids(self, req, chat: bool) -> list[int]:
        tok = self.tokenizer
        if chat:
            template = self.chat_template or getattr(tok, "chat_template", None)
            if not template:
                raise APIError(400, "Invalid 'messages': this model's tokenizer has no chat template; "
                               "use /v1/completions or start the server with --chat-template.", "messages")
            msgs = [{"role": m.role, "content": m.content or ""} for m in req.messages]
            try:
                text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
            except Exception as exc:  # jinja raise_exception(...) in templates: bad conversation shape
                raise APIError(400, f"Invalid 'messages': the chat template rejected them: {exc}",
                               "messages") from None
            return tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(req.prompt, str):
            return tok(req.prompt, add_special_tokens=True)["input_ids"]
        bad = next((t for t in req.prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Invalid 'prompt': token id {bad} is outside the vocabulary [0, {self.vocab_size}).",
                           "prompt")
        return list(req.prompt)

    def _params(self, req, chat: bool, prompt_len: int) -> SamplingParams:
        prompt_param = "messages" if chat else "prompt"
        room = self.context_limit - prompt_len
        if room < 1:
            raise APIError(400, f"Invalid '{prompt_param}': it has {prompt_len} tokens but this model's maximum "
                           f"context length is {self.context_limit} tokens.", prompt_param)
        if chat:
            max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            max_new = req.max_new_tokens
            default = room
        else:
            max_param, max_new, default = "max_tokens", req.max_tokens, min(_DEFAULT_COMPLETION_TOKENS, room)
        if max_new is None:
            max_new = default
        elif prompt_len + max_new > self.context_limit:
            raise APIError(400, f"Invalid '{max_param}': the prompt ({prompt_len} tokens) plus {max_param} "
                           f"({max_new}) is over this model's maximum context length of {self.context_limit} "
                           "tokens.", max_param)
        if req.min_tokens and req.min_tokens > max_new:
            raise APIError(400, f"Invalid 'min_tokens': {req.min_tokens} is more than {max_param} ({max_new}).",
                           "min_tokens")
        if chat:
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        try:
            return SamplingParams(
                max_new_tokens=max_new, min_new_tokens=req.min_tokens or 0,
                temperature=1.0 if req.temperature is None else float(req.temperature),
                top_p=1.0 if req.top_p is None else float(req.top_p),
                top_k=0 if req.top_k in (None, -1) else req.top_k, seed=req.seed, stop=req.stop or (),
                logprobs=logprobs, ignore_eos=bool(req.ignore_eos),
                repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty))
        except ValueError as exc:
            field = str(exc).split()[0].removeprefix("SamplingParams.")
            param = _PARAM_NAMES.get(field)
            raise APIError(400, f"Invalid value for '{param}': {exc}", param) from None

    # -- generation -----------------------------------------------------------------------------
    async def handle(self, request: Request, chat: bool):
        t0 = time.perf_counter()
        try:
            body = await self._read_json(request)
            req = parse_request(ChatCompletionRequest if chat else CompletionRequest, body)
            if req.model != self.model_name:
                raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                               f"'{self.model_name}'.", "model", code="model_not_found")
            prompt_ids = self._prompt_ids(req, chat)
            params = self._params(req, chat, len(prompt_ids))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            return await self._generate(request, req, chat, rid, prompt_ids, params, t0)
        except APIError as exc:
            return _error(exc)
        except ClientDisconnect:
            self.metrics.count_disconnect()
            return Response(status_code=499)
        except Exception:
            logger.exception("hf_turbo serve: request failed")
            return _error(APIError(500, "The server had an error while processing your request.",
                                   type="server_error"))

    async def _generate(self, request: Request, req, chat: bool, rid: str, prompt_ids: list[int],
                        params: SamplingParams, t0: float):
        stream = self.engine.generate(prompt_ids, params, request_id=rid)
        watch = _DisconnectWatch(request)
        handed_off = False
        try:
            try:
                first = await watch.run(stream.__anext__())
            except ValueError as exc:
                msg = str(exc)
                param = "max_tokens" if "max_new_tokens" in msg else ("messages" if chat else "prompt")
                raise APIError(400, f"Invalid '{param}': {msg}", param) from None
            except EngineOverloaded as exc:
                raise APIError(429, f"The server is overloaded ({exc}); retry later.", type="rate_limit_error",
                               code="server_overloaded") from None
            if first.token_ids:
                self.metrics.observe_ttft(time.perf_counter() - t0)
            fmt = ResponseFormatter(self.tokenizer, self.model_name, req, chat, rid, len(prompt_ids))
            if req.stream:
                await watch.stop()  # from here Starlette's StreamingResponse watches for the disconnect
                handed_off = True
                return _SSEResponse(self._sse(stream, first, fmt), stream, media_type="text/event-stream",
                                    headers=_SSE_HEADERS)
            final = first
            if not first.finished:
                final = await watch.run(self._drain(stream))
            self.metrics.count_tokens(len(prompt_ids), len(final.output.token_ids))
            return JSONResponse(fmt.response(final))
        except _ClientGone:
            self.metrics.count_disconnect()
            return Response(status_code=499)
        finally:
            await watch.stop()
            if not handed_off:
                await stream.aclose()

    @staticmethod
    async def _drain(stream):
        async for delta in stream:
            if delta.finished:
                return delta
        raise RuntimeError("the engine stream ended without a final output")

    async def _sse(self, stream, first, fmt: ResponseFormatter):
        completed = False
        try:
            delta = first
            for event in fmt.start_events():
                yield f"data: {_dumps(event)}\n\n"
            while True:
                for event in fmt.delta_events(delta):
                    yield f"data: {_dumps(event)}\n\n"
                if delta.finished:
                    break
                delta = await stream.__anext__()
            self.metrics.count_tokens(fmt.prompt_tokens, len(delta.output.token_ids))
            for event in fmt.end_events(delta):
                yield f"data: {_dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the engine failed mid-stream: the status is sent, so report in-band
            logger.exception("hf_turbo serve: stream %s failed", fmt.rid)
            yield f"data: {_dumps(error_body(f'generation failed: {exc}', type='server_error'))}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:
                self.metrics.count_disconnect()
            await stream.aclose()
