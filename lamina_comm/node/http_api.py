"""The model node's front door: FastAPI routes on uvicorn (``http_server`` holds the server and its limits).

    POST /generate   {"prompt": [ids], "max_tokens", "temperature", "top_p", "seed",
                      "stop_token_ids", "stream"} -> {"tokens": [...], ...}
                     or, with "stream": true, chunked NDJSON: one line per token
    GET  /healthz    200 when the node can serve, else 503 with the reason (a worker
                     lost, the scheduler stopped or made no progress, shutting down)
    GET  /status     the cluster (roles, peers, head shares, KV blocks) as JSON
    GET  /metrics    Prometheus text
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions
                     OpenAI-compatible, as vLLM serves them (lamina_comm.node.openai_api)
    POST /cluster/join, /cluster/leave  {"address": "HOST:PORT", "time"}: an attention
                     worker joins as a spare, or leaves (signed when the cluster has a
                     secret; see lamina_comm.node.membership)
    GET  /docs, /openapi.json   the API, with the request schemas (node/schemas.py)

Why FastAPI on uvicorn: it is the stack vLLM's and SGLang's OpenAI servers
run on, so its behaviour (SSE framing, error paths, disconnect handling) is
what their clients are tested against; pydantic models give the request
schemas and errors that name the field; and one event loop holds any number
of idle or streaming connections without a thread each.

Every refusal is JSON with a 4xx/5xx status: ``{"error": reason}``, and on
/v1 OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.
The scheduler runs in its own thread; a request's events reach the event loop
through ``RequestHandle.add_waker``, so a waiting request costs no thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Sequence

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lamina_comm.model import SamplingParams
from lamina_comm.node import membership, openai_api, schemas
from lamina_comm.node.http_server import (BODY_TIMEOUT_S, DEFAULT_LISTEN_BACKLOG, DEFAULT_MAX_CONNECTIONS, HEADER_TIMEOUT_S,
                                          MAX_BODY_BYTES, BufferedBody, HttpServer)
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.requests import (ABANDON_CHECK_S, CLIENT_CLOSED, RequestHandle, RequestRejected,
                                       ResultCollector)
from lamina_comm.node.text import StopText, TextCodec, TextStream

log = logging.getLogger("lamina_comm.node.http")

__all__ = ["FrontDoor", "GenerationService", "build_app", "DEFAULT_LISTEN_BACKLOG", "MAX_BODY_BYTES"]


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


class FrontDoor:
    """The front door of ``service`` on ``address``: ``start()``, then ``close()``.

    ``listen_backlog``: connections the kernel queues before the server takes
    them (``self.listen_backlog`` is the value in effect); ``header_timeout``,
    ``body_timeout`` and ``max_connections``: see ``http_server``; ``text``: the checkpoint's
    tokenizer (node/text.py) for text prompts and chat, None for token ids only.
    """

    def __init__(self, service: GenerationService, address: tuple[str, int], request_timeout: float = 600.0,
                 listen_backlog: int = DEFAULT_LISTEN_BACKLOG, model_name: str = "lamina",
                 text: Optional[TextCodec] = None, header_timeout: float = HEADER_TIMEOUT_S,
                 body_timeout: float = BODY_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        app = build_app(service, model_name=model_name, request_timeout=request_timeout, text=text)
        self._http = HttpServer(BufferedBody(app, error_body, timeout_s=body_timeout), address,
                                listen_backlog=listen_backlog,
                                header_timeout=header_timeout, max_connections=max_connections)
        self.address = self._http.address
        self.listen_backlog = self._http.listen_backlog

    def start(self) -> None:
        self._http.start()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "FrontDoor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """A refusal in the shape the path's clients expect: OpenAI's error object on /v1, else {"error"}."""
    if path.startswith("/v1/"):
        return openai_api.error_body(status, message)
    return {"error": message}


def _json(status: int, payload: dict[str, Any], headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(payload, status_code=int(status), headers=headers)


def _schema(model: type) -> dict[str, Any]:
    """OpenAPI description of a body the route parses itself (so /docs shows it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


class _ClientGone(Exception):
    """The client closed its connection: its requests are cancelled, nobody is answered."""


class _EventFeed:
    """The events of one or more RequestHandles, awaited on the event loop.

    The scheduler thread calls the waker after each event; the loop wakes,
    takes what is queued with ``next_event(0)``, and sleeps again. The flag
    is cleared before looking, so an event that lands in between still wakes
    the next wait.
    """

    def __init__(self, handles: Sequence[RequestHandle], request: Request):
        self.handles, self.request = list(handles), request
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop closed: nobody waits any more
                pass

        for handle in self.handles:
            handle.add_waker(wake)

    async def next(self, deadline: float, among: Optional[Sequence[int]] = None) -> Optional[tuple[int, dict]]:
        """(index, event) of the first handle (in ``among``, in order) with one; None past ``deadline``
        (time.monotonic()); _ClientGone when the client left (looked at every ABANDON_CHECK_S)."""
        indices = range(len(self.handles)) if among is None else among
        while True:
            self._ready.clear()
            for index in indices:
                event = self.handles[index].next_event(0)
                if event is not None:
                    return index, event
            if await self.request.is_disconnected():
                raise _ClientGone()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), min(remaining, ABANDON_CHECK_S))
            except asyncio.TimeoutError:
                pass

    def cancel_all(self) -> None:
        for handle in self.handles:
            handle.cancel()


def _stops_at(watch: StopText) -> Callable[[int], bool]:
    """ResultCollector's stop_at: feed each token's text to the watch; true once a stop string showed."""
    def stop_at(token: int) -> bool:
        watch.push([token])
        return watch.hit
    return stop_at


def build_app(service: GenerationService, model_name: str = "lamina", request_timeout: float = 600.0,
              text: Optional[TextCodec] = None) -> FastAPI:
    """The front door's routes over ``service`` (an ASGI app; ``FrontDoor`` serves it with its limits)."""
    app = FastAPI(title="lamina-node", summary="Model-attention disaggregated decoding (Lamina)",
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    routes = _Routes(service, model_name, request_timeout, text)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no such endpoint {request.url.path}" if exc.status_code == 404 else \
            f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else str(exc.detail)
        return _json(exc.status_code, error_body(request.url.path, exc.status_code, message), exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        log.exception("%s %s failed", request.method, request.url.path)
        return _json(500, error_body(request.url.path, 500, f"internal error: {exc}"))

    app.add_api_route("/healthz", routes.healthz, methods=["GET"])
    app.add_api_route("/status", routes.status, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/generate", routes.generate, methods=["POST"], openapi_extra=_schema(schemas.GenerateBody))
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"],
                      openapi_extra=_schema(schemas.CompletionBody))
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"], openapi_extra=_schema(schemas.ChatBody))
    app.add_api_route("/cluster/join", routes.join, methods=["POST"])
    app.add_api_route("/cluster/leave", routes.leave, methods=["POST"])
    return app


class _Routes:
    def __init__(self, service: GenerationService, model_name: str, request_timeout: float,
                 codec: Optional[TextCodec]):
        self.service, self.model_name, self.request_timeout, self.codec = service, model_name, request_timeout, codec
        self.created = int(time.time())

    # -- GET endpoints ----------------------------------------------------------
    async def healthz(self) -> JSONResponse:
        reason = await run_in_threadpool(self.service.unhealthy_reason)
        if reason is None:
            return _json(HTTPStatus.OK, {"status": "ok"})
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded", "reason": reason})

    async def status(self) -> JSONResponse:
        return _json(HTTPStatus.OK, await run_in_threadpool(self.service.status))

    async def metrics(self) -> Response:
        return Response(self.service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self) -> JSONResponse:
        return _json(HTTPStatus.OK, openai_api.models_body(self.model_name, self.created))

    # -- /generate ------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        try:
            body = schemas.validate_body(schemas.GenerateBody, await request.body())
        except schemas.BodyError as exc:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        try:
            params = SamplingParams(temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_tokens,
                                    seed=body.seed, stop_token_ids=body.stop_token_ids)
        except ValueError as exc:  # SamplingParams checks ranges and finiteness, naming the field
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        try:
            handle = await run_in_threadpool(self.service.submit, body.prompt, params)
        except RequestRejected as exc:
            return _json(exc.http_status, {"error": str(exc)})
        feed = _EventFeed([handle], request)
        deadline = time.monotonic() + self.request_timeout
        if body.stream:
            return await self._generate_stream(handle, feed, deadline)
        try:
            result = await self._result(feed, 0, deadline, ResultCollector(handle))
        except _ClientGone:
            log.info("client of request %d went away; cancelled it", handle.id)
            return Response(status_code=CLIENT_CLOSED)
        except RequestRejected as exc:
            handle.cancel()
            return _json(exc.http_status, {"id": handle.id, "error": str(exc)})
        return _json(HTTPStatus.OK, {
            "id": handle.id, "tokens": result["tokens"], "finish_reason": result["finish_reason"],
            "prompt_tokens": handle.prompt_tokens, "completion_tokens": len(result["tokens"]),
            "time_s": round(time.monotonic() - handle.submitted_at, 6)})

    async def _result(self, feed: _EventFeed, index: int, deadline: float,
                      collector: ResultCollector) -> dict[str, Any]:
        """Handle ``index``'s result; _ClientGone (its request cancelled) or RequestRejected (504 past deadline)."""
        handle = feed.handles[index]
        while True:
            try:
                got = await feed.next(deadline, (index,))
            except _ClientGone:
                handle.cancel()
                raise
            if got is None:
                raise RequestRejected(HTTPStatus.GATEWAY_TIMEOUT,
                                      f"request {handle.id} did not finish within {self.request_timeout} s")
            result = collector.take(got[1])
            if result is not None:
                return result

    async def _generate_stream(self, handle: RequestHandle, feed: _EventFeed, deadline: float) -> Response:
        """Chunked NDJSON: one {"token"} line per token, then a final {"done": true} line. The first event
        comes before the answer's status, so a request refused at admission gets its own status."""
        try:
            first = await feed.next(deadline)
        except _ClientGone:
            handle.cancel()
            return Response(status_code=CLIENT_CLOSED)
        if first is None or first[1]["event"] == "error":
            handle.cancel()
            status, reason = ((first[1]["status"], first[1]["error"]) if first
                              else (HTTPStatus.GATEWAY_TIMEOUT, "request was not admitted in time"))
            return _json(status, {"id": handle.id, "error": reason})

        async def lines() -> AsyncIterator[bytes]:
            event: Optional[dict] = first[1]
            index = 0
            finished = False
            try:
                while True:
                    if event is None:
                        yield _line({"id": handle.id, "done": True, "status": int(HTTPStatus.GATEWAY_TIMEOUT),
                                     "error": f"no progress within {self.request_timeout} s"})
                        return
                    kind = event["event"]
                    if kind == "token":
                        yield _line({"id": handle.id, "index": index, "token": event["token"]})
                        index += 1
                    elif kind == "finished":
                        finished = True
                        yield _line({"id": handle.id, "done": True, "finish_reason": event["finish_reason"],
                                     "tokens": list(handle.tokens)})
                        return
                    elif kind == "error":
                        finished = True
                        yield _line({"id": handle.id, "done": True, "status": event["status"],
                                     "error": event["error"]})
                        return
                    got = await feed.next(deadline)
                    event = None if got is None else got[1]
            except _ClientGone:
                pass
            finally:  # the client left, the stream was cancelled, or it timed out: stop generating
                if not finished:
                    log.info("stream of request %d ended early; cancelling it", handle.id)
                    handle.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # -- OpenAI-compatible (lamina_comm.node.openai_api) -----------------------------
    async def completions(self, request: Request) -> Response:
        return await self._openai(request, schemas.CompletionBody, openai_api.parse_completion)

    async def chat(self, request: Request) -> Response:
        return await self._openai(request, schemas.ChatBody, openai_api.parse_chat)

    async def _openai(self, request: Request, model: type, parse: Callable[..., openai_api.CompletionRequest]) \
            -> Response:
        try:
            try:
                body = schemas.validate_body(model, await request.body())
            except schemas.BodyError as exc:
                raise openai_api.OpenAIError(HTTPStatus.BAD_REQUEST, str(exc), param=exc.field) from None
            parsed = parse(body, self.model_name, self.codec)
            handles = await run_in_threadpool(self._submit_all, parsed)
        except openai_api.OpenAIError as exc:
            return _json(exc.status, exc.body())
        feed = _EventFeed(handles, request)
        completion_id = openai_api.new_id()
        deadline = time.monotonic() + self.request_timeout
        if parsed.stream:
            return StreamingResponse(self._openai_events(completion_id, parsed, feed, deadline),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = []
        try:
            for index, handle in enumerate(handles):
                watch = StopText(parsed.codec, parsed.stops) if parsed.stops else None
                collector = ResultCollector(handle, _stops_at(watch) if watch is not None else None)
                result = await self._result(feed, index, deadline, collector)
                if watch is not None:
                    watch.finish()
                    result["text"] = watch.text
                    if watch.hit:
                        result["finish_reason"] = "stop"
                result["logprobs"] = list(handle.logprobs)[:len(result["tokens"])]
                results.append(result)
        except _ClientGone:
            feed.cancel_all()
            return Response(status_code=CLIENT_CLOSED)
        except RequestRejected as exc:
            feed.cancel_all()
            return _json(exc.http_status, openai_api.error_body(exc.http_status, str(exc)))
        return _json(HTTPStatus.OK, openai_api.completion_body(completion_id, self.model_name, parsed, results))

    def _submit_all(self, request: openai_api.CompletionRequest) -> list[RequestHandle]:
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

    async def _openai_events(self, completion_id: str, request: openai_api.CompletionRequest, feed: _EventFeed,
                             deadline: float) -> AsyncIterator[bytes]:
        """Server-sent events: a chunk per token per choice, a last chunk per choice, usage, [DONE]."""
        handles = feed.handles
        open_choices = set(range(len(handles)))
        texts = [None if request.codec is None else StopText(request.codec, request.stops) if request.stops
                 else TextStream(request.codec) for _ in handles]
        started: set[int] = set()  # chat: choices whose first chunk (the role) went
        try:
            while open_choices:
                got = await feed.next(deadline, sorted(open_choices))
                if got is None:
                    yield _sse(openai_api.error_body(504, f"no progress within {self.request_timeout} s"))
                    return
                index, event = got
                for chunk in self._openai_chunks(completion_id, request, index, event, texts[index],
                                                 index not in started):
                    yield chunk
                started.add(index)
                if event["event"] in ("finished", "error") or getattr(texts[index], "hit", False):
                    handles[index].cancel()  # a stop string: this choice ends here (no-op when it ended)
                    open_choices.discard(index)
            if request.include_usage:
                completion = sum(len(h.tokens) for h in handles)
                prompt = sum(len(p) for p in request.prompts)
                yield _sse(openai_api.usage_chunk(completion_id, self.model_name, prompt, completion, request.chat))
            yield b"data: [DONE]\n\n"
        except _ClientGone:
            pass
        finally:
            if open_choices:  # the client left, or the stream was cancelled: stop generating
                log.info("stream of completion %s ended early; cancelling it", completion_id)
                feed.cancel_all()

    def _openai_chunks(self, completion_id: str, request: openai_api.CompletionRequest, index: int,
                       event: dict[str, Any], stream: Any, first: bool) -> list[bytes]:
        kind = event["event"]
        if kind == "token":
            logprobs = [(event["logprob"], event["top_logprobs"])] if "logprob" in event else None
            text = stream.push([event["token"]]) if stream is not None else ""
            chunks = [_sse(openai_api.chunk_body(completion_id, self.model_name, index, [event["token"]], None,
                                                 logprobs, request, text, first))]
            if getattr(stream, "hit", False):
                chunks.append(_sse(openai_api.chunk_body(completion_id, self.model_name, index, [], "stop", None,
                                                         request)))
            return chunks
        if kind == "finished":
            text = stream.finish() if stream is not None else ""
            reason = "stop" if getattr(stream, "hit", False) else event["finish_reason"]
            return [_sse(openai_api.chunk_body(completion_id, self.model_name, index, [], reason, None, request,
                                               text, first))]
        if kind == "error":
            return [_sse(openai_api.error_body(event["status"], event["error"]))]
        return []  # admitted

    # -- membership (lamina_comm.node.membership) ---------------------------------
    async def join(self, request: Request) -> JSONResponse:
        return await self._membership_call(request, self.service.join)

    async def leave(self, request: Request) -> JSONResponse:
        return await self._membership_call(request, self.service.leave)

    async def _membership_call(self, request: Request, action: Callable[[str], dict[str, Any]]) -> JSONResponse:
        body = await request.body()
        try:
            address = membership.parse_call(body or None, request.headers.get(membership.SIGNATURE_HEADER),
                                            self.service.membership_secret, seen=self.service.membership_replays)
            answer = await run_in_threadpool(action, address)
        except membership.MembershipError as exc:
            return _json(exc.http_status, {"error": str(exc)})
        except KeyError as exc:
            return _json(HTTPStatus.NOT_FOUND, {"error": str(exc.args[0])})
        except ValueError as exc:
            return _json(HTTPStatus.CONFLICT, {"error": str(exc)})
        return _json(HTTPStatus.OK, answer)


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
