"""Sessions between the model node and the attention nodes under hostile inputs and faults (issue 9).

Defect 4: a control reply larger than a slot (a reserve for ~700 requests on a
full KV cache) made the attention node end its own session, the model node
reconnect and retry forever, and the degraded timer restart on every
reconnect. Defect 10: a hung (SIGSTOPped) model node held the attention tier,
and a new model node failed with "handshake timed out".

Waits below are hang guards, not timing thresholds: what should take
milliseconds is given tens of seconds.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Iterator

import numpy as np
import pytest

from lamina_comm.channel import Channel
from lamina_comm.errors import LaminaError, PeerLostError
from lamina_comm.node import protocol
from lamina_comm.node.demo import NodeProcess, post_json, start_model
from lamina_comm.node.cluster import AttentionPeer, WorkerLost
from lamina_comm.node.model_node import ModelNode
from lamina_comm.node.requests import RequestRejected
from lamina_comm.transport import Context
from tests.node.test_disaggregated import (CONFIG, address, attention_nodes, greedy, make_node, prompt_of,
                                           reference_tokens, run_until_done)
from tests.test_channel import open_pair

HANG_GUARD_S = 60.0


# The attention processes share the CPUs: torch's thread pool would spin against them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start_workers(processes: list[NodeProcess], count: int, *extra: str) -> list[NodeProcess]:
    nodes = attention_nodes(count, *extra)
    processes.extend(nodes)
    return nodes


def run_until(node: ModelNode, done: Any, what: str, guard_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + guard_s
    while not done():
        assert time.monotonic() < deadline, f"{what} within {guard_s} s (hang guard)"
        node.run_once(wait=0.05)


# ------------------------------------------------------------------ defect 4 (a): control framing


@pytest.fixture
def control_pair() -> Iterator[tuple[protocol.ControlLink, protocol.ControlLink]]:
    """(model side, attention side) control links on the control micro-batch of a data channel."""
    spec = protocol.data_channel_spec(CONFIG, (0, 1), microbatches=2, max_tokens=16)
    with Context("tcp") as model_ctx, Context("tcp") as attention_ctx:
        model, attention = open_pair(model_ctx, attention_ctx, spec)
        mb = protocol.control_microbatch(spec)
        try:
            yield protocol.ControlLink(model, 20.0, mb), protocol.ControlLink(attention, 20.0, mb)
        finally:
            model.close()
            attention.close()


def serve_in_thread(link: protocol.ControlLink, answer_of: Any, count: int = 1) -> threading.Thread:
    """Answer ``count`` requests on ``link`` with ``answer_of(request)``; errors land in thread.errors."""
    def serve() -> None:
        try:
            for _ in range(count):
                number, request = link.receive(20.0)
                link.reply(number, answer_of(request))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            thread.errors.append(exc)  # type: ignore[attr-defined]

    thread = threading.Thread(target=serve, daemon=True)
    thread.errors = []  # type: ignore[attr-defined]
    thread.start()
    return thread


def joined(thread: threading.Thread) -> None:
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "the serving side hung"
    assert not thread.errors, thread.errors  # type: ignore[attr-defined]


def test_control_messages_larger_than_a_slot_round_trip(
        control_pair: tuple[protocol.ControlLink, protocol.ControlLink]) -> None:
    model, attention = control_pair
    slot = model.channel.spec.response_bytes
    big_reply = {"ok": True, "refused": [[i, "x" * 120] for i in range(3000)]}  # about 3 slots
    big_request = {"type": "reserve", "requests": [[i, 10 ** 6] for i in range(20000)]}
    assert len(protocol.encode_json(big_reply)) > slot and len(protocol.encode_json(big_request)) > slot
    thread = serve_in_thread(attention, lambda request: big_reply if request["type"] == "reserve" else
                             {"ok": True, "echo": request}, count=2)
    assert model.call(big_request) == big_reply
    assert model.call({"type": "status"}) == {"ok": True, "echo": {"type": "status"}}  # still in step
    joined(thread)


def test_a_reply_over_the_hard_bound_becomes_an_error_reply_and_the_link_goes_on(
        control_pair: tuple[protocol.ControlLink, protocol.ControlLink]) -> None:
    model, attention = control_pair
    huge = "y" * (protocol.CONTROL_MAX_MESSAGE_BYTES + 1)
    thread = serve_in_thread(attention, lambda request: {"ok": True, "blob": huge} if request["type"] == "huge"
                             else {"ok": True}, count=2)
    with pytest.raises(protocol.ControlError) as refused:
        model.call({"type": "huge"})
    assert refused.value.code == "too_large" and "does not fit" in str(refused.value)
    assert model.call({"type": "status"}) == {"ok": True}
    joined(thread)


def test_a_request_over_the_hard_bound_is_refused_before_anything_is_sent(
        control_pair: tuple[protocol.ControlLink, protocol.ControlLink]) -> None:
    model, attention = control_pair
    sent_before = model.channel.metrics.messages
    with pytest.raises(protocol.ControlMessageTooLarge, match="exceeds the .* B bound"):
        model.call({"type": "reserve", "blob": "z" * protocol.CONTROL_MAX_MESSAGE_BYTES})
    assert model.channel.metrics.messages == sent_before
    thread = serve_in_thread(attention, lambda request: {"ok": True})
    assert model.call({"type": "status"}) == {"ok": True}
    joined(thread)


def test_a_malformed_control_message_gets_an_error_reply(
        control_pair: tuple[protocol.ControlLink, protocol.ControlLink]) -> None:
    model, attention = control_pair
    mb = model.microbatch
    model.channel.send([np.frombuffer(b'{"type": "status"}', dtype=np.uint8)], layer=7, microbatch=mb)
    first = attention.channel.recv(microbatch=mb, timeout=20.0)
    with pytest.raises(protocol.ControlError) as bad:
        attention.read_request(first)
    assert bad.value.code == "bad_request" and "malformed control message" in str(bad.value)


# ------------------------------------------------------------------ defect 4: end to end

MANY_REQUESTS = 700


def test_a_reserve_for_700_requests_on_a_full_cache_is_answered_without_losing_the_worker(
        processes: list[NodeProcess]) -> None:
    """Every refusal's reason travels back: the reply (~90 KB) is larger than a 64 KiB slot."""
    worker = start_workers(processes, 1, "--blocks", "8", "--block-size", "16")[0]
    node = make_node([address(worker)], max_queue=MANY_REQUESTS + 10)
    try:
        pid = node.status()["workers"][0]["pid"]
        handles = [node.submit(prompt_of(4, i), greedy(200)) for i in range(MANY_REQUESTS)]  # 13 blocks each
        run_until_done(node, handles, limit=20)
        for handle in handles:
            with pytest.raises(RequestRejected, match="KV cache full") as refused:
                handle.result(0)
            assert refused.value.http_status == 503
        assert node.metrics.worker_failures.value(peer=address(worker)) == 0
        assert node.metrics.rebuilds.value() == 0 and node.healthy
        assert node.status()["workers"][0]["pid"] == pid and node.status()["workers"][0]["blocks_used"] == 0

        fits = node.submit(prompt_of(5), greedy(4))
        run_until_done(node, [fits])
        assert fits.result(0)["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
    finally:
        node.close()


# ------------------------------------------------------------------ defect 4 (b): a refusal is not a loss


def test_a_worker_refusing_a_reserve_fails_the_batch_without_a_reconnect(
        processes: list[NodeProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = start_workers(processes, 2)
    node = make_node([address(first), address(second)])
    try:
        # The workers cannot parse this request list: they answer with an error.
        monkeypatch.setattr(protocol, "reservation_list", lambda requests: "not a list of pairs")
        handles = [node.submit(prompt_of(4, i), greedy(3)) for i in range(3)]
        run_until_done(node, handles, limit=20)
        for handle in handles:
            with pytest.raises(RequestRejected, match="refused the reserve: malformed request list"):
                handle.result(0)
        assert node.metrics.worker_failures.value(peer=address(first)) == 0
        assert node.metrics.worker_failures.value(peer=address(second)) == 0
        monkeypatch.undo()
        again = node.submit(prompt_of(6), greedy(3))
        run_until_done(node, [again])
        assert again.result(0)["tokens"] == reference_tokens([prompt_of(6)], [greedy(3)])[0]
        assert [w["blocks_used"] for w in node.status()["workers"]] == [0, 0]
    finally:
        node.close()


# ------------------------------------------------------------------ defect 4 (c): flapping ends


def test_a_worker_lost_on_every_retry_ends_in_a_503_after_the_rebuild_timeout(
        processes: list[NodeProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker reconnects fine but is lost again on the same batch: the degraded clock keeps running."""
    worker = start_workers(processes, 1)[0]
    node = make_node([address(worker)], rebuild_timeout=5.0)
    genuine_call = AttentionPeer.call

    def hang_up_on_reserve(peer: AttentionPeer, message: dict[str, Any]) -> dict[str, Any]:
        if message["type"] == "reserve":
            raise WorkerLost(peer.index, peer.address, LaminaError("injected: hung up on reserve"))
        return genuine_call(peer, message)

    try:
        monkeypatch.setattr(AttentionPeer, "call", hang_up_on_reserve)
        handle = node.submit(prompt_of(4), greedy(3))
        run_until(node, lambda: handle.done, "the flapping request was never answered")
        # Either "did not recover" (it was up at that moment) or "no replacement" (it was reconnecting).
        with pytest.raises(RequestRejected, match="within 5.0 s") as failed:
            handle.result(0)
        assert failed.value.http_status == 503 and "injected: hung up on reserve" in str(failed.value)
        assert node.metrics.worker_failures.value(peer=address(worker)) >= 2, "it did not flap"
        with pytest.raises(RequestRejected, match="attention tier unavailable") as refused:
            node.submit(prompt_of(3), greedy(2))
        assert refused.value.http_status == 503

        monkeypatch.undo()  # the worker behaves again: the first heartbeat it answers ends the degraded period
        run_until(node, lambda: node.healthy, "the node never became healthy again")
        again = node.submit(prompt_of(6), greedy(3))
        run_until_done(node, [again])
        assert again.result(0)["tokens"] == reference_tokens([prompt_of(6)], [greedy(3)])[0]
    finally:
        node.close()


# ------------------------------------------------------------------ defect 10: session liveness

TAKEOVER_S = "3"  # the attention node's --peer-timeout: silence after which a newcomer takes over


def test_a_new_model_node_takes_over_from_a_hung_one(processes: list[NodeProcess]) -> None:
    worker = start_workers(processes, 1, "--peer-timeout", TAKEOVER_S, "--max-model-nodes", "1")[0]
    hung = start_model([address(worker)], "--config", "tiny", "--transport", "tcp")
    processes.append(hung)
    hung.wait_ready()
    hung.proc.send_signal(signal.SIGSTOP)  # its TCP connections stay open

    fresh = start_model([address(worker)], "--config", "tiny", "--transport", "tcp", "--connect-timeout", "30")
    processes.append(fresh)
    fresh.wait_ready(timeout=HANG_GUARD_S)
    status, body = post_json(fresh.ready["http"], "/generate", {"prompt": prompt_of(5), "max_tokens": 4,
                                                               "temperature": 0}, timeout=HANG_GUARD_S)
    assert status == 200, body
    assert body["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
    assert "takes over" in worker.log()


def test_an_idle_healthy_model_node_keeps_its_session_and_a_newcomer_hears_busy(
        processes: list[NodeProcess]) -> None:
    worker = start_workers(processes, 1, "--peer-timeout", "2", "--max-model-nodes", "1")[0]
    node = make_node([address(worker)])
    node.start()  # the scheduler thread heartbeats while idle
    try:
        time.sleep(6.0)  # idle for three takeover bounds
        with pytest.raises(protocol.ControlError, match="busy with another model node") as busy:
            make_node([address(worker)], connect_timeout=3.0)
        assert busy.value.code == "busy" and address(worker) in str(busy.value)

        handle = node.submit(prompt_of(5), greedy(4))
        assert handle.result(HANG_GUARD_S)["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
        assert node.metrics.worker_failures.value(peer=address(worker)) == 0 and node.healthy
    finally:
        node.close()


def test_a_newcomer_that_never_sends_setup_is_dropped_and_the_session_goes_on(
        processes: list[NodeProcess]) -> None:
    worker = start_workers(processes, 1, "--peer-timeout", "2")[0]
    node = make_node([address(worker)])
    node.start()
    try:
        with Context("tcp") as ctx:
            # Authenticates (no secret in tests), is accepted, then says nothing.
            silent = Channel.connect(ctx, address(worker), protocol.CONTROL_SPEC, role="model",
                                     connect_timeout=20.0, timeout=HANG_GUARD_S)
            try:
                with pytest.raises(PeerLostError):
                    silent.recv(timeout=HANG_GUARD_S)  # the worker hangs up on it after NEWCOMER_TIMEOUT_S
            finally:
                silent.close()
        handle = node.submit(prompt_of(5), greedy(4))
        assert handle.result(HANG_GUARD_S)["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
        assert node.metrics.worker_failures.value(peer=address(worker)) == 0
    finally:
        node.close()
