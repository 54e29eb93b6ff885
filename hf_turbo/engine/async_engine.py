"""AsyncEngine: an asyncio front over the continuous-batching :class:`Engine`.

One background thread owns the Engine and is the only code that touches it. The asyncio side sends
commands (add / abort / cancel / stop) through a thread-safe queue and wakes the thread with a
``threading.Event``; the thread sleeps on that event when there is no work (no busy spin), and
otherwise runs ``Engine.step()`` back to back, draining commands between steps. Results go back to
the event loop in one ``loop.call_soon_threadsafe`` per drain or step, into one ``asyncio.Queue``
per request. On CUDA a step's outputs are streamed while the next step's forward runs (``overlap``):
the thread queues step N + 1's forward, detokenizes and posts step N's deltas, then waits for N + 1's
tokens; commands still run only between steps, with every stream brought up to date first.

Streaming text is decoded incrementally (vLLM's ``detokenize_incrementally`` scheme): each new
token decodes only a short window of ids starting at ``prefix_offset``, and text ending in U+FFFD
(half a UTF-8 character) is held back until a later token completes it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from hf_turbo.config import TurboConfig
from hf_turbo.engine.detokenizer import IncrementalDetokenizer
from hf_turbo.engine.engine import Engine, PromptType
from hf_turbo.engine.request import RequestOutput
from hf_turbo.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "StreamOutput", "EngineOverloaded", "IncrementalDetokenizer"]

_TTFT_SAMPLES = 10_000  # most recent time-to-first-token samples kept for stats()


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (``TurboConfig.max_waiting``); an HTTP server answers 429."""


@dataclass
class StreamOutput:
    """One streamed delta of a request: only the tokens and text that are new since the last one.

    The final delta has ``finished=True``, the ``finish_reason`` and ``output``, the full
    :class:`RequestOutput` (all token ids, the final text, timings).
    """

    request_id: str
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    output: RequestOutput | None = None


@dataclass(eq=False)
class _Stream:
    """Engine-thread state of one streaming request (the queue is read by the consumer)."""

    queue: asyncio.Queue
    request_id: str | None = None
    detok: IncrementalDetokenizer | None = None
    num_sent: int = 0
    got_first_token: bool = False


@dataclass
class _Counters:
    submitted: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    tokens: int = 0
    ttft: deque = field(default_factory=lambda: deque(maxlen=_TTFT_SAMPLES))


def _summary(samples: Sequence[float]) -> dict:
    if not samples:
        return {"count": 0}
    s = sorted(samples)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]

    return {"count": len(s), "mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1]}


class AsyncEngine:
    """Asyncio streaming front of :class:`Engine`; same arguments as ``Engine``.

    Use ``async with AsyncEngine(model, tokenizer) as eng:`` (or ``await eng.start()`` /
    ``await eng.shutdown()``) and ``async for delta in eng.generate(prompt, params):``.
    Cancelling the consumer, or closing the generator, aborts the request and frees its blocks.
    """

    def __init__(self, model, tokenizer=None, config: TurboConfig | None = None, **overrides) -> None:
        self.engine = Engine(model, tokenizer, config, **overrides)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders "accepting" checks with the thread's final drain
        self._accepting = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._posts: list[tuple] = []  # engine thread only: deliveries of the current drain/step
        self._pending: list[RequestOutput] = []  # engine thread only: the last step's outputs, not yet streamed
        # stream step N's outputs while the device runs step N + 1 (CUDA; on the CPU the forward is the wait)
        self.overlap = self.engine.device.type == "cuda"
        self._counts = _Counters()
        self._engine_stats = self.engine.stats()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine thread on the running event loop."""
        if self._thread is not None or self._loop is not None:
            raise RuntimeError("AsyncEngine was already started (it cannot be restarted)")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="hf-turbo-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Abort every pending request (their streams end with finish_reason 'abort'), join the thread.

        ``timeout`` bounds the wait for a step in flight; past it the (daemon) thread is left behind.
        """
        if self._thread is None:
            return
        self._submit(("stop",), quiet=True)
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("AsyncEngine thread did not stop within %ss", timeout)
        self._thread = None
        await asyncio.sleep(0)  # let the thread's last deliveries run

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown()

    # -- public API -----------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[StreamOutput]:
        """Submit one request and yield its :class:`StreamOutput` deltas until it finishes.

        Raises ValueError (bad input) or :class:`EngineOverloaded` before the first delta; an error
        in the step that ran this request is raised from the iteration.
        """
        loop = self._check_loop()
        stream = _Stream(asyncio.Queue())
        added = loop.create_future()
        self._submit(("add", prompt, params, request_id, stream, added))
        done = False
        try:
            try:
                await added
            except Exception:
                done = True  # never entered the engine (ValueError, EngineOverloaded)
                raise
            while not done:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:  # cancelled or closed early: free the request's blocks now
                self._submit(("cancel", stream), quiet=True)

    async def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request; its stream ends with finish_reason 'abort'. None if it is not running."""
        fut = self._check_loop().create_future()
        self._submit(("abort", request_id, fut))
        return await fut

    def stats(self) -> dict:
        """Engine stats (as of the last step or command) plus request, token and TTFT counters."""
        c = self._counts
        out = dict(self._engine_stats)
        out.update(requests_submitted=c.submitted, requests_finished=c.finished, requests_aborted=c.aborted,
                   requests_failed=c.failed, tokens_streamed=c.tokens, time_to_first_token=_summary(list(c.ttft)))
        return out

    # -- asyncio side helpers -------------------------------------------------------------------
    def _check_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            raise RuntimeError("AsyncEngine is not started: use `async with AsyncEngine(...)` or `await start()`")
        if loop is not self._loop:
            raise RuntimeError("AsyncEngine is used from another event loop than the one it started on")
        return loop

    def _submit(self, cmd: tuple, quiet: bool = False) -> None:
        with self._lock:
            if not self._accepting:
                if quiet:
                    return
                raise RuntimeError("AsyncEngine is shut down")
            self._cmds.put(cmd)
        self._wake.set()

    @staticmethod
    def _deliver(posts: list[tuple]) -> None:
        for target, value, is_exc in posts:
            if isinstance(target, asyncio.Queue):
                target.put_nowait(value)
            elif not target.done():  # the awaiting task may have been cancelled
                if is_exc:
                    target.set_exception(value)
                else:
                    target.set_result(value)

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        crash: BaseException | None = None
        try:
            while True:
                self._wake.clear()
                running = self._drain()
                self._flush()
                if not running:
                    break
                if self.engine.has_unfinished():
                    self._step()
                    self._flush()
                else:
                    self._emit_pending()
                    self._flush()
                    self._wake.wait()
        except BaseException as exc:  # the thread must not die silently, whatever it was
            logger.exception("AsyncEngine loop crashed")
            crash = exc
        finally:
            self._emit_pending()
            self._close(crash)

    def _post(self, target, value, is_exc: bool = False) -> None:
        self._posts.append((target, value, is_exc))

    def _flush(self) -> None:
        self._engine_stats = self.engine.stats()
        if not self._posts:
            return
        posts, self._posts = self._posts, []
        try:
            self._loop.call_soon_threadsafe(self._deliver, posts)
        except RuntimeError:  # the event loop is closed: nobody is left to deliver to
            logger.warning("AsyncEngine: event loop closed, stopping the engine thread")
            with self._lock:
                self._accepting = False
            self._cmds.put(("stop",))

    def _drain(self) -> bool:
        """Run queued commands; False once a stop command was seen."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "stop":
                return False
            self._emit_pending()  # a command sees every stream up to date
            self._command(cmd)

    def _command(self, cmd: tuple) -> None:
        op = cmd[0]
        if op == "add":
            self._add(*cmd[1:])
        elif op == "cancel":
            stream = cmd[1]
            rid = stream.request_id
            if rid is not None and self._streams.get(rid) is stream:  # not a later request with the same id
                del self._streams[rid]
                if self.engine.abort(rid) is not None:
                    self._counts.aborted += 1
        elif op == "abort":
            _, rid, fut = cmd
            out = self.engine.abort(rid)
            stream = self._streams.get(rid)
            if out is not None:
                if stream is not None:
                    self._emit(stream, out)
                else:
                    self._counts.aborted += 1
            self._post(fut, out)

    def _add(self, prompt, params, request_id, stream: _Stream, fut) -> None:
        try:
            rid = self.engine.add_request(prompt, params, request_id)
        except OverflowError as exc:
            self._post(fut, EngineOverloaded(str(exc)), is_exc=True)
            return
        except Exception as exc:  # ValueError on bad input: raised in the caller, the engine keeps serving
            self._post(fut, exc, is_exc=True)
            return
        stream.request_id = rid
        tok = self.engine.tokenizer
        if tok is not None:
            stop = self.engine.requests[rid].params.stop
            stream.detok = IncrementalDetokenizer(tok, hold_back=max((len(s) for s in stop), default=1) - 1)
        self._streams[rid] = stream
        self._counts.submitted += 1
        self._post(fut, rid)

    def _step(self) -> None:
        """One engine step. With ``overlap`` the previous step's outputs are streamed (detokenized, posted)
        after this step's forward is queued, while the device runs it; otherwise right after it."""
        try:
            launched = self.engine.launch_step()
            self._emit_pending()
            if self.overlap:
                self._flush()
            outputs = self.engine.finish_step(launched)
        except Exception as exc:
            self._emit_pending()
            self._fail(exc)
            return
        self._pending = outputs
        if not self.overlap:
            self._emit_pending()

    def _emit_pending(self) -> None:
        outputs, self._pending = self._pending, []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                self._emit(stream, out)

    def _fail(self, exc: Exception) -> None:
        # Engine.step finished (and forgot) the requests of the failing forward; route the error to them
        failed = [rid for rid in self._streams if rid not in self.engine.requests]
        if not failed:
            # the error came from outside the forward: the engine state is unknown, fail everything
            logger.exception("Engine.step failed outside the forward; aborting all requests")
            for rid in list(self._streams):
                self.engine.abort(rid)
            failed = list(self._streams)
        else:
            logger.warning("Engine.step failed for %d request(s): %r", len(failed), exc)
        for rid in failed:
            self._post(self._streams.pop(rid).queue, exc)
        self._counts.failed += len(failed)

    def _emit(self, stream: _Stream, out: RequestOutput) -> None:
        new = out.token_ids[stream.num_sent:]
        stream.num_sent = len(out.token_ids)
        c = self._counts
        c.tokens += len(new)
        if new and not stream.got_first_token:
            stream.got_first_token = True
            if out.time_to_first_token is not None:
                c.ttft.append(out.time_to_first_token)
        text = ""
        if stream.detok is not None:
            text = stream.detok.finish(out.text, new) if out.finished else stream.detok.push(new)
        if out.finished:
            del self._streams[out.request_id]
            if out.finish_reason == "abort":
                c.aborted += 1
            else:
                c.finished += 1
        self._post(stream.queue, StreamOutput(out.request_id, new, text, out.finished, out.finish_reason,
                                              out if out.finished else None))

    def _close(self, crash: BaseException | None) -> None:
        """Last act of the thread: refuse new commands, settle the queued ones, end every stream."""
        with self._lock:
            self._accepting = False
        t0 = time.perf_counter()
        error = None if crash is None else RuntimeError(f"AsyncEngine loop stopped: {crash!r}")
        try:
            while True:
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    self._post(cmd[-1], RuntimeError("AsyncEngine is shut down"), is_exc=True)
                elif cmd[0] != "stop":
                    self._command(cmd)
            for rid, stream in list(self._streams.items()):
                out = self.engine.abort(rid)
                if error is None and out is not None:
                    self._emit(stream, out)
                else:
                    del self._streams[rid]
                    self._post(stream.queue, error or RuntimeError("AsyncEngine is shut down"))
            self._flush()
        except Exception:
            logger.exception("AsyncEngine: error while shutting down")
        logger.debug("AsyncEngine thread stopped (cleanup %.3fs)", time.perf_counter() - t0)
