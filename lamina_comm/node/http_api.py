"""The model node's front door: a small JSON-over-HTTP API on the standard library.

    POST /generate   {"prompt": [ids], "max_tokens", "temperature", "top_p", "seed",
                      "stop_token_ids", "stream"} -> {"tokens": [...], ...}
                     or, with "stream": true, chunked NDJSON: one line per token
    GET  /healthz    200 when the node can serve, else 503 with the reason (a worker
                     lost, the scheduler stopped or made no progress, shutting down)
    GET  /status     the cluster (roles, peers, head shares, KV blocks) as JSON
    GET  /metrics    Prometheus text
    GET  /v1/models, POST /v1/completions   OpenAI-compatible (token-id prompts; see
                     lamina_comm.node.openai_api)
    POST /cluster/join, /cluster/leave  {"address": "HOST:PORT", "time"}: an attention
                     worker joins as a spare, or leaves (signed when the cluster has a
                     secret; see lamina_comm.node.membership)

Every refusal is a JSON object {"error": reason} with a 4xx/5xx status; a bad
request never disturbs the others (each connection has its own thread).

Framing: every request's body is consumed, as framed by Content-Length, before
any answer on a kept-alive connection, so no byte of one request is ever read
as the next. Bodies whose framing is missing, ambiguous, unsupported
(Transfer-Encoding) or over MAX_BODY_BYTES are answered and the connection is
closed.
"""
from __future__ import annotations

import json
import logging
import re
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Protocol

from lamina_comm.model import SamplingParams
from lamina_comm.node import membership, openai_api
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.requests import CLIENT_CLOSED, InvalidRequest, RequestHandle, RequestRejected
from lamina_comm.node.text import StopText, TextCodec, TextStream

log = logging.getLogger("lamina_comm.node.http")

# Largest request body accepted; a larger Content-Length gets 413 and the
# connection is closed without reading the body.
MAX_BODY_BYTES = 1 << 20
# Deepest JSON nesting accepted in a body (a /generate body needs 2); deeper
# gets 400 before the parser recurses.
MAX_JSON_DEPTH = 16
# Listen backlog of the front door (the kernel caps it at net.core.somaxconn):
# connections a burst of clients may open before the accept loop takes them.
DEFAULT_LISTEN_BACKLOG = 1024
_SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
_DEFAULTS = SamplingParams()
_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids", "stream"}


class GenerationService(Protocol):
    """What the front door needs from the model node (``ModelNode`` provides it)."""

    metrics: NodeMetrics

    def unhealthy_reason(self) -> Optional[str]: ...

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle: ...

    def status(self) -> dict[str, Any]: ...

    def join(self, address: str) -> dict[str, Any]: ...

    def leave(self, address: str) -> dict[str, Any]: ...

    @property
    def membership_secret(self) -> Optional[bytes]: ...

    @property
    def membership_replays(self) -> membership.ReplayGuard: ...


# ------------------------------------------------------------------ parsing


def parse_generate(body: bytes) -> tuple[list[int], SamplingParams, bool]:
    """(prompt, sampling params, stream) of a /generate body; InvalidRequest names the problem."""
    request = parse_json(body)
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
    try:
        # SamplingParams checks the numbers (types, finiteness, ranges) itself.
        params = SamplingParams(
            temperature=request.get("temperature", _DEFAULTS.temperature),
            top_p=request.get("top_p", _DEFAULTS.top_p),
            max_tokens=max_tokens,
            seed=seed,
            stop_token_ids=stop,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    return prompt, params, stream


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value of ``body``; InvalidRequest when it is not JSON or nests deeper than ``max_depth``."""
    if json_nesting_exceeds(body, max_depth):
        raise InvalidRequest(f"body nests JSON deeper than {max_depth} levels")
    try:
        return json.loads(body)
    except RecursionError:  # cannot happen under the depth bound; kept so a parser change stays a 400
        raise InvalidRequest("body nests JSON deeper than the parser allows") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from exc


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_nesting_exceeds(body: bytes, limit: int) -> bool:
    """True when the arrays and objects of ``body`` nest deeper than ``limit``.

    Brackets inside strings do not count. Invalid JSON may be misjudged; the
    parser rejects it anyway.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:  # the common case: a handful of brackets
        return False
    depth = 0
    for byte in brackets:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ framing

_DIGITS = re.compile(r"[0-9]+")


def request_body_size(headers: Any) -> Optional[int]:
    """Bytes of body the request's headers frame, None when they frame none.

    RequestRejected when the framing is unusable: then the connection must be
    closed, since where the next request starts is unknown.
    """
    # The header parser stops at the first malformed line and drops the rest
    # silently; a peer that read them (a proxy) would frame the body otherwise.
    if getattr(headers, "defects", None):
        raise RequestRejected(HTTPStatus.BAD_REQUEST, f"malformed header section: {headers.defects[0]!r}")
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = headers.get_all("Content-Length") or []
    if encodings and lengths:
        raise RequestRejected(HTTPStatus.BAD_REQUEST,
                              "both Transfer-Encoding and Content-Length: the body's framing is ambiguous")
    if encodings:
        raise RequestRejected(HTTPStatus.NOT_IMPLEMENTED,
                              f"Transfer-Encoding {', '.join(encodings)!r} is not supported; send Content-Length")
    if not lengths:
        return None
    return _content_length(lengths)


def _content_length(headers: list[str]) -> int:
    """The one length that every Content-Length header (and list element) states."""
    values = {value.strip() for header in headers for value in header.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        shown = ", ".join(sorted(values))[:80]
        raise RequestRejected(HTTPStatus.BAD_REQUEST, f"bad Content-Length {shown!r}")
    digits = values.pop().lstrip("0") or "0"
    # Compare lengths first: int() of a 65 KB header would itself fail.
    if len(digits) > len(str(MAX_BODY_BYTES)) or int(digits) > MAX_BODY_BYTES:
        raise RequestRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"body of {digits[:20]} bytes is over the {MAX_BODY_BYTES}-byte limit")
    return int(digits)


def effective_backlog(requested: int) -> int:
    """``requested`` capped at net.core.somaxconn, as the kernel would cap it silently."""
    try:
        with open(_SOMAXCONN_PATH) as file:
            limit = int(file.read())
    except (OSError, ValueError):
        return requested
    return min(requested, limit)


# ------------------------------------------------------------------ server


class FrontDoor:
    """ThreadingHTTPServer bound to ``address`` serving a GenerationService.

    ``listen_backlog`` (default DEFAULT_LISTEN_BACKLOG) is how many connections
    the kernel queues before the accept loop takes them; beyond it a burst of
    clients sees resets. ``self.listen_backlog`` is the value in effect.
    """

    def __init__(self, service: GenerationService, address: tuple[str, int], request_timeout: float = 600.0,
                 listen_backlog: int = DEFAULT_LISTEN_BACKLOG, model_name: str = "lamina",
                 text: Optional[TextCodec] = None):
        """``text``: the checkpoint's tokenizer (node/text.py), for text prompts and chat; None: token ids."""
        if listen_backlog < 1:
            raise ValueError(f"listen_backlog must be >= 1, got {listen_backlog}")
        handler = type("BoundHandler", (_Handler,), {"service": service, "request_timeout": request_timeout,
                                                     "model_name": model_name, "created": int(time.time()),
                                                     "codec": text})
        self.listen_backlog = effective_backlog(listen_backlog)
        self.server = ThreadingHTTPServer(address, handler, bind_and_activate=False)
        self.server.request_queue_size = self.listen_backlog  # what server_activate passes to listen()
        try:
            self.server.server_bind()
            self.server.server_activate()
        except BaseException:
            self.server.server_close()
            raise
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


def _stops_at(watch: StopText) -> Callable[[int], bool]:
    """RequestHandle.result's stop_at: feed each token's text to the watch; true once a stop string showed."""
    def stop_at(token: int) -> bool:
        watch.push([token])
        return watch.hit
    return stop_at


# path -> {method: handler method name}
_ROUTES = {
    "/healthz": {"GET": "_healthz"},
    "/status": {"GET": "_status"},
    "/metrics": {"GET": "_metrics"},
    "/generate": {"POST": "_generate"},
    "/v1/models": {"GET": "_openai_models"},
    "/v1/completions": {"POST": "_openai_completions"},
    "/v1/chat/completions": {"POST": "_openai_chat"},
    "/cluster/join": {"POST": "_join"},
    "/cluster/leave": {"POST": "_leave"},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming needs 1.1
    server_version = "lamina-node"
    timeout = 30  # seconds a client may take to send its request
    service: GenerationService
    request_timeout: float
    model_name: str  # what /v1/models lists and /v1/completions requests must name
    created: int
    codec: Optional[TextCodec] = None  # the checkpoint's tokenizer: text prompts, text answers, chat
    body: Optional[bytes] = None  # the current request's body; None: it framed none

    # -- routing --------------------------------------------------------------
    def _dispatch(self) -> None:
        """Every method: consume the body as framed, then route; so nothing of it is read as a request."""
        try:
            self.body = self._read_framed_body()
        except RequestRejected as exc:
            self._refuse_and_close(exc)
            return
        path = self.path.split("?", 1)[0]
        methods = _ROUTES.get(path)
        if methods is None:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {path}"})
        elif self.command not in methods:
            self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not allowed on {path}"},
                            extra_headers={"Allow": ", ".join(methods)})
        else:
            getattr(self, methods[self.command])()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch  # noqa: N815 - http.server naming

    def _read_framed_body(self) -> Optional[bytes]:
        size = request_body_size(self.headers)
        if size is None:
            return None
        body = self.rfile.read(size)
        if len(body) < size:
            raise RequestRejected(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {size} bytes")
        return body

    # -- GET endpoints ----------------------------------------------------------
    def _healthz(self) -> None:
        reason = self.service.unhealthy_reason()
        if reason is None:
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded", "reason": reason})

    def _status(self) -> None:
        self._send_json(HTTPStatus.OK, self.service.status())

    def _metrics(self) -> None:
        body = self.service.metrics.render().encode()
        self._send_bytes(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")

    # -- OpenAI-compatible (lamina_comm.node.openai_api) -----------------------------
    def _openai_models(self) -> None:
        self._send_json(HTTPStatus.OK, openai_api.models_body(self.model_name, self.created))

    def _openai_completions(self) -> None:
        self._openai_generate(openai_api.parse_completion)

    def _openai_chat(self) -> None:
        self._openai_generate(openai_api.parse_chat)

    def _openai_generate(self, parse: Callable[..., "openai_api.CompletionRequest"]) -> None:
        if self.body is None:
            self._refuse_and_close(RequestRejected(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
            return
        try:
            try:
                request = parse(parse_json(self.body), self.model_name, self.codec)
            except InvalidRequest as exc:  # not JSON, or nested too deep
                raise openai_api.OpenAIError(HTTPStatus.BAD_REQUEST, str(exc)) from None
            handles = self._submit_all(request)
        except openai_api.OpenAIError as exc:
            self._send_json(exc.status, exc.body())
            return
        completion_id = openai_api.new_id()
        if request.stream:
            self._openai_stream(completion_id, request, handles)
            return
        results = []
        try:
            for handle in handles:
                watch = StopText(request.codec, request.stops) if request.stops else None
                result = handle.result(self.request_timeout, abandoned=self._client_gone,
                                       stop_at=_stops_at(watch) if watch is not None else None)
                if watch is not None:
                    watch.finish()
                    result["text"] = watch.text
                    if watch.hit:
                        result["finish_reason"] = "stop"
                result["logprobs"] = list(handle.logprobs)[:len(result["tokens"])]
                results.append(result)
        except RequestRejected as exc:
            for handle in handles:
                handle.cancel()
            if exc.http_status == CLIENT_CLOSED:
                self.close_connection = True
                return
            self._send_json(exc.http_status, openai_api.error_body(exc.http_status, str(exc)))
            return
        self._send_json(HTTPStatus.OK, openai_api.completion_body(completion_id, self.model_name, request, results))

    def _submit_all(self, request: "openai_api.CompletionRequest") -> list[RequestHandle]:
        """One scheduler request per prompt and choice; a refusal cancels those already submitted."""
        handles: list[RequestHandle] = []
        try:
            for index, params in enumerate(request.params):
                handles.append(self.service.submit(request.prompts[index // request.n], params))
        except RequestRejected as exc:
            for handle in handles:
                handle.cancel()
            param = "prompt" if exc.http_status == HTTPStatus.BAD_REQUEST else None
            kind = "invalid_request_error" if exc.http_status < 500 else "server_error"
            raise openai_api.OpenAIError(exc.http_status, str(exc), param=param, kind=kind) from None
        return handles

    def _openai_stream(self, completion_id: str, request: "openai_api.CompletionRequest",
                       handles: list[RequestHandle]) -> None:
        """Server-sent events: a chunk per token per choice, a last chunk per choice, usage, [DONE]."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        open_choices = set(range(len(handles)))
        texts = [None if request.codec is None else StopText(request.codec, request.stops) if request.stops
                 else TextStream(request.codec) for _ in handles]
        started: set[int] = set()  # chat: choices whose first chunk (the role) went
        try:
            deadline = time.monotonic() + self.request_timeout
            while open_choices:
                progressed = False
                for index in sorted(open_choices):  # whatever every choice has, in choice order
                    while index in open_choices:
                        event = handles[index].next_event(0)
                        if event is None:
                            break
                        progressed = True
                        self._openai_event(completion_id, request, handles, index, event, open_choices, texts,
                                           started)
                if progressed or not open_choices:
                    continue
                if time.monotonic() > deadline or self._client_gone():
                    raise BrokenPipeError("no progress in time, or the client went away")
                first = min(open_choices)  # sleep on one choice's events (briefly: the others may move)
                event = handles[first].next_event(0.02)
                if event is not None:
                    self._openai_event(completion_id, request, handles, first, event, open_choices, texts, started)
            if request.include_usage:
                completion = sum(len(h.tokens) for h in handles)
                prompt = sum(len(p) for p in request.prompts)
                self._sse(openai_api.usage_chunk(completion_id, self.model_name, prompt, completion, request.chat))
            self._sse_raw(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client of completion %s went away; cancelling it", completion_id)
            for handle in handles:
                handle.cancel()
            self.close_connection = True

    def _openai_event(self, completion_id: str, request: "openai_api.CompletionRequest",
                      handles: list[RequestHandle], index: int, event: dict[str, Any], open_choices: set[int],
                      texts: list[Any], started: set[int]) -> None:
        kind = event["event"]
        stream = texts[index]
        first = index not in started
        started.add(index)
        if kind == "token":
            logprobs = [(event["logprob"], event["top_logprobs"])] if "logprob" in event else None
            text = stream.push([event["token"]]) if stream is not None else ""
            self._sse(openai_api.chunk_body(completion_id, self.model_name, index, [event["token"]], None,
                                            logprobs, request, text, first))
            if getattr(stream, "hit", False):  # a stop string: this choice ends here
                handles[index].cancel()
                self._sse(openai_api.chunk_body(completion_id, self.model_name, index, [], "stop", None, request))
                open_choices.discard(index)
        elif kind == "finished":
            text = stream.finish() if stream is not None else ""
            reason = "stop" if getattr(stream, "hit", False) else event["finish_reason"]
            self._sse(openai_api.chunk_body(completion_id, self.model_name, index, [], reason, None, request,
                                            text, first))
            open_choices.discard(index)
        elif kind == "error":
            self._sse(openai_api.error_body(event["status"], event["error"]))
            open_choices.discard(index)

    def _sse(self, payload: dict[str, Any]) -> None:
        self._sse_raw(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _sse_raw(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # -- membership (lamina_comm.node.membership) ---------------------------------
    def _join(self) -> None:
        self._membership_call(self.service.join)

    def _leave(self) -> None:
        self._membership_call(self.service.leave)

    def _membership_call(self, action: Callable[[str], dict[str, Any]]) -> None:
        try:
            address = membership.parse_call(self.body, self.headers.get(membership.SIGNATURE_HEADER),
                                            self.service.membership_secret, seen=self.service.membership_replays)
            answer = action(address)
        except membership.MembershipError as exc:
            self._send_json(exc.http_status, {"error": str(exc)})
            return
        except KeyError as exc:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": str(exc.args[0])})
            return
        except ValueError as exc:
            self._send_json(HTTPStatus.CONFLICT, {"error": str(exc)})
            return
        self._send_json(HTTPStatus.OK, answer)

    # -- generation ---------------------------------------------------------------
    def _generate(self) -> None:
        if self.body is None:
            # Without a length the client's intended framing is unknown: do not read on.
            self._refuse_and_close(RequestRejected(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required"))
            return
        try:
            prompt, params, stream = parse_generate(self.body)
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

    def _complete(self, handle: RequestHandle) -> None:
        try:
            result = handle.result(self.request_timeout, abandoned=self._client_gone)
        except RequestRejected as exc:
            handle.cancel()
            if exc.http_status == CLIENT_CLOSED:
                log.info("client of request %d went away; cancelled it", handle.id)
                self.close_connection = True
                return
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

    def _client_gone(self) -> bool:
        """True when the client closed its connection (EOF or reset); bytes it sent ahead do not count.

        A client that half-closes (shutdown(SHUT_WR)) after its request is
        taken as gone too: an HTTP/1.1 client keeps its side open until it
        has the answer.
        """
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

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
    def _refuse_and_close(self, exc: RequestRejected) -> None:
        self._send_json(exc.http_status, {"error": str(exc)}, extra_headers={"Connection": "close"})

    def _send_json(self, status: int, payload: dict[str, Any],
                   extra_headers: Optional[dict[str, str]] = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode() + b"\n", "application/json", extra_headers)

    def _send_bytes(self, status: int, body: bytes, content_type: str,
                    extra_headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)  # "Connection: close" also sets close_connection
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server signature
        log.debug("%s %s", self.address_string(), format % args)
