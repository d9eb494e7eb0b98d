"""``python -m lamina_comm.node.demo`` (``make demo``): disaggregated decoding on loopback.

Starts two attention nodes and one model node (``--replicas R``: R model
nodes sharing the attention nodes, requests round-robin) as separate
``lamina-node`` processes with a tiny random model, sends concurrent requests of different
lengths over HTTP, checks every token against ``MonolithicModel`` with the
same weights (greedy), prints throughput next to a monolithic run and the
per-layer transfer figures from ``/metrics``, then stops everything with
SIGTERM. Exit status 0 only if parity holds and every node stopped cleanly.

:class:`NodeProcess` is also what the tests use to run nodes.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class NodeProcess:
    """A ``lamina-node`` child process; stdout is watched for its READY line, stderr kept in a file."""

    def __init__(self, name: str, args: Sequence[str], env: Optional[dict[str, str]] = None):
        self.name = name
        self.args = list(args)
        self._log = tempfile.TemporaryFile(mode="w+b")
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, child_env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "lamina_comm.node.cli", *self.args],
                                     stdout=subprocess.PIPE, stderr=self._log, env=child_env)
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.ready: dict[str, Any] = {}

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """The READY fields; raises RuntimeError (with the node's log) if it exits or stays silent."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name} not ready within {timeout} s:\n{self.log()}") from None
            if line is None:
                self.proc.wait(5)
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            if line.startswith("READY "):
                self.ready = json.loads(line[len("READY "):])
                return self.ready

    def wait_exit(self, timeout: float) -> int:
        """The exit status; kills the process if it does not exit in time (then raises)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"{self.name} did not exit within {timeout} s:\n{self.log()}") from None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a node."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def stop_nodes(nodes: list[NodeProcess]) -> list[int | str]:
    """Stop nodes in reverse start order; each entry is an exit status, or the
    reason a node did not exit cleanly."""
    codes: list[int | str] = []
    for node in reversed(nodes):
        try:
            codes.append(node.stop())
        except RuntimeError as exc:
            codes.append(str(exc))
        node.close()
    return codes


def start_attention(name: str, *extra: str, listen: str = "127.0.0.1:0",
                    env: Optional[dict[str, str]] = None) -> NodeProcess:
    return NodeProcess(name, ["--role", "attention", "--listen", listen, "--threads", "1", *extra], env)


def start_model(attention: Sequence[str], *extra: str, env: Optional[dict[str, str]] = None) -> NodeProcess:
    return NodeProcess("model node", ["--role", "model", "--attention", ",".join(attention),
                                      "--http", "127.0.0.1:0", "--threads", "1", *extra], env)


# ------------------------------------------------------------------ HTTP client


def post_json(http: str, path: str, payload: Any, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a POST, error statuses included."""
    request = urllib.request.Request(f"http://{http}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def post_stream(http: str, payload: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
    """The NDJSON lines of a streaming /generate."""
    request = urllib.request.Request(f"http://{http}/generate", data=json.dumps({**payload, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return [json.loads(line) for line in response if line.strip()]


def get_text(http: str, path: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://{http}{path}", timeout=timeout) as response:
        return response.read().decode()


# ------------------------------------------------------------------ the demo


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @classmethod
    def mixed(cls, count: int, seed: int, vocab_size: int) -> "Workload":
        """Prompts of 3..64 tokens and 16..48 new tokens, different for every request."""
        rng = random.Random(seed)
        lengths = [3, 12, 23, 40, 7, 64, 5, 31][:count] + [rng.randint(3, 64) for _ in range(max(0, count - 8))]
        prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]
        return cls(prompts, [16 + (8 * i) % 40 for i in range(count)])


def run_disaggregated(https: Sequence[str], workload: Workload) -> tuple[list[list[int]], float]:
    """Send all requests at once (every other one streaming), request i to model node i mod R;
    returns tokens per request and wall time."""

    def one(index: int) -> list[int]:
        http = https[index % len(https)]
        payload = {"prompt": workload.prompts[index], "max_tokens": workload.max_tokens[index], "temperature": 0}
        if index % 2:
            lines = post_stream(http, payload)
            if "error" in lines[-1]:
                raise RuntimeError(f"request {index} failed: {lines[-1]['error']}")
            return [line["token"] for line in lines if "token" in line]
        status, body = post_json(http, "/generate", payload)
        if status != 200:
            raise RuntimeError(f"request {index} failed with {status}: {body}")
        return body["tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(workload.prompts)) as pool:
        tokens = list(pool.map(one, range(len(workload.prompts))))
    return tokens, time.perf_counter() - started


def run_monolithic(seed: int, workload: Workload) -> dict[str, Any]:
    """The reference: each request alone (parity), then all batched as one job (throughput)."""
    import torch

    from lamina_comm.model import LlamaConfig, LlamaWeights, MonolithicModel, SamplingParams

    torch.set_num_threads(1)
    config = LlamaConfig.tiny()
    model = MonolithicModel(config, LlamaWeights.random(config, seed=seed))
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in workload.max_tokens]
    alone = [model.generate([prompt], p)[0] for prompt, p in zip(workload.prompts, params)]
    started = time.perf_counter()
    batched = model.generate(workload.prompts, params)
    wall = time.perf_counter() - started
    decode_tokens, decode_seconds = _monolithic_decode_rate(model, workload, params)
    return {"tokens": alone, "batched_tokens": batched, "wall_s": wall,
            "decode_tokens": decode_tokens, "decode_s": decode_seconds}


def _monolithic_decode_rate(model: Any, workload: Workload, params: list[Any]) -> tuple[int, float]:
    """Tokens and seconds of the decode steps of one batched greedy run (prefill excluded)."""
    ids = [("rate", i) for i in range(len(workload.prompts))]
    for request_id, prompt, p in zip(ids, workload.prompts, params):
        model.add_request(request_id, len(prompt) + p.max_tokens - 1)
    try:
        logits = model.step([(rid, prompt, 0) for rid, prompt in zip(ids, workload.prompts)])
        produced = {rid: [int(t)] for rid, t in zip(ids, logits.argmax(-1).tolist())}
        tokens, seconds = 0, 0.0
        while True:
            batch = [(rid, [produced[rid][-1]], len(prompt) + len(produced[rid]) - 1)
                     for rid, prompt, p in zip(ids, workload.prompts, params) if len(produced[rid]) < p.max_tokens]
            if not batch:
                return tokens, seconds
            started = time.perf_counter()
            logits = model.step(batch)
            seconds += time.perf_counter() - started
            for (rid, _, _), token in zip(batch, logits.argmax(-1).tolist()):
                produced[rid].append(int(token))
            tokens += len(batch)
    finally:
        for request_id in ids:
            model.finish_request(request_id)


def _transfer_table(metrics_text: str) -> list[str]:
    from lamina_comm.node.metrics import histogram_means, parse_prometheus

    samples = parse_prometheus(metrics_text)
    round_trips = histogram_means(samples, "lamina_layer_round_trip_seconds")
    transfers = histogram_means(samples, "lamina_layer_transfer_seconds")
    waits = histogram_means(samples, "lamina_layer_collect_wait_seconds")
    lines = ["  peer                   layer   messages   round trip   transfer (round trip - attention)"
             "   waited to be collected"]
    for labels in sorted(round_trips, key=lambda l: (l.split('peer="')[1], int(l.split('layer="')[1].split('"')[0]))):
        peer = labels.split('peer="')[1].split('"')[0]
        layer = labels.split('layer="')[1].split('"')[0]
        count, mean_rt = round_trips[labels]
        mean_transfer = transfers.get(labels, (0, 0.0))[1]
        mean_wait = waits.get(labels, (0, 0.0))[1]
        lines.append(f"  {peer:<22} {layer:>5} {count:>10} {mean_rt * 1e6:>9.0f} us {mean_transfer * 1e6:>9.0f} us"
                     f" {' ' * 22}{mean_wait * 1e6:>9.0f} us")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamina_comm.node.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1,
                        help="model nodes sharing the two attention nodes (requests go round-robin)")
    parser.add_argument("--transport", choices=("auto", "tcp", "shm"), default="auto",
                        help="the nodes' transport (auto: shm between these processes of one host)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be >= 1")

    nodes: list[NodeProcess] = []
    ok = False
    try:
        started = time.perf_counter()
        attention = [start_attention(f"attention node {i}", "--config", "tiny", "--blocks", "256",
                                     "--transport", args.transport) for i in range(2)]
        nodes += attention
        addresses = [node.wait_ready()["address"] for node in attention]
        models = [start_model(addresses, "--config", "tiny", "--seed", str(args.seed),
                              "--microbatches", str(args.microbatches), "--name", f"replica-{i}",
                              "--transport", args.transport)
                  for i in range(args.replicas)]
        nodes += models
        https = [model.wait_ready()["http"] for model in models]
        print(f"cluster up in {time.perf_counter() - started:.1f} s: model node(s) "
              f"{', '.join(f'http://{http}' for http in https)}, attention nodes {', '.join(addresses)}")

        from lamina_comm.model import LlamaConfig
        workload = Workload.mixed(args.requests, args.seed, LlamaConfig.tiny().vocab_size)
        disaggregated, wall = run_disaggregated(https, workload)
        metrics_texts = [get_text(http, "/metrics") for http in https]
        workers = json.loads(get_text(https[0], "/status"))["workers"]
        print("data channels over " + ", ".join(sorted({str(w.get("transport")) for w in workers})) +
              " (auto: shm between processes of one host; --transport tcp forces tcp)")
        status_text = subprocess.run([sys.executable, "-m", "lamina_comm.node.cli", "status", "--http",
                                      ",".join(https)], capture_output=True, text=True, timeout=30,
                                     env={**os.environ, "PYTHONPATH": _PACKAGE_ROOT}).stdout
        reference = run_monolithic(args.seed, workload)
        ok = _report(workload, disaggregated, wall, reference, metrics_texts, status_text)
    finally:
        codes = stop_nodes(nodes)
        for code in codes:
            if isinstance(code, str):
                print(code, file=sys.stderr)
    clean = all(code == 0 for code in codes)
    print(f"nodes stopped {'cleanly' if clean else f'with exit codes {codes}'}")
    return 0 if ok and clean else 1


def _report(workload: Workload, disaggregated: list[list[int]], wall: float, reference: dict[str, Any],
            metrics_texts: list[str], status_text: str) -> bool:
    from lamina_comm.node.metrics import histogram_means, parse_prometheus

    print(status_text.rstrip())
    print("\nrequests (greedy; reference: MonolithicModel, same weights):")
    parity = True
    for index, (prompt, tokens, expected) in enumerate(zip(workload.prompts, disaggregated, reference["tokens"])):
        same = tokens == expected
        parity &= same
        print(f"  #{index} prompt {len(prompt):>2} tokens -> {len(tokens):>2} new  "
              f"{'match' if same else f'MISMATCH: got {tokens}, expected {expected}'}")
    replicas = [parse_prometheus(text) for text in metrics_texts]
    samples = replicas[0]
    generated = sum(len(tokens) for tokens in disaggregated)
    # Replicas decode side by side: the cluster's decode rate is the sum of theirs.
    rates = [r.get("lamina_decode_tokens_total", 0) / max(r.get("lamina_decode_step_seconds_total", 0), 1e-9)
             for r in replicas]
    decode_rate = sum(rates)
    mono_decode_rate = reference["decode_tokens"] / max(reference["decode_s"], 1e-9)
    efficiency = histogram_means(samples, "lamina_step_overlap_efficiency").get("", (0, float("nan")))
    mono_generated = sum(len(tokens) for tokens in reference["batched_tokens"])
    print("\nthroughput (this machine, CPU):")
    print(f"  disaggregated, {len(replicas)} model + 2 attention processes: {generated / wall:8.1f} tokens/s end to "
          f"end over HTTP ({generated} tokens in {wall:.2f} s), decode steps {decode_rate:8.1f} tokens/s"
          + (f" ({' + '.join(f'{rate:.1f}' for rate in rates)} per replica)" if len(rates) > 1 else ""))
    print(f"  monolithic, one process, same batch:              {mono_generated / reference['wall_s']:8.1f} tokens/s "
          f"end to end ({mono_generated} tokens in {reference['wall_s']:.2f} s), decode steps "
          f"{mono_decode_rate:8.1f} tokens/s")
    print(f"  disaggregated / monolithic decode steps: {decode_rate / max(mono_decode_rate, 1e-9):.2f}")
    staged = sum(value for r in replicas for key, value in r.items() if key.startswith("lamina_channel_staged_bytes"))
    print(f"  bytes staged (copied into send slots) on the model node: {int(staged)}")
    if efficiency[0]:
        print(f"  overlap efficiency (mean over {efficiency[0]} two-micro-batch steps): {efficiency[1]:.2f}")
    else:
        print("  overlap efficiency: n/a (no step ran two micro-batches)")
    print(f"\nper-layer transfer figures (means from /metrics{' of replica-0' if len(replicas) > 1 else ''}):")
    print("\n".join(_transfer_table(metrics_texts[0])))
    print(f"\nparity: {'OK, every token matches' if parity else 'FAILED'}")
    return parity


if __name__ == "__main__":
    sys.exit(main())
