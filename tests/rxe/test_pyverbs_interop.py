"""Interoperability with a plain verbs peer written with pyverbs.

The peer is an RC queue pair brought up by hand from lamina-comm's address
blob (docs/verbs.md), so these tests pin the blob format, the QP attributes and
the write-with-immediate conventions (immediate in network byte order, one
receive WR consumed per write with immediate) against an independent
implementation. The lamina side uses the C API: its endpoint gets no control
socket, so the test orders the two bring-ups itself.
"""
from __future__ import annotations

import dataclasses
import os
import random
import socket
import struct
import sys
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm._bindings import check, ffi, lib

RXE_DEV = os.environ.get("RXE_DEV")
GID_INDEX = int(os.environ.get("RXE_GID_INDEX", "1"))
PORT = 1

pytestmark = [
    pytest.mark.rxe,
    pytest.mark.skipif(not RXE_DEV, reason="needs a verbs device (RXE_DEV): run tools/rxe-test.sh"),
]

# docs/verbs.md: magic "LV", version 1, link layer, MTU, RDMA reads accepted,
# LID, QPN, PSN, GID; little-endian, 32 bytes.
ADDR = struct.Struct("<2sBBBBHII16s")
ADDR_MAGIC, ADDR_VERSION = b"LV", 1


@dataclasses.dataclass
class QPAddress:
    link_layer: int
    mtu: int
    rd_atomic: int
    lid: int
    qpn: int
    psn: int
    gid: bytes

    @classmethod
    def decode(cls, blob: bytes) -> "QPAddress":
        magic, version, *fields = ADDR.unpack(blob)
        assert (magic, version) == (ADDR_MAGIC, ADDR_VERSION)
        return cls(*fields)

    def encode(self) -> bytes:
        return ADDR.pack(ADDR_MAGIC, ADDR_VERSION, self.link_layer, self.mtu, self.rd_atomic, self.lid,
                         self.qpn, self.psn, self.gid)


def gid_text(raw: bytes) -> str:
    return ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))


class PyverbsPeer:
    """One RC QP, a CQ and a 64 KiB MR the lamina side may write and read."""

    SIZE = 64 * 1024

    def __init__(self):
        if "/usr/lib/python3/dist-packages" not in sys.path:
            sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-pyverbs
        pytest.importorskip("pyverbs")
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        import pyverbs.enums as e
        self.e = e
        self.GID, self.AHAttr, self.GlobalRoute, self.QPAttr = GID, AHAttr, GlobalRoute, QPAttr
        self.ctx = Context(name=RXE_DEV)
        self.port_attr = self.ctx.query_port(PORT)
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 64)
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        self.mr = MR(self.pd, self.SIZE, access)
        cap = QPCap(max_send_wr=16, max_recv_wr=16, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))
        self.psn = random.getrandbits(24)
        gid = self.ctx.query_gid(PORT, GID_INDEX).gid
        self.address = QPAddress(self.port_attr.link_layer, self.port_attr.active_mtu, 4, self.port_attr.lid,
                                 self.qp.qp_num, self.psn, bytes.fromhex(gid.replace(":", "")))

    def connect(self, peer: QPAddress) -> None:
        e = self.e
        attr = self.QPAttr(qp_state=e.IBV_QPS_INIT, port_num=PORT)
        attr.pkey_index = 0
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        self.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS)
        attr = self.QPAttr(qp_state=e.IBV_QPS_RTR, path_mtu=min(peer.mtu, self.port_attr.active_mtu))
        attr.dest_qp_num, attr.rq_psn = peer.qpn, peer.psn
        attr.max_dest_rd_atomic, attr.min_rnr_timer = 4, 12
        route = self.GlobalRoute(dgid=self.GID(gid_text(peer.gid)), sgid_index=GID_INDEX, hop_limit=64)
        attr.ah_attr = self.AHAttr(port_num=PORT, is_global=1, gr=route, dlid=peer.lid)
        self.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN
                       | e.IBV_QP_RQ_PSN | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
        attr = self.QPAttr(qp_state=e.IBV_QPS_RTS)
        attr.timeout, attr.retry_cnt, attr.rnr_retry = 14, 7, 7
        attr.sq_psn, attr.max_rd_atomic = self.psn, min(4, peer.rd_atomic)
        self.qp.modify(attr, e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
                       | e.IBV_QP_SQ_PSN | e.IBV_QP_MAX_QP_RD_ATOMIC)

    def post_receive(self, wr_id: int) -> None:
        from pyverbs.wr import SGE, RecvWR
        self.qp.post_recv(RecvWR(wr_id=wr_id, num_sge=1, sg=[SGE(self.mr.buf, 0, self.mr.lkey)]))

    def write_imm(self, offset: int, length: int, remote_addr: int, rkey: int, imm: int) -> None:
        from pyverbs.wr import SGE, SendWR
        wr = SendWR(wr_id=imm, opcode=self.e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(self.mr.buf + offset, length, self.mr.lkey)],
                    imm_data=socket.htonl(imm), send_flags=self.e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey=rkey, addr=remote_addr)
        self.qp.post_send(wr)

    def poll(self, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n, wcs = self.cq.poll(1)
            if n:
                return wcs[0]
            time.sleep(0.001)
        raise AssertionError(f"pyverbs CQ: no completion within {timeout} s")

    def close(self) -> None:
        self.ctx.close()


class LaminaEndpoint:
    """A verbs endpoint through the C API, with a 64 KiB region."""

    EP_ID = 77

    def __init__(self):
        self.ctx = lc.Context("verbs")
        self.buf = np.zeros(64 * 1024, np.uint8)
        self.mr = self.ctx.register(self.buf)
        out = ffi.new("lm_ep_t **")
        check(lib.lm_ep_create_verbs(self.ctx._handle(), self.EP_ID, out), "lm_ep_create_verbs")
        self.ep = out[0]
        blob = ffi.new("char[]", 1024)
        size = ffi.new("size_t *", 1024)
        check(lib.lm_ep_address(self.ep, blob, size), "lm_ep_address")
        self.address = QPAddress.decode(bytes(ffi.buffer(blob, size[0])))

    def connect(self, peer: QPAddress) -> None:
        blob = peer.encode()
        check(lib.lm_ep_connect(self.ep, blob, len(blob), -1), "lm_ep_connect")

    def wait(self, timeout: float = 30.0):
        comps = ffi.new("lm_completion_t[4]")
        n = lib.lm_cq_wait(self.ctx._handle(), comps, 1, int(timeout * 1000))
        assert n == 1, f"lamina: no completion within {timeout} s"
        return comps[0]

    def close(self) -> None:
        lib.lm_ep_destroy(self.ep)
        self.ctx.close()


@pytest.fixture
def peers():
    lam = LaminaEndpoint()
    pv = None
    try:
        pv = PyverbsPeer()
        assert lam.address.qpn != 0 and lam.address.link_layer == pv.address.link_layer
        pv.connect(lam.address)  # RTS before lamina may send
        lam.connect(pv.address)
        yield lam, pv
    finally:
        lam.close()
        if pv is not None:
            pv.close()


def test_pyverbs_writes_with_immediate_into_a_lamina_region(peers):
    lam, pv = peers
    desc = lam.mr.descriptor()
    payload = bytes(range(256)) * 16
    pv.mr.write(payload, len(payload), 0)
    for i, (off, n) in enumerate([(0, 4096), (8192, 100), (30000, 1)]):
        imm = 0xC0DE0000 + i
        pv.write_imm(0, n, desc.addr + off, desc.rkey, imm)
        wc = pv.poll()
        assert wc.status == pv.e.IBV_WC_SUCCESS, wc.status
        c = lam.wait()
        assert (c.opcode, c.status, c.imm, c.byte_len, c.ep_id) == (lib.LM_OP_RECV_IMM, 0, imm, n, lam.EP_ID)
        assert c.flags & lib.LM_CF_IMM
        assert lam.buf[off:off + n].tobytes() == payload[:n]


def test_lamina_writes_with_immediate_into_a_pyverbs_region(peers):
    lam, pv = peers
    lam.buf[:] = np.arange(lam.buf.size, dtype=np.uint32).astype(np.uint8)
    remote = ffi.new("lm_rdesc_t *", {"key": 0, "addr": pv.mr.buf, "length": pv.SIZE, "rkey": pv.mr.rkey,
                                      "access": int(lc.Access.ALL)})
    for i, (off, n) in enumerate([(0, 64), (1000, 5000), (4096, 60000)]):
        pv.post_receive(i)
        imm = 0xFEED0000 + i
        check(lib.lm_ep_write(lam.ep, lam.mr._handle(), off, n, remote, off, imm, lib.LM_WRITE_IMM, 500 + i),
              "lm_ep_write")
        c = lam.wait()
        assert (c.opcode, c.status, c.wr_id, c.byte_len) == (lib.LM_OP_WRITE, 0, 500 + i, n)
        wc = pv.poll()
        assert wc.status == pv.e.IBV_WC_SUCCESS and wc.opcode == pv.e.IBV_WC_RECV_RDMA_WITH_IMM
        assert socket.ntohl(wc.imm_data) == imm and wc.byte_len == n and wc.wr_id == i
        assert pv.mr.read(n, off) == lam.buf[off:off + n].tobytes()
    # And a read of the pyverbs region back into lamina memory.
    lam.buf[:] = 0
    check(lib.lm_ep_read(lam.ep, lam.mr._handle(), 0, 4096, remote, 1000, 900), "lm_ep_read")
    c = lam.wait()
    assert (c.opcode, c.status, c.wr_id) == (lib.LM_OP_READ, 0, 900)
    assert lam.buf[:4096].tobytes() == pv.mr.read(4096, 1000)
