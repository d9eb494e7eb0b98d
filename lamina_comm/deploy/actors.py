"""The Ray actors of a deployment: each wraps one ``lamina-node`` role, in-process.

Plain classes (``ray.remote`` is applied by the supervisor), so that this
module imports without Ray. Each actor is threaded (``max_concurrency``):
``serve()`` blocks for the actor's life and its reference is what the
supervisor watches (it fails with ``RayActorError`` when the actor dies);
``stop()`` ends it.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any, Optional

from lamina_comm.deploy.config import DeploymentConfig, ModelSection

log = logging.getLogger("lamina_comm.deploy")


def _model_source(section: ModelSection) -> argparse.Namespace:
    """The ``lamina-node`` flags that name the model, for cli's loaders."""
    return argparse.Namespace(model=section.checkpoint, config=section.config, seed=section.seed)


def _bind_host(config: DeploymentConfig) -> str:
    if config.network.host != "node":
        return config.network.host
    import ray
    return ray.util.get_node_ip_address()


def cluster_secret(config: DeploymentConfig) -> Optional[str]:
    """The cluster's secret: `lamina-ray up` puts it in the supervisor's runtime_env, which every actor
    inherits."""
    return os.environ.get(config.network.secret_env) if config.network.secret_env else None


def _set_up_process(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch
    torch.set_num_threads(threads)


class AttentionActor:
    """An attention worker (``lamina-node --role attention``) on a port of its own.

    ``join``: the model nodes' front doors to announce this worker to, as a
    spare (a replacement started after a loss does this).
    """

    def __init__(self, deployment: dict[str, Any], join: list[str]):
        from lamina_comm.node.attention_node import AttentionOptions, AttentionServer
        from lamina_comm.node.cli import load_config
        from lamina_comm.node.membership import Announcer

        config = DeploymentConfig.model_validate(deployment)
        _set_up_process(config.attention.threads)
        host = _bind_host(config)
        secret = cluster_secret(config)
        self._server = AttentionServer(AttentionOptions(
            listen=f"{host}:0", num_blocks=config.attention.blocks, block_size=config.attention.block_size,
            config=load_config(_model_source(config.model)), secret=secret, transport=config.network.transport,
            peer_timeout=config.model.peer_timeout))
        self.address = f"{host}:{self._server.address[1]}"
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._announcer: Optional[Announcer] = None
        if join:
            self._announcer = Announcer(join, self.address, secret=secret)
            self._announcer.start()
        log.info("attention actor at %s (pid %d)", self.address, os.getpid())

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "pid": os.getpid()}

    def serve(self) -> str:
        """Serve until ``stop()``; returns why it ended."""
        try:
            self._server.serve_forever(self._stop)
        finally:
            if self._announcer is not None:
                self._announcer.stop()
            self._server.close()
            self._stopped.set()
        return "stopped"

    def stop(self, timeout: float = 10.0) -> None:
        """End ``serve()`` (its sessions closed, the listener too) and wait for it, bounded."""
        self._stop.set()
        self._stopped.wait(timeout)


class ModelActor:
    """A model node and its front door (``lamina-node --role model``)."""

    def __init__(self, deployment: dict[str, Any], index: int, attention: list[str], spares: list[str]):
        from lamina_comm.node.cli import load_config, load_text, load_weights, served_model_name
        from lamina_comm.node.http_api import FrontDoor
        from lamina_comm.node.model_node import ModelNode
        from lamina_comm.node.options import ModelNodeOptions

        config = DeploymentConfig.model_validate(deployment)
        section = config.model
        _set_up_process(section.threads)
        source = _model_source(section)
        model_config = load_config(source)
        options = ModelNodeOptions(
            attention=tuple(attention), spares=tuple(spares), microbatches=section.microbatches,
            max_step_tokens=section.max_step_tokens, max_queue=section.max_queue, secret=cluster_secret(config),
            transport=config.network.transport, peer_timeout=section.peer_timeout,
            rebuild_timeout=section.rebuild_timeout, name=f"{config.name}-model-{index}")
        options.validate(model_config)
        host = _bind_host(config)
        port = section.http_port + index if section.http_port else 0
        self._node = ModelNode(model_config, load_weights(source, model_config), options)
        self._node.connect()
        try:
            self._front = FrontDoor(self._node, (host, port), model_name=served_model_name(source),
                                    text=load_text(source))
        except BaseException:
            self._node.close()
            raise
        self._node.start()
        self._front.start()
        self.http = f"{host}:{self._front.address[1]}"
        self._stop = threading.Event()
        self._closed = threading.Lock()
        log.info("model node %d serving http://%s (pid %d)", index, self.http, os.getpid())

    def describe(self) -> dict[str, Any]:
        return {"http": self.http, "pid": os.getpid()}

    def serve(self) -> str:
        self._stop.wait()
        return "stopped"

    def stop(self) -> None:
        """Answer open requests ("shutting down"), then close the door; idempotent."""
        with self._closed:
            if self._stop.is_set():
                return
            self._node.close()
            self._front.close()
            self._stop.set()
