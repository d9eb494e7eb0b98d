"""Connection bootstrap: the versioned handshake every endpoint starts with.

Over a fresh TCP connection (client first):

  HELLO   both ways: magic "LMNA", protocol version, flags (AUTH: this side
          holds a secret), transports it can run (LM_TRANSPORT_* bits), a
          16-byte random nonce.
  AUTH    if either side holds a secret, both prove it: HMAC-SHA256 over the
          role and both nonces (mutual challenge-response). The client proves
          first; the server answers a verdict byte and, if accepted, its own
          proof. A side without the secret, or with another, gets
          AuthenticationError naming the cause.
  CHOOSE  client -> server: the transport it picked from the common set, and
          its private data (up to 64 KiB, e.g. region descriptors).
  ACCEPT  server -> client: status (0, or an error with a reason) and the
          server's private data.
  ADDRESS verbs only, both ways: the queue-pair address (QPN, PSN, GID, MTU).

Every read has a deadline, and any byte sequence that is not this exchange
raises ProtocolError, so a garbage-spewing or silent client costs the server
one timeout, never a crash or a hang.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import socket
import struct
import time

from .errors import AuthenticationError, ProtocolError, TimeoutError_, UnsupportedError

MAGIC = b"LMNA"
VERSION = 1
FLAG_AUTH = 1
MAX_PRIVATE_DATA = 64 * 1024
MAX_ADDRESS = 1024

_HELLO = struct.Struct("<4sHHI16s")
_CHOOSE = struct.Struct("<II")
_ACCEPT = struct.Struct("<iII")  # status, private data length, reason length


@dataclasses.dataclass
class Hello:
    version: int
    flags: int
    transports: int
    nonce: bytes


class _Deadline:
    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        if self.end is None:
            return None
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError_("handshake timed out")
        return left


def recv_exact(sock: socket.socket, n: int, deadline: _Deadline) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(deadline.left())
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout as exc:
            raise TimeoutError_("handshake timed out waiting for the peer") from exc
        if not chunk:
            raise ProtocolError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, deadline: _Deadline) -> None:
    sock.settimeout(deadline.left())
    try:
        sock.sendall(data)
    except socket.timeout as exc:
        raise TimeoutError_("handshake timed out sending") from exc


def _exchange_hello(sock: socket.socket, transports: int, secret: bytes | None,
                    deadline: _Deadline, client: bool) -> tuple[Hello, Hello]:
    mine = Hello(VERSION, FLAG_AUTH if secret else 0, transports, os.urandom(16))
    packed = _HELLO.pack(MAGIC, mine.version, mine.flags, mine.transports, mine.nonce)

    def receive() -> Hello:
        magic, version, flags, peer_transports, nonce = _HELLO.unpack(recv_exact(sock, _HELLO.size, deadline))
        if magic != MAGIC:
            raise ProtocolError(f"not a lamina-comm peer (magic {magic!r})")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
        return Hello(version, flags, peer_transports, nonce)

    if client:
        _send(sock, packed, deadline)
        theirs = receive()
    else:
        theirs = receive()
        _send(sock, packed, deadline)
    return mine, theirs


def _proof(secret: bytes | None, role: bytes, first: bytes, second: bytes) -> bytes:
    if not secret:
        return bytes(32)
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def _authenticate(sock: socket.socket, secret: bytes | None, mine: Hello, theirs: Hello,
                  deadline: _Deadline, client: bool) -> None:
    if not (mine.flags | theirs.flags) & FLAG_AUTH:
        return
    if client:
        _send(sock, _proof(secret, b"client", theirs.nonce, mine.nonce), deadline)
        if recv_exact(sock, 1, deadline) != b"\x01":
            raise AuthenticationError(
                "server requires a shared secret (set LAMINA_SECRET)" if not secret
                else "server rejected our shared-secret proof (secrets differ)")
        server_proof = recv_exact(sock, 32, deadline)
        if not secret or not hmac.compare_digest(server_proof, _proof(secret, b"server", mine.nonce, theirs.nonce)):
            raise AuthenticationError("server failed the shared-secret challenge (secrets differ)"
                                      if secret else "server demands authentication but we hold no secret")
        return
    client_proof = recv_exact(sock, 32, deadline)
    if not secret or not hmac.compare_digest(client_proof, _proof(secret, b"client", mine.nonce, theirs.nonce)):
        _send(sock, b"\x00", deadline)  # an explicit verdict, so the client can say why
        raise AuthenticationError("client failed the shared-secret challenge (wrong or missing LAMINA_SECRET)")
    _send(sock, b"\x01" + _proof(secret, b"server", theirs.nonce, mine.nonce), deadline)


@dataclasses.dataclass
class Negotiated:
    transport: int
    peer_data: bytes


def pick_transport(requested: int, ours: int, theirs: int) -> int:
    """The best transport both sides have among those requested (verbs first)."""
    from ._bindings import lib
    common = requested & ours & theirs
    for candidate in (lib.LM_TRANSPORT_VERBS, lib.LM_TRANSPORT_TCP):
        if common & candidate:
            return candidate
    raise UnsupportedError(
        f"no common transport (requested 0x{requested:x}, local 0x{ours:x}, peer 0x{theirs:x})")


def client_handshake(sock: socket.socket, transports: int, requested: int, secret: bytes | None,
                     private_data: bytes, timeout: float | None) -> Negotiated:
    deadline = _Deadline(timeout)
    if len(private_data) > MAX_PRIVATE_DATA:
        raise ValueError(f"private data is {len(private_data)} bytes; at most {MAX_PRIVATE_DATA}")
    mine, theirs = _exchange_hello(sock, transports, secret, deadline, client=True)
    _authenticate(sock, secret, mine, theirs, deadline, client=True)
    transport = pick_transport(requested, transports, theirs.transports)
    _send(sock, _CHOOSE.pack(transport, len(private_data)) + private_data, deadline)
    status, data_len, reason_len = _ACCEPT.unpack(recv_exact(sock, _ACCEPT.size, deadline))
    if data_len > MAX_PRIVATE_DATA or reason_len > 4096:
        raise ProtocolError("oversized handshake reply")
    reason = recv_exact(sock, reason_len, deadline).decode(errors="replace")
    peer_data = recv_exact(sock, data_len, deadline)
    if status != 0:
        raise UnsupportedError(f"server refused the connection: {reason}")
    return Negotiated(transport, peer_data)


def server_handshake(sock: socket.socket, transports: int, allowed: int, secret: bytes | None,
                     reply_data, timeout: float | None) -> Negotiated:
    """reply_data: bytes, or a callable(peer_data) -> bytes."""
    deadline = _Deadline(timeout)
    mine, theirs = _exchange_hello(sock, transports, secret, deadline, client=False)
    _authenticate(sock, secret, mine, theirs, deadline, client=False)
    transport, data_len = _CHOOSE.unpack(recv_exact(sock, _CHOOSE.size, deadline))
    if data_len > MAX_PRIVATE_DATA:
        raise ProtocolError(f"client offers {data_len} bytes of private data; at most {MAX_PRIVATE_DATA}")
    peer_data = recv_exact(sock, data_len, deadline)
    if transport not in (1, 2) or not transport & transports & allowed:
        reason = f"transport 0x{transport:x} is not available on this server".encode()
        _send(sock, _ACCEPT.pack(-10, 0, len(reason)) + reason, deadline)
        raise UnsupportedError(reason.decode())
    reply = reply_data(peer_data) if callable(reply_data) else reply_data
    if len(reply) > MAX_PRIVATE_DATA:
        raise ValueError(f"private data is {len(reply)} bytes; at most {MAX_PRIVATE_DATA}")
    _send(sock, _ACCEPT.pack(0, len(reply), 0) + reply, deadline)
    return Negotiated(transport, peer_data)


def exchange_address(sock: socket.socket, address: bytes, timeout: float | None, client: bool) -> bytes:
    """Swap transport addresses (verbs QP info); length-prefixed, bounded."""
    deadline = _Deadline(timeout)
    packed = struct.pack("<H", len(address)) + address

    def receive() -> bytes:
        (n,) = struct.unpack("<H", recv_exact(sock, 2, deadline))
        if n > MAX_ADDRESS:
            raise ProtocolError(f"peer address of {n} bytes")
        return recv_exact(sock, n, deadline)

    if client:
        _send(sock, packed, deadline)
        return receive()
    theirs = receive()
    _send(sock, packed, deadline)
    return theirs


def secret_from(value: str | bytes | None) -> bytes | None:
    """The shared secret: the argument, else $LAMINA_SECRET, else none."""
    if value is None:
        value = os.environ.get("LAMINA_SECRET") or None
    if isinstance(value, str):
        value = value.encode()
    return value or None
