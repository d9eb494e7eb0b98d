"""Disaggregated decoding: one model node, attention nodes in separate processes, over loopback.

Parity is checked two ways: every micro-batch of every step is replayed on a
``MonolithicModel`` with the same weights and its logits must be bit-equal
(``torch.equal``), and the tokens of each request must equal
``MonolithicModel.generate`` of that request alone. Start-up errors must fail
fast with a message that names the cause.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import torch

import lamina_comm as lc
from lamina_comm.engine import RemoteAttention
from lamina_comm.model import LlamaConfig, LlamaWeights, MonolithicModel, SamplingParams
from lamina_comm.node.demo import NodeProcess, post_json, start_attention, start_model
from lamina_comm.node.model_node import ModelNode
from lamina_comm.node.options import ModelNodeOptions
from lamina_comm.node.protocol import ControlError
from lamina_comm.node.requests import RequestHandle, RequestRejected

CONFIG = LlamaConfig.tiny()
SEED = 0
MAX_ITERATIONS = 500  # bound on scheduler iterations in a test


# ------------------------------------------------------------------ helpers (also used by the other node tests)


def tiny_weights() -> LlamaWeights:
    return LlamaWeights.random(CONFIG, seed=SEED)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def prompt_of(length: int, salt: int = 0) -> list[int]:
    return [(7 * i + 13 * salt + 1) % CONFIG.vocab_size for i in range(length)]


def reference_tokens(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
    """Each request generated alone by the monolithic model."""
    model = MonolithicModel(CONFIG, tiny_weights())
    return [model.generate([prompt], p)[0] for prompt, p in zip(prompts, params)]


def run_until_done(node: ModelNode, handles: Sequence[RequestHandle], limit: int = MAX_ITERATIONS) -> None:
    for _ in range(limit):
        if all(h.done for h in handles):
            return
        node.run_once()
    raise AssertionError(f"requests not done after {limit} scheduler iterations")


def make_node(addresses: Sequence[str], **options: object) -> ModelNode:
    settings = {"attention": tuple(addresses), "transport": "tcp", "connect_timeout": 20.0, "peer_timeout": 10.0,
                **options}
    node = ModelNode(CONFIG, tiny_weights(), ModelNodeOptions(**settings))
    node.connect()
    return node


def attention_nodes(count: int, *extra: str) -> list[NodeProcess]:
    nodes = [start_attention(f"attention {i}", "--transport", "tcp", *extra) for i in range(count)]
    try:
        for node in nodes:
            node.wait_ready()
    except BaseException:
        for node in nodes:
            node.close()
        raise
    return nodes


def address(node: NodeProcess) -> str:
    return node.ready["address"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ fixtures


# The attention processes share the CPUs: torch's thread pool would spin against them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    nodes = attention_nodes(2, "--config", "tiny", "--blocks", "128")
    yield [address(node) for node in nodes]
    for node in nodes:
        assert node.stop() == 0, node.log()
        node.close()


@pytest.fixture
def node(workers: list[str]) -> Iterator[ModelNode]:
    model_node = make_node(workers, microbatches=2)
    yield model_node
    model_node.close()


# ------------------------------------------------------------------ parity


Record = tuple[int, int, list[tuple[int, list[int], int]], torch.Tensor]  # step, micro-batch, entries, logits


def test_requests_joining_at_different_steps_match_the_monolithic_model_exactly(node: ModelNode) -> None:
    records: list[Record] = []
    node.step_observer = lambda step, mb, entries, logits: records.append((step, mb, entries, logits.clone()))
    prompts = [prompt_of(3, 0), prompt_of(17, 1), prompt_of(30, 2), prompt_of(1, 3), prompt_of(8, 4)]
    params = [greedy(12), greedy(9), greedy(14), greedy(10), greedy(6)]

    handles = [node.submit(prompts[i], params[i]) for i in (0, 1)]
    for _ in range(3):
        node.run_once()
    handles += [node.submit(prompts[i], params[i]) for i in (2, 3)]
    for _ in range(2):
        node.run_once()
    handles.append(node.submit(prompts[4], params[4]))
    run_until_done(node, handles)

    assert [h.result(0)["tokens"] for h in handles] == reference_tokens(prompts, params)
    replay_on_monolithic(records, {h.id: len(p) + q.max_tokens - 1 for h, p, q in zip(handles, prompts, params)})
    assert max(mb for _, mb, _, _ in records) == 1, "ping-pong never ran two micro-batches"
    first_step = {h.id: min(step for step, _, entries, _ in records if any(e[0] == h.id for e in entries))
                  for h in handles}
    joined = [first_step[h.id] for h in handles]
    assert joined[0] == joined[1] < joined[2] == joined[3] < joined[4], f"join steps {joined}"
    # A CPU tier computes q/k/v into the send slots and control messages are
    # encoded into them: the channels copied nothing.
    channels = [worker["channel"] for worker in node.status()["workers"]]
    assert all(c["messages"] > 0 and c["staged_bytes"] == 0 and c["staged_messages"] == 0 for c in channels), channels
    # The layers went through the public engine API on both tiers: the model node's RemoteAttention
    # over the workers' data channels, whose last replies carry the compute time each worker's
    # AttentionService reported (LayerRequest.respond(compute_ns=)).
    remote = node.cluster.remote()
    assert isinstance(remote, RemoteAttention) and [c.name for c in remote.channels] == ["data-0", "data-1"]
    assert len(remote.replies) == 2 and all(reply.compute_ns and reply.compute_ns > 0 for reply in remote.replies)


def replay_on_monolithic(records: list[Record], capacity: dict[int, int]) -> None:
    """Every recorded micro-batch, run by the monolithic model, gives bit-identical logits."""
    model = MonolithicModel(CONFIG, tiny_weights())
    for _, _, entries, logits in records:
        for request_id, _, _ in entries:
            if not model.cache.has_request(request_id):
                model.add_request(request_id, capacity[request_id])
        expected = model.step(entries)
        assert torch.equal(expected, logits), f"logits differ for {entries}: {(expected - logits).abs().max()}"


def test_workers_on_the_sdpa_kernel_decode_the_monolithic_models_tokens() -> None:
    """--attention-kernel sdpa (the fused kernel the GPU nodes take by default): greedy tokens identical to a
    monolithic run on the same kernel, logits within float32 rounding (not bit-equal: the fused kernel's
    result depends on the head split)."""
    nodes = attention_nodes(2, "--config", "tiny", "--blocks", "64", "--attention-kernel", "sdpa")
    try:
        node = make_node([address(n) for n in nodes], microbatches=2)
        try:
            records: list[Record] = []
            node.step_observer = lambda step, mb, entries, logits: records.append((step, mb, entries, logits.clone()))
            prompts, params = [prompt_of(5, 0), prompt_of(19, 1), prompt_of(2, 2)], [greedy(8)] * 3
            handles = [node.submit(p, q) for p, q in zip(prompts, params)]
            run_until_done(node, handles)
            assert {w["attention"] for w in node.status()["workers"]} == {"sdpa"}
        finally:
            node.close()
    finally:
        for n in nodes:
            assert n.stop() == 0, n.log()
            n.close()
    mono = MonolithicModel(CONFIG, tiny_weights(), attention="sdpa")
    assert [h.result(0)["tokens"] for h in handles] == [mono.generate([p], q)[0] for p, q in zip(prompts, params)]
    replay = MonolithicModel(CONFIG, tiny_weights(), attention="sdpa")
    capacity = {h.id: len(p) + q.max_tokens - 1 for h, p, q in zip(handles, prompts, params)}
    for _, _, entries, logits in records:
        for request_id, _, _ in entries:
            if not replay.cache.has_request(request_id):
                replay.add_request(request_id, capacity[request_id])
        torch.testing.assert_close(logits, replay.step(entries), rtol=0, atol=1e-4)


def test_seeded_temperature_and_top_p_sampling_matches_the_monolithic_model(node: ModelNode) -> None:
    prompts = [prompt_of(5, 7), prompt_of(11, 8), prompt_of(2, 9)]
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=11),
              SamplingParams(temperature=1.3, max_tokens=7, seed=12),
              SamplingParams(temperature=0.5, top_p=0.5, max_tokens=9, seed=13)]
    handles = [node.submit(p, q) for p, q in zip(prompts, params)]
    run_until_done(node, handles)
    assert [h.result(0)["tokens"] for h in handles] == reference_tokens(prompts, params)


def test_stop_tokens_end_a_request_early(node: ModelNode) -> None:
    prompt = prompt_of(6, 3)
    expected = reference_tokens([prompt], [greedy(12)])[0]
    handle = node.submit(prompt, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[expected[2]]))
    run_until_done(node, [handle])
    result = handle.result(0)
    assert result == {"tokens": expected[: expected.index(expected[2]) + 1], "finish_reason": "stop"}


def test_long_prompts_are_prefilled_in_chunks_within_the_step_budget(workers: list[str]) -> None:
    node = make_node(workers, max_step_tokens=16)
    try:
        prompts, params = [prompt_of(40, 1), prompt_of(5, 2)], [greedy(6), greedy(6)]
        handles = [node.submit(p, q) for p, q in zip(prompts, params)]
        run_until_done(node, handles)
        assert [h.result(0)["tokens"] for h in handles] == reference_tokens(prompts, params)
    finally:
        node.close()


def test_kv_blocks_are_released_when_requests_finish(node: ModelNode) -> None:
    handles = [node.submit(prompt_of(20, i), greedy(5)) for i in range(3)]
    node.run_once()
    assert all(worker["blocks_used"] > 0 for worker in node.status()["workers"])
    run_until_done(node, handles)
    assert [worker["blocks_used"] for worker in node.status()["workers"]] == [0, 0]


def test_cancelled_request_stops_and_frees_its_blocks(node: ModelNode) -> None:
    handle = node.submit(prompt_of(4), greedy(50))
    for _ in range(3):
        node.run_once()
    handle.cancel()
    node.run_once()
    assert handle.result(0)["finish_reason"] == "cancelled"
    assert [worker["blocks_used"] for worker in node.status()["workers"]] == [0, 0]


# ------------------------------------------------------------------ admission


def test_a_request_that_does_not_fit_is_refused_before_it_starts_and_released_everywhere() -> None:
    # Worker 0 holds 4 blocks (64 tokens), worker 1 holds 8: a 100-token request
    # fits only worker 1, which must give its blocks back.
    small, large = attention_nodes(1, "--blocks", "4")[0], attention_nodes(1, "--blocks", "8")[0]
    node = make_node([address(small), address(large)])
    try:
        handle = node.submit(prompt_of(90), greedy(11))
        node.run_once()
        with pytest.raises(RequestRejected) as refused:
            handle.result(0)
        assert refused.value.http_status == 503
        assert "KV cache full" in str(refused.value) and "attention worker 0" in str(refused.value)
        assert [w["blocks_used"] for w in node.status()["workers"]] == [0, 0]
        fitting = node.submit(prompt_of(30), greedy(5))  # the node keeps serving
        run_until_done(node, [fitting])
        assert fitting.result(0)["tokens"] == reference_tokens([prompt_of(30)], [greedy(5)])[0]
    finally:
        node.close()
        for process in (small, large):
            process.close()


def test_invalid_requests_are_refused_at_submission(node: ModelNode) -> None:
    cases = [([], "non-empty"), ([1, 256], "outside [0, 256)"), ([-1], "outside"), ([True], "outside"),
             ([1] * 2040, "exceeds the model's 2048 positions")]
    for prompt, reason in cases:
        with pytest.raises(RequestRejected) as refused:
            node.submit(prompt, greedy(10))
        assert refused.value.http_status == 400 and reason in str(refused.value)


def test_full_queue_is_refused_with_429(workers: list[str]) -> None:
    node = make_node(workers, max_queue=2)
    try:
        handles = [node.submit(prompt_of(3), greedy(2)) for _ in range(2)]
        with pytest.raises(RequestRejected) as refused:
            node.submit(prompt_of(3), greedy(2))
        assert refused.value.http_status == 429
        run_until_done(node, handles)
    finally:
        node.close()


# ------------------------------------------------------------------ start-up errors


def test_worker_count_that_does_not_divide_the_kv_heads_is_a_clear_error() -> None:
    options = ModelNodeOptions(attention=("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
    with pytest.raises(ValueError, match="cannot split 2 KV heads evenly across 3 attention workers"):
        options.validate(CONFIG)


def test_a_worker_that_never_comes_up_fails_with_its_address() -> None:
    missing = f"127.0.0.1:{free_port()}"
    node = ModelNode(CONFIG, tiny_weights(), ModelNodeOptions(attention=(missing,), connect_timeout=0.5))
    with pytest.raises(lc.TimeoutError, match=f"attention worker 0 at {missing}: could not connect"):
        node.connect()


def test_mismatched_model_config_between_roles_fails_fast(tmp_path: Path) -> None:
    other = tmp_path / "config.json"
    other.write_text(json.dumps(LlamaConfig.tiny(num_layers=2).to_hf_dict()))
    process = attention_nodes(1, "--config", str(other))[0]
    try:
        node = ModelNode(CONFIG, tiny_weights(), ModelNodeOptions(attention=(address(process),)))
        with pytest.raises(ControlError, match="model config mismatch") as mismatch:
            node.connect()
        assert "num_layers: model node 4 vs attention node 2" in str(mismatch.value)
        assert address(process) in str(mismatch.value)
    finally:
        process.close()


def test_wrong_or_missing_secret_is_an_authentication_error() -> None:
    process = attention_nodes(1, "--secret", "right secret")[0]
    try:
        for secret in ("wrong secret", None):
            node = ModelNode(CONFIG, tiny_weights(),
                             ModelNodeOptions(attention=(address(process),), secret=secret, connect_timeout=5))
            with pytest.raises(lc.AuthenticationError, match=f"attention worker 0 at {address(process)}"):
                node.connect()
        good = make_node([address(process)], secret="right secret")
        good.close()
    finally:
        process.close()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina_comm.node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_reports_configuration_errors_with_exit_status_2() -> None:
    missing = f"127.0.0.1:{free_port()}"
    cases = {  # arguments -> what stderr must say
        ("--role", "model", "--config", "tiny", "--attention", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"): "divides 2",
        ("--role", "model", "--config", "tiny", "--attention", missing, "--connect-timeout", "0.5"): missing,
        ("--role", "model", "--config", "tiny"): "--attention",
        ("--role", "attention"): "--listen",
    }
    children = {args: subprocess.Popen([sys.executable, "-m", "lamina_comm.node.cli", *args], text=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for args in cases}
    for args, child in children.items():
        _, stderr = child.communicate(timeout=60)
        assert child.returncode == 2 and cases[args] in stderr, (args, stderr)


def test_cli_cluster_serves_http_prints_status_and_stops_cleanly_on_sigterm() -> None:
    workers = attention_nodes(2)
    model = start_model([address(w) for w in workers], "--config", "tiny", "--transport", "tcp")
    try:
        http = model.wait_ready()["http"]
        status, body = post_json(http, "/generate", {"prompt": prompt_of(9), "max_tokens": 7, "temperature": 0})
        assert status == 200 and body["tokens"] == reference_tokens([prompt_of(9)], [greedy(7)])[0]
        printed = _cli("status", "--http", http, timeout=30)
        assert printed.returncode == 0
        for worker, heads in zip(workers, ("KV heads [0, 1)", "KV heads [1, 2)")):
            assert address(worker) in printed.stdout and heads in printed.stdout
        assert "healthy" in printed.stdout and "KV blocks 0/2048" in printed.stdout
        assert model.stop() == 0, model.log()
        for worker in workers:
            assert worker.stop() == 0, worker.log()
    finally:
        for process in (model, *workers):
            process.close()
