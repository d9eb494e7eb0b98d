"""Write the seed corpus of tests/fuzz/fuzz_tcp_frames.c into tests/fuzz/corpus/tcp_frames/.

Each seed is in the harness's structured mode (see its header comment):
records of a control byte and a 56-byte frame header, plus payload.
Run once after changing the wire format: python tests/fuzz/make_corpus_tcp_frames.py
"""
import os
import struct

HDR = struct.Struct("<HBBIQQQQQiI")  # native/src/tcp/tcp_wire.h
WRITE, READ_REQ, READ_RESP, ACK, NACK, NOP = 1, 2, 3, 4, 5, 6
FIX_ALL = 1 | 2 | 16          # magic, sequence, offset/length folded in
KEY_W, KEY_RO = 1 << 2, 2 << 2
OUT = os.path.join(os.path.dirname(__file__), "corpus", "tcp_frames")


def rec(ctl, ftype, length=0, offset=0, flags=0, imm=0, seq=0, ack=0, status=0, payload=b""):
    return bytes([ctl]) + HDR.pack(0, ftype, flags, imm, seq, 0, offset, length, ack, status, 0) + payload


SEEDS = {
    "write_imm": b"\0" + rec(FIX_ALL | KEY_W, WRITE, 32, 100, flags=1, imm=7, payload=bytes(range(32))),
    "write_ro_refused": b"\0" + rec(FIX_ALL | KEY_RO, WRITE, 16, payload=b"x" * 16),
    "read_ro": b"\0" + rec(FIX_ALL | KEY_RO, READ_REQ, 128, 64),
    "read_pieces": b"\0" + rec(FIX_ALL | KEY_W, READ_REQ, 64) + rec(FIX_ALL | KEY_W, READ_REQ, 64, flags=2),
    "read_then_write": b"\0" + rec(FIX_ALL | KEY_W, READ_REQ, 4096) +
                       rec(FIX_ALL | KEY_W, WRITE, 4096, payload=b"\xee" * 4096),
    "nop_and_ack": b"\0" + rec(FIX_ALL, NOP) + rec(1, ACK, ack=1),
    "answers_own_ops": b"\2" + rec(1, ACK, ack=1) + rec(1, READ_RESP, 64, seq=1, payload=b"r" * 64),
    "nack_own_write": b"\2" + rec(1, NACK, seq=0, status=-5),
    "ack_unsent": b"\2" + rec(1, ACK, ack=5),
    "bad_magic": b"\0" + rec(0, WRITE, 8),
    "raw_empty": b"\1",  # crashed the harness once (pointer arithmetic on an empty stream)
    "raw_garbage": b"\1" + bytes((i * 37 + 11) & 0xFF for i in range(300)),
}

if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {OUT}")
