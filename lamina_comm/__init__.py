"""lamina-comm: communication runtime for model-attention disaggregated LLM decoding.

    with Context() as ctx:
        mr = ctx.register(numpy_array)
        ep = ctx.connect("10.0.0.2:7000", private_data=mr.descriptor().to_bytes())
        ep.write(mr, RemoteRegion.from_bytes(ep.peer_data), imm=7)
        ep.wait_one(timeout=5).raise_for_status()
"""
from .errors import (AccessDeniedError, AuthenticationError, CanceledError, ClosedError,
                     InvalidArgumentError, LaminaError, LocalRegionError, NoKeyError, OutOfBoundsError,
                     PeerLostError, ProtocolError, RemoteAccessError, SequenceError, TimeoutError,
                     UnsupportedError)
from .transport import Access, Completion, Context, Endpoint, Listener, MemoryRegion, Op, RemoteRegion

__version__ = "0.1.0"

__all__ = [
    "Access", "Completion", "Context", "Endpoint", "Listener", "MemoryRegion", "Op", "RemoteRegion",
    "LaminaError", "AccessDeniedError", "AuthenticationError", "CanceledError", "ClosedError",
    "InvalidArgumentError", "LocalRegionError", "NoKeyError", "OutOfBoundsError", "PeerLostError",
    "ProtocolError", "RemoteAccessError", "SequenceError", "TimeoutError", "UnsupportedError",
]
