"""Planner: per-layer traffic, Lamina's bandwidth bound, MegaScale-Infer's m, and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import lamina_comm.plan as plan_module
from lamina_comm.plan import (
    LinkResult,
    add_plan_arguments,
    bytes_per_token_per_layer,
    estimate_t_attention_s,
    estimate_t_model_s,
    lamina_min_bandwidth,
    load_link_results,
    main,
    megascale_min_microbatches,
    pick_link_result,
    plan,
    return_bytes_per_token_per_layer,
    run_plan,
    send_bytes_per_token_per_layer,
    step_bytes,
)

# Llama-3-70B: hidden 8192, 80 layers, 64 query heads over 8 kv heads, fp16.
LLAMA3_70B = {"hidden": 8192, "layers": 80, "gqa_group": 8}
KIB = 1024


# --------------------------------------------------------------------------
# Traffic


def test_llama3_70b_moves_36_kib_per_token_per_layer() -> None:
    assert bytes_per_token_per_layer(8192, 8, 2) == 36 * KIB == 36864


def test_traffic_splits_into_qkv_out_and_attention_output_back() -> None:
    assert send_bytes_per_token_per_layer(8192, 8, 2) == 2 * (8192 + 2 * 1024)
    assert return_bytes_per_token_per_layer(8192, 2) == 2 * 8192


def test_multi_head_attention_moves_four_vectors() -> None:
    # G = 1: q, k, v and the output are all d wide.
    assert bytes_per_token_per_layer(4096, 1, 4) == 4 * 4 * 4096


def test_step_bytes_scale_with_batch_and_layers() -> None:
    assert step_bytes(8192, 80, 8, 256, 2) == 36864 * 256 * 80 == 754_974_720


def test_gqa_group_must_divide_hidden() -> None:
    with pytest.raises(ValueError):
        bytes_per_token_per_layer(8192, 3, 2)


# --------------------------------------------------------------------------
# Lamina's minimum bandwidth


def test_lamina_min_bandwidth_for_llama3_70b() -> None:
    # 754,974,720 B per step / (0.1 * (20 ms + 20 ms)) = 188,743,680,000 B/s.
    got = lamina_min_bandwidth(8192, 80, 8, 256, 2, 0.020, 0.020, 0.1)
    assert got == pytest.approx(188_743_680_000, rel=1e-12)


def test_lamina_min_bandwidth_small_numbers() -> None:
    # (2 + 2/4) * 2 * 1024 * 1 * 1 = 5120 B over 0.5 * (1 ms + 1 ms) = 1 ms.
    assert lamina_min_bandwidth(1024, 1, 4, 1, 2, 0.001, 0.001, 0.5) == pytest.approx(5.12e6)


def test_lamina_min_bandwidth_halves_when_the_budget_doubles() -> None:
    tight = lamina_min_bandwidth(8192, 80, 8, 256, 2, 0.02, 0.03, 0.1)
    loose = lamina_min_bandwidth(8192, 80, 8, 256, 2, 0.02, 0.03, 0.2)
    assert tight == pytest.approx(2 * loose)


@pytest.mark.parametrize("slowdown, t_model, t_attention",
                         [(0.0, 0.01, 0.01), (-0.1, 0.01, 0.01), (0.1, 0.0, 0.0)])
def test_lamina_min_bandwidth_rejects_empty_budgets(
    slowdown: float, t_model: float, t_attention: float
) -> None:
    with pytest.raises(ValueError):
        lamina_min_bandwidth(8192, 80, 8, 256, 2, t_model, t_attention, slowdown)


# --------------------------------------------------------------------------
# MegaScale-Infer's micro-batch condition


@pytest.mark.parametrize("t_comm, t_compute, expected", [
    (1.0, 1.0, 4),    # m >= 2 * (1 + 1) = 4
    (0.0, 1.0, 2),    # no transfer: ping-pong of two
    (0.5, 1.0, 3),    # m >= 3 exactly
    (1.5, 1.0, 5),    # m >= 5 exactly
    (0.3, 0.1, 8),    # 0.3 / 0.1 is 2.9999999999999996 in floats: still 8
    (2.1, 1.0, 7),    # m >= 6.2
    (0.01, 1.0, 3),   # any transfer at all needs a third micro-batch
])
def test_megascale_min_microbatches(t_comm: float, t_compute: float, expected: int) -> None:
    assert megascale_min_microbatches(t_comm, t_compute) == expected


@pytest.mark.parametrize("t_comm, t_compute", [(1.0, 0.0), (-1.0, 1.0)])
def test_megascale_rejects_bad_times(t_comm: float, t_compute: float) -> None:
    with pytest.raises(ValueError):
        megascale_min_microbatches(t_comm, t_compute)


# --------------------------------------------------------------------------
# Roofline estimates


def test_model_tier_estimate_is_memory_bound_at_small_batch() -> None:
    # 10 B params * 2 B = 20 GB at 2 TB/s = 10 ms; FLOPs: 2 * 10e9 * 1 / 1e15 = 0.02 ms.
    assert estimate_t_model_s(10, 1, 2, 1000, 2) == pytest.approx(0.010)


def test_model_tier_estimate_is_compute_bound_at_large_batch() -> None:
    # 2 * 10e9 * 10000 / 1e15 = 200 ms > 10 ms of weight streaming.
    assert estimate_t_model_s(10, 10_000, 2, 1000, 2) == pytest.approx(0.200)


def test_attention_tier_estimate_reads_the_kv_cache_once() -> None:
    # 2 * 1024 * 2 B * 80 layers * 256 seqs * 4096 tokens = 343,597,383,680 B at 4 TB/s.
    got = estimate_t_attention_s(8192, 80, 8, 256, 4096, 2, 4.0)
    assert got == pytest.approx(343_597_383_680 / 4e12)


# --------------------------------------------------------------------------
# Link results


def test_pick_link_result_closest_size_by_ratio() -> None:
    results = [LinkResult(1 * KIB, 10.0), LinkResult(1024 * KIB, 90.0),
               LinkResult(4096 * KIB, 95.0)]
    assert pick_link_result(results, 1500 * KIB).bytes == 1024 * KIB
    assert pick_link_result(results, 3000 * KIB).bytes == 4096 * KIB
    # 40 KiB is 40x above 1 KiB but only 25.6x below 1 MiB (by difference: 1 KiB).
    assert pick_link_result(results, 40 * KIB).bytes == 1024 * KIB


def test_pick_link_result_without_sizes_takes_the_fastest() -> None:
    results = [LinkResult(None, 10.0), LinkResult(None, 80.0)]
    assert pick_link_result(results, 5 * KIB).bw_avg_gbps == 80.0


def test_load_link_results_accepts_a_list_or_an_object(tmp_path: Path) -> None:
    rows = [{"bytes": 4096, "bw_avg_gbps": 12.5}, {"bytes": 1 << 20, "bw_avg_gbps": 95}]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows))
    as_object = tmp_path / "object.json"
    as_object.write_text(json.dumps({"transport": "tcp", "results": rows}))
    expected = [LinkResult(4096, 12.5), LinkResult(1 << 20, 95.0)]
    assert load_link_results(as_list) == expected
    assert load_link_results(as_object) == expected


@pytest.mark.parametrize("content", [
    "{}",
    "[]",
    '[{"bytes": 4096}]',
    '[{"bytes": 4096, "bw_avg_gbps": "fast"}]',
    "not json",
])
def test_load_link_results_rejects_unusable_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "link.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        load_link_results(path)


# --------------------------------------------------------------------------
# plan()


def llama_plan(**overrides: object) -> dict:
    arguments = dict(LLAMA3_70B, batch=256, dtype="fp16", t_model_s=0.02, t_attention_s=0.02,
                     slowdown=0.1, microbatches=2, link_gbps=400.0)
    arguments.update(overrides)
    return plan(**arguments)


def test_plan_reports_traffic_and_required_bandwidth() -> None:
    result = llama_plan()
    assert result["bytes_per_token_per_layer"] == 36864
    assert result["per_layer_bytes"] == 36864 * 256
    assert result["per_layer_send_bytes"] + result["per_layer_return_bytes"] == 36864 * 256
    assert result["step_bytes"] == 754_974_720
    assert result["message_bytes"] == 20480 * 256 // 2
    assert result["required_GBps"] == pytest.approx(188.74368)
    assert result["required_gbps"] == pytest.approx(8 * 188.74368)
    json.dumps(result)


def test_plan_transfer_time_and_microbatches_at_the_link_rate() -> None:
    result = llama_plan(link_gbps=800.0)  # 100 GB/s
    assert result["t_comm_ms"] == pytest.approx(754_974_720 / 100e9 * 1e3)
    assert result["comm_fraction"] == pytest.approx(result["t_comm_ms"] / 40)
    # One-way q/k/v: 20480 * 256 * 80 B at 100 GB/s = 4.19 ms vs 20 ms: m >= 2.42.
    assert result["t_comm_one_way_ms"] == pytest.approx(20480 * 256 * 80 / 100e9 * 1e3)
    assert result["microbatches_needed"] == 3


def test_plan_link_verdict_and_margin() -> None:
    required_gbps = llama_plan()["required_gbps"]
    fast = llama_plan(link_gbps=2 * required_gbps)
    slow = llama_plan(link_gbps=required_gbps / 2)
    assert fast["link_suffices"] and fast["link_margin"] == pytest.approx(2.0)
    assert not slow["link_suffices"] and slow["link_margin"] == pytest.approx(0.5)
    assert slow["link_headroom_gbps"] == pytest.approx(-required_gbps / 2)


def test_plan_uses_the_measured_rate_at_the_message_size() -> None:
    message = 20480 * 256 // 2  # 2.5 MiB per (layer, micro-batch)
    results = [LinkResult(64 * KIB, 50.0), LinkResult(2 << 20, 1500.0),
               LinkResult(256 << 20, 3000.0)]
    result = llama_plan(link_results=results)
    assert result["message_bytes"] == message
    assert result["link"] == {"gbps": 1500.0, "source": "measured", "entry_bytes": 2 << 20}


def test_plan_rejects_unknown_dtype_and_bad_microbatches() -> None:
    with pytest.raises(ValueError):
        llama_plan(dtype="fp8")
    with pytest.raises(ValueError):
        llama_plan(microbatches=0)


# --------------------------------------------------------------------------
# Command line


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--t-model", "20", "--t-attention", "20")) == 0
    out = capsys.readouterr().out
    assert "36864 B" in out and "36.00 KiB" in out
    assert "1509.9 Gbit/s" in out and "188.74 GB/s" in out
    assert "micro-batches" in out and "link suffices: NO" in out


def test_cli_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--t-model", "20", "--t-attention", "20", "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_per_token_per_layer"] == 36864
    assert result["step_times_source"] == "given"
    assert result["t_model_ms"] == pytest.approx(20.0)


def test_cli_defaults_estimate_step_times_with_the_roofline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_plan(parse("--json", "--batch", "64", "--dtype", "bf16")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step_times_source"] == "roofline"
    assert result["t_model_ms"] > 0 and result["t_attention_ms"] > 0
    assert result["model"]["batch"] == 64 and result["model"]["element_bytes"] == 2


def test_cli_mixes_a_given_time_with_an_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--json", "--t-model", "5")) == 0
    assert json.loads(capsys.readouterr().out)["step_times_source"] == "given+roofline"


def test_cli_fp32_doubles_the_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--json", "--dtype", "fp32", "--t-model", "1", "--t-attention", "1")) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token_per_layer"] == 2 * 36864


def test_cli_link_file_that_suffices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = tmp_path / "bw.json"
    link.write_text(json.dumps([{"bytes": 4096, "bw_avg_gbps": 20.0},
                                {"bytes": 2 << 20, "bw_avg_gbps": 3200.0}]))
    argv = ("--t-model", "20", "--t-attention", "20", "--link", str(link))
    assert run_plan(parse(*argv)) == 0
    out = capsys.readouterr().out
    assert "3200.0 Gbit/s (measured, 2097152 B messages)" in out
    assert "link suffices: yes (margin 2.12x" in out

    assert run_plan(parse(*argv, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["link_suffices"] is True
    assert result["link"]["file"] == str(link)
    assert result["link_margin"] == pytest.approx(3200 / 1509.94944)


def test_cli_link_file_that_does_not_suffice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "bw.json"
    link.write_text(json.dumps({"results": [{"bytes": 2 << 20, "bw_avg_gbps": 100.0}]}))
    assert run_plan(parse("--t-model", "20", "--t-attention", "20", "--link", str(link))) == 0
    assert "link suffices: NO" in capsys.readouterr().out


def test_cli_link_without_sizes_uses_the_best_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "bw.json"
    link.write_text(json.dumps([{"bw_avg_gbps": 100.0}, {"bw_avg_gbps": 250.0}]))
    assert run_plan(parse("--json", "--t-model", "20", "--t-attention", "20",
                          "--link", str(link))) == 0
    assert json.loads(capsys.readouterr().out)["link"]["gbps"] == 250.0


@pytest.mark.parametrize("content", [None, "[]", "{not json"])
def test_cli_bad_link_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    link = tmp_path / "bw.json"
    if content is not None:
        link.write_text(content)
    assert run_plan(parse("--link", str(link))) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("plan: ")


def test_main_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hidden", "4096", "--layers", "32", "--gqa", "4", "--json",
                 "--t-model", "10", "--t-attention", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_per_token_per_layer"] == (2 + 2 / 4) * 2 * 4096


# --------------------------------------------------------------------------
# Rotational staggered pipelining


def test_rotation_period_takes_the_slowest_of_three_bounds() -> None:
    # Attention pool bound, model replicas bound, one micro-batch's own round.
    assert plan_module.rotation_period_s(2.0, 1.0, 0.0, replicas=2, microbatches=3) == 1.0
    assert plan_module.rotation_period_s(2.0, 1.0, 0.0, replicas=1, microbatches=2) == 2.0
    assert plan_module.rotation_period_s(2.0, 1.0, 0.6, replicas=2, microbatches=3) == pytest.approx(3.6 / 3)


def test_twice_as_slow_model_tier_picks_two_replicas_and_three_microbatches() -> None:
    chosen = plan_module.plan_rotation(2.0, 1.0, 0.0)["chosen"]
    assert (chosen["replicas"], chosen["microbatches"]) == (2, 3)
    assert chosen["model_busy"] == chosen["attention_busy"] == 1.0


def test_rotation_adds_microbatches_to_hide_a_slow_transfer() -> None:
    choice = plan_module.rotation_choice(2.0, 1.0, 2.0, replicas=2)
    assert choice["microbatches"] == 5 and choice["period_s"] == pytest.approx(1.0)  # (2 + 1 + 2) / 5
    assert plan_module.rotation_choice(2.0, 1.0, 1e9, replicas=2, max_microbatches=8)["transfer_bound"]


def test_uneven_ratio_keeps_the_less_busy_tier_busiest() -> None:
    # T_model = 2.3 T_attention: R = 2 leaves attention 87 % busy, R = 3 leaves the model tier 77 %.
    chosen = plan_module.plan_rotation(2.3, 1.0, 0.0)["chosen"]
    assert chosen["replicas"] == 2 and chosen["attention_busy"] == pytest.approx(1 / 1.15)


def test_forced_replicas_and_the_residual_bytes_in_the_plan() -> None:
    result = plan_module.plan(hidden=8192, layers=80, gqa_group=8, batch=256, dtype="fp16", t_model_s=0.02,
                              t_attention_s=0.01, replicas=2)
    rotation = result["rotation"]
    # Per layer: T_m 250 us, T_a 125 us, 9 MiB both ways at 400 Gbit/s 189 us: (250 + 125 + 189) / 125 -> 5.
    assert (rotation["replicas"], rotation["microbatches"]) == (2, 5)
    assert rotation["residual_bytes_per_layer"] == 8192 * 2 * 256  # d elements per token, replica to replica
    assert rotation["residual_bytes_per_step"] == 80 * rotation["residual_bytes_per_layer"]
    assert len(rotation["candidates"]) == 8
    one = plan_module.plan(hidden=8192, layers=80, gqa_group=8, batch=256, dtype="fp16", t_model_s=0.02,
                           t_attention_s=0.01, replicas=1)["rotation"]
    assert one["residual_bytes_per_layer"] == 0 and one["attention_busy"] < 0.55


def test_cli_prints_the_rotation_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_module.main(["--t-model", "20", "--t-attention", "10"]) == 0
    out = capsys.readouterr().out
    assert "rotational staggered pipelining: R=2 replicas, n=5 micro-batches" in out
    assert "busy model 1.00 / attention 1.00; residual 4.00 MiB per layer replica to replica" in out
