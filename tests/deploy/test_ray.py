"""Deployment on Ray: the config file, the command without Ray, and the whole thing on a one-host Ray cluster.

The end-to-end run (ray_scenario.py) happens in a private network namespace
(``unshare -n``, loopback only): Ray's own services listen on every interface
of their namespace, and there they can reach nothing but 127.0.0.1.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lamina_comm.deploy.config import ConfigError, load_config, parse_config

SCENARIO = Path(__file__).with_name("ray_scenario.py")
EXAMPLE = Path(__file__).parents[2] / "examples" / "ray-tiny.toml"


def test_the_example_config_is_valid_and_sizes_its_placement_group() -> None:
    config = load_config(EXAMPLE)
    assert (config.attention.workers, config.attention.spares, config.model.replicas) == (2, 1, 1)
    assert config.bundles == [{"CPU": 0.5}] * 3 + [{"CPU": 1.0}]
    assert config.cpus_needed == 2.5


@pytest.mark.parametrize("data, match", [
    ({"model": {"config": "tiny"}, "attention": {"workrs": 2}}, r"attention\.workrs: unknown key"),
    ({"model": {"config": "tiny", "checkpoint": "/x"}}, "exactly one of model.config"),
    ({"model": {}}, "exactly one of model.config"),
    ({"attention": {"workers": 2}}, r"model: Field required"),
    ({"model": {"config": "tiny"}, "attention": {"workers": "2"}}, r"attention\.workers: Input should be a valid integer"),
    ({"model": {"config": "tiny"}, "attention": {"workers": 0}}, r"attention\.workers: Input should be greater"),
    ({"model": {"config": "tiny"}, "placement": {"strategy": "ANYWHERE"}}, r"placement\.strategy"),
    ({"model": {"config": "tiny"}, "name": "a b"}, r"name: String should match"),
])
def test_bad_configs_are_refused_naming_the_key(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(data, "cluster.toml")


def test_an_unreadable_or_malformed_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nconfig = 1\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)
    as_json = tmp_path / "cluster.json"
    as_json.write_text('{"model": {"config": "tiny"}, "attention": {"spares": 2}}')
    assert load_config(as_json).attention.spares == 2


def _lamina_ray_without_ray(*args: str) -> subprocess.CompletedProcess:
    """lamina-ray in a Python where `import ray` fails, as on a machine without the extra."""
    code = ("import sys; sys.modules['ray'] = None; from lamina_comm.deploy.cli import main; "
            f"sys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_without_ray_the_command_says_how_to_get_it(tmp_path: Path) -> None:
    done = _lamina_ray_without_ray("up", "--config", str(EXAMPLE), "--state", str(tmp_path / "state.json"))
    assert done.returncode == 2
    assert "pip install 'lamina-comm[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state.json").exists()


def test_down_without_a_deployment_says_so(tmp_path: Path) -> None:
    done = _lamina_ray_without_ray("down", "--state", str(tmp_path / "none.json"))
    assert done.returncode == 2 and "no deployment recorded at" in done.stderr


def _scenario_unavailable() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install 'lamina-comm[ray]')"
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs root, unshare and ip for a private network namespace"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    return None


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_ray_deployment_survives_killed_attention_actors_and_leaves_nothing_behind(tmp_path: Path) -> None:
    reason = _scenario_unavailable()
    if reason:
        pytest.skip(reason)
    # A HOME of its own: no Ray token there (lamina-ray must make one, as on a fresh machine), and a
    # secret, so that the replacements' joins and the supervisor's leaves are signed.
    env = {**os.environ, "HOME": str(tmp_path), "LAMINA_SECRET": "ray-scenario-secret"}
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(["unshare", "-n", sys.executable, str(SCENARIO)], capture_output=True, text=True,
                          timeout=540, cwd=Path(__file__).parents[2], env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "SCENARIO OK" in done.stdout, output[-12000:]


def test_down_signals_the_recorded_head_session_only_while_it_is_the_same_process(tmp_path: Path) -> None:
    """A state file outlives its head; a pid that now names another process (another start time or boot)
    is never signalled, while the head itself (and everything in its session) is stopped."""
    from lamina_comm.deploy.ray_cluster import DeploymentState, LocalHead, _boot_id, _down, _start_time

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state_path = tmp_path / "state.json"
        for boot_id, started in ((_boot_id(), _start_time(stranger.pid) + 1), ("another-boot", None)):
            state = DeploymentState("x", "127.0.0.1:1", "id", head_pid=stranger.pid, head_boot_id=boot_id,
                                    head_started=started or _start_time(stranger.pid))
            state.create(state_path)
            assert not LocalHead.ours(state)
            summary = _down(state, state_path)
            assert "nothing signalled" in summary["note"] and stranger.poll() is None
            assert not state_path.exists()
        head = DeploymentState("x", "127.0.0.1:1", "id", head_pid=stranger.pid, head_boot_id=_boot_id(),
                               head_started=_start_time(stranger.pid))
        head.create(state_path)
        assert LocalHead.ours(head)
        with pytest.raises(Exception, match="records a deployment already up"):
            head.create(state_path)
        summary = _down(head, state_path, supervisor_created=False)
        assert stranger.pid in summary["head_processes"]
        assert stranger.wait(timeout=10) is not None and not state_path.exists()
    finally:
        stranger.kill()
        stranger.wait()
