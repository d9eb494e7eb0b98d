"""Connection bootstrap: the versioned handshake every endpoint starts with.

Over a fresh TCP connection (client first):

  HELLO   both ways: magic "LMNA", protocol version, flags (AUTH: this side
          holds a secret), transports it can run (LM_TRANSPORT_* bits), a
          16-byte random nonce, and a 16-byte host identity (a digest of the
          boot id and the PID and IPC namespaces: shm only between equals).
  AUTH    if either side holds a secret, both prove it: HMAC-SHA256 over the
          role and both nonces (mutual challenge-response). The client proves
          first; the server answers a verdict byte and, if accepted, its own
          proof. A side without the secret, or with another, gets
          AuthenticationError naming the cause.
  CHOOSE  client -> server: the transport it picked from the common set, and
          its private data (up to 64 KiB, e.g. region descriptors).
  ACCEPT  server -> client: status (0, or an error with a reason) and the
          server's private data.
  ADDRESS verbs and shm, both ways: the queue-pair address (QPN, PSN, GID,
          MTU), or the shared ring to open (pid, memfd, nonce, boot id and
          namespaces, which the native side checks again).

Every read has a deadline, and any byte sequence that is not this exchange
raises ProtocolError (a reset connection PeerLostError), so a garbage-spewing
or silent client costs the server one timeout, never a crash or a hang.

The server side is split in two so that a listener can run the part an
unauthenticated peer controls off the accepting thread (HandshakeGate):
server_authenticate (HELLO, AUTH, CHOOSE) and server_reply (ACCEPT), whose
private data may depend on the application's accept() call.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import logging
import os
import select as _select
import selectors
import socket
import struct
import threading
import time
from typing import Callable, Union

from .errors import (AuthenticationError, ClosedError, InvalidArgumentError, LaminaError, PeerLostError,
                     ProtocolError, TimeoutError_, UnsupportedError)

log = logging.getLogger("lamina_comm")

MAGIC = b"LMNA"
# 2: tcp wire rules (reads in pieces of <= 1 MiB, <= 16 in flight, answers only to
# frames already sent); an older peer is refused by name instead of failing mid-stream.
# 3: the host identity in HELLO (shm transport).
VERSION = 3
FLAG_AUTH = 1
MAX_PRIVATE_DATA = 64 * 1024
MAX_ADDRESS = 1024
MAX_REASON = 4096  # bytes of refusal text a client accepts in ACCEPT
NONCE_BYTES = 16

_HELLO = struct.Struct("<4sHHI16s16s")
_CHOOSE = struct.Struct("<II")
_ACCEPT = struct.Struct("<iII")  # status, private data length, reason length


@dataclasses.dataclass
class Hello:
    version: int
    flags: int
    transports: int
    nonce: bytes
    host: bytes = bytes(16)


_HOST_IDENTITY: list[bytes] = []


def host_identity() -> bytes:
    """16 bytes equal for two processes exactly when shared memory can join them: same boot, same PID and
    IPC namespaces (the native shm transport checks the same facts again at connect)."""
    if not _HOST_IDENTITY:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                boot = f.read().strip()
            parts = [boot] + [str(os.stat(f"/proc/self/ns/{ns}").st_ino).encode() for ns in ("pid", "ipc")]
            _HOST_IDENTITY.append(hashlib.sha256(b"|".join(parts)).digest()[:16])
        except OSError:
            _HOST_IDENTITY.append(os.urandom(16))  # unknown: never equal to a peer's
    return _HOST_IDENTITY[0]


def _new_nonce() -> bytes:
    """This side's challenge nonce (a function, so a fuzz harness can pin it)."""
    return os.urandom(NONCE_BYTES)


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
        except OSError as exc:  # reset by the peer, or shut down by Listener.close()
            raise PeerLostError(f"connection lost during the handshake: {exc}") from exc
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
    except OSError as exc:
        raise PeerLostError(f"connection lost during the handshake: {exc}") from exc


def _exchange_hello(sock: socket.socket, transports: int, secret: bytes | None,
                    deadline: _Deadline, client: bool) -> tuple[Hello, Hello]:
    mine = Hello(VERSION, FLAG_AUTH if secret else 0, transports, _new_nonce(), host_identity())
    packed = _HELLO.pack(MAGIC, mine.version, mine.flags, mine.transports, mine.nonce, mine.host)

    def receive() -> Hello:
        # The version sits at the same place in every version's HELLO: an older peer is named as such.
        head = recv_exact(sock, 6, deadline)
        magic, version = struct.unpack("<4sH", head)
        if magic != MAGIC:
            raise ProtocolError(f"not a lamina-comm peer (magic {magic!r})")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
        _, _, flags, peer_transports, nonce, host = _HELLO.unpack(
            head + recv_exact(sock, _HELLO.size - 6, deadline))
        return Hello(version, flags, peer_transports, nonce, host)

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
    why_not_shm: str = ""  # set when both could have had shm and it was not chosen


def _why_not_shm(transport: int, requested: int, ours: int, theirs: Hello, mine: Hello) -> str:
    """Why this connection did not get shm although this side asked for it ("" if it did or did not ask)."""
    from ._bindings import lib
    shm = lib.LM_TRANSPORT_SHM
    if transport == shm or not requested & ours & shm:
        return ""
    if not theirs.transports & shm:
        return "the peer did not offer shm (its context does not have it, or it asked for another transport)"
    if theirs.host != mine.host:
        return "the peer is on another host, or in another PID or IPC namespace"
    return "the other side asked for another transport"


def pick_transport(requested: int, ours: int, theirs: int, same_host: bool = False) -> int:
    """The best transport both sides have among those requested: shm between processes of one host
    (and namespaces), else verbs, else tcp."""
    from ._bindings import lib
    common = requested & ours & theirs
    if not same_host:
        common &= ~lib.LM_TRANSPORT_SHM
    for candidate in (lib.LM_TRANSPORT_SHM, lib.LM_TRANSPORT_VERBS, lib.LM_TRANSPORT_TCP):
        if common & candidate:
            return candidate
    why = " (shm needs both peers on one host, in the same PID and IPC namespaces)" \
        if requested & ours & theirs & lib.LM_TRANSPORT_SHM else ""
    raise UnsupportedError(
        f"no common transport (requested 0x{requested:x}, local 0x{ours:x}, peer 0x{theirs:x}){why}")


def client_handshake(sock: socket.socket, transports: int, requested: int, secret: bytes | None,
                     private_data: bytes, timeout: float | None) -> Negotiated:
    deadline = _Deadline(timeout)
    if len(private_data) > MAX_PRIVATE_DATA:
        raise InvalidArgumentError(f"private data is {len(private_data)} bytes; at most {MAX_PRIVATE_DATA}")
    mine, theirs = _exchange_hello(sock, transports, secret, deadline, client=True)
    _authenticate(sock, secret, mine, theirs, deadline, client=True)
    transport = pick_transport(requested, transports, theirs.transports, mine.host == theirs.host)
    _send(sock, _CHOOSE.pack(transport, len(private_data)) + private_data, deadline)
    status, data_len, reason_len = _ACCEPT.unpack(recv_exact(sock, _ACCEPT.size, deadline))
    if data_len > MAX_PRIVATE_DATA or reason_len > MAX_REASON:
        raise ProtocolError("oversized handshake reply")
    reason = recv_exact(sock, reason_len, deadline).decode(errors="replace")
    peer_data = recv_exact(sock, data_len, deadline)
    if status != 0:
        raise UnsupportedError(f"server refused the connection: {reason}")
    return Negotiated(transport, peer_data, _why_not_shm(transport, requested, transports, theirs, mine))


ReplyData = Union[bytes, Callable[[bytes], bytes]]


def server_authenticate(sock: socket.socket, transports: int, allowed: int, secret: bytes | None,
                        timeout: float | None) -> Negotiated:
    """The server's side up to the client's CHOOSE: everything an unauthenticated peer controls.

    A transport this server cannot run is refused here (ACCEPT with an error), so
    what it returns is a peer that only waits for server_reply.
    """
    deadline = _Deadline(timeout)
    mine, theirs = _exchange_hello(sock, transports, secret, deadline, client=False)
    _authenticate(sock, secret, mine, theirs, deadline, client=False)
    transport, data_len = _CHOOSE.unpack(recv_exact(sock, _CHOOSE.size, deadline))
    if data_len > MAX_PRIVATE_DATA:
        raise ProtocolError(f"client offers {data_len} bytes of private data; at most {MAX_PRIVATE_DATA}")
    peer_data = recv_exact(sock, data_len, deadline)
    from ._bindings import lib
    known = (lib.LM_TRANSPORT_TCP, lib.LM_TRANSPORT_VERBS, lib.LM_TRANSPORT_SHM)
    if transport not in known or not transport & transports & allowed or \
            (transport == lib.LM_TRANSPORT_SHM and mine.host != theirs.host):
        reason = f"transport 0x{transport:x} is not available on this server".encode()
        if transport == lib.LM_TRANSPORT_SHM and transport & transports & allowed:
            reason = b"transport shm needs a peer on this host, in the same PID and IPC namespaces"
        _send(sock, _ACCEPT.pack(-10, 0, len(reason)) + reason, deadline)
        raise UnsupportedError(reason.decode())
    return Negotiated(transport, peer_data, _why_not_shm(transport, allowed, transports, theirs, mine))


def server_reply(sock: socket.socket, negotiated: Negotiated, reply_data: ReplyData,
                 timeout: float | None) -> None:
    """ACCEPT: the server's private data (bytes, or a callable of the client's data)."""
    deadline = _Deadline(timeout)
    reply = reply_data(negotiated.peer_data) if callable(reply_data) else reply_data
    if len(reply) > MAX_PRIVATE_DATA:
        raise InvalidArgumentError(f"private data is {len(reply)} bytes; at most {MAX_PRIVATE_DATA}")
    _send(sock, _ACCEPT.pack(0, len(reply), 0) + reply, deadline)


def server_handshake(sock: socket.socket, transports: int, allowed: int, secret: bytes | None,
                     reply_data: ReplyData, timeout: float | None) -> Negotiated:
    """The whole server side inline. reply_data: bytes, or a callable(peer_data) -> bytes."""
    deadline = _Deadline(timeout)
    negotiated = server_authenticate(sock, transports, allowed, secret, deadline.left())
    server_reply(sock, negotiated, reply_data, deadline.left())
    return negotiated


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


# --------------------------------------------------------------------------
# Pre-authentication admission: handshakes off the accepting thread

# Handshakes in progress plus authenticated peers not yet taken by accept(),
# over all sources; a connection over the bound is closed at once.
DEFAULT_MAX_PENDING = 64
# The same, from one source address: one host cannot fill the listener.
DEFAULT_MAX_PENDING_PER_SOURCE = 8
# Deadline of the server's pre-authentication handshake (HELLO, AUTH, CHOOSE).
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
# Refusals (over a bound, failed handshake) are logged at most this often, with a count.
REFUSAL_LOG_INTERVAL_S = 10.0
# Pause after a failing accept() (e.g. out of file descriptors) so the loop does not spin.
_ACCEPT_ERROR_BACKOFF_S = 0.1
# Slack on joining the gate's threads at close(), past the handshake deadline that
# bounds them anyway; their sockets are shut down first, so they return at once.
_JOIN_GRACE_S = 1.0


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """Bounds on connections that have not been taken by accept() yet (see the constants)."""

    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_per_source < 1:
            raise InvalidArgumentError("max_pending and max_pending_per_source must be >= 1")
        if self.handshake_timeout is None or not self.handshake_timeout > 0:
            raise InvalidArgumentError(f"handshake_timeout must be > 0, got {self.handshake_timeout}")


class _RateLimitedLog:
    """A warning at most once per interval; the ones in between are counted, not lost."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S):
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            message += f" ({suppressed} similar since the last report)"
        log.warning(message, *args)


@dataclasses.dataclass(eq=False)
class PendingPeer:
    """A connection whose client passed server_authenticate and waits for ACCEPT."""

    sock: socket.socket
    address: tuple
    negotiated: Negotiated
    watched: bool = False  # registered in the gate's selector (to notice a hang-up)

    @property
    def source(self) -> str:
        return self.address[0]


class HandshakeGate:
    """Accepts on a listening socket and authenticates each connection on its own thread.

    Bounded in total and per source address (AdmissionLimits), each handshake
    with its deadline, so idle or slow clients never delay a real peer; take()
    returns the next peer that passed. fileno() is readable while one waits.
    A waiting peer that hangs up (or talks out of turn) is dropped. Only
    bootstrap code runs on the gate's threads: no native calls.
    """

    def __init__(self, sock: socket.socket, transports: int, allowed: int, secret: bytes | None,
                 limits: AdmissionLimits = AdmissionLimits()):
        self._listen_sock = sock
        self._transports, self._allowed, self._secret = transports, allowed, secret
        self.limits = limits
        self._lock = threading.Lock()
        self._ready_cv = threading.Condition(self._lock)
        self._handshaking: dict[socket.socket, str] = {}
        self._ready: collections.deque[PendingPeer] = collections.deque()
        self._to_watch: list[PendingPeer] = []
        self._per_source: collections.Counter[str] = collections.Counter()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._refusals = _RateLimitedLog()
        self._ready_r, self._ready_w = _nonblocking_pipe()  # one byte while a peer is ready
        self._wake_r, self._wake_w = _nonblocking_pipe()
        sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._loop = threading.Thread(target=self._accept_loop, name="lamina-listener", daemon=True)
        self._loop.start()

    # -- the caller's side ---------------------------------------------------
    def fileno(self) -> int:
        return self._ready_r

    def take(self, timeout: float | None) -> PendingPeer:
        """The next authenticated peer; TimeoutError_ after timeout s, ClosedError once closed."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            peer = self._pop_ready(end, timeout)
            if not _hung_up(peer.sock):
                return peer
            # It left after the accepting thread last looked: skip it.
            log.debug("peer %s:%s hung up before accept()", peer.address[0], peer.address[1])
            peer.sock.close()

    def _pop_ready(self, end: float | None, timeout: float | None) -> PendingPeer:
        with self._ready_cv:
            while not self._ready and not self._closed:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError_(f"no peer connected within {timeout} s")
                self._ready_cv.wait(left)
            if self._closed:
                raise ClosedError("listener closed")
            peer = self._ready.popleft()
            self._forget_ready(peer)
            return peer

    def pending(self) -> tuple[int, int]:
        """(handshakes in progress, authenticated peers waiting): for tests and metrics."""
        with self._lock:
            return len(self._handshaking), len(self._ready)

    def close(self) -> None:
        """Stop accepting, end every handshake, close every socket not yet taken; never hangs."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ready_cv.notify_all()
            for conn in self._handshaking:
                _shutdown(conn)  # wakes its thread's recv at once
            threads = list(self._threads)
        _poke(self._wake_w)
        for thread in [self._loop, *threads]:
            if thread is not threading.current_thread():  # a finalizer may run on any thread
                thread.join(_JOIN_GRACE_S + self.limits.handshake_timeout)
        with self._lock:
            ready, self._ready = list(self._ready), collections.deque()
        for peer in ready:
            peer.sock.close()
        self._selector.close()
        self._listen_sock.close()
        for fd in (self._ready_r, self._ready_w, self._wake_r, self._wake_w):
            os.close(fd)

    # -- the accepting thread --------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select():
                if self._closed:
                    return
                if key.data == "listen":
                    self._admit_one()
                elif key.data == "wake":
                    self._drain_wake()
                    self._watch_new_ready()
                else:
                    self._drop_hung_up(key.data)

    def _admit_one(self) -> None:
        try:
            conn, address = self._listen_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: back off instead of spinning
            self._refusals.warning("listener accept failed: %s", exc)
            time.sleep(_ACCEPT_ERROR_BACKOFF_S)
            return
        refusal = self._admit(conn, address)
        if refusal:
            self._refusals.warning("refused connection from %s:%s: %s", address[0], address[1], refusal)
            conn.close()

    def _admit(self, conn: socket.socket, address: tuple) -> str:
        """Count conn against the bounds and start its handshake; why it is refused, or ""."""
        source = address[0]
        with self._lock:
            if self._closed:
                return "listener closing"
            if len(self._handshaking) + len(self._ready) >= self.limits.max_pending:
                return f"{self.limits.max_pending} connections already pending (max_pending)"
            if self._per_source[source] >= self.limits.max_pending_per_source:
                return (f"{self.limits.max_pending_per_source} connections from this source already pending "
                        "(max_pending_per_source)")
            self._handshaking[conn] = source
            self._per_source[source] += 1
            thread = threading.Thread(target=self._run_handshake, args=(conn, address),
                                      name=f"lamina-handshake-{source}", daemon=True)
            self._threads.add(thread)
            thread.start()  # under the lock, so close() never sees an unstarted thread
            return ""

    def _run_handshake(self, conn: socket.socket, address: tuple) -> None:
        try:
            conn.setblocking(True)
            negotiated = server_authenticate(conn, self._transports, self._allowed, self._secret,
                                             self.limits.handshake_timeout)
        except (LaminaError, OSError) as exc:
            self._refusals.warning("refused peer %s:%s: %s", address[0], address[1], exc)
            self._finish_handshake(conn, None)
        except BaseException:
            self._finish_handshake(conn, None)
            raise
        else:
            self._finish_handshake(conn, PendingPeer(conn, address, negotiated))
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _finish_handshake(self, conn: socket.socket, peer: PendingPeer | None) -> None:
        with self._lock:
            source = self._handshaking.pop(conn)
            if peer is not None and not self._closed:
                self._ready.append(peer)
                self._to_watch.append(peer)
                if len(self._ready) == 1:
                    _poke(self._ready_w)
                self._ready_cv.notify()
                _poke(self._wake_w)
                return
            self._release_source(source)
        conn.close()

    def _watch_new_ready(self) -> None:
        with self._lock:
            for peer in self._to_watch:
                if peer in self._ready:  # not taken meanwhile
                    self._selector.register(peer.sock, selectors.EVENT_READ, peer)
                    peer.watched = True
            self._to_watch.clear()

    def _drop_hung_up(self, peer: PendingPeer) -> None:
        """A waiting client sends nothing before ACCEPT: readable means it left (or misbehaves)."""
        with self._lock:
            if peer not in self._ready:
                return
            self._ready.remove(peer)
            self._forget_ready(peer)
        log.debug("peer %s:%s hung up before accept()", peer.address[0], peer.address[1])
        peer.sock.close()

    # -- shared bookkeeping (called with the lock held) -------------------------
    def _forget_ready(self, peer: PendingPeer) -> None:
        if peer.watched:
            self._selector.unregister(peer.sock)
            peer.watched = False
        self._release_source(peer.source)
        if not self._ready:
            _drain(self._ready_r)

    def _release_source(self, source: str) -> None:
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def _drain_wake(self) -> None:
        _drain(self._wake_r)


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _poke(fd: int) -> None:
    """One byte into a wake-up pipe; a full pipe is already readable."""
    try:
        os.write(fd, b"!")
    except BlockingIOError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _hung_up(sock: socket.socket) -> bool:
    """A client waiting for ACCEPT sends nothing: anything readable (EOF, bytes, reset) disqualifies it."""
    try:
        readable, _, _ = _select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
