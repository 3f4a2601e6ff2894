#!/usr/bin/env python3
"""A rolling code deploy across three hosts behind one load balancer, on
this machine: every "host" is a network namespace with its own Emperor and
the same vassal files; nginx in a fourth namespace balances over them; a
bounded load runs through it while the new code rolls out one host at a
time, each with `emperor reload-base --wait`, gated on the host's readiness
(/readyz, or /healthz where the status server has no /readyz) and on every
app of that host answering with the new code.

    sudo .venv/bin/python bench/rolling_deploy.py [--apps 4] [--rate 150]

Root only (ip netns). The namespaces are linked by veth pairs with addresses
in 198.18.0.0/15 (RFC 2544's benchmark range) that exist only inside them:
nothing is routed to or from this machine's own interfaces. Everything is
removed at the end, also on failure. Exit 0 when no request failed and every
app of every host serves the new code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
EMPEROR = str(VENV_BIN / "emperor")
NET = "198.18"
FRONT_PORT = 8080
STATUS_PORT = 9100

APP = """\
# The code a deploy changes: its version is read once, when the base loads it.
use strict;
use warnings;
use File::Basename qw(dirname);
open my $fh, '<', dirname(__FILE__) . '/VERSION' or die "VERSION: $!\\n";
chomp(my $version = <$fh>);
close $fh;
sub {
    my $name = $ENV{APP_NAME} // '-';
    return [200, ['Content-Type' => 'text/plain'], ["$name $version $$\\n"]];
};
"""

# Runs in the balancer's namespace: `threads` keep-alive clients, each at
# most `rate` requests a second, round robin over the apps, until the stop
# file appears or `seconds` pass. Prints one JSON summary.
LOADGEN = r"""
import http.client, json, os, sys, threading, time
url_host, port, domains, threads, rate, stop, seconds, progress = sys.argv[1:9]
domains = domains.split(","); threads = int(threads); rate = float(rate)
lock = threading.Lock()
total = 0; failed = []; versions = {}; latencies = []
deadline = time.monotonic() + float(seconds)
def client(k):
    global total
    conn = None; n = k
    while not os.path.exists(stop) and time.monotonic() < deadline:
        start = time.monotonic(); domain = domains[n % len(domains)]; n += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url_host, int(port), timeout=10)
            conn.request("GET", "/", headers={"Host": domain})
            r = conn.getresponse(); body = r.read().decode()
            ok = r.status == 200 and body.startswith(domain.split(".")[0] + " ")
            if r.getheader("Connection", "").lower() == "close":
                conn.close(); conn = None
        except Exception as e:
            ok = False; body = repr(e)
            if conn is not None:
                conn.close()
            conn = None
        took = time.monotonic() - start
        with lock:
            total += 1
            latencies.append(took)
            if ok:
                versions.setdefault(domain, {}).setdefault(body.split()[1], 0)
                versions[domain][body.split()[1]] += 1
            else:
                failed.append((domain, body[:200]))
            if total % 200 == 0:
                with open(progress, "w") as f:
                    f.write(str(total))
        time.sleep(max(0.0, 1.0 / rate - took))
ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
latencies.sort()
q = lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2) if latencies else None
print(json.dumps({"requests": total, "failed": len(failed), "failures": failed[:10],
                  "versions": versions, "p50_ms": q(0.5), "p99_ms": q(0.99),
                  "max_ms": q(1.0)}))
"""

LB_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fleet {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fleet;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"""


@dataclass
class Host:
    index: int
    ns: str
    root: Path
    proc: subprocess.Popen | None = None
    deploy_seconds: float = 0.0
    gate: str = ""

    @property
    def addr(self) -> str:
        return f"{NET}.{self.index}.2"

    @property
    def vassals(self) -> Path:
        return self.root / "vassals"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PSGI_FORKSERVER_RUN_DIR": str(self.root / "run")}


def run(*argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ns_get(ns: str, url: str, host: str | None = None) -> tuple[int, str]:
    """GET from inside a namespace (its loopback and addresses are its own)."""
    code = ("import sys, urllib.request, urllib.error\n"
            "req = urllib.request.Request(sys.argv[1], headers={'Host': sys.argv[2]} if sys.argv[2] else {})\n"
            "try:\n r = urllib.request.urlopen(req, timeout=5); print(r.status); print(r.read().decode(), end='')\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode(), end='')\n")
    r = run(*in_ns(ns, sys.executable, "-c", code, url, host or ""), check=False, timeout=30)
    if r.returncode != 0:
        return 0, r.stderr.strip()[-200:]
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"rolling_deploy: timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def write_host(h: Host, apps: list[str]) -> None:
    """The same vassal files on every host; the code in the host's own release directory."""
    (h.root / "code").mkdir(parents=True)
    (h.root / "run").mkdir(mode=0o700)
    (h.root / "code" / "app.psgi").write_text(APP)
    (h.root / "code" / "VERSION").write_text("v1\n")
    h.vassals.mkdir()
    (h.vassals / "base.ini").write_text(
        f"[uwsgi]\nearly-psgi = {h.root}/code/app.psgi\nfork-server = {h.root}/run/fork.sock\n"
        "fork-server-spares = 1\n")
    for app in apps:
        (h.vassals / f"{app}.ini").write_text(
            f"[uwsgi]\ndomain = {app}.example.test\nprocesses = 2\nenv = APP_NAME={app}\n")


def serves(h: Host, apps: list[str], version: str) -> bool:
    for app in apps:
        status, body = ns_get(h.ns, f"http://{h.addr}:{FRONT_PORT}/", f"{app}.example.test")
        if status != 200 or body.split()[:2] != [app, version]:
            return False
    return True


def ready(h: Host) -> str:
    """The readiness path that answers 200 (/readyz first), or ''."""
    for path in ("/readyz", "/healthz"):
        status, _ = ns_get(h.ns, f"http://127.0.0.1:{STATUS_PORT}{path}")
        if status == 200:
            return path
        if status != 404:
            return ""
    return ""


def setup_network(lb: str, hosts: list[Host]) -> None:
    run("ip", "netns", "add", lb)
    run(*in_ns(lb, "ip", "link", "set", "lo", "up"))
    for h in hosts:
        run("ip", "netns", "add", h.ns)
        run(*in_ns(h.ns, "ip", "link", "set", "lo", "up"))
        # both ends are created inside the namespaces: nothing appears here
        run("ip", "-n", lb, "link", "add", f"lb{h.index}", "type", "veth",
            "peer", "name", "eth0", "netns", h.ns)
        run("ip", "-n", lb, "addr", "add", f"{NET}.{h.index}.1/30", "dev", f"lb{h.index}")
        run("ip", "-n", lb, "link", "set", f"lb{h.index}", "up")
        run("ip", "-n", h.ns, "addr", "add", f"{h.addr}/30", "dev", "eth0")
        run("ip", "-n", h.ns, "link", "set", "eth0", "up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--apps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4, help="load: concurrent keep-alive clients")
    ap.add_argument("--rate", type=float, default=100.0,
                    help="load: most requests a second per client (bounded load)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="load: stop after this long whatever happens")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("rolling_deploy: needs root (ip netns)", file=sys.stderr)
        return 2
    tag = f"pfs{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="pf-rolling-"))
    lb = f"{tag}-lb"
    hosts = [Host(i, f"{tag}-h{i}", work / f"h{i}") for i in range(1, args.hosts + 1)]
    apps = [f"app{k}" for k in range(1, args.apps + 1)]
    domains = [f"{a}.example.test" for a in apps]
    nginx: subprocess.Popen | None = None
    load: subprocess.Popen | None = None
    try:
        setup_network(lb, hosts)
        for h in hosts:
            write_host(h, apps)
            h.proc = subprocess.Popen(
                in_ns(h.ns, EMPEROR, "run", str(h.vassals), "--http", f"{h.addr}:{FRONT_PORT}",
                      "--status-http", f"127.0.0.1:{STATUS_PORT}", "--mercy", "10",
                      "--logto", str(h.root / "emperor.log")),
                env=h.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for h in hosts:
            wait_for(lambda: ready(h) and serves(h, apps, "v1"), 90, f"{h.ns} serving v1")
        lbdir = work / "lb"
        lbdir.mkdir()
        servers = "\n".join(f"        server {h.addr}:{FRONT_PORT};" for h in hosts)
        (lbdir / "nginx.conf").write_text(LB_CONF.format(dir=lbdir, servers=servers, port=FRONT_PORT))
        nginx = subprocess.Popen(in_ns(lb, "nginx", "-e", "stderr", "-p", str(lbdir), "-c",
                                       str(lbdir / "nginx.conf")),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        wait_for(lambda: ns_get(lb, f"http://127.0.0.1:{FRONT_PORT}/", domains[0])[0] == 200,
                 30, "the load balancer")
        stop_file, progress = work / "stop", work / "progress"
        load = subprocess.Popen(
            in_ns(lb, sys.executable, "-c", LOADGEN, "127.0.0.1", str(FRONT_PORT),
                  ",".join(domains), str(args.threads), str(args.rate), str(stop_file),
                  str(args.max_seconds), str(progress)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: progress.exists(), 30, "the load to start")
        started = time.monotonic()
        for h in hosts:
            t0 = time.monotonic()
            (h.root / "code" / "VERSION.new").write_text("v2\n")
            os.replace(h.root / "code" / "VERSION.new", h.root / "code" / "VERSION")
            r = run(EMPEROR, "reload-base", "--wait", "--timeout", "120", "--dir", str(h.vassals),
                    env=h.env, check=False, timeout=150)
            if r.returncode != 0:
                raise SystemExit(f"rolling_deploy: {h.ns}: reload-base failed: {r.stdout}{r.stderr}")
            h.gate = wait_for(lambda: ready(h), 60, f"{h.ns} ready")
            wait_for(lambda: serves(h, apps, "v2"), 60, f"{h.ns} serving v2")
            h.deploy_seconds = time.monotonic() - t0
            print(f"rolling_deploy: {h.ns}: {r.stdout.strip().splitlines()[-1]}; ready on "
                  f"{h.gate}, every app on v2: {h.deploy_seconds:.2f} s", flush=True)
        rollout = time.monotonic() - started
        time.sleep(1.0)  # the load goes on a moment on the new code alone
        stop_file.touch()
        out, err = load.communicate(timeout=60)
        summary = json.loads(out)
        at_end = {h.ns: serves(h, apps, "v2") for h in hosts}
        lb_errors = [line for line in (lbdir / "error.log").read_text().splitlines()
                     if "[error]" in line] if (lbdir / "error.log").exists() else []
        print(json.dumps({"hosts": len(hosts), "apps": len(apps), "rollout_seconds": round(rollout, 2),
                          "per_host_seconds": [round(h.deploy_seconds, 2) for h in hosts],
                          "gate": sorted({h.gate for h in hosts}),
                          "load": summary, "every_app_on_v2": at_end,
                          "balancer_errors": len(lb_errors)}, indent=1))
        ok = summary["failed"] == 0 and all(at_end.values())
        print(f"rolling_deploy: {'PASS' if ok else 'FAIL'}: {summary['requests']} requests, "
              f"{summary['failed']} failed, rollout {rollout:.2f} s over {len(hosts)} hosts")
        return 0 if ok else 1
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        for p in [nginx] + [h.proc for h in hosts]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [nginx] + [h.proc for h in hosts]:
            if p is not None:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in [lb] + [h.ns for h in hosts]:
            run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
