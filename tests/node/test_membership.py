"""Run-time membership: workers join a running cluster (POST /cluster/join, lamina-node --join) and leave it."""
from __future__ import annotations

import http.client as http_client
import json
import time

import pytest

from lamina_comm.node import membership
from lamina_comm.node.demo import NodeProcess, post_json, start_attention
from lamina_comm.node.http_api import FrontDoor
from lamina_comm.node.model_node import ModelNode
from tests.node.test_disaggregated import address, greedy, make_node, prompt_of, reference_tokens
from tests.node.test_faults import start

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GUARD_S = 60.0
SECRET = b"s3cret"


# ------------------------------------------------------------------ the call itself


def signed(payload: dict, secret: bytes = SECRET) -> tuple[bytes, str]:
    body = json.dumps(payload).encode()
    return body, membership.signature(secret, body)


def test_a_signed_fresh_call_is_taken() -> None:
    body, signature = signed({"address": "10.0.0.7:5000", "time": time.time()})
    assert membership.parse_call(body, signature, SECRET) == "10.0.0.7:5000"
    assert membership.parse_call(b'{"address": "worker-3.local:5000"}', None, None) == "worker-3.local:5000"


@pytest.mark.parametrize("body, signature, status, match", [
    (b'{"address": "h:1", "time": 0}', None, 401, "X-Lamina-Signature"),
    (b'{"address": "h:1", "time": 0}', "00" * 32, 401, "X-Lamina-Signature"),
    (*signed({"address": "h:1"}), 401, "time"),
    (*signed({"address": "h:1", "time": time.time() - 3600}), 401, "time"),
    (*signed({"address": "h:1", "time": True}), 401, "time"),
    (*signed({"address": "h:1", "time": time.time()}, b"other"), 401, "X-Lamina-Signature"),
    (None, None, 400, "body"),
])
def test_unsigned_stale_or_forged_calls_are_refused(body, signature, status, match) -> None:
    with pytest.raises(membership.MembershipError, match=match) as refused:
        membership.parse_call(body, signature, SECRET)
    assert refused.value.http_status == status


@pytest.mark.parametrize("value", [None, 5, "", "host", ":80", "host:0", "host:65536", "host:8o", "a b:1",
                                   "h/../x:1", "x" * 300 + ":1", "[::1]:5", "a" * 64 + ":9000", "a..b:1",
                                   "host:\u00b2", "h\u00e9:1", ".h:1"])
def test_malformed_addresses_are_refused(value) -> None:
    with pytest.raises(membership.MembershipError, match="HOST:PORT"):
        membership.parse_call(json.dumps({"address": value}).encode(), None, None)


def test_a_signed_call_is_taken_once() -> None:
    guard = membership.ReplayGuard()
    body, signature = signed({"address": "10.0.0.7:5000", "time": time.time()})
    assert membership.parse_call(body, signature, SECRET, seen=guard) == "10.0.0.7:5000"
    with pytest.raises(membership.MembershipError, match="replay") as replayed:
        membership.parse_call(body, signature, SECRET, seen=guard)
    assert replayed.value.http_status == 401


def test_a_leave_racing_a_replacement_does_not_take_out_the_replacement() -> None:
    from lamina_comm.errors import PeerLostError
    from lamina_comm.model import LlamaConfig
    from lamina_comm.node.cluster import AttentionCluster, WorkerLost
    from lamina_comm.node.options import ModelNodeOptions
    from lamina_comm.transport import Context

    with Context("tcp") as ctx:
        cluster = AttentionCluster(ctx, LlamaConfig.tiny(), ModelNodeOptions(
            attention=("127.0.0.1:1",), spares=("127.0.0.1:2",), transport="tcp"))
        cluster.mark_lost(WorkerLost(0, "127.0.0.1:1", PeerLostError("gone")))

        class Connected:
            def close(self) -> None:
                pass

        def connect(index: int, address: str, timeout: float) -> Connected:
            cluster.leave("127.0.0.1:1")  # the HTTP thread: the lost worker says it leaves meanwhile
            return Connected()

        cluster._connect = connect  # type: ignore[method-assign]
        assert cluster.try_replace(0) and cluster.addresses[0] == "127.0.0.1:2"
        assert cluster.take_departures() == [], "the healthy replacement was taken out"
        assert cluster.spares == [], "a worker that left came back as a spare"


# ------------------------------------------------------------------ a cluster


def serving(node: ModelNode) -> FrontDoor:
    front = FrontDoor(node, ("127.0.0.1", 0))
    node.start()
    front.start()
    return front


def http(front: FrontDoor) -> str:
    return f"{front.address[0]}:{front.address[1]}"


def test_a_worker_restarted_on_a_new_port_joins_and_the_held_requests_continue(
        processes: list[NodeProcess]) -> None:
    first, second = start(processes, 2)
    node = make_node([address(first), address(second)], rebuild_timeout=GUARD_S)
    front = serving(node)
    try:
        prompts, params = [prompt_of(4, 1), prompt_of(11, 2)], [greedy(30), greedy(25)]
        handles = [node.submit(p, q) for p, q in zip(prompts, params)]
        deadline = time.monotonic() + GUARD_S
        while not all(len(h.tokens) >= 2 for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        second.kill()  # no spare: the node holds its requests and waits
        deadline = time.monotonic() + GUARD_S
        while node.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not node.healthy and not any(h.done for h in handles)

        joiner = start_attention("joiner", "--transport", "tcp", "--join", http(front))
        processes.append(joiner)
        joiner.wait_ready()
        results = [h.result(GUARD_S)["tokens"] for h in handles]
        assert results == reference_tokens(prompts, params)
        status = node.status()
        assert status["healthy"] and status["workers"][1]["address"] == address(joiner)
        assert node.metrics.rebuilds.value() == 1
    finally:
        front.close()
        node.close()


def test_a_leaving_worker_is_taken_out_at_once_and_never_tried_again(processes: list[NodeProcess]) -> None:
    first, leaving, spare = start(processes, 3)
    node = make_node([address(first), address(leaving)])
    front = serving(node)
    try:
        answer = membership.announce(http(front), "join", address(spare))
        assert answer == {"ok": True, "address": address(spare), "as": "spare"}
        assert node.status()["spares"] == [address(spare)]
        handle = node.submit(prompt_of(6, 3), greedy(30))
        deadline = time.monotonic() + GUARD_S
        while len(handle.tokens) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

        assert membership.announce(http(front), "leave", address(leaving))["was"] == "worker"
        assert handle.result(GUARD_S)["tokens"] == reference_tokens([prompt_of(6, 3)], [greedy(30)])[0]
        status = node.status()
        assert status["workers"][1]["address"] == address(spare)
        assert status["spares"] == [], "a worker that left came back as a spare"
        assert node.metrics.worker_failures.value(peer=address(leaving)) == 0  # a departure is no failure
        assert leaving.proc.poll() is None, "the worker was killed, not left"

        with pytest.raises(membership.MembershipError, match="neither a worker nor a spare") as unknown:
            membership.announce(http(front), "leave", "127.0.0.1:9")
        assert unknown.value.http_status == 404
    finally:
        front.close()
        node.close()


def test_join_calls_are_checked_against_the_secret_and_the_spare_bound(processes: list[NodeProcess],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    worker = start(processes, 1, "--secret", SECRET.decode())[0]
    node = make_node([address(worker)], secret=SECRET.decode())
    front = serving(node)
    try:
        status, body = post_json(http(front), "/cluster/join", {"address": "127.0.0.1:7", "time": time.time()})
        assert status == 401 and "X-Lamina-Signature" in body["error"]
        connection = http_client.HTTPConnection(*front.address, timeout=GUARD_S)
        payload = json.dumps({"address": "127.0.0.1:7", "time": time.time()}).encode()
        connection.request("POST", "/cluster/join", body=payload, headers={
            membership.SIGNATURE_HEADER: "\u00e9".encode("latin-1"), "Content-Length": str(len(payload))})
        answer = connection.getresponse()
        assert answer.status == 401, "a non-ASCII signature got no answer"
        connection.close()
        with pytest.raises(membership.MembershipError, match="401"):
            membership.announce(http(front), "join", "127.0.0.1:7", secret="wrong")
        assert node.status()["spares"] == []

        monkeypatch.setattr("lamina_comm.node.cluster.MAX_SPARES", 2)
        for port in (7, 8):
            membership.announce(http(front), "join", f"127.0.0.1:{port}", secret=SECRET.decode())
        with pytest.raises(membership.MembershipError, match="2 spares already stand by") as full:
            membership.announce(http(front), "join", "127.0.0.1:9", secret=SECRET.decode())
        assert full.value.http_status == 409
        assert node.status()["spares"] == ["127.0.0.1:7", "127.0.0.1:8"]
        handle = node.submit(prompt_of(5), greedy(4))
        assert handle.result(GUARD_S)["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
    finally:
        front.close()
        node.close()
