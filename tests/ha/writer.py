#!/usr/bin/env python3
"""A writer for the HA tests: writes 4 KiB blocks in a cycle through one NBD server, each
followed by a flush, and logs every write the server acknowledged (the flush returned):

    ack WRITER SEQ BLOCK MONOTONIC_NS

Each block's data starts with "WRITER SEQ BLOCK\\n". Blocks FIRST..FIRST+BLOCKS are this writer's
alone, so that every write it was told is done can be looked for afterwards. It reconnects whenever the server goes
away or serves nothing (a Secondary), and stops when STOP_FILE exists or after MAX_SECONDS.

usage: writer.py URI WRITER FIRST BLOCKS LOG STOP_FILE MAX_SECONDS
"""
import os
import sys
import time

import nbd

uri, writer, first, blocks, log_path, stop_file, max_seconds = sys.argv[1:8]
first, blocks = int(first), int(blocks)
end = time.monotonic() + float(max_seconds)
log = open(log_path, "a", buffering=1)


def done():
    return time.monotonic() > end or os.path.exists(stop_file)


def wait(h, cookie):
    """Waits for one command; False if the writer must stop first (it may be frozen)."""
    while not h.aio_command_completed(cookie):
        if done():
            return False
        h.poll(100)
    return True


seq = 0
while not done():
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        del h
        time.sleep(0.05)
        continue
    try:
        while not done():
            seq += 1
            block = first + seq % blocks
            head = f"{writer} {seq} {block}\n".encode()
            if not wait(h, h.aio_pwrite(head + b"\0" * (4096 - len(head)), block * 4096)):
                break
            if not wait(h, h.aio_flush()):
                break
            log.write(f"ack {writer} {seq} {block} {time.monotonic_ns()}\n")
    except nbd.Error as e:
        log.write(f"error {writer} {seq} {e}\n")
    del h
