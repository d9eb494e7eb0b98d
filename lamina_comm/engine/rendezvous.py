"""Rendezvous: a world of model ranks and attention ranks that find each other from one address.

One process runs a ``RendezvousServer`` (a launcher, or attention rank 0);
every rank calls ``rendezvous(address, role=, rank=, world=, advertise=)``
with the address its own listener is reachable on, and gets back the
``World``: every rank's address. Messages are one JSON line each way,
followed by a line with its HMAC-SHA256 under the shared secret (``secret``
or ``$LAMINA_SECRET``) when there is one; the server checks it and signs its
answers, so a rank never dials an address nobody with the secret gave.

While the world is incomplete the server sends each waiting rank a progress
line naming the ranks still missing; a rank whose wait runs out raises
``RendezvousTimeout`` naming them ("attention rank 1 never came").
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from lamina_comm.bootstrap import secret_from
from lamina_comm.errors import LaminaError, TimeoutError_

log = logging.getLogger("lamina_comm.engine.rendezvous")

ROLES = ("model", "attention")
_MAX_LINE = 64 * 1024
_MAX_RANKS = 4096
_REQUEST_TIMEOUT_S = 5.0  # a connection must send its registration within this


class RendezvousError(LaminaError):
    """The rendezvous refused a rank or answered something unexpected."""


class RendezvousTimeout(TimeoutError_):
    """Not every rank came in time; ``missing`` lists them as (role, rank)."""

    def __init__(self, message: str, missing: list[tuple[str, int]]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class World:
    """Every rank's address: ``model[i]`` and ``attention[j]`` are ``HOST:PORT``."""

    model: tuple[str, ...]
    attention: tuple[str, ...]

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.model), len(self.attention)


def _sign(secret: Optional[bytes], line: bytes) -> bytes:
    return hmac.new(secret, line, hashlib.sha256).hexdigest().encode() if secret else b"-"


def _send(sock: socket.socket, secret: Optional[bytes], message: dict[str, Any]) -> None:
    line = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(line + b"\n" + _sign(secret, line) + b"\n")


class _Lines:
    """Signed JSON lines from a socket, each within the caller's deadline."""

    def __init__(self, sock: socket.socket, secret: Optional[bytes]):
        self.sock, self.secret, self.buffer = sock, secret, b""

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError_("rendezvous: no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise RendezvousError("rendezvous: the connection closed")
            self.buffer += chunk
            if len(self.buffer) > 2 * _MAX_LINE:
                raise RendezvousError("rendezvous: a line over the size bound")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def read(self, deadline: float) -> dict[str, Any]:
        line, signature = self._line(deadline), self._line(deadline)
        if not hmac.compare_digest(_sign(self.secret, line), signature.strip()):
            raise RendezvousError("rendezvous: a message with a wrong or missing signature (shared secret differs?)")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise RendezvousError(f"rendezvous: a message that is not JSON: {exc!r}"[:200]) from None
        if not isinstance(message, dict):
            raise RendezvousError("rendezvous: a message that is not a JSON object")
        return message


class RendezvousServer:
    """Collects ranks until the world (``model_ranks`` + ``attention_ranks``) is complete, then tells all.

    A rank that registers again (a restart) replaces its earlier entry. The
    server keeps serving after the world is complete, so a rank that comes
    late, or again, gets the table at once. ``close()`` stops it.
    """

    def __init__(self, address: str | tuple[str, int], model_ranks: int, attention_ranks: int,
                 secret: Optional[str | bytes] = None):
        if not (1 <= model_ranks <= _MAX_RANKS and 1 <= attention_ranks <= _MAX_RANKS):
            raise ValueError(f"a world needs 1..{_MAX_RANKS} ranks of each role, got {model_ranks}, "
                             f"{attention_ranks}")
        self.sizes = {"model": model_ranks, "attention": attention_ranks}
        self.secret = secret_from(secret)
        host, port = _split(address)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.address = "%s:%d" % self._sock.getsockname()[:2]
        self._ranks: dict[tuple[str, int], str] = {}
        self._changed = threading.Condition()
        self._closed = False
        # Each connection has a thread while it is served: at most this many (one more is closed at once).
        self.max_connections = 2 * (model_ranks + attention_ranks) + 16
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._thread = threading.Thread(target=self._accept_loop, name="rendezvous", daemon=True)
        self._thread.start()

    def missing(self) -> list[tuple[str, int]]:
        with self._changed:
            return self._missing_locked()

    def _missing_locked(self) -> list[tuple[str, int]]:
        return [(role, rank) for role in ROLES for rank in range(self.sizes[role]) if (role, rank) not in self._ranks]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("rendezvous: accept failed (%s); going on", exc)  # e.g. out of descriptors
                time.sleep(0.05)
                continue
            if self._closed:
                conn.close()
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # over max_connections: refused at once, nobody waits for it
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="rendezvous-rank", daemon=True).start()
            except RuntimeError:  # no thread to be had
                self._slots.release()
                conn.close()
                time.sleep(0.05)

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_one(conn)
        except OSError:
            pass  # the rank went away; an entry it made stays for the others
        finally:
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        # A fresh nonce per connection, signed into every line after it: a recorded
        # registration or answer is worth nothing on another connection.
        nonce = secrets.token_hex(16)
        _send(conn, self.secret, {"nonce": nonce})
        try:
            request = _Lines(conn, self.secret).read(time.monotonic() + _REQUEST_TIMEOUT_S)
            if request.get("nonce") != nonce:
                raise RendezvousError("rendezvous: a registration without this connection's nonce (a replay?)")
            key, address = self._check(request)
        except LaminaError as exc:
            _send(conn, self.secret, {"ok": False, "error": str(exc), "nonce": nonce})
            return
        with self._changed:
            self._ranks[key] = address
            self._changed.notify_all()
        log.info("%s rank %d at %s joined", key[0], key[1], address)
        self._answer_when_complete(conn, nonce)

    def _check(self, request: dict[str, Any]) -> tuple[tuple[str, int], str]:
        role, rank, address, world = (request.get(k) for k in ("role", "rank", "address", "world"))
        expected = [self.sizes["model"], self.sizes["attention"]]
        if role not in ROLES:
            raise RendezvousError(f"rendezvous: role must be one of {ROLES}, got {str(role)[:40]!r}")
        if world != expected:
            raise RendezvousError(f"rendezvous: this world has {expected[0]} model and {expected[1]} attention "
                                  f"ranks, the rank says {str(world)[:40]}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.sizes[role]:
            raise RendezvousError(f"rendezvous: {role} rank must be in [0, {self.sizes[role]}), got {str(rank)[:40]}")
        if not isinstance(address, str) or len(address) > 300 or (role == "attention" and ":" not in address):
            raise RendezvousError(f"rendezvous: an attention rank's address must be HOST:PORT (a model rank's "
                                  f"any short text), got {str(address)[:40]!r}")
        return (role, rank), address

    def _answer_when_complete(self, conn: socket.socket, nonce: str) -> None:
        last_missing: Optional[list[tuple[str, int]]] = None
        while True:
            with self._changed:
                missing = self._missing_locked()
                if missing and missing == last_missing and not self._closed:
                    self._changed.wait(1.0)
                    continue
                table = dict(self._ranks)
            if self._closed:
                return
            if not missing:
                world = {role: [table[(role, rank)] for rank in range(self.sizes[role])] for role in ROLES}
                _send(conn, self.secret, {"ok": True, "world": world, "nonce": nonce})
                return
            _send(conn, self.secret, {"ok": True, "missing": [list(m) for m in missing], "nonce": nonce})
            last_missing = missing

    def close(self) -> None:
        """Stop: the port is released (a thread blocked in accept() is woken) and waiting ranks let go."""
        self._closed = True
        with self._changed:
            self._changed.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "RendezvousServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def rendezvous(address: str | tuple[str, int], *, role: str, rank: int, world: tuple[int, int],
               advertise: str = "", secret: Optional[str | bytes] = None, timeout: float = 60.0) -> World:
    """Register ``advertise`` as (role, rank) and wait for the whole world; its addresses.

    An attention rank advertises the ``HOST:PORT`` its service listens on; a
    model rank dials out only and may advertise any name (or nothing).

    Retries a refused connection (the server may start after this rank)
    until ``timeout``; ``RendezvousTimeout`` names the ranks still missing.
    """
    key = secret_from(secret)
    deadline = time.monotonic() + timeout
    host, port = _split(address)
    sock = _connect_retrying(host, port, deadline)
    missing: list[tuple[str, int]] = []
    with sock:
        lines = _Lines(sock, key)
        try:
            nonce = lines.read(deadline).get("nonce")
        except TimeoutError_:
            raise RendezvousTimeout(f"rendezvous at {host}:{port} said nothing within {timeout} s", []) from None
        if not isinstance(nonce, str):
            raise RendezvousError("rendezvous: the server opened without a nonce")
        _send(sock, key, {"role": role, "rank": rank, "address": advertise, "world": list(world), "nonce": nonce})
        while True:
            try:
                answer = lines.read(deadline)
            except TimeoutError_:
                names = ", ".join(f"{r} rank {n}" for r, n in missing) or "(unknown: no progress was heard)"
                raise RendezvousTimeout(f"rendezvous at {host}:{port}: not every rank came within {timeout} s; "
                                        f"never came: {names}", missing) from None
            if answer.get("nonce") != nonce:
                raise RendezvousError("rendezvous: an answer signed for another connection (a replay?)")
            if not answer.get("ok"):
                raise RendezvousError(str(answer.get("error", "rendezvous refused this rank")))
            if "world" in answer:
                table = answer["world"]
                return World(tuple(table["model"]), tuple(table["attention"]))
            missing = [(str(r), int(n)) for r, n in answer.get("missing", [])]


def _connect_retrying(host: str, port: int, deadline: float) -> socket.socket:
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            if time.monotonic() + 0.1 > deadline:
                raise RendezvousTimeout(f"rendezvous at {host}:{port} unreachable: {exc}", []) from None
            time.sleep(0.1)


def _split(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)
