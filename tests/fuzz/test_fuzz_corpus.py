"""The fuzzers' corpora replayed as unit tests (no atheris needed), and their findings pinned.

Every file under tests/fuzz/corpus/<target>/ must pass its harness's check_one:
the seeds, and the inputs that once crashed it (kept as "found_*" seeds).
"""
from __future__ import annotations

import os
import socket
import struct
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fuzz_channel_header  # noqa: E402
import fuzz_handshake  # noqa: E402

import lamina_comm as lc  # noqa: E402
from lamina_comm import bootstrap, channel  # noqa: E402
from lamina_comm.channel import handshake  # noqa: E402

HARNESSES = {"handshake": fuzz_handshake, "channel_header": fuzz_channel_header}


def corpus(target: str) -> list[str]:
    directory = os.path.join(HERE, "corpus", target)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory))


@pytest.mark.parametrize("target", sorted(HARNESSES))
def test_the_committed_corpus_is_what_the_seeds_generate(target: str) -> None:
    seeds = HARNESSES[target].seeds()
    assert sorted(seeds) == sorted(os.path.basename(p) for p in corpus(target))
    for path in corpus(target):
        with open(path, "rb") as f:
            assert f.read() == seeds[os.path.basename(path)], f"{path} is stale: --write-seeds"


@pytest.mark.parametrize("path", corpus("handshake"), ids=os.path.basename)
def test_handshake_corpus(path: str) -> None:
    with open(path, "rb") as f:
        fuzz_handshake.check_one(f.read())


@pytest.mark.parametrize("path", corpus("channel_header"), ids=os.path.basename)
def test_channel_header_corpus(path: str) -> None:
    with open(path, "rb") as f:
        fuzz_channel_header.check_one(f.read())


def test_the_valid_seeds_really_pass_the_handshake() -> None:
    """The corpus reaches past authentication: the pinned nonce makes the seed's proof valid."""
    for name in ("valid_plain", "valid_secret", "valid_secret_address"):
        data = fuzz_handshake.seeds()[name]
        server, client = socket.socketpair()
        with server, client:
            client.sendall(data[1:])
            with fuzz_handshake.pinned_nonce():
                negotiated = fuzz_handshake._serve(server, data[0])
        assert negotiated.peer_data == b"client data", name


# -- findings of fuzz_channel_header: the peer's channel hello -------------------
def peer_hello_with(**changes: object) -> bytes:
    return fuzz_channel_header.peer_hello(**changes)


@pytest.mark.parametrize("hello", [
    peer_hello_with(region={"key": 1, "length": 1 << 20}),                 # a field missing: was TypeError
    peer_hello_with(region={"key": "1", "addr": 0, "length": 1 << 20}),    # a string: was accepted
    peer_hello_with(region={"key": 1.5, "addr": 0, "length": 1 << 20}),    # a float: was truncated
    peer_hello_with(region={"key": 1 << 64, "addr": 0, "length": 1 << 20}),  # too wide: OverflowError later
    peer_hello_with(region={"key": -1, "addr": 0, "length": 1 << 20}),
    peer_hello_with(region=[1, 2, 3]),                                      # not an object: was TypeError
    peer_hello_with(region=None),
    handshake._HELLO_PREFIX + b"[1]",                                       # was AttributeError
    handshake._HELLO_PREFIX + b"[" * 10_000,                                # was RecursionError
], ids=["missing", "string", "float", "too_wide", "negative", "list", "null", "not_object", "deep"])
def test_a_malformed_channel_hello_is_a_protocol_error(hello: bytes) -> None:
    with pytest.raises(lc.ProtocolError):
        handshake._check_peer(fuzz_channel_header.SPEC, fuzz_channel_header.ROLE, handshake._parse_hello(hello))


def test_a_spec_mismatch_with_a_malformed_spec_still_names_the_mismatch() -> None:
    hello = handshake._parse_hello(peer_hello_with(spec=[1], digest="0" * 32))
    with pytest.raises(channel.SpecMismatchError, match="spec mismatch"):
        handshake._check_peer(fuzz_channel_header.SPEC, fuzz_channel_header.ROLE, hello)


# -- findings of fuzz_channel_header: a landed message ----------------------------
def test_an_empty_tensor_with_a_shape_numpy_cannot_make_is_a_protocol_error() -> None:
    data = fuzz_channel_header.message(tensors=((3, (768, 1 << 24, 2113999872, 0), 0),))
    with pytest.raises(lc.ProtocolError, match="overruns the slot"):  # was ValueError from numpy's reshape
        fuzz_channel_header._check_message(data[1:])


def test_an_empty_tensor_with_a_sane_shape_is_still_received() -> None:
    harness = fuzz_channel_header.harness()
    data = fuzz_channel_header.message(tensors=((3, (0, 2, 16), 0),))
    fuzz_channel_header._check_message(data[1:])
    assert harness.channel.metrics.messages_received >= 1


# -- typed errors from the handshake -----------------------------------------------
def test_a_connection_lost_mid_handshake_is_a_peer_lost_error() -> None:
    server, client = socket.socketpair()
    with server:
        client.sendall(struct.pack("<4sHHI16s16s", bootstrap.MAGIC, bootstrap.VERSION, 0, 1, bytes(16), bytes(16)))
        client.close()  # the server's HELLO then meets a closed peer (EPIPE): was BrokenPipeError
        with pytest.raises(lc.PeerLostError):
            bootstrap.server_handshake(server, 3, 3, None, b"", timeout=10)
