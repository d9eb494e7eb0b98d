"""Fixtures shared by the node tests."""
from __future__ import annotations

import signal
from typing import Iterator

import pytest
import torch

from lamina_comm.node.demo import NodeProcess
from lamina_comm.node.http_api import FrontDoor
from lamina_comm.node.model_node import ModelNode

HTTP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module whose tests start node processes that share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def processes() -> Iterator[list[NodeProcess]]:
    """Node processes of one test; all are killed at the end (a stopped one too)."""
    started: list[NodeProcess] = []
    yield started
    for process in started:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGCONT)
        process.close()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, ModelNode]]:
    """A model node with its front door (model "tiny") and two attention processes, for a test module."""
    from tests.node.test_disaggregated import address, attention_nodes, make_node

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = attention_nodes(2, "--config", "tiny", "--blocks", "160")
    node = make_node([address(w) for w in workers])
    node.start()
    front = FrontDoor(node, ("127.0.0.1", 0), request_timeout=HTTP_TIMEOUT, model_name="tiny")
    front.start()
    host, port = front.address
    yield f"{host}:{port}", node
    node.close()
    front.close()
    for worker in workers:
        assert worker.stop() == 0, worker.log()
        worker.close()
    torch.set_num_threads(threads)
