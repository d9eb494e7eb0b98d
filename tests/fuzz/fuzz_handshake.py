"""Coverage-guided fuzzer (atheris) for the server side of the bootstrap handshake.

    python tests/fuzz/fuzz_handshake.py [libFuzzer flags] [SCRATCH_DIR] tests/fuzz/corpus/handshake/
    python tests/fuzz/fuzz_handshake.py --write-seeds tests/fuzz/corpus/handshake/

An input is one set-up byte, then everything a client sends before it
half-closes the connection. Set-up bits: 1 the server holds a secret, 2 its
private data is a callable of the client's, 4 it allows tcp only, 8 a verbs
address exchange follows. The server's nonce is pinned (NONCE) so that the
seed corpus can carry a valid HMAC proof and the fuzzer reaches what follows
authentication.

bootstrap.server_handshake must succeed or raise a LaminaError subclass;
anything else, a timeout (the input is complete and half-closed, so nothing
may wait), a run past the deadline, or memory past -rss_limit_mb is a finding.
check_one() is also what tests/fuzz/test_fuzz_corpus.py replays over the corpus.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import struct
import sys
import time
from typing import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fuzz_support  # noqa: E402

bootstrap = _fuzz_support.import_target("lamina_comm.bootstrap", fuzzing=__name__ == "__main__")
from lamina_comm.errors import LaminaError, TimeoutError_

SECRET = b"fuzz secret"
NONCE = bytes(range(16))          # the server's pinned nonce
CLIENT_NONCE = b"\xaa" * 16
TCP, VERBS, SHM = 1, 2, 4
OTHER_HOST = b"\xbb" * 16         # a client's host identity: never this machine's
DEADLINE_S = 5.0                  # the handshake's own deadline: a hang guard only
OVERRUN_SLACK_S = 5.0             # a run this far past the deadline is a finding
MAX_STREAM = 96 * 1024            # what fits a socketpair's buffer (private data is <= 64 KiB)

SET_SECRET, SET_CALLABLE, SET_TCP_ONLY, SET_ADDRESS = 1, 2, 4, 8


def check_one(data: bytes) -> None:
    """Run the server handshake over one input; raise AssertionError (or anything untyped) on a finding."""
    if not data:
        return
    setup, stream = data[0], data[1:MAX_STREAM + 1]
    server, client = socket.socketpair()
    try:
        client.sendall(stream)
        client.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        try:
            with pinned_nonce():
                negotiated = _serve(server, setup)
        except TimeoutError_ as exc:
            raise AssertionError(f"waited on a complete, half-closed input: {exc}") from exc
        except LaminaError:
            negotiated = None
        if time.monotonic() - started > DEADLINE_S + OVERRUN_SLACK_S:
            raise AssertionError("the handshake ran past its deadline")
        if negotiated is not None:
            _check_negotiated(negotiated, setup)
    finally:
        server.close()
        client.close()


@contextlib.contextmanager
def pinned_nonce() -> Iterator[None]:
    """The server's nonce is NONCE inside (restored after: the replay test shares the process)."""
    original = bootstrap._new_nonce
    bootstrap._new_nonce = lambda: NONCE
    try:
        yield
    finally:
        bootstrap._new_nonce = original


def _serve(sock: socket.socket, setup: int) -> bootstrap.Negotiated:
    secret = SECRET if setup & SET_SECRET else None
    allowed = TCP if setup & SET_TCP_ONLY else TCP | VERBS | SHM
    reply = (lambda peer: peer[:64]) if setup & SET_CALLABLE else b"server data"
    negotiated = bootstrap.server_handshake(sock, TCP | VERBS | SHM, allowed, secret, reply, DEADLINE_S)
    if setup & SET_ADDRESS:
        address = bootstrap.exchange_address(sock, b"qp address", DEADLINE_S, client=False)
        assert len(address) <= bootstrap.MAX_ADDRESS, len(address)
    return negotiated


def _check_negotiated(negotiated: bootstrap.Negotiated, setup: int) -> None:
    allowed = TCP if setup & SET_TCP_ONLY else TCP | VERBS | SHM
    # shm is granted only to a HELLO carrying this host's identity (the fuzzer finds it through the
    # comparison: it runs on this host); tests/test_transport.py checks the refusal of any other.
    assert negotiated.transport in (TCP, VERBS, SHM) and negotiated.transport & allowed, negotiated
    assert len(negotiated.peer_data) <= bootstrap.MAX_PRIVATE_DATA


# -- seeds -------------------------------------------------------------------
def hello(flags: int = 0, transports: int = TCP | VERBS | SHM, version: int = bootstrap.VERSION,
          magic: bytes = bootstrap.MAGIC) -> bytes:
    return struct.pack("<4sHHI16s16s", magic, version, flags, transports, CLIENT_NONCE, OTHER_HOST)


def proof(secret: bytes = SECRET) -> bytes:
    """The client's proof against the pinned server nonce."""
    return hmac.new(secret, b"client" + NONCE + CLIENT_NONCE, hashlib.sha256).digest()


def choose(transport: int = TCP, data: bytes = b"client data") -> bytes:
    return struct.pack("<II", transport, len(data)) + data


def seeds() -> dict[str, bytes]:
    """A valid exchange per set-up and a few near misses."""
    plain, auth = hello(), hello(bootstrap.FLAG_AUTH)
    return {
        "valid_plain": bytes([0]) + plain + choose(),
        "valid_callable_verbs": bytes([SET_CALLABLE]) + plain + choose(VERBS, b"x" * 40),
        "valid_secret": bytes([SET_SECRET]) + auth + proof() + choose(),
        "valid_secret_address": bytes([SET_SECRET | SET_ADDRESS]) + auth + proof() + choose()
        + struct.pack("<H", 10) + b"qp address",
        "wrong_proof": bytes([SET_SECRET]) + auth + proof(b"other") + choose(),
        "client_demands_auth": bytes([0]) + auth + bytes(32) + choose(),
        "tcp_only_asked_verbs": bytes([SET_TCP_ONLY]) + plain + choose(VERBS),
        "shm_from_another_host": bytes([0]) + plain + choose(SHM),
        "bad_version": bytes([0]) + hello(version=9) + choose(),
        "bad_magic": bytes([0]) + hello(magic=b"HTTP") + choose(),
        "oversized_data": bytes([0]) + plain + struct.pack("<II", TCP, 1 << 20),
        "truncated_choose": bytes([0]) + plain + choose()[:5],
    }


if __name__ == "__main__":
    _fuzz_support.main(check_one, seeds)
