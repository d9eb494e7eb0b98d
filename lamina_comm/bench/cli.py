"""lamina-bench: one command, one subcommand per measurement.

  lamina-bench bandwidth [HOST] [-s SIZE | -a] [-n N | -D SEC] [-q STREAMS] [-t DEPTH] ...
  lamina-bench latency   [HOST] [-s SIZE | -a] [-n N] ...
  lamina-bench channel   [--sizes 64,64K] [-n N] ...   channel round trip beside the transport's
  lamina-bench pipeline  ...   model worker + attention workers, ping-pong over channels
  lamina-bench plan      ...   bytes per layer, bandwidth needed, micro-batches to hide it
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import plan


def _pipeline_module():
    return importlib.import_module("lamina_comm.bench.pipeline_bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import perf
    for mode in ("bandwidth", "latency"):
        p = sub.add_parser(mode, help=f"one-sided write {mode} (perftest-style flags and columns)")
        perf.add_arguments(p, mode)
        p.set_defaults(func=lambda args, m=mode: perf.run(args, m))
    from . import channel_bench
    p = sub.add_parser("channel", help="message round trip through channels beside the raw transport ping-pong")
    channel_bench.add_arguments(p)
    p.set_defaults(func=channel_bench.run)
    from . import engine_bench
    p = sub.add_parser("engine", help="layer round trip through the engine API beside the bare channel")
    engine_bench.add_arguments(p)
    p.set_defaults(func=engine_bench.run)
    p = sub.add_parser("pipeline", help="ping-pong pipeline over model and attention worker processes")
    try:
        mod = _pipeline_module()
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    except ImportError as exc:  # keep the other subcommands usable
        p.set_defaults(func=lambda args, e=exc: sys.exit(f"lamina-bench pipeline unavailable: {e}"))
    p = sub.add_parser("plan", help="network planner (Lamina bandwidth formula, MegaScale-Infer condition)")
    plan.add_plan_arguments(p)
    p.set_defaults(func=plan.run_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
