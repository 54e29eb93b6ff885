"""OpenAI response objects for ``hf-turbo serve``: whole responses and stream chunks."""

from __future__ import annotations

import math
import time

__all__ = ["ResponseFormatter"]

_LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity


def _json_logprob(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


class ResponseFormatter:
    """OpenAI response objects for one request: the whole response, or its stream chunks.

    Token strings in logprobs are single-token decodes; logprobs of ``-inf`` become -9999.0 (JSON
    has no infinities). While streaming, logprobs of all tokens come with the final chunk.
    """

    def __init__(self, tokenizer, model_name: str, req, chat: bool, rid: str, prompt_tokens: int) -> None:
        self.tok, self.model_name, self.req, self.chat = tokenizer, model_name, req, chat
        self.rid, self.prompt_tokens = rid, prompt_tokens
        self.created = int(time.time())
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.prompt_chars = len(req.prompt) if not chat and isinstance(req.prompt, str) else 0

    def _usage(self, out) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model_name}

    def _token(self, tid: int) -> str:
        return self.tok.decode([tid])

    def _logprobs(self, out):
        if not self.want_logprobs or out.logprobs is None:
            return None
        ids, entries = out.token_ids, out.logprobs
        if self.chat:
            n = self.req.top_logprobs or 0
            content = []
            for tid, entry in zip(ids, entries):
                s = self._token(tid)
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
                content.append({"token": s, "logprob": _json_logprob(entry[tid]), "bytes": list(s.encode()),
                                "top_logprobs": [{"token": (t := self._token(k)), "logprob": _json_logprob(v),
                                                  "bytes": list(t.encode())} for k, v in top]})
            return {"content": content}
        tokens = [self._token(t) for t in ids]
        offsets, pos = [], self.prompt_chars
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = [{self._token(k): _json_logprob(v) for k, v in sorted(e.items(), key=lambda kv: -kv[1])} for e in entries]
        return {"tokens": tokens, "token_logprobs": [_json_logprob(e[t]) for t, e in zip(ids, entries)],
                "top_logprobs": top, "text_offset": offsets}

    # -- whole response -------------------------------------------------------------------------
    def response(self, final) -> dict:
        out = final.output
        choice = {"index": 0, "logprobs": self._logprobs(out), "finish_reason": final.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text or ""}
        else:
            choice["text"] = out.text or ""
        return {**self._head(False), "choices": [choice], "usage": self._usage(out)}

    # -- stream ---------------------------------------------------------------------------------
    def _chunk(self, delta: dict | str | None, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": 0}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else ({} if delta is None else {"content": delta})
        else:
            choice["text"] = delta or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        event = {**self._head(True), "choices": [choice]}
        if self.include_usage:
            event["usage"] = None
        return event

    def start_events(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})] if self.chat else []

    def delta_events(self, delta) -> list[dict]:
        if not delta.text:
            return []
        return [self._chunk(delta.text)]

    def end_events(self, final) -> list[dict]:
        events = [self._chunk(None, final.finish_reason, self._logprobs(final.output))]
        usage = self._usage(final.output)
        if self.include_usage:
            events.append({**self._head(True), "choices": [], "usage": usage})
        return events
