"""Coverage-guided fuzzer (atheris) for what a channel parses from bytes its peer controls.

    python tests/fuzz/fuzz_channel_header.py [libFuzzer flags] [SCRATCH_DIR] tests/fuzz/corpus/channel_header/
    python tests/fuzz/fuzz_channel_header.py --write-seeds tests/fuzz/corpus/channel_header/

An input is a mode byte, then:
  mode even  the channel hello (the peer's private data in the bootstrap):
             _parse_hello and _check_peer, the spec-digest handshake;
  mode odd   a landed message: 4 bytes immediate (little-endian), 1 byte the
             receiver's expected seq, 1 byte the seq the sender's slots hold,
             8 bytes for the credit-in word, then the bytes the peer wrote into
             the slot (header and payload). The channel takes the immediate
             (piggybacked credits, credit writes) and opens every arrival.

Both must succeed or raise a LaminaError subclass; a tensor view outside the
received slot, any other exception, or memory past -rss_limit_mb is a finding.
The channel is real: the native channel (native/src/channel) over a loopback
endpoint, whose peer endpoint (in a second context, drained per input) takes
the credits it returns. Each input gets a fresh native channel, its state set
with lm_chan_test_state, and the immediate handed over with lm_chan_inject_imm,
so the parsing under test is the one the channel runs on real arrivals.
check_one() is also what tests/fuzz/test_fuzz_corpus.py replays over the corpus.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _fuzz_support  # noqa: E402

ch = _fuzz_support.import_target("lamina_comm.channel", fuzzing=__name__ == "__main__")
from lamina_comm.channel import core, handshake, spec as wire  # the internals under test (instrumented above)
from lamina_comm._bindings import check, ffi, lib
from lamina_comm.errors import LaminaError
from lamina_comm.transport import Context, RemoteRegion

SPEC = ch.ChannelSpec(max_tokens=4, hidden=32, heads=2, kv_heads=1, head_dim=16, dtype="float16",
                      microbatches=2, slots_per_microbatch=2)
ROLE = "model"        # the side under test; its peer is the attention worker
_MESSAGE_PREFIX = struct.Struct("<IBB8s")
MAX_SEED_PAYLOAD = 1024  # a seed claiming more carries only this much (the rest reads as zeros)


class _Harness:
    """A Python Channel over a loopback endpoint; its native channel is made anew per input."""

    def __init__(self) -> None:
        self.context, self.peer_context = Context("tcp"), Context("tcp")
        peer_layout = ch.RingLayout.for_role(SPEC, "attention")
        self.peer_buffer = np.zeros(peer_layout.total_bytes, np.uint8)
        peer_mr = self.peer_context.register(self.peer_buffer)
        listener = self.peer_context.listen(("127.0.0.1", 0))
        rings = core._Rings(self.context, SPEC, ROLE)
        box: dict = {}
        import threading
        accepting = threading.Thread(target=lambda: box.setdefault(
            "ep", listener.accept(timeout=30, private_data=peer_mr.descriptor().to_bytes())))
        accepting.start()
        endpoint = self.context.connect(listener.address, timeout=30)
        accepting.join(30)
        self.peer_endpoint = box["ep"]
        listener.close()
        self.channel = ch.Channel(self.context, endpoint, SPEC, ROLE, rings, peer_mr.descriptor())
        self.layout = self.channel._layout
        self.params = ffi.new("lm_chan_params_t *", {
            "microbatches": SPEC.microbatches, "slots": SPEC.slots_per_microbatch,
            "recv_capacity": self.layout.recv_capacity, "send_capacity": self.layout.send_capacity})
        self.peer_descriptor = peer_mr.descriptor()

    def reset(self, recv_seq: int, slot_seq: int) -> None:
        """A fresh native channel (a failed one stays failed) in the state the input asks for."""
        c = self.channel
        # Freed at once, not by _destroy_native's finalizer (which waits for the
        # Python object, and this one lives for the whole run): one thread here.
        old, c._ch = c._ch, None
        if old is not None:
            lib.lm_chan_close(old)
            lib.lm_chan_destroy(old)
        self.context.poll()       # completions of the old channel's credit writes
        self.peer_context.poll()  # the credits that reached the peer
        out = ffi.new("lm_chan_t **")
        check(lib.lm_chan_create(c.endpoint._handle(), c._mr._handle(), self.peer_descriptor._native, self.params,
                                 out), "fuzz channel")
        c._ch = out[0]
        lib.lm_chan_progress(c._ch)
        lib.lm_chan_test_state(c._ch, recv_seq, slot_seq)

    def land(self, imm: int, credit_word: bytes, slot_bytes: bytes) -> None:
        """Place the peer's bytes where its writes would land, then hand the channel the immediate."""
        kind, mb, slot = ch.decode_imm(imm)
        buf = self.channel._buf
        if mb < SPEC.microbatches and slot < SPEC.slots_per_microbatch:
            base = self.layout.recv_slot(mb, slot)
            stride = self.layout.recv_stride
            buf[base:base + stride] = 0
            data = np.frombuffer(slot_bytes[:stride], np.uint8)
            buf[base:base + len(data)] = data
            credit = self.layout.credit_in(mb, slot)
            buf[credit:credit + 8] = np.frombuffer(credit_word, np.uint8)
        lib.lm_chan_inject_imm(self.channel._ch, imm)

    def open_arrivals(self) -> None:
        c = self.channel
        while lib.lm_chan_pending(c._ch, -1) > 0:
            message = c.recv(timeout=0)  # a refusal raises (its slot went back to the sender)
            self._check_views(message, message.microbatch, message.slot)
            message.release()
        c._raise_if_failed()

    def _check_views(self, message: ch.Message, mb: int, slot: int) -> None:
        start = self.channel._buf.ctypes.data + self.layout.recv_slot(mb, slot) + ch.HEADER_BYTES
        end = start + self.layout.recv_capacity
        for tensor in message.tensors:
            if tensor.nbytes == 0:
                continue  # an empty view reaches no memory (numpy may point it anywhere)
            address = tensor.__array_interface__["data"][0]
            assert start <= address and address + tensor.nbytes <= end, "a tensor view outside its slot"


_harness: _Harness | None = None


def harness() -> _Harness:
    global _harness
    if _harness is None:
        _harness = _Harness()
    return _harness


def check_one(data: bytes) -> None:
    """Parse one input; raise AssertionError (or anything untyped) on a finding."""
    if not data:
        return
    mode, body = data[0], data[1:]
    try:
        if mode % 2 == 0:
            hello = handshake._parse_hello(body)
            handshake._check_peer(SPEC, ROLE, hello)
            handshake._peer_payloads(SPEC, hello)
            handshake._peer_caps(hello)
        else:
            _check_message(body)
    except LaminaError:
        pass


def _check_message(body: bytes) -> None:
    if len(body) < _MESSAGE_PREFIX.size:
        return
    imm, recv_seq, slot_seq, credit_word = _MESSAGE_PREFIX.unpack_from(body)
    h = harness()
    h.reset(recv_seq, slot_seq)
    h.land(imm, credit_word, body[_MESSAGE_PREFIX.size:])
    h.open_arrivals()


# -- seeds -------------------------------------------------------------------
def peer_hello(**changes: object) -> bytes:
    layout = ch.RingLayout.for_role(SPEC, "attention")
    body = {"version": ch.WIRE_VERSION, "spec": SPEC.to_dict(), "digest": SPEC.digest(), "role": "attention",
            "region": RemoteRegion(key=7, addr=4096, length=layout.total_bytes).to_dict(), **changes}
    return handshake._HELLO_PREFIX + json.dumps(body, separators=(",", ":")).encode()


def message(mb: int = 0, slot: int = 0, seq: int = 0, tensors: tuple = ((3, (4, 2, 16), 0),),
            credits: tuple = (), kind: int = ch.KIND_DATA, magic: int = ch.MAGIC) -> bytes:
    """A landed message: dtype code, shape and payload offset per tensor; piggybacked credits."""
    header = bytearray(ch.HEADER_BYTES)
    size = sum(int(np.prod(shape)) * 4 for _, shape, _ in tensors)
    wire._HEADER.pack_into(header, 0, magic, ch.WIRE_VERSION, len(tensors), len(credits), seq, 3, mb, slot, size)
    for index, (code, shape, offset) in enumerate(tensors):
        dims = list(shape) + [0] * (ch.MAX_NDIM - len(shape))
        wire._ENTRY.pack_into(header, wire._HEADER.size + index * wire._ENTRY.size, code, len(shape), 0, 0, offset,
                              *dims)
    for index, credit in enumerate(credits):
        wire._PIGGYBACK.pack_into(header, wire._PIGGYBACK_BASE + index * wire._PIGGYBACK.size, *credit)
    prefix = _MESSAGE_PREFIX.pack(ch.encode_imm(kind, mb, slot), seq, 5, struct.pack("<Q", 5))
    return bytes([1]) + prefix + bytes(header) + bytes(min(size, MAX_SEED_PAYLOAD))


def seeds() -> dict[str, bytes]:
    return {
        "hello_valid": bytes([0]) + peer_hello(),
        "hello_same_role": bytes([0]) + peer_hello(role="model"),
        "hello_other_spec": bytes([0]) + peer_hello(digest="0" * 32),
        "hello_small_region": bytes([0]) + peer_hello(region={"key": 1, "addr": 0, "length": 16}),
        "hello_not_json": bytes([0]) + handshake._HELLO_PREFIX + b"{",
        "msg_valid": message(),
        "msg_two_tensors_slot1": message(slot=1, seq=1, tensors=((1, (4, 16), 0), (4, (4,), 128))),
        "msg_piggyback": message(credits=((1, 0, 5),)),
        "msg_overrun": message(tensors=((3, (4096, 4096), 0),)),
        "msg_credit": message(kind=ch.KIND_CREDIT, tensors=()),
        "msg_bad_magic": message(magic=0),
        # Findings of this fuzzer (issue 9), kept as seeds so every run replays them:
        "found_hello_region_missing_addr": bytes([0]) + peer_hello(region={"key": 1, "length": 1 << 20}),
        "found_hello_region_string": bytes([0]) + peer_hello(region={"key": "1", "addr": 0, "length": 1 << 20}),
        "found_hello_not_an_object": bytes([0]) + handshake._HELLO_PREFIX + b"[1]",
        "found_hello_deep_nesting": bytes([0]) + handshake._HELLO_PREFIX + b"[" * 10_000,
        "found_msg_empty_tensor_huge_dims": message(tensors=((3, (768, 1 << 24, 2113999872, 0), 0),)),
    }


if __name__ == "__main__":
    _fuzz_support.main(check_one, seeds)
