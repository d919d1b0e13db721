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


def job_file(uri, runtime):
    text = (
        "[global]\nioengine=nbd\nuri=%s\ntime_based=1\nruntime=%d\nramp_time=2\n"
        "group_reporting=1\nnumjobs=1\nrefill_buffers=1\nnorandommap=1\nrandrepeat=0\n" % (uri, runtime)
    )
    for i, (_, opts, _) in enumerate(JOBS):
        text += "\n[job%d]\nstonewall\n%s" % (i, opts)
    return text


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


def run_fio(job_path):
    out = subprocess.run(["fio", "--output-format=json", job_path], capture_output=True, text=True, check=True)
    text = "\n".join(l for l in out.stdout.splitlines() if not l.startswith("fio:"))
    results = []
    for job, (_, _, (side, metric)) in zip(json.loads(text)["jobs"], JOBS):
        stats = job[side]
        results.append(stats["iops"] if metric == "iops" else stats["bw"] / 1024.0)
    return results


def measure(name, argv, job_path, port):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        return run_fio(job_path)
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
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison N times and keep each server's best")
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
        job_path = os.path.join(workdir, "bench.fio")
        with open(job_path, "w") as f:
            f.write(job_file("nbd://127.0.0.1:%d/" % args.port, args.runtime))

        table = {}
        for _ in range(args.rounds):
            for name, argv in servers(args.rdbd, image, args.port).items():
                print("running %s ..." % name, file=sys.stderr, flush=True)
                got = measure(name, argv, job_path, args.port)
                best = table.get(name)
                table[name] = got if best is None else [max(a, b) for a, b in zip(best, got)]
        print_table(table, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def print_table(table, args):
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print("\n%s, %d CPUs (%s), kernel %s, fio nbd engine, 1 connection, %ds per job, %s file in page cache"
          % (now, os.cpu_count(), cpu_model(), platform.release(), args.runtime, args.size))
    print()
    print("| server | " + " | ".join(t for t, _, _ in JOBS) + " |")
    print("|---|" + "---|" * len(JOBS))
    for name, vals in table.items():
        print("| %s | %s |" % (name, " | ".join(fmt(v) for v in vals)))
    peers = [v for n, v in table.items() if n != "rdbd"]
    if "rdbd" in table and peers:
        ratios = []
        for i, v in enumerate(table["rdbd"]):
            best = max(p[i] for p in peers)
            ratios.append("%.2f×" % (v / best) if best else "n/a")
        print("| **rdbd / best peer** | " + " | ".join(ratios) + " |")


def fmt(v):
    return "%.0fk" % (v / 1000) if v >= 10000 else "%.0f" % v


if __name__ == "__main__":
    main()
