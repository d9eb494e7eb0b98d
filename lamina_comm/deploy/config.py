"""A Ray deployment's config file (TOML, or JSON by its suffix), checked by pydantic.

    [model]
    config = "tiny"            # or: checkpoint = "/path/to/hf-dir"
    replicas = 1               # model nodes sharing the attention workers
    http_port = 8000           # replica i listens on http_port + i (0: any free port)

    [attention]
    workers = 2                # head shares
    spares = 1                 # standby workers (extra actors)
    blocks = 2048

    [placement]
    strategy = "PACK"          # Ray placement-group strategy

Every table and key is optional except a model source; an unknown key or a
value of the wrong type is refused with its dotted name (``attention.workrs:
unknown key``), before anything is started.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Table):
    """The model tier: where the weights come from and how the model nodes serve."""

    config: Optional[str] = None  # "tiny" or an HF config.json (random weights)
    checkpoint: Optional[str] = None  # an HF checkpoint directory
    seed: int = 0  # random weights' seed with `config`
    replicas: int = Field(1, ge=1, le=16)
    http_port: int = Field(8000, ge=0, le=65535)
    microbatches: int = Field(2, ge=1)
    max_step_tokens: int = Field(2048, ge=1)
    max_queue: int = Field(256, ge=1)
    rebuild_timeout: float = Field(60.0, gt=0)  # held requests wait this long for a replacement worker
    peer_timeout: float = Field(10.0, gt=0)
    cpus: float = Field(1.0, gt=0)  # CPUs reserved for each model node actor
    threads: int = Field(1, ge=1)  # torch threads in each model node

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.config is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of model.config (\"tiny\" or a config.json) and model.checkpoint")
        if self.http_port and self.http_port + self.replicas - 1 > 65535:
            raise ValueError(f"http_port {self.http_port} + {self.replicas} replicas runs past port 65535")
        return self


class AttentionSection(_Table):
    """The attention tier: head-share workers and standby spares."""

    workers: int = Field(2, ge=1)
    spares: int = Field(0, ge=0)
    blocks: int = Field(2048, ge=1)
    block_size: int = Field(16, ge=1)
    cpus: float = Field(0.5, gt=0)  # CPUs reserved for each attention actor
    threads: int = Field(1, ge=1)


class PlacementSection(_Table):
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ready_timeout: float = Field(120.0, gt=0)  # seconds for the placement group and every actor to come up


class NetworkSection(_Table):
    # The address actors bind and announce: "node" is the Ray node's IP (what
    # other nodes reach), or a literal address ("127.0.0.1" keeps a one-host
    # cluster on loopback).
    host: str = "node"
    transport: Literal["auto", "tcp", "verbs", "shm"] = "tcp"
    secret_env: Optional[str] = "LAMINA_SECRET"  # environment variable holding the cluster's secret, if set


class DeploymentConfig(_Table):
    name: str = Field("lamina", pattern=r"^[A-Za-z0-9_-]{1,40}$")  # Ray namespace and actor-name prefix
    model: ModelSection
    attention: AttentionSection = AttentionSection()
    placement: PlacementSection = PlacementSection()
    network: NetworkSection = NetworkSection()

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The placement group's bundles: attention workers, then spares, then model nodes."""
        attention = [{"CPU": self.attention.cpus}] * (self.attention.workers + self.attention.spares)
        return attention + [{"CPU": self.model.cpus}] * self.model.replicas

    @property
    def cpus_needed(self) -> float:
        return sum(bundle["CPU"] for bundle in self.bundles)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def parse_config(data: Any, source: str = "config") -> DeploymentConfig:
    try:
        return DeploymentConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{where}: {message}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(path: str | Path) -> DeploymentConfig:
    """Read and check a deployment file: ``.json`` is JSON, anything else TOML."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = _toml().loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    return _resolve_model_paths(parse_config(data, str(path)), path)


def _resolve_model_paths(config: DeploymentConfig, path: Path) -> DeploymentConfig:
    """Model paths relative to the config file (actors run elsewhere), checked to exist before anything starts."""
    model = config.model
    updates = {}
    for key, value in (("config", model.config), ("checkpoint", model.checkpoint)):
        if value is None or (key == "config" and value == "tiny"):
            continue
        resolved = (path.parent / value).resolve()
        if not (resolved.is_dir() if key == "checkpoint" else resolved.is_file()):
            raise ConfigError(f"{path}: model.{key}: {value!r} is not a {'directory' if key == 'checkpoint' else 'file'}"
                              f" (relative paths are taken from the config file's directory)")
        updates[key] = str(resolved)
    return config.model_copy(update={"model": model.model_copy(update=updates)}) if updates else config


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    import tomli  # the [ray] extra installs it on Python 3.10
    return tomli
