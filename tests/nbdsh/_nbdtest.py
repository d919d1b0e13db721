"""Shared helpers for the libnbd scripts in this directory (not a test itself).

Every script is run as `/usr/bin/python3 SCRIPT URI SIZE` by tests/nbdsh.rs against a fresh
`rdbd serve` of SIZE bytes, and exits non-zero with a "FAIL: ..." line on any unexpected result.
"""

import errno
import sys

import nbd


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def args():
    """(uri, size) from the command line."""
    if len(sys.argv) != 3:
        fail(f"usage: {sys.argv[0]} URI SIZE")
    return sys.argv[1], int(sys.argv[2])


def errname(num):
    return errno.errorcode.get(num, str(num))


def pattern(length, seed):
    """Deterministic bytes that differ between seeds and positions."""
    return bytes(((i * 31 + seed) ^ (i >> 8)) & 0xFF for i in range(length))


class Wire:
    """Captures libnbd's debug log to tell requests that reached the server from requests that
    libnbd refused locally."""

    def __init__(self, h):
        self.log = []
        h.set_debug_callback(lambda _ctx, msg: self.log.append(msg))
        h.set_debug(True)

    def clear(self):
        del self.log[:]

    def request_sent(self):
        return any("ISSUE_COMMAND.SEND_REQUEST" in m for m in self.log)

    def server_messages(self):
        return [m for m in self.log if "server message" in m]


def expect_error(h, wire, what, want, fn):
    """Runs fn, which must send one request that the server answers with errno `want`; the
    connection must stay usable."""
    wire.clear()
    try:
        fn()
    except nbd.Error as e:
        check(
            wire.request_sent(),
            f"{what}: libnbd refused the request locally ({e}), so the server never saw it",
        )
        check(
            e.errnum == want,
            f"{what}: server answered {errname(e.errnum)} ({e.string}), expected {errname(want)}",
        )
        check(h.aio_is_ready(), f"{what}: the connection is not usable after the error")
        return
    fail(f"{what}: succeeded, expected {errname(want)}")


def expect_option_error(h, what, want, fn):
    """Runs an opt_* call that the server must refuse with errno `want` (libnbd's mapping of the
    NBD_REP_ERR_* reply); negotiation must continue."""
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == want, f"{what}: got {errname(e.errnum)} ({e.string}), expected {errname(want)}")
        check(h.aio_is_negotiating(), f"{what}: the handshake did not continue after the error")
        return
    fail(f"{what}: succeeded, expected {errname(want)}")
