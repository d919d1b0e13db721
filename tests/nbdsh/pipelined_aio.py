"""Thousands of asynchronous commands in flight on one connection: far more than the server's
per-connection limit (512) and than its receive buffer holds. Every command must complete with
the right result, then a client that abandons its pending commands must not hurt the server."""

import time

import nbd
from _nbdtest import args, check, fail, pattern

uri, size = args()
MIB = 1 << 20
check(size >= 16 * MIB, "the export must be at least 16 MiB")


def wait_all(h, cookies, what, timeout=30):
    deadline = time.monotonic() + timeout
    while h.aio_in_flight() > 0:
        if time.monotonic() > deadline:
            fail(f"{what}: {h.aio_in_flight()} commands still in flight after {timeout} s")
        h.poll(1000)
    for c in cookies:
        try:
            check(h.aio_command_completed(c), f"{what}: command {c} did not complete")
        except nbd.Error as e:
            fail(f"{what}: command {c} failed: {e}")


h = nbd.NBD()
h.connect_uri(uri)
base = pattern(MIB, 9)
h.pwrite(base, 0)

# 3000 mixed commands: reads of the written MiB, small writes to distinct places, flushes.
reads, writes, cookies = [], [], []
for i in range(3000):
    kind = i % 3
    if kind == 0:
        offset = (i * 4096) % MIB
        buf = nbd.Buffer(4096)
        cookies.append(h.aio_pread(buf, offset))
        reads.append((buf, offset))
    elif kind == 1:
        offset = 4 * MIB + i * 512
        payload = pattern(512, i & 0xFF)
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(payload)), offset))
        writes.append((payload, offset))
    else:
        cookies.append(h.aio_flush())
wait_all(h, cookies, "3000 mixed commands")
for buf, offset in reads:
    check(bytes(buf.to_bytearray()) == base[offset:offset + 4096], f"pipelined read at {offset}")
for payload, offset in writes[::50]:
    check(h.pread(512, offset) == payload, f"pipelined write at {offset}")

# 20000 small reads at once: about 560 KB of request headers.
bufs = []
cookies = []
for i in range(20000):
    buf = nbd.Buffer(512)
    offset = (i * 512) % MIB
    cookies.append(h.aio_pread(buf, offset))
    bufs.append((buf, offset))
wait_all(h, cookies, "20000 reads")
for buf, offset in bufs[::97]:
    check(bytes(buf.to_bytearray()) == base[offset:offset + 512], f"read at {offset}")
h.shutdown()

# A client that queues 2000 writes and leaves without waiting for them.
h = nbd.NBD()
h.connect_uri(uri)
for i in range(2000):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)), 8 * MIB + (i % 512) * 4096)
h.poll(0)
h.shutdown(nbd.SHUTDOWN_ABANDON_PENDING)
del h

# The server still serves new clients, and the first MiB is intact.
h = nbd.NBD()
h.connect_uri(uri)
check(h.pread(MIB, 0) == base, "data after an abandoned pipeline")
h.shutdown()
print("ok")
