"""The engine API (lamina_comm.engine): rendezvous, RemoteAttention, AttentionService, the docs example."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lamina_comm as lc  # noqa: E402
from lamina_comm.engine import (AttentionRankError, AttentionService, AttentionShape, RemoteAttention,  # noqa: E402
                                RendezvousError, RendezvousServer, RendezvousTimeout, rendezvous)
from tests.test_channel import open_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPE = AttentionShape(num_heads=8, num_kv_heads=4, head_dim=16, max_tokens=32, dtype="float32")
TIMEOUT_S = 30.0


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % sock.getsockname()[1]


# ------------------------------------------------------------------ rendezvous


def test_the_world_is_found_from_one_address() -> None:
    with RendezvousServer("127.0.0.1:0", model_ranks=2, attention_ranks=1, secret="k") as server:
        worlds: dict[str, Any] = {}
        ranks = [("model", 0, "m0"), ("model", 1, "m1"), ("attention", 0, "127.0.0.1:7001")]
        threads = [threading.Thread(target=lambda r=r: worlds.setdefault(f"{r[0]}{r[1]}", rendezvous(
            server.address, role=r[0], rank=r[1], world=(2, 1), advertise=r[2], secret="k", timeout=TIMEOUT_S)))
            for r in ranks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert len(worlds) == 3 and len({(w.model, w.attention) for w in worlds.values()}) == 1
    world = worlds["model0"]
    assert world.model == ("m0", "m1") and world.attention == ("127.0.0.1:7001",) and world.sizes == (2, 1)


def test_a_rendezvous_timeout_names_the_ranks_that_never_came() -> None:
    with RendezvousServer("127.0.0.1:0", model_ranks=1, attention_ranks=3) as server:
        threading.Thread(target=lambda: _quietly(rendezvous, server.address, role="attention", rank=1,
                                                 world=(1, 3), advertise="127.0.0.1:7002", timeout=3.0),
                         daemon=True).start()
        with pytest.raises(RendezvousTimeout, match="never came: attention rank 0, attention rank 2") as late:
            rendezvous(server.address, role="model", rank=0, world=(1, 3), timeout=1.5)
        assert late.value.missing == [("attention", 0), ("attention", 2)]


def test_a_wrong_secret_or_a_wrong_world_is_refused() -> None:
    with RendezvousServer("127.0.0.1:0", model_ranks=1, attention_ranks=1, secret="right") as server:
        with pytest.raises(RendezvousError, match="signature"):
            rendezvous(server.address, role="model", rank=0, world=(1, 1), secret="wrong", timeout=5.0)
        with pytest.raises(RendezvousError, match="1 model and 1 attention"):
            rendezvous(server.address, role="model", rank=0, world=(2, 1), secret="right", timeout=5.0)
        with pytest.raises(RendezvousError, match=r"rank must be in \[0, 1\)"):
            rendezvous(server.address, role="attention", rank=5, world=(1, 1), advertise="h:1", secret="right",
                       timeout=5.0)
    with pytest.raises(RendezvousTimeout, match="unreachable"):
        rendezvous(free_address(), role="model", rank=0, world=(1, 1), timeout=0.5)


def _quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except lc.LaminaError as exc:
        return exc


# ------------------------------------------------------------------ layers out and back


class Cluster:
    """``ranks`` attention services in threads answering out = 2 * q + rank, and one RemoteAttention."""

    def __init__(self, ranks: int, report_compute_time: bool = False):
        self.ctx = lc.Context("tcp")
        self.services = [AttentionService(self.ctx, SHAPE, rank=a, ranks=ranks, report_compute_time=report_compute_time)
                         for a in range(ranks)]
        self.errors: list[BaseException] = []
        self.closing = False
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.services]
        for thread in self.threads:
            thread.start()
        self.remote = RemoteAttention(self.ctx, [s.address for s in self.services], SHAPE)

    def _serve(self, service: AttentionService) -> None:
        try:
            service.accept(1, timeout=TIMEOUT_S)
            while True:
                try:
                    request = service.recv(timeout=0.2)
                except lc.TimeoutError:
                    continue
                request.output().copy_(request.q * 2 + service.rank)
                request.respond()
        except lc.ClosedError:
            pass
        except lc.PeerLostError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            if not self.closing:  # while the cluster is torn down, any end of a channel is expected
                self.errors.append(exc)

    def expected(self, q: Any) -> Any:
        out = q * 2
        for rank in range(len(self.services)):
            qs, qe = SHAPE.q_heads(rank, len(self.services))
            out[:, qs:qe] += rank
        return out

    def staged_bytes(self) -> int:
        return sum(channel.metrics.staged_bytes for channel in self.remote.channels)

    def close(self) -> None:
        self.closing = True
        self.remote.close()
        for service in self.services:
            service.close()
        for thread in self.threads:
            thread.join(TIMEOUT_S)
        self.ctx.close()
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def cluster() -> Any:
    running = Cluster(ranks=2)
    yield running
    running.close()


def test_recv_into_lands_every_ranks_heads_bit_for_bit(cluster: Cluster) -> None:
    for layer in range(3):
        for microbatch in range(SHAPE.microbatches):
            q, k, v = torch.randn(7, 8, 16), torch.randn(7, 4, 16), torch.randn(7, 4, 16)
            cluster.remote.send(q, k, v, layer=layer, microbatch=microbatch)
            out = torch.full((7, 8 * 16), float("nan"))
            assert cluster.remote.recv_into(out, layer=layer, microbatch=microbatch) is out
            assert torch.equal(out.view(7, 8, 16), cluster.expected(q))


def test_slot_buffers_go_without_a_copy_and_unregistered_slices_are_counted_as_staged(cluster: Cluster) -> None:
    q, k, v = torch.randn(5, 8, 16), torch.randn(5, 4, 16), torch.randn(5, 4, 16)
    buffers = cluster.remote.buffers(0, 5)
    buffers.scatter(q, k, v)  # a real model tier computes into them instead
    cluster.remote.send(buffers, layer=0, microbatch=0)
    out = cluster.remote.recv_into(torch.empty(5, 8, 16), layer=0, microbatch=0)
    assert torch.equal(out, cluster.expected(q)) and cluster.staged_bytes() == 0

    cluster.remote.send(q, k, v, layer=1, microbatch=0)  # strided slices of unregistered memory: copied
    cluster.remote.recv_into(out, layer=1, microbatch=0)
    assert cluster.staged_bytes() == q.nbytes + k.nbytes + v.nbytes


def test_a_fused_qkv_split_across_ranks_goes_without_a_copy(cluster: Cluster) -> None:
    tokens = 6
    # The projection's fused output, token by token q | k | v, registered once: every rank's head
    # share of q, k and v is a strided column block of it, sent as a gather list of its rows.
    fused = torch.zeros(tokens, (8 + 4 + 4) * 16)
    cluster.remote.register_source(fused)
    q, k, v = fused[:, :128].unflatten(1, (8, 16)), fused[:, 128:192].unflatten(1, (4, 16)), \
        fused[:, 192:].unflatten(1, (4, 16))
    for layer in range(3):
        fused.normal_()
        expected = cluster.expected(q.clone())
        handle = cluster.remote.send(q, k, v, layer=layer, microbatch=layer % 2)
        handle.wait(TIMEOUT_S)  # the transport has read the rows: the buffer may be written again
        fused.zero_()
        out = cluster.remote.recv_into(torch.empty(tokens, 8, 16), layer=layer, microbatch=layer % 2)
        assert torch.equal(out, expected)
    metrics = [channel.metrics for channel in cluster.remote.channels]
    assert [(m.gather_messages, m.staged_bytes, m.staged_messages) for m in metrics] == [(3, 0, 0)] * 2


def test_a_send_handle_says_when_the_writes_completed(cluster: Cluster) -> None:
    q, k, v = torch.randn(4, 8, 16), torch.randn(4, 4, 16), torch.randn(4, 4, 16)
    handle = cluster.remote.send(q, k, v, layer=0, microbatch=1)
    handle.wait(TIMEOUT_S)
    assert handle.done
    tokens = [channel.send_token() for channel in cluster.remote.channels]
    assert all(token > 0 and channel.sent(token) for token, channel in zip(tokens, cluster.remote.channels))
    cluster.remote.recv_into(torch.empty(4, 8, 16), layer=0, microbatch=1)
    later = cluster.remote.send(q, k, v, layer=1, microbatch=1)
    assert [channel.send_token() for channel in cluster.remote.channels] > tokens
    later.wait(TIMEOUT_S)
    cluster.remote.recv_into(torch.empty(4, 8, 16), layer=1, microbatch=1)


def test_bad_shapes_are_refused(cluster: Cluster) -> None:
    with pytest.raises(lc.InvalidArgumentError, match="1..32"):
        cluster.remote.buffers(0, 33)
    with pytest.raises(lc.InvalidArgumentError, match="needs all three"):
        cluster.remote.send(torch.zeros(1, 8, 16), layer=0, microbatch=0)
    with pytest.raises(ValueError, match="group evenly"):
        AttentionShape(num_heads=6, num_kv_heads=4, head_dim=8, max_tokens=4)


# ------------------------------------------------------------------ the docs example


def _doc_blocks() -> dict[str, str]:
    text = (ROOT / "docs" / "engine.md").read_text()
    blocks = re.findall(r"`(\w+\.py)`[^`]*?\n\n```python\n(.*?)```", text, re.S)
    return {name: code for name, code in blocks}


def test_the_docs_example_runs_as_written(tmp_path: Path) -> None:
    blocks = _doc_blocks()
    assert set(blocks) == {"attention.py", "model.py"}, list(blocks)
    for name, code in blocks.items():
        assert len(code.splitlines()) < 40
        (tmp_path / name).write_text(code)
    env = {**os.environ, "LAMINA_RENDEZVOUS": free_address(), "PYTHONPATH": str(ROOT)}
    attention = subprocess.Popen([sys.executable, "attention.py"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        model = subprocess.run([sys.executable, "model.py"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120)
        assert model.returncode == 0, model.stdout + model.stderr
        assert model.stdout.count("matches a local run") == 4, model.stdout
        assert attention.wait(60) == 0, attention.stdout.read() if attention.stdout else ""
    finally:
        attention.kill()
        attention.wait()


# ------------------------------------------------------------------ torch.library custom ops


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_custom_ops_are_callable_from_a_compiled_function(cluster: Cluster, backend: str) -> None:
    from lamina_comm.engine import ops

    handle = ops.register(cluster.remote)
    try:
        wq, wk, wv = torch.randn(32, 128), torch.randn(32, 64), torch.randn(32, 64)

        def layer(x: Any, step: int) -> Any:
            q, k, v = (x @ wq).view(-1, 8, 16), (x @ wk).view(-1, 4, 16), (x @ wv).view(-1, 4, 16)
            return ops.remote_attention(q, k, v, handle, layer=step, microbatch=0) * 0.5

        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        for step in range(3):
            x = torch.randn(6, 32)
            got = compiled(x, step)
            assert torch.equal(got, cluster.expected((x @ wq).view(-1, 8, 16)) * 0.5)
    finally:
        ops.unregister(handle)


def test_step_metadata_travels_on_its_own_micro_batch_and_rides_with_every_layer() -> None:
    with lc.Context("tcp") as ctx:
        services = [AttentionService(ctx, SHAPE, rank=a, ranks=2) for a in range(2)]
        seen: list[tuple[int, int, Any, Any]] = []

        def serve(service: AttentionService) -> None:
            service.accept(1, timeout=TIMEOUT_S)
            for _ in range(4):  # 2 layers x 2 micro-batches
                request = service.recv(timeout=TIMEOUT_S)
                seen.append((service.rank, request.microbatch, request.request_ids, request.positions))
                request.respond(request.q)

        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in services]
        for thread in threads:
            thread.start()
        with RemoteAttention(ctx, [s.address for s in services], SHAPE) as remote:
            remote.send_metadata(0, [7, 7, 9], [0, 1, 0])
            remote.send_metadata(1, [4], [12])
            for layer in range(2):
                for mb, tokens in ((0, 3), (1, 1)):
                    q = torch.randn(tokens, 8, 16)
                    remote.send(q, torch.randn(tokens, 4, 16), torch.randn(tokens, 4, 16), layer=layer,
                                microbatch=mb)
                    assert torch.equal(remote.recv_into(torch.empty(tokens, 8, 16), layer=layer, microbatch=mb), q)
            with pytest.raises(lc.InvalidArgumentError, match="micro-batch 2"):
                remote.send_metadata(2, [1], [0])
            with pytest.raises(lc.InvalidArgumentError, match="1 request ids and 2 positions"):
                remote.send_metadata(0, [1], [0, 1])
        for thread in threads:
            thread.join(TIMEOUT_S)
        for service in services:
            service.close()
    assert len(seen) == 8
    for rank, mb, ids, positions in seen:
        expected = ([7, 7, 9], [0, 1, 0]) if mb == 0 else ([4], [12])
        assert (ids.tolist(), positions.tolist()) == expected, (rank, mb)


def test_sources_in_a_registered_region_go_without_a_copy_and_the_handle_gates_their_reuse() -> None:
    shape = AttentionShape(num_heads=8, num_kv_heads=4, head_dim=16, max_tokens=32, dtype="float32")
    with lc.Context("tcp") as ctx, AttentionService(ctx, shape, rank=0, ranks=1) as service:
        def serve() -> None:
            service.accept(1, timeout=TIMEOUT_S)
            for _ in range(3):
                request = service.recv(timeout=TIMEOUT_S)
                request.respond(request.q)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with RemoteAttention(ctx, [service.address], shape) as remote:
            tokens = 6
            # A fused projection output: q, k, v back to back in one registered buffer.
            fused = torch.zeros(tokens * (8 + 4 + 4) * 16)
            remote.register_source(fused)
            q = fused[:tokens * 128].view(tokens, 8, 16)
            k = fused[tokens * 128:tokens * 192].view(tokens, 4, 16)
            v = fused[tokens * 192:].view(tokens, 4, 16)
            for layer in range(3):
                fused.normal_()
                sent_q = q.clone()
                handle = remote.send(q, k, v, layer=layer, microbatch=0)
                handle.wait(TIMEOUT_S)  # only now may the buffer be written again
                assert handle.done
                fused.zero_()
                assert torch.equal(remote.recv_into(torch.empty(tokens, 8, 16), layer=layer, microbatch=0), sent_q)
            channel = remote.channels[0]
            assert channel.metrics.staged_bytes == 0 and channel.metrics.messages == 3
        thread.join(TIMEOUT_S)


def test_q_k_v_registered_apart_go_without_a_copy_to_every_rank(cluster: Cluster) -> None:
    """Two ranks (a group send): each rank's heads of q, k and v are gathered from three regions."""
    q, k, v = torch.randn(6, 8, 16), torch.randn(6, 4, 16), torch.randn(6, 4, 16)
    for tensor in (q, k, v):
        cluster.remote.register_source(tensor)
    cluster.remote.send(q, k, v, layer=0, microbatch=0).wait(TIMEOUT_S)
    out = cluster.remote.recv_into(torch.empty(6, 8, 16), layer=0, microbatch=0)
    assert torch.equal(out, cluster.expected(q))
    assert cluster.staged_bytes() == 0
    assert all(channel.metrics.gather_messages == 1 for channel in cluster.remote.channels)


# ------------------------------------------------------------------ errors, in-flight replies, channels of one's own


def test_an_error_reply_names_its_rank_and_drain_puts_the_channels_back_in_step() -> None:
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    with lc.Context("tcp") as ctx:
        services = [AttentionService(ctx, SHAPE, rank=a, ranks=2, report_compute_time=True) for a in range(2)]

        def serve(service: AttentionService) -> None:
            service.accept(1, timeout=TIMEOUT_S)
            for _ in range(4):  # layer 0, layer 1 of both micro-batches, layer 2
                request = service.recv(timeout=TIMEOUT_S)
                if service.rank == 1 and request.layer == 1:
                    request.fail("no KV blocks for request 7")
                    continue
                request.output().copy_(request.q)
                request.respond(compute_ns=1000 + service.rank if request.layer == 0 else None)

        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in services]
        for thread in threads:
            thread.start()
        with RemoteAttention(ctx, [s.address for s in services], SHAPE) as remote:
            out = torch.empty(2, 8, 16)
            remote.send(q, k, v, layer=0, microbatch=0)
            assert torch.equal(remote.recv_into(out, layer=0, microbatch=0), q)
            assert [reply.compute_ns for reply in remote.replies] == [1000, 1001]
            assert all(reply.arrived_ns > 0 for reply in remote.replies)

            remote.send(q, k, v, layer=1, microbatch=0)
            remote.send(q, k, v, layer=1, microbatch=1)
            with pytest.raises(AttentionRankError, match="attention rank 1: no KV blocks for request 7") as failed:
                remote.recv_into(out, layer=1, microbatch=0)
            assert failed.value.rank == failed.value.channel_index == 1
            assert [remote.in_flight(rank) for rank in (0, 1)] == [1, 1]  # micro-batch 1's replies
            remote.drain(timeout=TIMEOUT_S)
            assert [remote.in_flight(rank) for rank in (0, 1)] == [0, 0]

            remote.send(q, k, v, layer=2, microbatch=1)  # in step: the replies taken are layer 2's
            assert torch.equal(remote.recv_into(out, layer=2, microbatch=1), q)
            assert all(reply.compute_ns is not None and reply.compute_ns >= 0 for reply in remote.replies)
        for thread in threads:
            thread.join(TIMEOUT_S)
        for service in services:
            service.close()


def test_a_send_that_fails_on_one_rank_counts_what_the_others_posted() -> None:
    tokens = 3
    fused = torch.randn(tokens, (8 + 4 + 4) * 16)  # registered: the writes go from it, no staging
    q, k, v = fused[:, :128].unflatten(1, (8, 16)), fused[:, 128:192].unflatten(1, (4, 16)), \
        fused[:, 192:].unflatten(1, (4, 16))
    with lc.Context("tcp") as ctx:
        services = [AttentionService(ctx, SHAPE, rank=a, ranks=2) for a in range(2)]
        threads = [threading.Thread(target=s.accept, args=(1, TIMEOUT_S), daemon=True) for s in services]
        for thread in threads:
            thread.start()
        with RemoteAttention(ctx, [s.address for s in services], SHAPE) as remote:
            for thread in threads:
                thread.join(TIMEOUT_S)
            remote.register_source(fused)
            for layer in range(SHAPE.slots_per_microbatch):  # rank 1's credits of micro-batch 0, spent aside
                remote.channels[1].send([q[:, 4:], k[:, 2:], v[:, 2:]], layer=layer, microbatch=0)
            with pytest.raises(lc.TimeoutError) as late:
                remote.send(q, k, v, layer=5, microbatch=0, timeout=0.3)
            assert (late.value.channel_index, late.value.channels_posted) == (1, 1)
            assert [remote.in_flight(rank) for rank in (0, 1)] == [1, 0]
            with pytest.raises(lc.TimeoutError) as no_credit:  # slot views wait for the credit: rank 1 named
                remote.buffers(0, tokens, timeout=0.2)
            assert no_credit.value.channel_index == 1
            request = services[0].recv(timeout=TIMEOUT_S)
            assert request.layer == 5 and torch.equal(request.q, q[:, :4])
            request.respond(request.q)
            remote.drain(0, timeout=TIMEOUT_S)
            assert remote.in_flight(0) == 0
        for service in services:
            service.close()


def test_channels_connected_elsewhere_are_served_through_over_and_attach() -> None:
    spec = SHAPE.channel_spec(0, 1)
    q, k, v = torch.randn(3, 8, 16), torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    with lc.Context("tcp") as ctx:
        model_side, attention_side = open_pair(ctx, ctx, spec, piggyback=True)
        controls: list[tuple[int, int, int]] = []

        def on_control(peer: int, message: Any) -> None:
            with message:
                controls.append((peer, message.layer, int(message.tensors[0][0])))

        service = AttentionService(None, SHAPE, 0, 1, listen=None, on_control=on_control)
        peer = service.attach(attention_side)
        with pytest.raises(lc.InvalidArgumentError, match=r"does not carry KV heads \[0, 2\)"):
            RemoteAttention.over([model_side], SHAPE, kv_heads=[(0, 2)])
        remote = RemoteAttention.over([model_side], SHAPE)
        model_side.send([np.array([42])], layer=5, microbatch=SHAPE.metadata_microbatch)  # the application's own
        remote.send(q, k, v, layer=0, microbatch=1)
        request = service.recv(timeout=TIMEOUT_S)  # the control message went to the handler first
        assert controls == [(peer, 5, 42)] and request.peer == peer
        with pytest.raises(lc.InvalidArgumentError, match="report_compute_time=True"):
            request.respond(request.q, compute_ns=5)
        request.respond(request.q)
        assert torch.equal(remote.recv_into(torch.empty(3, 8, 16), layer=0, microbatch=1), q)
        assert remote.replies[0].compute_ns is None  # this service reports none: the reply is [out] alone
        remote.close()  # the channel is the caller's: still open
        assert service.detach(peer) is attention_side

        strict = AttentionService(None, SHAPE, 0, 1, listen=None)  # no handler: control messages are refused
        strict_peer = strict.attach(attention_side)
        model_side.send([np.array([1])], layer=6, microbatch=SHAPE.metadata_microbatch)
        with pytest.raises(lc.InvalidArgumentError, match="takes none") as refused:
            strict.recv(timeout=TIMEOUT_S)
        assert refused.value.peer == strict_peer
        other_model_side, half_share = open_pair(ctx, ctx, SHAPE.channel_spec(0, 2), piggyback=True)
        with pytest.raises(lc.InvalidArgumentError, match="carries 4 query / 2 KV heads"):
            strict.attach(half_share)
        strict.close()  # closes what it serves
        for channel in (model_side, other_model_side, half_share):
            channel.close()


def test_one_request_per_micro_batch_holds_the_reply_slot_and_a_failed_respond_gives_its_slot_back() -> None:
    """Two requests of one model rank and micro-batch would share the next reply slot: the second
    output() is refused until the first is answered (both replies then right). A respond that fails
    (the model rank detached meanwhile) still gives the request's slot back: re-attached, the channel
    serves on."""
    shape = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8, max_tokens=8, dtype="float32", microbatches=1)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    with lc.Context("tcp") as ctx:
        model_side, attention_side = open_pair(ctx, ctx, shape.channel_spec(0, 1), piggyback=True)
        service = AttentionService(None, shape, 0, 1, listen=None)
        peer = service.attach(attention_side)
        remote = RemoteAttention.over([model_side], shape)
        remote.send(q, k, k, layer=0, microbatch=0)
        remote.send(q, k, k, layer=1, microbatch=0)
        first, second = service.recv(timeout=TIMEOUT_S), service.recv(timeout=TIMEOUT_S)
        first.output().fill_(1.0)
        with pytest.raises(lc.InvalidArgumentError, match="held by the request of layer 0: answer it first"):
            second.output()
        with pytest.raises(lc.InvalidArgumentError, match="answer it first"):
            second.fail("an error reply would be staged into the same slot")
        first.respond()
        second.output().fill_(2.0)
        second.respond()
        out = torch.empty(3, 4, 8)
        assert remote.recv_into(out, layer=0, microbatch=0).unique().tolist() == [1.0]
        assert remote.recv_into(out, layer=1, microbatch=0).unique().tolist() == [2.0]
        with pytest.raises(lc.InvalidArgumentError, match="micro-batch 1 is not in"):
            remote.recv_into(out, layer=2, microbatch=1)  # the control micro-batch is not the caller's

        for layer in (2, 3):
            remote.send(q, k, k, layer=layer, microbatch=0)
        stranded = service.recv(timeout=TIMEOUT_S)
        service.detach(peer)
        with pytest.raises(lc.ClosedError, match="no longer served"):
            stranded.respond()
        peer = service.attach(attention_side)
        for layer in (3, 4, 5):  # every slot of the micro-batch comes round again: none was lost
            if layer > 3:
                remote.send(q, k, k, layer=layer, microbatch=0)
            request = service.recv(timeout=TIMEOUT_S)
            assert request.layer == layer
            request.respond(request.q)
            assert torch.equal(remote.recv_into(out, layer=layer, microbatch=0), q)
        service.close()
        model_side.close()


def test_a_stream_ordered_send_handle_waits_for_the_direct_sends_on_a_stream_or_on_the_host() -> None:
    """A stream-ordered SendHandle covers each channel's last send of its micro-batch straight from GPU
    memory (the real ones run in tests/rxe): done when the channels say so, wait(stream=) queues the
    waits on the stream, wait(timeout) polls and times out naming the channel."""
    from types import SimpleNamespace

    from lamina_comm.engine.remote import SendHandle
    sent = {("a", 4): False, ("b", 9): True}
    last = {"a": 4, "b": 9, "c": None}  # c sent nothing from GPU memory
    queued: list[tuple[str, Any, int, int]] = []

    def channel(name: str) -> Any:
        return SimpleNamespace(name=name, timeout=0.05, last_device_send=lambda mb: last[name],
                               device_sent=lambda mb, seq: sent[(name, seq)],
                               wait_sent_on=lambda stream, mb, seq: queued.append((name, stream, mb, seq)))

    a, b, c = channel("a"), channel("b"), channel("c")
    assert not SendHandle([a, b, c], [], 1).done
    with pytest.raises(lc.TimeoutError, match="channel a: send 4 of micro-batch 1 from GPU memory"):
        SendHandle([a, b, c], [], 1).wait()  # the channel's timeout
    handle = SendHandle([a, b, c], [], 1)
    last["a"] = 5  # a later send of the micro-batch is not this handle's
    handle.wait(stream=7)
    assert queued == [("a", 7, 1, 4), ("b", 7, 1, 9)]
    sent[("a", 4)] = True
    handle = SendHandle([a, b, c], [], 1)
    sent[("a", 5)] = False
    last["a"] = 4
    assert handle.done is False  # it took send 5
    sent[("a", 5)] = True
    assert handle.done
    handle.wait(0.01)


def test_a_channel_taking_its_control_micro_batch_into_device_memory_is_refused_by_the_engine():
    """The engine reads step metadata and control messages on the host: a channel whose payloads all land
    in device memory is refused with the remedy; one that keeps the control micro-batch in the ring is
    served (a channel's payloads= region is only faked here: a CUDA region needs a GPUDirect NIC; the
    real one runs in tests/rxe)."""
    from types import SimpleNamespace

    from lamina_comm.engine.remote import _refuse_device_control
    from lamina_comm.gpu.memory import CudaRegionBase
    spec = SimpleNamespace(microbatches=3)
    _refuse_device_control(SimpleNamespace(name="host", payloads=None, payload_microbatches=0, spec=spec))
    _refuse_device_control(SimpleNamespace(name="gpu", payloads=CudaRegionBase(), payload_microbatches=2, spec=spec))
    with pytest.raises(lc.UnsupportedError, match="payload_microbatches=2"):
        _refuse_device_control(SimpleNamespace(name="gpu", payloads=CudaRegionBase(), payload_microbatches=3,
                                               spec=spec))


def test_payload_regions_take_the_layers_and_the_ring_keeps_the_metadata() -> None:
    """RemoteAttention(payloads=) and AttentionService.accept(payloads=): each side's data micro-batches
    land in a region of its own (GPU memory in production; host memory over tcp here), step metadata,
    compute times and error texts still reach the host, bit for bit."""
    with lc.Context("tcp") as ctx:
        ranks = 2
        services = [AttentionService(ctx, SHAPE, rank=a, ranks=ranks, report_compute_time=True) for a in range(ranks)]
        assert [s.payload_bytes for s in services] == [SHAPE.payload_bytes(a, ranks, "attention") for a in range(ranks)]
        service_regions = [ctx.register(np.zeros(s.payload_bytes, np.uint8)) for s in services]
        seen: list[Any] = []

        def serve(service: AttentionService) -> None:
            service.accept(1, timeout=TIMEOUT_S, payloads=[service_regions[service.rank]])
            for _ in range(3):
                request = service.recv(timeout=TIMEOUT_S)
                landing = service_regions[service.rank].view()
                seen.append((np.shares_memory(request.q.numpy(), landing), request.request_ids.tolist()))
                if request.layer == 2:
                    request.fail(f"rank {service.rank} refuses layer 2")
                else:
                    request.respond(request.q * 2 + service.rank, compute_ns=1000 + service.rank)

        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in services]
        for thread in threads:
            thread.start()
        reply_regions = [ctx.register(np.zeros(SHAPE.payload_bytes(a, ranks), np.uint8)) for a in range(ranks)]
        with pytest.raises(lc.InvalidArgumentError, match="1 payload regions for 2"):
            RemoteAttention(ctx, [s.address for s in services], SHAPE, payloads=reply_regions[:1])
        with RemoteAttention(ctx, [s.address for s in services], SHAPE, payloads=reply_regions) as remote:
            assert [c.payload_microbatches for c in remote.channels] == [SHAPE.microbatches] * ranks
            remote.send_metadata(1, [5, 6], [3, 4])
            for layer in range(2):
                q = torch.randn(2, 8, 16)
                remote.send(q, torch.randn(2, 4, 16), torch.randn(2, 4, 16), layer=layer, microbatch=1)
                expected = q * 2
                expected[:, 4:] += 1
                assert torch.equal(remote.recv_into(torch.empty(2, 8, 16), layer=layer, microbatch=1), expected)
                assert [reply.compute_ns for reply in remote.replies] == [1000, 1001]
            remote.send(q, torch.randn(2, 4, 16), torch.randn(2, 4, 16), layer=2, microbatch=1)
            with pytest.raises(AttentionRankError, match="rank 0 refuses layer 2"):
                remote.recv_into(torch.empty(2, 8, 16), layer=2, microbatch=1)
            remote.drain()
        for thread in threads:
            thread.join(TIMEOUT_S)
        for service in services:
            service.close()
    assert seen == [(True, [5, 6])] * 6