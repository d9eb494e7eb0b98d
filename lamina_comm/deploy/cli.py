"""``lamina-ray``: a disaggregated cluster as Ray actors.

    lamina-ray up --config cluster.toml [--address RAY_ADDRESS]   # prints the HTTP address(es)
    lamina-ray status [--name NAME | --state FILE]
    lamina-ray down   [--name NAME | --state FILE]

Without ``--address`` (or ``$RAY_ADDRESS``), ``up`` starts a Ray head on this
machine bound to 127.0.0.1, and ``down`` stops it again. ``up`` prints
``HTTP http://HOST:PORT`` per model node, then ``READY {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from lamina_comm import progress_bar

EXIT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring a deployment up from a config file")
    up.add_argument("--config", required=True, metavar="FILE", help="deployment file (TOML, or .json)")
    up.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                    help="an existing Ray cluster (default $RAY_ADDRESS; none: start a head on 127.0.0.1)")
    for name in ("status", "down"):
        command = sub.add_parser(name, help=f"{name} of a deployment brought up here")
        command.add_argument("--name", default="lamina", help="the deployment's name (its config's `name`)")
    for command in sub.choices.values():
        command.add_argument("--state", type=Path, metavar="FILE",
                             help="state file (default ~/.cache/lamina-comm/ray-NAME.json)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from lamina_comm.deploy.config import ConfigError, load_config
    from lamina_comm.deploy.ray_cluster import DeploymentError, RayUnavailable, default_state_path

    try:
        if args.command == "up":
            config = load_config(args.config)
            return _up(config, args.address, args.state or default_state_path(config.name))
        state = args.state or default_state_path(args.name)
        if args.command == "status":
            from lamina_comm.deploy.ray_cluster import status
            print(json.dumps(status(state), indent=2))
            return 0
        from lamina_comm.deploy.ray_cluster import down
        summary = down(state)
        print(json.dumps(summary, indent=2, default=str))
        return EXIT_ERROR if summary.get("problems") else 0
    except (ConfigError, DeploymentError, RayUnavailable) as exc:
        print(f"lamina-ray: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _up(config, address: Optional[str], state_path: Path) -> int:  # noqa: ANN001 - DeploymentConfig, imported late
    from lamina_comm.deploy.ray_cluster import up

    stages = 4 if address else 5
    with progress_bar.bar(stages, desc="bringing up", unit="stage", delay=0.0) as shown:
        def stage(text: str) -> None:
            shown.set_postfix_str(text)
            shown.update(1)
            if shown.disable:
                print(f"lamina-ray: {text}", file=sys.stderr, flush=True)
        state = up(config, address=address, state_path=state_path, progress=stage)
    for http in state.http:
        print(f"HTTP http://{http}")
    print("READY " + json.dumps({"name": state.name, "http": state.http, "ray": state.address,
                                 "state": str(state_path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
