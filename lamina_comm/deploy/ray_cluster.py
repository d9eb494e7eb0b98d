"""Bring a deployment up on Ray and take it down: the driver's side of ``lamina-ray``.

``up`` connects to a Ray cluster (``address``), or starts a one-host head
bound to 127.0.0.1 in a session of its own, creates the detached supervisor
(``lamina_comm.deploy.supervisor``) and drives its stages; the driver may then
exit, and the deployment lives on. A state file (``~/.cache/lamina-comm/
ray-NAME.json``) remembers the address, the front doors and the head this
command started, so that ``down`` stops exactly what ``up`` started: the
supervisor's actors, the placement group, and that head's processes (found by
session id; any other Ray on the machine is left alone).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lamina_comm.deploy.config import DeploymentConfig

INSTALL_HINT = "Ray is an optional extra: pip install 'lamina-comm[ray]'"
# Ray's token authentication (the token lives in ~/.ray/auth_token): on for a head we start.
_AUTH_ENV = {"RAY_AUTH_MODE": "token"}
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
HEAD_START_TIMEOUT_S = 60.0
HEAD_STOP_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """Ray is not installed (or not importable)."""


class DeploymentError(RuntimeError):
    """A deployment that cannot be brought up, reached or taken down; the message says why."""


def require_ray(local_head: bool = False) -> Any:
    """Import Ray; ``local_head``: the cluster is a head this module starts (token authentication on,
    which Ray reads from the environment when it is imported)."""
    if local_head:
        for key, value in _AUTH_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(f"{INSTALL_HINT} ({exc})") from None
    return ray


def default_state_path(name: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lamina-comm" / f"ray-{name}.json"


@dataclass
class DeploymentState:
    """What ``down`` needs: where the cluster is, the deployment's name, and the head ``up`` started."""

    name: str
    address: str
    http: list[str] = field(default_factory=list)
    head_pid: Optional[int] = None  # the `ray start --block` process; its session holds every head process
    head_temp_dir: Optional[str] = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "DeploymentState":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise DeploymentError(f"no deployment recorded at {path} (was it brought up with this --state?)") from None
        except (ValueError, TypeError) as exc:
            raise DeploymentError(f"{path} is not a deployment state file: {exc}") from None


# ------------------------------------------------------------------ a one-host head


class LocalHead:
    """A Ray head on this machine, bound to 127.0.0.1, in a session of its own (so it can be stopped
    exactly: every Ray process it starts inherits the session)."""

    def __init__(self, pid: int, address: str, temp_dir: str):
        self.pid = pid
        self.address = address
        self.temp_dir = temp_dir

    @classmethod
    def start(cls, num_cpus: int) -> "LocalHead":
        ray_command = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
        if ray_command is None:
            raise RayUnavailable(f"the `ray` command is not on PATH; {INSTALL_HINT}")
        port = _free_port()
        # Short: Ray's unix socket paths must fit in 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="lray-")
        command = [ray_command, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                   "--temp-dir", temp_dir]
        log_file = open(os.path.join(temp_dir, "lamina-head.log"), "wb")
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, **_AUTH_ENV, **_QUIET_ENV})
        finally:
            log_file.close()
        return cls(process.pid, f"127.0.0.1:{port}", temp_dir)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.temp_dir, "lamina-head.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @staticmethod
    def stop(pid: int, temp_dir: Optional[str] = None, timeout: float = HEAD_STOP_TIMEOUT_S) -> list[int]:
        """SIGTERM every process of the head's session, SIGKILL what is left after ``timeout``;
        returns the pids that were signalled."""
        members = session_members(pid)
        for member in members:
            _signal(member, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(member) for member in members):
            time.sleep(0.1)
        for member in session_members(pid) or members:
            _signal(member, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(member) for member in members):
            time.sleep(0.05)
        _reap(pid)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return members


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes in session ``session_id`` (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "(comm)": state, ppid, pgrp, session, ...
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry))
    return members


def _alive(pid: int) -> bool:
    try:
        state = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ up, status, down


def _connect(ray: Any, address: str, namespace: str, timeout: float = HEAD_START_TIMEOUT_S,
             head: Optional[LocalHead] = None) -> None:
    """ray.init on ``address``, retried while a head we started comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="warning")
            return
        except (ConnectionError, RuntimeError) as exc:
            if head is None or time.monotonic() > deadline or not _alive(head.pid):
                tail = f"\n{head.log_tail()}" if head is not None else ""
                raise DeploymentError(f"cannot connect to Ray at {address}: {exc}{tail}") from None
            time.sleep(0.5)


def supervisor_name(name: str) -> str:
    return f"{name}-supervisor"


def up(config: DeploymentConfig, address: Optional[str] = None, state_path: Optional[Path] = None,
       progress: Optional[Callable[[str], None]] = None) -> DeploymentState:
    """Bring the deployment up; returns its state (saved at ``state_path``). ``progress`` is told each stage."""
    ray = require_ray(local_head=address is None)
    step = progress or (lambda _stage: None)
    state_path = state_path or default_state_path(config.name)
    if state_path.exists():
        raise DeploymentError(f"{state_path} records a deployment already up; take it down first "
                              f"(lamina-ray down --state {state_path})")
    head = None
    if address is None:
        step("starting a Ray head on 127.0.0.1")
        head = LocalHead.start(num_cpus=max(os.cpu_count() or 1, math.ceil(config.cpus_needed)))
        address = head.address
    state = DeploymentState(config.name, address, head_pid=head.pid if head else None,
                            head_temp_dir=head.temp_dir if head else None)
    try:
        step(f"connecting to Ray at {address}")
        _connect(ray, address, config.name, head=head)
        try:
            state.save(state_path)  # from here on, `down` can undo whatever this call started
            state.http = _start_supervisor(ray, config, step)
            state.save(state_path)
        finally:
            ray.shutdown()
    except BaseException:
        _down(state, state_path)
        raise
    return state


def _start_supervisor(ray: Any, config: DeploymentConfig, step: Callable[[str], None]) -> list[str]:
    from lamina_comm.deploy.supervisor import Supervisor

    try:
        ray.get_actor(supervisor_name(config.name), namespace=config.name)
    except ValueError:
        pass
    else:
        raise DeploymentError(f"a deployment named {config.name!r} already runs on this Ray cluster")
    supervisor = ray.remote(Supervisor).options(
        name=supervisor_name(config.name), namespace=config.name, lifetime="detached", num_cpus=0,
        max_concurrency=8).remote(config.model_dump())
    step(f"placing {len(config.bundles)} actors ({config.cpus_needed:g} CPUs, {config.placement.strategy})")
    ray.get(supervisor.place.remote())
    step(f"starting {config.attention.workers} attention workers and {config.attention.spares} spares")
    ray.get(supervisor.start_attention.remote())
    step(f"starting {config.model.replicas} model node(s)")
    return ray.get(supervisor.start_model_nodes.remote())


def status(state_path: Path) -> dict[str, Any]:
    state = DeploymentState.load(state_path)
    ray = require_ray(local_head=state.head_pid is not None)
    _connect(ray, state.address, state.name)
    try:
        return ray.get(_supervisor(ray, state).status.remote(), timeout=30)
    finally:
        ray.shutdown()


def _supervisor(ray: Any, state: DeploymentState) -> Any:
    try:
        return ray.get_actor(supervisor_name(state.name), namespace=state.name)
    except ValueError:
        raise DeploymentError(f"no deployment named {state.name!r} runs on the Ray cluster at {state.address}") \
            from None


def down(state_path: Path) -> dict[str, Any]:
    """Stop the deployment recorded at ``state_path`` and the head ``up`` started; what was stopped."""
    return _down(DeploymentState.load(state_path), state_path)


def _down(state: DeploymentState, state_path: Path) -> dict[str, Any]:
    ray = require_ray(local_head=state.head_pid is not None)
    summary: dict[str, Any] = {"name": state.name, "address": state.address}
    problems = []
    head_alive = state.head_pid is not None and _alive(state.head_pid)
    if state.head_pid is None or head_alive:
        try:
            _connect(ray, state.address, state.name, timeout=10)
            try:
                supervisor = _supervisor(ray, state)
                summary["stopped"] = ray.get(supervisor.shutdown.remote(), timeout=120)
                ray.kill(supervisor, no_restart=True)
            except DeploymentError as exc:
                problems.append(str(exc))
            finally:
                ray.shutdown()
        except DeploymentError as exc:
            problems.append(str(exc))
    if state.head_pid is not None:
        summary["head_processes"] = LocalHead.stop(state.head_pid, state.head_temp_dir)
    state_path.unlink(missing_ok=True)
    if problems:
        summary["problems"] = problems
    return summary
