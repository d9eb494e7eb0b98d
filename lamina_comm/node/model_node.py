"""Model role: all weights, the ping-pong pipeline, continuous batching and fault recovery.

The model node holds the model tier (``ModelTier``) and drives the attention
workers over activation channels (see ``protocol``). One scheduler thread
owns every channel; HTTP threads only enqueue requests and read events.

Per step the running requests are split into up to ``microbatches`` micro-
batches (a new request contributes its whole prompt as one multi-token entry,
a running one its last token) and ``pipeline.run_step`` interleaves them
layer by layer: while one micro-batch's q/k/v are at the attention workers,
the model tier computes the other. Every micro-batch runs exactly the
functions ``ModelTier.forward_step`` runs, on the same ``StepInputs``, so its
logits equal ``MonolithicModel.step`` on the same batch.

A step is atomic from the requests' point of view: tokens are sampled only
after every micro-batch finished. When an attention worker is lost mid-step,
no request has advanced; all running requests are held, a replacement is
connected (a spare, or the lost address coming back), and each held request
is re-prefilled from its prompt plus the tokens generated so far, then
continues as if nothing happened. Requests that cannot be continued get an
error event; none is dropped silently.

This module is the scheduler (admission, steps, recovery, health, status);
its parts are ``options`` (``ModelNodeOptions``), ``requests`` (the caller's
``RequestHandle``, the scheduler's ``RequestState``), ``cluster`` (the
attention workers: ``AttentionPeer``, ``AttentionCluster``, ``WorkerLost``)
and ``step`` (``plan_microbatches``, ``PipelinedStep``).
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from lamina_comm.bootstrap import secret_from
from lamina_comm.model import (LlamaConfig, LlamaWeights, ModelTier, SamplingError, SamplingParams,
                               make_generator, sample_each, token_logprobs)
from lamina_comm.node import protocol
from lamina_comm.node.cluster import AttentionCluster, AttentionStepError, WorkerLost
from lamina_comm.node.membership import ReplayGuard
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.options import ModelNodeOptions
from lamina_comm.node.requests import InvalidRequest, RequestHandle, RequestRejected, RequestState
from lamina_comm.node.step import PipelinedStep, StepEntry, plan_microbatches
from lamina_comm.pipeline import run_step
from lamina_comm.timeline import Timeline
from lamina_comm.transport import Context

log = logging.getLogger("lamina_comm.node.model")

# step_observer(step number, micro-batch, entries (request id, tokens, start), logits): for tests and tracing.
StepObserver = Callable[[int, int, list[tuple[int, list[int], int]], torch.Tensor], None]


class ModelNode:
    """Scheduler of the model role; see the module docstring.

    Drive it with ``run_once()`` (tests) or ``start()`` (a scheduler thread);
    ``submit()`` is safe from any thread.
    """

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, options: ModelNodeOptions,
                 metrics: Optional[NodeMetrics] = None):
        options.validate(config)
        self.config = config
        self.options = options
        self.metrics = metrics or NodeMetrics(options.name or "")
        self.tier = ModelTier(config, weights, options.device)
        self.context = Context(options.transport, secret=options.secret, progress=options.progress)
        self.cluster = AttentionCluster(self.context, config, options)
        self._replays = ReplayGuard()
        self.step_observer: Optional[StepObserver] = None
        self.steps_run = 0
        self._queue: collections.deque[RequestState] = collections.deque()
        self._running: list[RequestState] = []
        self._held: list[RequestState] = []
        self._wakeup = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_contact = time.monotonic()
        # When the scheduler last completed a step or settled a request (or
        # got work while idle): /healthz measures stalls from here.
        self._progress_at = time.monotonic()
        self.last_overlap_efficiency: Optional[float] = None

    # -- life cycle ---------------------------------------------------------
    def connect(self) -> None:
        """Connect and set up the attention workers (fails fast, naming the cause)."""
        try:
            self.cluster.connect_all()
        except BaseException:
            self.context.close()
            raise
        self._update_gauges()

    def start(self) -> None:
        """Run the scheduler in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="model-scheduler", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(wait=0.1)
            except Exception:  # noqa: BLE001 - keep serving; the failure is logged
                log.exception("scheduler iteration failed")
                time.sleep(0.1)

    def close(self) -> None:
        """Stop the scheduler, answer every open request with 503 and disconnect."""
        with self._wakeup:
            self._closed = True
            self._stop.set()
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.options.peer_timeout + 5)
        for request in [*self._queue, *self._running, *self._held]:
            self._fail(request, 503, "the model node is shutting down")
        self._queue.clear()
        self._running.clear()
        self._held.clear()
        self.cluster.close()
        self.context.close()

    # -- submission (any thread) --------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; raises InvalidRequest (400) or RequestRejected (429/503)."""
        self._validate(prompt, params)
        with self._wakeup:
            if self._closed:
                raise RequestRejected(503, "the model node is shutting down")
            if self._degraded_for() > self.options.rebuild_timeout:
                raise RequestRejected(503, f"attention tier unavailable: {self._degraded_causes()}")
            if len(self._queue) >= self.options.max_queue:
                raise RequestRejected(429, f"queue full ({self.options.max_queue} requests waiting)")
            request_id = next(self._ids)
            handle = RequestHandle(request_id, len(prompt))
            request = RequestState(request_id, list(prompt), params, make_generator(params, self.tier.device),
                               handle, pending=list(prompt))
            if not self._has_work():
                self._note_progress()  # idle time before this request is not a stall
            self._queue.append(request)
            self._wakeup.notify_all()
        return handle

    # -- membership (any thread) ---------------------------------------------
    def join(self, address: str) -> dict[str, Any]:
        """An attention worker announcing itself (POST /cluster/join): it stands by as a spare."""
        role = self.cluster.join(address)  # ValueError when the spares are full
        with self._wakeup:
            self._wakeup.notify_all()  # a degraded node retries its replacement at once
        return {"ok": True, "address": address, "as": role}

    def leave(self, address: str) -> dict[str, Any]:
        """An attention worker leaving (POST /cluster/leave); KeyError when it is not a member."""
        role = self.cluster.leave(address)
        with self._wakeup:
            self._wakeup.notify_all()
        return {"ok": True, "address": address, "was": role}

    @property
    def membership_secret(self) -> Optional[bytes]:
        """What join/leave calls are signed with (the cluster's shared secret), or None."""
        return secret_from(self.options.secret)

    @property
    def membership_replays(self) -> ReplayGuard:
        """Signed join/leave calls already taken."""
        return self._replays

    def _validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequest("prompt must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        limit = self.config.max_position_embeddings
        if len(prompt) + params.max_tokens - 1 > limit:
            raise InvalidRequest(
                f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} exceeds the model's "
                f"{limit} positions")

    # -- scheduling (scheduler thread) ----------------------------------------
    def run_once(self, wait: float = 0.0) -> bool:
        """One scheduler iteration: recover, admit, run one step. True if it did any work."""
        with torch.inference_mode():
            try:
                return self._iterate(wait)
            except WorkerLost as lost:
                self._on_worker_lost(lost)
                return True
            finally:
                self._update_gauges()

    def _iterate(self, wait: float) -> bool:
        self._drop_cancelled()
        for departed in self.cluster.take_departures():
            log.warning("%s; holding %d running requests until it is replaced", departed, len(self._running))
            self._hold_running(departed)
        if not self.cluster.healthy:
            return self._recover()
        admitted = self._admit()
        if self._running:
            self._step()
            self._last_contact = time.monotonic()
            return True
        if not admitted:
            self._keep_alive()
            if wait > 0:
                with self._wakeup:
                    if not self._queue and not self._stop.is_set():
                        self._wakeup.wait(wait)
        return admitted

    def _keep_alive(self) -> None:
        """Heartbeat: a ``status`` to every live worker when no step has reached them for a while.

        Notices a worker that died while nothing ran, refreshes the KV figures,
        and keeps every worker from taking this node for a hung one (a worker
        hands its session to a newly connecting model node after its takeover
        bound of silence). Runs while idle and while a lost worker is replaced.
        """
        interval = min((peer.heartbeat_interval(self.options.idle_probe_s) for peer in self.cluster.live),
                       default=self.options.idle_probe_s)
        if time.monotonic() - self._last_contact < interval:
            return
        self._last_contact = time.monotonic()
        answered = True
        for peer in self.cluster.live:
            try:
                peer.call({"type": "status"})
            except protocol.ControlError as exc:  # it answered, with an error: not lost
                log.warning("attention worker %d at %s refused status: %s", peer.index, peer.address, exc)
                answered = False
        if answered:
            self.cluster.confirm_recovered()

    def _drop_cancelled(self) -> None:
        with self._wakeup:
            for request in [r for r in self._queue if r.handle.cancelled]:
                self._queue.remove(request)
                self._finish(request, "cancelled")
        cancelled = [r for r in (*self._running, *self._held) if r.handle.cancelled]
        if cancelled:
            self._running = [r for r in self._running if not r.handle.cancelled]
            self._held = [r for r in self._held if not r.handle.cancelled]
            for request in cancelled:
                self._finish(request, "cancelled")
            self.cluster.free([r.id for r in cancelled])

    def _admit(self) -> bool:
        with self._wakeup:
            batch = list(self._queue)
            self._queue.clear()
        if not batch:
            return False
        try:
            refused = self.cluster.reserve([(r.id, r.capacity) for r in batch])
        except WorkerLost:
            with self._wakeup:
                self._queue.extendleft(reversed(batch))
            raise
        self.cluster.confirm_recovered()  # every worker answered
        for request in batch:
            if request.id in refused:
                self._fail(request, 503, refused[request.id], outcome="rejected")
            else:
                self._running.append(request)
                self.metrics.prompt_tokens.inc(len(request.prompt))
                self.metrics.queue_time.observe(time.monotonic() - request.handle.submitted_at,
                                                replica=self.metrics.replica)
                request.handle._emit({"event": "admitted"})
        self._note_progress()
        return True

    def _step(self) -> None:
        plan = plan_microbatches(self._running, self.options.microbatches, self.options.max_step_tokens)
        timeline = Timeline("model") if self.options.record_timeline else None
        started = time.perf_counter()
        try:
            step = PipelinedStep(self.tier, self.cluster.remote(), self.cluster.live, plan, self.metrics)
            run_step(self.config.num_layers, len(plan), step, timeline)
        except WorkerLost:
            self.metrics.steps.inc(outcome="worker_lost")
            raise
        except Exception as exc:  # noqa: BLE001 - an attention error or a bug: fail this step's requests
            self.metrics.steps.inc(outcome="failed")
            self._abort_step(plan, exc)
            return
        self.cluster.confirm_recovered()
        self._record_step(plan, step, timeline, time.perf_counter() - started)
        ended = self._advance(plan, step.logits)
        self._note_progress()
        if ended:
            self.cluster.free([r.id for r in ended])

    def _record_step(self, plan: list[list[StepEntry]], step: PipelinedStep, timeline: Optional[Timeline],
                     seconds: float) -> None:
        self.steps_run += 1
        self.metrics.steps.inc(outcome="ok")
        self.metrics.step_seconds.observe(seconds)
        entries = [entry for mb_entries in plan for entry in mb_entries]
        self.metrics.step_tokens.observe(sum(len(entry.tokens) for entry in entries))
        if all(len(entry.tokens) == 1 and entry.request.generated for entry in entries):
            self.metrics.decode_step_seconds.inc(seconds)
            self.metrics.decode_tokens.inc(len(entries))
        self.metrics.microbatches.set(len(plan))
        if timeline is not None and len(plan) > 1:
            self.last_overlap_efficiency = timeline.overlap_efficiency()
            self.metrics.overlap_efficiency.set(self.last_overlap_efficiency)
            self.metrics.step_overlap_efficiency.observe(self.last_overlap_efficiency)
        if self.step_observer is not None:
            for mb, (entries, logits) in enumerate(zip(plan, step.logits)):
                self.step_observer(self.steps_run, mb, [entry.as_batch_entry() for entry in entries], logits)

    def _advance(self, plan: list[list[StepEntry]], logits: list[Optional[torch.Tensor]]) -> list[RequestState]:
        """Account the fed tokens, sample where a request's input is complete.

        Returns the requests that ended (finished, or failed to sample). A
        request whose sampling fails gets a 500 naming the cause and leaves
        the batch; the others go on as if it had never been there.
        """
        ended: list[RequestState] = []
        for entries, mb_logits in zip(plan, logits):
            rows: list[int] = []
            for row, entry in enumerate(entries):
                entry.request.cached += len(entry.tokens)
                del entry.request.pending[: len(entry.tokens)]
                if entry.completes:
                    rows.append(row)
            if not rows:
                continue
            requests = [entries[row].request for row in rows]
            row_logits = mb_logits.index_select(0, torch.tensor(rows, device=mb_logits.device))
            outcomes = sample_each(row_logits, [r.params for r in requests], [r.generator for r in requests])
            for index, (request, outcome) in enumerate(zip(requests, outcomes)):
                logprobs = None
                if request.params.logprobs is not None and isinstance(outcome, int):
                    logprobs = token_logprobs(row_logits[index], outcome, request.params.logprobs)
                if self._take_sample(request, outcome, logprobs):
                    ended.append(request)
        if ended:
            self._running = [r for r in self._running if r not in ended]
        return ended

    def _take_sample(self, request: RequestState, outcome: int | SamplingError,
                     logprobs: Optional[tuple[float, list[tuple[int, float]]]] = None) -> bool:
        """Apply one request's sampling outcome; True when the request has ended."""
        if isinstance(outcome, SamplingError):
            log.error("request %d: %s", request.id, outcome)
            self._fail(request, 500, f"sampling failed: {outcome}")
            return True
        return self._append_token(request, outcome, logprobs)

    def _append_token(self, request: RequestState, token: int,
                      logprobs: Optional[tuple[float, list[tuple[int, float]]]] = None) -> bool:
        """Record a sampled token (and its log-probabilities when asked); True when the request is finished."""
        request.generated.append(token)
        self.metrics.add_generated(1)
        now = time.monotonic()
        if len(request.generated) == 1:
            self.metrics.time_to_first_token.observe(now - request.handle.submitted_at, replica=self.metrics.replica)
        else:
            self.metrics.inter_token_latency.observe(now - request.last_token_at, replica=self.metrics.replica)
        request.last_token_at = now
        event: dict[str, Any] = {"event": "token", "token": token}
        if logprobs is not None:
            event["logprob"], event["top_logprobs"] = logprobs
        request.handle._emit(event)
        if token in request.params.stop_token_ids:
            self._finish(request, "stop")
            return True
        if len(request.generated) >= request.params.max_tokens:
            self._finish(request, "length")
            return True
        request.pending = [token]
        return False

    def _abort_step(self, plan: list[list[StepEntry]], exc: BaseException) -> None:
        """A step failed without losing a worker: fail its requests, clean up the channels."""
        log.error("step failed: %s", exc, exc_info=not isinstance(exc, AttentionStepError))
        failed = {entry.request for entries in plan for entry in entries}
        self._running = [r for r in self._running if r not in failed]
        for request in failed:
            self._fail(request, 500, f"generation step failed: {exc}")
        self._note_progress()
        self.cluster.drain_survivors()
        self.cluster.free([r.id for r in failed])

    # -- faults ---------------------------------------------------------------
    def _on_worker_lost(self, lost: WorkerLost) -> None:
        log.error("%s; holding %d running requests until it is replaced", lost, len(self._running))
        self.metrics.worker_failures.inc(peer=lost.address)
        self._hold_running(lost)

    def _hold_running(self, lost: WorkerLost) -> None:
        """Take the worker out; the running requests wait for its replacement (rebuilt in _recover)."""
        self.cluster.mark_lost(lost)
        self.cluster.drain_survivors()
        self._held.extend(self._running)
        self._running = []

    def _degraded_for(self) -> float:
        since = self.cluster.lost_since
        return 0.0 if since is None else time.monotonic() - since

    def _recover(self) -> bool:
        """Try to replace lost workers; once whole again, rebuild the held requests.

        The degraded period runs from the first loss until the workers serve
        something again (confirm_recovered), not until a reconnect: once it is
        over rebuild_timeout, held and queued requests fail with 503, so a
        worker that is lost again on every retry cannot hold them forever.
        """
        self._keep_alive()  # the survivors must not take us for a hung model node meanwhile
        for index in sorted(self.cluster.lost):
            self.cluster.try_replace(index)
        if self._degraded_for() > self.options.rebuild_timeout:
            self._fail_unrecoverable()
        if not self.cluster.healthy:
            return False
        held, self._held = self._held, []
        if not held:
            return True
        try:
            refused = self.cluster.reserve([(r.id, r.capacity) for r in held], kind="rebuild")
        except WorkerLost:
            self._held = held + self._held
            raise
        for request in held:
            if request.id in refused:
                self._fail(request, 503, f"cannot rebuild after a worker loss: {refused[request.id]}")
            else:
                request.restart_from_history()
                self._running.append(request)
        self.metrics.rebuilds.inc()
        log.warning("rebuilding the KV cache of %d requests", len(self._running))
        return True

    def _degraded_causes(self) -> str:
        """What the current degraded period is about: the lost workers, else the last loss."""
        if self.cluster.lost:
            return "; ".join(str(lost) for lost in self.cluster.lost.values())
        return f"{self.cluster.losses_since} worker losses without a completed step, last: {self.cluster.last_loss}"

    def _fail_unrecoverable(self) -> None:
        if self.cluster.lost:
            message = (f"no replacement attention worker within {self.options.rebuild_timeout} s "
                       f"({self._degraded_causes()})")
        else:
            message = (f"the attention tier did not recover within {self.options.rebuild_timeout} s "
                       f"({self._degraded_causes()})")
        with self._wakeup:
            queued = list(self._queue)
            self._queue.clear()
        held, self._held = self._held, []
        for request in [*held, *queued]:
            self._fail(request, 503, message)
        if held:  # the survivors still hold their blocks
            self.cluster.free([r.id for r in held])

    # -- request outcomes ------------------------------------------------------
    def _finish(self, request: RequestState, reason: str) -> None:
        self.metrics.requests.inc(outcome="completed" if reason != "cancelled" else "cancelled")
        self._observe_end(request)
        request.handle._emit({"event": "finished", "finish_reason": reason})
        self._note_progress()

    def _fail(self, request: RequestState, status: int, message: str, outcome: str = "failed") -> None:
        if request.handle.done:
            return
        self.metrics.requests.inc(outcome=outcome)
        self._observe_end(request)
        request.handle._emit({"event": "error", "status": status, "error": message})
        self._note_progress()

    def _observe_end(self, request: RequestState) -> None:
        self.metrics.request_latency.observe(time.monotonic() - request.handle.submitted_at,
                                             replica=self.metrics.replica)

    # -- observability (any thread) --------------------------------------------
    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running.set(len(self._running))
        self.metrics.held.set(len(self._held))
        for peer in self.cluster.live:
            self.metrics.kv_blocks_used.set(peer.blocks_used, peer=peer.address)
            self.metrics.kv_blocks_total.set(peer.blocks_total, peer=peer.address)
            channel = peer.data.metrics
            self.metrics.bytes_sent.set(channel.bytes_sent, peer=peer.address)
            self.metrics.bytes_received.set(channel.bytes_received, peer=peer.address)
            self.metrics.staged_bytes.set(channel.staged_bytes, peer=peer.address)

    # -- progress and health (any thread) -----------------------------------
    def _note_progress(self) -> None:
        self._progress_at = time.monotonic()

    def _has_work(self) -> bool:
        return bool(self._queue or self._running or self._held)

    def stalled_for(self) -> float:
        """Seconds the scheduler has had work without completing a step or settling a request."""
        return time.monotonic() - self._progress_at if self._has_work() else 0.0

    def unhealthy_reason(self) -> Optional[str]:
        """Why the node cannot serve now, or None when it can (what /healthz reports)."""
        if self._closed:
            return "shutting down"
        if not self.cluster.healthy:
            causes = "; ".join(str(lost) for lost in self.cluster.lost.values())
            return f"attention worker lost: {causes}"
        if self._degraded_for() > self.options.rebuild_timeout:
            return f"attention tier not recovered within {self.options.rebuild_timeout} s: {self._degraded_causes()}"
        if self._thread is not None and not self._thread.is_alive():
            return "the scheduler thread stopped"
        stalled = self.stalled_for()
        if stalled > self.options.stall_timeout:
            return (f"scheduler made no progress for {stalled:.1f} s with {len(self._queue)} queued and "
                    f"{len(self._running)} running requests (stall_timeout {self.options.stall_timeout} s)")
        return None

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason() is None

    def status(self) -> dict[str, Any]:
        """The cluster as JSON: roles, peers, head shares, KV blocks, queues."""
        config = self.config
        workers = []
        for index, address in enumerate(list(self.cluster.addresses)):
            peer = self.cluster.peers[index]
            kv_heads = self.cluster.head_ranges[index]
            worker: dict[str, Any] = {
                "index": index, "role": "attention", "address": address,
                "state": "up" if peer is not None else "lost",
                "kv_heads": list(kv_heads),
                "q_heads": [kv_heads[0] * config.group_size, kv_heads[1] * config.group_size],
            }
            if peer is not None:
                channel = peer.data.metrics
                worker.update(pid=peer.pid, device=peer.device, attention=peer.attention,
                              blocks_used=peer.blocks_used, blocks_held=peer.blocks_held,
                              blocks_total=peer.blocks_total, block_size=peer.block_size, replicas=peer.replicas,
                              transport=peer.data.endpoint.transport,
                              channel={"messages": channel.messages, "bytes_sent": channel.bytes_sent,
                                       "staged_bytes": channel.staged_bytes,
                                       "staged_messages": channel.staged_messages,
                                       "credits_piggybacked": channel.credits_piggybacked})
            elif index in self.cluster.lost:
                worker["error"] = str(self.cluster.lost[index].cause)
            workers.append(worker)
        return {
            "role": "model",
            "name": self.options.name,
            "healthy": self.healthy,
            "model": {"fingerprint": config.fingerprint(), "architecture": config.architecture,
                      "layers": config.num_layers, "heads": config.num_heads,
                      "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                      "vocab_size": config.vocab_size, "dtype": config.dtype,
                      "max_positions": config.max_position_embeddings, "device": str(self.tier.device)},
            "microbatches": self.options.microbatches,
            "max_step_tokens": self.options.max_step_tokens,
            "queued": len(self._queue), "running": len(self._running), "held": len(self._held),
            "steps": self.steps_run,
            "overlap_efficiency": self.last_overlap_efficiency,
            "workers": workers,
            "spares": list(self.cluster.spares),
        }
