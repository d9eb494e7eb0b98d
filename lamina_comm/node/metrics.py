"""Prometheus text exposition for the model node (no client library needed).

Metric objects are thread-safe: the scheduler thread updates them, HTTP
threads render them. :class:`NodeMetrics` names everything the model node
exports; ``GET /metrics`` returns :meth:`Registry.render`.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from typing import Iterable, Mapping, Optional, Sequence

LabelValues = tuple[str, ...]

# Latency buckets (seconds): 50 us .. 10 s, roughly x2.5 per bucket.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: Optional[tuple[str, str]] = None) -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_format_labels(self.label_names, key)} {_format_value(v)}" for key, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        # per label set: [bucket counts..., +Inf count], sum
        self._series: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[index] += 1
            total[0] += value

    def count_and_sum(self, **labels: object) -> tuple[int, float]:
        with self._lock:
            series = self._series.get(self._key(labels))
            return (0, 0.0) if series is None else (sum(series[0]), series[1][0])

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((key, (list(counts), total[0])) for key, (counts, total) in self._series.items())
        lines = []
        for key, (counts, total) in items:
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                cumulative += count
                labels = _format_labels(self.label_names, key, ("le", _format_value(bound)))
                lines.append(f"{self.name}_bucket{labels} {cumulative}")
            labels = _format_labels(self.label_names, key)
            lines.append(f"{self.name}_sum{labels} {_format_value(total)}")
            lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header() + metric.samples()
        return "\n".join(lines) + "\n"


class RateWindow:
    """Events per second over the last ``window_s`` seconds of wall time."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, amount: float, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, amount))
            self._trim(now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(amount for _, amount in self._events) / self.window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


class NodeMetrics:
    """Everything the model node exports (names are the Prometheus names)."""

    def __init__(self) -> None:
        self.registry = Registry()
        add = self.registry.add
        self.requests = add(Counter("lamina_requests_total", "Generation requests by outcome.", ["outcome"]))
        self.prompt_tokens = add(Counter("lamina_prompt_tokens_total", "Prompt tokens admitted."))
        self.generated_tokens = add(Counter("lamina_generated_tokens_total", "Tokens generated."))
        self.tokens_per_second = add(Gauge(
            "lamina_tokens_per_second", "Generated tokens per second over the last 10 s of wall time."))
        self.steps = add(Counter("lamina_steps_total", "Pipeline steps run, by outcome.", ["outcome"]))
        self.step_seconds = add(Histogram("lamina_step_seconds", "Wall time of one pipeline step."))
        self.step_tokens = add(Histogram(
            "lamina_step_tokens", "Tokens processed per step (prefill and decode).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)))
        self.decode_step_seconds = add(Counter(
            "lamina_decode_step_seconds_total", "Wall time of decode-only steps (every entry one decode token)."))
        self.decode_tokens = add(Counter("lamina_decode_tokens_total", "Tokens generated by decode-only steps."))
        self.microbatches = add(Gauge("lamina_microbatches", "Micro-batches in the last step."))
        self.overlap_efficiency = add(Gauge(
            "lamina_overlap_efficiency",
            "Share of attention in-flight time hidden by other micro-batches, last multi-micro-batch step."))
        self.step_overlap_efficiency = add(Histogram(
            "lamina_step_overlap_efficiency", "Overlap efficiency of each multi-micro-batch step.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)))
        self.layer_round_trip = add(Histogram(
            "lamina_layer_round_trip_seconds",
            "Per layer and attention peer: q/k/v send start to the attention output's arrival (wire round "
            "trip, including the peer's compute).", ["peer", "layer"]))
        self.layer_transfer = add(Histogram(
            "lamina_layer_transfer_seconds",
            "Per layer and attention peer: wire round trip minus the peer's attention compute time "
            "(network and queueing).", ["peer", "layer"]))
        self.layer_collect_wait = add(Histogram(
            "lamina_layer_collect_wait_seconds",
            "Per layer and attention peer: how long an arrived attention output waited for the model tier to "
            "collect it (the other micro-batch's compute, with ping-pong).", ["peer", "layer"]))
        self.attention_compute = add(Histogram(
            "lamina_attention_compute_seconds", "Attention compute time reported by each peer.", ["peer"]))
        self.bytes_sent = add(Gauge("lamina_channel_bytes_sent", "Bytes sent on the data channel.", ["peer"]))
        self.bytes_received = add(Gauge(
            "lamina_channel_bytes_received", "Bytes received on the data channel.", ["peer"]))
        self.staged_bytes = add(Gauge(
            "lamina_channel_staged_bytes", "Bytes copied into send slots before sending (0 on the zero-copy "
            "path).", ["peer"]))
        self.queue_depth = add(Gauge("lamina_queue_depth", "Requests waiting for admission."))
        self.running = add(Gauge("lamina_running_requests", "Requests admitted and generating."))
        self.held = add(Gauge("lamina_held_requests", "Requests held while an attention worker is rebuilt."))
        self.kv_blocks_used = add(Gauge("lamina_kv_blocks_used", "KV cache blocks in use.", ["peer"]))
        self.kv_blocks_total = add(Gauge("lamina_kv_blocks_total", "KV cache blocks in total.", ["peer"]))
        self.worker_failures = add(Counter(
            "lamina_worker_failures_total", "Attention workers lost.", ["peer"]))
        self.rebuilds = add(Counter("lamina_rebuilds_total", "Attention workers replaced and rebuilt."))
        self._rate = RateWindow()

    def add_generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)
        self._rate.add(tokens)

    def render(self) -> str:
        self.tokens_per_second.set(self._rate.rate())
        return self.registry.render()


def parse_prometheus(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample line (for the demo, tests and ``status``)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples


def histogram_means(samples: Mapping[str, float], name: str) -> dict[str, tuple[int, float]]:
    """Label string -> (count, mean) of every series of histogram ``name``."""
    means: dict[str, tuple[int, float]] = {}
    prefix = f"{name}_count"
    for key, count in samples.items():
        if key.startswith(prefix) and count > 0:
            labels = key[len(prefix):]
            means[labels] = (int(count), samples[f"{name}_sum{labels}"] / count)
    return means


def sum_series(samples: Mapping[str, float], names: Iterable[str]) -> float:
    return sum(value for key, value in samples.items() if key.split("{")[0] in set(names))
