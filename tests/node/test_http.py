"""The model node's HTTP front door: generation (plain and streaming), health, status, metrics,
and clear 4xx answers to bad requests while the server keeps serving."""
from __future__ import annotations

from http.client import HTTPConnection
import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from lamina_comm.node import cli
from lamina_comm.node.demo import get_text, post_json, post_stream
from lamina_comm.node.metrics import parse_prometheus
from lamina_comm.node.model_node import ModelNode
from tests.node.test_disaggregated import greedy, prompt_of, reference_tokens

HTTP_TIMEOUT = 60.0


@pytest.fixture
def http(server: tuple[str, ModelNode]) -> str:
    return server[0]


def raw_request(http: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = http.rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


# ------------------------------------------------------------------ generation


def test_generate_returns_the_monolithic_tokens(http: str) -> None:
    status, body = post_json(http, "/generate", {"prompt": prompt_of(10), "max_tokens": 8, "temperature": 0})
    assert status == 200
    assert body["tokens"] == reference_tokens([prompt_of(10)], [greedy(8)])[0]
    assert body["finish_reason"] == "length" and body["prompt_tokens"] == 10 and body["completion_tokens"] == 8


def test_streaming_sends_one_line_per_token_then_a_summary(http: str) -> None:
    lines = post_stream(http, {"prompt": prompt_of(6, 2), "max_tokens": 9, "temperature": 0})
    expected = reference_tokens([prompt_of(6, 2)], [greedy(9)])[0]
    assert [line["token"] for line in lines[:-1]] == expected
    assert [line["index"] for line in lines[:-1]] == list(range(9))
    assert lines[-1]["done"] is True and lines[-1]["tokens"] == expected and lines[-1]["finish_reason"] == "length"


def test_concurrent_requests_of_different_lengths_all_match(http: str) -> None:
    prompts = [prompt_of(n, n) for n in (2, 9, 25, 40)]
    max_tokens = [12, 5, 9, 7]
    results: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        status, body = post_json(http, "/generate", {"prompt": prompts[i], "max_tokens": max_tokens[i],
                                                    "temperature": 0})
        results[i] = body["tokens"] if status == 200 else body

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HTTP_TIMEOUT)
    assert [results.get(i) for i in range(len(prompts))] == reference_tokens(prompts, [greedy(n) for n in max_tokens])


def test_a_request_that_does_not_fit_gets_503_and_a_dropped_stream_is_cancelled(
        server: tuple[str, ModelNode]) -> None:
    http, node = server
    # Each worker has 160 blocks of 16 tokens; the holder reserves 126 of them.
    holder = {"prompt": prompt_of(10), "max_tokens": 2000, "temperature": 0, "stream": True}
    request = urllib.request.Request(f"http://{http}/generate", data=json.dumps(holder).encode())
    stream = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    try:
        assert "token" in json.loads(stream.readline())  # admitted and generating
        status, body = post_json(http, "/generate", {"prompt": prompt_of(10), "max_tokens": 2000})
        assert status == 503
        assert "KV cache full" in body["error"] and "needs 126 blocks" in body["error"]
    finally:
        stream.close()  # the server notices on its next write and cancels the holder
    deadline = time.monotonic() + HTTP_TIMEOUT
    while node.status()["running"] or any(w["blocks_used"] for w in node.status()["workers"]):
        assert time.monotonic() < deadline, "the dropped stream was not cancelled"
        time.sleep(0.05)


# ------------------------------------------------------------------ bad requests

BAD_BODIES = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'"prompt"', "JSON object"),
    (json.dumps({"max_tokens": 3}).encode(), "prompt is required"),
    (json.dumps({"prompt": []}).encode(), "must not be empty"),
    (json.dumps({"prompt": "1 2 3"}).encode(), "prompt must be a list"),
    (json.dumps({"prompt": [1, "2"]}).encode(), "prompt[1] must be an integer"),
    (json.dumps({"prompt": [1, 2.5]}).encode(), "prompt[1] must be an integer"),
    (json.dumps({"prompt": [True]}).encode(), "prompt[0] must be an integer"),
    (json.dumps({"prompt": [1, 256]}).encode(), "outside [0, 256)"),
    (json.dumps({"prompt": [-3]}).encode(), "outside [0, 256)"),
    (json.dumps({"prompt": [1] * 2049}).encode(), "exceeds the model's 2048 positions"),
    (json.dumps({"prompt": [1] * 2000, "max_tokens": 100}).encode(), "exceeds the model's 2048 positions"),
    (json.dumps({"prompt": [1], "max_tokens": 0}).encode(), "max_tokens must be an integer >= 1"),
    (json.dumps({"prompt": [1], "max_tokens": "5"}).encode(), "max_tokens must be an integer"),
    (json.dumps({"prompt": [1], "temperature": -1}).encode(), "temperature must be finite and >= 0"),
    (json.dumps({"prompt": [1], "temperature": "hot"}).encode(), "temperature must be a number"),
    (json.dumps({"prompt": [1], "top_p": 0}).encode(), "top_p must be in (0, 1]"),
    (json.dumps({"prompt": [1], "top_p": 1.5}).encode(), "top_p must be in (0, 1]"),
    (json.dumps({"prompt": [1], "seed": -1}).encode(), "seed must be None or an integer"),
    (json.dumps({"prompt": [1], "seed": 1.5}).encode(), "seed must be an integer"),
    (json.dumps({"prompt": [1], "stream": "yes"}).encode(), "stream must be true or false"),
    (json.dumps({"prompt": [1], "stop_token_ids": 3}).encode(), "stop_token_ids must be a list"),
    (json.dumps({"prompt": [1], "prompts": [1]}).encode(), "unknown fields ['prompts']"),
    (b"\xff\xfe garbage", "not valid JSON"),
]


@pytest.mark.parametrize("body,reason", BAD_BODIES, ids=[reason for _, reason in BAD_BODIES])
def test_bad_requests_get_400_with_a_reason(http: str, body: bytes, reason: str) -> None:
    status, answer = raw_request(http, "POST", "/generate", body, {"Content-Type": "application/json"})
    assert status == 400
    assert reason in answer["error"]


def test_protocol_errors_get_4xx(http: str) -> None:
    assert raw_request(http, "GET", "/nowhere")[0] == 404
    assert raw_request(http, "GET", "/generate")[0] == 405
    assert raw_request(http, "DELETE", "/status")[0] == 405
    # The header alone must be refused: sending the 2 MiB would race the server's
    # early close (EPIPE on the client), so only the claim is sent.
    assert raw_request(http, "POST", "/generate", b"{}", headers={"Content-Length": str(2 << 20)})[0] == 413
    host, port = http.rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    try:  # no Content-Length at all: an empty body
        connection.putrequest("POST", "/generate")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 400 and "a JSON body is required" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_server_keeps_serving_after_bad_requests(http: str) -> None:
    for body, _ in BAD_BODIES[:5]:
        raw_request(http, "POST", "/generate", body)
    status, body = post_json(http, "/generate", {"prompt": prompt_of(4), "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["tokens"] == reference_tokens([prompt_of(4)], [greedy(3)])[0]
    assert raw_request(http, "GET", "/healthz") == (200, {"status": "ok"})


# ------------------------------------------------------------------ observability


def test_status_describes_the_cluster(server: tuple[str, ModelNode], capsys: pytest.CaptureFixture[str]) -> None:
    http, node = server
    status, body = raw_request(http, "GET", "/status")
    assert status == 200 and body["role"] == "model" and body["healthy"] is True
    assert [(w["role"], w["state"], w["kv_heads"], w["q_heads"]) for w in body["workers"]] == [
        ("attention", "up", [0, 1], [0, 4]), ("attention", "up", [1, 2], [4, 8])]
    assert all(w["blocks_total"] == 160 and w["blocks_used"] == 0 for w in body["workers"])
    assert cli.main(["status", "--http", http]) == 0
    printed = capsys.readouterr().out
    for worker in body["workers"]:
        assert worker["address"] in printed
    assert "KV heads [1, 2)" in printed and "q heads [4, 8)" in printed


def test_metrics_are_prometheus_text_with_the_promised_series(http: str) -> None:
    post_json(http, "/generate", {"prompt": prompt_of(5), "max_tokens": 4, "temperature": 0})
    text = get_text(http, "/metrics")
    samples = parse_prometheus(text)
    for name in ("lamina_tokens_per_second", "lamina_generated_tokens_total", "lamina_queue_depth",
                 "lamina_running_requests", "lamina_step_seconds_count"):
        assert name in samples, name
    assert samples["lamina_generated_tokens_total"] >= 4
    peers = {key.split('peer="')[1].split('"')[0] for key in samples if key.startswith("lamina_kv_blocks_total")}
    assert len(peers) == 2
    for peer in peers:
        for layer in range(4):
            key = f'lamina_layer_round_trip_seconds_count{{layer="{layer}",peer="{peer}"}}'
            assert samples[key] > 0
            assert f'lamina_layer_transfer_seconds_bucket{{layer="{layer}",le="+Inf",peer="{peer}"}}' in samples
    assert "# TYPE lamina_layer_round_trip_seconds histogram" in text
    # The request latencies users scrape from vLLM, per replica, parsed by prometheus_client's own parser.
    from prometheus_client.parser import text_string_to_metric_families
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("lamina_time_to_first_token_seconds", "lamina_inter_token_latency_seconds",
                 "lamina_e2e_request_latency_seconds", "lamina_request_queue_time_seconds"):
        assert families[name].type == "histogram", name
        counts = [s.value for s in families[name].samples if s.name == f"{name}_count"]
        assert counts and counts[0] >= 1, name
    itl = [s.value for s in families["lamina_inter_token_latency_seconds"].samples
           if s.name.endswith("_count")]
    assert itl[0] >= 3  # 4 tokens: 3 gaps
