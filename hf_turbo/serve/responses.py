"""OpenAI response objects for ``hf-turbo serve``: whole responses and stream chunks."""

from __future__ import annotations

import math
import time

from hf_turbo.serve.tools import ToolParser, forced_calls, tool_names

__all__ = ["ResponseFormatter"]

_LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity


def _json_logprob(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


class ResponseFormatter:
    """OpenAI response objects for one request: the whole response, or its stream chunks.

    Token strings in logprobs are single-token decodes; logprobs of ``-inf`` become -9999.0 (JSON
    has no infinities). While streaming, logprobs of all tokens come with the final chunk. With ``n > 1``
    every choice has its ``index``; usage counts the completion tokens of all. Chat choices carry OpenAI
    ``tool_calls`` when a forcing ``tool_choice`` generated them or the ``tool_parser`` finds them; while
    streaming, text that may be a call is held back and the calls come as one ``delta.tool_calls``.
    """

    def __init__(self, tokenizer, model_name: str, req, chat: bool, rid: str, prompt_tokens: int,
                 tool_parser: ToolParser | None = None) -> None:
        self.tok, self.model_name, self.req, self.chat = tokenizer, model_name, req, chat
        self.rid, self.prompt_tokens = rid, prompt_tokens
        self.tool_parser = tool_parser
        self.n = req.n or 1
        self.texts = [""] * self.n  # streamed text per choice
        self.sent = [0] * self.n  # characters of it sent as content
        self.created = int(time.time())
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.prompt_chars = len(req.prompt) if not chat and isinstance(req.prompt, str) else 0

    def _usage(self, finals: list) -> dict:
        n = sum(len(f.output.token_ids) for f in finals)
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

    # -- tool calls ---------------------------------------------------------------------------
    def _message(self, out, finish_reason) -> tuple[dict, str | None]:
        """A chat choice's ``message`` and finish reason, tool calls read out of the text where asked."""
        text = out.text or ""
        calls, content = [], text
        req = self.req
        if req.forced_tool_choice is not None and finish_reason == "stop":
            calls, content = forced_calls(text, req.forced_tool_choice), None
        elif self.tool_parser is not None and req.parses_tool_calls:
            content, calls = self.tool_parser.parse(text, tool_names(req.tools))
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
            finish_reason = "stop" if isinstance(req.forced_tool_choice, dict) else "tool_calls"
        return msg, finish_reason

    # -- whole response -------------------------------------------------------------------------
    def response(self, finals: list) -> dict:
        choices = []
        for i, final in enumerate(finals):
            out = final.output
            choice = {"index": i, "logprobs": self._logprobs(out), "finish_reason": final.finish_reason}
            if self.chat:
                choice["message"], choice["finish_reason"] = self._message(out, final.finish_reason)
                if choice["message"]["content"] is None and "tool_calls" not in choice["message"]:
                    choice["message"]["content"] = ""
            else:
                choice["text"] = out.text or ""
            choices.append(choice)
        return {**self._head(False), "choices": choices, "usage": self._usage(finals)}

    # -- stream ---------------------------------------------------------------------------------
    def _chunk(self, index: int, delta: dict | str | None, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": index}
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
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)] if self.chat else []

    def delta_events(self, index: int, delta) -> list[dict]:
        """The content a delta adds; text that may be a tool call is held back until the end."""
        self.texts[index] += delta.text
        if not self.chat or not (self.req.forced_tool_choice is not None or self.req.parses_tool_calls):
            return [self._chunk(index, delta.text)] if delta.text else []
        if self.req.forced_tool_choice is not None or self.tool_parser is None:
            return []
        safe = self.tool_parser.safe_prefix(self.texts[index])
        new = self.texts[index][self.sent[index]:safe]
        self.sent[index] = max(self.sent[index], safe)
        return [self._chunk(index, new)] if new else []

    def end_events(self, index: int, final) -> list[dict]:
        """A choice's last chunks: held-back content or its tool calls, then its finish reason."""
        events, reason = [], final.finish_reason
        if self.chat and (self.req.forced_tool_choice is not None or self.req.parses_tool_calls):
            msg, reason = self._message(final.output, final.finish_reason)
            if msg.get("tool_calls"):
                calls = [{**c, "index": k} for k, c in enumerate(msg["tool_calls"])]
                events.append(self._chunk(index, {"tool_calls": calls}))
            else:
                rest = (final.output.text or "")[self.sent[index]:]
                if rest:
                    events.append(self._chunk(index, rest))
        events.append(self._chunk(index, None, reason, self._logprobs(final.output)))
        return events

    def usage_events(self, finals: list) -> list[dict]:
        return [{**self._head(True), "choices": [], "usage": self._usage(finals)}] if self.include_usage else []
