#!/usr/bin/env python3
"""Failover time of the HA supervisor: from the Primary's failure to the survivor accepting writes.

Three hosts in network namespaces this script creates (alpha, beta and a quorum witness, a link
each, as tests/common/netns.rs builds them), an rdbd pair with an [ha] table naming the witness
and otherwise default timers, alpha Primary holding the witness's lease. A writer on each node
(tests/ha/writer.py: 4 KiB writes through the node's NBD server, each followed by a flush, every
acknowledgement logged with CLOCK_MONOTONIC) runs throughout. Per round, one failure:

  kill     SIGKILL of alpha's daemon (a crashed daemon: its TCP connections are reset at once)
  isolate  alpha's every link cut (a dead node or a pulled cable: nothing is reset, the survivor
           only notices the silence)

and the time from the failure to the first write acknowledged by beta's writer. Every round
starts from a fresh pair.

No peer runs side by side here: these machines have no DRBD module and no Pacemaker cluster
(../shared/reference: Pacemaker setups typically take 10-30 s). This is a benchmark, not a test:
it asserts nothing. Needs root, ip, nsenter, python3-libnbd.

    python3 benches/failover.py [--rounds 5] [--modes kill,isolate] [--lease 2s]
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITER = os.path.join(REPO, "tests", "ha", "writer.py")
SECRET = "bench-witness"
IPS = {"alpha": "10.77.1.1", "beta": "10.77.1.2"}
WITNESS_IP = "10.77.9.9"


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


class Net:
    """alpha -- ab -- beta; alpha -- aw -- witness; beta -- bw -- witness (witness at 10.77.9.9)."""

    def __init__(self):
        tag = f"rdbdb{os.getpid()}"
        self.ns = {"alpha": f"{tag}-a", "beta": f"{tag}-b", "witness": f"{tag}-w"}
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b, w = self.ns["alpha"], self.ns["beta"], self.ns["witness"]
        for left, name, lip, right, rip in [
            (a, "ab", "10.77.1.1/24", b, "10.77.1.2/24"),
            (a, "aw", "10.77.2.1/24", w, "10.77.2.3/24"),
            (b, "bw", "10.77.3.2/24", w, "10.77.3.3/24"),
        ]:
            sh("ip", "link", "add", name + "0", "netns", left, "type", "veth", "peer", "name", name + "1", "netns", right)
            sh("ip", "-n", left, "addr", "add", lip, "dev", name + "0")
            sh("ip", "-n", right, "addr", "add", rip, "dev", name + "1")
            sh("ip", "-n", left, "link", "set", name + "0", "up")
            sh("ip", "-n", right, "link", "set", name + "1", "up")
        sh("ip", "-n", w, "addr", "add", WITNESS_IP + "/32", "dev", "lo")
        sh("ip", "-n", a, "route", "add", WITNESS_IP, "via", "10.77.2.3")
        sh("ip", "-n", b, "route", "add", WITNESS_IP, "via", "10.77.3.3")

    def links(self, node, up):
        ends = {"alpha": [("alpha", "ab0"), ("alpha", "aw0")], "beta": [("alpha", "ab0"), ("beta", "bw0")]}[node]
        for host, dev in ends:
            sh("ip", "-n", self.ns[host], "link", "set", dev, "up" if up else "down")
        if up:
            via = {"alpha": "10.77.2.3", "beta": "10.77.3.3"}[node]
            sh("ip", "-n", self.ns[node], "route", "replace", WITNESS_IP, "via", via, check=False)

    def cmd(self, host, *args):
        return ["nsenter", f"--net=/run/netns/{self.ns[host]}", "--", *args]

    def close(self):
        for ns in self.ns.values():
            sh("ip", "netns", "del", ns, check=False)


class Pair:
    def __init__(self, rdbd, net, tmp, lease):
        self.rdbd, self.net, self.tmp = rdbd, net, tmp
        self.run_dir = os.path.join(tmp, "run")
        os.makedirs(self.run_dir)
        self.daemons = {}
        for n in ("alpha", "beta"):
            etc = os.path.join(tmp, "etc-" + n)
            os.makedirs(etc)
            with open(os.path.join(etc, "r0.toml"), "w") as f:
                f.write(self.config())
            with open(os.path.join(tmp, n + ".img"), "wb") as f:
                f.truncate(64 << 20)
            self.verb(n, "create-md")
        self.witness = subprocess.Popen(
            net.cmd("witness", rdbd, "witness", "--listen", f"{WITNESS_IP}:7788", "--lease", lease,
                    "--state", os.path.join(tmp, "witness.json")),
            env={**os.environ, "RDBD_WITNESS_SECRET": SECRET},
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "witness.log"), "w"))

    def config(self):
        out = f'[net]\nshared-secret = "bench"\nconnect-interval = "500ms"\n\n'
        out += f'[ha]\nwitness = "{WITNESS_IP}:7788"\nwitness-secret = "{SECRET}"\n'
        for n in ("alpha", "beta"):
            out += (f'\n[[node]]\nname = "{n}"\naddress = "{IPS[n]}:7789"\n'
                    f'disk = "{os.path.join(self.tmp, n + ".img")}"\nnbd-listen = "127.0.0.1:10809"\n')
        return out

    def env(self, n):
        return {**os.environ, "RDBD_CONFIG_DIR": os.path.join(self.tmp, "etc-" + n), "RDBD_RUN_DIR": self.run_dir}

    def verb(self, n, *args, check=True):
        return subprocess.run([self.rdbd, args[0], "r0", "--node", n, *args[1:]], env=self.env(n),
                              capture_output=True, text=True, check=check, timeout=120)

    def start(self, n):
        log = open(os.path.join(self.tmp, n + ".log"), "a")
        self.daemons[n] = subprocess.Popen(self.net.cmd(n, self.rdbd, "up", "r0", "--node", n, "--foreground"),
                                           env=self.env(n), stdout=log, stderr=log)
        self.wait(n, lambda s: True, 20)

    def status(self, n):
        r = self.verb(n, "status", "--json", check=False)
        if r.returncode != 0:
            return None
        return json.loads(r.stdout)

    def wait(self, n, cond, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            s = self.status(n)
            if s is not None and cond(s):
                return s
            time.sleep(0.05)
        raise RuntimeError(f"{n}: condition not met within {limit} s: {self.status(n)}")

    def in_sync(self):
        for n in ("alpha", "beta"):
            self.wait(n, lambda s: s["connection"] == "Connected" and s["replication"] == "Established"
                      and s["disk"] == "UpToDate" and s["peer"]["disk"] == "UpToDate", 120)

    def kill(self, n):
        self.daemons[n].kill()
        self.daemons[n].wait()

    def close(self):
        for p in self.daemons.values():
            p.kill()
        self.witness.kill()


def acks(path):
    try:
        with open(path) as f:
            return [int(l.split()[4]) for l in f if l.startswith("ack ")]
    except FileNotFoundError:
        return []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="kill,isolate")
    ap.add_argument("--lease", default="2s")
    ap.add_argument("--rdbd", default=os.path.join(REPO, "target", "release", "rdbd"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("failover.py needs root (network namespaces)")
    if not os.path.exists(args.rdbd):
        sys.exit(f"no {args.rdbd}: cargo build --release first (or --rdbd PATH)")
    results = {m: [] for m in args.modes.split(",")}
    for mode in results:
        for round_no in range(args.rounds):
            tmp = tempfile.mkdtemp(prefix="rdbd-failover-")
            net = Net()
            pair = Pair(args.rdbd, net, tmp, args.lease)
            writers = []
            stop = os.path.join(tmp, "stop")
            try:
                pair.start("alpha")
                pair.start("beta")
                pair.wait("alpha", lambda s: s["connection"] == "Connected", 30)
                pair.verb("alpha", "primary", "--force")
                pair.in_sync()
                pair.wait("alpha", lambda s: (s.get("ha") or {}).get("lease_holder") == "alpha", 30)
                for i, n in enumerate(("alpha", "beta")):
                    log = os.path.join(tmp, f"writer-{n}.log")
                    writers.append((subprocess.Popen(
                        net.cmd(n, "/usr/bin/python3", WRITER, "nbd://127.0.0.1:10809/r0", n, str(i * 256), "256",
                                log, stop, "120"),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), log))
                end = time.monotonic() + 30
                while len(acks(writers[0][1])) < 20 and time.monotonic() < end:
                    time.sleep(0.05)
                failed_at = time.monotonic_ns()
                if mode == "kill":
                    pair.kill("alpha")
                else:
                    net.links("alpha", up=False)
                end = time.monotonic() + 60
                while not acks(writers[1][1]) and time.monotonic() < end:
                    time.sleep(0.02)
                first = acks(writers[1][1])
                took = (first[0] - failed_at) / 1e9 if first else float("nan")
                results[mode].append(took)
                print(f"{mode} round {round_no + 1}: beta accepted writes {took:.2f} s after the failure", flush=True)
            finally:
                open(stop, "w").close()
                for w, _ in writers:
                    try:
                        w.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        w.kill()
                pair.close()
                net.close()
                shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"Failover, {datetime.date.today()}, {os.cpu_count()} CPUs, lease {args.lease}, default timers, "
          f"{args.rounds} rounds (s from the failure to the survivor's first acknowledged write)")
    print("| failure | median | min | max |")
    print("|---|---|---|---|")
    for mode, times in results.items():
        ok = [t for t in times if t == t]
        if ok:
            print(f"| {mode} | {statistics.median(ok):.2f} | {min(ok):.2f} | {max(ok):.2f} |")


if __name__ == "__main__":
    main()
