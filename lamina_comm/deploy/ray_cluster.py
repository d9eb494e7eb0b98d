"""Bring a deployment up on Ray and take it down: the driver's side of ``lamina-ray``.

``up`` connects to a Ray cluster (``address``), or starts a one-host head
bound to 127.0.0.1 in a session of its own, creates the detached supervisor
(``lamina_comm.deploy.supervisor``) and drives its stages; the driver may then
exit, and the deployment lives on. A state file (``~/.cache/lamina-comm/
ray-NAME.json``) remembers the address, the front doors, the deployment's id
and the head this command started, so that ``down`` stops exactly what ``up``
started: the supervisor whose id matches (never another deployment that took
the name), its actors and placement group, and that head's processes (found by
session id, after checking by boot id and start time that the session leader
is still the head: a reused pid is never signalled).
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
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lamina_comm.deploy.config import DeploymentConfig

INSTALL_HINT = "Ray is an optional extra: pip install 'lamina-comm[ray]'"
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
HEAD_START_TIMEOUT_S = 60.0
HEAD_STOP_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 300.0  # bound on one bring-up stage or status/shutdown call


class RayUnavailable(RuntimeError):
    """Ray is not installed (or not importable)."""


class DeploymentError(RuntimeError):
    """A deployment that cannot be brought up, reached or taken down; the message says why."""


class NoSuchDeployment(DeploymentError):
    """No supervisor of that name runs on the cluster."""


def require_ray(local_head: bool = False) -> Any:
    """Import Ray. ``local_head``: the cluster is a head this module starts, with Ray's token
    authentication unless the environment says otherwise (Ray reads the mode when it is imported)."""
    if local_head:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
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
    """What ``down`` needs: where the cluster is, which deployment, and the head ``up`` started."""

    name: str
    address: str
    deployment_id: str
    http: list[str] = field(default_factory=list)
    head_pid: Optional[int] = None  # the `ray start --block` process; its session holds every head process
    head_started: Optional[int] = None  # its start time (clock ticks since boot, /proc/PID/stat field 22)
    head_boot_id: Optional[str] = None
    head_temp_dir: Optional[str] = None

    def create(self, path: Path) -> None:
        """Write a new state file; refuses if one exists (another deployment of that name is recorded)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise DeploymentError(f"{path} records a deployment already up; take it down first "
                                  f"(lamina-ray down --state {path})") from None
        with os.fdopen(descriptor, "w") as out:
            out.write(json.dumps(asdict(self), indent=2) + "\n")

    def save(self, path: Path) -> None:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> "DeploymentState":
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise DeploymentError(f"no deployment recorded at {path} (was it brought up with this --state?)") from None
        except (ValueError, TypeError) as exc:
            raise DeploymentError(f"{path} is not a deployment state file: {exc}") from None


# ------------------------------------------------------------------ a one-host head


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _proc_stat(pid: int) -> Optional[list[str]]:
    """/proc/PID/stat fields after "(comm)": state, ppid, pgrp, session, ...; None if no such process."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _start_time(pid: int) -> Optional[int]:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22 of the whole line


class LocalHead:
    """A Ray head on this machine, bound to 127.0.0.1, in a session of its own (so it can be stopped
    exactly: every Ray process it starts inherits the session)."""

    def __init__(self, pid: int, address: str, temp_dir: str):
        self.pid = pid
        self.address = address
        self.temp_dir = temp_dir
        self.started = _start_time(pid)
        self.boot_id = _boot_id()

    @classmethod
    def start(cls, num_cpus: int) -> "LocalHead":
        ray_command = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
        if ray_command is None:
            raise RayUnavailable(f"the `ray` command is not on PATH; {INSTALL_HINT}")
        env = {**os.environ, **_QUIET_ENV}
        if env.get("RAY_AUTH_MODE") == "token":
            # Ray refuses to start a token-authenticated head without a token; make one (~/.ray/auth_token).
            made = subprocess.run([ray_command, "get-auth-token", "--generate"], capture_output=True, text=True,
                                  env=env, timeout=60)
            if made.returncode != 0:
                raise DeploymentError(f"cannot create Ray's authentication token: {made.stderr.strip()[-500:]}")
        port = _free_port()
        # Short: Ray's unix socket paths must fit in 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="lray-")
        command = [ray_command, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                   "--temp-dir", temp_dir]
        try:
            with open(os.path.join(temp_dir, "lamina-head.log"), "wb") as log_file:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, start_new_session=True, env=env)
        except OSError:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return cls(process.pid, f"127.0.0.1:{port}", temp_dir)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.temp_dir, "lamina-head.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @staticmethod
    def ours(state: DeploymentState) -> bool:
        """Whether the processes of session ``state.head_pid`` are still the head ``up`` started: same boot,
        and the session leader either the same process (start time) or gone (then the session id cannot have
        been reused: Linux keeps a pid while a session of that id has members)."""
        if state.head_pid is None or state.head_boot_id != _boot_id():
            return False
        started = _start_time(state.head_pid)
        return started is None or started == state.head_started

    @staticmethod
    def stop(pid: int, temp_dir: Optional[str] = None, timeout: float = HEAD_STOP_TIMEOUT_S) -> list[int]:
        """SIGTERM every process of session ``pid``, SIGKILL what is left after ``timeout``; the pids
        signalled. The caller checked that the session is the head's (``ours``)."""
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
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields and int(fields[3]) == session_id and fields[0] != "Z":
                members.append(int(entry))
    return members


def _alive(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


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


def _one_line(exc: BaseException) -> str:
    """A Ray error as one line: the cause a remote call raised, not Ray's wrapping and traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _one_line(cause)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _connect(ray: Any, address: str, namespace: str, timeout: float = HEAD_START_TIMEOUT_S,
             head: Optional[LocalHead] = None) -> None:
    """ray.init on ``address``, retried while a head we started comes up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="warning")
            return
        except Exception as exc:  # noqa: BLE001 - ConnectionError, Ray's AuthenticationError, ...: one line
            if head is None or time.monotonic() > deadline or not _alive(head.pid):
                tail = f"\n{head.log_tail()}" if head is not None else ""
                raise DeploymentError(f"cannot connect to Ray at {address}: {_one_line(exc)}{tail}") from None
            time.sleep(0.5)


def _call(ray: Any, what: str, reference: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    """ray.get of a supervisor call; a failure is a DeploymentError saying what failed and why."""
    try:
        return ray.get(reference, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - RayTaskError, RayActorError, GetTimeoutError: one line
        raise DeploymentError(f"{what} failed: {_one_line(exc)}") from None


def supervisor_name(name: str) -> str:
    return f"{name}-supervisor"


def up(config: DeploymentConfig, address: Optional[str] = None, state_path: Optional[Path] = None,
       progress: Optional[Callable[[str], None]] = None) -> DeploymentState:
    """Bring the deployment up; returns its state (saved at ``state_path``). ``progress`` is told each
    stage. On failure, what this call started (and only that) is stopped again."""
    ray = require_ray(local_head=address is None)
    step = progress or (lambda _stage: None)
    state_path = state_path or default_state_path(config.name)
    state = DeploymentState(config.name, address or "", deployment_id=uuid.uuid4().hex)
    state.create(state_path)  # claims the name locally first (O_EXCL): two `up`s cannot both proceed
    created_supervisor = False
    try:
        head = None
        if address is None:
            step("starting a Ray head on 127.0.0.1")
            head = LocalHead.start(num_cpus=max(os.cpu_count() or 1, math.ceil(config.cpus_needed)))
            state.address = head.address
            state.head_pid, state.head_started, state.head_boot_id = head.pid, head.started, head.boot_id
            state.head_temp_dir = head.temp_dir
            state.save(state_path)  # from here on, `down` can stop the head
        step(f"connecting to Ray at {state.address}")
        _connect(ray, state.address, config.name, head=head)
        try:
            supervisor = _create_supervisor(ray, config, state.deployment_id)
            created_supervisor = True
            state.http = _bring_up(ray, supervisor, config, step)
            state.save(state_path)
        finally:
            ray.shutdown()
    except BaseException:
        _down(state, state_path, supervisor_created=created_supervisor)
        raise
    return state


def _secret_env(config: DeploymentConfig) -> dict[str, str]:
    """The cluster's secret, read here (the user's shell), for the actors' environment."""
    from lamina_comm.deploy.actors import cluster_secret

    secret = cluster_secret(config)
    return {config.network.secret_env: secret} if secret else {}


def _create_supervisor(ray: Any, config: DeploymentConfig, deployment_id: str) -> Any:
    from lamina_comm.deploy.supervisor import Supervisor

    try:
        ray.get_actor(supervisor_name(config.name), namespace=config.name)
    except ValueError:
        pass
    else:
        raise DeploymentError(f"a deployment named {config.name!r} already runs on this Ray cluster")
    try:
        # The actors it starts inherit its runtime_env, the secret with it.
        return ray.remote(Supervisor).options(
            name=supervisor_name(config.name), namespace=config.name, lifetime="detached", num_cpus=0,
            max_concurrency=8, runtime_env={"env_vars": _secret_env(config)},
        ).remote(config.model_dump(), deployment_id)
    except ValueError as exc:  # the name was taken between the check and here
        raise DeploymentError(f"cannot create the supervisor: {exc}") from None


def _bring_up(ray: Any, supervisor: Any, config: DeploymentConfig, step: Callable[[str], None]) -> list[str]:
    step(f"placing {len(config.bundles)} actors ({config.cpus_needed:g} CPUs, {config.placement.strategy})")
    _call(ray, "placing the actors", supervisor.place.remote())
    step(f"starting {config.attention.workers} attention workers and {config.attention.spares} spares")
    _call(ray, "starting the attention workers", supervisor.start_attention.remote())
    step(f"starting {config.model.replicas} model node(s)")
    return _call(ray, "starting the model nodes", supervisor.start_model_nodes.remote())


def _supervisor(ray: Any, state: DeploymentState) -> Any:
    """This deployment's supervisor (its id checked), or DeploymentError."""
    try:
        supervisor = ray.get_actor(supervisor_name(state.name), namespace=state.name)
    except ValueError:
        raise NoSuchDeployment(f"no deployment named {state.name!r} runs on the Ray cluster at {state.address}") \
            from None
    running = _call(ray, "asking the supervisor who it is", supervisor.deployment_id.remote(), timeout=30)
    if running != state.deployment_id:
        raise DeploymentError(f"the deployment named {state.name!r} on {state.address} is not the one recorded "
                              f"in this state file (id {running}, recorded {state.deployment_id}); not touching it")
    return supervisor


def status(state_path: Path) -> dict[str, Any]:
    state = DeploymentState.load(state_path)
    ray = require_ray(local_head=state.head_pid is not None)
    _connect(ray, state.address, state.name)
    try:
        return _call(ray, "status", _supervisor(ray, state).status.remote(), timeout=30)
    finally:
        ray.shutdown()


def down(state_path: Path) -> dict[str, Any]:
    """Stop the deployment recorded at ``state_path`` and the head ``up`` started; what was stopped."""
    return _down(DeploymentState.load(state_path), state_path)


def _down(state: DeploymentState, state_path: Path, supervisor_created: bool = True) -> dict[str, Any]:
    """Stop what the state records. The state file goes only once nothing of it can be left running."""
    summary: dict[str, Any] = {"name": state.name, "address": state.address}
    problems: list[str] = []
    ours = LocalHead.ours(state)
    if state.head_pid is not None and not ours:
        summary["note"] = (f"the head recorded (pid {state.head_pid}) stopped before (another boot, or that pid "
                           f"now belongs to another process): nothing signalled")
    gone = False  # nothing of the deployment can still run
    if supervisor_created and state.address and (state.head_pid is None or (ours and _alive(state.head_pid))):
        ray = require_ray(local_head=state.head_pid is not None)
        try:
            _connect(ray, state.address, state.name, timeout=10)
            try:
                supervisor = _supervisor(ray, state)
                summary["stopped"] = _call(ray, "shutdown", supervisor.shutdown.remote())
                ray.kill(supervisor, no_restart=True)
                gone = True
            finally:
                ray.shutdown()
        except NoSuchDeployment as exc:
            summary["note"] = str(exc)
            gone = True
        except DeploymentError as exc:
            problems.append(str(exc))
    if state.head_pid is not None and ours:
        summary["head_processes"] = LocalHead.stop(state.head_pid, state.head_temp_dir)
        gone = True
    if gone or not supervisor_created or state.head_pid is not None:
        state_path.unlink(missing_ok=True)
    else:
        problems.append(f"kept {state_path}: the deployment may still run; try again")
    if problems:
        summary["problems"] = problems
    return summary
