"""Hostile input at the model node's front door and scheduler (issue 9, defects 1, 5, 6, 11).

Framing, backlog and JSON-depth tests run the front door over a stand-in
service (no attention tier). Scheduler tests run a real model node over one
attention process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import select
import socket
import threading
import time
from typing import Any, Iterator, Optional

import pytest
import torch

from lamina_comm.model import SamplingParams
from lamina_comm.node.http_api import FrontDoor
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.model_node import ModelNode
from lamina_comm.node.requests import RequestHandle
from tests.node.test_disaggregated import address, attention_nodes, greedy, make_node, prompt_of, reference_tokens

HANG_GUARD_S = 60.0  # bound on waits for things that take milliseconds when the code is right


# ------------------------------------------------------------------ a raw HTTP/1.1 client


class RawConnection:
    """One kept-alive connection, bytes in and responses out, exactly as the server framed them."""

    def __init__(self, front: tuple[str, int]):
        self.sock = socket.create_connection(front, timeout=HANG_GUARD_S)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of the next response."""
        status_line = self.reader.readline()
        assert status_line, "the server closed the connection instead of answering"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.reader.readline().decode()) not in ("\r\n", "\n", ""):
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            return status, headers, self._chunks()
        if "content-length" not in headers and headers.get("connection") == "close":
            return status, headers, self.reader.read()  # the body runs to the end of the connection
        body = self.reader.read(int(headers.get("content-length", "0")))
        return status, headers, body

    def _chunks(self) -> bytes:
        body = b""
        while size := int(self.reader.readline().split(b";")[0], 16):
            body += self.reader.read(size)
            self.reader.readline()
        self.reader.readline()  # the empty trailer section
        return body

    def closed_by_server(self) -> bool:
        """True when the server has closed its side (EOF), False when it is still open and silent."""
        self.sock.settimeout(1.0)
        try:
            return self.reader.read(1) == b""
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(HANG_GUARD_S)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> "RawConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_request(method: str, path: str, body: bytes = b"", headers: Optional[dict[str, str]] = None,
                 frame: bool = True) -> bytes:
    """Request bytes; ``frame``: add the Content-Length of ``body`` (of a POST or a non-empty body)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    fields = {"Content-Length": str(len(body))} if frame and (body or method == "POST") else {}
    fields.update(headers or {})
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def generate_body(max_tokens: int = 3, **fields: Any) -> bytes:
    return json.dumps({"prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0, **fields}).encode()


# ------------------------------------------------------------------ a stand-in service


class RecordingService:
    """Answers every request at once with tokens 0..max_tokens-1, and records what was submitted."""

    def __init__(self) -> None:
        self.metrics = NodeMetrics()
        self.submitted: list[list[int]] = []
        self._ids = 0

    def unhealthy_reason(self) -> Optional[str]:
        return None

    @property
    def healthy(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"role": "model"}

    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        self.submitted.append(list(prompt))
        self._ids += 1
        handle = RequestHandle(self._ids, len(prompt))
        handle._emit({"event": "admitted"})
        for token in range(params.max_tokens):
            handle._emit({"event": "token", "token": token})
        handle._emit({"event": "finished", "finish_reason": "length"})
        return handle


@pytest.fixture
def service() -> RecordingService:
    return RecordingService()


@pytest.fixture
def front(service: RecordingService) -> Iterator[tuple[str, int]]:
    door = FrontDoor(service, ("127.0.0.1", 0), request_timeout=HANG_GUARD_S)
    door.start()
    yield door.address
    door.close()


@pytest.fixture
def conn(front: tuple[str, int]) -> Iterator[RawConnection]:
    connection = RawConnection(front)
    yield connection
    connection.close()


# ------------------------------------------------------------------ 6: request framing and smuggling


def test_a_body_sent_to_a_405_is_not_run_as_the_next_request(service: RecordingService,
                                                              conn: RawConnection) -> None:
    smuggled = http_request("POST", "/generate", generate_body())
    conn.send(http_request("POST", "/healthz", smuggled))
    status, headers, _ = conn.response()
    assert status == 405 and headers["allow"] == "GET"
    conn.send(http_request("GET", "/healthz"))  # the connection is still in step: this is the next answer
    status, _, body = conn.response()
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert service.submitted == [], "the body of the refused request was run as a generation"


def test_a_404_on_a_kept_alive_connection_is_followed_by_a_real_request(service: RecordingService,
                                                                        conn: RawConnection) -> None:
    conn.send(http_request("POST", "/nowhere", generate_body()))
    assert conn.response()[0] == 404
    conn.send(http_request("POST", "/generate", generate_body(max_tokens=4)))
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["tokens"] == [0, 1, 2, 3]
    assert service.submitted == [[1, 2, 3]]


def test_a_get_with_a_body_consumes_it(service: RecordingService, conn: RawConnection) -> None:
    conn.send(http_request("GET", "/status", http_request("POST", "/generate", generate_body())))
    assert conn.response()[0] == 200
    conn.send(http_request("GET", "/healthz"))
    assert conn.response()[0] == 200
    assert service.submitted == []


# Framing the server cannot trust: h11 refuses it (a plain-text 400), or the body limit does (a JSON 413).
UNFRAMEABLE = [
    ({"Transfer-Encoding": "chunked"}, 400, None),  # the "chunks" that follow are the smuggled request
    ({"Content-Length": "20", "Transfer-Encoding": "chunked"}, 400, None),
    ({"Transfer-Encoding": "gzip"}, 400, None),
    ({"Content-Length": "+20"}, 400, None),
    ({"Content-Length": "2_0"}, 400, None),
    ({"Content-Length": "20, 21"}, 400, None),
    ({"Content-Length": str(2 << 20)}, 413, "over the 1048576-byte limit"),
    ({"Content-Length": "9" * 5000}, 400, None),
]


@pytest.mark.parametrize("path", ["/generate", "/healthz"])
@pytest.mark.parametrize("headers,status,reason", UNFRAMEABLE,
                         ids=["chunked", "length-and-chunked", "gzip", "plus", "underscore", "two-lengths",
                              "2MiB", "5000-digits"])
def test_unframeable_bodies_are_refused_and_the_connection_closed(
        service: RecordingService, conn: RawConnection, path: str, headers: dict[str, str], status: int,
        reason: Optional[str]) -> None:
    smuggled = http_request("POST", "/generate", generate_body())
    conn.send(http_request("POST", path, headers=headers, frame=False) + smuggled)
    got, answer_headers, body = conn.response()
    assert got == status, body
    if reason is not None:
        assert reason in json.loads(body)["error"]
    assert answer_headers.get("connection") == "close"
    assert conn.closed_by_server()
    assert service.submitted == []


def test_a_chunked_body_is_read_and_the_next_request_follows(service: RecordingService,
                                                             conn: RawConnection) -> None:
    body = generate_body()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:5], body[5:])) + b"0\r\n\r\n"
    conn.send(b"POST /generate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert conn.response()[0] == 200
    conn.send(http_request("GET", "/healthz"))
    assert conn.response()[0] == 200
    assert service.submitted == [[1, 2, 3]]


def test_duplicate_equal_content_lengths_are_one_length(service: RecordingService, conn: RawConnection) -> None:
    body = generate_body()
    conn.send(f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert conn.response()[0] == 200


def test_a_generate_without_a_body_is_a_400_and_the_next_request_follows(service: RecordingService,
                                                                         conn: RawConnection) -> None:
    conn.send(b"POST /generate HTTP/1.1\r\nHost: t\r\n\r\n" + http_request("POST", "/generate", generate_body()))
    status, _, answer = conn.response()
    assert status == 400 and "a JSON body is required" in json.loads(answer)["error"]
    assert conn.response()[0] == 200  # a body-less request is framed (length 0): the next one is a request
    assert service.submitted == [[1, 2, 3]]


def test_a_malformed_header_name_is_refused(service: RecordingService, conn: RawConnection) -> None:
    # A proxy that reads this as Transfer-Encoding would frame the body differently from us.
    body = http_request("POST", "/generate", generate_body())
    conn.send(f"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
              f"Transfer-Encoding\x0b: chunked\r\n\r\n".encode() + body)
    status, _, answer = conn.response()
    assert status == 400  # h11 refuses the header section
    assert conn.closed_by_server() and service.submitted == []


# ------------------------------------------------------------------ slow and idle clients

GUARD_S = 0.5  # header and body timeouts of the doors below


@pytest.fixture
def guarded(service: RecordingService) -> Iterator[FrontDoor]:
    door = FrontDoor(service, ("127.0.0.1", 0), request_timeout=HANG_GUARD_S, header_timeout=GUARD_S,
                     body_timeout=GUARD_S)
    door.start()
    yield door
    door.close()


def closes_within(conn: RawConnection, seconds: float) -> bool:
    """True when the server closes the connection (without answering) within ``seconds``."""
    conn.sock.settimeout(seconds)
    try:
        return conn.reader.read(1) == b""
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "], ids=["nothing", "half"])
def test_a_client_that_does_not_finish_its_headers_is_closed(guarded: FrontDoor, sent: bytes) -> None:
    slow = RawConnection(guarded.address)
    try:
        slow.send(sent)
        started = time.monotonic()
        assert closes_within(slow, HANG_GUARD_S), "the server kept a connection with no request open"
        assert time.monotonic() - started < GUARD_S + 5
        with RawConnection(guarded.address) as fresh:  # and a prompt client is served
            fresh.send(http_request("GET", "/healthz"))
            assert fresh.response()[0] == 200
    finally:
        slow.close()


def test_a_body_that_stalls_gets_408_and_a_close(service: RecordingService, guarded: FrontDoor) -> None:
    with RawConnection(guarded.address) as conn:
        conn.send(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"prompt\": [1")
        status, headers, body = conn.response()
        assert status == 408 and "did not arrive within" in json.loads(body)["error"]
        assert headers.get("connection") == "close" and conn.closed_by_server()
    assert service.submitted == []


def test_connections_past_the_limit_get_503_until_some_close(service: RecordingService) -> None:
    def healthz_status() -> int:
        with RawConnection(door.address) as conn:
            conn.send(http_request("GET", "/healthz"))
            return conn.response()[0]

    def eventually(status: int) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while healthz_status() != status:  # the server takes connections and closes at its own pace
            assert time.monotonic() < deadline, f"never answered {status}"
            time.sleep(0.05)

    with FrontDoor(service, ("127.0.0.1", 0), max_connections=4) as door:
        idle = [RawConnection(door.address) for _ in range(4)]
        try:
            eventually(503)
        finally:
            for conn in idle:
                conn.close()
        eventually(200)


def test_the_api_is_described_with_its_schemas(conn: RawConnection) -> None:
    conn.send(http_request("GET", "/openapi.json"))
    status, _, body = conn.response()
    document = json.loads(body)
    assert status == 200 and {"/generate", "/v1/completions", "/v1/chat/completions"} <= set(document["paths"])
    completion = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert {"prompt", "max_tokens", "n", "logprobs", "stream"} <= set(completion["schema"]["properties"])


# ------------------------------------------------------------------ 11: deep JSON


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
], ids=["array", "prompt", "object"])
def test_deeply_nested_json_is_a_400(service: RecordingService, conn: RawConnection, body: bytes) -> None:
    conn.send(http_request("POST", "/generate", body))
    status, _, answer = conn.response()
    assert status == 400 and "not valid JSON: recursion limit exceeded" in json.loads(answer)["error"]
    conn.send(http_request("POST", "/generate", generate_body()))  # and the connection still serves
    assert conn.response()[0] == 200


def test_brackets_inside_strings_do_not_count_as_nesting(conn: RawConnection) -> None:
    conn.send(http_request("POST", "/generate", json.dumps({"prompt": [1], "bogus": "[" * 1000}).encode()))
    status, _, answer = conn.response()
    assert status == 400 and "unknown fields ['bogus']" in json.loads(answer)["error"]


# ------------------------------------------------------------------ 1: sampling parameters at the door


@pytest.mark.parametrize("field,text,reason", [
    ("temperature", "1" + "0" * 400, "temperature must be finite and >= 0"),
    ("top_p", "1" + "0" * 400, "top_p must be in (0, 1]"),
    ("temperature", "1e999", "temperature must be finite and >= 0"),
    ("top_p", "NaN", "top_p must be in (0, 1]"),
    ("temperature", "-Infinity", "temperature must be finite and >= 0"),
])
def test_out_of_range_numbers_are_a_400_not_a_500(service: RecordingService, conn: RawConnection,
                                                  field: str, text: str, reason: str) -> None:
    conn.send(http_request("POST", "/generate", f'{{"prompt": [1], "{field}": {text}}}'.encode()))
    status, _, answer = conn.response()
    assert status == 400 and reason in json.loads(answer)["error"]
    assert len(json.loads(answer)["error"]) < 200  # the value is shown cut short
    assert service.submitted == []


# ------------------------------------------------------------------ 5: listen backlog


def test_a_burst_of_64_connections_is_queued_and_answered(service: RecordingService) -> None:
    door = FrontDoor(service, ("127.0.0.1", 0), request_timeout=HANG_GUARD_S)
    clients = [socket.socket() for _ in range(64)]
    try:
        # The accept loop is not running yet: every handshake must complete into the listen queue.
        for client in clients:
            client.setblocking(False)
            client.connect_ex(door.address)
        pending = set(clients)
        deadline = time.monotonic() + 20.0
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], 0.5)
            pending -= set(writable)
        assert not pending, f"{len(pending)} of 64 connections found no room in the listen queue"
        assert all(c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for c in clients)
        door.start()
        for client in clients:
            client.setblocking(True)
            client.settimeout(HANG_GUARD_S)
            client.sendall(http_request("GET", "/healthz", headers={"Connection": "close"}))
        answers = [client.makefile("rb").readline() for client in clients]
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
    finally:
        for client in clients:
            client.close()
        door.close()


def test_the_backlog_is_an_option(service: RecordingService) -> None:
    door = FrontDoor(service, ("127.0.0.1", 0), listen_backlog=7)
    try:
        assert door.listen_backlog == 7
    finally:
        door.close()
    with pytest.raises(ValueError, match="listen_backlog must be >= 1"):
        FrontDoor(service, ("127.0.0.1", 0), listen_backlog=0)


# ------------------------------------------------------------------ a real model node

STALL_TIMEOUT_S = 1.0  # the stall test's bound: its deliberate stall is reported after this


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[tuple[str, int], ModelNode]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = attention_nodes(1, "--config", "tiny", "--blocks", "160")
    node = make_node([address(w) for w in workers])
    node.start()
    door = FrontDoor(node, ("127.0.0.1", 0), request_timeout=HANG_GUARD_S)
    door.start()
    yield door.address, node
    node.close()
    door.close()
    for worker in workers:
        assert worker.stop() == 0, worker.log()
        worker.close()
    torch.set_num_threads(threads)


def post(front: tuple[str, int], payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    connection = RawConnection(front)
    try:
        connection.send(http_request("POST", "/generate", json.dumps(payload).encode()))
        status, _, body = connection.response()
        return status, json.loads(body)
    finally:
        connection.close()


def get(front: tuple[str, int], path: str) -> tuple[int, dict[str, Any]]:
    connection = RawConnection(front)
    try:
        connection.send(http_request("GET", path))
        status, _, body = connection.response()
        return status, json.loads(body)
    finally:
        connection.close()


def side_by_side(front: tuple[str, int], payloads: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """The answers to requests sent at the same time."""
    answers: dict[int, tuple[int, dict[str, Any]]] = {}
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, post(front, payloads[i])))
               for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * HANG_GUARD_S)
    return [answers.get(i, (0, {"error": "no answer"})) for i in range(len(payloads))]


def wait_until_idle(node: ModelNode) -> None:
    deadline = time.monotonic() + 2 * HANG_GUARD_S
    while node.status()["running"] or node.status()["queued"] or node.status()["workers"][0]["blocks_used"]:
        assert time.monotonic() < deadline, "the node did not go idle"
        time.sleep(0.05)


def test_a_tiny_temperature_beside_a_normal_request_both_answered(
        cluster: tuple[tuple[str, int], ModelNode]) -> None:
    front, node = cluster
    normal = {"prompt": prompt_of(8), "max_tokens": 6, "temperature": 0}
    tiny = {"prompt": prompt_of(8, 1), "max_tokens": 6, "temperature": 1e-300, "seed": 5}
    (normal_status, normal_body), (tiny_status, tiny_body) = side_by_side(front, [normal, tiny])
    assert normal_status == 200, normal_body
    assert normal_body["tokens"] == reference_tokens([prompt_of(8)], [greedy(6)])[0]
    # Documented semantics: a tiny positive temperature is computed safely and tends to greedy.
    assert tiny_status == 200, tiny_body
    assert tiny_body["tokens"] == reference_tokens([prompt_of(8, 1)], [greedy(6)])[0]
    assert get(front, "/healthz") == (200, {"status": "ok"})


def test_a_sampler_failure_fails_only_that_request(cluster: tuple[tuple[str, int], ModelNode],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    front, node = cluster
    from lamina_comm.model import sampling

    real_sample_row = sampling._sample_row

    def failing_for_the_victim(logits: torch.Tensor, params: SamplingParams, generator: Any) -> torch.Tensor:
        if params.temperature == 0.75:  # the victim's marker
            raise RuntimeError("injected sampler failure")
        return real_sample_row(logits, params, generator)

    monkeypatch.setattr(sampling, "_sample_row", failing_for_the_victim)
    normal = {"prompt": prompt_of(5), "max_tokens": 5, "temperature": 0}
    victim = {"prompt": prompt_of(5, 3), "max_tokens": 5, "temperature": 0.75, "seed": 1}
    (normal_status, normal_body), (victim_status, victim_body) = side_by_side(front, [normal, victim])
    assert normal_status == 200 and normal_body["tokens"] == reference_tokens([prompt_of(5)], [greedy(5)])[0]
    assert victim_status == 500 and "injected sampler failure" in victim_body["error"]
    wait_until_idle(node)
    monkeypatch.undo()
    status, body = post(front, normal)  # and the scheduler goes on serving
    assert status == 200 and body["tokens"] == normal_body["tokens"]
    assert get(front, "/healthz") == (200, {"status": "ok"})


def test_healthz_turns_503_when_the_scheduler_stalls(cluster: tuple[tuple[str, int], ModelNode],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    front, node = cluster
    monkeypatch.setattr(node, "options", dataclasses.replace(node.options, stall_timeout=STALL_TIMEOUT_S))
    release = threading.Event()
    real_step = node._step

    def stalled_step() -> None:
        release.wait(2 * HANG_GUARD_S)
        real_step()

    monkeypatch.setattr(node, "_step", stalled_step)
    answers: list[tuple[int, dict[str, Any]]] = []
    client = threading.Thread(target=lambda: answers.append(
        post(front, {"prompt": prompt_of(4), "max_tokens": 2, "temperature": 0})))
    client.start()
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while (health := get(front, "/healthz"))[0] == 200:
            assert time.monotonic() < deadline, "/healthz kept saying ok while the scheduler was stuck"
            time.sleep(0.1)
        status, body = health
        assert status == 503 and body["status"] == "degraded" and "no progress" in body["reason"]
    finally:
        release.set()
        client.join(HANG_GUARD_S)
    assert answers and answers[0][0] == 200
    wait_until_idle(node)
    assert get(front, "/healthz") == (200, {"status": "ok"})


def test_healthz_turns_503_when_the_scheduler_thread_is_gone(cluster: tuple[tuple[str, int], ModelNode],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    front, node = cluster
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    monkeypatch.setattr(node, "_thread", dead)
    status, body = get(front, "/healthz")
    assert status == 503 and "scheduler thread stopped" in body["reason"]


GONE_CLIENT_MAX_TOKENS = 1500


@contextlib.contextmanager
def client_that_leaves(cluster: tuple[tuple[str, int], ModelNode]) -> Iterator[RawConnection]:
    """A connection the body starts a long request on and that is then closed: the request must be
    cancelled (counted) and stop generating long before its GONE_CLIENT_MAX_TOKENS."""
    front, node = cluster
    generated_before = node.metrics.generated_tokens.value()
    cancelled_before = node.metrics.requests.value(outcome="cancelled")
    connection = RawConnection(front)
    try:
        yield connection
    finally:
        connection.close()
    wait_until_idle(node)
    generated = node.metrics.generated_tokens.value() - generated_before
    assert generated < GONE_CLIENT_MAX_TOKENS // 2, \
        f"{generated} of {GONE_CLIENT_MAX_TOKENS} tokens were generated for a gone client"
    assert node.metrics.requests.value(outcome="cancelled") == cancelled_before + 1


def test_a_non_streaming_client_that_disconnects_is_cancelled(cluster: tuple[tuple[str, int], ModelNode]) -> None:
    node = cluster[1]
    with client_that_leaves(cluster) as connection:
        generated_before = node.metrics.generated_tokens.value()
        connection.send(http_request("POST", "/generate", json.dumps(
            {"prompt": prompt_of(10), "max_tokens": GONE_CLIENT_MAX_TOKENS, "temperature": 0}).encode()))
        deadline = time.monotonic() + HANG_GUARD_S
        while node.metrics.generated_tokens.value() == generated_before:  # admitted and generating
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)


def test_a_streaming_client_that_disconnects_mid_stream_is_cancelled(
        cluster: tuple[tuple[str, int], ModelNode]) -> None:
    with client_that_leaves(cluster) as connection:
        connection.send(http_request("POST", "/v1/completions", json.dumps(
            {"model": "lamina", "prompt": prompt_of(10), "max_tokens": GONE_CLIENT_MAX_TOKENS, "temperature": 0,
             "stream": True}).encode()))
        status_line = connection.reader.readline()
        assert b" 200 " in status_line
        while b"data:" not in connection.reader.readline():  # headers, then the first token's event
            pass


def test_200_idle_connections_do_not_keep_a_real_request_out(cluster: tuple[tuple[str, int], ModelNode]) -> None:
    front, _ = cluster
    idle = []
    try:
        for _ in range(200):  # connected, and silent: no request line
            idle.append(socket.create_connection(front, timeout=HANG_GUARD_S))
        status, body = post(front, {"prompt": prompt_of(5), "max_tokens": 3, "temperature": 0})
        assert status == 200 and len(body["tokens"]) == 3
        assert get(front, "/healthz")[0] == 200
    finally:
        for sock in idle:
            sock.close()
