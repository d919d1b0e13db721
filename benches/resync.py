#!/usr/bin/env python3
"""Resync: how fast rdbd brings a peer up to date, and what the application sees meanwhile.

A two-node resource on this machine (alpha Primary, beta Secondary, protocol C over loopback,
both backing files in one temporary directory on the same filesystem), as in
replication_vs_standalone.py, in three parts (--parts 1,2,3):

1. Full initial sync vs dd. alpha's data area (the first `data-size` bytes of its file, as
   `rdbd show-md` prints; internal metadata sits behind it) holds --size of pseudo-random data,
   beta's file starts sparse. Per round, with the page cache dropped before each: `dd
   iflag=direct oflag=direct conv=notrunc bs=4M` of the same bytes to a scratch file, then fresh
   metadata on both nodes (a full sync; the scratch file and beta's are kept across rounds, so
   from round 2 both copies overwrite blocks written before), `up` both, and the time from `primary --force` on alpha until both report
   Established and UpToDate (polled every 50 ms), then `down` both. The data areas are compared
   byte for byte after the last round.
2. Bitmap resync. The pair in sync; `rdbd disconnect` on beta; --dirty of 4 KiB writes through NBD
   on alpha to distinct random blocks (fio randwrite with its random map, every block once) over
   a region of exactly --dirty, then again spread over a region 4x larger (fragmented runs);
   `rdbd connect`, wait for sync, and compare alpha's `last_resync_bytes` with what was written.
3. Application I/O during a full resync. alpha Primary alone (fresh metadata, --load-size of data)
   runs fio (4k randwrite QD16, time based) on its NBD export; 2 s into it beta comes up with fresh
   metadata, which starts a full sync. alpha's `status --json` is sampled every 500 ms next to
   fio's IOPS log; then the same fio job runs on the in-sync pair for comparison.

This is a benchmark, not a test: it asserts nothing about speed. Needs root (drop_caches), fio with
the nbd engine, dd and cmp. Every daemon is stopped on exit, as in replication_vs_standalone.py.

    python3 benches/resync.py [--rounds 3] [--size 2G] [--dirty 256M] [--load-size 4G] [--parts 1,2,3]
"""

import argparse
import datetime
import glob
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_vs_peers import cpu_model  # noqa: E402
from replication_vs_standalone import (  # noqa: E402  (one definition of the two-node setup)
    RES, ROOT, Connected, Daemons, kill_fio, log, machine_cpu, median, on_signal, parse_fio, parse_size,
    port_free, proc_cpu, source_version, start_fio, thread_cpu, thread_delta, wait_for_port)

MiB = 1 << 20
CHUNK = 64 * MiB  # pseudo-random data, written repeatedly
DD_BS = 4 * MiB
RESYNC_DELAY = 2.0  # seconds into fio at which beta comes up in part 3
SAMPLE = 0.5  # seconds between status samples in part 3
SYNC_TIMEOUT = 600  # the longest any wait for a sync may take


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fresh_file(path, size):
    """A new sparse file (the old one's blocks freed)."""
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def fill(path, nbytes):
    """Writes nbytes of pseudo-random data from the start of path, then syncs it."""
    chunk = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY)
    try:
        off = 0
        while off < nbytes:
            n = min(CHUNK, nbytes - off)
            os.pwrite(fd, memoryview(chunk)[:n], off)
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)


def run(argv, timeout):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), out.returncode, (out.stderr or out.stdout).strip()))
    return out


class Pair(Connected):
    """The two-node resource of replication_vs_standalone.py, driven step by step."""

    def create_md(self, node):
        self.verb("create-md", RES, "--node", node, "--force")

    def data_size(self, node):
        out = self.verb("show-md", RES, "--node", node).stdout
        m = re.search(r"^data-size (\d+)", out, re.M)
        if not m:
            raise RuntimeError("no data-size in rdbd show-md: %s" % out)
        return int(m.group(1))

    def down(self):
        self.stop()
        for node, p in self.procs.items():
            if p.poll() is None:
                raise RuntimeError("rdbd down left %s running" % node)
        self.procs = {}
        self.primary = False

    def promote(self, force=False):
        self.verb("primary", RES, "--node", "alpha", *(["--force"] if force else []))
        self.primary = True

    @staticmethod
    def synced(s):
        return (Connected.in_sync(s["alpha"]) and s["beta"]["disk"] == "UpToDate"
                and s["beta"]["replication"] == "Established")

    def wait_synced(self, what, timeout=SYNC_TIMEOUT, interval=0.05):
        return self.wait(what, self.synced, timeout=timeout, interval=interval)

    def wait_connected(self):
        return self.wait("the nodes to connect", lambda s: all(
            s[n]["connection"] == "Connected" and s[n]["replication"] == "Established" for n in s))


def rates_cpu(before, after, pids):
    """CPU seconds per process and per thread group between two (proc, threads) samples."""
    out = {}
    for n in pids:
        total = after[0][n] - before[0][n]
        out[n] = (total, thread_delta(before[1][n], after[1][n], total))
    return out


def cpu_sample(pids):
    return ({n: proc_cpu(p) for n, p in pids.items()}, {n: thread_cpu(p) for n, p in pids.items()})


def fmt_cpu(cpu, seconds):
    parts = []
    for n, (total, groups) in cpu.items():
        gs = ", ".join("%s %.2f" % (g, v) for g, v in sorted(groups.items(), key=lambda gv: -gv[1]) if v >= 0.01)
        parts.append("%s %.2f s = %.2f cores (%s)" % (n, total, total / seconds, gs or "-"))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# part 1


def part1(pair, workdir, args, report):
    alpha, beta, scratch = (os.path.join(workdir, n) for n in ("alpha.img", "beta.img", "scratch.img"))
    size = parse_size(args.size)
    fresh_file(alpha, size)
    fresh_file(beta, size)
    pair.write_config({"alpha": alpha, "beta": beta})
    pair.create_md("alpha")
    data = pair.data_size("alpha")
    log("part 1: filling alpha's data area (%d bytes) with pseudo-random data" % data)
    t = time.perf_counter()
    fill(alpha, data)
    log("  filled in %.1f s" % (time.perf_counter() - t))
    count = data // DD_BS
    rounds = []
    # dd's target and beta's disk are kept across rounds (dd with conv=notrunc, beta with fresh
    # metadata only): from the second round on both overwrite blocks they wrote before. Deleting
    # 2 GiB files between rounds would make the next copy race the discards of their blocks
    # (this file system is mounted with `discard`), which slowed whichever copy came second.
    fresh_file(scratch, size)
    for r in range(args.rounds):
        drop_caches()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        run(["dd", "if=" + alpha, "of=" + scratch, "iflag=direct", "oflag=direct", "conv=notrunc",
             "bs=%d" % DD_BS, "count=%d" % count], timeout=SYNC_TIMEOUT)
        dd_s = time.perf_counter() - t
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        dd_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        dd_mib = count * DD_BS / MiB / dd_s
        pair.create_md("alpha")
        pair.create_md("beta")
        drop_caches()
        pair.up("alpha")
        pair.up("beta")
        pair.wait_connected()
        pids = pair.pids()
        c0, m0 = cpu_sample(pids), machine_cpu()
        t = time.perf_counter()
        pair.promote(force=True)
        pair.wait_synced("the initial sync")
        sync_s = time.perf_counter() - t
        c1, m1 = cpu_sample(pids), machine_cpu()
        sent = pair.status("alpha")["last_resync_bytes"]
        cpu = rates_cpu(c0, c1, pids)
        busy = os.cpu_count() * (m1[0] - m0[0]) / max(m1[2] - m0[2], 1)
        rd_mib = data / MiB / sync_s
        rounds.append({"dd": dd_mib, "rdbd": rd_mib, "dd_s": dd_s, "sync_s": sync_s, "sent": sent,
                       "dd_cpu": dd_cpu, "cpu": cpu, "busy": busy})
        log("  round %d: dd %.0f MiB/s (%.2f s), rdbd %.0f MiB/s (%.2f s, %s bytes sent), %.2f×; rdbd CPU: %s; "
            "machine busy %.2f cores" % (r + 1, dd_mib, dd_s, rd_mib, sync_s, sent, rd_mib / dd_mib,
                                         fmt_cpu(cpu, sync_s), busy))
        pair.down()

    os.unlink(scratch)
    same = subprocess.run(["cmp", "-n", str(data), alpha, beta], capture_output=True, text=True,
                          timeout=SYNC_TIMEOUT)
    identical = same.returncode == 0
    ratios = [x["rdbd"] / x["dd"] for x in rounds]
    report += [
        "### Part 1: full initial sync vs dd",
        "",
        "%s of pseudo-random data (data-size %d bytes) on alpha, beta sparse at first; page cache dropped "
        "before every copy; dd `iflag=direct oflag=direct conv=notrunc bs=4M count=%d` to a scratch file; "
        "dd's file and beta's are kept across rounds (both copies write into a sparse file in round 1 "
        "and overwrite in later rounds; deleting them between rounds made the next copy race the "
        "file system's discards); rdbd: from "
        "`primary --force` until both nodes report Established/UpToDate (50 ms polling)."
        % (args.size, data, count),
        "",
        "| round | dd (MiB/s) | rdbd full sync (MiB/s) | rdbd / dd |",
        "|---|---|---|---|",
    ]
    for i, x in enumerate(rounds):
        report.append("| %d | %.0f (%.2f s) | %.0f (%.2f s) | %.2f× |" % (
            i + 1, x["dd"], x["dd_s"], x["rdbd"], x["sync_s"], x["rdbd"] / x["dd"]))
    report.append("| **median** | **%.0f** | **%.0f** | **%.2f×** (%.2f–%.2f) |" % (
        median([x["dd"] for x in rounds]), median([x["rdbd"] for x in rounds]), median(ratios), min(ratios),
        max(ratios)))
    report += [
        "",
        "Goal ≥ 0.9× dd: %s (median %.2f×). Bytes sent per sync (alpha's `last_resync_bytes`): %s. "
        "Replicas after the last round: %s."
        % ("met" if median(ratios) >= 0.9 else "NOT met", median(ratios),
           ", ".join(str(x["sent"]) for x in rounds),
           "**byte-identical** (cmp of the data areas)" if identical
           else "**DIFFERENT**: %s" % (same.stdout or same.stderr).strip()),
        "",
        "CPU during the sync (user+system, per process and thread group, median round by time): %s; "
        "dd itself: %.2f s of CPU; machine busy during the sync: %.2f of %d cores."
        % (fmt_cpu(sorted(rounds, key=lambda x: x["sync_s"])[len(rounds) // 2]["cpu"],
                   sorted(rounds, key=lambda x: x["sync_s"])[len(rounds) // 2]["sync_s"]),
           median([x["dd_cpu"] for x in rounds]), median([x["busy"] for x in rounds]), os.cpu_count()),
        "",
    ]
    return {"alpha": alpha, "beta": beta, "data": data, "identical": identical}


# ---------------------------------------------------------------------------------------------
# part 2


def dirty_job(path, uri, region, nbytes):
    with open(path, "w") as f:
        f.write("[global]\nioengine=nbd\nuri=%s\n\n[dirty]\nrw=randwrite\nbs=4k\niodepth=16\noffset=0\n"
                "size=%d\nio_size=%d\nrefill_buffers=1\nrandrepeat=0\n" % (uri, region, nbytes))
    # norandommap is off: fio's random map makes every 4 KiB block of the region written at most once


def part2(pair, workdir, args, report, disks):
    dirty = parse_size(args.dirty)
    if disks is None:  # part 1 did not run: a pair of blank disks, in sync without a sync
        size = max(parse_size(args.size), 4 * dirty + 64 * MiB)
        disks = {n: os.path.join(workdir, n + ".img") for n in ("alpha", "beta")}
        for p in disks.values():
            fresh_file(p, size)
        pair.write_config(disks)
        pair.create_md("alpha")
        pair.create_md("beta")
        pair.up("alpha")
        pair.up("beta")
        pair.wait_connected()
        pair.verb("new-current-uuid", RES, "--node", "alpha", "--clear-bitmap")
        data = pair.data_size("alpha")
    else:
        data = disks["data"]
        pair.up("alpha")
        pair.up("beta")
        pair.wait_connected()
    pair.promote()
    st = pair.wait_synced("the pair in sync before part 2")
    wait_for_port(pair.nbd_port, list(pair.procs.values()))
    reconnect_sent = st["alpha"]["last_resync_bytes"]
    rows = []
    for label, region in (("dense", dirty), ("spread 4×", 4 * dirty)):
        if region > data:
            log("part 2: skipping %s: a region of %d bytes does not fit in %d" % (label, region, data))
            continue
        pair.verb("disconnect", RES, "--node", "beta")
        pair.wait("alpha to lose beta", lambda s: s["alpha"]["connection"] != "Connected")
        job = os.path.join(workdir, "dirty.fio")
        dirty_job(job, pair.uri, region, dirty)
        log("part 2, %s: writing %d MiB in 4 KiB blocks over %d MiB while disconnected"
            % (label, dirty // MiB, region // MiB))
        with tempfile.TemporaryFile("w+") as out:
            proc = start_fio(job, out)
            try:
                rc = proc.wait(timeout=SYNC_TIMEOUT)
            except BaseException:
                kill_fio(proc)
                raise
            out.seek(0)
            w = parse_fio(job, rc, out.read())
        written = w["io_bytes"]
        marked = pair.status("alpha")["out_of_sync_bytes"]
        t = time.perf_counter()
        pair.verb("connect", RES, "--node", "beta")
        st = pair.wait_synced("the bitmap resync (%s)" % label)
        resync_s = time.perf_counter() - t
        sent = st["alpha"]["last_resync_bytes"]
        received = st["beta"]["last_resync_bytes"]
        rows.append((label, region, written, w["total_ios"], marked, sent, received, resync_s))
        log("  wrote %d bytes (%d writes), marked %d, resync sent %s, received %s, %.2f s from connect"
            % (written, w["total_ios"], marked, sent, received, resync_s))
    report += [
        "### Part 2: bitmap resync after writing while disconnected",
        "",
        "`rdbd disconnect` on beta, N MiB of 4 KiB writes to distinct random blocks on alpha through NBD "
        "(fio randwrite QD16 with its random map), `rdbd connect` on beta; sent = alpha's "
        "`last_resync_bytes`; time from `connect` until both report in sync.",
        "",
        "| writes | region | N written | marked out of sync | resync sent | sent / N | time | MiB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, region, written, ios, marked, sent, received, resync_s in rows:
        report.append("| %s | %d MiB | %d MiB (%d writes) | %.1f MiB | %.1f MiB | **%.3f** | %.2f s | %.0f |" % (
            label, region // MiB, written // MiB, ios, marked / MiB, (sent or 0) / MiB, (sent or 0) / written,
            resync_s, (sent or 0) / MiB / resync_s))
    worst = max(((r[5] or 0) / r[2] for r in rows), default=float("nan"))
    report += [
        "",
        "Goal sent / N ≤ 1.05: %s (worst %.3f). beta's `last_resync_bytes` (received): %s. "
        "Resync bytes on the reconnect before part 2 (after `down`/`up` of an in-sync pair): %s."
        % ("met" if worst <= 1.05 else "NOT met", worst, ", ".join(str(r[6]) for r in rows), reconnect_sent),
        "",
    ]
    pair.down()


# ---------------------------------------------------------------------------------------------
# part 3


def load_job(path, uri, size, runtime, log_prefix):
    with open(path, "w") as f:
        f.write("[global]\nioengine=nbd\nuri=%s\nsize=%d\ntime_based=1\nruntime=%d\nnorandommap=1\n"
                "randrepeat=0\nrefill_buffers=1\nwrite_iops_log=%s\nlog_avg_msec=%d\n\n[load]\n"
                "rw=randwrite\nbs=4k\niodepth=16\n" % (uri, size, runtime, log_prefix, int(SAMPLE * 1000)))


def read_iops_log(prefix):
    """[(seconds since the job started, IOPS over the interval ending there)]"""
    files = sorted(glob.glob(prefix + "_iops*.log"))
    if not files:
        raise RuntimeError("fio wrote no IOPS log at %s_iops*.log" % prefix)
    out = []
    with open(files[0]) as f:
        for line in f:
            fields = [x.strip() for x in line.split(",")]
            if len(fields) >= 2 and fields[0].isdigit():
                out.append((int(fields[0]) / 1000.0, int(fields[1])))
    return out


def nearest(series, t, used=None):
    """Index of the fio log interval ending nearest to t, within a quarter of a second (None if
    none). fio's clock starts when its job starts, a few tens of ms after the process: close
    enough at 500 ms. Indexes in used are skipped, so that one interval goes to one sample."""
    near = [(abs(end - t), i) for i, (end, _) in enumerate(series)
            if abs(end - t) <= SAMPLE / 2 + 0.05 and (used is None or i not in used)]
    return min(near)[1] if near else None


def sample_alpha(pair, t0, samples):
    """(seconds since t0 when the answer came, alpha's status, how long the verb took)"""
    a = time.time()
    st = pair.status("alpha")
    b = time.time()
    samples.append((b - t0, st, b - a))


def run_load(pair, job, runtime, sample, on_tick=None):
    """Runs a fio job while sampling alpha's status every SAMPLE s; returns (fio result, samples)."""
    samples = []
    with tempfile.TemporaryFile("w+") as out:
        proc = start_fio(job, out)
        t0 = time.time()
        try:
            while proc.poll() is None:
                if time.time() - t0 > runtime + 60:
                    raise RuntimeError("fio did not end within %d s" % (runtime + 60))
                if on_tick:
                    on_tick(time.time() - t0)
                if sample:
                    sample_alpha(pair, t0, samples)
                # the next multiple of SAMPLE: a slow status call skips ticks instead of bunching them
                time.sleep(SAMPLE - (time.time() - t0) % SAMPLE)
            rc = proc.wait()
        except BaseException:
            kill_fio(proc)
            raise
        out.seek(0)
        w = parse_fio(job, rc, out.read())
    return w, samples, t0


def part3(pair, workdir, args, report):
    alpha, beta = os.path.join(workdir, "load-alpha.img"), os.path.join(workdir, "load-beta.img")
    size = parse_size(args.load_size)
    fresh_file(alpha, size)
    fresh_file(beta, size)
    pair.write_config({"alpha": alpha, "beta": beta})
    pair.create_md("alpha")
    pair.create_md("beta")
    data = pair.data_size("alpha")
    region = data // MiB * MiB
    log("part 3: filling alpha's data area (%d bytes)" % data)
    fill(alpha, data)
    drop_caches()
    pair.up("alpha")
    pair.wait("alpha's daemon to answer", lambda s: True)
    pair.promote(force=True)  # alone: it serves NBD; beta comes up 2 s into the load
    pair.wait("alpha Primary", lambda s: s["alpha"]["role"] == "Primary" and s["alpha"]["nbd"])
    wait_for_port(pair.nbd_port, list(pair.procs.values()))

    prefix = os.path.join(workdir, "resync")
    job = os.path.join(workdir, "load.fio")
    load_job(job, pair.uri, region, args.load_runtime, prefix)
    started = []

    def tick(t):
        if not started and t >= RESYNC_DELAY:
            pair.up("beta")
            started.append(t)

    log("part 3: fio %d s on alpha, beta up (fresh metadata: full sync) at %.0f s" % (args.load_runtime, RESYNC_DELAY))
    w, samples, t0 = run_load(pair, job, args.load_runtime, True, tick)
    # the resync goes on after fio: keep sampling until it ends
    deadline = time.time() + SYNC_TIMEOUT
    while True:
        sample_alpha(pair, t0, samples)
        st = {"alpha": samples[-1][1], "beta": pair.status("beta")}
        if pair.synced(st):
            break
        if time.time() > deadline:
            raise RuntimeError("the resync did not end within %d s: %s" % (SYNC_TIMEOUT, st))
        time.sleep(SAMPLE)
    series = read_iops_log(prefix)

    log("part 3: the same fio job on the in-sync pair")
    base_prefix = os.path.join(workdir, "insync")
    base_job = os.path.join(workdir, "base.fio")
    load_job(base_job, pair.uri, region, args.load_runtime, base_prefix)
    drop_caches()
    bw, _, _ = run_load(pair, base_job, args.load_runtime, False)
    base_series = read_iops_log(base_prefix)
    if not pair.synced({n: pair.status(n) for n in ("alpha", "beta")}):
        raise RuntimeError("the pair left the in-sync state during the comparison run")
    pair.down()

    # rows: resync MiB/s from the change of out_of_sync_bytes between consecutive samples
    rows, resync_rates = [], []
    used = set()
    prev = None
    first = last = None
    for t, st, lat in samples:
        rate = None
        if prev is not None and prev[1]["replication"] == "SyncSource" and st["replication"] in (
                "SyncSource", "Established") and t - prev[0] > 0.05:
            rate = (prev[1]["out_of_sync_bytes"] - st["out_of_sync_bytes"]) / MiB / (t - prev[0])
        if st["replication"] == "SyncSource" and first is None:
            first = t
        if st["replication"] == "SyncSource" or (prev is not None and prev[1]["replication"] == "SyncSource"):
            last = t
        i = nearest(series, t, used)
        if i is not None:
            used.add(i)
            if rate is not None:
                resync_rates.append(rate)
        j = nearest(base_series, t)
        rows.append((t, None if i is None else series[i][1], None if j is None else base_series[j][1], st, rate, lat))
        prev = (t, st)
    for i, (end, v) in enumerate(series):  # intervals no sample fell on (a status call was slow)
        if i not in used:
            j = nearest(base_series, end)
            rows.append((end, v, None if j is None else base_series[j][1], None, None, None))
    rows.sort(key=lambda r: r[0])
    slow = max(samples, key=lambda x: x[2])
    sync_total = last - first if first is not None and last is not None else float("nan")
    before = [v for end, v in series if end <= (started[0] if started else RESYNC_DELAY)]
    after = [v for end, v in series if first is not None and end > first]
    joining = [(v, end) for end, v in series if end > (started[0] if started else RESYNC_DELAY)]
    low = min(joining) if joining else (float("nan"), float("nan"))
    report += [
        "### Part 3: application I/O during a full resync",
        "",
        "%s device (data-size %d), pseudo-random data on alpha; fio 4k randwrite QD16 for %d s on alpha's NBD "
        "export (page cache dropped first); beta up with fresh metadata %.1f s into it (a full sync); "
        "alpha's `status --json` every %.1f s; resync MiB/s from the change of `out_of_sync_bytes` "
        "between samples (application writes do not clear bits: only resync acknowledgements do). "
        "IOPS: fio's `write_iops_log`, %d ms averages, aligned with the samples to ±0.1 s; the "
        "right column is the same job on the in-sync pair, at the same second."
        % (args.load_size, data, args.load_runtime, RESYNC_DELAY, SAMPLE, int(SAMPLE * 1000)),
        "",
        "| t (s) | app IOPS during resync | resync MiB/s | state | done % | out of sync (MiB) | rate (status, MiB/s) | app IOPS, in sync |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, app, base, st, rate, lat in rows:
        num = lambda v: "-" if v is None else "%d" % v  # noqa: E731
        if st is None:
            report.append("| %.1f | %s | | (no sample) | | | | %s |" % (t, num(app), num(base)))
            continue
        rs = st.get("resync") or {}
        report.append("| %.1f | %s | %s | %s%s | %s | %.0f | %s | %s |" % (
            t, num(app), "-" if rate is None else "%.0f" % rate, st["replication"],
            " (status took %.1f s)" % lat if lat > 0.3 else "", "%.1f" % rs["done_percent"] if rs else "-",
            st["out_of_sync_bytes"] / MiB, "%.0f" % (rs["rate_bytes_per_sec"] / MiB) if rs else "-", num(base)))
    avg = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    report += [
        "",
        "fio during the resync run: %.0f IOPS overall; %.0f while alpha was alone (not replicating, "
        "before beta came up), **%.0f while the resync ran**, lowest 500 ms interval after beta came up "
        "%d IOPS (at %.1f s); the same job on the in-sync pair: **%.0f IOPS**. Resync while fio ran: "
        "**%.0f MiB/s** median of the samples (min %.0f, max %.0f); the whole resync took %.1f s for %d MiB "
        "(alpha's `last_resync_bytes`: %s)."
        % (w["iops"], avg(before), avg(after), low[0], low[1], bw["iops"],
           median(resync_rates) if resync_rates else float("nan"),
           min(resync_rates) if resync_rates else float("nan"), max(resync_rates) if resync_rates else float("nan"),
           sync_total, data // MiB, samples[-1][1]["last_resync_bytes"]),
        "The slowest `rdbd status --json` on alpha took %.2f s (answered at %.1f s, state %s)."
        % (slow[2], slow[0], slow[1]["replication"]),
        "",
    ]


# ---------------------------------------------------------------------------------------------
# main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part 1 (default 3)")
    ap.add_argument("--size", default="2G", help="backing file size for parts 1 and 2 (default 2G)")
    ap.add_argument("--dirty", default="256M", help="data written while disconnected in part 2 (default 256M)")
    ap.add_argument("--load-size", default="4G", help="backing file size for part 3 (default 4G)")
    ap.add_argument("--load-runtime", type=int, default=20, help="seconds of fio in part 3 (default 20)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    ap.add_argument("--port-base", type=int, default=20900,
                    help="alpha/beta NBD on +1/+2, replication on +3/+4 (default 20900)")
    ap.add_argument("--rdbd", default=os.path.join(ROOT, "target", "release", "rdbd"))
    ap.add_argument("--dir", default="/tmp", help="where to create the temporary directory (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the directory (daemon logs) afterwards")
    ap.add_argument("--disk-options", default="",
                    help='lines for the resource file\'s [disk] table, e.g. \'c-fill-target = "64MiB"\'')
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not parts <= {1, 2, 3}:
        sys.exit("--parts: choose from 1,2,3")
    for tool in ("fio", "dd", "cmp"):
        if not shutil.which(tool):
            sys.exit("missing %s: run tools/install-test-deps.sh first" % tool)
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        sys.exit("needs root: the page cache is dropped between runs")
    if not os.path.exists(args.rdbd):
        sys.exit("no rdbd binary at %s (cargo build --release)" % args.rdbd)
    busy = [p for p in range(args.port_base + 1, args.port_base + 5) if not port_free(p)]
    if busy:
        sys.exit("ports in use: %s (choose another --port-base)" % busy)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    workdir = tempfile.mkdtemp(prefix="rdbd-resync-bench-", dir=args.dir)
    daemons = Daemons()
    pair = None
    report = []
    started = time.time()
    try:
        rdbd = os.path.join(workdir, "rdbd")
        shutil.copy2(args.rdbd, rdbd)  # one binary for the whole run, whatever cargo does meanwhile
        version = source_version(rdbd)
        pair = Pair(rdbd, workdir, args.port_base, daemons)
        if args.disk_options:
            pair.extra_config = "\n[disk]\n%s\n" % args.disk_options.replace(";", "\n")
        disks = None
        if 1 in parts:
            disks = part1(pair, workdir, args, report)
        if 2 in parts:
            part2(pair, workdir, args, report, disks)
        if disks:
            for p in (disks["alpha"], disks["beta"]):
                os.unlink(p)
        if 3 in parts:
            part3(pair, workdir, args, report)
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print("## Resync (benches/resync.py)\n")
        print("### %s — %d CPUs (%s), kernel %s, %s" % (now, os.cpu_count(), cpu_model(), platform.release(),
                                                       version))
        print()
        print("Command: `%s` (%.0f s). Files in %s (%s), protocol C over loopback, "
              "resync options at their defaults." % (" ".join(["python3", "benches/resync.py"] + sys.argv[1:]), time.time() - started, args.dir,
                                                     fs_type(args.dir)))
        print()
        print("\n".join(report))
    except KeyboardInterrupt:
        log("interrupted: stopping the daemons")
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        daemons.stop_all(graceful=pair.stop if pair else None)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def fs_type(path):
    try:
        return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    main()
