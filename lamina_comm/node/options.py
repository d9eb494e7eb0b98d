"""``ModelNodeOptions``: the model role's settings (``lamina-node --role model`` flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lamina_comm.model import LlamaConfig, split_kv_heads
from lamina_comm.node.protocol import ControlError, check_replica_name


@dataclass(frozen=True)
class ModelNodeOptions:
    attention: tuple[str, ...]
    spares: tuple[str, ...] = ()
    microbatches: int = 2
    # Token budget of one micro-batch (channel slots are sized for it); longer
    # prompts are prefilled in chunks.
    max_step_tokens: int = 2048
    max_queue: int = 256
    device: str = "cpu"
    secret: Optional[str] = None
    transport: str = "auto"
    # "event" or "poll" (Context(progress=...)); None: $LAMINA_PROGRESS, else event.
    progress: Optional[str] = None
    connect_timeout: float = 10.0
    # Bound on every wait for an attention worker (a reply, a slot credit).
    peer_timeout: float = 10.0
    # How long held requests wait for a replacement worker before they fail.
    rebuild_timeout: float = 30.0
    # An idle (or recovering) node sends its workers a status heartbeat this
    # often, or at a third of a worker's takeover bound if that is shorter, so a
    # worker that dies while nothing runs is noticed within this plus
    # peer_timeout, and no worker takes this node for a hung one.
    idle_probe_s: float = 2.0
    # /healthz turns 503 when the scheduler has work but has completed no step
    # and settled no request for this long (a hung or failing scheduler loop).
    stall_timeout: float = 60.0
    record_timeline: bool = True
    # This model node's name among the replicas sharing the attention workers
    # (--name): in their logs, refusals and status. None: its address.
    name: Optional[str] = None

    def validate(self, config: LlamaConfig) -> None:
        if not self.attention:
            raise ValueError("at least one attention worker address is needed (--attention HOST:PORT,...)")
        split_kv_heads(config.num_kv_heads, len(self.attention))  # raises a clear ValueError
        if self.name is not None:
            try:
                check_replica_name(self.name)
            except ControlError as exc:
                raise ValueError(f"--name: {exc}") from None
        for name in ("microbatches", "max_step_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "peer_timeout", "rebuild_timeout", "idle_probe_s", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
