"""Attention workers dying mid-generation: detection, holding, rebuild on a replacement,
identical continuation; and an error answer for every request that cannot continue."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lamina_comm.node.demo import NodeProcess, post_json, post_stream, start_attention
from lamina_comm.node.http_api import FrontDoor
from lamina_comm.node.model_node import ModelNode
from lamina_comm.node.requests import RequestRejected
from tests.node.test_disaggregated import (address, attention_nodes, greedy, make_node, prompt_of,
                                           reference_tokens, run_until_done)

PROMPTS = [prompt_of(4, 1), prompt_of(13, 2), prompt_of(27, 3)]
PARAMS = [greedy(14), greedy(10), greedy(12)]
# Data messages a worker serves per step: 4 layers x 2 micro-batches.
MESSAGES_PER_STEP = 8


# The attention processes share the CPUs: torch's thread pool would spin against them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start(processes: list[NodeProcess], count: int, *extra: str) -> list[NodeProcess]:
    nodes = attention_nodes(count, *extra)
    processes.extend(nodes)
    return nodes


def submit_all(node: ModelNode) -> list[Any]:
    return [node.submit(prompt, params) for prompt, params in zip(PROMPTS, PARAMS)]


def test_killed_worker_is_detected_rebuilt_on_a_spare_and_continues_identically(
        processes: list[NodeProcess]) -> None:
    first, second, spare = start(processes, 3)
    node = make_node([address(first), address(second)], spares=(address(spare),))
    try:
        handles = submit_all(node)
        for _ in range(4):
            node.run_once()
        assert all(0 < len(h.tokens) < p.max_tokens for h, p in zip(handles, PARAMS)), "not mid-generation"
        second.kill()

        node.run_once()  # the step fails: every running request is held
        status = node.status()
        assert status["held"] == 3 and status["running"] == 0 and not status["healthy"]
        assert status["workers"][1]["state"] == "lost" and "peer lost" in status["workers"][1]["error"].lower()
        assert node.metrics.worker_failures.value(peer=address(second)) == 1

        run_until_done(node, handles)
        assert [h.result(0)["tokens"] for h in handles] == reference_tokens(PROMPTS, PARAMS)
        status = node.status()
        assert status["healthy"] and status["workers"][1]["address"] == address(spare)
        assert status["spares"] == [address(second)]  # should it come back, it can stand by
        assert node.metrics.rebuilds.value() == 1
        assert [w["blocks_used"] for w in status["workers"]] == [0, 0]
    finally:
        node.close()


def test_worker_dying_in_the_middle_of_a_step_is_rebuilt_with_identical_continuation(
        processes: list[NodeProcess]) -> None:
    first = start(processes, 1)[0]
    # Dies without answering half way through its third step (after two tokens).
    dying = start(processes, 1, "--exit-after-messages", str(2 * MESSAGES_PER_STEP + 3))[0]
    spare = start(processes, 1)[0]
    node = make_node([address(first), address(dying)], spares=(address(spare),))
    try:
        handles = submit_all(node)
        run_until_done(node, handles)
        assert dying.proc.wait(10) == 3, "the worker did not die as planned"
        assert [h.result(0)["tokens"] for h in handles] == reference_tokens(PROMPTS, PARAMS)
        assert node.metrics.worker_failures.value(peer=address(dying)) == 1
        assert node.metrics.rebuilds.value() == 1
        assert node.metrics.steps.value(outcome="worker_lost") == 1
    finally:
        node.close()


def test_the_dead_workers_address_coming_back_replaces_it(processes: list[NodeProcess]) -> None:
    first, second = start(processes, 2)
    node = make_node([address(first), address(second)])
    try:
        handles = submit_all(node)
        for _ in range(3):
            node.run_once()
        second.kill()
        node.run_once()  # detected, requests held
        node.run_once()  # nothing listens there yet: still held
        assert node.status()["held"] == 3
        restarted = start_attention("restarted attention 1", "--transport", "tcp", listen=address(second))
        processes.append(restarted)
        restarted.wait_ready()
        run_until_done(node, handles)
        assert [h.result(0)["tokens"] for h in handles] == reference_tokens(PROMPTS, PARAMS)
        worker = node.status()["workers"][1]
        assert (worker["address"], worker["state"], worker["pid"]) == (address(second), "up", restarted.proc.pid)
    finally:
        node.close()


def test_requests_get_an_error_when_no_replacement_comes(processes: list[NodeProcess]) -> None:
    first, second = start(processes, 2)
    node = make_node([address(first), address(second)], rebuild_timeout=1.0)
    try:
        handles = submit_all(node)
        for _ in range(3):
            node.run_once()
        queued = node.submit(prompt_of(5), greedy(4))  # waits in the queue, never admitted
        second.kill()
        run_until_done(node, [*handles, queued], limit=50)
        for handle in [*handles, queued]:
            with pytest.raises(RequestRejected) as failed:
                handle.result(0)
            assert failed.value.http_status == 503
            assert "no replacement attention worker within 1.0 s" in str(failed.value)
            assert address(second) in str(failed.value)
        with pytest.raises(RequestRejected, match="attention tier unavailable") as refused:
            node.submit(prompt_of(3), greedy(2))
        assert refused.value.http_status == 503 and not node.healthy
        assert node.status()["workers"][0]["blocks_used"] == 0  # the survivor gave the blocks back
    finally:
        node.close()


def test_a_worker_dying_while_the_node_is_idle_is_noticed_and_replaced(processes: list[NodeProcess]) -> None:
    first, second, spare = start(processes, 3)
    node = make_node([address(first), address(second)], spares=(address(spare),), idle_probe_s=0.05)
    try:
        second.kill()
        deadline = time.monotonic() + 30
        while node.metrics.worker_failures.value(peer=address(second)) == 0:
            assert time.monotonic() < deadline, "the idle node never noticed the dead worker"
            node.run_once(wait=0.05)
        node.run_once()  # replaced by the spare
        assert node.healthy and node.status()["workers"][1]["address"] == address(spare)
        handle = node.submit(PROMPTS[0], PARAMS[0])
        run_until_done(node, [handle])
        assert handle.result(0)["tokens"] == reference_tokens(PROMPTS[:1], PARAMS[:1])[0]
    finally:
        node.close()


def test_http_clients_see_an_uninterrupted_answer_across_a_worker_loss(processes: list[NodeProcess]) -> None:
    first = start(processes, 1)[0]
    dying = start(processes, 1, "--exit-after-messages", str(3 * MESSAGES_PER_STEP + 5))[0]
    spare = start(processes, 1)[0]
    node = make_node([address(first), address(dying)], spares=(address(spare),))
    node.start()
    front = FrontDoor(node, ("127.0.0.1", 0), request_timeout=60)
    front.start()
    http = f"{front.address[0]}:{front.address[1]}"
    answers: dict[str, Any] = {}

    def plain() -> None:
        answers["plain"] = post_json(http, "/generate", {"prompt": PROMPTS[0], "max_tokens": 14, "temperature": 0})

    try:
        thread = threading.Thread(target=plain)
        thread.start()
        lines = post_stream(http, {"prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0})
        thread.join(60)
        expected = reference_tokens(PROMPTS[:2], PARAMS[:2])
        status, body = answers["plain"]
        assert status == 200 and body["tokens"] == expected[0]
        assert lines[-1].get("error") is None and lines[-1]["tokens"] == expected[1]
        assert [line["token"] for line in lines[:-1]] == expected[1]
        assert dying.proc.wait(10) == 3 and node.metrics.rebuilds.value() == 1
    finally:
        node.close()
        front.close()
