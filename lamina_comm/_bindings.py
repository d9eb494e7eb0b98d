"""The thin layer over the compiled module: loading, and C status -> exception."""
from __future__ import annotations

import functools

from .errors import LaminaError, error_for_status

try:
    from ._lamina import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "lamina_comm's native module is not built; run `make install` "
        "(or `pip install -e .`) first"
    ) from exc


@functools.lru_cache(maxsize=None)
def host_function(name: str) -> int:
    """Address of a native function with the signature of a CUDA host function (a ``CUhostFn``:
    ``void fn(void *)``), for ``cuLaunchHostFunc``: lm_chan_run_deferred, lm_poster_run."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


def status_text(status: int) -> str:
    return ffi.string(lib.lm_status_str(status)).decode()


def last_error() -> str:
    return ffi.string(lib.lm_last_error()).decode()


def error_of(rc: int, what: str) -> LaminaError:
    """The typed exception for a negative status, with the native message (read it before other calls)."""
    return error_for_status(rc, f"{what}: {last_error() or status_text(rc)}")


def check(rc: int, what: str) -> int:
    """Raise the typed exception for a negative status, with the native message."""
    if rc >= 0:
        return rc
    raise error_of(rc, what)


__all__ = ["ffi", "lib", "check", "error_of", "host_function", "status_text", "last_error", "LaminaError"]
