"""Several model nodes (replicas) sharing one attention pool.

Each replica keeps its own scheduler; the workers serve every replica's
messages in arrival order out of one shared KV cache. Checked: monolithic
parity (bit-equal logits per micro-batch, greedy tokens) for requests sent
to both replicas joining at different steps; a replica that dies frees its
blocks while the other keeps decoding; a worker that dies under both is
rebuilt by both on a spare; admission between replicas (refusals name the
replica, nothing of the other is evicted); a replica with another head share
is refused at once.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from lamina_comm.node import protocol
from lamina_comm.node.demo import NodeProcess, post_json, start_model
from lamina_comm.node.model_node import ModelNode
from lamina_comm.node.requests import RequestRejected
from tests.node.test_disaggregated import (Record, address, greedy, make_node, prompt_of, reference_tokens,
                                           replay_on_monolithic, run_until_done)
from tests.node.test_faults import start as start_attention_nodes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GUARD_S = 60.0  # bound on any wait in these tests


def start(processes: list[NodeProcess], count: int, *extra: str) -> list[NodeProcess]:
    return start_attention_nodes(processes, count, "--config", "tiny", *extra)


def run_both_until_done(nodes: list[ModelNode], handles: list, limit: int = 500) -> None:
    """Alternate the replicas' scheduler iterations until every request is done."""
    for _ in range(limit):
        if all(h.done for h in handles):
            return
        for node in nodes:
            node.run_once()
    raise AssertionError(f"requests not done after {limit} rounds")


def run_rounds(nodes: list[ModelNode], rounds: int) -> None:
    for _ in range(rounds):
        for node in nodes:
            node.run_once()


def record_into(node: ModelNode, records: list[Record]) -> None:
    node.step_observer = lambda step, mb, entries, logits: records.append((step, mb, entries, logits.clone()))


def test_two_replicas_sharing_two_workers_match_the_monolithic_model_exactly(
        processes: list[NodeProcess]) -> None:
    workers = [address(w) for w in start(processes, 2, "--blocks", "128")]
    a, b = make_node(workers, name="replica-a"), make_node(workers, name="replica-b")
    try:
        records_a: list[Record] = []
        records_b: list[Record] = []
        record_into(a, records_a)
        record_into(b, records_b)
        prompts = [prompt_of(3, 0), prompt_of(17, 1), prompt_of(9, 2), prompt_of(5, 3), prompt_of(12, 4)]
        params = [greedy(12), greedy(9), greedy(10), greedy(11), greedy(7)]
        # Both replicas use request ids 0, 1, ...: the workers must keep them apart.
        on_a = [a.submit(prompts[0], params[0]), a.submit(prompts[1], params[1])]
        for _ in range(2):
            a.run_once()
        on_b = [b.submit(prompts[2], params[2]), b.submit(prompts[3], params[3])]
        run_rounds([a, b], 2)
        on_a.append(a.submit(prompts[4], params[4]))
        assert {h.id for h in on_a} & {h.id for h in on_b}, "the replicas' request ids did not collide"
        run_both_until_done([a, b], on_a + on_b)

        tokens = [h.result(0)["tokens"] for h in (on_a[0], on_a[1], on_b[0], on_b[1], on_a[2])]
        assert tokens == reference_tokens(prompts, params)
        ids_a = {h.id: len(p) + q.max_tokens - 1 for h, p, q in zip(on_a, [prompts[0], prompts[1], prompts[4]],
                                                                  [params[0], params[1], params[4]])}
        ids_b = {h.id: len(p) + q.max_tokens - 1 for h, p, q in zip(on_b, prompts[2:4], params[2:4])}
        replay_on_monolithic(records_a, ids_a)
        replay_on_monolithic(records_b, ids_b)

        status = b.status()
        assert status["name"] == "replica-b"
        for worker in status["workers"]:
            assert sorted(r["name"] for r in worker["replicas"]) == ["replica-a", "replica-b"], worker
            assert worker["blocks_used"] == 0 and worker["blocks_held"] == 0
    finally:
        a.close()
        b.close()


def test_a_killed_replica_frees_its_blocks_and_the_other_keeps_serving(processes: list[NodeProcess]) -> None:
    workers = [address(w) for w in start(processes, 2, "--blocks", "256")]
    survivor = make_node(workers, name="survivor", idle_probe_s=0.05)
    doomed = start_model(workers, "--config", "tiny", "--transport", "tcp", "--name", "doomed")
    processes.append(doomed)
    try:
        doomed.wait_ready(timeout=GUARD_S)
        # A long request on the doomed replica holds blocks on both workers ...
        box: dict = {}
        threading.Thread(target=lambda: box.setdefault("answer", _post_quietly(doomed, 1000)), daemon=True).start()
        handle = survivor.submit(prompt_of(6, 1), greedy(40))
        deadline = time.monotonic() + GUARD_S
        while time.monotonic() < deadline:
            survivor.run_once(wait=0.05)
            held = {r["name"]: r["blocks_held"] for r in survivor.status()["workers"][0]["replicas"]}
            if held.get("doomed", 0) > 0:
                break
        else:
            raise AssertionError(f"the doomed replica never held blocks: {box}")
        # ... until it is killed mid-decode: the workers see its connections drop.
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(GUARD_S)
        run_until_done(survivor, [handle])
        assert handle.result(0)["tokens"] == reference_tokens([prompt_of(6, 1)], [greedy(40)])[0]
        deadline = time.monotonic() + GUARD_S  # idle heartbeats (every 0.05 s) refresh the workers' figures
        while time.monotonic() < deadline:
            survivor.run_once(wait=0.05)
            if all([r["name"] for r in w["replicas"]] == ["survivor"] for w in survivor.status()["workers"]):
                break
        assert all(w["blocks_used"] == 0 for w in survivor.status()["workers"])
        assert all([r["name"] for r in w["replicas"]] == ["survivor"] for w in survivor.status()["workers"])
        assert survivor.metrics.worker_failures.value(peer=workers[0]) == 0
    finally:
        survivor.close()


def _post_quietly(node: NodeProcess, max_tokens: int) -> object:
    try:
        return post_json(node.ready["http"], "/generate", {"prompt": prompt_of(4, 2), "max_tokens": max_tokens,
                                                          "temperature": 0}, timeout=GUARD_S)
    except OSError as exc:  # the node is killed under it
        return exc


def test_one_replica_filling_the_pool_is_refused_and_the_other_is_never_evicted(
        processes: list[NodeProcess]) -> None:
    # 16 blocks of 16 tokens per worker: each of two replicas is guaranteed 8.
    workers = [address(w) for w in start(processes, 2, "--blocks", "16")]
    steady, greedy_replica = make_node(workers, name="steady"), make_node(workers, name="hungry")
    try:
        running = steady.submit(prompt_of(5, 1), greedy(60))  # 64 positions: 4 blocks, under its share
        steady.run_once()
        # 3 blocks each: "hungry" may borrow past its share of 8, but not into the 4 blocks
        # "steady" is guaranteed and does not hold yet (16 - 4 held - 4 kept = 8 for it).
        hungry = [greedy_replica.submit(prompt_of(4, 10 + i), greedy(40)) for i in range(4)]
        greedy_replica.run_once()
        run_both_until_done([steady, greedy_replica], [running, *hungry])
        outcomes = []
        for handle in hungry:
            try:
                outcomes.append(handle.result(0)["tokens"])
            except RequestRejected as exc:
                outcomes.append(exc)
        refused = [o for o in outcomes if isinstance(o, RequestRejected)]
        assert len(refused) == 2, outcomes
        assert "KV cache full for replica 'hungry'" in str(refused[0]) and "kept for the other" in str(refused[0])
        served = [(i, o) for i, o in enumerate(outcomes) if not isinstance(o, RequestRejected)]
        for i, tokens in served:
            assert tokens == reference_tokens([prompt_of(4, 10 + i)], [greedy(40)])[0]
        assert running.result(0)["tokens"] == reference_tokens([prompt_of(5, 1)], [greedy(60)])[0]
    finally:
        steady.close()
        greedy_replica.close()


def test_a_worker_dying_under_both_replicas_is_rebuilt_by_both_on_a_spare(processes: list[NodeProcess]) -> None:
    first, dying, spare = start(processes, 3)
    workers = [address(first), address(dying)]
    a = make_node(workers, spares=(address(spare),), name="a")
    b = make_node(workers, spares=(address(spare),), name="b")
    try:
        prompts, params = [prompt_of(4, 1), prompt_of(9, 2)], [greedy(14), greedy(12)]
        handles = [a.submit(prompts[0], params[0]), b.submit(prompts[1], params[1])]
        run_rounds([a, b], 3)
        assert all(0 < len(h.tokens) for h in handles), "not mid-generation"
        dying.kill()
        run_both_until_done([a, b], handles)
        assert [h.result(0)["tokens"] for h in handles] == reference_tokens(prompts, params)
        for node in (a, b):
            status = node.status()
            assert status["healthy"] and status["workers"][1]["address"] == address(spare)
            assert node.metrics.rebuilds.value() == 1
        assert sorted(r["name"] for r in b.status()["workers"][1]["replicas"]) == ["a", "b"]
    finally:
        a.close()
        b.close()


def test_a_replica_with_another_head_share_is_refused_at_once(processes: list[NodeProcess]) -> None:
    workers = [address(w) for w in start(processes, 2)]
    first = make_node(workers, name="first")
    try:
        with pytest.raises(protocol.ControlError, match="cannot share it") as refused:
            make_node(list(reversed(workers)), name="swapped", connect_timeout=5.0)
        assert refused.value.code == "conflict" and "first" in str(refused.value)
        handle = first.submit(prompt_of(5), greedy(4))
        run_until_done(first, [handle])
        assert handle.result(0)["tokens"] == reference_tokens([prompt_of(5)], [greedy(4)])[0]
    finally:
        first.close()


def test_a_full_worker_refuses_one_more_replica_naming_those_it_serves(processes: list[NodeProcess]) -> None:
    workers = [address(w) for w in start(processes, 1, "--max-model-nodes", "2")]
    a, b = make_node(workers, name="a"), make_node(workers, name="b")
    try:
        with pytest.raises(protocol.ControlError, match="busy with 2 model nodes") as busy:
            make_node(workers, name="c", connect_timeout=2.0)
        assert busy.value.code == "busy" and "at a," in str(busy.value) and "b, last heard" in str(busy.value)
    finally:
        a.close()
        b.close()


def test_the_demo_runs_two_replicas_and_the_status_shows_every_replica_and_worker() -> None:
    done = subprocess.run([sys.executable, "-m", "lamina_comm.node.demo", "--replicas", "2", "--requests", "4"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "parity: OK" in out and "nodes stopped cleanly" in out
    assert "(replica-0)  healthy" in out and "(replica-1)  healthy" in out
    assert "attention pool: 2 workers shared by 2 model nodes" in out
    pool = out.split("attention pool:")[1].split("\n\n")[0]
    assert pool.count("replica-0") == 2 and pool.count("replica-1") == 2, pool
