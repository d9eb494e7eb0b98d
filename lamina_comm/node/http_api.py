"""The model node's front door: a small JSON-over-HTTP API on the standard library.

    POST /generate   {"prompt": [ids], "max_tokens", "temperature", "top_p", "seed",
                      "stop_token_ids", "stream"} -> {"tokens": [...], ...}
                     or, with "stream": true, chunked NDJSON: one line per token
    GET  /healthz    200 when every attention worker is up, else 503
    GET  /status     the cluster (roles, peers, head shares, KV blocks) as JSON
    GET  /metrics    Prometheus text

Every refusal is a JSON object {"error": reason} with a 4xx/5xx status; a bad
request never disturbs the others (each connection has its own thread).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Protocol

from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.model_node import InvalidRequest, RequestHandle, RequestRejected
from lamina_comm.node.sampling import SamplingParams

log = logging.getLogger("lamina_comm.node.http")

MAX_BODY_BYTES = 1 << 20
_DEFAULTS = SamplingParams()
_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "stream"}


class GenerationService(Protocol):
    """What the front door needs from the model node (``ModelNode`` provides it)."""

    metrics: NodeMetrics

    @property
    def healthy(self) -> bool: ...

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle: ...

    def status(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------ parsing


def parse_generate(body: bytes) -> tuple[list[int], SamplingParams, bool]:
    """(prompt, sampling params, stream) of a /generate body; InvalidRequest names the problem."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(request) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown fields {unknown}; allowed: {sorted(_FIELDS)}")
    prompt = request.get("prompt")
    if not isinstance(prompt, list) or not all(_is_int(t) for t in prompt):
        raise InvalidRequest("prompt must be a list of integer token ids")
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    max_tokens = request.get("max_tokens", _DEFAULTS.max_tokens)
    if not _is_int(max_tokens):
        raise InvalidRequest(f"max_tokens must be an integer, got {max_tokens!r}")
    seed = request.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"seed must be an integer or null, got {seed!r}")
    stop = request.get("stop_token_ids", [])
    if not isinstance(stop, list) or not all(_is_int(t) for t in stop):
        raise InvalidRequest("stop_token_ids must be a list of integer token ids")
    for name in ("temperature", "top_p"):
        value = request.get(name, getattr(_DEFAULTS, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{name} must be a number, got {value!r}")
    try:
        params = SamplingParams(
            temperature=float(request.get("temperature", _DEFAULTS.temperature)),
            top_p=float(request.get("top_p", _DEFAULTS.top_p)),
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=stop,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    return prompt, params, stream


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ server


class FrontDoor:
    """ThreadingHTTPServer bound to ``address`` serving a GenerationService."""

    def __init__(self, service: GenerationService, address: tuple[str, int], request_timeout: float = 600.0):
        handler = type("BoundHandler", (_Handler,), {"service": service, "request_timeout": request_timeout})
        self.server = ThreadingHTTPServer(address, handler)
        self.server.daemon_threads = True
        self.address: tuple[str, int] = self.server.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming needs 1.1
    server_version = "lamina-node"
    timeout = 30  # seconds a client may take to send its request
    service: GenerationService
    request_timeout: float

    # -- routing --------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        routes = {"/healthz": self._healthz, "/status": self._status, "/metrics": self._metrics}
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._not_found()
        else:
            route()

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/generate":
            self._not_found()
            return
        try:
            body = self._read_body()
        except RequestRejected as exc:
            self.close_connection = True  # the unread body would garble the next request
            self._send_json(exc.http_status, {"error": str(exc)})
            return
        try:
            prompt, params, stream = parse_generate(body)
            handle = self.service.submit(prompt, params)
        except RequestRejected as exc:
            self._send_json(exc.http_status, {"error": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - a bug must not look like a dropped connection
            log.exception("submitting a request failed")
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc}"})
            return
        if stream:
            self._stream(handle)
        else:
            self._complete(handle)

    def _not_found(self) -> None:
        known = {"GET": ["/healthz", "/status", "/metrics"], "POST": ["/generate"]}
        path = self.path.split("?", 1)[0]
        if any(path in paths for paths in known.values()):
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not allowed on {path}"})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})

    do_PUT = do_DELETE = do_PATCH = _not_found  # noqa: N815

    # -- GET endpoints ----------------------------------------------------------
    def _healthz(self) -> None:
        healthy = self.service.healthy
        self._send_json(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                        {"status": "ok" if healthy else "degraded"})

    def _status(self) -> None:
        self._send_json(HTTPStatus.OK, self.service.status())

    def _metrics(self) -> None:
        body = self.service.metrics.render().encode()
        self._send_bytes(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")

    # -- generation ---------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestRejected(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise RequestRejected(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if size < 0 or size > MAX_BODY_BYTES:
            raise RequestRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(size)

    def _complete(self, handle: RequestHandle) -> None:
        try:
            result = handle.result(self.request_timeout)
        except RequestRejected as exc:
            handle.cancel()
            self._send_json(exc.http_status, {"id": handle.id, "error": str(exc)})
            return
        self._send_json(HTTPStatus.OK, {
            "id": handle.id,
            "tokens": result["tokens"],
            "finish_reason": result["finish_reason"],
            "prompt_tokens": handle.prompt_tokens,
            "completion_tokens": len(result["tokens"]),
            "time_s": round(time.monotonic() - handle.submitted_at, 6),
        })

    def _stream(self, handle: RequestHandle) -> None:
        """Chunked NDJSON: one {"token"} line per token, then a final {"done": true} line."""
        first = handle.next_event(self.request_timeout)
        if first is None or first["event"] == "error":
            handle.cancel()
            status, reason = ((first["status"], first["error"]) if first
                              else (HTTPStatus.GATEWAY_TIMEOUT, "request was not admitted in time"))
            self._send_json(status, {"id": handle.id, "error": reason})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._stream_events(handle, first)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client of request %d went away; cancelling it", handle.id)
            handle.cancel()
            self.close_connection = True

    def _stream_events(self, handle: RequestHandle, event: Optional[dict[str, Any]]) -> None:
        index = 0
        while True:
            if event is None:
                handle.cancel()
                self._chunk({"id": handle.id, "done": True, "status": int(HTTPStatus.GATEWAY_TIMEOUT),
                             "error": f"no progress within {self.request_timeout} s"})
                return
            kind = event["event"]
            if kind == "token":
                self._chunk({"id": handle.id, "index": index, "token": event["token"]})
                index += 1
            elif kind == "finished":
                self._chunk({"id": handle.id, "done": True, "finish_reason": event["finish_reason"],
                             "tokens": list(handle.tokens)})
                return
            elif kind == "error":
                self._chunk({"id": handle.id, "done": True, "status": event["status"], "error": event["error"]})
                return
            event = handle.next_event(self.request_timeout)

    def _chunk(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    # -- plumbing -----------------------------------------------------------------
    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(payload).encode() + b"\n", "application/json")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server signature
        log.debug("%s %s", self.address_string(), format % args)
