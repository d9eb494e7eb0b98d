"""Timeline: Chrome trace export, merging, overlap efficiency, summary, plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from lamina_comm.pipeline import CallableStage, run_step
from lamina_comm.timeline import Span, Timeline, merge, overlap_efficiency

MS = 1_000_000  # ns


def add(timeline: Timeline, name: str, start_ms: float, end_ms: float, mb: int,
        layer: int | None = 0) -> None:
    args = {"mb": mb} if layer is None else {"layer": layer, "mb": mb}
    timeline.record(name, int(start_ms * MS), int(end_ms * MS), track=mb, args=args)


def in_flight_timeline(busy_other_ms: float, wait_ms: float) -> Timeline:
    """mb 0 sends over [0, 1] ms, is in flight for 4 ms, then its recv returns at 5 ms.

    Within the flight, mb 1 computes for ``busy_other_ms`` and mb 0 waits for
    ``wait_ms`` (their sum is the 4 ms of flight).
    """
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)
    if busy_other_ms:
        add(timeline, "compute", 1, 1 + busy_other_ms, mb=1)
    add(timeline, "wait", 5 - wait_ms, 5, mb=0)
    return timeline


# --------------------------------------------------------------------------
# Recording


def test_span_context_manager_records_interval_track_and_args() -> None:
    timeline = Timeline("model")
    with timeline.span("compute", category="pre", track=2, args={"layer": 3, "mb": 2}):
        pass
    (span,) = timeline.spans
    assert (span.name, span.category, span.track, span.layer, span.mb) == (
        "compute", "pre", 2, 3, 2)
    assert 0 <= span.duration_ns


def test_span_is_kept_when_the_body_raises() -> None:
    timeline = Timeline("model")
    with pytest.raises(KeyError):
        with timeline.span("compute"):
            raise KeyError("boom")
    assert [s.name for s in timeline.spans] == ["compute"]


def test_record_rejects_a_span_that_ends_before_it_starts() -> None:
    with pytest.raises(ValueError):
        Timeline("model").record("compute", 10, 5)


# --------------------------------------------------------------------------
# Chrome trace


def test_chrome_trace_structure_survives_json_round_trip() -> None:
    timeline = Timeline("model tier")
    add(timeline, "compute", 1, 3, mb=0)
    add(timeline, "wait", 3, 4, mb=1)
    trace = json.loads(json.dumps(timeline.to_chrome_trace()))

    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 2
    for event in spans:
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"} <= event.keys()
    compute = next(e for e in spans if e["name"] == "compute")
    assert (compute["ts"], compute["dur"]) == (0.0, 2000.0)  # microseconds from the origin
    assert compute["args"] == {"layer": 0, "mb": 0}

    metadata = {(e["name"], e["tid"]): e["args"] for e in events if e["ph"] == "M"}
    assert metadata[("process_name", 0)] == {"name": "model tier"}
    assert metadata[("thread_name", 0)] == {"name": "mb 0"}
    assert metadata[("thread_name", 1)] == {"name": "mb 1"}


def test_named_tracks_appear_in_metadata() -> None:
    timeline = Timeline("model")
    timeline.name_track(0, "micro-batch A")
    add(timeline, "compute", 0, 1, mb=0)
    names = [e["args"]["name"] for e in timeline.to_chrome_trace()["traceEvents"]
             if e["name"] == "thread_name"]
    assert names == ["micro-batch A"]


def test_write_produces_loadable_json(tmp_path: Path) -> None:
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)
    path = tmp_path / "trace.json"
    timeline.write(path)
    assert json.loads(path.read_text())["traceEvents"]


def test_merge_gives_each_process_a_pid_and_a_common_origin() -> None:
    model, attention = Timeline("model"), Timeline("attention")
    add(model, "send", 10, 11, mb=0)
    add(attention, "attention", 12, 14, mb=0)
    events = merge(model, attention)["traceEvents"]
    by_name = {e["name"]: e for e in events if e["ph"] == "X"}
    assert by_name["send"]["pid"] != by_name["attention"]["pid"]
    assert by_name["send"]["ts"] == 0.0
    assert by_name["attention"]["ts"] == 2000.0
    process_names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(process_names.values()) == ["attention", "model"]


def test_merge_applies_per_timeline_offsets() -> None:
    model, attention = Timeline("model"), Timeline("attention")
    add(model, "send", 10, 11, mb=0)
    add(attention, "attention", 12, 14, mb=0)
    events = merge(model, attention, offsets_ns=[0, -1 * MS])["traceEvents"]
    by_name = {e["name"]: e for e in events if e["ph"] == "X"}
    assert by_name["attention"]["ts"] == 1000.0


def test_merge_rejects_offsets_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        merge(Timeline("a"), Timeline("b"), offsets_ns=[0])


# --------------------------------------------------------------------------
# Overlap efficiency


def test_fully_hidden_transfer_has_efficiency_one() -> None:
    assert in_flight_timeline(busy_other_ms=4, wait_ms=0).overlap_efficiency() == 1.0


def test_fully_exposed_transfer_has_efficiency_zero() -> None:
    assert in_flight_timeline(busy_other_ms=0, wait_ms=4).overlap_efficiency() == 0.0


def test_half_hidden_transfer_has_efficiency_one_half() -> None:
    assert in_flight_timeline(busy_other_ms=2, wait_ms=2).overlap_efficiency() == 0.5


def test_compute_of_the_same_microbatch_hides_nothing() -> None:
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)
    add(timeline, "compute", 1, 3, mb=0, layer=None)  # e.g. a stray hook of mb 0 itself
    add(timeline, "wait", 3, 5, mb=0)
    assert timeline.overlap_efficiency() == 0.0


def test_time_other_microbatches_spend_waiting_is_not_hidden() -> None:
    # Both micro-batches in flight, the model tier only ever waits: nothing is hidden.
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)
    add(timeline, "send", 1, 2, mb=1)
    add(timeline, "wait", 2, 10, mb=0)
    add(timeline, "wait", 10, 11, mb=1)
    # mb 0 in flight [1, 10]: 1 ms hidden by mb 1's send. mb 1 in flight [2, 11]: 0 hidden.
    assert timeline.overlap_efficiency() == pytest.approx(1 / 18)


def test_send_and_wait_pair_in_order_across_steps() -> None:
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)  # step 1: in flight [1, 3], fully exposed
    add(timeline, "wait", 1, 3, mb=0)
    add(timeline, "send", 10, 11, mb=0)  # step 2: in flight [11, 13], fully hidden
    add(timeline, "compute", 11, 13, mb=1)
    add(timeline, "wait", 13, 13, mb=0)
    add(timeline, "wait", 20, 21, mb=0)  # no send left to pair with: ignored
    assert timeline.overlap_efficiency() == 0.5


def test_efficiency_needs_send_wait_pairs() -> None:
    timeline = Timeline("model")
    add(timeline, "compute", 0, 1, mb=0)
    with pytest.raises(ValueError):
        timeline.overlap_efficiency()


def test_zero_length_flights_expose_nothing() -> None:
    timeline = Timeline("model")
    add(timeline, "send", 0, 1, mb=0)
    add(timeline, "wait", 1, 1, mb=0)
    assert overlap_efficiency(timeline.spans) == 1.0


def test_a_single_microbatch_run_has_efficiency_zero() -> None:
    # With one micro-batch there is no other micro-batch to hide behind, exactly.
    outbox: dict[tuple[int, int], Any] = {}
    stage = CallableStage(
        pre=lambda layer, mb: layer,
        send=lambda layer, mb, payload: outbox.__setitem__((layer, mb), payload),
        recv=lambda layer, mb: outbox.pop((layer, mb)),
        post=lambda layer, mb, result: None,
    )
    timeline = Timeline("model")
    run_step(4, 1, stage, timeline)
    assert timeline.overlap_efficiency() == 0.0


def test_efficiency_of_a_real_run_is_a_fraction() -> None:
    outbox: dict[tuple[int, int], Any] = {}
    stage = CallableStage(
        pre=lambda layer, mb: layer,
        send=lambda layer, mb, payload: outbox.__setitem__((layer, mb), payload),
        recv=lambda layer, mb: outbox.pop((layer, mb)),
        post=lambda layer, mb, result: None,
    )
    timeline = Timeline("model")
    run_step(4, 3, stage, timeline)
    assert 0.0 <= timeline.overlap_efficiency() <= 1.0


# --------------------------------------------------------------------------
# Summary


def test_summary_totals_and_per_layer_stats() -> None:
    timeline = Timeline("model")
    add(timeline, "compute", 0, 1, mb=0, layer=None)  # begin hook: totals only
    add(timeline, "compute", 1, 2, mb=0, layer=0)
    add(timeline, "send", 2, 2.5, mb=0, layer=0)
    add(timeline, "compute", 2.5, 4.5, mb=1, layer=0)
    add(timeline, "wait", 4.5, 6, mb=0, layer=0)
    add(timeline, "compute", 6, 7, mb=0, layer=1)
    summary = timeline.summary()

    assert summary["step_ms"] == 7.0
    assert summary["compute_ms"] == 5.0
    assert summary["send_ms"] == 0.5
    assert summary["wait_ms"] == 1.5
    assert summary["attention_ms"] == 0.0
    # In flight [2.5, 6]: 2 of 3.5 ms hidden by mb 1.
    assert summary["overlap_efficiency"] == pytest.approx(2 / 3.5)
    layer0, layer1 = summary["per_layer"]
    assert layer0 == {"layer": 0, "compute_ms": 3.0, "wait_ms": 1.5, "send_ms": 0.5,
                      "attention_ms": 0.0}
    assert layer1["layer"] == 1 and layer1["compute_ms"] == 1.0
    json.dumps(summary)  # stays machine-readable


def test_summary_without_pairs_reports_no_efficiency() -> None:
    timeline = Timeline("attention")
    add(timeline, "attention", 0, 2, mb=0)
    summary = timeline.summary()
    assert summary["attention_ms"] == 2.0
    assert summary["overlap_efficiency"] is None


def test_summary_of_an_empty_timeline_is_an_error() -> None:
    with pytest.raises(ValueError):
        Timeline("model").summary()


def test_span_properties() -> None:
    span = Span("send", "send", 5, 9, 1, {"layer": 2, "mb": 1})
    assert (span.duration_ns, span.layer, span.mb) == (4, 2, 1)


# --------------------------------------------------------------------------
# Plot


def test_plot_writes_an_image(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    timeline = in_flight_timeline(busy_other_ms=2, wait_ms=2)
    path = tmp_path / "gantt.png"
    timeline.plot(path)
    assert path.stat().st_size > 0


def test_plot_without_matplotlib_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="matplotlib"):
        in_flight_timeline(busy_other_ms=2, wait_ms=2).plot(tmp_path / "gantt.png")
