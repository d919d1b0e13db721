"""base:allocation through libnbd: selected on GO, unknown contexts ignored, extents that
describe written data and holes, REQ_ONE, and malformed block status requests."""

import errno

import nbd
from _nbdtest import Wire, args, check, expect_error, pattern

uri, size = args()
MIB = 1 << 20
check(size >= 8 * MIB, "the export must be at least 8 MiB")

h = nbd.NBD()
wire = Wire(h)
h.set_opt_mode(True)
h.add_meta_context("nope:thing")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("base:nope")
h.connect_uri(uri)
h.opt_go()
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated")
check(not h.can_meta_context("nope:thing"), "unknown namespace selected")
check(not h.can_meta_context("base:nope"), "unknown base: context selected")

# The export starts as one big hole; write 64 KiB at 1 MiB.
data = pattern(64 << 10, 5)
h.pwrite(data, MIB)
h.flush()


def status(count, offset, flags=0):
    got = []

    def cb(metacontext, off, entries, err):
        check(metacontext == nbd.CONTEXT_BASE_ALLOCATION, f"extents for context {metacontext!r}")
        check(off == offset, f"extents for offset {off}, asked {offset}")
        got.append(list(entries))
        return 0

    h.block_status(count, offset, cb, flags)
    check(len(got) == 1, f"expected one block status chunk, got {len(got)}")
    entries = got[0]
    check(entries and len(entries) % 2 == 0, f"malformed extent list {entries}")
    extents = list(zip(entries[::2], entries[1::2]))
    check(all(length > 0 for length, _ in extents), f"zero-length extent in {extents}")
    return extents


def flags_at(extents, start, pos):
    for length, flags in extents:
        if pos < start + length:
            return flags
        start += length
    return None


extents = status(4 * MIB, 0)
total = sum(length for length, _ in extents)
check(total <= 4 * MIB, f"extents cover {total} bytes, more than the 4 MiB asked")
check(total > 0, "no extents")
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
check(flags_at(extents, 0, 0) == HOLE_ZERO, f"offset 0 of a fresh sparse file should be a hole: {extents}")
if total > MIB:
    check(flags_at(extents, 0, MIB) & nbd.STATE_HOLE == 0, f"written data reported as a hole: {extents}")

ext = status(64 << 10, MIB)
check(ext[0][1] & nbd.STATE_HOLE == 0, f"data at 1 MiB reported as a hole: {ext}")
check(sum(length for length, _ in ext) <= 64 << 10, "extents beyond the request")

# REQ_ONE: exactly one extent, no longer than the request.
for offset, count in [(0, 4 * MIB), (MIB, 4 * MIB), (MIB + 4096, 4096), (size - 4096, 4096)]:
    one = status(count, offset, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1, f"REQ_ONE at {offset} returned {len(one)} extents")
    check(one[0][0] <= count, f"REQ_ONE extent {one[0]} longer than the {count} asked")

# Malformed block status requests.
h.set_strict_mode(0)
expect_error(h, wire, "block status past the end", errno.EINVAL, lambda: h.block_status(8192, size - 4096, lambda *a: 0))
expect_error(h, wire, "zero-length block status", errno.EINVAL, lambda: h.block_status(0, 0, lambda *a: 0))
expect_error(h, wire, "block status overflowing u64", errno.EINVAL,
             lambda: h.block_status(4096, 2**64 - 1024, lambda *a: 0))
expect_error(h, wire, "block status with FAST_ZERO", errno.EINVAL,
             lambda: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_FAST_ZERO))
check(h.pread(64 << 10, MIB) == data, "data after block status errors")
h.shutdown()

# A context selected for another export name does not carry over: INFO on "nope" fails, GO on ""
# still gets base:allocation (it was requested for "" by opt_go itself).
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
h.set_export_name("nope")
try:
    h.opt_info()
    check(False, "opt_info on an unknown export succeeded")
except nbd.Error as e:
    check(e.errnum == errno.ENOENT, f"opt_info on an unknown export: {e}")
h.set_export_name("")
h.opt_go()
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation after a refused INFO")
check(status(64 << 10, MIB)[0][1] & nbd.STATE_HOLE == 0, "block status on the second connection")
h.shutdown()
print("ok")
