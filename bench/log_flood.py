#!/usr/bin/env python3
"""The Emperor's CPU while one vassal floods its output.

    .venv/bin/python bench/log_flood.py [--lines N] [--rounds R] [--old DIR] [--lines-per-second L]

An Emperor on a base that preloads tests/apps/greedy.psgi, a vassal
`flood` with the default limits and a vassal `calm`; once both answer,
`GET /flood?lines=N` on `flood` (N lines of 100 bytes, written as fast as
it can), then one second more. Per round: the Emperor's CPU over that
window (user + system, /proc/PID/stat, and as a share of a core), the
window's length, the flood's lines that reached the log, and how long a
line of `calm` written meanwhile took to appear in it. With `--old DIR`
(`git archive REV psgi_forkserver | tar -x -C DIR`) each round runs the
code of DIR and this checkout's in turn, same machine, same minute;
`--lines-per-second L` gives this checkout's `flood` that limit instead of
the default.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import stop_process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GREEDY = ROOT / "tests" / "apps" / "greedy.psgi"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def get(port: int, path: str, timeout: float = 5.0) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.read()
    except OSError:
        return None


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def one_round(pythonpath: str | None, lines: int, limit: int | None = None) -> dict:
    top = Path(tempfile.mkdtemp(prefix="pf-flood-"))
    vdir = top / "vassals"
    vdir.mkdir()
    flood, calm = free_port(), free_port()
    (vdir / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {GREEDY}\nfork-server = fs.sock\n")
    for name, port in (("flood", flood), ("calm", calm)):
        extra = f"log-lines-per-second = {limit}\n" if limit is not None and name == "flood" else ""
        (vdir / f"{name}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
                                          f"disable-logging = true\n{extra}")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log = top / "emperor.log"
    with open(log, "wb") as out:
        em = subprocess.Popen([sys.executable, "-m", "psgi_forkserver.cli", "run", str(vdir),
                               "--stats", str(top / "stats.sock")], stderr=out, stdout=out, env=env,
                              cwd=top)
    try:
        wait(lambda: get(flood, "/") and get(calm, "/"), 60, "the vassals")
        c0, t0 = cpu_seconds(em.pid), time.monotonic()
        th = threading.Thread(target=get, args=(flood, f"/flood?lines={lines}", 300))
        th.start()
        time.sleep(0.5)
        said = time.monotonic()
        get(calm, "/say?word=calm-line")
        seen = wait(lambda: "[calm] said calm-line" in log.read_text(errors="replace") and time.monotonic(),
                    60, "calm's line")
        th.join()
        time.sleep(1.0)
        c1, t1 = cpu_seconds(em.pid), time.monotonic()
        text = log.read_text(errors="replace")
        return {"cpu": c1 - c0, "wall": t1 - t0, "share": (c1 - c0) / (t1 - t0),
                "relayed": len(re.findall(r"\[flood\] \d{8} x", text)),
                "calm_ms": (seen - said) * 1000}
    finally:
        stop_process(em)
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--lines", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--old", help="a directory holding another commit's psgi_forkserver")
    ap.add_argument("--lines-per-second", type=int, help="the flood's log-lines-per-second (this checkout only)")
    args = ap.parse_args()
    sides = [("old", args.old), ("new", str(ROOT))] if args.old else [("new", str(ROOT))]
    rows: dict[str, list[dict]] = {name: [] for name, _ in sides}
    for r in range(args.rounds):
        for name, path in sides:
            row = one_round(path, args.lines, args.lines_per_second if name == "new" else None)
            rows[name].append(row)
            load = os.getloadavg()[0]
            print(f"round {r + 1} {name}: Emperor CPU {row['cpu']:.2f} s over {row['wall']:.2f} s "
                  f"({row['share'] * 100:.1f} % of a core), {row['relayed']} of {args.lines} lines relayed, "
                  f"calm's line after {row['calm_ms']:.0f} ms (load {load:.1f})", flush=True)
    for name, _ in sides:
        xs = rows[name]
        print(f"{name}: median Emperor CPU {statistics.median(x['cpu'] for x in xs):.2f} s, "
              f"{statistics.median(x['share'] for x in xs) * 100:.1f} % of a core, "
              f"median relayed {statistics.median(x['relayed'] for x in xs):.0f}, "
              f"calm's line {statistics.median(x['calm_ms'] for x in xs):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
