"""The vLLM AFD connector contract (lamina_comm.engine.afd), both roles in separate processes.

Each process does what the AFD plugin's runner does: build the connector
from (rank, local_rank, vllm_config, afd_config, role_rank) with duck-typed
config objects, init_afd_connector(), then per layer and micro-batch the
attention ranks send their hidden states and receive the FFN output into
a ref tensor, and the FFN rank receives its attention ranks' rows, runs
its "FFN" and scatters the output back by seq_lens.
"""
from __future__ import annotations

import multiprocessing
import socket
import traceback
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from lamina_comm.engine.afd import LaminaAFDConnector  # noqa: E402

HIDDEN, LAYERS, UBATCHES = 64, 3, 2
EXTRA = {"hidden_size": HIDDEN, "max_num_tokens": 16, "dtype": "float32", "num_ubatches": UBATCHES,
         "transport": "tcp", "timeout_s": 60}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def configs(role: str, port: int, attention_ranks: int, ffn_ranks: int, extra: Any = EXTRA) -> tuple[Any, Any]:
    vllm_config = SimpleNamespace(additional_config={"afd": {"connector_extra_config": extra}})
    afd_config = SimpleNamespace(role=role, host="127.0.0.1", port=port, num_attention_ranks=attention_ranks,
                                 num_ffn_ranks=ffn_ranks)
    return vllm_config, afd_config


def rows_of(rank: int, layer: int, ubatch: int) -> Any:
    generator = torch.Generator().manual_seed(1000 * rank + 10 * layer + ubatch)
    return torch.randn(3 + rank, HIDDEN, generator=generator)  # every rank its own row count


def ffn(hidden: Any, layer: int) -> Any:
    return hidden * 2 + layer


class Context:  # the plugin's AFDTransferContext, duck-typed
    def __init__(self, layer: int, ubatch: int, rows: int):
        self.metadata = SimpleNamespace(layer_idx=layer, stage_idx=ubatch, seq_lens=[rows])
        self.states: dict = {}


def attention_rank(role_rank: int, port: int, ranks: tuple[int, int], result: Any) -> None:
    try:
        connector = LaminaAFDConnector(role_rank, role_rank, *configs("attention", port, *ranks), role_rank)
        assert not connector.is_initialized
        connector.init_afd_connector()
        for layer in range(LAYERS):
            for ubatch in range(UBATCHES):  # both micro-batches out, then both back: ping-pong
                hidden = rows_of(role_rank, layer, ubatch)
                connector.send_attn_output(hidden, Context(layer, ubatch, hidden.shape[0]))
            for ubatch in range(UBATCHES):
                ref = torch.empty(3 + role_rank, HIDDEN)
                got = connector.recv_ffn_output(ref, ubatch_idx=ubatch)
                assert got is ref and torch.equal(ref, ffn(rows_of(role_rank, layer, ubatch), layer)), \
                    f"rank {role_rank} layer {layer} ubatch {ubatch}"
        connector.close()
        result.put(("ok", role_rank))
    except BaseException:  # noqa: BLE001 - reported by the test
        result.put(("error", traceback.format_exc()))


def ffn_rank(role_rank: int, port: int, ranks: tuple[int, int], result: Any) -> None:
    try:
        connector = LaminaAFDConnector(100 + role_rank, role_rank, *configs("ffn", port, *ranks), role_rank)
        connector.init_afd_connector()
        mine = [a for a in range(ranks[0]) if a % ranks[1] == role_rank]
        for layer in range(LAYERS):
            for ubatch in range(UBATCHES):
                received = connector.recv_attn_output(ubatch_idx=ubatch)
                expected = torch.cat([rows_of(a, layer, ubatch) for a in mine])
                assert torch.equal(received.hidden_states, expected), f"ffn layer {layer} ubatch {ubatch}"
                assert received.router_logits is None
                meta = received.context.metadata
                assert (meta.layer_idx, meta.stage_idx, meta.seq_lens) == (layer, ubatch, [3 + a for a in mine])
                connector.send_ffn_output(ffn(received.hidden_states, layer), received.context)
        connector.close()
        result.put(("ok", f"ffn {role_rank}"))
    except BaseException:  # noqa: BLE001
        result.put(("error", traceback.format_exc()))


@pytest.mark.parametrize("ranks", [(2, 1), (3, 2)])
def test_both_roles_in_separate_processes_exchange_every_layer_and_micro_batch(ranks: tuple[int, int]) -> None:
    mp = multiprocessing.get_context("spawn")
    result = mp.Queue()
    port = free_port()
    processes = [mp.Process(target=ffn_rank, args=(f, port, ranks, result)) for f in range(ranks[1])]
    processes += [mp.Process(target=attention_rank, args=(a, port, ranks, result)) for a in range(ranks[0])]
    for process in processes:
        process.start()
    try:
        outcomes = [result.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    errors = [text for kind, text in outcomes if kind == "error"]
    assert not errors, errors[0]


def test_calls_before_init_and_bad_shapes_are_refused() -> None:
    connector = LaminaAFDConnector(0, 0, *configs("attention", free_port(), 1, 1), 0)
    with pytest.raises(RuntimeError, match="before init_afd_connector"):
        connector.send_attn_output(torch.zeros(2, HIDDEN), Context(0, 0, 2))
    with pytest.raises(RuntimeError, match="before init_afd_connector"):
        connector.recv_ffn_output(torch.zeros(2, HIDDEN))
    connector._initialized = True  # as if initialised: the checks before any transfer
    with pytest.raises(RuntimeError, match="for ffn ranks"):
        connector.recv_attn_output()
    with pytest.raises(ValueError, match=r"must be \[tokens, 64\]"):
        connector.send_attn_output(torch.zeros(2, HIDDEN + 1), Context(0, 0, 2))
    with pytest.raises(ValueError, match="over max_num_tokens"):
        connector.send_attn_output(torch.zeros(17, HIDDEN), Context(0, 0, 17))
    with pytest.raises(ValueError, match="ubatch 2"):
        connector.send_attn_output(torch.zeros(2, HIDDEN), Context(0, 2, 2))
    connector._initialized = False


@pytest.mark.parametrize("raw, match", [
    ('{"hidden_size": 8, "colour": 1}', "unknown option"), ({"max_num_tokens": 4}, "needs hidden_size"),
    ({"hidden_size": "x"}, "not of type int"), ({"hidden_size": 8, "dtype": "complex7"}, "not a supported dtype"),
    ({"hidden_size": 0}, "must be >= 1"), ("{", "not JSON"), ([1], "must be a mapping")])
def test_bad_extra_configs_are_refused(raw: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaminaAFDConnector.parse_extra_config(raw)


def test_extra_config_from_a_mapping_a_json_text_or_a_plain_vllm_config() -> None:
    assert LaminaAFDConnector.parse_extra_config('{"hidden_size": 8}').hidden_size == 8
    plain = {"additional_config": {"afd": {"connector_extra_config": {"hidden_size": 16, "num_ubatches": 3}}}}
    afd_config = SimpleNamespace(role="ffn", host="127.0.0.1", port=1, num_attention_ranks=1, num_ffn_ranks=1)
    connector = LaminaAFDConnector(0, 0, plain, afd_config, 0)
    assert (connector.config.hidden_size, connector.config.num_ubatches) == (16, 3)
    with pytest.raises(ValueError, match="needs hidden_size"):
        LaminaAFDConnector(0, 0, None, afd_config, 0)
    with pytest.raises(ValueError, match="role_rank 1"):
        LaminaAFDConnector(0, 0, plain, afd_config, 1)
