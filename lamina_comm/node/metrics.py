"""The model node's metrics, on ``prometheus_client`` (one registry per node).

Metric objects are thread-safe: the scheduler thread updates them, HTTP
threads render them. :class:`NodeMetrics` names everything the model node
exports; ``GET /metrics`` returns :meth:`NodeMetrics.render` (the Prometheus
text format, ``prometheus_client.generate_latest``). The thin wrappers keep
one call style (labels as keywords) and let tests read a value back.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Iterable, Mapping, Optional, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry

LabelValues = tuple[str, ...]

# Latency buckets (seconds): 50 us .. 10 s, roughly x2.5 per bucket.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)
# Request latencies (seconds) as vLLM buckets them: time to first token, between tokens, end to end.
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)


class _Metric:
    """A prometheus_client metric with labels passed as keywords, and its values readable back."""

    kind: type = prometheus_client.Counter

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = (),
                 **options: object):
        self.name = name
        self.label_names = tuple(labels)
        self._metric = self.kind(name, help_text, self.label_names, registry=registry, **options)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def _child(self, key: LabelValues):  # noqa: ANN202 - a prometheus_client child
        return self._metric.labels(*key) if self.label_names else self._metric


class _Valued(_Metric):
    """A counter or gauge whose values are kept beside prometheus_client's, to be read back."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(registry, name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        self._child(key).inc(amount)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)


class Counter(_Valued):
    kind = prometheus_client.Counter

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = ()):
        # prometheus_client adds the _total suffix itself.
        super().__init__(registry, name[:-len("_total")] if name.endswith("_total") else name, help_text, labels)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        super().inc(amount, **labels)


class Gauge(_Valued):
    kind = prometheus_client.Gauge

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        self._child(key).set(value)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = prometheus_client.Histogram

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(registry, name, help_text, labels, buckets=tuple(sorted(buckets)))
        self._totals: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        self._child(key).observe(value)
        with self._lock:
            total = self._totals.setdefault(key, [0, 0.0])
            total[0] += 1
            total[1] += value

    def count_and_sum(self, **labels: object) -> tuple[int, float]:
        key = self._key(labels)
        with self._lock:
            count, total = self._totals.get(key, [0, 0.0])
            return int(count), float(total)


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
    """Everything the model node exports (names are the Prometheus names); ``replica`` labels request latencies."""

    def __init__(self, replica: str = "") -> None:
        self.registry = CollectorRegistry()
        self.replica = replica
        r = self.registry
        self.requests = Counter(r, "lamina_requests_total", "Generation requests by outcome.", ["outcome"])
        self.prompt_tokens = Counter(r, "lamina_prompt_tokens_total", "Prompt tokens admitted.")
        self.generated_tokens = Counter(r, "lamina_generated_tokens_total", "Tokens generated.")
        self.tokens_per_second = Gauge(
            r, "lamina_tokens_per_second", "Generated tokens per second over the last 10 s of wall time.")
        self.steps = Counter(r, "lamina_steps_total", "Pipeline steps run, by outcome.", ["outcome"])
        self.step_seconds = Histogram(r, "lamina_step_seconds", "Wall time of one pipeline step.")
        self.step_tokens = Histogram(
            r, "lamina_step_tokens", "Tokens processed per step (prefill and decode).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        self.decode_step_seconds = Counter(
            r, "lamina_decode_step_seconds_total", "Wall time of decode-only steps (every entry one decode token).")
        self.decode_tokens = Counter(r, "lamina_decode_tokens_total", "Tokens generated by decode-only steps.")
        self.microbatches = Gauge(r, "lamina_microbatches", "Micro-batches in the last step.")
        self.overlap_efficiency = Gauge(
            r, "lamina_overlap_efficiency",
            "Share of attention in-flight time hidden by other micro-batches, last multi-micro-batch step.")
        self.step_overlap_efficiency = Histogram(
            r, "lamina_step_overlap_efficiency", "Overlap efficiency of each multi-micro-batch step.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.layer_round_trip = Histogram(
            r, "lamina_layer_round_trip_seconds",
            "Per layer and attention peer: q/k/v send start to the attention output's arrival (wire round "
            "trip, including the peer's compute).", ["peer", "layer"])
        self.layer_transfer = Histogram(
            r, "lamina_layer_transfer_seconds",
            "Per layer and attention peer: wire round trip minus the peer's attention compute time "
            "(network and queueing).", ["peer", "layer"])
        self.layer_collect_wait = Histogram(
            r, "lamina_layer_collect_wait_seconds",
            "Per layer and attention peer: how long an arrived attention output waited for the model tier to "
            "collect it (the other micro-batch's compute, with ping-pong).", ["peer", "layer"])
        self.attention_compute = Histogram(
            r, "lamina_attention_compute_seconds", "Attention compute time reported by each peer.", ["peer"])
        self.bytes_sent = Gauge(r, "lamina_channel_bytes_sent", "Bytes sent on the data channel.", ["peer"])
        self.bytes_received = Gauge(
            r, "lamina_channel_bytes_received", "Bytes received on the data channel.", ["peer"])
        self.staged_bytes = Gauge(
            r, "lamina_channel_staged_bytes", "Bytes copied into send slots before sending (0 on the zero-copy "
            "path).", ["peer"])
        self.queue_depth = Gauge(r, "lamina_queue_depth", "Requests waiting for admission.")
        self.running = Gauge(r, "lamina_running_requests", "Requests admitted and generating.")
        self.held = Gauge(r, "lamina_held_requests", "Requests held while an attention worker is rebuilt.")
        self.kv_blocks_used = Gauge(r, "lamina_kv_blocks_used", "KV cache blocks in use.", ["peer"])
        self.kv_blocks_total = Gauge(r, "lamina_kv_blocks_total", "KV cache blocks in total.", ["peer"])
        self.worker_failures = Counter(r, "lamina_worker_failures_total", "Attention workers lost.", ["peer"])
        self.rebuilds = Counter(r, "lamina_rebuilds_total", "Attention workers replaced and rebuilt.")
        # Request latencies, as vLLM exports them (per replica).
        self.time_to_first_token = Histogram(
            r, "lamina_time_to_first_token_seconds", "From submission to the request's first token.", ["replica"],
            buckets=REQUEST_BUCKETS)
        self.inter_token_latency = Histogram(
            r, "lamina_inter_token_latency_seconds", "Between two consecutive tokens of a request.", ["replica"],
            buckets=REQUEST_BUCKETS)
        self.request_latency = Histogram(
            r, "lamina_e2e_request_latency_seconds", "From submission to the request's end (any outcome).",
            ["replica"], buckets=REQUEST_BUCKETS)
        self.queue_time = Histogram(
            r, "lamina_request_queue_time_seconds", "From submission to admission (KV blocks reserved).",
            ["replica"], buckets=REQUEST_BUCKETS)
        self._rate = RateWindow()

    def add_generated(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)
        self._rate.add(tokens)

    def render(self) -> str:
        self.tokens_per_second.set(self._rate.rate())
        return prometheus_client.generate_latest(self.registry).decode()


def parse_prometheus(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of every sample (for the demo, tests and ``status``), parsed by
    prometheus_client's own parser; labels sorted by name."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
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
