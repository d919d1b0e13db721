#!/usr/bin/env python3
"""Replication cost: rdbd replicated (two nodes over loopback, protocol C) vs rdbd standalone.

Sets up, on this machine, a two-node resource (alpha Primary serving NBD, beta Secondary, both
connected and in sync, protocol C: a write completes once both disks have it) and, next to it,
`rdbd serve --file` on a plain file: the same binary without replication. Then runs the same fio
jobs (nbd ioengine, one connection) against both, alternating within every round, and prints a
markdown table: 4k randwrite QD32 IOPS and 4k randwrite QD1 completion latency (p50, p99), with
the connected / standalone ratio per round (median and range over rounds), plus the CPU time the
rdbd processes spend per write, per process and per thread. This is a benchmark, not a test: it
asserts nothing about speed, and its numbers depend on the machine.

    python3 benches/replication_vs_standalone.py [--rounds 3] [--runtime 10]

Both sides use files in the same temporary directory (same filesystem) and the same write region
(--size, default 512M of 1G files), written once sequentially through NBD in 4 KiB writes before
measuring (so that neither side measures sparse-file allocation, both replicas hold the data, and
the page cache holds 4 KiB folios on every file: see prefill()), and all dirty pages are synced
before every measured job, so each one starts from clean cached pages. The rdbd binary is copied
into the temporary directory first, so that a rebuild of target/release/rdbd during the run
cannot mix versions between daemons and the verbs that control them. Every daemon is stopped on
exit, including on Ctrl-C, SIGTERM or an error; should this script be killed outright, the
kernel sends the daemons SIGTERM (PR_SET_PDEATHSIG), on which they go down cleanly.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_vs_peers import cpu_model  # noqa: E402  (one definition for both benchmarks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = "r0"
TICK = os.sysconf("SC_CLK_TCK")
RAMP = 2  # seconds fio runs before it starts counting

# (key, title, fio job options)
JOBS = [
    ("qd32", "4k randwrite QD32", "rw=randwrite\nbs=4k\niodepth=32\n"),
    ("qd1", "4k randwrite QD1", "rw=randwrite\nbs=4k\niodepth=1\n"),
]
SIDES = ["standalone", "connected"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# processes


def _die_with_parent():
    """In the child before exec: get SIGTERM if this script dies without cleaning up."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Daemons:
    """Every long-running rdbd process this script started, so that all of them get stopped."""

    def __init__(self):
        self.procs = []  # (name, Popen, log file)

    def start(self, name, argv, env, log_path):
        logf = open(log_path, "ab")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent, start_new_session=True)
        self.procs.append((name, proc, logf))
        return proc

    def stop_all(self, graceful=None):
        """Runs graceful() (e.g. rdbd down), then SIGTERM, then SIGKILL whatever is still alive."""
        if graceful is not None:
            try:
                graceful()
            except Exception as e:  # noqa: BLE001 - cleanup goes on whatever happened
                log("cleanup: %s" % e)
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for name, proc, logf in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log("cleanup: %s (pid %d) ignored SIGTERM, killing it" % (name, proc.pid))
                proc.kill()
                proc.wait()
            logf.close()
        self.procs = []


def wait_for_port(port, procs, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError("rdbd (pid %d) exited with status %s" % (p.pid, p.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d after %ds" % (port, timeout))


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc


def proc_cpu(pid):
    """User+system CPU seconds of a process (all its threads, live and exited) so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid):
    """{tid: (thread group name, CPU seconds)} of a process's live threads."""
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                head, rest = f.read().rsplit(")", 1)
            comm = head.split("(", 1)[1]
            fields = rest.split()
            # io_uring workers are named iou-wrk-<tid>, shards rdbd-shard-<n>: group by name
            group = re.sub(r"-\d+$", "", comm)
            out[tid] = (group, (int(fields[11]) + int(fields[12])) / TICK)
        except (OSError, IndexError):
            pass  # the thread exited meanwhile
    return out


def thread_delta(before, after, total):
    """CPU seconds per thread group during a run; what live threads do not explain (threads that
    started and ended within the run) goes to 'exited threads'."""
    groups = {}
    for tid, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (group, 0.0))[1]
    rest = total - sum(groups.values())
    if rest > 1.5 / TICK:
        groups["exited threads"] = rest
    return groups


def machine_cpu():
    """(busy, steal, total) jiffies summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, user + nice + system + idle + iowait + irq + softirq + steal


# ---------------------------------------------------------------------------------------------
# fio


def fio_job(uri, size, runtime, opts):
    return (
        "[global]\nioengine=nbd\nuri=%s\nsize=%s\ntime_based=1\nruntime=%d\nramp_time=%d\n"
        "group_reporting=1\nnumjobs=1\nrefill_buffers=1\nnorandommap=1\nrandrepeat=0\n"
        "percentile_list=50:99\n\n[job]\n%s" % (uri, size, runtime, RAMP, opts)
    )


def parse_fio(path, returncode, stdout):
    if returncode != 0:
        raise RuntimeError("fio %s failed (%d): %s" % (path, returncode, stdout[-3000:]))
    # the nbd engine prints "fio: ..." lines to stdout next to the JSON
    text = "\n".join(l for l in stdout.splitlines() if not l.startswith("fio:"))
    return json.loads(text)["jobs"][0]["write"]


def start_fio(path, out):
    # its own process group, so that fio and the job processes it forks can be killed together
    return subprocess.Popen(["fio", "--output-format=json", path], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_die_with_parent)


def kill_fio(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_fio(path):
    with tempfile.TemporaryFile("w+") as out:
        proc = start_fio(path, out)
        try:
            returncode = proc.wait()
        except BaseException:
            kill_fio(proc)
            raise
        out.seek(0)
        return parse_fio(path, returncode, out.read())


def prefill(uri, size, workdir):
    """Writes the measured region once, sequentially, through NBD, and flushes it.

    In 4 KiB writes on purpose: buffered writes create page-cache folios as large as the write
    (up to 2 MiB on ext4 with large folios), and a later 4 KiB write into a large folio costs time
    proportional to the folio (ext4_block_write_begin and block_commit_write walk all of its
    buffer heads). A 1 MiB prefill made every 4 KiB write of the replicated pair (whose
    pwrite-based path keeps 1 MiB folios) cost 3x more than after a 4 KiB prefill, while rdbd
    serve (which splices large writes 64 KiB at a time) barely paid it: the benchmark would have
    measured the prefill, not replication."""
    path = os.path.join(workdir, "prefill.fio")
    with open(path, "w") as f:
        f.write("[global]\nioengine=nbd\nuri=%s\nsize=%s\n\n[fill]\nrw=write\nbs=4k\niodepth=32\n"
                "refill_buffers=1\nend_fsync=1\n" % (uri, size))
    run_fio(path)


def tree_cpu(pid):
    """CPU seconds of a process and its live children (fio forks one process per job)."""
    total = 0.0
    try:
        total += proc_cpu(pid)
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                total += sum(tree_cpu(int(c)) for c in f.read().split())
    except OSError:
        pass
    return total


def sample(pids, fio_pid):
    return (time.time(), {n: proc_cpu(p) for n, p in pids.items()}, {n: thread_cpu(p) for n, p in pids.items()},
            machine_cpu(), tree_cpu(fio_pid))


def measure(job_path, pids, runtime, ramp=RAMP):
    """Runs one fio job; pids maps a label to a server pid. CPU is sampled inside fio's measured
    window (after the ramp, before the end), so CPU per write = CPU rate / IOPS."""
    os.sync()  # every job starts from the same state: the region cached and clean, on every file
    start = time.time()
    with tempfile.TemporaryFile("w+") as out:
        proc = start_fio(job_path, out)
        try:
            time.sleep(max(0.0, start + ramp + 1.0 - time.time()))
            a = sample(pids, proc.pid)
            time.sleep(max(0.0, start + ramp + runtime - 0.5 - time.time()))
            b = sample(pids, proc.pid)
            returncode = proc.wait()
        except BaseException:
            kill_fio(proc)
            raise
        out.seek(0)
        w = parse_fio(job_path, returncode, out.read())
    window = b[0] - a[0]
    writes = w["iops"] * window  # writes completed in the window, at fio's average rate
    cpu = {n: b[1][n] - a[1][n] for n in pids}
    threads = {n: thread_delta(a[2][n], b[2][n], cpu[n]) for n in pids}
    pct = w["clat_ns"].get("percentile", {})
    busy = b[3][0] - a[3][0]
    total = max(b[3][2] - a[3][2], 1)
    return {
        "iops": w["iops"],
        "p50": pct.get("50.000000", float("nan")) / 1000.0,
        "p99": pct.get("99.000000", float("nan")) / 1000.0,
        "cpu_us": {n: 1e6 * c / writes for n, c in cpu.items()},
        "threads_us": {n: {g: 1e6 * c / writes for g, c in gs.items()} for n, gs in threads.items()},
        "rdbd_cores": sum(cpu.values()) / window,
        "fio_share": (b[4] - a[4]) / window,
        "machine_busy": os.cpu_count() * busy / total,
        "steal": (b[3][1] - a[3][1]) / total,
    }


# ---------------------------------------------------------------------------------------------
# the two setups


class Standalone:
    def __init__(self, rdbd, workdir, port, daemons):
        self.image = os.path.join(workdir, "standalone.img")
        self.port = port
        self.uri = "nbd://127.0.0.1:%d/" % port
        self.rdbd, self.workdir, self.daemons = rdbd, workdir, daemons
        self.proc = None

    def start(self, file_size):
        with open(self.image, "wb") as f:
            f.truncate(file_size)
        self.proc = self.daemons.start(
            "rdbd serve", [self.rdbd, "serve", "--file", self.image, "--listen", "127.0.0.1:%d" % self.port],
            os.environ.copy(), os.path.join(self.workdir, "standalone.log"))
        wait_for_port(self.port, [self.proc])

    def pids(self):
        return {"serve": self.proc.pid}

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError("rdbd serve exited with status %s" % self.proc.returncode)


class Connected:
    """alpha (Primary, serves NBD) and beta (Secondary), protocol C, over loopback."""

    def __init__(self, rdbd, workdir, base_port, daemons):
        self.rdbd, self.workdir, self.daemons = rdbd, workdir, daemons
        self.env = dict(os.environ, RDBD_CONFIG_DIR=os.path.join(workdir, "etc"),
                        RDBD_RUN_DIR=os.path.join(workdir, "run"))
        self.env.pop("RDBD_NODE", None)
        self.nbd_port = base_port + 1
        self.ports = {"alpha": (base_port + 3, base_port + 1), "beta": (base_port + 4, base_port + 2)}
        self.uri = "nbd://127.0.0.1:%d/%s" % (self.nbd_port, RES)
        self.procs = {}
        self.primary = False
        # More tables for the resource file (e.g. a [disk] table with resync options).
        self.extra_config = ""

    def verb(self, *args, check=True, timeout=30):
        out = subprocess.run([self.rdbd] + list(args), env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError("rdbd %s: %s" % (" ".join(args), (out.stderr or out.stdout).strip()))
        return out

    def status(self, node):
        return json.loads(self.verb("status", RES, "--node", node, "--json").stdout)

    def wait(self, what, pred, timeout=30, interval=0.1):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            for n, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError("rdbd up on %s exited with status %s (log: %s)"
                                       % (n, p.returncode, os.path.join(self.workdir, n + ".log")))
            try:
                last = {n: self.status(n) for n in self.procs}
                if pred(last):
                    return last
            except (RuntimeError, ValueError) as e:
                last = str(e)
            time.sleep(interval)
        raise RuntimeError("timed out waiting for %s; last status: %s" % (what, json.dumps(last)))

    def write_config(self, disks):
        """The resource file, both nodes on this machine; disks maps a node name to its backing file."""
        os.makedirs(self.env["RDBD_CONFIG_DIR"], exist_ok=True)
        os.makedirs(self.env["RDBD_RUN_DIR"], exist_ok=True)
        conf = 'resource = "%s"\nprotocol = "C"\n' % RES + self.extra_config
        for node, (repl, nbd) in self.ports.items():
            conf += ('\n[[node]]\nname = "%s"\naddress = "127.0.0.1:%d"\ndisk = "%s"\nnbd-listen = "127.0.0.1:%d"\n'
                     % (node, repl, disks[node], nbd))
        with open(os.path.join(self.env["RDBD_CONFIG_DIR"], RES + ".toml"), "w") as f:
            f.write(conf)

    def up(self, node):
        """`rdbd up --foreground` as a child of this script (so that it is stopped on exit)."""
        self.procs[node] = self.daemons.start(
            "rdbd up (%s)" % node, [self.rdbd, "up", RES, "--node", node, "--foreground"], self.env,
            os.path.join(self.workdir, node + ".log"))

    def start(self, file_size):
        disks = {node: os.path.join(self.workdir, node + ".img") for node in self.ports}
        for disk in disks.values():
            with open(disk, "wb") as f:
                f.truncate(file_size)
        self.write_config(disks)
        for node in self.ports:
            self.verb("create-md", RES, "--node", node)
        for node in self.ports:
            self.up(node)
        self.wait("the nodes to connect", lambda s: s["alpha"]["connection"] == "Connected")
        # blank disks on both sides: skip the initial full sync
        self.verb("new-current-uuid", RES, "--node", "alpha", "--clear-bitmap")
        self.wait("both disks UpToDate", lambda s: all(
            s[n]["disk"] == "UpToDate" and s[n]["replication"] == "Established" for n in s))
        self.verb("primary", RES, "--node", "alpha")
        self.primary = True
        self.wait("alpha Primary and in sync", lambda s: self.in_sync(s["alpha"]) and s["alpha"]["nbd"])
        wait_for_port(self.nbd_port, list(self.procs.values()))

    @staticmethod
    def in_sync(st):
        return (st["role"] == "Primary" and st["disk"] == "UpToDate" and st["connection"] == "Connected"
                and st["replication"] == "Established" and st["peer"]["disk"] == "UpToDate"
                and not st.get("out_of_sync_bytes"))

    def pids(self):
        return {n: p.pid for n, p in self.procs.items()}

    def check(self):
        """After a run: the writes really went to both disks (a dropped link would be fast)."""
        st = self.status("alpha")
        if not self.in_sync(st):
            raise RuntimeError("the replicated pair left the connected, in-sync state during the run: %s"
                               % json.dumps(st))

    def stop(self):
        """Secondary, then down beta and alpha (what an operator does); SIGTERM follows anyway."""
        if self.primary and self.procs["alpha"].poll() is None:
            # An interrupted fio may still count as a client for a few seconds: retry a while.
            deadline = time.time() + 15
            while True:
                try:
                    out = self.verb("secondary", RES, "--node", "alpha", check=False, timeout=10)
                    if out.returncode == 0:
                        break
                    err = (out.stderr or out.stdout).strip()
                except subprocess.TimeoutExpired:
                    err = "timed out"
                if time.time() > deadline or self.procs["alpha"].poll() is not None:
                    log("cleanup: rdbd secondary: %s" % err)
                    break
                time.sleep(0.2)
        for node in ("beta", "alpha"):
            daemon = self.procs.get(node)
            if daemon is None or daemon.poll() is not None:
                continue
            # `rdbd down` returns once the daemon's pid is gone from /proc, and a daemon that is our
            # child stays there as a zombie until we reap it: run the verb in the background and
            # reap the daemon meanwhile.
            verb = subprocess.Popen([self.rdbd, "down", RES, "--node", node], env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            deadline = time.time() + 20
            while daemon.poll() is None and time.time() < deadline:
                if verb.poll() is not None and verb.returncode != 0:
                    break  # refused: SIGTERM will do
                time.sleep(0.05)
            try:
                _, err = verb.communicate(timeout=10)
                if verb.returncode != 0:
                    log("cleanup: rdbd down %s: %s" % (node, err.strip()))
            except subprocess.TimeoutExpired:
                verb.kill()
                verb.wait()
            if daemon.poll() is None:
                log("cleanup: %s still running after rdbd down" % node)


# ---------------------------------------------------------------------------------------------
# main


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def source_version(binary):
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    built = datetime.datetime.fromtimestamp(os.stat(binary).st_mtime, datetime.timezone.utc)
    return "source %s at start, binary built %s" % (rev, built.strftime("%H:%M UTC"))


def on_signal(signum, _frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; both setups run back to back per job (default 3)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job, after a 2 s ramp (default 10)")
    ap.add_argument("--size", default="512M", help="region written and measured (default 512M)")
    ap.add_argument("--file-size", default="1G", help="size of each backing file (default 1G, sparse)")
    ap.add_argument("--port-base", type=int, default=20800,
                    help="standalone NBD on this port, alpha/beta NBD on +1/+2, replication on +3/+4 (default 20800)")
    ap.add_argument("--rdbd", default=os.path.join(ROOT, "target", "release", "rdbd"))
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the directory (daemon logs) afterwards")
    args = ap.parse_args()

    if not shutil.which("fio"):
        sys.exit("missing fio: run tools/install-test-deps.sh first")
    if parse_size(args.size) + (64 << 20) > parse_size(args.file_size):
        sys.exit("--size must leave room for the internal metadata at the end of --file-size")
    busy = [p for p in range(args.port_base, args.port_base + 5) if not port_free(p)]
    if busy:
        sys.exit("ports in use: %s (choose another --port-base)" % busy)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if not os.path.exists(args.rdbd):
        sys.exit("no rdbd binary at %s" % args.rdbd)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    workdir = tempfile.mkdtemp(prefix="rdbd-repl-bench-", dir=args.dir)
    daemons = Daemons()
    connected = None
    try:
        rdbd = os.path.join(workdir, "rdbd")
        shutil.copy2(args.rdbd, rdbd)  # one binary for the whole run, whatever cargo does meanwhile
        version = source_version(rdbd)  # now, not at the end: others may commit meanwhile
        file_size = parse_size(args.file_size)
        setups = {"standalone": Standalone(rdbd, workdir, args.port_base, daemons),
                  "connected": Connected(rdbd, workdir, args.port_base, daemons)}
        connected = setups["connected"]
        for name, s in setups.items():
            log("setting up %s" % name)
            s.start(file_size)
            log("prefilling %s of %s through NBD" % (args.size, name))
            prefill(s.uri, args.size, workdir)
            s.check()

        paths = {}
        for key, _, opts in JOBS:
            for name, s in setups.items():
                paths[key, name] = os.path.join(workdir, "%s-%s.fio" % (key, name))
                with open(paths[key, name], "w") as f:
                    f.write(fio_job(s.uri, args.size, args.runtime, opts))

        # Paired rounds: within a round each job runs on both setups back to back (alternating
        # which goes first), and the ratio is taken within the round, because this machine's
        # load drifts by tens of percent within minutes.
        runs = {(key, name): [] for key, _, _ in JOBS for name in SIDES}
        for r in range(args.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for key, title, _ in JOBS:
                for name in order:
                    log("round %d/%d, %s: %s" % (r + 1, args.rounds, title, name))
                    res = measure(paths[key, name], setups[name].pids(), args.runtime)
                    setups[name].check()
                    runs[key, name].append(res)
        print_report(runs, args, version)
    except KeyboardInterrupt:
        log("interrupted: stopping the daemons")
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        daemons.stop_all(graceful=connected.stop if connected else None)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# report


def median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def ratio_cell(runs, key, metric):
    ratios = [c[metric] / s[metric] for s, c in zip(runs[key, "standalone"], runs[key, "connected"])]
    return "**%.2f×** (%.2f–%.2f)" % (median(ratios), min(ratios), max(ratios))


def fmt_iops(v):
    return "%.1fk" % (v / 1000) if v >= 10000 else "%.0f" % v


def print_report(runs, args, version):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("\n%s, %d CPUs (%s), kernel %s, %s, fio nbd engine over TCP loopback, 1 connection, "
          "%ds per job after a 2 s ramp, %s region of %s files, %d paired rounds"
          % (now, os.cpu_count(), cpu_model(), platform.release(), version, args.runtime, args.size,
             args.file_size, args.rounds))
    print()
    print("Median over rounds; ratios are connected / standalone per round: median (range).")
    print()
    print("| setup | 4k randwrite QD32 (IOPS) | 4k randwrite QD1 clat p50 | QD1 clat p99 | QD1 (IOPS) |")
    print("|---|---|---|---|---|")
    for name in SIDES:
        q32, q1 = runs["qd32", name], runs["qd1", name]
        print("| %s | %s | %.0f µs | %.0f µs | %s |" % (
            "standalone (`rdbd serve`)" if name == "standalone" else "connected (protocol C, 2 nodes)",
            fmt_iops(median([x["iops"] for x in q32])), median([x["p50"] for x in q1]),
            median([x["p99"] for x in q1]), fmt_iops(median([x["iops"] for x in q1]))))
    print("| **connected / standalone** | %s | %s | %s | %s |" % (
        ratio_cell(runs, "qd32", "iops"), ratio_cell(runs, "qd1", "p50"), ratio_cell(runs, "qd1", "p99"),
        ratio_cell(runs, "qd1", "iops")))
    goal = [c["iops"] / s["iops"] for s, c in zip(runs["qd32", "standalone"], runs["qd32", "connected"])]
    print()
    print("Goal: connected QD32 IOPS >= 0.8× standalone: %s (median %.2f×)."
          % ("met" if median(goal) >= 0.8 else "NOT met", median(goal)))
    print()
    print("Server CPU time per write, user+system, all threads (medians): per rdbd process; fio's own CPU")
    print("(100 %% = one core); the whole machine's busy CPUs during the job (of %d; steal excluded), and how much of"
          % os.cpu_count())
    print("that was neither rdbd nor fio (other load on the machine):")
    print()
    print("| job | setup | rdbd CPU per write | rdbd cores | fio | machine busy (other load) |")
    print("|---|---|---|---|---|---|")
    for key, title, _ in JOBS:
        for name in SIDES:
            rs = runs[key, name]
            procs = list(rs[0]["cpu_us"])
            parts = ["%s %.1f µs" % (p, median([x["cpu_us"][p] for x in rs])) for p in procs]
            if len(procs) > 1:
                parts.append("**total %.1f µs**" % median([sum(x["cpu_us"].values()) for x in rs]))
            else:
                parts[0] = "**%s**" % parts[0]
            print("| %s | %s | %s | %.2f | %.0f %% | %.2f cores (%.2f) |" % (
                title, name, ", ".join(parts), median([x["rdbd_cores"] for x in rs]),
                100 * median([x["fio_share"] for x in rs]), median([x["machine_busy"] for x in rs]),
                median([x["machine_busy"] - x["rdbd_cores"] - x["fio_share"] for x in rs])))
    print()
    print("Per thread (CPU µs per write, medians; threads grouped by name, rdbd = each process's main thread):")
    print()
    for key, title, _ in JOBS:
        for name in SIDES:
            rs = runs[key, name]
            parts = []
            for p in rs[0]["threads_us"]:
                groups = sorted({g for x in rs for g in x["threads_us"][p]})
                vals = [(g, median([x["threads_us"][p].get(g, 0.0) for x in rs])) for g in groups]
                vals = [(g, v) for g, v in sorted(vals, key=lambda gv: -gv[1]) if v >= 0.05]
                parts.append("%s: %s" % (p, ", ".join("%s %.1f" % gv for gv in vals) or "-"))
            print("- %s, %s — %s" % (title, name, "; ".join(parts)))
    print()
    print("Per round (standalone → connected):")
    print()
    for r in range(len(runs["qd32", "standalone"])):
        s32, c32 = runs["qd32", "standalone"][r], runs["qd32", "connected"][r]
        s1, c1 = runs["qd1", "standalone"][r], runs["qd1", "connected"][r]
        print("- round %d: QD32 %.0f → %.0f IOPS (%.2f×), CPU/write %.1f → %.1f µs; QD1 p50 %.0f → %.0f µs, "
              "p99 %.0f → %.0f µs, %.0f → %.0f IOPS; machine busy %.2f/%.2f/%.2f/%.2f cores, steal %.0f %%" % (
                  r + 1, s32["iops"], c32["iops"], c32["iops"] / s32["iops"], sum(s32["cpu_us"].values()),
                  sum(c32["cpu_us"].values()), s1["p50"], c1["p50"], s1["p99"], c1["p99"], s1["iops"], c1["iops"],
                  s32["machine_busy"], c32["machine_busy"], s1["machine_busy"], c1["machine_busy"],
                  100 * max(x["steal"] for x in (s32, c32, s1, c1))))


if __name__ == "__main__":
    main()
