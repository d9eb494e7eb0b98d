"""The deployment's supervisor: a detached Ray actor that owns every other actor.

It reserves a placement group (one bundle per attention worker, spare and
model node), starts the actors in their bundles, and watches each actor's
``serve()`` reference. An attention actor that dies is replaced in the same
bundle by a new one on a new port, which announces itself to every model
node's front door (``POST /cluster/join``) and stands by as a spare: the model
node moves a lost worker's head share to a spare (rebuilding the KV cache of
the requests it holds), so requests continue with the same tokens.

The actors are owned by the supervisor (not detached), so they share its
fate: ``shutdown()`` stops them in order (model nodes first, so that open
requests get an answer), and killing the supervisor takes the rest down too.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lamina_comm.deploy.actors import AttentionActor, ModelActor, cluster_secret as _cluster_secret
from lamina_comm.deploy.config import DeploymentConfig, parse_config
from lamina_comm.node.membership import MembershipError, announce

log = logging.getLogger("lamina_comm.deploy")

# Concurrent calls an actor takes: its blocking serve(), stop() and describe().
_ACTOR_CONCURRENCY = 4
# Time a stopping actor gets before it is killed.
_STOP_TIMEOUT_S = 30.0
# Pause between two tries to start a replacement that failed to start: doubled per failure, up to the cap.
_REPLACE_RETRY_S = 1.0
_REPLACE_RETRY_MAX_S = 30.0
_WATCH_TICK_S = 0.5
_MAX_EVENTS = 200


class _Stopping(Exception):
    """Shutdown began: whatever was being started is abandoned."""


@dataclass
class Member:
    """One actor of the deployment, in its placement-group bundle."""

    kind: str  # "attention" or "model"
    bundle: int
    generation: int  # 0 for the first actor of a bundle, +1 per replacement
    name: str
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)  # describe(): address or http, pid
    serving: Optional[Any] = None  # the serve() reference


class Supervisor:
    """Brings a deployment up in stages (``place``, ``start_attention``, ``start_model_nodes``), then
    watches it until ``shutdown``."""

    def __init__(self, deployment: dict[str, Any], deployment_id: str):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        self.config: DeploymentConfig = parse_config(deployment)
        self._deployment = deployment
        self._id = deployment_id  # `down` checks it: a state file only ever stops its own deployment
        self._watch_error: Optional[str] = None
        self._placement: Optional[Any] = None
        self._members: dict[int, Member] = {}  # by bundle
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def deployment_id(self) -> str:
        return self._id

    # -- bring-up -----------------------------------------------------------
    def place(self) -> list[dict[str, float]]:
        """Reserve the placement group; raises if Ray cannot place it within the ready timeout."""
        bundles = self.config.bundles
        self._placement = placement_group(bundles, strategy=self.config.placement.strategy,
                                          name=f"{self.config.name}-placement")
        try:
            ray.get(self._placement.ready(), timeout=self.config.placement.ready_timeout)
        except GetTimeoutError:
            raise RuntimeError(f"Ray could not place {len(bundles)} bundles ({self.config.cpus_needed:g} CPUs, "
                               f"strategy {self.config.placement.strategy}) within "
                               f"{self.config.placement.ready_timeout:g} s: the cluster lacks the resources") from None
        return bundles

    def start_attention(self) -> list[str]:
        """Start every attention actor (workers, then spares); their addresses in bundle order."""
        count = self.config.attention.workers + self.config.attention.spares
        members = [self._launch_attention(bundle, 0, join=[]) for bundle in range(count)]
        self._describe(members)
        return [member.info["address"] for member in members]

    def start_model_nodes(self) -> list[str]:
        """Start the model nodes on the attention workers; their front doors. Watching starts here."""
        workers = self.config.attention.workers
        addresses = [self._members[bundle].info["address"] for bundle in range(workers + self.config.attention.spares)]
        first = workers + self.config.attention.spares
        members = []
        for index in range(self.config.model.replicas):
            name = f"{self.config.name}-model-{index}"
            handle = self._actor(ModelActor, first + index, name, self.config.model.cpus).remote(
                self._deployment, index, addresses[:workers], addresses[workers:])
            members.append(self._record(Member("model", first + index, 0, name, handle)))
        self._describe(members)
        self._watcher = threading.Thread(target=self._watch, name="supervisor-watch", daemon=True)
        self._watcher.start()
        return [member.info["http"] for member in members]

    def _actor(self, cls: type, bundle: int, name: str, cpus: float) -> Any:
        return ray.remote(cls).options(
            name=name, num_cpus=cpus, max_concurrency=_ACTOR_CONCURRENCY, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self._placement,
                                                                 placement_group_bundle_index=bundle))

    def _launch_attention(self, bundle: int, generation: int, join: list[str]) -> Member:
        name = f"{self.config.name}-attention-{bundle}" + (f".{generation}" if generation else "")
        with self._lock:  # under the lock: shutdown() either sees this actor or stops it being made
            if self._stopping.is_set():
                raise _Stopping()
            handle = self._actor(AttentionActor, bundle, name, self.config.attention.cpus).remote(
                self._deployment, join)
            member = self._members[bundle] = Member("attention", bundle, generation, name, handle)
        return member

    def _record(self, member: Member) -> Member:
        with self._lock:
            self._members[member.bundle] = member
        return member

    def _describe(self, members: list[Member]) -> None:
        """Wait until each actor is constructed (serving), then start its serve() call. Gives up early
        (``_Stopping``) when shutdown begins."""
        pending = [member.handle.describe.remote() for member in members]
        deadline = time.monotonic() + self.config.placement.ready_timeout
        while True:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=_WATCH_TICK_S)
            if len(done) == len(pending):
                break
            if self._stopping.is_set():
                raise _Stopping()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending) - len(done)} actors did not start within "
                                   f"{self.config.placement.ready_timeout:g} s")
        for member, info in zip(members, ray.get(pending)):
            member.info = info
            member.serving = member.handle.serve.remote()

    # -- watching -----------------------------------------------------------
    def _watch(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    serving = {member.serving: member for member in self._members.values()
                               if member.serving is not None}
                if not serving:
                    self._stopping.wait(_WATCH_TICK_S)
                    continue
                ended, _ = ray.wait(list(serving), num_returns=1, timeout=_WATCH_TICK_S)
                for reference in ended:
                    if self._stopping.is_set():
                        return
                    member = serving[reference]
                    member.serving = None
                    self._ended(member, reference)
        except _Stopping:
            pass
        except Exception as exc:  # noqa: BLE001 - supervision ends; status says so instead of going quiet
            log.exception("the supervisor's watch failed")
            self._watch_error = f"{type(exc).__name__}: {exc}"

    def _ended(self, member: Member, reference: Any) -> None:
        try:
            cause = f"its serve loop returned {ray.get(reference)!r}"
        except RayActorError as exc:
            cause = f"the actor died ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - whatever ended it is reported, the member replaced
            cause = f"its serve loop failed: {exc}"
        info = member.info.get("address") or member.info.get("http")
        log.warning("%s %s at %s ended: %s", member.kind, member.name, info, cause)
        self._event("lost", member, cause=cause)
        ray.kill(member.handle, no_restart=True)  # frees the bundle if the process is still there
        if member.kind == "attention":
            self._forget(member)
            self._replace(member)

    def _fronts(self) -> list[str]:
        with self._lock:
            return [member.info["http"] for member in self._members.values()
                    if member.kind == "model" and member.serving is not None]

    def _forget(self, lost: Member) -> None:
        """Tell every model node the lost address is gone for good (a replacement comes on a new port):
        it leaves their spare lists instead of being probed at every later failover."""
        address = lost.info.get("address")
        for http in self._fronts() if address else []:
            try:
                announce(http, "leave", address, _cluster_secret(self.config))
            except (MembershipError, OSError) as exc:  # 404: the model node forgot it already
                log.info("leave of %s at %s: %s", address, http, exc)

    def _replace(self, lost: Member) -> None:
        """A new attention actor in the lost one's bundle, joining every model node as a spare."""
        generation = lost.generation + 1
        retry_s = _REPLACE_RETRY_S
        while not self._stopping.is_set():
            member = self._launch_attention(lost.bundle, generation, join=self._fronts())
            try:
                self._describe([member])
            except _Stopping:
                raise
            except Exception as exc:  # noqa: BLE001 - a start that fails is retried: the bundle may still be held
                log.warning("replacement %s did not start: %s; trying again in %g s", member.name, exc, retry_s)
                self._event("replacement failed", member, error=str(exc)[:500])
                ray.kill(member.handle, no_restart=True)
                generation += 1
                self._stopping.wait(retry_s)
                retry_s = min(retry_s * 2, _REPLACE_RETRY_MAX_S)
                continue
            log.warning("attention actor %s replaced by %s at %s", lost.name, member.name, member.info["address"])
            self._event("replaced", member, replaces=lost.name, previous=lost.info.get("address"))
            return

    def _event(self, kind: str, member: Member, **fields: Any) -> None:
        with self._lock:
            self._events.append({"time": time.time(), "event": kind, "actor": member.name,
                                 "address": member.info.get("address") or member.info.get("http"), **fields})
            del self._events[:-_MAX_EVENTS]

    # -- status and shutdown ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            members = sorted(self._members.values(), key=lambda member: member.bundle)
            return {
                "name": self.config.name,
                "supervisor_pid": os.getpid(),
                "http": [member.info.get("http") for member in members if member.kind == "model"],
                "actors": [{"kind": member.kind, "bundle": member.bundle, "name": member.name,
                            "generation": member.generation, "serving": member.serving is not None,
                            **member.info} for member in members],
                "events": list(self._events),
                "watching": self._watcher is not None and self._watcher.is_alive(),
                "watch_error": self._watch_error,
            }

    def shutdown(self) -> dict[str, Any]:
        """Stop every actor (model nodes first, so open requests get their answer), kill them and release
        the placement group. No actor is started once this has begun (``_launch_attention``)."""
        with self._lock:
            self._stopping.set()
            members = list(self._members.values())
        if self._watcher is not None:
            self._watcher.join(timeout=_WATCH_TICK_S * 4)
        final = self.status()
        for kind in ("model", "attention"):
            group = [member for member in members if member.kind == kind]
            # Actors known dead are not asked; the others are given _STOP_TIMEOUT_S together.
            stopping = [member.handle.stop.remote() for member in group if member.serving is not None]
            if stopping:
                _, late = ray.wait(stopping, num_returns=len(stopping), timeout=_STOP_TIMEOUT_S)
                if late:
                    log.warning("%d %s actors did not stop within %g s; killing them", len(late), kind,
                                _STOP_TIMEOUT_S)
            for member in group:
                ray.kill(member.handle, no_restart=True)
        if self._placement is not None:
            remove_placement_group(self._placement)
            self._placement = None
        return final
