"""Run-time membership: attention workers join and leave a running cluster.

A worker announces itself to each model node's front door:
``POST /cluster/join`` (or ``/cluster/leave``) with ``{"address": "HOST:PORT",
"time": UNIX_SECONDS}``. A joiner stands by as a spare and is used for the
next replacement (a worker restarted on a new port, or a new spare); a leaving
spare is forgotten and a leaving active worker is taken out at once, its
requests rebuilt on a spare as after a loss.

When the cluster has a shared secret (``--secret`` / ``$LAMINA_SECRET``) the
call must carry ``X-Lamina-Signature: hex(HMAC-SHA256(secret, body))`` and a
``time`` within ``MAX_CLOCK_SKEW_S``, so that nobody without the secret can
point the model node at an address; each signed call is taken once (a
``ReplayGuard`` remembers the signatures of the window), so a recorded call
cannot be replayed. (A joined address is used only after the transport's own
secret handshake with it succeeds.)
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

from lamina_comm.bootstrap import secret_from

log = logging.getLogger("lamina_comm.node.membership")

SIGNATURE_HEADER = "X-Lamina-Signature"
MAX_CLOCK_SKEW_S = 60.0
_MAX_HOST = 253
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


class MembershipError(ValueError):
    """A join or leave call that cannot be taken; ``http_status`` says why (400, 401)."""

    def __init__(self, message: str, http_status: int = 400):
        super().__init__(message)
        self.http_status = http_status


def signature(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def parse_call(body: Optional[bytes], signature_header: Optional[str], secret: Optional[bytes],
               now: Optional[float] = None, seen: Optional["ReplayGuard"] = None) -> str:
    """The announced address of a join/leave body, after the signature, freshness and replay checks."""
    if body is None:
        raise MembershipError("a JSON body {\"address\": \"HOST:PORT\"} is required")
    if secret is not None:
        given = (signature_header or "").strip().encode("utf-8", "replace")  # bytes: any header compares
        if not given or not hmac.compare_digest(signature(secret, body).encode(), given):
            raise MembershipError(f"missing or wrong {SIGNATURE_HEADER} (HMAC-SHA256 of the body with the "
                                  f"cluster's secret)", 401)
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MembershipError(f"body is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise MembershipError("body must be a JSON object")
    address = parse_address(message.get("address"))
    if secret is not None:
        sent = message.get("time")
        now = time.time() if now is None else now
        if isinstance(sent, bool) or not isinstance(sent, (int, float)) or not abs(now - sent) <= MAX_CLOCK_SKEW_S:
            raise MembershipError(f"a signed call needs a \"time\" within {MAX_CLOCK_SKEW_S:.0f} s of the model "
                                  f"node's clock", 401)
        if seen is not None and not seen.first_use(given, now):
            raise MembershipError("this signed call was already taken (a replay)", 401)
    return address


class ReplayGuard:
    """Signatures of signed calls taken in the last 2 x MAX_CLOCK_SKEW_S: each is taken once.

    Older ones need no memory: their ``time`` is out of the window anyway.
    """

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._seen: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def first_use(self, signature_bytes: bytes, now: float) -> bool:
        with self._lock:
            if len(self._seen) >= self.capacity:
                horizon = now - 2 * MAX_CLOCK_SKEW_S
                self._seen = {sig: at for sig, at in self._seen.items() if at >= horizon}
                if len(self._seen) >= self.capacity:
                    raise MembershipError("too many signed calls in the last two minutes; try again later", 503)
            if signature_bytes in self._seen:
                return False
            self._seen[signature_bytes] = now
            return True


def parse_address(value: Any) -> str:
    """``HOST:PORT`` checked (a DNS name or IPv4 literal: ASCII labels of 1 to 63 letters, digits,
    ``-`` or ``_``; a port in 1..65535), returned as given."""
    if not isinstance(value, str):
        raise MembershipError("\"address\" must be a string HOST:PORT")
    host, sep, port = value.rpartition(":")
    labels = host.split(".")
    if not sep or not host or len(host) > _MAX_HOST or not (port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536 or not all(_LABEL.fullmatch(label) for label in labels):
        raise MembershipError(f"\"address\" must be HOST:PORT, got {value[:80]!r}")
    return value


def announce(http: str, action: str, address: str, secret: Optional[str] = None,
             timeout: float = 5.0) -> dict[str, Any]:
    """POST /cluster/<action> to the model node at ``http``; its JSON answer, or MembershipError."""
    body = json.dumps({"address": address, "time": time.time()}).encode()
    headers = {"Content-Type": "application/json"}
    key = secret_from(secret)
    if key is not None:
        headers[SIGNATURE_HEADER] = signature(key, body)
    request = urllib.request.Request(f"http://{http}/cluster/{action}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read() or b"{}").get("error", "")
        except ValueError:
            reason = ""
        raise MembershipError(f"model node at {http} refused the {action}: {exc.code} {reason}",
                              exc.code) from None


class Announcer:
    """An attention node's joins: each model node is asked until it accepts (a background thread)."""

    def __init__(self, model_nodes: Sequence[str], address: str, secret: Optional[str] = None,
                 retry_s: float = 1.0):
        self.model_nodes = list(model_nodes)
        self.address = address
        self.secret = secret
        self.retry_s = retry_s
        self.joined: dict[str, str] = {}  # model node -> what it took us for ("spare", "worker")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        pending = list(self.model_nodes)
        while pending and not self._stop.is_set():
            for http in list(pending):
                try:
                    answer = announce(http, "join", self.address, self.secret)
                except (MembershipError, OSError) as exc:
                    log.debug("join at %s: %s", http, exc)
                    continue
                self.joined[http] = str(answer.get("as", "?"))
                pending.remove(http)
                log.info("joined the model node at %s as a %s", http, self.joined[http])
            self._stop.wait(self.retry_s)

    def stop(self) -> None:
        """Stop joining, without telling anyone (the model nodes are going away too)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def leave(self) -> None:
        """Stop joining; tell the model nodes that took us that we leave (best effort, bounded)."""
        self.stop()
        for http in list(self.joined):
            try:
                announce(http, "leave", self.address, self.secret, timeout=2.0)
            except (MembershipError, OSError) as exc:
                log.warning("leave at %s: %s", http, exc)
