"""``lamina-node``: run a model node or an attention node, or print a cluster's status.

    lamina-node --role attention --listen 127.0.0.1:7001 [--blocks 2048 --block-size 16]
    lamina-node --role model --attention 127.0.0.1:7001,127.0.0.1:7002 --http 127.0.0.1:8000 \\
                --config tiny [--spare 127.0.0.1:7003] [--microbatches 2]
    lamina-node status --http 127.0.0.1:8000

Once serving, a node prints one line ``READY {json}`` on stdout (the bound
addresses, useful with port 0); logs go to stderr. Configuration errors exit
with status 2 and a message naming the cause. SIGINT/SIGTERM stop cleanly.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

EXIT_CONFIG = 2
log = logging.getLogger("lamina_comm.node")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "status":
        return status_main(args[1:])
    return node_main(args)


# ------------------------------------------------------------------ arguments


def _node_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamina-node", description="Model-attention disaggregated decoding node (Lamina).",
        epilog="`lamina-node status --http HOST:PORT` prints a running cluster.")
    parser.add_argument("--role", choices=("model", "attention"), required=True)
    model_source = parser.add_mutually_exclusive_group()
    model_source.add_argument("--model", metavar="DIR", help="HF checkpoint directory (attention: config.json only)")
    model_source.add_argument("--config", metavar="tiny|FILE",
                              help="'tiny' or an HF config.json; the model node then uses random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights with --config")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--secret", help="shared secret for the handshake (default: $LAMINA_SECRET)")
    parser.add_argument("--transport", choices=("auto", "tcp", "verbs", "shm"), default="auto",
                        help="auto: shm between processes of one host, else verbs, else tcp")
    parser.add_argument("--progress", choices=("event", "poll"), default=None,
                        help="event: waiting threads sleep in epoll (default, or $LAMINA_PROGRESS); "
                             "poll: they busy-poll and never sleep (a core per node)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    model = parser.add_argument_group("model role")
    model.add_argument("--attention", metavar="HOST:PORT,...", help="attention workers, in head-share order")
    model.add_argument("--spare", metavar="HOST:PORT,...", default="", help="standby attention workers")
    model.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8000", help="front door address")
    model.add_argument("--name", help="this model node's name among replicas sharing the attention workers "
                                      "(their logs, refusals and status; default: its address)")
    model.add_argument("--microbatches", type=int, default=2, help="ping-pong micro-batches per step")
    model.add_argument("--max-step-tokens", type=int, default=2048, help="token budget of one micro-batch")
    model.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429")
    model.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach each worker")
    model.add_argument("--peer-timeout", type=float, default=10.0,
                       help="model: seconds to wait for a worker's reply; attention: silence after which "
                            "a newly connecting model node takes over the session")
    model.add_argument("--rebuild-timeout", type=float, default=30.0,
                       help="seconds held requests wait for a replacement worker")
    model.add_argument("--stall-timeout", type=float, default=60.0,
                       help="seconds with work pending and no progress before /healthz says 503")
    model.add_argument("--http-backlog", type=int, default=None,
                       help="front door listen backlog (default 1024, capped by net.core.somaxconn)")

    attention = parser.add_argument_group("attention role")
    attention.add_argument("--listen", metavar="HOST:PORT", help="address to accept the model node on")
    attention.add_argument("--blocks", type=int, default=2048, help="KV cache blocks")
    attention.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    attention.add_argument("--attention-kernel", choices=("auto", "exact", "sdpa"), default="auto",
                           help="attention kernel: exact (float32, bit-identical across head splits), sdpa "
                                "(torch's fused scaled_dot_product_attention in the cache dtype); auto: sdpa on "
                                "CUDA, exact elsewhere")
    attention.add_argument("--max-model-nodes", type=int, default=4,
                           help="model nodes (replicas) served at once, sharing the KV blocks; one more is "
                                "refused busy")
    attention.add_argument("--join", metavar="HOST:PORT,...", default="",
                           help="model nodes' front doors to join at run time (as a spare; left on exit)")
    attention.add_argument("--advertise", metavar="HOST:PORT",
                           help="the address model nodes reach this node on (default: the --listen address)")
    # Fault injection for tests: die abruptly after serving N data messages.
    attention.add_argument("--exit-after-messages", type=int, help=argparse.SUPPRESS)
    return parser


def _addresses(text: Optional[str]) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _split_host_port(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{option} must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


# ------------------------------------------------------------------ model source


def served_model_name(args: argparse.Namespace) -> str:
    """The model's name on the OpenAI endpoints: the checkpoint directory's or config file's name, or "tiny"."""
    source = args.model or args.config or "lamina"
    return os.path.basename(os.path.normpath(source)).removesuffix(".json") or "lamina"


def load_text(args: argparse.Namespace) -> Optional[Any]:
    """The checkpoint's tokenizer (text prompts, chat) when --model DIR has tokenizer.json, else None."""
    if not args.model:
        return None
    try:
        from lamina_comm.node.text import TextCodec
        return TextCodec.from_dir(args.model)
    except ImportError as exc:
        log.warning("%s has a tokenizer, but text needs the 'text' extra (pip install lamina-comm[text]): %s",
                    args.model, exc)
        return None


def load_config(args: argparse.Namespace) -> Optional[Any]:
    """The LlamaConfig named by --model / --config, or None when neither is given."""
    from lamina_comm.model import LlamaConfig

    if args.model:
        return LlamaConfig.from_dir(args.model)
    if args.config is None:
        return None
    if args.config == "tiny":
        return LlamaConfig.tiny()
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"--config must be 'tiny' or a config.json file; {args.config!r} is neither")
    return LlamaConfig.from_hf_dict(json.loads(path.read_text()))


def load_weights(args: argparse.Namespace, config: Any) -> Any:
    from lamina_comm.model import LlamaWeights

    if args.model:
        return LlamaWeights.load(args.model, device="cpu", config=config)
    return LlamaWeights.random(config, seed=args.seed)


# ------------------------------------------------------------------ running


def node_main(argv: Sequence[str]) -> int:
    parser = _node_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    stop = _stop_on_signals()
    try:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        if args.role == "attention":
            return _run_attention(args, stop)
        return _run_model(args, stop)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"lamina-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - startup failures: one clear line, not a traceback
        from lamina_comm.errors import LaminaError
        if isinstance(exc, (LaminaError, OSError)):
            print(f"lamina-node: cannot start: {type(exc).__name__.rstrip('_')}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        raise


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _ready(**fields: Any) -> None:
    print("READY " + json.dumps(fields), flush=True)


def _run_attention(args: argparse.Namespace, stop: threading.Event) -> int:
    if not args.listen:
        raise ValueError("--role attention needs --listen HOST:PORT")
    _split_host_port(args.listen, "--listen")
    from lamina_comm.node.attention_node import AttentionOptions, AttentionServer
    from lamina_comm.node.membership import Announcer, parse_address

    options = AttentionOptions(
        listen=args.listen, num_blocks=args.blocks, block_size=args.block_size, device=args.device,
        attention=args.attention_kernel, config=load_config(args), secret=args.secret, transport=args.transport,
        progress=args.progress, peer_timeout=args.peer_timeout, max_model_nodes=args.max_model_nodes,
        exit_after_messages=args.exit_after_messages)
    join = _addresses(args.join)
    for http in join:
        _split_host_port(http, "--join")
    server = AttentionServer(options)
    announcer = None
    try:
        host, port = server.address
        advertised = args.advertise or f"{host}:{port}"
        if join:
            if not args.advertise and host in ("0.0.0.0", "::"):
                raise ValueError("--join with a wildcard --listen needs --advertise HOST:PORT")
            announcer = Announcer(join, parse_address(advertised), secret=args.secret)
            announcer.start()
        _ready(role="attention", address=advertised, pid=os.getpid(), blocks=args.blocks,
               block_size=args.block_size)
        server.serve_forever(stop)
    finally:
        if announcer is not None:
            announcer.leave()
        server.close()
    log.info("attention node stopped")
    return 0


def _run_model(args: argparse.Namespace, stop: threading.Event) -> int:
    attention = _addresses(args.attention)
    if not attention:
        raise ValueError("--role model needs --attention HOST:PORT[,HOST:PORT...]")
    from lamina_comm.node.http_api import FrontDoor
    from lamina_comm.node.model_node import ModelNode
    from lamina_comm.node.options import ModelNodeOptions

    config = load_config(args)
    if config is None:
        raise ValueError("--role model needs --model DIR or --config tiny|FILE")
    options = ModelNodeOptions(
        attention=attention, spares=_addresses(args.spare), microbatches=args.microbatches,
        max_step_tokens=args.max_step_tokens, max_queue=args.max_queue, device=args.device,
        secret=args.secret, transport=args.transport, progress=args.progress,
        connect_timeout=args.connect_timeout,
        peer_timeout=args.peer_timeout, rebuild_timeout=args.rebuild_timeout,
        stall_timeout=args.stall_timeout, name=args.name)
    options.validate(config)  # before loading weights: fail fast on a bad worker count
    http_address = _split_host_port(args.http, "--http")
    node = ModelNode(config, load_weights(args, config), options)
    node.connect()
    try:
        backlog = {} if args.http_backlog is None else {"listen_backlog": args.http_backlog}
        front = FrontDoor(node, http_address, model_name=served_model_name(args), text=load_text(args),
                          **backlog)
    except BaseException:
        node.close()
        raise
    node.start()
    front.start()
    host, port = front.address
    _ready(role="model", http=f"{host}:{port}", attention=list(attention), pid=os.getpid(),
           fingerprint=config.fingerprint())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.close()  # open requests get their answer (or "shutting down") before the door closes
        front.close()
    log.info("model node stopped")
    return 0


# ------------------------------------------------------------------ status


def status_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lamina-node status", description="Print a running cluster.")
    parser.add_argument("--http", metavar="HOST:PORT,...", required=True,
                        help="the model nodes' front doors (every replica of the cluster)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON (a list with several --http)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    statuses: list[tuple[str, dict[str, Any]]] = []
    failed = False
    for http in _addresses(args.http):
        url = f"http://{http}/status"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:
                statuses.append((http, json.loads(response.read())))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"lamina-node status: cannot read {url}: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        documents = [status for _, status in statuses]
        print(json.dumps(documents[0] if len(documents) == 1 and not failed else documents, indent=2))
    elif statuses:
        print("\n\n".join([*(format_status(status, http) for http, status in statuses),
                            *([format_pool(statuses)] if len(statuses) > 1 else [])]))
    return EXIT_CONFIG if failed else 0


def format_status(status: dict[str, Any], http: str) -> str:
    model = status["model"]
    efficiency = status.get("overlap_efficiency")
    name = f"  ({status['name']})" if status.get("name") else ""
    lines = [
        f"model node  http://{http}{name}  {'healthy' if status['healthy'] else 'DEGRADED'}",
        f"  model {model['fingerprint']} {model['architecture']}: {model['layers']} layers, {model['heads']} heads "
        f"/ {model['kv_heads']} KV heads x {model['head_dim']}, vocab {model['vocab_size']}, {model['dtype']} "
        f"on {model['device']}",
        f"  micro-batches {status['microbatches']} (budget {status['max_step_tokens']} tokens), "
        f"queued {status['queued']}, running {status['running']}, held {status['held']}, steps {status['steps']}, "
        f"overlap efficiency {'-' if efficiency is None else f'{efficiency:.2f}'}",
        "attention workers:",
    ]
    for worker in status["workers"]:
        kv, q = worker["kv_heads"], worker["q_heads"]
        line = (f"  #{worker['index']} {worker['address']:<21} {worker['state']:<4}  KV heads [{kv[0]}, {kv[1]})  "
                f"q heads [{q[0]}, {q[1]})")
        if worker["state"] == "up":
            line += (f"  KV blocks {worker['blocks_used']}/{worker['blocks_total']} (x{worker['block_size']} tokens"
                     f", {worker.get('blocks_held', worker['blocks_used'])} ours)  pid {worker['pid']} "
                     f"{worker['device']}")
        else:
            line += f"  error: {worker.get('error', '?')}"
        lines.append(line)
    lines.append(f"spares: {', '.join(status['spares']) or 'none'}")
    return "\n".join(lines)


def format_pool(statuses: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Every worker once, with the replicas it serves (as its latest answer to any of them said)."""
    workers: dict[str, dict[str, Any]] = {}
    for _, status in statuses:
        for worker in status["workers"]:
            if worker["state"] == "up":
                workers.setdefault(worker["address"], worker)
    lines = [f"attention pool: {len(workers)} workers shared by {len(statuses)} model nodes"]
    for address, worker in sorted(workers.items()):
        replicas = ", ".join(f"{r.get('name')} {r.get('blocks_held')} blocks/{r.get('requests')} requests"
                             for r in worker.get("replicas", []))
        lines.append(f"  {address:<21} KV heads [{worker['kv_heads'][0]}, {worker['kv_heads'][1]})  KV blocks "
                     f"{worker['blocks_used']}/{worker['blocks_total']}  replicas: {replicas or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
