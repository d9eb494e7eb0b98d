"""A shared attention node under hostile or broken model nodes: one session's bad input ends that
session at most, never the node or the other sessions (findings of a review of the replica work)."""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional

import numpy as np
import pytest

from lamina_comm.channel import Channel
from lamina_comm.engine.wire import ERROR_LAYER, METADATA_LAYER
from lamina_comm.model import LlamaConfig
from lamina_comm.node import protocol
from lamina_comm.node.attention_node import AttentionOptions, AttentionServer
from lamina_comm.transport import Context

CONFIG = LlamaConfig.tiny()


class Server:
    """An attention node in a thread of this process; ``error`` is whatever ended its serving thread."""

    def __init__(self, **options: Any):
        self.server = AttentionServer(AttentionOptions(listen="127.0.0.1:0", num_blocks=64, transport="tcp",
                                                       **options))
        self.address = f"{self.server.address[0]}:{self.server.address[1]}"
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever(self.stop)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    def names(self) -> list[str]:
        return [replica["name"] for replica in self.server.replicas()]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.server.close()


class RawModelNode:
    """The wire side of a model node: setup, data channel, control calls."""

    def __init__(self, ctx: Context, address: str, name: str, timeout: float = 10.0,
                 setup: Optional[dict[str, Any]] = None):
        self.spec = protocol.data_channel_spec(CONFIG, (0, CONFIG.num_kv_heads), 1, 16)
        self.setup = Channel.connect(ctx, address, protocol.CONTROL_SPEC, role="model", name="setup",
                                     connect_timeout=timeout, timeout=timeout)
        message = {**protocol.setup_message(CONFIG, 0, 1, (0, CONFIG.num_kv_heads), self.spec, name),
                   **(setup or {})}
        try:
            reply = protocol.ControlLink(self.setup, timeout).call(message)
        except BaseException:
            self.setup.close()
            raise
        self.data = Channel.connect(ctx, protocol.data_address(address, reply), self.spec, role="model", name="data",
                                    connect_timeout=timeout, timeout=timeout, piggyback_credits=True)
        self.control = protocol.ControlLink(self.data, timeout, protocol.control_microbatch(self.spec))

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.control.call(message)


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server(peer_timeout=3.0)
    yield running
    running.close()


@pytest.mark.parametrize("setup", [{"worker": float("inf")}, {"num_workers": 0}, {"kv_heads": [0, 1e400]},
                                   {"data_spec": "x"}, {"config": []}, {"replica": "\n" * 3},
                                   {"data_spec": protocol.data_channel_spec(CONFIG, (0, CONFIG.num_kv_heads), 0,
                                                                            16).to_dict()}])
def test_a_malformed_setup_is_refused_and_the_node_serves_on(server: Server, setup: dict[str, Any]) -> None:
    with Context("tcp") as ctx:
        honest = RawModelNode(ctx, server.address, "honest")
        with pytest.raises(protocol.ControlError) as refused:
            RawModelNode(ctx, server.address, "hostile", timeout=5.0, setup=setup)
        assert refused.value.code == "bad_request"
        assert server.error is None and honest.call({"type": "status"})["ok"]


@pytest.mark.parametrize("requests", [[[1, float("inf")]], [[float("nan"), 16]], [[1e400, 16]], "xx", [[1]]])
def test_a_malformed_reserve_is_answered_with_an_error_and_the_others_keep_their_blocks(
        server: Server, requests: Any) -> None:
    with Context("tcp") as ctx:
        honest = RawModelNode(ctx, server.address, "honest")
        hostile = RawModelNode(ctx, server.address, "hostile")
        assert honest.call({"type": "reserve", "requests": [[1, 16]]})["reserved"] == [1]
        with pytest.raises(protocol.ControlError, match="malformed request list"):
            hostile.call({"type": "reserve", "requests": requests})
        assert server.error is None
        assert honest.call({"type": "status"})["blocks_held"] == 1
        assert hostile.call({"type": "status"})["ok"]  # the session itself goes on


def test_a_setup_asking_for_a_huge_data_channel_is_refused(server: Server) -> None:
    with Context("tcp") as ctx:
        honest = RawModelNode(ctx, server.address, "honest")
        spec = protocol.data_channel_spec(CONFIG, (0, CONFIG.num_kv_heads), 1, 3 * 10**6)
        with pytest.raises(protocol.ControlError, match="over this worker's bound") as refused:
            RawModelNode(ctx, server.address, "hostile", timeout=5.0, setup={"data_spec": spec.to_dict()})
        assert refused.value.code == "resources"
        assert server.error is None and honest.call({"type": "status"})["ok"]


def test_half_a_control_message_holds_up_nobody_and_gets_nobody_evicted(server: Server) -> None:
    with Context("tcp") as ctx:
        honest = RawModelNode(ctx, server.address, "honest", timeout=20.0)
        hostile = RawModelNode(ctx, server.address, "hostile")
        assert honest.call({"type": "reserve", "requests": [[7, 16]]})["reserved"] == [7]
        # Fragment 0 of a two-fragment request, and nothing more.
        first = protocol.encode_fragments(b"x" * (protocol.CONTROL_SLOT_BYTES + 10))[0]
        hostile.data.send(first, layer=0, microbatch=protocol.control_microbatch(hostile.spec))
        time.sleep(0.3)
        started = time.monotonic()
        assert honest.call({"type": "status"})["ok"]
        assert time.monotonic() - started < 2.0, "the serving thread waited for the missing fragment"
        # A newcomer after the takeover bound: the honest session heartbeats, so it stays.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            honest.call({"type": "status"})
            time.sleep(0.5)
        newcomer = RawModelNode(ctx, server.address, "newcomer")
        assert newcomer.call({"type": "status"})["ok"]
        assert sorted(server.names()) == ["honest", "newcomer"], "the silent half-message sender stays, or others went"
        assert honest.call({"type": "status"})["blocks_held"] == 1


def test_a_session_waiting_behind_a_busy_thread_is_not_taken_for_silent(server: Server) -> None:
    with Context("tcp") as ctx:
        quiet = RawModelNode(ctx, server.address, "quiet", timeout=20.0)
        # The serving thread is held past the takeover bound (3 s) inside a newcomer's setup,
        # just before it looks for silent sessions; quiet's heartbeat waits, unserved, meanwhile.
        original = server.server._check_channel_size
        stalled = threading.Event()

        def slow_check(setup: protocol.Setup) -> None:
            stalled.set()
            time.sleep(3.5)
            original(setup)

        server.server._check_channel_size = slow_check  # type: ignore[method-assign]
        box: dict[str, Any] = {}
        knocking = threading.Thread(target=lambda: box.setdefault("a", _outcome(RawModelNode, ctx, server.address,
                                                                                  "a", 20.0)))
        knocking.start()
        assert stalled.wait(20), "the newcomer never reached its setup"
        box["beat"] = quiet.call({"type": "status"})  # sent during the stall, answered after it
        knocking.join(20)
        assert isinstance(box["a"], RawModelNode) and box["a"].call({"type": "status"})["ok"], box
        assert box["beat"]["ok"] and sorted(server.names()) == ["a", "quiet"], server.names()


def _outcome(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the assertion that looks at it
        return exc


def test_replica_names_stay_unique(server: Server) -> None:
    with Context("tcp") as ctx:
        kept = [RawModelNode(ctx, server.address, "same") for _ in range(2)]
        assert all(node.call({"type": "status"})["ok"] for node in kept)
        names = server.names()
        assert len(set(names)) == 2 and names[0] == "same" and names[1].startswith("same#"), names


def layer_tensors(tokens: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Zero q [T, H, D] and k (also v) [T, KV, D] of the whole model, in its wire dtype."""
    dtype = np.dtype(np.uint16) if CONFIG.dtype == "bfloat16" else np.dtype(CONFIG.dtype)
    return (np.zeros((tokens, CONFIG.num_heads, CONFIG.head_dim), dtype),
            np.zeros((tokens, CONFIG.num_kv_heads, CONFIG.head_dim), dtype))


def sessions_become(server: Server, expected: list[str], within_s: float = 5.0) -> list[str]:
    """The server's session names (sorted) once they are ``expected``, or as they stand after ``within_s``."""
    deadline = time.monotonic() + within_s
    while sorted(server.names()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(server.names())


@pytest.mark.parametrize("what", ["metadata", "scalar metadata", "tensors", "no metadata"])
def test_a_malformed_layer_message_ends_its_own_session_and_the_node_serves_on(server: Server, what: str) -> None:
    """The data channel is served by the engine's AttentionService: malformed step metadata or a layer
    message that is not [q, k, v] ends the sender's session; a layer before any metadata gets an error
    reply (the session stays); the other sessions never notice."""
    with Context("tcp") as ctx:
        honest = RawModelNode(ctx, server.address, "honest")
        hostile = RawModelNode(ctx, server.address, "hostile")
        assert honest.call({"type": "reserve", "requests": [[1, 16]]})["reserved"] == [1]
        q, k = layer_tensors()
        control = protocol.control_microbatch(hostile.spec)
        if what == "metadata":  # a table of three rows
            hostile.data.send([np.array([0]), np.zeros((3, 2), np.int64)], layer=METADATA_LAYER, microbatch=control)
        elif what == "scalar metadata":  # its micro-batch as a 0-d tensor (of size 1, but no [0])
            hostile.data.send([np.array(0), np.zeros((2, 2), np.int64)], layer=METADATA_LAYER, microbatch=control)
        elif what == "tensors":  # a layer of four tensors
            hostile.data.send([q, k, k, k], layer=0, microbatch=0)
        else:
            hostile.data.send([q, k, k], layer=0, microbatch=0)
            with hostile.data.recv(microbatch=0) as reply:
                assert reply.layer == ERROR_LAYER and b"no step metadata" in np.asarray(reply.tensors[0]).tobytes()
        expected = ["honest", "hostile"] if what == "no metadata" else ["honest"]
        assert sessions_become(server, expected) == expected
        assert server.error is None and honest.call({"type": "status"})["blocks_held"] == 1


def test_a_model_node_that_stops_taking_its_replies_ends_alone_within_the_honest_nodes_timeout() -> None:
    """A session whose replies are never taken runs out of reply credits; the one serving thread waits a
    bounded REPLY_CREDIT_S (2 s) for it, not peer_timeout (6 s here) and not twice, then ends that
    session; the honest node, calling with a 3 s timeout, is answered in time."""
    server = Server(peer_timeout=6.0)
    try:
        with Context("tcp") as ctx:
            honest = RawModelNode(ctx, server.address, "honest", timeout=3.0)
            hostile = RawModelNode(ctx, server.address, "hostile", timeout=30.0)
            assert hostile.call({"type": "reserve", "requests": [[1, 64]]})["reserved"] == [1]
            control = protocol.control_microbatch(hostile.spec)
            hostile.data.send([np.array([0]), np.array([[1, 1], [0, 1]])], layer=METADATA_LAYER, microbatch=control)
            q, k = layer_tensors()
            for layer in range(3):  # two reply slots per micro-batch: the third reply finds no credit
                hostile.data.send([q, k, k], layer=layer, microbatch=0)
            time.sleep(0.2)
            assert honest.call({"type": "status"})["ok"]  # within its 3 s: before, 2 x peer_timeout
            assert sessions_become(server, ["honest"]) == ["honest"] and server.error is None
    finally:
        server.close()
