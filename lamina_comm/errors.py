"""Typed exceptions: every native status code maps to one class here."""
from __future__ import annotations


class LaminaError(Exception):
    """Base of every error lamina-comm raises."""

    status: int = 0

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgumentError(LaminaError, ValueError):
    status = -1


class NoMemoryError(LaminaError, MemoryError):
    """The native library could not allocate (a queue, a frame, a completion)."""
    status = -2


class IOFailure(LaminaError, OSError):
    status = -3


class TimeoutError_(LaminaError, TimeoutError):
    status = -4


class RemoteAccessError(LaminaError):
    """The target refused an operation: unknown key, out of bounds, missing access."""


class NoKeyError(RemoteAccessError):
    status = -5


class OutOfBoundsError(RemoteAccessError):
    status = -6


class AccessDeniedError(RemoteAccessError):
    status = -7


class PeerLostError(LaminaError, ConnectionError):
    status = -8


class ProtocolError(LaminaError):
    status = -9


class UnsupportedError(LaminaError):
    status = -10


class ClosedError(LaminaError):
    status = -11


class CanceledError(LaminaError):
    status = -12


class RemoteError(RemoteAccessError):
    status = -13


class LocalRegionError(LaminaError):
    status = -14


class AuthenticationError(LaminaError, PermissionError):
    """The peer failed the shared-secret challenge (or we did)."""


class SequenceError(LaminaError):
    """A channel message arrived lost, duplicated or out of order."""
    status = -15


_BY_STATUS = {
    cls.status: cls
    for cls in (InvalidArgumentError, NoMemoryError, IOFailure, TimeoutError_, NoKeyError, OutOfBoundsError,
                AccessDeniedError, PeerLostError, ProtocolError, UnsupportedError, ClosedError,
                CanceledError, RemoteError, LocalRegionError, SequenceError)
}


def error_for_status(status: int, message: str) -> LaminaError:
    return _BY_STATUS.get(status, LaminaError)(message, status)


# The public name: callers catch lamina_comm.TimeoutError or the builtin.
TimeoutError = TimeoutError_  # noqa: A001
