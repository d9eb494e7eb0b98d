"""The GPU tier: CUDA memory in, device-to-device messages out, ordered on CUDA streams.

    from lamina_comm.gpu import gpu_status, register_cuda, StagedLink

    ok, why = gpu_status()                      # (False, reason) on a machine without CUDA
    link = StagedLink.connect(ctx, "10.0.0.2:7200")
    link.send(q_tensor, stream=torch.cuda.current_stream())   # starts after the queued kernels, returns at once
    link.recv(out_tensor, stream=s)                            # kernels queued on s after this wait for the data

The CUDA driver is loaded at run time (ctypes, libcuda.so.1); nothing is
linked at build time, and importing this package never fails for lack of
CUDA. Design, paths and what is verified where: docs/gpu.md.
"""
from __future__ import annotations

from . import cuda
from .cuda import CudaError, CudaUnavailableError
from .memory import CudaBuffer, CudaRegion, PathCaps, choose_path, cuda_buffer, is_cuda_object, register_cuda
from .staging import (DEFAULT_CHUNK, DEFAULT_SLOTS, CopyEngine, CudaCopyEngine, HostCopyEngine, StagedLink,
                      plan_chunks)
from .stream import ReceiveGate, StreamOrderedWriter, Transfer, stream_handle


def gpu_status() -> tuple[bool, str]:
    """(available, reason): whether CUDA can be used in this process, and why not / what was found."""
    return cuda.status()


__all__ = [
    "gpu_status", "cuda", "CudaError", "CudaUnavailableError",
    "CudaBuffer", "CudaRegion", "PathCaps", "choose_path", "cuda_buffer", "is_cuda_object", "register_cuda",
    "StagedLink", "CopyEngine", "CudaCopyEngine", "HostCopyEngine", "plan_chunks", "DEFAULT_CHUNK", "DEFAULT_SLOTS",
    "ReceiveGate", "StreamOrderedWriter", "Transfer", "stream_handle",
]
