"""A peer process for the multi-process tests.

  peer.py target NBYTES COUNT   register NBYTES, accept one client, wait for COUNT
                                writes with immediate, print their immediates and
                                the sha256 of the region, exit
  peer.py hold NBYTES           register NBYTES, accept, report, then sleep (to be killed)
  peer.py serve NBYTES          accept clients one after another, each sending COUNT=1 write

Every line on stdout is JSON; the first reports the listening address.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np

import lamina_comm as lc


def say(**kw):
    print(json.dumps(kw), flush=True)


def main() -> int:
    mode, nbytes = sys.argv[1], int(sys.argv[2])
    with lc.Context(os.environ.get("LAMINA_PEER_TRANSPORT", "tcp")) as ctx:
        if os.environ.get("LAMINA_PEER_ALLOC"):  # shared memory: an shm writer maps it (one copy)
            mr = ctx.alloc(nbytes)
            buf = mr.view(nbytes=nbytes)
        else:
            buf = np.zeros(nbytes, np.uint8)
            mr = ctx.register(buf)
        listener = ctx.listen("127.0.0.1:0")
        say(event="listening", port=listener.address[1])
        if mode == "serve":
            while True:
                ep = listener.accept(private_data=mr.descriptor().to_bytes())
                c = ep.wait_one(timeout=10)
                say(event="write", imm=c.imm, status=c.status)
                ep.close()
        ep = listener.accept(timeout=30, private_data=mr.descriptor().to_bytes())
        say(event="accepted")
        if mode == "hold":
            time.sleep(600)
            return 0
        count = int(sys.argv[3])
        imms = []
        while len(imms) < count:
            for c in ep.wait(timeout=30):
                if c.op == lc.Op.RECV_IMM:
                    imms.append(c.imm)
        say(event="done", imms=imms, sha256=hashlib.sha256(buf.tobytes()).hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
