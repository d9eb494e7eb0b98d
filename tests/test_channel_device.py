"""Stream-ordered channel sends and receives (lamina_comm/channel/device.py, lamina.h "deferred").

The native deferred operations are driven directly with host memory; the whole
device path (copy engine, host functions, page-locked ring) runs against the mock
libcuda (tests/mock_libcuda.c: "device" memory is host memory), with its host
functions on a thread of their own, as the driver runs them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm._bindings import ffi, lib

from .conftest import ROOT
from .mock_cuda import build_mock_libcuda
from .test_channel import WAIT_S, open_pair


def _prepare_send(channel, microbatch: int, fill: int, layer: int = 0):
    """A deferred send of one uint8 tensor filling the slot's first 64 bytes with `fill`."""
    payload = channel.send_slot(microbatch, WAIT_S)
    payload[:64] = fill
    vec = ffi.new("lm_chan_tensor_t[]", 1)
    vec[0].addr, vec[0].nbytes, vec[0].dtype, vec[0].ndim = payload.ctypes.data, 64, lib.LM_DTYPE_UINT8, 1
    vec[0].shape[0] = 64
    seq, op = ffi.new("uint64_t *"), ffi.new("lm_chan_deferred_t **")
    assert lib.lm_chan_send_prepare(channel._handle(), layer, microbatch, vec, 1, 1000, seq, op) == 0
    return int(seq[0]), op[0]


def test_a_prepared_send_goes_out_when_run_and_holds_back_later_sends(contexts):
    model, attention = open_pair(*contexts)
    try:
        seq, op = _prepare_send(model, 0, 7, layer=3)
        assert lib.lm_chan_unposted(model._handle(), 0) == 1
        with pytest.raises(TimeoutError):
            attention.recv(0, timeout=0.2)  # prepared, not posted
        # An immediate send on the same micro-batch would overtake it: it waits, here until its timeout.
        with pytest.raises(TimeoutError, match="stream-ordered send prepared earlier"):
            model.send(np.ones(8, np.uint8), layer=4, microbatch=0, timeout=0.2)
        model.send(np.full(8, 5, np.uint8), layer=9, microbatch=1, timeout=WAIT_S)  # other micro-batches go on
        lib.lm_chan_run_deferred(op)
        assert lib.lm_chan_unposted(model._handle(), 0) == 0
        with attention.recv(0, timeout=WAIT_S) as got:
            assert (got.layer, got.seq) == (3, seq) and got.tensors[0].dtype_name == "uint8"
            assert (got.tensors[0] == 7).all() and got.tensors[0].shape == (64,)
        model.send(np.ones(8, np.uint8), layer=4, microbatch=0, timeout=WAIT_S)
        with attention.recv(0, timeout=WAIT_S) as got:
            assert (got.layer, got.seq) == (4, seq + 1)
        with attention.recv(1, timeout=WAIT_S) as got:
            assert got.layer == 9 and (got.tensors[0] == 5).all()
        assert model.metrics.slot_messages == 1 and model.metrics.messages == 3  # the prepared one from its slot
    finally:
        model.close()
        attention.close()


@pytest.mark.parametrize("how", ["posted", "closed"])
def test_an_immediate_send_waiting_for_a_prepared_one_is_woken(contexts, how):
    """An immediate send blocked behind a prepared (stream-ordered) send of its micro-batch goes on once
    that one posts, or raises once the channel closes; it never waits out its own timeout."""
    import threading
    model, attention = open_pair(*contexts)
    seq, op = _prepare_send(model, 0, 7)
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["seq"] = model.send(np.ones(8, np.uint8), layer=4, microbatch=0, timeout=60)
        except lc.LaminaError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=send)
    try:
        sender.start()
        sender.join(0.3)
        assert sender.is_alive(), "the immediate send must wait for the prepared one"
        if how == "posted":
            lib.lm_chan_run_deferred(op)
        else:
            model.close()
        sender.join(30)
        assert not sender.is_alive()
        if how == "posted":
            assert outcome.get("seq") == seq + 1, outcome
            with attention.recv(0, timeout=WAIT_S) as got:
                assert got.seq == seq
        else:
            assert isinstance(outcome.get("error"), lc.ClosedError), outcome
            lib.lm_chan_run_deferred(op)  # (after close: frees itself, posts nothing)
    finally:
        model.close()
        attention.close()


def test_a_prepared_release_returns_the_credit_when_run(contexts):
    model, attention = open_pair(*contexts)  # two slots per micro-batch
    try:
        for value in (1, 2):
            model.send(np.full(8, value, np.uint8), layer=0, microbatch=0, timeout=WAIT_S)
        first = attention.recv(0, timeout=WAIT_S)
        op = ffi.new("lm_chan_deferred_t **")
        assert lib.lm_chan_release_prepare(attention._handle(), 0, first.slot, first.seq, op) == 0
        with pytest.raises(TimeoutError):
            model.send(np.full(8, 3, np.uint8), layer=0, microbatch=0, timeout=0.2)  # both slots held
        lib.lm_chan_run_deferred(op[0])
        model.send(np.full(8, 3, np.uint8), layer=0, microbatch=0, timeout=WAIT_S)
        attention.recv(0, timeout=WAIT_S).release()
        with attention.recv(0, timeout=WAIT_S) as third:
            assert (third.tensors[0] == 3).all()
    finally:
        model.close()
        attention.close()


def test_a_prepared_op_run_after_close_does_nothing(contexts):
    model, attention = open_pair(*contexts)
    _, op = _prepare_send(model, 1, 9)
    handle = model._ch
    model.close()  # the native channel is closed; freeing it waits for the op
    lib.lm_chan_run_deferred(op)  # a stream that finishes late: nothing is posted, nothing touched
    assert lib.lm_chan_unposted(handle, 1) == 0
    with pytest.raises((TimeoutError, lc.PeerLostError)):  # nothing arrives; the peer is gone
        attention.recv(1, timeout=0.2)
    attention.close()


def _prepare_send_from(channel, tensors, regions, layer: int = 0, microbatch: int = 0):
    """lm_chan_send_prepare_from of numpy views lying in registered host regions: (status, seq, op)."""
    from lamina_comm.channel.core import _fill_tensors
    from lamina_comm.channel.views import _describe
    vec = ffi.new("lm_chan_tensor_t[]", len(tensors))
    _fill_tensors(vec, 0, [_describe(t) for t in tensors])
    sources = ffi.new("lm_mr_t *[]", [r._handle() for r in regions])
    seq, op = ffi.new("uint64_t *"), ffi.new("lm_chan_deferred_t **")
    rc = lib.lm_chan_send_prepare_from(channel._handle(), layer, microbatch, vec, len(tensors), sources, 1000, seq, op)
    return rc, int(seq[0]), op[0]


@pytest.mark.parametrize("row_bytes", [16, 96])
def test_a_prepared_send_from_regions_posts_gather_writes_when_run(contexts, row_bytes):
    """What a GPUDirect send does (the regions here are host memory): nothing is read when it is prepared,
    the NIC reads the rows where they lie when it runs, however short they are (device memory is never
    copied by the CPU, so nothing is staged)."""
    a, b = contexts
    model, attention = open_pair(a, b)
    fused = np.zeros((4, 3 * row_bytes), np.uint8)  # q | k | v columns, as a fused projection leaves them
    other = np.zeros(64, np.uint8)
    try:
        regions = [a.register(fused), a.register(other)]
        q, k, v = (fused[:, i * row_bytes:(i + 1) * row_bytes] for i in range(3))
        rc, seq, op = _prepare_send_from(model, [q, v, other], [regions[0], regions[0], regions[1]], layer=5)
        assert rc == 0
        fused[...] = np.arange(fused.size, dtype=np.uint64).reshape(fused.shape) % 251  # the "stream" writes now
        other[...] = 7
        with pytest.raises(TimeoutError):
            attention.recv(0, timeout=0.2)  # prepared, not posted
        lib.lm_chan_run_deferred(op)
        with attention.recv(0, timeout=WAIT_S) as got:
            assert (got.layer, got.seq) == (5, seq)
            assert np.array_equal(got.tensors[0], q) and np.array_equal(got.tensors[1], v)
            assert (got.tensors[2] == 7).all()
        del k
        model.flush(WAIT_S)
        metrics = model.metrics
        assert metrics.gather_messages == 1 and metrics.staged_bytes == 0 and metrics.slot_messages == 0
    finally:
        model.close()
        attention.close()


def test_a_send_from_regions_is_refused_when_a_tensor_lies_outside_its_region(contexts):
    a, b = contexts
    model, attention = open_pair(a, b)
    inside, outside = np.zeros(256, np.uint8), np.full(256, 3, np.uint8)
    try:
        region = a.register(inside)
        rc, _, _ = _prepare_send_from(model, [outside], [region])
        assert rc == lib.LM_ERR_INVALID
        assert "does not lie in its source region" in ffi.string(lib.lm_last_error()).decode()
        model.send(outside, layer=1, microbatch=0, timeout=WAIT_S)  # nothing was taken
        with attention.recv(0, timeout=WAIT_S) as got:
            assert got.seq == 0 and (got.tensors[0] == 3).all()
    finally:
        model.close()
        attention.close()


def test_a_prepared_send_from_regions_run_after_close_lets_its_regions_go(contexts):
    """The op holds its regions until it runs; run after close, it drops them without touching the
    closed channel's endpoint (under `make asan`, a use after free would show)."""
    a, b = contexts
    model, attention = open_pair(a, b)
    data = np.ones(4096, np.uint8)
    region = a.register(data)
    rc, _, op = _prepare_send_from(model, [data.reshape(64, 64)[:, :16]], [region])
    assert rc == 0
    model.close()
    region.close()  # deregistered while the op still holds it
    lib.lm_chan_run_deferred(op)
    attention.close()


MOCK_SCRIPT = r"""
import json, sys
import numpy as np
import lamina_comm as lc
from lamina_comm.gpu import cuda
from tests.mock_cuda import MockDeviceArray as DeviceArray
from tests.test_channel import open_pair, WAIT_S

out = {}
dev = cuda.get_device(0)
rng = np.random.default_rng(1)
transport, piggyback = sys.argv[2], sys.argv[3] == "piggyback"
with lc.Context(transport) as a, lc.Context(transport) as b:
    model, attention = open_pair(a, b, piggyback=piggyback)
    stream = 0x5157
    q, k = DeviceArray(dev, (4, 4, 16), "float16"), DeviceArray(dev, (4, 2, 16), "float16")
    q_out, k_out = DeviceArray(dev, (4, 4, 16), "float16"), DeviceArray(dev, (4, 2, 16), "float16")
    host_v = np.zeros((4, 2, 16), np.float16)
    ok, layers, seqs = [], [], []
    for i in range(60):
        mb = i % 2
        q.host[...] = rng.standard_normal(q.shape).astype(np.float16)
        k.host[...] = rng.standard_normal(k.shape).astype(np.float16)
        v = rng.standard_normal((4, 2, 16)).astype(np.float16)
        if i % 5 == 4:  # an immediate host send between stream-ordered ones, same micro-batch
            model.send([q.host.copy(), k.host.copy(), v], layer=i, microbatch=mb, timeout=WAIT_S)
        else:
            model.send([q, k, v], layer=i, microbatch=mb, stream=stream, timeout=WAIT_S)
        expect = (q.host.copy(), k.host.copy(), v)
        got = attention.recv_into([q_out, k_out, host_v], mb, stream=stream, timeout=WAIT_S)
        with dev.activate():
            dev.driver.call("cuStreamSynchronize", stream)  # the caller's wait, before it reads the data
        layers.append(got.layer)
        seqs.append(got.seq)
        ok.append(bool(np.array_equal(q_out.host, expect[0]) and np.array_equal(k_out.host, expect[1])
                       and np.array_equal(host_v, expect[2]) and got.released))
    out["ok"] = ok
    out["layers"] = layers
    out["seqs"] = seqs
    # A shape mismatch is refused with both shapes named.
    model.send([q], layer=99, microbatch=0, stream=stream, timeout=WAIT_S)
    try:
        attention.recv_into([k_out], 0, stream=stream, timeout=WAIT_S)
    except lc.InvalidArgumentError as exc:
        out["mismatch"] = str(exc)
    model.flush(WAIT_S)
    out["model"] = model.metrics.as_dict()
    out["hostfns"] = __import__("ctypes").CDLL(sys.argv[1]).mock_hostfns_run()
    # Deferred work still queued at close: close waits for the stream, then frees the channel.
    for mb in (0, 1):
        model.send([q], layer=100 + mb, microbatch=mb, stream=stream, timeout=WAIT_S)
    model.close()
    attention.close()
print(json.dumps(out))
"""


def run_mock(tmp_path, script: str, *args: str) -> dict:
    lib_path = build_mock_libcuda(tmp_path)
    if lib_path is None:
        pytest.skip("no gcc to build the mock driver")
    env = {**os.environ, "PYTHONPATH": ROOT, "LAMINA_LIBCUDA": lib_path, "MOCK_CUDA_HOSTFN_THREAD": "1"}
    env.pop("LAMINA_DISABLE_CUDA", None)
    run = subprocess.run([sys.executable, "-c", script, lib_path, *args], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("transport,credits", [("tcp", "writes"), ("shm", "writes"), ("tcp", "piggyback")])
def test_device_tensors_round_trip_stream_ordered_against_a_mock_driver(tmp_path, transport, credits):
    out = run_mock(tmp_path, MOCK_SCRIPT, transport, credits)
    assert out["ok"] == [True] * 60
    assert out["layers"] == list(range(60))
    assert out["seqs"] == [i // 2 for i in range(60)], "every micro-batch in sequence, none lost or reordered"
    assert "tensor 0 is float16[4, 4, 16], its destination float16[4, 2, 16]" in out["mismatch"]
    # Device tensors went through the slot by the copy engine (48 sends and the mismatched one); only the
    # 12 immediate host sends of unregistered numpy arrays were copied by the channel.
    assert out["model"]["slot_messages"] == 49 and out["model"]["staged_messages"] == 12, out["model"]
    # One host function per stream-ordered send and per device receive (60), none more.
    assert out["hostfns"] == 49 + 60, out["hostfns"]


def test_deferred_release_reaches_a_sender_waiting_on_piggybacked_credits(contexts):
    """The receiver sleeps in a receive while its stream hands the slots back: the credits must go out
    then (held for a piggyback, they would wait for a send that cannot come)."""
    import threading
    import time
    model, attention = open_pair(*contexts, piggyback=True)
    try:
        for value in (1, 2):
            model.send(np.full(8, value, np.uint8), layer=0, microbatch=0, timeout=WAIT_S)
        ops = []
        for _ in range(2):  # what recv_into(..., stream=s) does with each message
            message = attention.recv(0, timeout=WAIT_S)
            op = ffi.new("lm_chan_deferred_t **")
            assert lib.lm_chan_release_prepare(attention._handle(), 0, message.slot, message.seq, op) == 0
            message._channel = None
            ops.append(op[0])
        box: dict = {}

        def sender() -> None:
            try:
                box["seq"] = model.send(np.full(8, 3, np.uint8), layer=0, microbatch=0, timeout=5)
            except Exception as exc:  # re-raised below
                box["err"] = exc

        def stream() -> None:  # the copies finish while the receiver already waits
            time.sleep(0.3)
            for op in ops:
                lib.lm_chan_run_deferred(op)

        threads = [threading.Thread(target=sender), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        try:
            with attention.recv(0, timeout=5) as third:
                assert (third.tensors[0] == 3).all()
        finally:
            for t in threads:
                t.join()
        assert "err" not in box, box
    finally:
        model.close()
        attention.close()


def test_an_op_the_driver_never_runs_leaks_the_channel_instead_of_hanging():
    script = """
import gc
import lamina_comm as lc
from lamina_comm._bindings import ffi, lib
from tests.test_channel import open_pair, WAIT_S
with lc.Context("tcp") as a, lc.Context("tcp") as b:
    model, attention = open_pair(a, b)
    payload = model.send_slot(0, WAIT_S)
    vec = ffi.new("lm_chan_tensor_t[]", 1)
    vec[0].addr, vec[0].nbytes, vec[0].dtype, vec[0].ndim = payload.ctypes.data, 64, lib.LM_DTYPE_UINT8, 1
    vec[0].shape[0] = 64
    seq, op = ffi.new("uint64_t *"), ffi.new("lm_chan_deferred_t **")
    assert lib.lm_chan_send_prepare(model._handle(), 0, 0, vec, 1, 1000, seq, op) == 0
    model.close()
    attention.close()
del model
gc.collect()
print("destroyed")
"""
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0 and "destroyed" in run.stdout, run.stderr[-2000:]


MOCK_FAILURES = r"""
import json, os, sys
import numpy as np
import lamina_comm as lc
from lamina_comm.channel import ChannelGroup
from lamina_comm.gpu import cuda
from tests.mock_cuda import MockDeviceArray
from tests.test_channel import open_pair, WAIT_S

out = {}
dev = cuda.get_device(0)
x = MockDeviceArray(dev, (64,))
x.host[:] = 5
with lc.Context("tcp") as a, lc.Context("tcp") as b:
    model, attention = open_pair(a, b)
    # The driver refuses the host function: the stream is idle, so the post happens here, once.
    os.environ["MOCK_CUDA_HOSTFN_FAIL"] = "1"
    seq = model.send([x], layer=1, microbatch=0, stream=7)
    del os.environ["MOCK_CUDA_HOSTFN_FAIL"]
    with attention.recv(0, timeout=WAIT_S) as got:
        out["inline"] = [seq, got.layer, got.seq, int(got.tensors[0][0])]
    # Capture is refused before anything is taken.
    os.environ["MOCK_CUDA_CAPTURING"] = "1"
    try:
        model.send([x], layer=2, microbatch=0, stream=7)
    except lc.UnsupportedError as exc:
        out["capture"] = str(exc)
    del os.environ["MOCK_CUDA_CAPTURING"]
    # A group of channels takes CUDA tensors too (each channel's own stream-ordered send).
    model2, attention2 = open_pair(a, b)
    seqs = ChannelGroup([model, model2]).send([[x], [np.zeros(4, np.float32)]], layer=3, microbatch=1)
    with attention.recv(1, timeout=WAIT_S) as g1, attention2.recv(1, timeout=WAIT_S) as g2:
        out["group"] = [seqs, int(g1.tensors[0][0]), g2.tensors[0].dtype_name]
    # A failed stream: the host function cannot be queued and the stream reports the failure: the op is
    # canceled (nothing stale posted), the send raises, and the channel is failed for what follows.
    os.environ["MOCK_CUDA_HOSTFN_FAIL"] = "1"
    os.environ["MOCK_CUDA_SYNC_FAIL"] = "1"
    try:
        model.send([x], layer=4, microbatch=0, stream=7)
    except cuda.CudaError as exc:
        out["failed_stream"] = exc.name
    del os.environ["MOCK_CUDA_HOSTFN_FAIL"], os.environ["MOCK_CUDA_SYNC_FAIL"]
    try:
        model.send([np.zeros(4, np.uint8)], layer=5, microbatch=1, timeout=1)
    except lc.LaminaError as exc:
        out["after"] = type(exc).__name__ + ": " + str(exc)
    for ch in (model, attention, model2, attention2):
        ch.close()
print(json.dumps(out))
"""


def test_device_path_failures_against_a_mock_driver(tmp_path):
    out = run_mock(tmp_path, MOCK_FAILURES)
    assert out["inline"] == [0, 1, 0, 5], "posted once, from the caller, with the copied data"
    assert "cannot be captured into a CUDA graph" in out["capture"]
    assert out["group"] == [[0, 0], 5, "float32"]
    assert out["failed_stream"] == "CUDA_ERROR_UNKNOWN" or out["failed_stream"].startswith("CUDA_ERROR")
    assert "canceled" in out["after"] and "its stream failed" in out["after"], out["after"]


MOCK_STRIDED = r"""
import json
import numpy as np
import lamina_comm as lc
from lamina_comm.gpu import cuda
from tests.mock_cuda import MockDeviceArray
from tests.test_channel import open_pair, WAIT_S

out = {}
dev = cuda.get_device(0)
with lc.Context("tcp") as a, lc.Context("tcp") as b:
    model, attention = open_pair(a, b)
    src = MockDeviceArray(dev, (4, 8), "float32")
    src.full[...] = np.arange(32, dtype=np.float32).reshape(4, 8)
    block = MockDeviceArray(dev, (4, 8), "float32", base=src, columns=(2, 4))  # 4 rows 32 B apart
    model.send([block], layer=1, microbatch=0, stream=9)
    with attention.recv(0, timeout=WAIT_S) as got:
        out["sent"] = bool(np.array_equal(got.tensors[0], src.full[:, 2:6]))
    dst = MockDeviceArray(dev, (4, 8), "float32")
    dst.full[...] = -1
    target = MockDeviceArray(dev, (4, 8), "float32", base=dst, columns=(4, 4))  # into columns 4..7
    attention.send([np.full((4, 4), 3.5, np.float32)], layer=2, microbatch=0)
    model.recv_into([target], 0, stream=9, timeout=WAIT_S)
    with dev.activate():
        dev.driver.call("cuStreamSynchronize", 9)
    out["received"] = bool((dst.full[:, 4:] == 3.5).all()) and bool((dst.full[:, :4] == -1).all())
    for ch in (model, attention):
        ch.close()
print(json.dumps(out))
"""


def test_strided_device_rows_go_as_one_2d_copy_against_a_mock_driver(tmp_path):
    """One rank's heads out of q [T, H, D] are equally spaced rows: sent and received by 2D copies."""
    out = run_mock(tmp_path, MOCK_STRIDED)
    assert out == {"sent": True, "received": True}


MOCK_SERVICE = r"""
import json, sys, threading
import torch
import lamina_comm as lc
from lamina_comm.engine import AttentionService, RemoteAttention
from lamina_comm.gpu import cuda
from tests.mock_cuda import MockDeviceArray
from tests.test_engine import SHAPE


def DeviceArray(dev, shape):
    return MockDeviceArray(dev, shape, "float32")

dev = cuda.get_device(0)
errors = []
with lc.Context("tcp") as ctx:
    report = sys.argv[2] == "report"  # the ranks' compute time with every reply, as lamina-node sends it
    services = [AttentionService(ctx, SHAPE, rank=a, ranks=2, report_compute_time=report) for a in range(2)]

    def serve(service, count):
        try:
            service.accept(1, timeout=30)
            for _ in range(count):
                request = service.recv(timeout=30)
                q, k, v = (DeviceArray(dev, tuple(t.shape)) for t in (request.q, request.k, request.v))
                request.to_device(q, k, v, stream=5)     # the slot goes back once the copies ran
                with dev.activate():
                    dev.driver.call("cuStreamSynchronize", 5)
                out = DeviceArray(dev, q.host.shape)
                out.host[...] = q.host * 2 + service.rank  # "the attention kernel"
                request.respond(out, stream=5)
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=serve, args=(s, 6)) for s in services]
    for t in threads:
        t.start()
    remote = RemoteAttention(ctx, [s.address for s in services], SHAPE)
    ok = []
    for layer in range(3):
        for microbatch in range(SHAPE.microbatches):
            q, k, v = torch.randn(5, 8, 16), torch.randn(5, 4, 16), torch.randn(5, 4, 16)
            remote.send(q, k, v, layer=layer, microbatch=microbatch)
            out = remote.recv_into(torch.empty(5, 8, 16), layer=layer, microbatch=microbatch)
            want = q * 2
            want[:, 4:] += 1
            ok.append(bool(torch.equal(out, want)) and
                      all((reply.compute_ns is not None) == report for reply in remote.replies))
    for t in threads:
        t.join(30)
    remote.close()
    for s in services:
        s.close()
print(json.dumps({"ok": ok, "errors": errors}))
"""


@pytest.mark.parametrize("report", ["plain", "report"])
def test_attention_service_on_a_gpu_tier_against_a_mock_driver(tmp_path, report):
    """The attention tier's stream-ordered side: requests copied to device tensors (the slot goes back by
    the stream), outputs answered from device tensors; the model tier gets every head bit for bit."""
    pytest.importorskip("torch")
    out = run_mock(tmp_path, MOCK_SERVICE, report)
    assert out == {"ok": [True] * 6, "errors": []}


def test_direct_sends_need_a_region_registered_for_the_nic_and_a_verbs_channel():
    from types import SimpleNamespace

    from lamina_comm.channel.device import direct_refusal
    direct = SimpleNamespace(path="peermem", path_reason="verbs with ibv_reg_mr on the device pointer")
    staged = SimpleNamespace(path="staging", path_reason="the context has no verbs transport")
    assert direct_refusal(direct, "verbs") == ""
    assert "runs over tcp" in direct_refusal(direct, "tcp") and "runs over shm" in direct_refusal(direct, "shm")
    assert "the region is staged" in direct_refusal(staged, "verbs")
    assert "no verbs transport" in direct_refusal(staged, "verbs")


def test_a_staged_cuda_region_given_to_a_tcp_channel_says_why_and_its_tensors_go_through_the_slot(
        tmp_path, monkeypatch):
    from .mock_cuda import MockDeviceArray, assert_sent_through_the_slot, mock_driver_in_process
    lib_path = build_mock_libcuda(tmp_path)
    if lib_path is None:
        pytest.skip("no gcc to build the mock driver")
    with mock_driver_in_process(monkeypatch, lib_path) as dev:
        with lc.Context("tcp") as a, lc.Context("tcp") as b:
            x = MockDeviceArray(dev, (64,))
            region = a.register(x)
            model, attention = open_pair(a, b)
            try:
                why = model.add_source_region(region)
                assert "the region is staged" in why and "no verbs transport" in why, why
                assert_sent_through_the_slot(model, attention, x, 4, WAIT_S)
            finally:
                model.close()
                attention.close()


def test_the_direct_path_is_chosen_only_for_device_tensors_wholly_in_open_regions_of_one_gather_list():
    """DeviceStaging's path choice for GPUDirect sends (a verbs channel faked: the choice is pure Python)."""
    from types import SimpleNamespace

    from lamina_comm.channel.device import DeviceStaging, DeviceTensor
    context = object()
    channel = SimpleNamespace(name="fake", context=context, endpoint=SimpleNamespace(transport="verbs"))
    staging = DeviceStaging(channel)

    def region(address: int, nbytes: int, **kw):
        return SimpleNamespace(path="peermem", path_reason="", address=address, nbytes=nbytes, closed=False,
                               context=context, **kw)

    def tensor(ptr: int, nbytes: int, rows: int = 0, row_stride: int = 0):
        return DeviceTensor(None, ptr, nbytes, "uint8", (nbytes,), 0, None, rows, row_stride)

    a, b = region(0x10000, 0x1000), region(0x20000, 0x1000)
    assert staging.add_source(a) == "" and staging.add_source(b) == ""
    q = tensor(0x10000, 256, rows=4, row_stride=0x100)  # 4 rows of 64 B, spanning 0x364 bytes of a
    v = tensor(0x20800, 512)
    assert staging._direct_regions([q, v]) == [a, b]
    assert staging._direct_regions([q, np.zeros(4, np.uint8)]) is None, "a host tensor mixed in: staged"
    assert staging._direct_regions([tensor(0x10f00, 512)]) is None, "partly outside its region: staged"
    big = region(0x40000, 0x10000)
    staging.add_source(big)
    assert staging._direct_regions([tensor(0x40000, 4096, rows=4096, row_stride=2)]) == [big]
    assert staging._direct_regions([tensor(0x40000, 4097, rows=4097, row_stride=2)]) is None, "over 4096 rows"
    b.closed = True
    assert staging._direct_regions([q, v]) is None and staging._direct == [a, big], "a closed region is let go"
    with pytest.raises(lc.InvalidArgumentError, match="closed"):
        staging.add_source(b)
    with pytest.raises(lc.InvalidArgumentError, match="another Context"):
        staging.add_source(SimpleNamespace(**{**vars(region(0, 1)), "context": object()}))


def test_a_device_payload_view_is_a_writable_cuda_array_and_flush_errors_are_sorted():
    """torch refuses read-only __cuda_array_interface__ objects: the view says writable. A device without
    the GPUDirect flush (CUDA_ERROR_NOT_SUPPORTED) needs none; any other driver error is raised."""
    from types import SimpleNamespace

    from lamina_comm.channel import device
    from lamina_comm.gpu import cuda
    view = device.DeviceSlotView(SimpleNamespace(address=0x1000, device=0), 64, 32, "float16", (4, 4))
    cai = view.__cuda_array_interface__
    assert cai["data"] == (0x1040, False) and cai["shape"] == (4, 4) and cai["typestr"] == "<f2"
    region = SimpleNamespace(device=0)
    for name, raised in (("CUDA_ERROR_NOT_SUPPORTED", False), ("CUDA_ERROR_ILLEGAL_ADDRESS", True)):
        def flush(_device, name=name):
            raise cuda.CudaError(f"cuFlushGPUDirectRDMAWrites: {name}", 1, name)
        saved = (cuda.flush_gpudirect_writes, cuda.get_device)
        cuda.flush_gpudirect_writes, cuda.get_device = flush, lambda ordinal: None
        try:
            if raised:
                with pytest.raises(cuda.CudaError, match="ILLEGAL_ADDRESS"):
                    device.flush_nic_writes(region)
            else:
                device.flush_nic_writes(region)
        finally:
            cuda.flush_gpudirect_writes, cuda.get_device = saved
