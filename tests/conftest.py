"""Shared fixtures: connected endpoint pairs over loopback, and peer processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import lamina_comm as lc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def connect_pair(server: lc.Context, client: lc.Context, server_data: bytes = b"",
                 client_data: bytes = b"", timeout: float = 10.0, host: str = "127.0.0.1"):
    """Two connected endpoints (client side, server side); the bootstrap runs over host."""
    listener = server.listen((host, 0))
    box: dict = {}

    def accept() -> None:
        try:
            box["ep"] = listener.accept(timeout=timeout, private_data=server_data)
        except Exception as exc:  # surfaced below
            box["err"] = exc

    t = threading.Thread(target=accept)
    t.start()
    try:
        client_ep = client.connect(listener.address, private_data=client_data, timeout=timeout)
    finally:
        t.join(timeout)
        listener.close()
    if "err" in box:
        raise box["err"]
    return client_ep, box["ep"]


@pytest.fixture(params=["tcp", "shm"])
def contexts(request):
    """Two contexts of one transport: the suites that take them run over tcp and over shm."""
    with lc.Context(request.param) as a, lc.Context(request.param) as b:
        yield a, b


class Peer:
    """A tests/peer.py process; reads its JSON lines."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "peer.py"), *args],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})

    def line(self, timeout: float = 30.0) -> dict:
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("l", self.proc.stdout.readline()))
        t.start()
        t.join(timeout)
        if "l" not in box or not box["l"]:
            self.proc.kill()
            raise AssertionError(f"peer said nothing within {timeout} s (rc={self.proc.poll()})")
        return json.loads(box["l"])

    def until(self, event: str, timeout: float = 30.0) -> dict:
        """Skip lines until one reports the given event."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.line(max(0.1, deadline - time.monotonic()))
            if msg.get("event") == event:
                return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def peer_factory():
    peers: list[Peer] = []

    def make(*args: str, env: dict | None = None) -> Peer:
        peers.append(Peer(*args, env=env))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def pytest_runtest_logreport(report) -> None:
    """A test that needed its rerun (`make test` runs with --reruns 1) prints why it failed the first
    time: the rerun summary names it only, and a rare failure is worth its traceback."""
    if getattr(report, "outcome", None) == "rerun" and report.longrepr is not None:
        sys.stderr.write(f"\n--- {report.nodeid} failed before its rerun ({report.when}):\n"
                         f"{report.longreprtext[-6000:]}\n--- end of {report.nodeid}\n")
