"""The cockpit on one real fleet: `emperor status` through the default
socket, every field of every vassal, the last error; reload/stop/start of
one vassal under load, verbs on several names, `emperor logs`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from psgi_forkserver import status

from support import EMPEROR, free_port, get, wait_for
from support.cockpit import cockpit_fleet, emperor_cli, http_get

HERE = Path(__file__).resolve().parent
DIES = HERE / "apps" / "dies.psgi"

@pytest.fixture(scope="module")
def fleet(xprocess):
    with cockpit_fleet(xprocess) as f:
        yield f


# -- status -------------------------------------------------------------------------


def test_status_finds_the_running_emperor_without_stats(fleet):
    assert fleet.stats.is_socket() and (fleet.stats.stat().st_mode & 0o777) == 0o600
    plain = emperor_cli("status")
    assert plain.returncode == 0, plain.stderr
    by_dir = emperor_cli("status", "--dir", fleet.dir, "--json")
    assert by_dir.returncode == 0, by_dir.stderr
    assert set(json.loads(by_dir.stdout)["vassals"]) == {"base", "a", "b", "dies"}
    for name in ("base", "a", "b", "dies"):
        assert f"\n{name} " in plain.stdout
    assert "dies: " in plain.stdout and "died (exit status 1)" in plain.stdout


def test_no_running_emperor_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([EMPEROR, "status"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, status.RUN_DIR_ENV: str(tmp_path)})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("emperor: status: no running Emperor") and r.stderr.count("\n") == 1


def test_every_vassal_carries_every_field_in_every_state(fleet):
    doc = fleet.doc()
    fields = {"state", "pid", "base_generation", "addresses", "names", "uptime", "restarts",
              "last_exit", "last_error", "pss", "uss", "requests", "latency_avg_ms"}
    for name, v in doc["vassals"].items():
        assert fields <= set(v), (name, sorted(fields - set(v)))
    a = doc["vassals"]["a"]
    assert a["state"] == "loyal" and a["addresses"] == [f"127.0.0.1:{fleet.ports['a']}"]
    assert a["base_generation"] == 1 and a["pss"] > 0 and a["uss"] > 0 and a["uptime"] >= 0
    dies = doc["vassals"]["dies"]
    assert dies["state"] in ("throttled", "adopting", "starting"), dies
    assert "died (exit status 1)" in dies["last_error"] and dies["last_exit"] == "exit status 1"
    assert dies["restarts"] >= 1


def test_the_last_error_is_the_line_the_app_wrote_before_it_died(fleet):
    """Not only `pid N died (exit status 1)`: the vassal's own last lines
    (here: the app's `die` at load), in the text, the JSON and the page."""
    said = "cannot load app '%s'" % DIES
    why = "boom: this app refuses to load"

    def told() -> dict | None:
        d = fleet.vassal("dies")
        return d if why in (d["last_error"] or "") else None
    dies = wait_for(told, 30, "the app's own error in the status")
    assert said in dies["error"] and "died (exit status 1)" in dies["error"]
    assert any(why in line for line in dies["last_output"]), dies["last_output"]
    plain = emperor_cli("status")
    line = next(ln for ln in plain.stdout.splitlines() if ln.startswith("dies: "))
    assert why in line and "exit status 1" in line, plain.stdout
    code, page = http_get(fleet.url("/"))
    assert code == 200 and why in page
    # a vassal that runs has no such lines
    assert fleet.vassal("a")["last_output"] == []


def documented_fields(section: str) -> set[str]:
    """The fields docs/status.md lists under `## SECTION` (first column)."""
    text = (HERE.parent / "docs" / "status.md").read_text()
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    out: set[str] = set()
    for line in part.splitlines():
        if line.startswith("| `"):
            out |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return out


def test_the_last_error_stays_the_apps_once_it_runs_again(fleet, tmp_path):
    """In every state: a vassal that died at load, then loaded, shows that
    error as its last one (not as its error), whatever it writes since."""
    mark = tmp_path / "ready"
    app = tmp_path / "later.psgi"
    app.write_text(f'die "later: not yet\\n" unless -e "{mark}";\n'
                   'sub { warn "serving\\n"; [200, ["Content-Type" => "text/plain"], ["ok\\n"]] };\n')
    port = free_port()
    (fleet.dir / "later.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\npsgi = {app}\n")
    try:
        wait_for(lambda: "later: not yet" in (fleet.vassal("later")["error"] or ""), 30,
                 "the load error")
        mark.touch()
        wait_for(lambda: fleet.vassal("later")["state"] == "loyal", 30, "later to run")
        for _ in range(25):  # more lines than a vassal's recent lines used to keep
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        wait_for(lambda: len([ln for ln in emperor_cli("logs", "later").stdout.splitlines()
                              if "serving" in ln]) >= 25, 30, "its lines read")
        v = fleet.vassal("later")
        assert v["error"] is None and "later: not yet" in v["last_error"], v
        assert "died (exit status 1)" in v["last_error"] and v["last_exit"] == "exit status 1"
    finally:
        (fleet.dir / "later.ini").unlink()
        wait_for(lambda: "later" not in fleet.doc()["vassals"], 30, "later to go")


def test_every_field_of_the_document_is_documented(fleet):
    doc = fleet.doc()
    vassal_fields = documented_fields("Each vassal")
    for name, v in doc["vassals"].items():
        assert set(v) <= vassal_fields, (name, set(v) - vassal_fields)
        assert vassal_fields - {"other_pids", "spares"} <= set(v), (name, vassal_fields - set(v))
    assert set(doc) == documented_fields("Top level")
    assert set(doc["emperor"]) == documented_fields("`emperor`")
    assert doc["schema"] == 1


# -- control ------------------------------------------------------------------------


@dataclass
class Load:
    """GET requests on one port from a thread, bounded in count and time,
    each on a new connection; every failure is kept."""

    port: int
    limit: int = 50000  # loopback serves thousands a second: the time bounds it
    seconds: float = 120.0
    ok: int = 0
    unavailable: int = 0  # 503: answered at once while nobody serves (stopped)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        while not self.stop.is_set() and self.ok + len(self.failed) < self.limit \
                and time.monotonic() < end:
            try:
                get(self.port, timeout=60)
                self.ok += 1
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    self.failed.append(repr(e))
                self.unavailable += 1
                time.sleep(0.01)  # Retry-After says when; a client loop, not a sync
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.failed.append(repr(e))

    def __enter__(self) -> "Load":
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.ok >= 5 or self.failed, 30, "the load to start")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(90)


def test_reload_stop_start_one_vassal_under_load_fails_no_request(fleet):
    old = fleet.vassal("a")
    with Load(fleet.ports["a"]) as load:
        r = emperor_cli("reload", "a")
        assert r.returncode == 0, r.stderr
        now = fleet.vassal("a")
        assert now["pid"] != old["pid"] and now["state"] == "loyal"
        assert "reload a: reloading pid" in r.stdout and f"pid {now['pid']}" in r.stdout
        seen = load.ok
        wait_for(lambda: load.ok > seen + 5, 30, "requests to the new process")

        r = emperor_cli("stop", "a")
        assert r.returncode == 0, r.stderr
        assert "stop a: stopped" in r.stdout
        st = fleet.vassal("a")
        assert st["state"] == "stopped" and st["pid"] is None
        # stopped: its socket stays, and the Emperor answers 503 at once
        # (nobody would accept what waits in the backlog)
        seen = load.unavailable
        wait_for(lambda: load.unavailable > seen + 3, 30, "503 while stopped")
        r = emperor_cli("start", "a")
        assert r.returncode == 0, r.stderr
        assert fleet.vassal("a")["state"] == "loyal"
        seen = load.ok
        wait_for(lambda: load.ok > seen + 5, 30, "requests after the start")
    assert load.failed == [] and load.ok > 15, (load.ok, load.failed[:5])


def test_status_counts_the_operators_reloads_carried_out(fleet):
    def reloads() -> int:
        r = emperor_cli("status", "a", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["operator_reloads"]
    before = reloads()
    assert emperor_cli("reload", "a").returncode == 0
    assert reloads() == before + 1
    # a reload that cannot happen (a stopped vassal) counts nothing
    assert emperor_cli("stop", "a").returncode == 0
    assert emperor_cli("reload", "a").returncode == 1
    assert emperor_cli("start", "a").returncode == 0
    assert reloads() == before + 1


def test_stopped_vassal_stays_stopped_until_started_or_its_file_changes(fleet):
    r = emperor_cli("stop", "b")
    assert r.returncode == 0, r.stderr
    again = emperor_cli("stop", "b")
    assert again.returncode == 0 and "already stopped" in again.stdout
    r = emperor_cli("reload", "b")
    assert r.returncode == 1 and "is stopped" in r.stderr
    # a rescan (SIGHUP) reads the unchanged file: still stopped
    os.kill(fleet.pid, 1)
    wait_for(lambda: fleet.vassal("b")["state"] == "stopped", 10, "b to stay stopped")
    with pytest.raises(OSError):
        get(fleet.ports["b"], timeout=1)  # waits in the backlog: no answer
    text = (fleet.dir / "b.ini").read_text()
    (fleet.dir / "b.ini").write_text(text + "; touched\n")
    wait_for(lambda: get(fleet.ports["b"], timeout=5)["name"] == "b", 40, "b to run again")


def test_commands_that_cannot_happen_exit_1_with_the_reason(fleet):
    r = emperor_cli("stop", "nope")
    assert r.returncode == 4 and "stop nope: no such vassal" in r.stderr and "a, b, base" in r.stderr
    r = emperor_cli("stop", "base")
    assert r.returncode == 1 and "is a base" in r.stderr
    r = emperor_cli("reload", "dies", "--timeout", "60")
    assert r.returncode == 1 and "died (exit status 1)" in r.stderr, (r.stdout, r.stderr)


def test_verbs_on_several_names_globs_and_all_each_waited_for(fleet):
    """reload/stop/start take names, globs and --all, and wait for every
    outcome: exit 0 when all came out, 1 when one failed, 4 for a name
    or glob that matches no vassal (the others are still done)."""
    pids = {n: fleet.vassal(n)["pid"] for n in ("a", "b")}
    r = emperor_cli("reload", "a", "b")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "reload a: loyal, pid" in r.stdout and "reload b: loyal, pid" in r.stdout
    assert all(fleet.vassal(n)["pid"] not in (None, pids[n]) for n in pids)
    r = emperor_cli("stop", "[ab]")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert fleet.vassal("a")["state"] == fleet.vassal("b")["state"] == "stopped"
    r = emperor_cli("start", "[ab]", "nope-*")
    assert r.returncode == 4 and "start nope-*: no such vassal" in r.stderr, (r.stdout, r.stderr)
    assert fleet.vassal("a")["state"] == fleet.vassal("b")["state"] == "loyal"
    r = emperor_cli("reload", "--all", "--timeout", "60")  # dies fails again: 1
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "reload a: loyal" in r.stdout and "reload b: loyal" in r.stdout
    assert "reload dies: " in r.stderr and "boom" in r.stderr
    # --all leaves the bases alone (the output names paths, which may hold "base")
    assert "reload base" not in r.stdout + r.stderr
    assert emperor_cli("reload").returncode == 2


def test_status_of_one_vassal_says_why_and_exits_by_its_state(fleet):
    r = emperor_cli("status", "dies")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "boom: this app refuses to load" in r.stdout and "exit status 1" in r.stdout
    assert "\na " not in r.stdout  # that vassal only
    r = emperor_cli("status", "a")
    assert r.returncode == 0 and "loyal" in r.stdout
    r = emperor_cli("status", "a", "--json")
    assert json.loads(r.stdout)["state"] == "loyal"
    r = emperor_cli("status", "nope")
    assert r.returncode == 4 and "no such vassal" in r.stderr


def test_logs_of_one_vassal_without_the_status_page_and_follow(fleet):
    r = emperor_cli("logs", "dies", "-n", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert 1 <= len(lines) <= 3 and any("died (exit status 1)" in ln or "boom" in ln
                                        for ln in lines), lines
    assert emperor_cli("logs", "nope").returncode == 4
    follow = subprocess.Popen([EMPEROR, "logs", "b", "-f", "-n", "1"], stdout=subprocess.PIPE,
                              text=True)
    try:
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        wait_for(lambda: seen, 30, "the follower's first line")
        assert emperor_cli("reload", "b").returncode == 0
        wait_for(lambda: any("reload: asked by the operator" in ln for ln in seen[1:]), 30,
                 "the new line in the follower's output")
    finally:
        follow.terminate()
        follow.wait(10)
