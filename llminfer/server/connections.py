"""uvicorn's HTTP protocol, with a time limit on connections that never send a request.

uvicorn times an idle connection out only between requests (keep-alive); one that connects and sends nothing is
held forever, so a few hundred silent sockets would use up --max-connections. Starting the keep-alive timer
when the connection is made closes those after --keep-alive-timeout too (the first byte received cancels it,
as it does between requests).

The keep-alive timeout is longer than the common clients' own idle expiry (httpx 5 s, aiohttp 15 s): when both
sides use the same value, the server can close a pooled connection just as the client sends on it, and the
client sees a reset instead of a response.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

DEFAULT_KEEP_ALIVE_TIMEOUT_S = 20.0  # `llminfer serve --keep-alive-timeout`


def idle_closing(protocol_class: type) -> type:
    class IdleClosingProtocol(protocol_class):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    IdleClosingProtocol.__name__ = f"IdleClosing{protocol_class.__name__}"
    return IdleClosingProtocol


def http_protocol() -> Any:
    """The protocol class uvicorn would pick ('auto': httptools when installed, else h11), idle-closing."""
    try:
        import httptools  # noqa: F401 - uvicorn's own test for it
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return idle_closing(HttpToolsProtocol)
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return idle_closing(H11Protocol)


def uvicorn_config(app: Any, host: str, port: int, *, max_connections: int | None = None,
                   keep_alive_timeout_s: float | None = None, **options: Any) -> uvicorn.Config:
    """The transport `llminfer serve` runs: idle-closing protocol, connection cap, keep-alive timeout."""
    settings: dict[str, Any] = dict(log_level="warning", timeout_graceful_shutdown=5,
                                    limit_concurrency=max_connections, http=http_protocol(),
                                    timeout_keep_alive=DEFAULT_KEEP_ALIVE_TIMEOUT_S if keep_alive_timeout_s is None
                                    else keep_alive_timeout_s)
    settings.update(options)
    return uvicorn.Config(app, host=host, port=port, **settings)
