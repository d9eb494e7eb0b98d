"""Span recording for the decode pipeline, Chrome-trace export and overlap metrics.

A :class:`Timeline` belongs to one process (one tier: the model tier or the
attention tier). It records spans with ``time.perf_counter_ns``, which on Linux
reads CLOCK_MONOTONIC, a clock shared by every process on the machine; that is
why timelines of several processes can be merged onto one time axis.

Span names used by :mod:`lamina_comm.pipeline`:

* ``compute``   model-tier work (pre-/post-attention part, begin/end hooks)
* ``send``      posting a message to the other tier
* ``wait``      time blocked in ``recv`` for an attention result
* ``attention`` attention-tier compute

Each span carries ``args`` ``{"layer": l, "mb": m}`` and sits on the track of
its micro-batch, so Perfetto shows one row per micro-batch.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

# Span names with a meaning for the metrics below.
COMPUTE = "compute"
SEND = "send"
WAIT = "wait"
ATTENTION = "attention"

# Spans during which the model tier does useful work (not blocked).
_MODEL_BUSY_NAMES = frozenset({COMPUTE, SEND})

_NS_PER_US = 1_000
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Span:
    """One recorded interval; times are ``perf_counter_ns`` values."""

    name: str
    category: str
    start_ns: int
    end_ns: int
    track: int
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def layer(self) -> int | None:
        return self.args.get("layer")

    @property
    def mb(self) -> int | None:
        return self.args.get("mb")


class Timeline:
    """Spans recorded by one process; safe to record into from several threads."""

    def __init__(self, process_name: str) -> None:
        self.process_name = process_name
        self._spans: list[Span] = []
        self._track_names: dict[int, str] = {}
        self._lock = threading.Lock()

    @property
    def spans(self) -> tuple[Span, ...]:
        with self._lock:
            return tuple(self._spans)

    def name_track(self, track: int, name: str) -> None:
        """Label a track in the trace (default label: ``mb <track>``)."""
        self._track_names[track] = name

    def track_name(self, track: int) -> str:
        return self._track_names.get(track, f"mb {track}")

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        category: str = "",
        track: int = 0,
        args: Mapping[str, Any] | None = None,
    ) -> Span:
        """Add a span measured elsewhere (or synthesised, e.g. in tests)."""
        if end_ns < start_ns:
            raise ValueError(f"span {name!r} ends before it starts ({start_ns} > {end_ns})")
        span = Span(name, category, start_ns, end_ns, track, dict(args or {}))
        with self._lock:
            self._spans.append(span)
        return span

    @contextmanager
    def span(
        self,
        name: str,
        *,
        category: str = "",
        track: int = 0,
        args: Mapping[str, Any] | None = None,
    ) -> Iterator[None]:
        """Time the ``with`` body; the span is kept even if the body raises."""
        start_ns = time.perf_counter_ns()
        try:
            yield
        finally:
            self.record(
                name, start_ns, time.perf_counter_ns(), category=category, track=track, args=args
            )

    def to_chrome_trace(self) -> dict[str, Any]:
        """This timeline alone in Chrome trace event format (see :func:`merge`)."""
        return merge(self)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the Chrome trace JSON, loadable in Perfetto or chrome://tracing."""
        write_trace(self.to_chrome_trace(), path)

    def overlap_efficiency(self) -> float:
        """See :func:`overlap_efficiency`; call it on the model tier's timeline."""
        return overlap_efficiency(self.spans)

    def summary(self) -> dict[str, Any]:
        """See :func:`summarize`."""
        return summarize(self.spans)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Gantt chart of this timeline; see :func:`plot`."""
        plot(path, self)


# --------------------------------------------------------------------------
# Chrome trace export


def merge(*timelines: Timeline, offsets_ns: Sequence[int] | None = None) -> dict[str, Any]:
    """Combine timelines of several processes into one Chrome trace.

    Timeline ``i`` becomes pid ``i + 1``. All timelines share one time origin
    (the earliest shifted span start), so cross-process causality stays
    visible. ``offsets_ns[i]`` is added to every timestamp of timeline ``i``;
    it corrects a clock difference when the timelines were not taken with the
    same monotonic clock (e.g. on two machines).
    """
    offsets = _check_offsets(timelines, offsets_ns)
    origin_ns = _common_origin(timelines, offsets)
    events: list[dict[str, Any]] = []
    for index, (timeline, offset_ns) in enumerate(zip(timelines, offsets)):
        events.extend(_trace_events(timeline, index + 1, origin_ns - offset_ns))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(trace: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(trace, out)


def _check_offsets(timelines: Sequence[Timeline], offsets_ns: Sequence[int] | None) -> list[int]:
    if offsets_ns is None:
        return [0] * len(timelines)
    if len(offsets_ns) != len(timelines):
        raise ValueError(f"{len(offsets_ns)} offsets given for {len(timelines)} timelines")
    return list(offsets_ns)


def _common_origin(timelines: Sequence[Timeline], offsets: Sequence[int]) -> int:
    starts = [
        min(s.start_ns for s in timeline.spans) + offset
        for timeline, offset in zip(timelines, offsets)
        if timeline.spans
    ]
    return min(starts, default=0)


def _trace_events(timeline: Timeline, pid: int, origin_ns: int) -> list[dict[str, Any]]:
    """Metadata events naming the process and its tracks, then one "X" event per span."""
    spans = timeline.spans
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
         "args": {"name": timeline.process_name}},
    ]
    for track in sorted({s.track for s in spans}):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": track,
                       "args": {"name": timeline.track_name(track)}})
        # Keep micro-batch rows in numeric order instead of Perfetto's default.
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": track,
                       "args": {"sort_index": track}})
    for s in spans:
        events.append({
            "name": s.name,
            "cat": s.category or s.name,
            "ph": "X",
            "ts": (s.start_ns - origin_ns) / _NS_PER_US,
            "dur": s.duration_ns / _NS_PER_US,
            "pid": pid,
            "tid": s.track,
            "args": dict(s.args),
        })
    return events


# --------------------------------------------------------------------------
# Overlap efficiency


def overlap_efficiency(spans: Iterable[Span]) -> float:
    """Fraction of in-flight time hidden behind model-tier work of other micro-batches.

    Definition (model tier's view). For every (layer, mb) pair the *in-flight
    interval* runs from the end of its ``send`` span to the end of its ``wait``
    span (the recv that returned its attention output): the time the
    activations spend in transfer and attention, as the model tier sees it.
    The part of that interval covered by ``compute`` or ``send`` spans of
    *other* micro-batches is hidden; the rest (the model tier blocked in some
    recv, or idle) is exposed::

        efficiency = 1 - exposed / in_flight = hidden / in_flight

    summed over all pairs. 1.0: transfer and attention fully hidden; 0.0:
    fully exposed (e.g. one micro-batch). Time another micro-batch spends
    blocked does not count as hidden: two micro-batches both waiting hide
    nothing. Send and wait spans are paired per (layer, mb) in recording
    order, so a timeline holding several steps works too. If every in-flight
    interval has zero length nothing is exposed and the result is 1.0.
    """
    span_list = list(spans)
    intervals = _in_flight_intervals(span_list)
    if not intervals:
        raise ValueError("no send/wait pairs with layer and mb args to measure")
    busy_without = _busy_union_excluding_each_mb(span_list, {mb for mb, _, _ in intervals})
    in_flight_ns = sum(end - start for _, start, end in intervals)
    if in_flight_ns == 0:
        return 1.0
    hidden_ns = sum(_covered_ns(busy_without[mb], start, end) for mb, start, end in intervals)
    return hidden_ns / in_flight_ns


def _in_flight_intervals(spans: Sequence[Span]) -> list[tuple[int, int, int]]:
    """``(mb, send end, wait end)`` for each send matched with its wait."""
    sends: dict[tuple[int, int], deque[Span]] = defaultdict(deque)
    for s in sorted((s for s in spans if s.name == SEND and _keyed(s)), key=_start):
        sends[(s.layer, s.mb)].append(s)
    intervals = []
    for w in sorted((s for s in spans if s.name == WAIT and _keyed(s)), key=_start):
        pending = sends.get((w.layer, w.mb))
        if pending:
            sent = pending.popleft()
            intervals.append((w.mb, sent.end_ns, max(sent.end_ns, w.end_ns)))
    return intervals


def _busy_union_excluding_each_mb(
    spans: Sequence[Span], mbs: set[int]
) -> dict[int, list[tuple[int, int]]]:
    busy = [s for s in spans if s.name in _MODEL_BUSY_NAMES]
    return {
        mb: _union((s.start_ns, s.end_ns) for s in busy if s.mb != mb) for mb in mbs
    }


def _union(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint intervals covering the same time as the input."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _covered_ns(union: list[tuple[int, int]], start: int, end: int) -> int:
    """Length of ``[start, end)`` covered by the disjoint sorted ``union``."""
    covered = 0
    # The first interval that can overlap is the last one starting at or before `start`.
    index = max(bisect.bisect_right(union, start, key=lambda interval: interval[0]) - 1, 0)
    for lo, hi in union[index:]:
        if lo >= end:
            break
        covered += max(0, min(hi, end) - max(lo, start))
    return covered


def _keyed(span: Span) -> bool:
    return span.layer is not None and span.mb is not None


def _start(span: Span) -> int:
    return span.start_ns


# --------------------------------------------------------------------------
# Summary


def summarize(spans: Iterable[Span]) -> dict[str, Any]:
    """Totals in milliseconds.

    ``step_ms`` is first span start to last span end (one step when the
    timeline recorded one step); ``compute_ms``, ``wait_ms``, ``send_ms`` and
    ``attention_ms`` sum the spans of that name; ``per_layer`` lists the same
    sums per layer (spans without a layer, such as begin/end hooks, appear only
    in the totals); ``overlap_efficiency`` is None when there is nothing to
    measure (no send/wait pairs).
    """
    span_list = list(spans)
    if not span_list:
        raise ValueError("no spans recorded")
    step_ns = max(s.end_ns for s in span_list) - min(s.start_ns for s in span_list)
    result: dict[str, Any] = {"step_ms": step_ns / _NS_PER_MS}
    result.update(_totals_ms(span_list))
    result["overlap_efficiency"] = _overlap_or_none(span_list)
    result["per_layer"] = _per_layer_ms(span_list)
    return result


def _totals_ms(spans: Iterable[Span]) -> dict[str, float]:
    totals = dict.fromkeys((COMPUTE, WAIT, SEND, ATTENTION), 0)
    for s in spans:
        if s.name in totals:
            totals[s.name] += s.duration_ns
    return {f"{name}_ms": ns / _NS_PER_MS for name, ns in totals.items()}


def _per_layer_ms(spans: Sequence[Span]) -> list[dict[str, float]]:
    by_layer: dict[int, list[Span]] = defaultdict(list)
    for s in spans:
        if s.layer is not None:
            by_layer[s.layer].append(s)
    return [{"layer": layer, **_totals_ms(by_layer[layer])} for layer in sorted(by_layer)]


def _overlap_or_none(spans: Sequence[Span]) -> float | None:
    try:
        return overlap_efficiency(spans)
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Gantt chart

_COLORS = {COMPUTE: "tab:blue", SEND: "tab:orange", WAIT: "tab:red", ATTENTION: "tab:green"}
_OTHER_COLOR = "tab:gray"


def plot(
    path: str | os.PathLike[str], *timelines: Timeline, offsets_ns: Sequence[int] | None = None
) -> None:
    """Gantt chart with one row per (process, track), saved to ``path``.

    The file type follows the extension (png, svg, pdf). Needs matplotlib,
    imported only here so the rest of the module works without it.
    """
    try:
        from matplotlib.figure import Figure  # Figure alone needs no GUI backend.
    except ImportError as err:
        raise RuntimeError("plot() needs matplotlib: pip install matplotlib") from err
    offsets = _check_offsets(timelines, offsets_ns)
    origin_ns = _common_origin(timelines, offsets)
    rows = [(tl, track, off) for tl, off in zip(timelines, offsets)
            for track in sorted({s.track for s in tl.spans})]
    figure = Figure(figsize=(12, 1 + 0.5 * max(len(rows), 1)))
    axes = figure.subplots()
    for row, (timeline, track, offset_ns) in enumerate(rows):
        _draw_row(axes, row, timeline, track, origin_ns - offset_ns)
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([f"{tl.process_name}: {tl.track_name(track)}" for tl, track, _ in rows])
    axes.invert_yaxis()  # First process and micro-batch 0 on top, as in Perfetto.
    axes.set_xlabel("time (ms)")
    _add_legend(axes)
    figure.tight_layout()
    figure.savefig(path)


def _draw_row(axes: Any, row: int, timeline: Timeline, track: int, origin_ns: int) -> None:
    for s in timeline.spans:
        if s.track == track:
            axes.broken_barh(
                [((s.start_ns - origin_ns) / _NS_PER_MS, s.duration_ns / _NS_PER_MS)],
                (row - 0.4, 0.8),
                facecolors=_COLORS.get(s.name, _OTHER_COLOR),
            )


def _add_legend(axes: Any) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=color, label=name) for name, color in _COLORS.items()]
    axes.legend(handles=handles, loc="upper right", fontsize="small")
