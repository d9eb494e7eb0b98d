"""Channel handshake: the hello each side puts in the bootstrap's private data, and its checks.

A hello carries the wire version, the spec and its digest, the side's role and
the descriptor of its registered region; everything in the peer's hello is
untrusted input (tests/fuzz/fuzz_channel_header.py).
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidArgumentError, ProtocolError
from ..transport import RemoteRegion
from .spec import WIRE_VERSION, ChannelSpec, RingLayout, _other_role

_HELLO_PREFIX = b"LMCH1"
# What this side understands beyond the wire version; a peer lacking one is not asked for it.
# "payload-microbatches": the hello's payload_microbatches (payloads of the first N micro-batches apart).
_CAPS = ["payloads", "payload-microbatches"]


class SpecMismatchError(InvalidArgumentError):
    """The two ends of a channel declared different specs or incompatible roles."""


def _hello(spec: ChannelSpec, role: str, region: RemoteRegion, payloads: RemoteRegion | None = None,
           payload_microbatches: int = 0) -> bytes:
    body = {"version": WIRE_VERSION, "spec": spec.to_dict(), "digest": spec.digest(), "role": role,
            "region": region.to_dict(), "caps": _CAPS}
    if payloads is not None:  # our first payload_microbatches' payloads land apart (Channel payloads=)
        body["payloads"] = payloads.to_dict()
        body["payload_microbatches"] = payload_microbatches
    return _HELLO_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def _peer_caps(hello: dict[str, Any]) -> set[str]:
    """What the peer's hello says it understands (an older peer says nothing)."""
    caps = hello.get("caps", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ProtocolError(f"channel hello's caps are {caps!r}, not a list of names")
    return set(caps)


def _peer_payloads(spec: ChannelSpec, hello: dict[str, Any]) -> tuple[RemoteRegion | None, int]:
    """The peer's payload region, when it asked for split payloads, and how many micro-batches (the first
    ones) it splits (a peer that does not say splits them all)."""
    if "payloads" not in hello:
        return None, 0
    count = hello.get("payload_microbatches", spec.microbatches)
    if type(count) is not int or not 1 <= count <= spec.microbatches:
        raise ProtocolError(f"channel hello's payload_microbatches is {count!r}, not 1..{spec.microbatches}")
    return _peer_region(hello["payloads"]), count


def _parse_hello(data: bytes) -> dict[str, Any]:
    """The peer's channel hello as a JSON object; anything else is a ProtocolError."""
    if not data.startswith(_HELLO_PREFIX):
        raise ProtocolError("the peer is not a lamina channel (no channel hello in its private data)")
    try:
        hello = json.loads(data[len(_HELLO_PREFIX):])
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting depth
        raise ProtocolError(f"malformed channel hello: {exc}") from exc
    if not isinstance(hello, dict):
        raise ProtocolError(f"malformed channel hello: a JSON {type(hello).__name__}, not an object")
    return hello


def _spec_differences(mine: dict[str, Any], theirs: Any) -> str:
    if not isinstance(theirs, dict):
        theirs = {}
    keys = sorted(set(mine) | set(theirs))
    return ", ".join(f"{k}: ours={mine.get(k)!r} peer's={theirs.get(k)!r}"
                     for k in keys if mine.get(k) != theirs.get(k))


# Region descriptor fields a hello carries: wire width in bits, and whether the peer must send it.
_REGION_FIELDS = {"key": (64, True), "addr": (64, True), "length": (64, True), "rkey": (32, False),
                  "access": (32, False)}


def _peer_region(fields: Any) -> RemoteRegion:
    """The peer's region descriptor; every field an integer that fits its wire width."""
    if not isinstance(fields, dict):
        raise ProtocolError("channel hello carries no region descriptor")
    values: dict[str, int] = {}
    for name, (bits, required) in _REGION_FIELDS.items():
        if name not in fields:
            if required:
                raise ProtocolError(f"channel hello's region has no {name!r}")
            continue
        value = fields[name]
        if type(value) is not int or not 0 <= value < 1 << bits:
            raise ProtocolError(f"channel hello's region {name!r} is {value!r}, not a {bits}-bit unsigned integer")
        values[name] = value
    return RemoteRegion(**values)


def _check_peer(spec: ChannelSpec, role: str, hello: dict[str, Any]) -> RemoteRegion:
    """The peer's region if it declared the same spec and the opposite role."""
    if hello.get("version") != WIRE_VERSION:
        raise ProtocolError(f"channel wire version {hello.get('version')!r} != {WIRE_VERSION}")
    if hello.get("digest") != spec.digest():
        diff = _spec_differences(spec.to_dict(), hello.get("spec")) or "digest only"
        raise SpecMismatchError(f"channel spec mismatch with the peer ({diff})")
    if hello.get("role") != _other_role(role):
        raise SpecMismatchError(f"both ends of the channel declared role {role!r}")
    region = _peer_region(hello.get("region"))
    needed = RingLayout.for_role(spec, hello["role"]).total_bytes
    if region.length < needed:
        raise ProtocolError(f"peer's channel region has {region.length} B, its layout needs {needed}")
    return region
