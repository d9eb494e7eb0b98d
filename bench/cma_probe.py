#!/usr/bin/env python3
"""How fast is a single kernel copy (process_vm_readv, CMA) beside memcpy on this machine?

    python bench/cma_probe.py

Reads this process's own memory through process_vm_readv (the kernel pins the pages and copies once),
then copies the same buffer with numpy, for 64 KiB, 1 MiB and 4 MiB. The question it answers for the
shm transport (issue 13): would a one-copy CMA path beat the two ring copies. Prints Gb/s and the ratio.
"""
import ctypes, os, time, numpy as np
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.POINTER(iovec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_readv.restype = ctypes.c_ssize_t
pid = os.getpid()
for size in (65536, 1 << 20, 4 << 20):
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8); dst = np.zeros_like(src)
    l = iovec(dst.ctypes.data, size); r = iovec(src.ctypes.data, size)
    n = libc.process_vm_readv(pid, ctypes.byref(l), 1, ctypes.byref(r), 1, 0); assert n == size, ctypes.get_errno()
    assert (dst == src).all()
    reps = max(1, (256 << 20) // size); t = time.perf_counter()
    for _ in range(reps): libc.process_vm_readv(pid, ctypes.byref(l), 1, ctypes.byref(r), 1, 0)
    cma = reps * size * 8 / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for _ in range(reps): np.copyto(dst, src)
    mc = reps * size * 8 / (time.perf_counter() - t) / 1e9
    print(f"{size:>8}: process_vm_readv {cma:6.1f} Gb/s   memcpy {mc:6.1f} Gb/s   ratio {cma/mc:.2f}")
