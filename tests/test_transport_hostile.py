"""A hostile peer speaking raw tcp frames at a target process (issue 9, defect 9).

The target (this file run as a script: `python test_transport_hostile.py
REGION_BYTES FD...`) holds an endpoint on each inherited socket, with no
handshake, and keeps polling its completions; the test floods frames at it and
never reads the answers. Memory must stay bounded: the target either stops
reading the socket (the flood blocks) or fails that one endpoint, and keeps
serving the others.
"""
from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm import bootstrap
from lamina_comm._bindings import lib

HDR = struct.Struct("<HBBIQQQQQiI")  # native/src/tcp/tcp_wire.h, 56 bytes
MAGIC, WRITE, READ_REQ = 0x4D4C, 1, 2
FLOOD_FRAMES = 3_000_000           # the attack in the issue: 3 M frames, 168 MB
BLOCKED_AFTER_S = 2.0              # the socket stayed full this long: the target stopped reading
RSS_GROWTH_BOUND = 48 << 20        # docs/limits.md: target memory under a never-read flood
REGION = 1 << 16


def frame(ftype: int, seq: int, key: int, offset: int = 0, length: int = 0) -> bytes:
    return HDR.pack(MAGIC, ftype, 0, 0, seq, key, offset, length, 0, 0, 0)


def flood(sock: socket.socket, ftype: int, key: int, length: int) -> int:
    """Send frames with consecutive sequence numbers, never reading, until the
    socket stays full for BLOCKED_AFTER_S or FLOOD_FRAMES went; frames sent."""
    batch_frames = 4096
    template = bytearray(frame(ftype, 0, key, 0, length) * batch_frames)
    seqs = np.frombuffer(template, dtype=np.uint64).reshape(batch_frames, 7)
    sock.setblocking(False)
    sent, pending = 0, memoryview(b"")
    while sent < FLOOD_FRAMES or pending:
        if not pending:
            seqs[:, 1] = np.arange(sent, sent + batch_frames, dtype=np.uint64)
            pending = memoryview(bytes(template))
            sent += batch_frames
        try:
            n = sock.send(pending)
            pending = pending[n:]
        except BlockingIOError:
            if not select.select([], [sock], [], BLOCKED_AFTER_S)[1]:
                return sent - len(pending) // HDR.size
        except (BrokenPipeError, ConnectionResetError):
            return sent - len(pending) // HDR.size
    return sent


class Target:
    def __init__(self, nsockets: int):
        pairs = [socket.socketpair() for _ in range(nsockets)]
        self.ours = [a for a, _ in pairs]
        theirs = [b for _, b in pairs]
        self.proc = subprocess.Popen([sys.executable, __file__, str(REGION)] +
                                     [str(b.fileno()) for b in theirs],
                                     pass_fds=[b.fileno() for b in theirs], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        for b in theirs:
            b.close()
        self.ready = self.ask(None)
        assert self.ready["event"] == "ready"

    def ask(self, command: str | None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)  # hang guard
        assert ready, f"target did not answer {command!r}"
        return json.loads(self.proc.stdout.readline())

    def rss(self) -> int:
        return self.ask("rss")["rss"]

    def close(self) -> None:
        try:
            self.ask("quit") if self.proc.poll() is None else None
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait(timeout=30)
        for s in self.ours:
            s.close()


@pytest.fixture
def target():
    t = Target(3)
    yield t
    t.close()


def test_never_read_floods_keep_target_memory_bounded(target):
    key = target.ready["key"]
    rss0 = target.rss()

    # Refused writes (no such key), NACKs never read: the target stops reading.
    sent = flood(target.ours[0], WRITE, key ^ 1, 0)
    growth = target.rss() - rss0
    print(f"refused-write flood: {sent} frames sent before blocking, target RSS +{growth >> 20} MiB")
    assert growth < RSS_GROWTH_BOUND, f"target RSS grew {growth >> 20} MiB under a refused-write flood"
    assert sent < FLOOD_FRAMES, "the target took the whole refused-write flood without pushing back"

    # READ_REQs whose answers are never read: past the reads-in-flight limit
    # that endpoint fails with a protocol error.
    sent = flood(target.ours[1], READ_REQ, key, 64)
    assert sent < FLOOD_FRAMES, "the target took the whole read flood"
    growth = target.rss() - rss0
    print(f"read flood: {sent} frames sent, target RSS +{growth >> 20} MiB")
    assert growth < RSS_GROWTH_BOUND, f"target RSS grew {growth >> 20} MiB under a read flood"
    deadline = time.monotonic() + 30
    while True:
        errors = target.ask("errors")["errors"]
        if errors[1] != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert errors[0] == 0, "a flood that only got pushed back must not fail the endpoint"
    assert errors[1] == lc.ProtocolError.status

    # The target still serves a well-behaved peer.
    with lc.Context("tcp") as ctx:
        ep = ctx._make_endpoint(target.ours[2], bootstrap.Negotiated(lib.LM_TRANSPORT_TCP, b""),
                                client=True, peer=None, timeout=None)
        local = np.zeros(256, np.uint8)
        mr = ctx.register(local)
        remote = lc.RemoteRegion(key=key, addr=0, length=REGION)
        ep.read(mr, remote, remote_offset=1000, length=256)
        ep.wait_one(timeout=30).raise_for_status()
        assert np.array_equal(local, (np.arange(1000, 1256) % 251).astype(np.uint8))


# ---- the target process ---------------------------------------------------

def _say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _serve(nbytes: int, fds: list[int]) -> int:
    """Region filled with i % 251; answers stdin lines "rss" (VmRSS bytes),
    "errors" (each endpoint's error status, 0 if none) and "quit"."""
    import threading
    with lc.Context("tcp") as ctx:
        buf = (np.arange(nbytes) % 251).astype(np.uint8)
        mr = ctx.register(buf)
        eps = [ctx._make_endpoint(socket.socket(fileno=fd), bootstrap.Negotiated(lib.LM_TRANSPORT_TCP, b""),
                                  client=False, peer=None, timeout=None) for fd in fds]
        commands: list[str] = []
        threading.Thread(target=lambda: commands.extend(sys.stdin), daemon=True).start()
        _say(event="ready", key=mr.descriptor().key, rss=_rss_bytes())
        while True:
            ctx.poll()  # keep serving: completions never pile up here
            while commands:
                cmd = commands.pop(0).strip()
                if cmd == "rss":
                    _say(event="rss", rss=_rss_bytes())
                elif cmd == "errors":
                    _say(event="errors", errors=[ep.error.status if ep.error else 0 for ep in eps])
                elif cmd == "quit":
                    return 0
            time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(_serve(int(sys.argv[1]), [int(a) for a in sys.argv[2:]]))
