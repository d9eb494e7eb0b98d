"""Network namespaces joined by rate-limited veth links, for `lamina-bench pipeline --link-rate`.

A star: one hub namespace (the model worker) and one leaf namespace per
attention worker, each leaf joined to the hub by its own veth pair with a tc
token-bucket (tbf) limit on both ends. Addresses are private and exist only
inside the namespaces, so no benchmark traffic can leave the machine. Names
carry a random tag (several runs may coexist) and every namespace is deleted
on exit, also after a failed setup; deleting a namespace deletes its veths.

Needs root, ``ip`` and ``tc`` (iproute2). Processes join a namespace with
:func:`enter` (setns), before they open any socket. Only a run killed with
SIGKILL can leave namespaces behind: ``ip netns list | grep lamina-``.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import re
import secrets
import shutil
import subprocess
from typing import Iterator

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
SUBNET = "10.213"  # 10.213.<leaf>.1 = hub side, .2 = leaf side, /30 per link
MIN_BURST_BYTES = 128 * 1024  # above one 64 KiB GSO segment, or tbf drops it
BURST_SECONDS = 100e-6        # bucket depth: 100 us of line rate
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be used here (not root, iproute2 missing, or refused)."""


@dataclasses.dataclass(frozen=True)
class StarTopology:
    hub: str                       # namespace of the model worker
    leaves: tuple[str, ...]        # one namespace per attention worker
    hub_addresses: tuple[str, ...]   # hub's address on link i
    leaf_addresses: tuple[str, ...]  # leaf i's address (the model connects here)
    rate: str | None


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used, or None when they can be tried."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or drop --link-rate to use loopback)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2, or drop --link-rate)"
    return None


def rate_bits_per_second(rate: str) -> float:
    """Parse a tc rate such as '10gbit', '400mbit' or '1.25gbps' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", rate)
    if not match or match.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"rate {rate!r} is not NUMBER followed by one of {sorted(_RATE_UNITS)}")
    return float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]


def burst_bytes(rate: str) -> int:
    return max(MIN_BURST_BYTES, int(rate_bits_per_second(rate) / 8 * BURST_SECONDS))


@contextlib.contextmanager
def star(leaves: int, rate: str | None = None) -> Iterator[StarTopology]:
    """Create the star topology; it is always torn down when the block ends."""
    reason = unavailable_reason()
    if reason:
        raise NetnsUnavailable(reason)
    if rate is not None:
        rate_bits_per_second(rate)  # fail on a bad rate before creating anything
    tag = secrets.token_hex(3)
    topology = StarTopology(
        hub=f"lamina-{tag}-hub",
        leaves=tuple(f"lamina-{tag}-a{i}" for i in range(leaves)),
        hub_addresses=tuple(f"{SUBNET}.{i}.1" for i in range(leaves)),
        leaf_addresses=tuple(f"{SUBNET}.{i}.2" for i in range(leaves)),
        rate=rate,
    )
    created: list[str] = []
    try:
        _build(topology, tag, created)
        yield topology
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _build(topology: StarTopology, tag: str, created: list[str]) -> None:
    for name in (topology.hub, *topology.leaves):
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
    for i, leaf in enumerate(topology.leaves):
        hub_if, leaf_if = f"lh{tag}{i}", f"ll{tag}{i}"  # <= 15 characters
        _ip("link", "add", hub_if, "netns", topology.hub, "type", "veth",
            "peer", "name", leaf_if, "netns", leaf)
        _configure_end(topology.hub, hub_if, topology.hub_addresses[i], topology.rate)
        _configure_end(leaf, leaf_if, topology.leaf_addresses[i], topology.rate)


def _configure_end(namespace: str, interface: str, address: str, rate: str | None) -> None:
    _ip("-n", namespace, "addr", "add", f"{address}/30", "dev", interface)
    _ip("-n", namespace, "link", "set", interface, "up")
    if rate is not None:
        _run(["tc", "-n", namespace, "qdisc", "add", "dev", interface, "root", "tbf", "rate", rate,
              "burst", str(burst_bytes(rate)), "latency", "50ms"])


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(command)}` failed: {done.stderr.strip() or done.returncode}")


def enter(namespace: str) -> None:
    """Move the calling process into a namespace made by star() (before opening sockets)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({namespace}): {os.strerror(err)}")
    finally:
        os.close(fd)


def exists(namespace: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, namespace))
