"""`lamina-bench pipeline`: tiny multi-process runs complete and report their fields (no timing asserts)."""
from __future__ import annotations

import argparse
import json

import pytest

from lamina_comm.bench import netns, pipeline_bench
from lamina_comm.bench.pipeline_bench import BenchShape

REPORT_FIELDS = ("step_ms", "compute_ms", "transfer_ms", "sum_ms", "max_ms", "step_over_max",
                 "step_over_sum", "overlap_efficiency", "model_busy_ms", "attention_busy_ms",
                 "calibration", "channels", "layer_bytes", "target_met")
PRINTED = ("step time:", "sum ", "max ", "overlap efficiency:", "transfer alone")


def bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pipeline_bench.add_arguments(parser)
    return parser.parse_args([
        "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--layers", "3", "--batch", "4",
        "--attention-workers", "2", "--t-model-us", "50", "--t-attention-us", "50",
        "--steps", "2", "--warmup", "1", "--calibration-steps", "2", "--rounds", "1", "--timeout", "30",
        "--json", str(tmp_path / "report.json"), "--trace", str(tmp_path / "trace.json"), *extra,
    ])


def run_and_load(tmp_path, capsys, *extra: str) -> tuple[dict, str]:
    assert pipeline_bench.run(bench_args(tmp_path, *extra)) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "report.json", encoding="utf-8") as f:
        return json.load(f), out


@pytest.mark.parametrize("microbatches", [1, 2])
def test_tiny_loopback_run_reports_every_field(tmp_path, capsys, microbatches):
    report, out = run_and_load(tmp_path, capsys, "--microbatches", str(microbatches))
    assert all(label in out for label in PRINTED)
    assert all(field in report for field in REPORT_FIELDS)
    assert report["config"]["microbatches"] == microbatches and report["config"]["workers"] == 2
    assert len(report["steps_ms"]) == 2
    assert report["max_ms"] == max(report["compute_ms"], report["transfer_ms"])
    steps_run = (2 + 1) + (2 + 1)  # calibration + its warm-up step, measured + warm-up
    assert report["channels"]["model"]["messages"] == 2 * 3 * microbatches * steps_run  # 2 workers, 3 layers
    if microbatches == 1:
        assert report["overlap_efficiency"] == 0.0  # one micro-batch hides nothing, by definition
    with open(tmp_path / "trace.json", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {1, 2, 3}  # model + 2 attention workers


def test_auto_balance_sets_compute_from_the_calibration(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    report, out = run_and_load(tmp_path, capsys, "--microbatches", "2", "--auto-balance",
                               "--plot", str(tmp_path / "gantt.png"))
    per_layer_us = report["calibration"]["transfer_us_per_layer"]  # one round: the balancing figure
    assert report["t_model_us"] == report["t_attention_us"] == pytest.approx(per_layer_us / 2)
    assert report["compute_ms"] == pytest.approx(report["transfer_ms"])
    assert "auto-balanced" in out and (tmp_path / "gantt.png").stat().st_size > 0


def test_rounds_interleave_calibration_and_measurement(tmp_path, capsys):
    report, _ = run_and_load(tmp_path, capsys, "--rounds", "2", "--steps", "4", "--calibration-steps", "2")
    assert report["config"]["rounds"] == 2
    assert len(report["steps_ms"]) == 4 and len(report["calibration"]["steps_ms"]) == 2


def test_repeat_reports_the_spread_of_step_over_max(tmp_path, capsys):
    report, out = run_and_load(tmp_path, capsys, "--repeat", "3", "--microbatches", "2")
    ratios = [run["step_over_max"] for run in report["repeats"]]
    assert len(ratios) == 3 and out.count("--- run ") == 3
    spread = report["step_over_max_spread"]
    assert spread == {"min": min(ratios), "median": sorted(ratios)[1], "max": max(ratios)}
    assert report["runs_meeting_target"] == sum(r <= pipeline_bench.TARGET_RATIO for r in ratios)
    assert "step / max over 3 runs" in out


@pytest.mark.parametrize(("replicas", "microbatches"), [(2, 3), (3, 4)])
def test_rotation_over_replicas_runs_and_reports_both_tiers(tmp_path, capsys, replicas, microbatches):
    report, out = run_and_load(tmp_path, capsys, "--replicas", str(replicas), "--microbatches", str(microbatches),
                               "--steps", "3")
    c = report["config"]
    assert (c["replicas"], c["microbatches"]) == (replicas, microbatches)
    assert f"rotation over {replicas} model replicas" in out and "residual replica to replica" in out
    # Residuals: d elements per token per layer, every layer, replica to replica.
    assert report["layer_bytes"]["residual"] == 4 * 256 * 2
    steps_run = (2 + 1) + (3 + 1)  # calibration + its warm-up, measured + warm-up
    units = 3 * microbatches * steps_run  # (layer, micro-batch) pairs over all steps
    assert report["channels"]["model"]["messages"] == 2 * units  # each unit: one request per attention worker
    assert report["channels"]["attention"]["messages"] == 2 * units
    assert report["channels"]["residual"]["messages"] == units
    assert len(report["steps_ms"]) == 3
    for tier in ("model", "attention"):
        assert 0 < report[f"{tier}_busy_fraction"] and 0 < report[f"{tier}_span_fraction"]
    assert report["tokens_per_s_per_replica"] == pytest.approx(report["tokens_per_s"] / replicas)
    assert report["overlap_efficiency"] is None  # defined for one model thread only
    with open(tmp_path / "trace.json", encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == set(range(1, replicas + 3))  # replicas + 2 workers


def test_one_replica_moves_no_residual(tmp_path, capsys):
    report, _ = run_and_load(tmp_path, capsys, "--microbatches", "2")
    assert report["layer_bytes"]["residual"] == 0 and report["channels"]["residual"] is None


def test_bad_shape_is_a_usage_error(tmp_path, capsys):
    args = bench_args(tmp_path, "--kv-heads", "3")
    assert pipeline_bench.run(args) == 2
    assert "--kv-heads 3 must divide --heads 4" in capsys.readouterr().err


def test_rate_limited_namespaces_or_a_clear_skip(tmp_path, capsys):
    args = bench_args(tmp_path, "--link-rate", "1gbit", "--microbatches", "2")
    code = pipeline_bench.run(args)
    if code == pipeline_bench.EXIT_SKIPPED:
        assert "skipped:" in capsys.readouterr().err
        pytest.skip("network namespaces unavailable here")
    assert code == 0
    assert "netns veth, tbf 1gbit" in capsys.readouterr().out


def test_namespaces_are_torn_down():
    if netns.unavailable_reason():
        pytest.skip(netns.unavailable_reason())
    try:
        with netns.star(2, "100mbit") as topology:
            names = (topology.hub, *topology.leaves)
            assert all(netns.exists(name) for name in names)
            raise RuntimeError("boom")  # teardown must happen on errors too
    except netns.NetnsUnavailable as err:
        pytest.skip(str(err))
    except RuntimeError:
        pass
    assert not any(netns.exists(name) for name in names)


def test_rate_parsing():
    assert netns.rate_bits_per_second("10gbit") == 10e9
    assert netns.rate_bits_per_second("1.5mbps") == 12e6
    assert netns.burst_bytes("10gbit") == netns.MIN_BURST_BYTES  # 100 us at 10 Gbit/s is less
    assert netns.burst_bytes("100gbit") == 1_250_000
    with pytest.raises(ValueError):
        netns.rate_bits_per_second("fast")


def test_shape_splits_tokens_and_heads():
    shape = BenchShape(hidden=4096, heads=32, kv_heads=8, layers=2, batch=33, dtype="float16",
                       microbatches=2, workers=2)
    assert [shape.tokens(mb) for mb in range(2)] == [17, 16]
    assert shape.request_shapes(0) == [(17, 16, 128), (17, 4, 128), (17, 4, 128)]
    spec = shape.channel_spec()
    assert spec.max_tokens == 17 and spec.heads == 16 and spec.kv_heads == 4
    # Lamina: (2 + 2/G) * e * d bytes per token per layer, G = 4.
    assert shape.layer_bytes()["total"] == 33 * (2 + 2 / 4) * 2 * 4096
