"""lamina-bench runs end to end and reports what it promises (no timing thresholds)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lamina_comm.bench import perf


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina_comm.bench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("transport,loop", [("tcp", "native"), ("shm", "native"), ("shm", "python")])
def test_bandwidth_loopback_json(tmp_path, transport, loop):
    out = tmp_path / "bw.json"
    r = bench("bandwidth", "--loopback", "-s", "64K", "-n", "300", "-q", "2", "--report_gbits",
              "--transport", transport, "--loop", loop, "--out_json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "BW average[Gb/sec]" in r.stdout and "MsgRate[Mpps]" in r.stdout
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert data["test"] == "bandwidth" and data["streams"] == 2 and data["transport"] == transport
    # Counted where the data landed: every write of both streams arrived.
    assert row["bytes"] == 65536 and row["iterations"] == 600
    assert row["bw_avg_gbps"] > 0


@pytest.mark.parametrize("loop,progress", [("native", "event"), ("python", "event"), ("native", "poll")])
def test_latency_loopback(tmp_path, loop, progress):
    out = tmp_path / "lat.json"
    r = bench("latency", "--loopback", "-s", "64", "-n", "500", "--loop", loop, "--progress", progress,
              "--out_json", str(out))
    assert r.returncode == 0, r.stderr
    assert f"progress={progress}" in r.stdout
    assert json.loads(out.read_text())["progress"] == progress
    for column in ("t_min[usec]", "t_typical[usec]", "99% percentile[usec]", "99.9% percentile[usec]"):
        assert column in r.stdout
    (row,) = json.loads(out.read_text())["results"]
    assert row["iterations"] == 500
    assert 0 < row["t_min_us"] <= row["p50_us"] <= row["p99_us"] <= row["t_max_us"]


def test_all_sizes_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bw.png"
    r = bench("bandwidth", "--loopback", "-a", "-n", "20", "--plot", str(png), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n 8388608 ") == 1 and r.stdout.count("\n 2 ") == 1
    assert png.stat().st_size > 1000


def test_plan_reads_a_bandwidth_json(tmp_path):
    link = tmp_path / "link.json"
    link.write_text(json.dumps({"results": [{"bytes": 1 << 20, "bw_avg_gbps": 100.0}]}))
    r = bench("plan", "--hidden", "8192", "--layers", "80", "--gqa", "8", "--batch", "256", "--dtype", "fp16",
              "--link", str(link))
    assert r.returncode == 0, r.stderr
    assert "36" in r.stdout  # 36 KiB per token per layer


def test_sizes_and_depth_rules():
    assert perf.parse_size("64K") == 65536 and perf.parse_size("1M") == 1 << 20 and perf.parse_size("12") == 12
    assert perf.depth_for(1 << 20, 0) == 16 and perf.depth_for(64, 0) == 128 and perf.depth_for(64, 7) == 7
    assert perf.window_slots(8 << 20, 0) == 1
    # Write placement as perftest's: above half the cycle buffer (a page) every write goes to one buffer;
    # smaller ones advance through it; --cycle-buffer 8M spreads 1 MiB writes over 8 buffers.
    assert perf.window_slots(1 << 20, 0) == 1 and perf.window_slots(2048, 0) == 2 and perf.window_slots(64, 0) == 64
    assert perf.window_slots(1 << 20, 0, 8 << 20) == 8 and perf.window_slots(4 << 20, 0, 8 << 20) == 2
    assert perf.window_slots(64, 7, 8 << 20) == 7


def test_server_rejects_a_bad_request():
    with pytest.raises(ValueError):
        perf.Config.from_bytes(json.dumps({"mode": "bandwidth", "sizes": [1 << 31], "iterations": 1,
                                           "duration": None, "streams": 1, "depth": 1,
                                           "transport": "tcp"}).encode())
    with pytest.raises(ValueError):  # a cycle buffer of 2 GiB would make the server allocate it
        perf.Config.from_bytes(json.dumps({"mode": "bandwidth", "sizes": [64], "iterations": 1, "duration": None,
                                           "streams": 1, "depth": 1, "transport": "tcp",
                                           "cycle_buffer": 2 << 30}).encode())
    for odd in ({"cycle_buffer": 100.5}, {"sizes": [2.5]}, {"surprise": 1}):  # types, and other versions' fields
        with pytest.raises(ValueError, match="bad benchmark request"):
            perf.Config.from_bytes(json.dumps({"mode": "bandwidth", "sizes": [64], "iterations": 1, "duration": None,
                                               "streams": 1, "depth": 1, "transport": "tcp", **odd}).encode())


def test_channel_bench_reports_the_three_round_trips(tmp_path):
    out = tmp_path / "ch.json"
    r = bench("channel", "--sizes", "64,4K", "-n", "50", "--transport", "tcp", "--out_json", str(out))
    assert r.returncode == 0, r.stderr
    assert "channel p50" in r.stdout and "transport p50" in r.stdout and "native p50" in r.stdout
    report = json.loads(out.read_text())
    assert report["test"] == "channel" and report["piggyback_credits"] is True
    assert [row["bytes"] for row in report["results"]] == [64, 4096]
    for row in report["results"]:
        assert row["iterations"] == 50
        assert 0 < row["channel_rtt_min_us"] <= row["channel_rtt_p50_us"] <= row["channel_rtt_p99_us"]
        assert 0 < row["transport_rtt_min_us"] <= row["transport_rtt_p50_us"] <= row["transport_rtt_p99_us"]
        assert row["ratio_p50"] == pytest.approx(row["channel_rtt_p50_us"] / row["transport_rtt_p50_us"])
        assert 0 < row["native_channel_rtt_p50_us"] <= row["native_channel_rtt_p99_us"]
        assert row["native_ratio_p50"] == pytest.approx(row["native_channel_rtt_p50_us"] / row["transport_rtt_p50_us"])


def test_engine_bench_reports_engine_beside_channel(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "engine.json"
    r = bench("engine", "--tokens", "1,4", "-n", "30", "--rounds", "2", "--transport", "tcp", "--out_json", str(out))
    assert r.returncode == 0, r.stderr
    assert "engine p50" in r.stdout and "channel p50" in r.stdout
    report = json.loads(out.read_text())
    assert report["test"] == "engine" and report["rounds"] == 2
    assert [row["tokens"] for row in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["iterations"] == 60
        assert row["request_bytes"] == row["tokens"] * (8 + 2) * 128 * 2
        assert 0 < row["engine_rtt_p50_us"] <= row["engine_rtt_p99_us"]
        assert row["ratio_p50"] == pytest.approx(row["engine_rtt_p50_us"] / row["channel_rtt_p50_us"])


def test_progress_bars_show_only_on_a_terminal(monkeypatch):
    from lamina_comm import progress_bar
    assert progress_bar.bar(10).disable  # pytest's stderr is not a terminal
    import io
    fake = io.StringIO()
    fake.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", fake)
    shown = progress_bar.bar(3, desc="sizes", delay=0)
    assert not shown.disable
    shown.update(3)
    shown.close()
    assert "sizes" in fake.getvalue()
    assert progress_bar.bar(3, enabled=False).disable  # --quiet
