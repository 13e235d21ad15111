"""uvicorn's HTTP protocol, with a time limit on connections that never send a request.

uvicorn times an idle connection out only between requests (keep-alive); one that connects and sends nothing is
held forever, so a few hundred silent sockets would use up --max-connections. Starting the keep-alive timer
when the connection is made closes those after --keep-alive-timeout too (the first byte received cancels it,
as it does between requests).
"""

from __future__ import annotations

import asyncio
from typing import Any


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
