#!/usr/bin/env python3
"""What a hello world request costs the HTTP server's processes, for
versions of the Perl code side by side: each a ForkServer::HTTPServer of 2
workers on its own 127.0.0.1 port, with or without the workers' desk, all
running at once; rounds of `wrk -t2 -c16` on each in turn (the order
rotates), the CPU its processes used meanwhile (/proc/PID/task/*/schedstat,
user and system from /proc/PID/stat) divided by the requests served.

    .venv/bin/python bench/desk_cpu.py [--rounds 12] [--seconds 2] [--together] NAME=PERL_DIR[:0] ...

PERL_DIR is a `perl/` directory (this tree's, or an older commit's exported
with `git archive REV perl | tar -x -C DIR`, then DIR/perl); `:0` runs it
with `keepalive_handoff => 0` (no desk). `--together` loads every server at
once in each round instead of in turn. Prints each round, then medians and,
against the last NAME, the median of the differences of each round (the
load of a shared machine falls on both alike), with the load average.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field

SERVE = r"""
use strict; use warnings;
use ForkServer::HTTPServer;
my ($port, $handoff) = @ARGV;
my $body = "Hello, World!\n";
my $app = sub { [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]] };
ForkServer::HTTPServer->new(host => '127.0.0.1', port => $port, app => $app, workers => 2,
    keepalive_handoff => $handoff, access_log => undef, name => "desk-cpu-$port")->run;
"""
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    perl_dir: str
    handoff: int
    port: int
    proc: subprocess.Popen | None = None
    cpu: list[float] = field(default_factory=list)
    user: list[float] = field(default_factory=list)
    system: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The master and its workers (listed again each round)."""
        assert self.proc
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid] + [int(x) for x in f.read().split()]
        except OSError:
            return [self.proc.pid]


def cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def user_system(pids: list[int]) -> tuple[int, int]:
    u = s = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        u += int(fields[11])
        s += int(fields[12])
    return u, s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {deadline} s")


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def measure(group: list[Server], seconds: int) -> list[str]:
    before = {s.name: (s.pids(), cpu_ns(s.pids()), user_system(s.pids())) for s in group}
    wrks = [(s, subprocess.Popen(["wrk", "-t2", "-c16", f"-d{seconds}", f"http://127.0.0.1:{s.port}/"],
                                 stdout=subprocess.PIPE, text=True)) for s in group]
    cells = []
    for s, w in wrks:
        out = w.communicate()[0]
        pids, c0, (u0, s0) = before[s.name]
        c1 = cpu_ns(pids)
        u1, s1 = user_system(pids)
        m = re.search(r"(\d+) requests in", out)
        n = int(m.group(1)) if m else 0
        if not n:
            cells.append(f"{s.name} no requests")
            continue
        s.cpu.append((c1 - c0) / 1000 / n)
        s.user.append((u1 - u0) * TICK_US / n)
        s.system.append((s1 - s0) * TICK_US / n)
        s.rate.append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
        cells.append(f"{s.name} {s.cpu[-1]:.1f} us {s.rate[-1]:.0f}/s")
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seconds", type=int, default=2)
    ap.add_argument("--together", action="store_true")
    ap.add_argument("servers", nargs="+", metavar="NAME=PERL_DIR[:0]")
    args = ap.parse_args()
    servers = []
    for spec in args.servers:
        name, rest = spec.split("=", 1)
        perl_dir, _, handoff = rest.partition(":")
        servers.append(Server(name, perl_dir, 0 if handoff == "0" else 1, free_port()))
    try:
        for s in servers:
            s.proc = subprocess.Popen(["perl", f"-I{s.perl_dir}", "-e", SERVE, str(s.port), str(s.handoff)],
                                      start_new_session=True, stdout=subprocess.DEVNULL)
        for s in servers:
            wait_port(s.port, 20)
        print(f"start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        for r in range(args.rounds):
            k = r % len(servers)
            order = servers[k:] + servers[:k]
            groups = [order] if args.together else [[s] for s in order]
            cells = [f"round {r} load {load()}"]
            for group in groups:
                cells += measure(group, args.seconds)
            print("  ".join(cells), flush=True)
        print(f"end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print(f"medians of {args.rounds} rounds of {args.seconds} s, wrk -t2 -c16"
              f"{', all at once' if args.together else ', in turn'}: CPU a request (us)")
        for s in servers:
            if s.cpu:
                print(f"  {s.name:>12}: {statistics.median(s.cpu):5.1f} (user {statistics.median(s.user):.1f},"
                      f" system {statistics.median(s.system):.1f}; {min(s.cpu):.1f} to {max(s.cpu):.1f}),"
                      f" {statistics.median(s.rate):.0f} req/s")
        base = servers[-1]
        for s in servers[:-1]:
            d = sorted(a - b for a, b in zip(s.cpu, base.cpu))
            if len(d) >= 4:
                q = statistics.quantiles(d, n=4)
                print(f"  {s.name:>12} - {base.name}: {statistics.median(d):+.1f} us a request"
                      f" (quartiles {q[0]:+.1f} to {q[2]:+.1f})")
    finally:
        for s in servers:
            if s.proc:
                try:
                    os.killpg(s.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for s in servers:
            if s.proc:
                try:
                    s.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                    s.proc.wait()


if __name__ == "__main__":
    main()
