"""Writer and checker for the failover test, over libnbd (a real NBD client).

write URI BLOCKS LOG: round after round, writes every one of BLOCKS 4 KiB blocks (shuffled, up
to 32 in flight) with a pattern naming the block and the round, then FLUSHes. When a flush has
returned, the round number is appended to LOG and fsynced: from then on the whole round must
survive any crash. Runs until the connection dies (the Primary is killed).

check URI BLOCKS MIN MAX: reads every block; each must be an intact pattern of its own block,
from a round between MIN (the last round whose FLUSH returned) and MAX (the last round begun).
Prints a summary; exits 1 with the first violations otherwise.
"""

import hashlib
import os
import random
import struct
import sys

import nbd

BLOCK = 4096
MAGIC = b"RDBDCHK1"


def pattern(block, rnd):
    head = MAGIC + struct.pack(">QQ", block, rnd)
    seed = hashlib.sha256(head).digest()
    body = (seed * (BLOCK // len(seed) + 1))[: BLOCK - len(head)]
    return head + body


def decode(data):
    if data[:8] != MAGIC:
        return None
    block, rnd = struct.unpack(">QQ", data[8:24])
    return (block, rnd) if pattern(block, rnd) == data else None


def write(uri, blocks, log):
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rnd = 0
    while True:
        rnd += 1
        order = list(range(blocks))
        rng.shuffle(order)
        for i in order:
            while h.aio_in_flight() >= 32:
                h.poll(-1)
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(i, rnd))), i * BLOCK)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        # Announce the round as begun before flushing (the checker's upper bound)...
        os.write(fd, b"begun %d\n" % rnd)
        h.flush()
        # ...and as durable once the flush has returned.
        os.write(fd, b"flushed %d\n" % rnd)
        os.fsync(fd)


def check(uri, blocks, lo, hi):
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = []
    rounds = {}
    for i in range(blocks):
        got = decode(h.pread(BLOCK, i * BLOCK))
        if got is None or got[0] != i:
            bad.append("block %d: not an intact pattern of itself (%r)" % (i, got))
        elif not lo <= got[1] <= hi:
            bad.append("block %d: round %d outside [%d, %d]" % (i, got[1], lo, hi))
        else:
            rounds[got[1]] = rounds.get(got[1], 0) + 1
    if bad:
        print("\n".join(bad[:20]))
        print("%d of %d blocks violate the durability contract" % (len(bad), blocks))
        sys.exit(1)
    print("all %d blocks intact; rounds found: %s" % (blocks, sorted(rounds.items())))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        check(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
