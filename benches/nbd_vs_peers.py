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


def job_file(uri, runtime, opts):
    return (
        "[global]\nioengine=nbd\nuri=%s\ntime_based=1\nruntime=%d\nramp_time=2\n"
        "group_reporting=1\nnumjobs=1\nrefill_buffers=1\nnorandommap=1\nrandrepeat=0\n"
        "\n[job]\n%s" % (uri, runtime, opts)
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


def measure(argv, job_paths, port):
    """Starts a server, runs every job; returns per job (value, server CPU µs per op, fio CPU share)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        results = []
        for path, (_, _, result) in zip(job_paths, JOBS):
            value, ops, server_cpu, fio_cpu, wall = run_fio(path, result, proc.pid)
            results.append((value, 1e6 * server_cpu / max(ops, 1), fio_cpu / wall))
        return results
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
    ap.add_argument("--runtime", type=int, default=30, help="seconds per fio job (default 30)")
    ap.add_argument("--size", default="1G", help="size of the test file (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell is the median (default 3)")
    ap.add_argument("--port", type=int, default=10809)
    ap.add_argument("--rdbd", default=os.path.join(ROOT, "target", "release", "rdbd"))
    ap.add_argument("--dir", default=None, help="where to put the test file (default: a temporary directory)")
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
        job_paths = []
        for i, (_, opts, _) in enumerate(JOBS):
            path = os.path.join(workdir, "job%d.fio" % i)
            with open(path, "w") as f:
                f.write(job_file("nbd://127.0.0.1:%d/" % args.port, args.runtime, opts))
            job_paths.append(path)

        # Rounds interleave the servers so that drifting machine load hits them alike; the
        # median of each cell is reported.
        rounds = {}
        for r in range(args.rounds):
            for name, argv in servers(args.rdbd, image, args.port).items():
                print("round %d/%d: %s ..." % (r + 1, args.rounds, name), file=sys.stderr, flush=True)
                rounds.setdefault(name, []).append(measure(argv, job_paths, args.port))
        print_table(rounds, args)
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


def print_table(rounds, args):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print("\n%s, %d CPUs (%s), kernel %s, fio nbd engine over TCP loopback, 1 connection, "
          "%ds per job, %s file in page cache, median of %d interleaved rounds"
          % (now, os.cpu_count(), cpu_model(), platform.release(), args.runtime, args.size, args.rounds))
    # cell[name][job] = (value, server CPU µs per op, fio CPU share), each the median over rounds
    cell = {name: [tuple(median([r[j][k] for r in runs]) for k in range(3)) for j in range(len(JOBS))]
            for name, runs in rounds.items()}
    print()
    print("| server | " + " | ".join(t for t, _, _ in JOBS) + " |")
    print("|---|" + "---|" * len(JOBS))
    for name, vals in cell.items():
        print("| %s | %s |" % (name, " | ".join(fmt(v) for v, _, _ in vals)))
    peers = [v for n, v in cell.items() if n != "rdbd"]
    if "rdbd" in cell and peers:
        ratios = []
        for j, (v, _, _) in enumerate(cell["rdbd"]):
            best = max(p[j][0] for p in peers)
            ratios.append("%.2f×" % (v / best) if best else "n/a")
        print("| **rdbd / best peer** | " + " | ".join(ratios) + " |")
    print()
    print("Server CPU time per operation in µs (all threads; lower is better) / fio's own CPU use")
    print("(100% = one core: the client is the bottleneck):")
    print()
    print("| server | " + " | ".join(t.split(" (")[0] for t, _, _ in JOBS) + " |")
    print("|---|" + "---|" * len(JOBS))
    for name, vals in cell.items():
        print("| %s | %s |" % (name, " | ".join("%.1f µs / fio %.0f%%" % (c, 100 * f) for _, c, f in vals)))


def fmt(v):
    return "%.0fk" % (v / 1000) if v >= 10000 else "%.0f" % v


if __name__ == "__main__":
    main()
