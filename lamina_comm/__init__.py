"""lamina-comm: communication runtime for model-attention disaggregated LLM decoding.

    with Context() as ctx:
        mr = ctx.register(numpy_array)
        ep = ctx.connect("10.0.0.2:7000", private_data=mr.descriptor().to_bytes())
        ep.write(mr, RemoteRegion.from_bytes(ep.peer_data), imm=7)
        ep.wait_one(timeout=5).raise_for_status()

The transport names load the native module on first use, so the pure-Python
parts (pipeline, timeline, plan) import without a built extension.
"""
from .errors import (AccessDeniedError, AuthenticationError, CanceledError, ClosedError,
                     InvalidArgumentError, LaminaError, LocalRegionError, NoKeyError, NoMemoryError, OutOfBoundsError,
                     PeerLostError, ProtocolError, RemoteAccessError, SequenceError, TimeoutError,
                     UnsupportedError)

__version__ = "0.1.0"

_TRANSPORT_NAMES = ("Access", "Completion", "Context", "Endpoint", "Listener", "MemoryRegion", "Op",
                    "RemoteRegion", "SharedMemory")
_CHANNEL_NAMES = ("Channel", "ChannelGroup", "ChannelListener", "ChannelSpec", "Message", "SpecMismatchError")
# The engine API (lamina_comm.engine) needs torch: loaded on first use.
_ENGINE_NAMES = ("AttentionService", "AttentionShape", "RemoteAttention", "RendezvousServer", "rendezvous")


def __getattr__(name: str):
    if name in _TRANSPORT_NAMES:
        from . import transport
        return getattr(transport, name)
    if name in _CHANNEL_NAMES:
        from . import channel
        return getattr(channel, name)
    if name in _ENGINE_NAMES:
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'lamina_comm' has no attribute {name!r}")


__all__ = [
    *_TRANSPORT_NAMES, *_CHANNEL_NAMES, *_ENGINE_NAMES,
    "LaminaError", "AccessDeniedError", "AuthenticationError", "CanceledError", "ClosedError",
    "InvalidArgumentError", "LocalRegionError", "NoKeyError", "NoMemoryError", "OutOfBoundsError", "PeerLostError",
    "ProtocolError", "RemoteAccessError", "SequenceError", "TimeoutError", "UnsupportedError",
]
