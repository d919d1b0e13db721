#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: rdbd serve vs nbdkit (file plugin) vs qemu-nbd.

Runs the same fio jobs (nbd ioengine, one connection) against each server in turn, on the same
pre-filled file, and prints a markdown table with rdbd's ratio to the best peer in each column.
This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.

    python3 benches/nbd_vs_peers.py [--runtime 30] [--size 1G] [--rounds 1]
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (column title, fio job options, how to read the result)
JOBS = [
    ("4k randread QD32 (IOPS)", "rw=randread\nbs=4k\niodepth=32\n", ("read", "iops")),
    ("4k randwrite QD32 (IOPS)", "rw=randwrite\nbs=4k\niodepth=32\n", ("write", "iops")),
    ("1M seqwrite QD8 (MiB/s)", "rw=write\nbs=1M\niodepth=8\nend_fsync=1\n", ("write", "bw_mib")),
]


def job_file(uri, runtime, opts, refill):
    return (
        "[global]\nioengine=nbd\nuri=%s\ntime_based=1\nruntime=%d\nramp_time=2\n"
        "group_reporting=1\nnumjobs=1\nrefill_buffers=%d\nnorandommap=1\nrandrepeat=0\n"
        "\n[job]\n%s" % (uri, runtime, refill, opts)
    )


def wait_for_port(port, proc, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen on port %d" % port)


def servers(rdbd, image, port):
    return {
        "rdbd": [rdbd, "serve", "--file", image, "--listen", "127.0.0.1:%d" % port],
        "nbdkit": ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "file", image],
        # -e 2 -t: allow more than one client and stay up (qemu-nbd's default is one client).
        "qemu-nbd": ["qemu-nbd", "-f", "raw", "-t", "-e", "2", "-b", "127.0.0.1", "-p", str(port), image],
    }


def cpu_seconds(pid):
    """User+system CPU seconds of a process and all its threads so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(job_path, result, server_pid):
    """Runs one fio job; returns (value, ops, server CPU s, fio CPU s, wall s)."""
    side, metric = result
    server_before = cpu_seconds(server_pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    out = subprocess.run(["fio", "--output-format=json", job_path], capture_output=True, text=True, check=True)
    wall = time.time() - start
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = cpu_seconds(server_pid) - server_before
    fio_cpu = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    text = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("fio:"))
    stats = json.loads(text)["jobs"][0][side]
    value = stats["iops"] if metric == "iops" else stats["bw"] / 1024.0
    return value, stats["total_ios"], server_cpu, fio_cpu, wall


def measure(argv, job_path, result, port):
    """Starts a server, runs one job; returns (value, server CPU µs per op, fio CPU share)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        value, ops, server_cpu, fio_cpu, wall = run_fio(job_path, result, proc.pid)
        return value, 1e6 * server_cpu / max(ops, 1), fio_cpu / wall
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio job (default 15)")
    ap.add_argument("--size", default="1G", help="size of the test file (default 1G)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; servers run back to back per job (default 5)")
    ap.add_argument("--port", type=int, default=10809)
    ap.add_argument("--rdbd", default=os.path.join(ROOT, "target", "release", "rdbd"))
    ap.add_argument("--dir", default=None, help="where to put the test file (default: a temporary directory)")
    ap.add_argument("--jobs", default="0,1,2", help="which columns to run, e.g. 2 for seqwrite only (default 0,1,2)")
    ap.add_argument("--no-refill", action="store_true",
                    help="let fio reuse its write buffers instead of regenerating them per I/O (a cheaper client)")
    args = ap.parse_args()

    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if not shutil.which(tool):
            sys.exit("missing %s: run tools/install-test-deps.sh first" % tool)
    if not os.path.exists(args.rdbd):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)

    workdir = tempfile.mkdtemp(prefix="rdbd-bench-", dir=args.dir)
    image = os.path.join(workdir, "disk.img")
    try:
        # A fully written file, so reads hit real data in the page cache for every server.
        subprocess.run(["dd", "if=/dev/urandom", "of=" + image, "bs=1M", "count=%d" % (parse_size(args.size) >> 20),
                        "status=none"], check=True)
        subprocess.run(["sync"], check=True)  # no writeback of the fill during the first server's run
        global JOBS
        JOBS = [JOBS[int(i)] for i in args.jobs.split(",")]
        job_paths = []
        for i, (_, opts, _) in enumerate(JOBS):
            path = os.path.join(workdir, "job%d.fio" % i)
            with open(path, "w") as f:
                f.write(job_file("nbd://127.0.0.1:%d/" % args.port, args.runtime, opts, 0 if args.no_refill else 1))
            job_paths.append(path)

        # The load of a shared machine drifts by tens of percent within minutes, so the servers
        # run back to back for each job (in a rotating order) and rdbd is compared with the best
        # peer of the same round: the ratio reported is the median of those paired ratios.
        names = list(servers(args.rdbd, image, args.port))
        runs = {}  # runs[name][job] = list of (value, cpu µs/op, fio share)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for j, ((title, _, result), path) in enumerate(zip(JOBS, job_paths)):
                for name in order:
                    print("round %d/%d, %s: %s" % (r + 1, args.rounds, title, name), file=sys.stderr, flush=True)
                    argv = servers(args.rdbd, image, args.port)[name]
                    runs.setdefault(name, [[] for _ in JOBS])[j].append(measure(argv, path, result, args.port))
        print_table(runs, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def print_table(runs, args):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print("\n%s, %d CPUs (%s), kernel %s, fio nbd engine over TCP loopback, 1 connection, %ds per job, "
          "%s file in page cache, %d rounds%s" % (now, os.cpu_count(), cpu_model(), platform.release(),
                                                   args.runtime, args.size, args.rounds,
                                                   ", refill_buffers=0" if args.no_refill else ""))
    print()
    print("Median over rounds:")
    print()
    print("| server | " + " | ".join(t for t, _, _ in JOBS) + " |")
    print("|---|" + "---|" * len(JOBS))
    for name, jobs in runs.items():
        print("| %s | %s |" % (name, " | ".join(fmt(median([v for v, _, _ in js])) for js in jobs)))
    peers = [n for n in runs if n != "rdbd"]
    if "rdbd" in runs and peers:
        cells = []
        for j in range(len(JOBS)):
            ratios = []
            for r, (v, _, _) in enumerate(runs["rdbd"][j]):
                best = max(runs[p][j][r][0] for p in peers)
                ratios.append(v / best if best else float("nan"))
            cells.append("**%.2f×** (%.2f–%.2f)" % (median(ratios), min(ratios), max(ratios)))
        print("| rdbd / best peer, paired per round: median (range) | " + " | ".join(cells) + " |")
    print()
    print("Server CPU per operation, all threads (lower is better) / fio's own CPU use (100% = one core:")
    print("the client is the bottleneck), medians:")
    print()
    print("| server | " + " | ".join(t.split(" (")[0] for t, _, _ in JOBS) + " |")
    print("|---|" + "---|" * len(JOBS))
    for name, jobs in runs.items():
        cells = ["%.1f µs / fio %.0f%%" % (median([c for _, c, _ in js]), 100 * median([f for _, _, f in js]))
                 for js in jobs]
        print("| %s | %s |" % (name, " | ".join(cells)))


def fmt(v):
    return "%.0fk" % (v / 1000) if v >= 10000 else "%.0f" % v


if __name__ == "__main__":
    main()
