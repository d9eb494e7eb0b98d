"""Hostile clients at the bootstrap listener (issue 9, defect 3).

Idle or half-finished connections must not delay a real peer: the
pre-authentication handshake runs off the accept path, concurrently, bounded
in total and per source address. The handshake deadline here is long (20 s)
and every check is a logic check: a real peer gets in while the idle
connections are provably still open, i.e. before their deadline expired.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm import bootstrap

LONG_HANDSHAKE_S = 20.0   # idle connections stay pending this long unless the server closes them
WAIT_S = 10.0             # hang guard for things that take milliseconds
HOST = "127.0.0.1"
OTHER_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")  # loopback sources


def listen(ctx: lc.Context, **limits: object) -> lc.Listener:
    """A listener with a long handshake deadline (limits: Context.listen's keywords).

    A tree from before the fix has no such keywords; its deadline is accept()'s
    handshake_timeout, which accept_in_thread passes too, so the tests run there.
    """
    try:
        return ctx.listen((HOST, 0), handshake_timeout=LONG_HANDSHAKE_S, **limits)
    except TypeError:
        return ctx.listen((HOST, 0))


def partial_hello() -> bytes:
    """The first half of a valid HELLO: the server waits for the rest."""
    return bootstrap._HELLO.pack(b"LMNA", bootstrap.VERSION, 0, 1, bytes(16), bytes(16))[:10]


def full_hello(flags: int = 0) -> bytes:
    return bootstrap._HELLO.pack(b"LMNA", bootstrap.VERSION, flags, 1, bytes(16), bytes(16))


def open_idle(address: tuple[str, int], source: str = HOST, send: bytes = b"") -> socket.socket:
    """A connection from source that sends `send` (maybe nothing) and then stays silent."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(address)
    if send:
        sock.sendall(send)
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 0.0) -> bool:
    """True once the server closed it (EOF or reset); False while it is still held open."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
            readable, _, _ = select.select([sock], [], [], timeout)
            if not readable:
                return False  # it answered (a HELLO) and waits: still open
    except ConnectionResetError:
        return True


def accept_in_thread(listener: lc.Listener, box: dict, **kwargs: object) -> threading.Thread:
    def run() -> None:
        try:
            box["ep"] = listener.accept(timeout=WAIT_S, handshake_timeout=LONG_HANDSHAKE_S, **kwargs)
        except Exception as exc:  # surfaced by the test
            box["err"] = exc
        box["done_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def connect_real_peer(listener: lc.Listener, client: lc.Context, data: bytes = b"client") -> tuple:
    """(client endpoint, server endpoint), both within WAIT_S or an assertion error."""
    box: dict = {}
    thread = accept_in_thread(listener, box, private_data=b"server")
    client_ep = client.connect(listener.address, private_data=data, timeout=WAIT_S)
    thread.join(WAIT_S)
    assert "err" not in box, f"accept failed: {box.get('err')!r}"
    assert "ep" in box, "accept did not return"
    return client_ep, box["ep"]


def check_endpoints_work(client_ep: lc.Endpoint, server_ep: lc.Endpoint, server: lc.Context,
                         client: lc.Context) -> None:
    buf = np.zeros(64, np.uint8)
    target = server.register(buf)
    src = client.register(np.arange(64, dtype=np.uint8))
    client_ep.write(src, target.descriptor(), imm=5)
    assert client_ep.wait_one(timeout=WAIT_S).ok
    assert np.array_equal(buf, np.arange(64, dtype=np.uint8))


@pytest.fixture
def contexts() -> Iterator[tuple[lc.Context, lc.Context]]:
    with lc.Context("tcp") as server, lc.Context("tcp") as client:
        yield server, client


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Client sockets a test opens; closed at its end."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def test_idle_connections_do_not_delay_a_real_peer(contexts, held) -> None:
    server, client = contexts
    with listen(server) as listener:
        for send in (b"", b"", partial_hello(), partial_hello()):
            held.append(open_idle(listener.address, send=send))
        client_ep, server_ep = connect_real_peer(listener, client)
        assert server_ep.peer_data == b"client" and client_ep.peer_data == b"server"
        # The logic check: every idle connection is still pending, so the real peer did not
        # wait for any of their deadlines.
        assert not any(closed_by_server(sock) for sock in held)
        check_endpoints_work(client_ep, server_ep, server, client)


def test_secret_listener_with_idle_connections_authenticates_a_real_peer(held) -> None:
    with lc.Context("tcp", secret="s3cret") as server, lc.Context("tcp", secret="s3cret") as client:
        with listen(server) as listener:
            # Idle, half a hello, and a full hello that never sends its proof (stuck in AUTH).
            for send in (b"", partial_hello(), full_hello(bootstrap.FLAG_AUTH)):
                held.append(open_idle(listener.address, send=send))
            client_ep, server_ep = connect_real_peer(listener, client)
            assert not any(closed_by_server(sock) for sock in held)
            check_endpoints_work(client_ep, server_ep, server, client)


def test_a_flood_from_one_source_is_refused_while_another_source_gets_in(contexts, held) -> None:
    server, client = contexts
    per_source, extra = 3, 4
    with listen(server, max_pending_per_source=per_source) as listener:
        flood = [open_idle(listener.address, source=OTHER_HOSTS[0]) for _ in range(per_source + extra)]
        held.extend(flood)
        refused = wait_for_refusals(flood, extra)
        assert len(refused) == extra, f"{len(refused)} of {len(flood)} flood connections were closed, not {extra}"
        client_ep, server_ep = connect_real_peer(listener, client)  # from 127.0.0.1
        check_endpoints_work(client_ep, server_ep, server, client)
        assert sum(not closed_by_server(sock) for sock in flood) == per_source


def test_the_total_bound_refuses_at_once_and_frees_its_slot_when_a_connection_ends(contexts, held) -> None:
    server, client = contexts
    with listen(server, max_pending=3) as listener:
        conns = [open_idle(listener.address, source=source) for source in OTHER_HOSTS[:5]]
        held.extend(conns)
        refused = wait_for_refusals(conns, 2)
        assert len(refused) == 2
        survivor = next(sock for sock in conns if sock not in refused)
        survivor.close()  # its handshake fails at once: a slot frees up
        wait_until(lambda: listener.pending() == (2, 0), "the closed connection's slot was not freed")
        client_ep, server_ep = connect_real_peer(listener, client)
        check_endpoints_work(client_ep, server_ep, server, client)


def wait_for_refusals(socks: list[socket.socket], expected: int) -> list[socket.socket]:
    """The sockets the server closed, once `expected` of them are (or after WAIT_S)."""
    refused: list[socket.socket] = []
    deadline = time.monotonic() + WAIT_S
    while len(refused) < expected and time.monotonic() < deadline:
        for sock in socks:
            if sock not in refused and closed_by_server(sock, timeout=0.05):
                refused.append(sock)
    return refused


def wait_until(condition, message: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_fileno_is_readable_only_once_an_authenticated_peer_waits(contexts, held) -> None:
    server, client = contexts
    with listen(server) as listener:
        for send in (b"", partial_hello()):
            held.append(open_idle(listener.address, send=send))
        readable, _, _ = select.select([listener], [], [], 0.5)
        assert not readable, "idle connections made the listener readable (a select loop would spin)"
        box: dict = {}
        connecting = threading.Thread(target=lambda: box.setdefault(
            "ep", client.connect(listener.address, timeout=WAIT_S)), daemon=True)
        connecting.start()
        readable, _, _ = select.select([listener], [], [], WAIT_S)
        assert readable, "an authenticated peer waits but the listener is not readable"
        server_ep = listener.accept(timeout=WAIT_S)
        connecting.join(WAIT_S)
        check_endpoints_work(box["ep"], server_ep, server, client)


def test_close_ends_pending_handshakes_and_a_blocked_accept_without_waiting_for_deadlines(contexts,
                                                                                         held) -> None:
    server, _ = contexts
    listener = listen(server)
    for send in (b"", partial_hello(), full_hello()):
        held.append(open_idle(listener.address, send=send))
    box: dict = {}
    accepting = threading.Thread(target=lambda: _accept_into(listener, box), daemon=True)
    accepting.start()
    closing = threading.Thread(target=listener.close, daemon=True)
    closing.start()
    closing.join(WAIT_S)
    accepting.join(WAIT_S)
    assert not closing.is_alive(), "close() hung on pending handshakes"
    assert not accepting.is_alive() and isinstance(box.get("err"), lc.ClosedError), box
    assert all(closed_by_server(sock, timeout=WAIT_S) for sock in held), "pending sockets were left open"


def _accept_into(listener: lc.Listener, box: dict) -> None:
    try:
        box["ep"] = listener.accept(timeout=LONG_HANDSHAKE_S)
    except Exception as exc:
        box["err"] = exc


def test_an_authenticated_peer_that_leaves_before_accept_is_dropped(contexts) -> None:
    server, client = contexts
    with listen(server) as listener:
        sock = socket.create_connection(listener.address)
        with pytest.raises(lc.TimeoutError):  # nobody accepts: the client gives up and closes
            bootstrap.client_handshake(sock, client.transports_mask, client.transports_mask, None, b"gone",
                                       timeout=0.5)
        sock.close()
        client_ep, server_ep = connect_real_peer(listener, client, data=b"stays")
        assert server_ep.peer_data == b"stays", "accept() returned the peer that had left"
        check_endpoints_work(client_ep, server_ep, server, client)


def test_node_with_a_secret_sets_up_a_model_node_despite_idle_connections(held) -> None:
    pytest.importorskip("torch")
    from tests.node.test_disaggregated import address, attention_nodes, make_node

    process = attention_nodes(1, "--secret", "right secret")[0]
    try:
        host, port = address(process).rsplit(":", 1)
        for send in (b"", b"", partial_hello(), partial_hello()):
            held.append(open_idle((host, int(port)), source=OTHER_HOSTS[0], send=send))
        # Before the fix each idle connection held the node's listener for its 5 s deadline.
        node = make_node([address(process)], secret="right secret", connect_timeout=WAIT_S)
        node.close()
    finally:
        process.close()
