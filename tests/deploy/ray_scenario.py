"""The Ray deployment, end to end, as a user runs it (run by test_ray.py inside a private network namespace).

`lamina-ray up` from a config file; decode over HTTP; `ray.kill` of the
attention actor serving head share 0 in the middle of a request, then of the
one serving share 1 (which the replacement of the first now stands in for);
every request's tokens equal the monolithic model's; `lamina-ray down`; then
nothing of it is left: no actor process, no head process, no front door.
Exits 0 and prints ``SCENARIO OK {json}``, or fails with an AssertionError.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head lamina-ray starts uses token authentication
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BIN = Path(sys.executable).parent
GUARD_S = 120.0
HEADS: list[int] = []  # the pids (= session ids) of the Ray heads this run started
CONFIG = """
name = "lamina-scenario"
[model]
config = "tiny"
http_port = 0
rebuild_timeout = 90.0
[attention]
workers = 2
spares = 1
blocks = 256
[network]
host = "127.0.0.1"
transport = "tcp"
"""


def lamina_ray(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "lamina-ray"), *args], capture_output=True, text=True, timeout=timeout)
    print(f"$ lamina-ray {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr[-3000:]}", flush=True)
    return done


def get_json(http: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{http}{path}", timeout=30) as response:
        return json.loads(response.read())


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    from lamina_comm.model import LlamaConfig, LlamaWeights, MonolithicModel, SamplingParams

    config = LlamaConfig.tiny()
    model = MonolithicModel(config, LlamaWeights.random(config, seed=0))
    return model.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]


class StreamedRequest(threading.Thread):
    """A streaming /generate read line by line in the background: ``tokens`` grows as they come."""

    def __init__(self, http: str, prompt: list[int], max_tokens: int):
        super().__init__(daemon=True)
        self.body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                "stream": True}).encode()
        self.http = http
        self.tokens: list[int] = []
        self.final: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        request = urllib.request.Request(f"http://{self.http}/generate", data=self.body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=GUARD_S) as response:
                for line in response:
                    if line.strip():
                        event = json.loads(line)
                        if "token" in event:
                            self.tokens.append(event["token"])
                        else:
                            self.final = event
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def wait_for_tokens(self, count: int) -> None:
        deadline = time.monotonic() + GUARD_S
        while len(self.tokens) < count and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.tokens) >= count, f"only {len(self.tokens)} tokens came: {self.error} {self.final}"

    def result(self) -> list[int]:
        self.join(GUARD_S)
        assert not self.is_alive(), "the request did not finish"
        assert self.error is None, f"the request failed: {self.error!r}"
        assert self.final.get("done"), f"no final line: {self.final}"
        return self.tokens


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def rebuilds(http: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "lamina_rebuilds_total")


def actor_at(status: dict[str, Any], address: str) -> dict[str, Any]:
    matches = [actor for actor in status["actors"] if actor.get("address") == address]
    assert len(matches) == 1, f"no single actor at {address}: {status['actors']}"
    return matches[0]


def kill_worker_mid_request(ray: Any, http: str, supervisor: Any, share: int, prompt: list[int]) -> dict[str, Any]:
    """Kill the actor serving head share ``share`` while a request decodes; the request's tokens must
    still be the monolithic ones, and a replacement must join."""
    max_tokens = 120
    expected = reference(prompt, max_tokens)
    before = get_json(http, "/status")
    victim = actor_at(ray.get(supervisor.status.remote()), before["workers"][share]["address"])
    rebuilt_before = rebuilds(http)
    request = StreamedRequest(http, prompt, max_tokens)
    request.wait_for_tokens(5)
    ray.kill(ray.get_actor(victim["name"]), no_restart=True)
    at_kill = len(request.tokens)
    tokens = request.result()
    assert at_kill < max_tokens, "the request was over before the kill"
    assert tokens == expected, f"tokens after killing {victim['name']} differ:\n{tokens}\n{expected}"
    assert rebuilds(http) == rebuilt_before + 1, "the model node did not rebuild on another worker"

    def replaced() -> bool:
        events = ray.get(supervisor.status.remote())["events"]
        return any(e["event"] == "replaced" and e.get("replaces") == victim["name"] for e in events)

    wait_until(replaced, f"{victim['name']} is replaced")
    replacement = next(e for e in ray.get(supervisor.status.remote())["events"]
                       if e["event"] == "replaced" and e.get("replaces") == victim["name"])
    assert replacement["address"] != victim["address"]
    wait_until(lambda: replacement["address"] in get_json(http, "/status")["spares"],
               f"the replacement at {replacement['address']} joined as a spare")
    after = get_json(http, "/status")
    assert after["healthy"], after
    assert after["workers"][share]["address"] != victim["address"]
    assert victim["address"] not in after["spares"], "the lost address is still a spare"
    return {"killed": victim["name"], "pid": victim["pid"], "replacement": replacement["actor"],
            "replacement_address": replacement["address"], "tokens_at_kill": at_kill}


def session_processes(head_pid: int) -> list[int]:
    from lamina_comm.deploy.ray_cluster import session_members
    return session_members(head_pid)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="lamina-ray-scenario-"))
    config, state_path = work / "cluster.toml", work / "state.json"
    config.write_text(CONFIG)
    report: dict[str, Any] = {}
    started = time.monotonic()
    up = lamina_ray("up", "--config", str(config), "--state", str(state_path))
    assert up.returncode == 0, "lamina-ray up failed"
    report["up_s"] = round(time.monotonic() - started, 1)
    ready = json.loads(next(line for line in up.stdout.splitlines() if line.startswith("READY "))[6:])
    http = ready["http"][0]
    assert f"HTTP http://{http}" in up.stdout
    state = json.loads(state_path.read_text())
    HEADS.append(state["head_pid"])
    pids: set[int] = set()
    try:
        prompt = [1, 5, 9, 14]
        code_and_body = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://{http}/generate", data=json.dumps({"prompt": prompt, "max_tokens": 16, "temperature": 0.0}).encode(),
            headers={"Content-Type": "application/json"}), timeout=60).read())
        assert code_and_body["tokens"] == reference(prompt, 16), code_and_body

        # The name is taken on that cluster: a second `up` is refused and leaves the first one alone.
        again = lamina_ray("up", "--config", str(config), "--state", str(work / "second.json"),
                           "--address", ready["ray"])
        assert again.returncode == 2 and "already runs on this Ray cluster" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr and not (work / "second.json").exists()
        shown = lamina_ray("status", "--state", str(state_path))
        assert shown.returncode == 0 and json.loads(shown.stdout)["watching"] is True

        import ray
        ray.init(address=ready["ray"], namespace=ready["name"], log_to_driver=False, logging_level="warning")
        try:
            supervisor = ray.get_actor("lamina-scenario-supervisor")
            first = kill_worker_mid_request(ray, http, supervisor, 0, [3, 1, 4, 1, 5])
            second = kill_worker_mid_request(ray, http, supervisor, 1, [2, 7, 1, 8])
            final = ray.get(supervisor.status.remote())
            # The second loss was taken over by the first one's replacement.
            assert first["replacement_address"] in [w["address"] for w in get_json(http, "/status")["workers"]]
            report.update(first=first, second=second)
            pids = {actor["pid"] for actor in final["actors"]} | {first["pid"], second["pid"],
                                                                  final["supervisor_pid"]}
        finally:
            ray.shutdown()
    finally:
        down = lamina_ray("down", "--state", str(state_path))
    assert down.returncode == 0, "lamina-ray down failed"
    assert not state_path.exists()
    left = [pid for pid in pids if pid_alive(pid)]
    assert not left, f"actor processes left running: {left}"
    assert not session_processes(state["head_pid"]), "Ray head processes left running"
    host, port = http.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        pass
    else:
        raise AssertionError(f"the front door at {http} still accepts connections")
    report["total_s"] = round(time.monotonic() - started, 1)
    print("SCENARIO OK " + json.dumps(report), flush=True)


def clean_up_after_a_failure() -> None:
    """Whatever a failed run left of the head it started (the failure has been reported already)."""
    from lamina_comm.deploy.ray_cluster import LocalHead

    for head_pid in HEADS:
        LocalHead.stop(head_pid, timeout=1)


if __name__ == "__main__":
    try:
        main()
    finally:
        clean_up_after_a_failure()
