"""What travels on an engine channel besides q/k/v and the attention output: reserved layer numbers, error
replies, the rank's compute time.

- A reply whose layer is ``ERROR_LAYER`` carries an error text (uint8) instead
  of the output: the rank could not serve that layer (``LayerRequest.fail``);
  ``RemoteAttention.recv_into`` raises ``AttentionRankError``.
- A reply may carry a second tensor, int64 [1]: the nanoseconds the rank
  spent computing it (from ``AttentionService(report_compute_time=True)``,
  ``LayerRequest.respond(compute_ns=)``), reported in
  ``RemoteAttention.replies``.
- On the control micro-batch (the channel's last), a message whose layer is
  ``METADATA_LAYER`` is step metadata (``RemoteAttention.send_metadata``);
  every other message there belongs to the application (``AttentionService``'s
  ``on_control``), which numbers its messages below ``METADATA_LAYER``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from lamina_comm.errors import LaminaError

ERROR_LAYER = 0xFFFF_FFFF
METADATA_LAYER = 0xFFFF_FFFE

# Error texts are cut to fit the smallest reply slot.
MAX_ERROR_BYTES = 512


class AttentionRankError(LaminaError):
    """An attention rank answered a layer with an error instead of its output (the rank itself is fine)."""

    def __init__(self, rank: int, reason: str):
        super().__init__(f"attention rank {rank}: {reason}")
        self.rank = rank
        self.reason = reason


def encode_error(text: str) -> np.ndarray:
    return np.frombuffer(text.encode()[:MAX_ERROR_BYTES], dtype=np.uint8)


def decode_error(message: Any) -> str:
    """The text of an error reply (a message whose layer is ERROR_LAYER)."""
    tensors = message.tensors
    if len(tensors) != 1 or tensors[0].dtype_name != "uint8":
        return f"an error reply of {len(tensors)} tensors (not one text)"
    text = tensors[0]
    if not isinstance(text, np.ndarray):  # it landed in device memory (GPUDirect receive): read it back
        from lamina_comm.channel.device import read_device_view
        text = read_device_view(text)
    return np.asarray(text).tobytes().decode(errors="replace")


def compute_time(nanoseconds: int) -> np.ndarray:
    """The optional second tensor of a reply: the rank's compute time."""
    return np.array([nanoseconds], dtype=np.int64)


__all__ = ["AttentionRankError", "ERROR_LAYER", "METADATA_LAYER", "compute_time", "decode_error", "encode_error"]
