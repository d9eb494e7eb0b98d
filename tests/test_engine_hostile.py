"""The engine API against hostile or careless callers (findings of a review of the first version)."""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import lamina_comm as lc  # noqa: E402
from lamina_comm.engine import AttentionService, AttentionShape, RemoteAttention, RendezvousServer, rendezvous  # noqa: E402
from lamina_comm.engine.afd import LaminaAFDConnector  # noqa: E402


def _port_of(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def test_a_closed_rendezvous_server_lets_go_of_its_port() -> None:
    server = RendezvousServer("127.0.0.1:0", model_ranks=1, attention_ranks=1)
    address = server.address
    time.sleep(0.2)  # its thread is blocked in accept()
    server.close()
    with socket.socket() as probe:
        assert probe.connect_ex(_port_of(address)) != 0, "a closed server still accepts"
    RendezvousServer(address, model_ranks=1, attention_ranks=1).close()  # the port can be bound again


def test_idle_connections_get_no_more_than_the_connection_bound() -> None:
    with RendezvousServer("127.0.0.1:0", model_ranks=1, attention_ranks=1, secret="k") as server:
        before = threading.active_count()
        idle = [socket.create_connection(_port_of(server.address)) for _ in range(120)]
        time.sleep(0.5)
        grown = threading.active_count() - before
        world = None
        try:
            assert grown <= server.max_connections, f"{grown} threads for 120 idle connections"
        finally:
            for sock in idle:
                sock.close()
        # Honest ranks are served once the idle ones are gone.
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.setdefault("a", rendezvous(
            server.address, role="attention", rank=0, world=(1, 1), advertise="h:1", secret="k", timeout=10)))
        thread.start()
        world = rendezvous(server.address, role="model", rank=0, world=(1, 1), secret="k", timeout=10)
        thread.join(10)
        assert world.attention == ("h:1",)


def _signed(secret: bytes, message: dict) -> bytes:
    line = json.dumps(message, separators=(",", ":")).encode()
    return line + b"\n" + hmac.new(secret, line, hashlib.sha256).hexdigest().encode() + b"\n"


def test_a_replayed_registration_is_refused() -> None:
    with RendezvousServer("127.0.0.1:0", model_ranks=1, attention_ranks=1, secret="k") as server:
        # A validly signed registration recorded from another connection (its nonce is not this one's).
        old = _signed(b"k", {"role": "attention", "rank": 0, "address": "10.0.0.1:1111", "world": [1, 1],
                             "nonce": "0" * 32})
        with socket.create_connection(_port_of(server.address)) as sock:
            sock.sendall(old)
            sock.settimeout(5)
            answer = b""
            while answer.count(b"\n") < 4:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert b"a replay" in answer
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.setdefault("a", rendezvous(
            server.address, role="attention", rank=0, world=(1, 1), advertise="10.0.0.2:2222", secret="k",
            timeout=10)))
        thread.start()
        world = rendezvous(server.address, role="model", rank=0, world=(1, 1), secret="k", timeout=10)
        thread.join(10)
    assert world.attention == ("10.0.0.2:2222",)


def test_recv_into_refuses_a_tensor_of_another_dtype() -> None:
    shape = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=8, max_tokens=8, dtype="float16")
    with lc.Context("tcp") as ctx, AttentionService(ctx, shape, rank=0, ranks=1) as service:
        def serve() -> None:
            service.accept(1, timeout=10)
            request = service.recv(timeout=10)
            request.respond(request.q)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with RemoteAttention(ctx, [service.address], shape) as remote:
            q = torch.randn(3, 4, 8, dtype=torch.float16)
            remote.send(q, torch.randn(3, 2, 8, dtype=torch.float16), torch.randn(3, 2, 8, dtype=torch.float16),
                        layer=0, microbatch=0)
            with pytest.raises(lc.InvalidArgumentError, match="needs a float16 tensor"):
                remote.recv_into(torch.zeros(3, 4, 8, dtype=torch.bfloat16), layer=0, microbatch=0)
            assert torch.equal(remote.recv_into(torch.zeros(3, 4, 8, dtype=torch.float16), layer=0, microbatch=0),
                               q)
            thread.join(10)


EXTRA = {"hidden_size": 16, "max_num_tokens": 8, "dtype": "float32", "num_ubatches": 2, "transport": "tcp",
         "timeout_s": 20}


def _connector(role: str, role_rank: int, port: int, attention: int, ffn: int) -> LaminaAFDConnector:
    vllm = {"additional_config": {"afd": {"connector_extra_config": EXTRA}}}
    afd = SimpleNamespace(role=role, host="127.0.0.1", port=port, num_attention_ranks=attention, num_ffn_ranks=ffn)
    return LaminaAFDConnector(role_rank, role_rank, vllm, afd, role_rank)


def _init_all(connectors: list[LaminaAFDConnector]) -> list[dict]:
    boxes: list[dict] = [{} for _ in connectors]

    def run(connector: LaminaAFDConnector, box: dict) -> None:
        try:
            connector.init_afd_connector()
            box["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in zip(connectors, boxes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return boxes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_ffn_rank_that_serves_no_attention_rank_is_initialized() -> None:
    port = _free_port()  # 1 attention rank over 2 FFN ranks: FFN rank 1 serves nobody
    connectors = [_connector("ffn", 0, port, 1, 2), _connector("ffn", 1, port, 1, 2),
                  _connector("attention", 0, port, 1, 2)]
    try:
        assert _init_all(connectors) == [{"ok": True}] * 3
        assert all(c.is_initialized for c in connectors)
    finally:
        for connector in reversed(connectors):
            connector.close()
    assert not any(c.is_initialized for c in connectors)


def test_connectors_init_again_after_close_on_the_same_port() -> None:
    port = _free_port()
    for _ in range(2):
        connectors = [_connector("ffn", 0, port, 1, 1), _connector("attention", 0, port, 1, 1)]
        outcome = _init_all(connectors)
        for connector in reversed(connectors):
            connector.close()
        assert outcome == [{"ok": True}] * 2, outcome
