"""Requests that libnbd normally refuses to send, sent anyway with set_strict_mode(0): unknown
flags, out-of-range and overflowing offsets, zero lengths, oversized payloads, commands without
the negotiation they need. Each must reach the server (checked in libnbd's debug log), get the
protocol's errno, and leave the connection usable with the data intact. Run with and without
structured replies."""

import errno

import nbd
from _nbdtest import Wire, args, check, expect_error, pattern

uri, size = args()
EINVAL, ENOSPC = errno.EINVAL, errno.ENOSPC
UNKNOWN_FLAG = 1 << 7

for structured in (True, False):
    h = nbd.NBD()
    wire = Wire(h)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    check(h.get_structured_replies_negotiated() == structured, "structured replies negotiation")
    h.set_strict_mode(0)
    check(h.get_strict_mode() == 0, "strict mode is still on")

    data = pattern(4096, 17 if structured else 71)
    h.pwrite(data, 0)
    h.zero(4096, size - 4096)
    cases = [
        ("pread past the end", EINVAL, lambda: h.pread(4096, size - 512)),
        ("pread at the end", EINVAL, lambda: h.pread(1, size)),
        ("pread far past the end", EINVAL, lambda: h.pread(512, 1 << 62)),
        ("pread with offset+count overflowing u64", EINVAL, lambda: h.pread(4096, 2**64 - 100)),
        ("zero-length pread", EINVAL, lambda: h.pread(0, 0)),
        ("pread with unknown flag", EINVAL, lambda: h.pread(4096, 0, UNKNOWN_FLAG)),
        ("pread with REQ_ONE", EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("pread with NO_HOLE", EINVAL, lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("pread of 33 MiB (over the maximum block size)", EINVAL, lambda: h.pread(33 << 20, 0)),
        ("pwrite past the end", ENOSPC, lambda: h.pwrite(b"\xee" * 4096, size - 512)),
        ("pwrite with offset+count overflowing u64", ENOSPC, lambda: h.pwrite(b"\xee" * 4096, 2**64 - 100)),
        ("zero-length pwrite", EINVAL, lambda: h.pwrite(b"", 0)),
        ("pwrite with unknown flag", EINVAL, lambda: h.pwrite(b"\xee" * 4096, 0, UNKNOWN_FLAG)),
        ("pwrite with DF", EINVAL, lambda: h.pwrite(b"\xee" * 4096, 0, nbd.CMD_FLAG_DF)),
        ("pwrite of 33 MiB (over the maximum block size)", EINVAL, lambda: h.pwrite(b"\xee" * (33 << 20), 0)),
        ("trim past the end", EINVAL, lambda: h.trim(4096, size - 512)),
        ("trim overflowing u64", EINVAL, lambda: h.trim(2, 2**64 - 1)),
        ("zero-length trim", EINVAL, lambda: h.trim(0, 0)),
        ("trim with unknown flag", EINVAL, lambda: h.trim(4096, 0, UNKNOWN_FLAG)),
        ("zero past the end", ENOSPC, lambda: h.zero(4096, size - 512)),
        ("zero-length zero", EINVAL, lambda: h.zero(0, 0)),
        ("zero with REQ_ONE", EINVAL, lambda: h.zero(4096, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("cache past the end", EINVAL, lambda: h.cache(4096, size)),
        ("cache with unknown flag", EINVAL, lambda: h.cache(4096, 0, UNKNOWN_FLAG)),
        ("flush with unknown flag", EINVAL, lambda: h.flush(UNKNOWN_FLAG)),
        ("block status without a meta context", EINVAL, lambda: h.block_status(4096, 0, lambda *a: 0)),
    ]
    if not structured:
        cases.append(("pread with DF without structured replies", EINVAL,
                      lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF)))
    for what, want, fn in cases:
        what = f"{what} (structured={structured})"
        expect_error(h, wire, what, want, fn)
        if structured:
            check(wire.server_messages(), f"{what}: the error chunk carried no message")
        check(h.pread(4096, 0) == data, f"data at 0 changed after {what}")

    # Requests right at the edge are valid.
    wire.clear()
    h.pwrite(b"\x5a", size - 1)
    check(h.pread(1, size - 1) == b"\x5a", "last byte")
    check(h.pread(512, size - 512)[:511] == bytes(511), "a refused write past the end left data behind")
    h.flush(nbd.CMD_FLAG_FUA)
    h.cache(4096, size - 4096)
    h.zero(4096, size - 4096)
    check(h.pread(4096, size - 4096) == bytes(4096), "zero at the end")
    if structured:
        check(h.pread(4096, 0, nbd.CMD_FLAG_DF) == data, "DF read")
    h.pwrite(b"\x11" * (32 << 20), size - (32 << 20) if size >= 32 << 20 else 0)
    h.shutdown()
print("ok")
