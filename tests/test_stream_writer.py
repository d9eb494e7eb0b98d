"""StreamOrderedWriter against the mock driver: a write queued behind a stream is posted by a CUDA host
function from native code (a poster per endpoint), never before the stream gets there, with no helper
thread; failures come back as Op.POSTED completions or typed exceptions, never as a crash."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import lamina_comm as lc

from .mock_cuda import build_mock_libcuda, mock_driver_in_process
from .conftest import connect_pair

WAIT_S = 10.0
STREAM = 0x77  # any handle: the mock's streams are all the same queue


@pytest.fixture
def mock_lib(tmp_path):
    path = build_mock_libcuda(tmp_path)
    if path is None:
        pytest.skip("no gcc to build the mock driver")
    return path


@pytest.fixture
def held(mock_lib, monkeypatch):
    """(device, mock library): host functions run on the mock driver's thread and wait while held."""
    mock = ctypes.CDLL(mock_lib)
    with mock_driver_in_process(monkeypatch, mock_lib, "MOCK_CUDA_HOSTFN_THREAD") as dev:
        try:
            yield dev, mock
        finally:
            mock.mock_hold_hostfns(0)
            mock.mock_hostfns_run()  # drained: nothing of this test runs after it


class Pair:
    """A tcp endpoint pair: ``local`` (64 KiB on a) writes into ``target`` (on b)."""

    def __init__(self, n: int = 1 << 16):
        self.a, self.b = lc.Context("tcp"), lc.Context("tcp")
        self.target = np.zeros(n, np.uint8)
        self.local = np.arange(n, dtype=np.uint32).astype(np.uint8)
        self.target_mr = self.b.register(self.target)
        self.local_mr = self.a.register(self.local)
        self.ea, self.eb = connect_pair(self.b, self.a, server_data=self.target_mr.descriptor().to_bytes())
        self.remote = lc.RemoteRegion.from_bytes(self.ea.peer_data)

    def completions(self, ep, want: int) -> list:
        got: list = []
        while len(got) < want:
            batch = ep.wait(timeout=WAIT_S)
            assert batch, f"only {len(got)} of {want} completions within {WAIT_S} s: {got}"
            got += batch
        return got

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def _lamina_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("lamina"))


def test_a_write_is_posted_only_when_the_stream_gets_there_and_by_no_helper_thread(held, pair):
    from lamina_comm.gpu import StreamOrderedWriter
    dev, mock = held
    threads = _lamina_threads()
    with StreamOrderedWriter(dev) as writer:
        mock.mock_hold_hostfns(1)  # the stream is "busy"
        wr = writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM, imm=77, notify=True)
        assert writer.pending() == 1
        assert pair.eb.wait(timeout=0.1) == [] and not pair.target.any(), "posted before the stream got there"
        assert _lamina_threads() == threads, "no thread of ours waits on the stream"
        mock.mock_hold_hostfns(0)
        mine = pair.completions(pair.ea, 2)
        assert sorted((c.op, c.wr_id, c.ok) for c in mine) == sorted([(lc.Op.WRITE, wr, True),
                                                                      (lc.Op.POSTED, wr, True)])
        theirs = pair.completions(pair.eb, 1)
        assert theirs[0].op == lc.Op.RECV_IMM and theirs[0].imm == 77
        assert np.array_equal(pair.target, pair.local)
        assert writer.pending() == 0
        # A part of the region, without notify: one WRITE completion only, and the bytes where asked.
        pair.target[:] = 0
        wr2 = writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM, local_offset=16, remote_offset=32,
                           length=8, wr_id=1234, imm=5)
        assert wr2 == 1234
        mine = pair.completions(pair.ea, 1)
        assert [(c.op, c.wr_id) for c in mine] == [(lc.Op.WRITE, 1234)]
        assert [c.imm for c in pair.completions(pair.eb, 1)] == [5]  # (the bytes land before it)
        assert np.array_equal(pair.target[32:40], pair.local[16:24]) and not pair.target[:32].any()
    assert writer.close() is True


def test_a_write_that_cannot_be_posted_says_so_and_refuses_later_ones(held, pair):
    """The region is deregistered before the stream gets to the write: no write completion, an Op.POSTED one
    with the error (LM_ERR_LOCAL), and the next write on that endpoint raises it."""
    from lamina_comm.gpu import StreamOrderedWriter
    dev, mock = held
    with StreamOrderedWriter(dev) as writer:
        mock.mock_hold_hostfns(1)
        wr = writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM)
        pair.local_mr.close()
        mock.mock_hold_hostfns(0)
        [notice] = pair.completions(pair.ea, 1)
        assert notice.op == lc.Op.POSTED and notice.wr_id == wr and not notice.ok
        assert notice.status == lc._bindings.lib.LM_ERR_LOCAL
        assert not pair.target.any()
        again = pair.a.register(pair.local)
        with pytest.raises(lc.LaminaError, match="failed to post earlier"):
            writer.write(pair.ea, again, pair.remote, stream=STREAM)


def test_closing_the_endpoint_under_queued_writes_posts_nothing(held, pair):
    from lamina_comm.gpu import StreamOrderedWriter
    dev, mock = held
    writer = StreamOrderedWriter(dev)
    try:
        mock.mock_hold_hostfns(1)
        for _ in range(3):
            writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM, imm=1)
        pair.ea.close()  # its close hook closes the poster first: the ops run later only free themselves
        mock.mock_hold_hostfns(0)
        mock.mock_hostfns_run()
        assert writer.pending() == 0 and pair.eb.wait(timeout=0.1) == [] and not pair.target.any()
        with pytest.raises(lc.ClosedError):
            writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM)
    finally:
        assert writer.close() is True


def test_closing_the_writer_drops_what_its_streams_have_not_reached(held, pair):
    from lamina_comm.gpu import StreamOrderedWriter
    dev, mock = held
    writer = StreamOrderedWriter(dev)
    mock.mock_hold_hostfns(1)
    writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM, imm=1)
    assert writer.close(timeout=0.05) is False, "a write still queued was dropped: close says so"
    mock.mock_hold_hostfns(0)
    mock.mock_hostfns_run()
    assert pair.eb.wait(timeout=0.1) == [] and not pair.target.any()
    with pytest.raises(lc.ClosedError):
        writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM)
    assert pair.ea._before_close == [], "the writer let go of the endpoint's close hook"
    pair.ea.write(pair.local_mr, pair.remote, length=4)  # the endpoint itself carries on
    assert [c.op for c in pair.completions(pair.ea, 1)] == [lc.Op.WRITE]


@pytest.mark.parametrize("switch, error, match", [
    ("MOCK_CUDA_HOSTFN_FAIL", "CudaError", "cuLaunchHostFunc"),
    ("MOCK_CUDA_CAPTURING", "UnsupportedError", "CUDA graph"),
])
def test_a_write_the_driver_will_not_queue_is_refused_and_freed(mock_lib, monkeypatch, pair, switch, error, match):
    from lamina_comm.gpu import StreamOrderedWriter, cuda
    with mock_driver_in_process(monkeypatch, mock_lib, switch) as dev:
        expected = cuda.CudaError if error == "CudaError" else lc.UnsupportedError
        with StreamOrderedWriter(dev) as writer:
            with pytest.raises(expected, match=match):
                writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM)
            assert writer.pending() == 0
        assert pair.eb.wait(timeout=0.1) == []


def test_a_write_outside_the_local_region_is_refused_before_anything_is_queued(held, pair):
    from lamina_comm.gpu import StreamOrderedWriter
    dev, mock = held
    with StreamOrderedWriter(dev) as writer:
        with pytest.raises(lc.InvalidArgumentError, match="outside"):
            writer.write(pair.ea, pair.local_mr, pair.remote, stream=STREAM, local_offset=1, length=1 << 16)
        assert writer.pending() == 0
