"""uvicorn settings for ``hf-turbo serve``: connection timeouts a slow or idle client cannot outlast.

uvicorn times out an idle keep-alive connection only after a response, and never a client that is
still sending its request line and headers: one that sends half a header and waits holds its
connection (and a file descriptor) for as long as it likes. :func:`server_config` uses uvicorn's own
HTTP protocol with a header deadline added: a connection must complete each request's headers within
``header_timeout`` seconds of opening or of its previous response, or it is closed.
"""

from __future__ import annotations

import functools

import uvicorn

__all__ = ["server_config", "header_timeout_protocol"]


@functools.cache
def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a ``timeout``-second deadline
    for each request's headers."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):
        # A request's headers are complete exactly when the protocol creates its cycle, so the deadline
        # only has to check whether a new cycle started since it was armed.
        _header_timer = None
        _armed_cycle = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_deadline()  # else a pipelined request already started

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            if self.cycle is self._armed_cycle and not self.transport.is_closing():
                self.transport.close()  # no request came in time: nothing to answer

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{AutoHTTPProtocol.__name__}"
    return HeaderTimeoutProtocol


def server_config(app, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = 10.0,
                  keep_alive_timeout: float = 5.0, **kwargs) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with the header deadline and the keep-alive timeout set
    (``kwargs`` go to uvicorn: ``log_level``, ``timeout_graceful_shutdown``, ...)."""
    for name, value in (("header_timeout", header_timeout), ("keep_alive_timeout", keep_alive_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(app, host=host, port=port, http=header_timeout_protocol(float(header_timeout)),
                          timeout_keep_alive=keep_alive_timeout, **kwargs)
