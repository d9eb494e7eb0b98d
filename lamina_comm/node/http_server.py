"""The front door's HTTP server: uvicorn (h11) in its own thread, with the limits a public port needs.

The application (``http_api``) only sees requests that passed these guards:

- **Header timeout.** A connection must deliver a complete request line and
  headers within ``header_timeout`` seconds of being opened (or of its last
  answer), else it is closed: a client that opens connections and sends
  nothing, or a byte at a time, holds no more than a socket for that long.
  (uvicorn itself only times out idle kept-alive connections.)
- **Body limits** (``BufferedBody``): the whole body, however framed
  (Content-Length or chunked), is read before the application runs, within
  ``body_timeout`` seconds (408 otherwise) and up to ``max_body_bytes`` (413,
  without reading it, when the length says so up front). Both refusals close
  the connection. Reading every body to its end before answering is also what
  keeps a kept-alive connection in step: no byte of one request can be taken
  for the next.
- **Connections**: at most ``max_connections`` at once; past that, new
  requests get 503 (uvicorn's ``limit_concurrency``). The listen backlog is
  an option (``listen_backlog``), capped by the kernel at net.core.somaxconn.

Framing errors (both Content-Length and Transfer-Encoding, a bad length, a
malformed header) are h11's: a 400 and the connection closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any, Awaitable, Callable, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("lamina_comm.node.http")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# (path, status, message) -> JSON body of a refusal; the application's own shape of errors.
ErrorBody = Callable[[str, int, str], dict[str, Any]]

MAX_BODY_BYTES = 1 << 20
HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this long (uvicorn's default)
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_LISTEN_BACKLOG = 1024
_SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
_STARTUP_TIMEOUT_S = 10.0
_SHUTDOWN_GRACE_S = 3  # open streams get this long to end when the server closes


def effective_backlog(requested: int) -> int:
    """``requested`` capped at net.core.somaxconn, as the kernel would cap it silently."""
    try:
        with open(_SOMAXCONN_PATH) as file:
            limit = int(file.read())
    except (OSError, ValueError):
        return requested
    return min(requested, limit)


class _HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing connections that take too long to send a request's headers."""

    header_timeout: float = HEADER_TIMEOUT_S
    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Armed while the connection waits for a request's headers; disarmed once they are in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        elif not waiting:
            self._disarm()

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.debug("closing %s: no request headers within %.0f s", self.client, self.header_timeout)
            self.transport.close()


class BufferedBody:
    """ASGI middleware: read the whole body (bounded in size and time) before the application runs."""

    def __init__(self, app: ASGIApp, error_body: ErrorBody, max_bytes: int = MAX_BODY_BYTES,
                 timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.error_body, self.max_bytes, self.timeout_s = app, error_body, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send, 413, f"body of {declared} bytes is over the {self.max_bytes}-byte limit")
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(scope, send, 408, f"the body did not arrive within {self.timeout_s:g} s")
            return
        except _TooLarge:
            await self._refuse(scope, send, 413, f"body is over the {self.max_bytes}-byte limit")
            return
        if body is None:  # the client left while sending it
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # from here on only http.disconnect comes

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> Optional[bytes]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, send: Send, status: int, reason: str) -> None:
        await send_json(send, status, self.error_body(scope["path"], status, reason), close=True)


class _TooLarge(Exception):
    pass


def _content_length(scope: Scope) -> Optional[int]:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)  # h11 has checked it is one decimal number
    return None


async def send_json(send: Send, status: int, payload: dict[str, Any], close: bool = False) -> None:
    """A whole JSON answer from ASGI middleware (below the framework)."""
    body = json.dumps(payload).encode() + b"\n"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpServer:
    """uvicorn serving ``app`` on ``address`` from a thread of its own; ``close()`` stops it.

    The socket is bound in the constructor, so ``address`` (with port 0
    resolved) is known, and a port in use fails here, before ``start``.
    """

    def __init__(self, app: ASGIApp, address: tuple[str, int], listen_backlog: int = DEFAULT_LISTEN_BACKLOG,
                 header_timeout: float = HEADER_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        if listen_backlog < 1:
            raise ValueError(f"listen_backlog must be >= 1, got {listen_backlog}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.listen_backlog = effective_backlog(listen_backlog)
        self.socket = socket.create_server(address, backlog=self.listen_backlog)
        self.address: tuple[str, int] = self.socket.getsockname()[:2]
        protocol = type("HeaderTimeoutH11", (_HeaderTimeoutH11,), {"header_timeout": header_timeout})
        config = uvicorn.Config(
            app, http=protocol, ws="none", lifespan="off", interface="asgi3", loop="asyncio",
            log_config=None, access_log=False, timeout_keep_alive=KEEP_ALIVE_S,
            limit_concurrency=max_connections, backlog=self.listen_backlog,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE_S, server_header=False,
            headers=[("server", "lamina-node")])
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            self._thread.join(0.01)
        if not self.server.started:
            self.close()
            raise RuntimeError(f"the HTTP server did not start: {self._failure!r}")

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._failure = exc
            log.exception("the HTTP server stopped")

    def close(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(_SHUTDOWN_GRACE_S + 5)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(5)
        self.socket.close()
