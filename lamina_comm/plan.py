"""Network planner for model-attention disaggregation (``lamina-bench plan``).

Answers: how many bytes cross the link per layer and per decode step, what
bandwidth keeps the network within a slowdown budget (Lamina's formula), and
how many micro-batches a ping-pong pipeline needs to hide the transfers
(MegaScale-Infer's condition). Sources:

* Lamina: Chen et al., "Efficient and Economic Large Language Model Inference
  with Attention Offloading", arXiv:2405.01814 (per-layer traffic and minimum
  bandwidth).
* MegaScale-Infer: Zhu et al., "MegaScale-Infer: Serving Mixture-of-Experts at
  Scale with Disaggregated Expert Parallelism", arXiv:2504.02263 (ping-pong
  pipeline condition m >= 2(1 + T_c/T_f)).

Units: bytes are plain bytes; ``gbps`` is Gbit/s (1e9 bit/s); ``GBps`` is GB/s
(1e9 byte/s); times are seconds unless a name ends in ``_ms``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from . import dtypes

# Roofline defaults used when --t-model / --t-attention are not given. They
# describe a balanced Llama-3-70B deployment, aggregated over each tier:
# model tier = 2x H100 SXM (989 dense bf16 TFLOPS and 3.35 TB/s HBM each;
# two are needed to hold 140 GB of fp16 weights), attention tier = 4x H20
# (4.0 TB/s HBM and 96 GB each, enough for a 256 x 4096-token KV cache).
DEFAULT_PARAMS_B = 70.0
DEFAULT_MODEL_TFLOPS = 2 * 989.0
DEFAULT_MODEL_MEM_BW_TBPS = 2 * 3.35
DEFAULT_CONTEXT = 4096
DEFAULT_ATTENTION_MEM_BW_TBPS = 4 * 4.0
# One 400 Gbit/s NIC (e.g. ConnectX-7) when no benchmark file is given.
DEFAULT_LINK_GBPS = 400.0
# Lamina and MegaScale-Infer both ping-pong at least two micro-batches.
DEFAULT_MICROBATCHES = 2

_BITS_PER_BYTE = 8
_GIGA = 1e9


# --------------------------------------------------------------------------
# Traffic per layer and per step


def send_bytes_per_token_per_layer(hidden: int, gqa_group: int, element_bytes: int) -> int:
    """Model tier -> attention tier: q (d elements) plus k and v (d/G each)."""
    _check_shape(hidden, gqa_group)
    return element_bytes * (hidden + 2 * (hidden // gqa_group))


def return_bytes_per_token_per_layer(hidden: int, element_bytes: int) -> int:
    """Attention tier -> model tier: the attention output (d elements)."""
    return element_bytes * hidden


def bytes_per_token_per_layer(hidden: int, gqa_group: int, element_bytes: int) -> int:
    """Both directions: (2 + 2/G) * e * d bytes (Lamina, arXiv:2405.01814).

    d = hidden size, G = GQA group (num_heads / num_kv_heads), e = bytes per
    element. Llama-3-70B in fp16: (2 + 2/8) * 2 * 8192 = 36864 B = 36 KiB.
    """
    return send_bytes_per_token_per_layer(hidden, gqa_group, element_bytes) + (
        return_bytes_per_token_per_layer(hidden, element_bytes)
    )


def step_bytes(hidden: int, layers: int, gqa_group: int, batch: int, element_bytes: int) -> int:
    """Bytes over the link per decode step: per-token-per-layer bytes * B * L."""
    return bytes_per_token_per_layer(hidden, gqa_group, element_bytes) * batch * layers


def _check_shape(hidden: int, gqa_group: int) -> None:
    if gqa_group < 1 or hidden % gqa_group:
        raise ValueError(f"GQA group {gqa_group} must be >= 1 and divide hidden size {hidden}")


# --------------------------------------------------------------------------
# The two conditions


def lamina_min_bandwidth(
    hidden: int,
    layers: int,
    gqa_group: int,
    batch: int,
    element_bytes: int,
    t_model_s: float,
    t_attention_s: float,
    slowdown: float,
) -> float:
    """Lamina's minimum bandwidth, bytes/s (arXiv:2405.01814):

        B_min = (2 + 2/G) * e * d * B * L / (alpha * (T_model + T_attention))

    d: hidden size; L: layers; G: GQA group (num_heads / num_kv_heads);
    B: batch (tokens per decode step); e: bytes per element; T_model,
    T_attention: compute time of one decode step on the model tier and on the
    attention tier (seconds); alpha: allowed slowdown fraction, i.e. the
    network time of a step may be at most alpha * (T_model + T_attention)
    (0.1 = 10%). The numerator is :func:`step_bytes`, both directions counted
    on one link.
    """
    if slowdown <= 0:
        raise ValueError(f"slowdown must be > 0, got {slowdown}")
    if t_model_s + t_attention_s <= 0:
        raise ValueError("T_model + T_attention must be > 0")
    _check_shape(hidden, gqa_group)
    return (
        (2 + 2 / gqa_group) * element_bytes * hidden * batch * layers
        / (slowdown * (t_model_s + t_attention_s))
    )


def megascale_min_microbatches(t_comm_s: float, t_compute_s: float) -> int:
    """Smallest m with m >= 2 * (1 + T_comm / T_compute) (MegaScale-Infer, arXiv:2504.02263).

    With m micro-batches ping-ponging between two tiers, one micro-batch's
    round trip is compute + transfer + compute + transfer = 2 (T_f + T_c), and
    the other m - 1 micro-batches must keep the tiers busy meanwhile:
    m * T_f >= 2 (T_f + T_c). T_comm is one transfer (one direction),
    T_compute the per-micro-batch compute of the slower tier; only the ratio
    matters, so per-step totals work too. T_comm == T_compute gives m = 4.
    """
    if t_compute_s <= 0:
        raise ValueError(f"T_compute must be > 0, got {t_compute_s}")
    if t_comm_s < 0:
        raise ValueError(f"T_comm must be >= 0, got {t_comm_s}")
    bound = 2 * (1 + t_comm_s / t_compute_s)
    # Tolerate float noise such as 8.000000000000002 for an exact 8.
    return math.ceil(bound - 1e-9)


# --------------------------------------------------------------------------
# Rotational staggered pipelining


def rotation_period_s(t_model_s: float, t_attention_s: float, transfer_s: float, replicas: int,
                      microbatches: int) -> float:
    """Per-layer period of rotational staggered pipelining (docs/pipeline.md).

    All per layer, whole batch: t_model_s one replica's compute, t_attention_s
    the attention pool's, transfer_s the batch's q/k/v out plus output back.
    A micro-batch carries 1/n of each. The attention pool serves all n
    micro-batches per period, the R replicas share them, and one micro-batch's
    own round (model, out, attention, back) must also fit:

        P >= max(n·T_a, n·T_m / R, T_m + T_a + X)   (per micro-batch T_a, T_m, X)
          = max(t_attention, t_model / R, (t_model + t_attention + transfer) / n)
    """
    if replicas < 1 or microbatches < 1:
        raise ValueError("replicas and microbatches must be >= 1")
    return max(t_attention_s, t_model_s / replicas, (t_model_s + t_attention_s + transfer_s) / microbatches)


def rotation_choice(t_model_s: float, t_attention_s: float, transfer_s: float, replicas: int,
                    max_microbatches: int = 64) -> dict[str, Any]:
    """For R replicas: the fewest micro-batches (at least R + 1) that reach the compute bound, and its figures.

    Times per layer, whole batch (see :func:`rotation_period_s`). When no n up
    to ``max_microbatches`` reaches the bound (transfer too slow), the
    largest is reported with ``transfer_bound`` set.
    """
    bound = max(t_attention_s, t_model_s / replicas)
    needed = math.ceil((t_model_s + t_attention_s + transfer_s) / bound - 1e-9) if bound > 0 else 1
    n = max(replicas + 1 if replicas > 1 else 2, needed)
    transfer_bound = n > max_microbatches
    n = min(n, max_microbatches)
    period = rotation_period_s(t_model_s, t_attention_s, transfer_s, replicas, n)
    return {"replicas": replicas, "microbatches": n, "period_s": period,
            "model_busy": t_model_s / replicas / period if period else 0.0,
            "attention_busy": t_attention_s / period if period else 0.0,
            "transfer_bound": transfer_bound}


def plan_rotation(t_model_s: float, t_attention_s: float, transfer_s: float, *, max_replicas: int = 8,
                  replicas: int | None = None) -> dict[str, Any]:
    """Pick R (and n): the replica count whose less busy tier is busiest, fewest replicas on a tie.

    ``replicas`` forces R. Every candidate up to ``max_replicas`` is listed.
    """
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas}")
    candidates = [rotation_choice(t_model_s, t_attention_s, transfer_s, r) for r in range(1, max_replicas + 1)]
    if replicas is not None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        chosen = rotation_choice(t_model_s, t_attention_s, transfer_s, replicas)
    else:
        chosen = max(candidates, key=lambda c: (round(min(c["model_busy"], c["attention_busy"]), 9),
                                                -c["replicas"]))
    return {"chosen": chosen, "candidates": candidates}


# --------------------------------------------------------------------------
# Roofline estimates of the step times


def estimate_t_model_s(
    params_b: float, batch: int, element_bytes: int, tflops: float, mem_bw_tbps: float
) -> float:
    """Model tier roofline: max(2 * P * B / peak FLOP/s, P * e / memory bandwidth).

    Each decode step streams every weight once (P * e bytes) and does 2 FLOPs
    per weight per token. ``params_b`` is P in billions, rates are aggregate
    over the tier (TFLOP/s, TB/s). Attention FLOPs are not on this tier.
    """
    params = params_b * _GIGA
    flop_time = 2 * params * batch / (tflops * 1e12)
    memory_time = params * element_bytes / (mem_bw_tbps * 1e12)
    return max(flop_time, memory_time)


def estimate_t_attention_s(
    hidden: int,
    layers: int,
    gqa_group: int,
    batch: int,
    context: int,
    element_bytes: int,
    mem_bw_tbps: float,
) -> float:
    """Attention tier roofline: KV-cache bytes read per step / memory bandwidth.

    Decode attention is memory bound: each step reads k and v (d/G elements
    each) for every cached token of every sequence in every layer:
    2 * (d/G) * e * L * B * context bytes.
    """
    _check_shape(hidden, gqa_group)
    kv_bytes = 2 * (hidden // gqa_group) * element_bytes * layers * batch * context
    return kv_bytes / (mem_bw_tbps * 1e12)


# --------------------------------------------------------------------------
# Measured links


@dataclass(frozen=True)
class LinkResult:
    """One bandwidth-benchmark row: message size and average rate in Gbit/s."""

    bytes: int | None
    bw_avg_gbps: float


def load_link_results(path: str | os.PathLike[str]) -> list[LinkResult]:
    """Read a benchmark JSON: a list of results, or an object with a "results" list.

    Each result needs ``bw_avg_gbps`` (Gbit/s); ``bytes`` is its message size.
    """
    with open(path, encoding="utf-8") as source:
        document = json.load(source)
    rows = document.get("results") if isinstance(document, dict) else document
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of results or an object with 'results'")
    results = [_parse_link_row(row) for row in rows if isinstance(row, dict)]
    if not results:
        raise ValueError(f"{path}: no results with a numeric 'bw_avg_gbps'")
    return results


def _parse_link_row(row: dict[str, Any]) -> LinkResult:
    try:
        rate = float(row["bw_avg_gbps"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"link result without a numeric 'bw_avg_gbps': {row}") from err
    size = row.get("bytes")
    return LinkResult(int(size) if isinstance(size, (int, float)) and size > 0 else None, rate)


def pick_link_result(results: Iterable[LinkResult], message_bytes: float) -> LinkResult:
    """The result whose size is closest to ``message_bytes``, else the fastest.

    Closeness is measured as a ratio (|log(size / message)|), since benchmark
    sizes are usually powers of two spanning many decades. Without any sized
    result the highest bandwidth is used.
    """
    candidates = list(results)
    if not candidates:
        raise ValueError("no link results to choose from")
    sized = [r for r in candidates if r.bytes is not None]
    if not sized or message_bytes <= 0:
        return max(candidates, key=lambda r: r.bw_avg_gbps)
    return min(sized, key=lambda r: abs(math.log(r.bytes / message_bytes)))


# --------------------------------------------------------------------------
# The plan


def plan(
    *,
    hidden: int,
    layers: int,
    gqa_group: int,
    batch: int,
    dtype: str,
    t_model_s: float,
    t_attention_s: float,
    slowdown: float = 0.1,
    microbatches: int = DEFAULT_MICROBATCHES,
    link_gbps: float = DEFAULT_LINK_GBPS,
    link_results: Sequence[LinkResult] | None = None,
    replicas: int | None = None,
    max_replicas: int = 8,
) -> dict[str, Any]:
    """Traffic, required bandwidth, transfer time and micro-batch count for one shape.

    ``link_results`` (from :func:`load_link_results`) replaces ``link_gbps``
    with the measured rate at the size of one (layer, micro-batch) q/k/v
    message. T_comm counts both directions on the link, as Lamina's formula
    does; the MegaScale-Infer condition uses the larger, one-way (q/k/v)
    transfer against the slower tier's compute.
    """
    element_bytes = _element_bytes(dtype)
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    send_per_layer = send_bytes_per_token_per_layer(hidden, gqa_group, element_bytes) * batch
    return_per_layer = return_bytes_per_token_per_layer(hidden, element_bytes) * batch
    total_step_bytes = step_bytes(hidden, layers, gqa_group, batch, element_bytes)
    message_bytes = math.ceil(send_per_layer / microbatches)
    link = _link_rate(link_gbps, link_results, message_bytes)

    required_Bps = lamina_min_bandwidth(
        hidden, layers, gqa_group, batch, element_bytes, t_model_s, t_attention_s, slowdown
    )
    link_Bps = link["gbps"] * _GIGA / _BITS_PER_BYTE
    t_comm_s = total_step_bytes / link_Bps
    t_comm_one_way_s = send_per_layer * layers / link_Bps
    rotation = plan_rotation(t_model_s / layers, t_attention_s / layers,
                             (send_per_layer + return_per_layer) / link_Bps,
                             max_replicas=max_replicas, replicas=replicas)
    chosen = rotation["chosen"]
    step_s = chosen["period_s"] * layers
    # The residual stream (d elements per token) moves replica to replica every layer when micro-batches rotate.
    rotates = chosen["replicas"] > 1 and chosen["microbatches"] % chosen["replicas"] != 0
    residual_per_layer = hidden * element_bytes * batch if rotates else 0
    return {
        "model": {"hidden": hidden, "layers": layers, "gqa_group": gqa_group, "batch": batch,
                  "dtype": dtype, "element_bytes": element_bytes},
        "bytes_per_token_per_layer": bytes_per_token_per_layer(hidden, gqa_group, element_bytes),
        "per_layer_bytes": send_per_layer + return_per_layer,
        "per_layer_send_bytes": send_per_layer,
        "per_layer_return_bytes": return_per_layer,
        "step_bytes": total_step_bytes,
        "microbatches": microbatches,
        "message_bytes": message_bytes,
        "t_model_ms": t_model_s * 1e3,
        "t_attention_ms": t_attention_s * 1e3,
        "slowdown": slowdown,
        "required_gbps": required_Bps * _BITS_PER_BYTE / _GIGA,
        "required_GBps": required_Bps / _GIGA,
        "link": link,
        "t_comm_ms": t_comm_s * 1e3,
        "t_comm_one_way_ms": t_comm_one_way_s * 1e3,
        "comm_fraction": t_comm_s / (t_model_s + t_attention_s),
        "microbatches_needed": megascale_min_microbatches(
            t_comm_one_way_s, max(t_model_s, t_attention_s)
        ),
        "link_suffices": link_Bps >= required_Bps,
        "link_margin": link_Bps / required_Bps,
        "link_headroom_gbps": (link_Bps - required_Bps) * _BITS_PER_BYTE / _GIGA,
        "rotation": {
            "replicas": chosen["replicas"], "microbatches": chosen["microbatches"],
            "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s if step_s else 0.0,
            "tokens_per_s_per_replica": batch / step_s / chosen["replicas"] if step_s else 0.0,
            "model_busy": chosen["model_busy"], "attention_busy": chosen["attention_busy"],
            "transfer_bound": chosen["transfer_bound"],
            "residual_bytes_per_layer": residual_per_layer,
            "residual_bytes_per_step": residual_per_layer * layers,
            "candidates": [{**c, "step_ms": c["period_s"] * layers * 1e3} for c in rotation["candidates"]],
        },
    }


def _element_bytes(dtype: str) -> int:
    if dtype not in dtypes.CLI_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(dtypes.CLI_CHOICES)}")
    return dtypes.itemsize(dtype)


def _link_rate(
    link_gbps: float, link_results: Sequence[LinkResult] | None, message_bytes: int
) -> dict[str, Any]:
    if not link_results:
        return {"gbps": link_gbps, "source": "nominal", "entry_bytes": None}
    chosen = pick_link_result(link_results, message_bytes)
    return {"gbps": chosen.bw_avg_gbps, "source": "measured", "entry_bytes": chosen.bytes}


# --------------------------------------------------------------------------
# Command line


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the planner's options (defaults: Llama-3-70B, batch 256, fp16)."""
    shape = parser.add_argument_group("model shape")
    shape.add_argument("--hidden", type=int, default=8192, help="hidden size d")
    shape.add_argument("--layers", type=int, default=80, help="number of layers L")
    shape.add_argument("--gqa", type=int, default=8,
                       help="GQA group G = num_heads / num_kv_heads")
    shape.add_argument("--batch", type=int, default=256, help="tokens per decode step B")
    shape.add_argument("--dtype", choices=sorted(dtypes.CLI_CHOICES), default="fp16")

    timing = parser.add_argument_group(
        "step times (default: roofline estimate from the options below)")
    timing.add_argument("--t-model", type=float, metavar="MS",
                        help="model-tier compute per decode step, ms")
    timing.add_argument("--t-attention", type=float, metavar="MS",
                        help="attention-tier compute per decode step, ms")
    timing.add_argument("--params-b", type=float, default=DEFAULT_PARAMS_B,
                        help="model-tier weights, billions")
    timing.add_argument("--model-tflops", type=float, default=DEFAULT_MODEL_TFLOPS,
                        help="model tier peak TFLOP/s (aggregate; default 2x H100 SXM)")
    timing.add_argument("--model-mem-bw", type=float, default=DEFAULT_MODEL_MEM_BW_TBPS,
                        metavar="TBPS", help="model tier memory bandwidth, TB/s (aggregate)")
    timing.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                        help="cached tokens per sequence")
    timing.add_argument("--attention-mem-bw", type=float, default=DEFAULT_ATTENTION_MEM_BW_TBPS,
                        metavar="TBPS",
                        help="attention tier memory bandwidth, TB/s (aggregate; default 4x H20)")

    network = parser.add_argument_group("network")
    network.add_argument("--slowdown", type=float, default=0.1,
                         help="allowed network time as a fraction of compute time (alpha)")
    network.add_argument("--microbatches", type=int, default=DEFAULT_MICROBATCHES,
                         help="micro-batches that split the batch (sets the message size)")
    network.add_argument("--link-gbps", type=float, default=DEFAULT_LINK_GBPS,
                         help="nominal link rate, Gbit/s, when --link is not given")
    network.add_argument("--link", metavar="FILE.json",
                         help="bandwidth benchmark results (fields bytes, bw_avg_gbps)")
    cluster = parser.add_argument_group("rotational staggered pipelining")
    cluster.add_argument("--replicas", type=int, metavar="R",
                         help="model replicas to plan for (default: the best of 1..--max-replicas)")
    cluster.add_argument("--max-replicas", type=int, default=8, help="largest R considered")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for parsed ``args``; 0 on success, 2 on bad input."""
    try:
        result = _plan_from_args(args)
    except (OSError, ValueError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _plan_from_args(args: argparse.Namespace) -> dict[str, Any]:
    link_results = load_link_results(args.link) if args.link else None
    t_model_s, t_attention_s, times_source = _step_times(args)
    result = plan(
        hidden=args.hidden, layers=args.layers, gqa_group=args.gqa, batch=args.batch,
        dtype=args.dtype, t_model_s=t_model_s, t_attention_s=t_attention_s,
        slowdown=args.slowdown, microbatches=args.microbatches, link_gbps=args.link_gbps,
        link_results=link_results, replicas=args.replicas, max_replicas=args.max_replicas,
    )
    result["step_times_source"] = times_source
    if args.link:
        result["link"]["file"] = str(args.link)
    return result


def _step_times(args: argparse.Namespace) -> tuple[float, float, str]:
    """Seconds for (T_model, T_attention) and where they came from."""
    element_bytes = _element_bytes(args.dtype)
    t_model_s = (
        args.t_model / 1e3 if args.t_model is not None
        else estimate_t_model_s(args.params_b, args.batch, element_bytes,
                                args.model_tflops, args.model_mem_bw)
    )
    t_attention_s = (
        args.t_attention / 1e3 if args.t_attention is not None
        else estimate_t_attention_s(args.hidden, args.layers, args.gqa, args.batch,
                                    args.context, element_bytes, args.attention_mem_bw)
    )
    if args.t_model is not None and args.t_attention is not None:
        source = "given"
    elif args.t_model is None and args.t_attention is None:
        source = "roofline"
    else:
        source = "given+roofline"
    return t_model_s, t_attention_s, source


def format_plan(result: dict[str, Any]) -> str:
    """Human-readable report of a :func:`plan` result."""
    model, link = result["model"], result["link"]
    g = model["gqa_group"]
    link_label = (f"measured, {link['entry_bytes']} B messages" if link["source"] == "measured"
                  and link["entry_bytes"] else link["source"])
    verdict = "yes" if result["link_suffices"] else "NO"
    lines = [
        f"model: d={model['hidden']} L={model['layers']} G={g} B={model['batch']} "
        f"{model['dtype']} ({model['element_bytes']} B/element)",
        f"per token per layer: {result['bytes_per_token_per_layer']} B "
        f"({_binary(result['bytes_per_token_per_layer'])}) = (2 + 2/{g}) * e * d",
        f"per layer, whole batch: {_binary(result['per_layer_bytes'])} "
        f"(send q/k/v {_binary(result['per_layer_send_bytes'])}, "
        f"return {_binary(result['per_layer_return_bytes'])})",
        f"per step: {_binary(result['step_bytes'])} ({result['step_bytes']} B)",
        f"message per (layer, micro-batch) with {result['microbatches']} micro-batches: "
        f"{_binary(result['message_bytes'])}",
        f"step compute ({result.get('step_times_source', 'given')}): "
        f"T_model {result['t_model_ms']:.3f} ms, T_attention {result['t_attention_ms']:.3f} ms",
        f"bandwidth needed for slowdown <= {result['slowdown']:.0%} (Lamina): "
        f"{result['required_gbps']:.1f} Gbit/s ({result['required_GBps']:.2f} GB/s)",
        f"link: {link['gbps']:.1f} Gbit/s ({link_label})",
        f"T_comm per step at link rate: {result['t_comm_ms']:.3f} ms both directions "
        f"({result['comm_fraction']:.1%} of compute), {result['t_comm_one_way_ms']:.3f} ms q/k/v",
        f"micro-batches for full overlap (MegaScale-Infer m >= 2(1 + T_comm/T_compute)): "
        f"{result['microbatches_needed']}",
        f"link suffices: {verdict} (margin {result['link_margin']:.2f}x, "
        f"{result['link_headroom_gbps']:+.1f} Gbit/s)",
        _format_rotation(result["rotation"]),
    ]
    return "\n".join(lines)


def _format_rotation(rot: dict[str, Any]) -> str:
    residual = (f"; residual {_binary(rot['residual_bytes_per_layer'])} per layer replica to replica"
                if rot["residual_bytes_per_layer"] else "")
    bound = " (transfer-bound)" if rot["transfer_bound"] else ""
    return (f"rotational staggered pipelining: R={rot['replicas']} replicas, n={rot['microbatches']} "
            f"micro-batches{bound}: step {rot['step_ms']:.3f} ms, {rot['tokens_per_s']:.0f} tokens/s "
            f"({rot['tokens_per_s_per_replica']:.0f} per replica), busy model {rot['model_busy']:.2f} / "
            f"attention {rot['attention_busy']:.2f}{residual}")


def _binary(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes:.0f} B"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lamina-bench plan", description=__doc__.splitlines()[0])
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
