"""Requests of the model role: the caller's ``RequestHandle`` (events, result) and the scheduler's state.

HTTP threads hold a ``RequestHandle`` and read its events; the scheduler
thread keeps a ``RequestState`` per request and emits the events.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from lamina_comm.errors import LaminaError
from lamina_comm.model import SamplingParams

# How often a waiting caller re-checks whether its client is still there
# (RequestHandle.result(abandoned=...)): the most a gone client costs is
# this long of generation.
ABANDON_CHECK_S = 0.25

# Status of a request whose client went away before the answer (nginx's 499);
# only logs and metrics see it, the client is gone.
CLIENT_CLOSED = 499


class RequestRejected(LaminaError):
    """A request that is refused or failed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.http_status = status


class InvalidRequest(RequestRejected, ValueError):
    def __init__(self, message: str):
        super().__init__(400, message)


class RequestHandle:
    """The caller's side of a request: a stream of events, then a result.

    Events are dicts: ``{"event": "admitted"}``, ``{"event": "token", "token": t}``,
    ``{"event": "finished", "finish_reason": "length"|"stop"|"cancelled"}``,
    ``{"event": "error", "status": http_status, "error": text}``.
    """

    def __init__(self, request_id: int, prompt_tokens: int):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        # (logprob, [(token, logprob), ...]) per token, when the request asked for log-probabilities.
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._wakers: list[Callable[[], None]] = []
        self._wakers_lock = threading.Lock()
        self.submitted_at = time.monotonic()

    def add_waker(self, waker: Callable[[], None]) -> None:
        """Call ``waker()`` after every event from now on (from the scheduler's thread): how an event
        loop learns that ``next_event(0)`` has something, without a thread blocked per request."""
        with self._wakers_lock:
            self._wakers.append(waker)
        if not self._events.empty():  # an event that came before the waker was added
            waker()

    def next_event(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def result(self, timeout: float, abandoned: Optional[Callable[[], bool]] = None,
               check_every: float = ABANDON_CHECK_S,
               stop_at: Optional[Callable[[int], bool]] = None) -> dict[str, Any]:
        """Wait for the end; returns {"tokens", "finish_reason"} or raises RequestRejected.

        ``stop_at(token)`` is asked for every token in order; when it says yes
        the request is cancelled and ends there with finish_reason "stop"
        (a stop string found in its text).

        ``abandoned`` (e.g. "the client closed its connection") is asked every
        ``check_every`` seconds while waiting; when it says yes the request is
        cancelled and RequestRejected(499) raised, so nobody computes tokens
        that no one will read.
        """
        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + check_every
        collector = ResultCollector(self, stop_at)
        while True:
            now = time.monotonic()
            if abandoned is not None and now >= next_check:  # by the clock: token events never pause
                next_check = now + check_every
                if abandoned():
                    self.cancel()
                    raise RequestRejected(CLIENT_CLOSED, f"request {self.id} cancelled: the client went away")
            wait = deadline - now if abandoned is None else min(deadline, next_check) - now
            event = self.next_event(max(0.0, wait))
            if event is None:
                if time.monotonic() < deadline:
                    continue
                raise RequestRejected(504, f"request {self.id} did not finish within {timeout} s")
            result = collector.take(event)
            if result is not None:
                return result

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); takes effect between steps."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "token":
            self.tokens.append(event["token"])
            if "logprob" in event:
                self.logprobs.append((event["logprob"], event["top_logprobs"]))
        if event["event"] in ("finished", "error"):
            self._done.set()
        self._events.put(event)
        with self._wakers_lock:
            wakers = list(self._wakers)
        for waker in wakers:
            waker()


class ResultCollector:
    """A request's events folded into its result: what ``RequestHandle.result`` and the async front door share."""

    def __init__(self, handle: RequestHandle, stop_at: Optional[Callable[[int], bool]] = None):
        self.handle, self.stop_at = handle, stop_at
        self.seen = 0  # token events taken (handle.tokens may already hold later ones)

    def take(self, event: dict[str, Any]) -> Optional[dict[str, Any]]:
        """{"tokens", "finish_reason"} when ``event`` ends the request, else None; RequestRejected on an error."""
        kind = event["event"]
        if kind == "token":
            self.seen += 1
            if self.stop_at is not None and self.stop_at(event["token"]):
                self.handle.cancel()
                return {"tokens": list(self.handle.tokens[:self.seen]), "finish_reason": "stop"}
        elif kind == "finished":
            return {"tokens": list(self.handle.tokens), "finish_reason": event["finish_reason"]}
        elif kind == "error":
            raise RequestRejected(event["status"], event["error"])
        return None


@dataclass(eq=False)
class RequestState:
    """Scheduler-side state of one request."""

    id: int
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    handle: RequestHandle
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens not yet in the KV cache
    cached: int = 0  # positions 0 .. cached-1 are in the KV cache
    last_token_at: float = 0.0  # time.monotonic() of its last token (inter-token latency)

    @property
    def capacity(self) -> int:
        """KV positions reserved: the last generated token is never fed back."""
        return len(self.prompt) + self.params.max_tokens - 1

    def restart_from_history(self) -> None:
        """Re-prefill everything seen so far (after the KV cache was lost)."""
        self.pending = self.prompt + self.generated
        self.cached = 0
