"""Option haggling in libnbd's opt mode: LIST, LIST_META_CONTEXT, INFO/GO on unknown and known
exports (negotiation continues after every refusal), the advertised export properties, ABORT,
and old-fashioned handshake flags."""

import errno

import nbd
from _nbdtest import args, check, expect_option_error, fail

uri, size = args()

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
check(h.aio_is_negotiating(), "opt mode: the handle should be negotiating after connect")
check(h.get_structured_replies_negotiated(), "structured replies were not negotiated")

# LIST: exactly the one export, named "" (the default), with a description.
exports = []
n = h.opt_list(lambda name, desc: exports.append((name, desc)) or 0)
check(n == 1 and len(exports) == 1, f"opt_list: expected one export, got {n}: {exports}")
check(exports[0][0] == "", f"opt_list: export name {exports[0][0]!r}, expected ''")
check(exports[0][1] != "", "opt_list: the export has no description")

# LIST_META_CONTEXT with no query lists every context: base:allocation.
contexts = []
n = h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
check(contexts == [nbd.CONTEXT_BASE_ALLOCATION], f"opt_list_meta_context: {contexts}")
check(n == 1, f"opt_list_meta_context returned {n}")

# A query in an unknown namespace selects nothing; together with base:allocation, only that.
h.add_meta_context("nope:thing")
contexts = []
n = h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
check(n == 0 and contexts == [], f"unknown namespace listed {contexts}")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
check(contexts == [nbd.CONTEXT_BASE_ALLOCATION], f"mixed query listed {contexts}")

# Unknown exports are refused with NBD_REP_ERR_UNKNOWN (ENOENT), and the handshake goes on.
for name in ["nope", "x" * 4096, "é/../../etc/passwd"]:
    h.set_export_name(name)
    expect_option_error(h, f"opt_info({name[:20]!r})", errno.ENOENT, h.opt_info)
    expect_option_error(h, f"opt_go({name[:20]!r})", errno.ENOENT, h.opt_go)

# The list still works after the refusals.
exports = []
h.opt_list(lambda name, desc: exports.append(name) or 0)
check(exports == [""], f"opt_list after refusals: {exports}")

# INFO on the default export, many times on one connection.
h.set_export_name("")
h.set_full_info(True)
for _ in range(50):
    h.opt_info()
check(h.get_size() == size, f"opt_info: size {h.get_size()}, expected {size}")
check(h.aio_is_negotiating(), "opt_info must not end the handshake")
check(h.get_canonical_export_name() == "", "canonical export name")
check(h.get_export_description() != "", "opt_info with full info: no description")
check(not h.is_read_only(), "a read-write export is advertised read-only")
for flag, name in [(h.can_flush, "flush"), (h.can_fua, "fua"), (h.can_trim, "trim"), (h.can_zero, "zero"),
                   (h.can_fast_zero, "fast zero"), (h.can_df, "df"), (h.can_cache, "cache")]:
    check(flag(), f"export should advertise {name}")
minimum, preferred, maximum = (h.get_block_size(k) for k in
                               (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
check(minimum >= 1 and minimum & (minimum - 1) == 0, f"minimum block size {minimum}")
check(preferred >= max(minimum, 512) and preferred & (preferred - 1) == 0, f"preferred block size {preferred}")
check(maximum >= preferred, f"maximum block size {maximum} < preferred {preferred}")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation was not selected by opt_info")
check(not h.can_meta_context("nope:thing"), "an unknown context was selected")

# GO, then the export works.
h.opt_go()
check(h.aio_is_ready(), "opt_go did not enter transmission")
check(h.get_size() == size, "size after opt_go")
h.pwrite(b"handshake", 0)
check(h.pread(9, 0) == b"handshake", "read back after opt_go")
h.shutdown()

# ABORT ends the handshake cleanly: no error, the handle is closed (not dead).
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_list(lambda name, desc: 0)
h.opt_abort()
check(h.aio_is_closed(), "opt_abort: the handle is not closed")
check(not h.aio_is_dead(), "opt_abort: the connection died instead of closing cleanly")

# ABORT right away, before any other option.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_abort()
check(h.aio_is_closed(), "immediate opt_abort: the handle is not closed")

# Without NO_ZEROES, without structured replies, and without opt mode: still served.
for hflags, structured in [(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE, True),
                           (nbd.HANDSHAKE_FLAG_MASK, False),
                           (nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE, False)]:
    h = nbd.NBD()
    h.set_handshake_flags(hflags)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    check(h.get_structured_replies_negotiated() == structured, f"structured replies with flags {hflags}")
    check(h.get_size() == size, f"size with handshake flags {hflags}")
    check(h.pread(9, 0) == b"handshake", f"read with handshake flags {hflags}")
    check(h.can_df() == structured, "DF must be advertised exactly when structured replies are on")
    h.shutdown()

# Meta contexts need structured replies: libnbd itself refuses to ask without them.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_opt_mode(True)
h.connect_uri(uri)
try:
    h.opt_list_meta_context(lambda name: 0)
    fail("opt_list_meta_context succeeded without structured replies")
except nbd.Error as e:
    check(e.errnum == errno.ENOTSUP, f"opt_list_meta_context without structured replies: {e}")
h.opt_go()
check(h.pread(9, 0) == b"handshake", "read after refusals without structured replies")
h.shutdown()
print("ok")
