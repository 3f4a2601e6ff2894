"""The cockpit on one real fleet: `emperor status` through the default
socket, every field of every vassal, reload/stop/start of one vassal under
load, /metrics read back by prometheus_client's parser, /healthz, the
recent log lines, `reload-base --wait` over the stats socket; and systemd's
notify messages through a real datagram socket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from psgi_forkserver import paths, status
from psgi_forkserver.proc import Phase

import browser
from support import (
    EMPEROR, Emperors, app_ini, base_ini, descendants, free_port, get, start_emperor, stop_emperor, wait_for,
)
from support.front import ini, needs_nginx

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "hello.psgi"
DIES = HERE / "apps" / "dies.psgi"

pytestmark = pytest.mark.skipif(not paths.vassal_program().is_file(),
                                reason="the Perl vassal program is not there")


def emperor_cli(*args, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([EMPEROR, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def fleet(xprocess):
    ports = {"a": free_port(), "b": free_port()}
    http_port = free_port()
    # no --stats: the default socket in the run directory (tests/conftest.py)
    emperors = Emperors(xprocess, "pfs-cockpit-", stats=False, args=[
        "--mercy", "5", "--rescan-interval", "600", "--backoff-max", "2", "--status-http", f"127.0.0.1:{http_port}"])
    try:
        f = emperors({"a": app_ini("a", ports["a"], processes=2), "b": app_ini("b", ports["b"], processes=1),
                      "dies": f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {DIES}\n"})
        f.ports, f.status_http_port, f.stats = ports, http_port, status.default_stats_path(f.dir)
        for name, port in ports.items():
            wait_for(lambda p=port, n=name: get(p)["name"] == n, 40, f"{name} to answer")
        wait_for(lambda: f.vassal("dies")["failures"] >= 1, 40, "dies to fail")
        yield f
    finally:
        emperors.stop()


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
    assert "base" not in r.stdout + r.stderr  # --all leaves the bases alone
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


# -- pages ----------------------------------------------------------------------------


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(fleet) -> dict[str, list]:
    """Samples by sample name (a counter's family `x` has samples `x_total`)."""
    code, text = http_get(fleet.url("/metrics"))
    assert code == 200
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
        for s in family.samples:
            if s.name != family.name:
                out.setdefault(s.name, []).append(s)
    return out


def sample(families: dict, name: str, **labels) -> float:
    for s in families[name]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_metrics_parse_as_prometheus_text(fleet):
    m = metrics(fleet)
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="loyal") == 1
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="stopped") == 0
    assert sample(m, "psgi_forkserver_vassal_up", vassal="dies") == 0
    assert sample(m, "psgi_forkserver_vassal_restarts_total", vassal="dies") >= 1
    assert sample(m, "psgi_forkserver_vassal_pss_bytes", vassal="a") > 0
    assert sample(m, "psgi_forkserver_vassal_uss_bytes", vassal="base") > 0
    adoptions = sample(m, "psgi_forkserver_adoptions_total")
    assert adoptions >= 3  # a, b, and dies at least once
    hist = m["psgi_forkserver_adoption_seconds"]
    count = next(s.value for s in hist if s.name.endswith("_count"))
    inf = next(s.value for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    assert count == inf == adoptions
    assert sample(m, "psgi_forkserver_base_generation") >= 1


def test_metrics_request_duration_as_counters_every_state_and_sleeping_is_up(fleet):
    """Request durations as a sum and a count Prometheus can rate (not an
    average since start); every state a vassal can be in, `refused`
    included; an on-demand vassal asleep is up (its socket serves)."""
    for _ in range(3):
        get(fleet.ports["b"])
    sleepy = free_port()
    (fleet.dir / "sleepy.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{sleepy}\non-demand = true\npsgi = {APP}\n")
    try:
        wait_for(lambda: fleet.vassal("sleepy")["state"] == "on-demand", 30, "sleepy to sleep")
        m = metrics(fleet)
        assert sample(m, "psgi_forkserver_vassal_up", vassal="sleepy") == 1
        assert sample(m, "psgi_forkserver_vassal_up", vassal="a") == 1
        states = {s.labels["state"] for s in m["psgi_forkserver_vassal_state"]
                  if s.labels["vassal"] == "a"}
        assert states == {p.value for p in Phase}, states ^ {p.value for p in Phase}
        count = sample(m, "psgi_forkserver_vassal_request_duration_seconds_count", vassal="b")
        total = sample(m, "psgi_forkserver_vassal_request_duration_seconds_sum", vassal="b")
        assert count >= 3 and 0 < total < count * 5
        assert count == sample(m, "psgi_forkserver_vassal_requests_total", vassal="b")
        assert "psgi_forkserver_vassal_latency_avg_seconds" not in m
        assert fleet.vassal("b")["request_seconds"] == pytest.approx(total, abs=1e-3)
    finally:
        (fleet.dir / "sleepy.ini").unlink()
        wait_for(lambda: "sleepy" not in fleet.doc()["vassals"], 30, "sleepy to go")


def test_healthz_and_recent_log_lines(fleet):
    code, text = http_get(fleet.url("/healthz"))
    assert code == 200 and text.startswith("ok: loop turns, base base generation"), text
    code, text = http_get(fleet.url("/log/dies"))
    assert code == 200 and "died (exit status 1)" in text
    assert http_get(fleet.url("/log/nope"))[0] == 404


def test_readyz_waits_for_every_vassal_to_settle_healthz_does_not(fleet, tmp_path):
    """/readyz is systemd's READY=1 rule for the vassals of now: a vassal
    still loading holds it at 503 (naming it) while /healthz stays 200; a
    vassal that failed for good (dies: throttled) does not."""
    wait_for(lambda: http_get(fleet.url("/readyz"))[0] == 200, 60, "the fleet to be ready")
    slow = tmp_path / "slow.psgi"
    slow.write_text('sleep 4; sub { [200, ["Content-Type" => "text/plain"], ["slow\\n"]] };\n')
    (fleet.dir / "slow.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {slow}\n")
    try:
        code, why = wait_for(lambda: (r := http_get(fleet.url("/readyz")))[0] == 503 and r, 30,
                             "/readyz to wait for the new vassal")
        assert "not settled: slow" in why, why
        assert http_get(fleet.url("/healthz"))[0] == 200
        wait_for(lambda: http_get(fleet.url("/readyz"))[0] == 200, 60, "slow to settle")
        assert fleet.vassal("slow")["state"] == "loyal"
    finally:
        (fleet.dir / "slow.ini").unlink()
        wait_for(lambda: "slow" not in fleet.doc()["vassals"], 30, "slow to go")


def test_reload_base_wait_over_the_stats_socket_and_deploy_metrics(fleet):
    before = sample(metrics(fleet), "psgi_forkserver_base_generation")
    r = emperor_cli("reload-base", "--wait", timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "started" in r.stdout and ": done," in r.stdout
    m = metrics(fleet)
    assert sample(m, "psgi_forkserver_base_generation") == before + 1
    assert sample(m, "psgi_forkserver_deploys_total", outcome="done") >= 1
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="loyal") == 1
    code, _ = http_get(fleet.url("/healthz"))
    assert code == 200


# -- systemd notify -------------------------------------------------------------------


@pytest.fixture
def notify_socket():
    d = Path(tempfile.mkdtemp(prefix="pfs-notify-"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(d / "notify"))
    try:
        yield s, d / "notify"
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


class Messages:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.all: list[str] = []

    def until(self, pred, timeout: float = 60.0, what: str = "a message") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.all.append(msg)
            if pred(msg):
                return msg
        raise AssertionError(f"no {what} within {timeout:g} s; got {self.all}")


def test_notify_ready_status_watchdog_and_reloading(xprocess, notify_socket):
    sock, path = notify_socket
    vdir = Path(tempfile.mkdtemp(prefix="pfs-notify-v-"))
    (vdir / "base.ini").write_text(base_ini(APP))
    port = free_port()
    (vdir / "app.ini").write_text(app_ini("app", port, processes=1))
    (vdir / "broken.ini").write_text("[uwsgi]\nno-such-option = 1\n")  # config-error: fails for good
    em = None
    try:
        em = start_emperor(xprocess, "emperor-notify", [vdir, "--mercy", "5"],
                           {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        msgs = Messages(sock)
        ready = msgs.until(lambda m: "READY=1" in m, 60, "READY=1")
        # READY only once every vassal present at start serves or failed for good
        assert "loyal" in ready and "config-error" in ready and "3 vassals" in ready, ready
        assert get(port)["name"] == "app"
        msgs.until(lambda m: m == "WATCHDOG=1", 10, "WATCHDOG=1")
        # a deploy: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again
        r = emperor_cli("reload-base", "--dir", vdir)
        assert r.returncode == 0, r.stderr
        reloading = msgs.until(lambda m: "RELOADING=1" in m, 60, "RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading and "base generation 2" in reloading
        msgs.until(lambda m: "READY=1" in m, 60, "READY=1 after the deploy")
        stop_emperor(em)
        em = None
        msgs.until(lambda m: "STOPPING=1" in m, 30, "STOPPING=1")
    finally:
        if em is not None:
            stop_emperor(em)
        shutil.rmtree(vdir, ignore_errors=True)


def test_notify_messages_wait_for_a_full_socket_and_keep_their_order(xprocess, notify_socket):
    """A supervisor that reads its socket late (the queue full of watchdog
    pings) still gets RELOADING=1 then READY=1 of a deploy, in order: state
    messages wait for room, watchdog pings are not queued."""
    sock, path = notify_socket
    vdir = Path(tempfile.mkdtemp(prefix="pfs-notify-v-"))
    (vdir / "base.ini").write_text(base_ini(APP))
    port = free_port()
    (vdir / "app.ini").write_text(app_ini("app", port, processes=1))
    em = None
    try:
        # a watchdog ping every 10 ms fills the datagram queue (10 here,
        # net.unix.max_dgram_qlen) while nobody reads it
        em = start_emperor(xprocess, "emperor-notify-full", [vdir, "--mercy", "5"],
                           {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000"})
        wait_for(lambda: get(port), 30, "the app to answer")
        wait_for(lambda: em.lines("cannot send to NOTIFY_SOCKET"), 60, "the notify socket to be full")
        r = emperor_cli("reload-base", "--dir", vdir, "--wait")
        assert r.returncode == 0, r.stderr
        msgs = Messages(sock)

        def ready_after_reloading(m: str) -> bool:
            return m.startswith("READY=1") and any(x.startswith("RELOADING=1") for x in msgs.all[:-1])
        msgs.until(ready_after_reloading, 60, "READY=1 after RELOADING=1")
        kinds = [m.split("\n")[0] for m in msgs.all if m != "WATCHDOG=1"]
        # the start's READY=1 too, sent while the queue was full
        assert kinds.index("READY=1") < kinds.index("RELOADING=1"), kinds
    finally:
        if em is not None:
            stop_emperor(em)
        shutil.rmtree(vdir, ignore_errors=True)


# -- the page in a real browser ---------------------------------------------------------


def visible_rows(page) -> list[str]:
    return page.evaluate(
        "[...document.querySelectorAll('#vassals tbody tr')]"
        ".filter(tr => tr.offsetParent !== null).map(tr => tr.dataset.name)")


@pytest.mark.skipif(browser.CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_status_page_in_headless_chromium(fleet, tmp_path):
    """What a person sees: the counts at the top, the failing vassal's error
    in its row, the page following the fleet without reloading, filter and
    sort; the screenshot goes to $PFS_SCREENSHOT when set (docs/status-page.png)."""
    shot = Path(os.environ.get("PFS_SCREENSHOT") or tmp_path / "status-page.png")
    page = browser.Chromium(width=1280, height=560)
    profile = page.profile
    try:
        page.navigate(fleet.url("/"))
        wait_for(lambda: page.evaluate("Number(document.body.dataset.refreshes)") >= 1, 30,
                 "the page's first refresh")
        counts = page.evaluate("document.getElementById('counts').innerText")
        assert "4 vassals" in " ".join(counts.split()) and "loyal" in counts, counts
        row = page.evaluate("document.querySelector('tr[data-name=\"dies\"]').innerText")
        assert "died (exit status 1)" in row and "exit status 1" in row, row

        # the fleet changes; the page follows in place: no navigation, no reload
        page.evaluate("window.stillTheSamePage = true")
        r = emperor_cli("stop", "b")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "stopped" in page.evaluate(
            "document.querySelector('tr[data-name=\"b\"] td[data-k=\"state\"]').innerText"),
            30, "the page to show b stopped")
        assert page.evaluate("window.stillTheSamePage") is True
        assert "stopped" in page.evaluate("document.getElementById('counts').innerText")

        # filter by name, as typed; by state, from the counts; sort by a click
        page.type_text("#filter", "di")
        assert visible_rows(page) == ["dies"]
        page.evaluate("const f = document.getElementById('filter'); f.value = '';"
                      "f.dispatchEvent(new Event('input'))")
        page.click(".count.stopped")
        assert visible_rows(page) == ["b"]
        page.click(".count.all")
        assert visible_rows(page) == ["a", "b", "base", "dies"]
        page.click("th[data-k=name]")  # already sorted by name: now descending
        assert visible_rows(page) == ["dies", "base", "b", "a"]
        page.click("th[data-k=name]")
        page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        page.close()
        r = emperor_cli("start", "b")
        assert r.returncode == 0, r.stderr
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(profile in a for a in (p.info["cmdline"] or []))]
    assert left == [], f"chromium processes left: {left}"


def test_version_and_an_example_in_every_commands_help():
    r = emperor_cli("--version", timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("emperor (psgi-forkserver) ")
    from psgi_forkserver.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "status", "reload", "stop", "start", "reload-base", "prove"} <= set(sub.choices)
    for name in sub.choices:
        r = emperor_cli(name, "--help", timeout=30)
        assert r.returncode == 0 and "\nexample:\n  emperor " + name in r.stdout, (name, r.stdout)
    top = emperor_cli("--help", timeout=30).stdout
    for name in sub.choices:
        assert f"  emperor {name}" in top, name


def raw_command(path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(line)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


def test_bad_command_lines_get_a_precise_reply_and_the_fleet_runs_on(fleet):
    r = raw_command(fleet.stats, b"frobnicate a\n")
    assert r["ok"] is False and r["message"].startswith("unknown command 'frobnicate'")
    r = raw_command(fleet.stats, b'{"command": \n')
    assert r["ok"] is False and "JSONDecodeError" in r["message"]
    r = raw_command(fleet.stats, b"stop\n")  # no name
    assert r["ok"] is False and "no vassal None" in r["message"]
    r = raw_command(fleet.stats, b"x" * 9000)  # never a line
    assert r["ok"] is False and r["message"] == "command line too long"
    assert fleet.vassal("a")["state"] == "loyal" and get(fleet.ports["a"])["name"] == "a"


def test_a_command_written_after_connect_is_never_taken_for_a_plain_read(fleet):
    """Documents come in the next loop turn now that process figures are
    reused: a client that writes its command right after connect() still
    gets the command's reply, and one that only reads still gets the document."""
    for _ in range(20):
        r = raw_command(fleet.stats, b"frobnicate a\n")
        assert r["message"].startswith("unknown command 'frobnicate'"), r
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(fleet.stats))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert "a" in json.loads(data)["vassals"]


def test_a_run_directory_that_cannot_be_used_is_one_line_and_the_fleet_starts(xprocess, tmp_path):
    vdir = tmp_path / "v"
    vdir.mkdir()
    port = free_port()
    (vdir / "solo.ini").write_text(app_ini("solo", port, processes=1) + f"psgi = {APP}\n")
    em = start_emperor(xprocess, "emperor-norundir", [vdir, "--mercy", "5"],
                       {status.RUN_DIR_ENV: "/proc/no-such-dir/run"})
    try:
        wait_for(lambda: get(port)["name"] == "solo", 40, "solo to answer")
        lines = em.lines("no default stats socket")
        assert len(lines) == 1 and "/proc/no-such-dir/run/" in lines[0], em.text()
    finally:
        stop_emperor(em)


def test_requests_file_is_summed_over_its_worker_slots(tmp_path, monkeypatch):
    monkeypatch.setenv(status.RUN_DIR_ENV, str(tmp_path))
    assert status.read_requests(4242) is None
    status.requests_path(4242).write_bytes(
        status.REQUESTS_SLOT.pack(3, 3000) + status.REQUESTS_SLOT.pack(1, 5000) + b"\0" * 16)
    assert status.read_requests(4242) == (4, 2.0, 0.008)
    status.forget_requests(4242)
    assert not status.requests_path(4242).exists()


def test_two_emperors_status_names_both_and_dir_picks_one(fleet, xprocess, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    em = start_emperor(xprocess, "emperor-other", [other, "--mercy", "5"])
    try:
        r = emperor_cli("status")
        assert r.returncode == 1 and "2 Emperors run here" in r.stderr, r.stderr
        assert str(fleet.dir.resolve()) in r.stderr and str(other.resolve()) in r.stderr
        r = emperor_cli("status", "--dir", other, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["vassals"] == {}
    finally:
        stop_emperor(em)
    assert emperor_cli("status").returncode == 0


def test_requests_served_and_average_latency_reported_by_the_vassal(fleet):
    before = fleet.vassal("a")
    assert before["requests"] is not None, before  # the vassal reports from its start
    for _ in range(25):
        assert get(fleet.ports["a"])["name"] == "a"
    after = wait_for(lambda: (v := fleet.vassal("a"))["requests"] >= before["requests"] + 25 and v,
                     20, "25 more requests in the status")
    assert after["pid"] == before["pid"] and after["latency_avg_ms"] > 0
    assert sample(metrics(fleet), "psgi_forkserver_vassal_requests_total", vassal="a") \
        >= after["requests"]
    assert status.requests_path(after["pid"]).is_file()
    assert fleet.vassal("dies")["requests"] is None  # never served: no file
    table = emperor_cli("status").stdout
    row = next(line for line in table.splitlines() if line.startswith("a "))
    assert f" {fleet.vassal('a')['requests']} " in row or str(after["requests"]) in row, row


def test_a_vassals_requests_file_goes_with_its_process(fleet):
    pid = fleet.vassal("b")["pid"]
    path = status.requests_path(pid)
    assert path.is_file()
    r = emperor_cli("reload", "b")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not path.exists(), 20, "the old process's requests file to go")
    assert status.requests_path(fleet.vassal("b")["pid"]).is_file()


def test_recycled_workers_keep_counting_in_their_slot(fleet):
    """max-requests recycles a worker: its successor goes on from the slot's
    numbers, so the vassal's total does not drop."""
    port = free_port()
    (fleet.dir / "recycled.ini").write_text(app_ini("recycled", port, processes=1)
                                            + "max-requests = 4\n")
    try:
        wait_for(lambda: get(port)["name"] == "recycled", 40, "recycled to answer")
        pids = {get(port)["pid"] for _ in range(11)}
        assert len(pids) >= 3, pids  # 12 requests, a new worker every 4
        v = wait_for(lambda: (v := fleet.vassal("recycled"))["requests"] == 12 and v, 20,
                     "12 requests counted")
        assert v["latency_avg_ms"] > 0
    finally:
        (fleet.dir / "recycled.ini").unlink()
        wait_for(lambda: "recycled" not in fleet.doc()["vassals"], 30, "recycled to go")


@pytest.fixture
def short_run_dir():
    """A run directory of this test's own, short (UNIX socket paths go
    under it), removed after it."""
    run = Path(tempfile.mkdtemp(prefix="rd-"))
    yield run
    shutil.rmtree(run, ignore_errors=True)


@contextlib.contextmanager
def run_dir_env(run: Path):
    """Emperors started inside take `run` as their run directory."""
    old = os.environ.get(status.RUN_DIR_ENV)
    os.environ[status.RUN_DIR_ENV] = str(run)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(status.RUN_DIR_ENV, None)
        else:
            os.environ[status.RUN_DIR_ENV] = old


def site_vassals_dir(vdir: Path) -> Path:
    """A vassals directory with one vassal that has `domain` and no
    http-socket: its UNIX socket goes in the run directory's sockets/."""
    vdir.mkdir()
    (vdir / "site.ini").write_text("[uwsgi]\ndomain = site.test\n"
                                   f"psgi = {Path(__file__).parent / 'apps' / 'hello.psgi'}\n")
    return vdir


def test_an_emperor_leaves_no_empty_directory_in_the_run_directory(xprocess, tmp_path, short_run_dir):
    """Its default run directory (stats socket, vassals' UNIX sockets) is
    one per vassals directory: an Emperor that stops removes it, rather than
    leaving one empty directory behind for every directory ever run."""
    run = short_run_dir
    vdir = site_vassals_dir(tmp_path / "vassals")
    with run_dir_env(run):
        e = start_emperor(xprocess, "emperor-rundir", [vdir])
    try:
        wait_for(lambda: list(run.glob("*/stats")) and list(run.glob("*/sockets/*.sock")), 15,
                 "the default stats socket and the vassal's socket")
    finally:
        stop_emperor(e)
    assert e.popen.returncode == 0
    assert list(run.iterdir()) == []


@pytest.mark.parametrize("where", ["elsewhere", "the default"])
def test_an_emperor_given_a_run_directory_keeps_it_and_leaves_no_stats_directory(
        xprocess, tmp_path, short_run_dir, where):
    """--run-dir is the operator's: never removed, even empty, even when it is
    the default one. Without --stats the stats socket still goes in the
    default directory (RUNDIR/HASH), made by this run: it goes at exit."""
    run = short_run_dir
    vdir = site_vassals_dir(tmp_path / "vassals")
    with run_dir_env(run):
        default = status.default_stats_path(vdir).parent
        given = default if where == "the default" else run / "given"
        e = start_emperor(xprocess, "emperor-rundir-given", [vdir, "--run-dir", given])
    try:
        wait_for(lambda: (default / "stats").exists() and list(given.glob("sockets/*.sock")), 15,
                 "the default stats socket and the vassal's socket in the given directory")
    finally:
        stop_emperor(e)
    assert e.popen.returncode == 0
    assert given.is_dir(), "the given run directory was removed"
    assert not (default / "stats").exists()
    left = {p.relative_to(run) for p in run.rglob("*")}
    kept = {Path("given"), Path("given/sockets")} if where == "elsewhere" else \
        {default.relative_to(run), default.relative_to(run) / "sockets"}
    assert left == kept, left


def test_emperors_sharing_a_run_directory_remove_only_their_own(xprocess, tmp_path, short_run_dir):
    """Two Emperors on two vassals directories share the run directory, each
    in its own RUNDIR/HASH: one that stops leaves the other's alone; one
    killed with -9 leaves its directory, and the next start on the same
    vassals directory serves from it (stale sockets replaced), then removes it."""
    vdirs = [site_vassals_dir(tmp_path / "a"), site_vassals_dir(tmp_path / "b")]
    with run_dir_env(short_run_dir):
        homes = [status.default_stats_path(v).parent for v in vdirs]
        started = []

        def start(i: int, name: str):
            e = start_emperor(xprocess, name, [vdirs[i]])
            started.append(e)
            wait_for(lambda: (homes[i] / "stats").exists() and list(homes[i].glob("sockets/*.sock")),
                     15, f"emperor {i}'s stats socket and vassal socket")
            return e

        a, b = start(0, "emperor-share-a"), start(1, "emperor-share-b")
        try:
            stop_emperor(a)
            assert a.popen.returncode == 0
            assert not homes[0].exists()
            assert status.fetch(homes[1] / "stats", timeout=10)["vassals"]["site"]
            left = descendants(b.pid)
            b.popen.kill()
            b.popen.wait()
            wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                     for p in left), 30, "the killed Emperor's vassals to go")
            assert (homes[1] / "stats").exists()  # what -9 leaves: acceptable
            b2 = start(1, "emperor-share-b2")
            assert status.fetch(homes[1] / "stats", timeout=10)["vassals"]["site"]
            stop_emperor(b2)
            assert b2.popen.returncode == 0
            assert not homes[1].exists()
        finally:
            for e in started:
                stop_emperor(e)


def test_status_finds_an_emperor_started_with_stats_elsewhere(xprocess, tmp_path, short_run_dir):
    """`emperor run --stats PATH` records PATH in the run directory: status,
    stop, start, reload and reload-base from any shell find it; it goes at
    exit, and one left by a kill -9 does not stop the next default start."""
    vdir = site_vassals_dir(tmp_path / "vassals")
    sock = tmp_path / "elsewhere.sock"
    with run_dir_env(short_run_dir):
        e = start_emperor(xprocess, "emperor-stats-elsewhere", [vdir, "--stats", sock])
        try:
            wait_for(lambda: list(short_run_dir.glob("*/sockets/*.sock")), 15, "the vassal's socket")
            r = emperor_cli("status", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["emperor"]["vassals_dir"] == str(vdir)
            assert emperor_cli("status", "--dir", vdir).returncode == 0
            for verb in ("stop", "start", "reload"):
                r = emperor_cli(verb, "site")
                assert r.returncode == 0, (verb, r.stdout, r.stderr)
            r = emperor_cli("reload-base")
            assert "no running Emperor" not in r.stderr, r.stderr
            left = descendants(e.pid)
            e.popen.kill()  # what -9 leaves must not stop the next start
            e.popen.wait()
            wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                     for p in left), 30, "the killed Emperor's vassals to go")
            e = start_emperor(xprocess, "emperor-stats-default", [vdir])
            assert emperor_cli("status").returncode == 0
            stop_emperor(e)
            e = start_emperor(xprocess, "emperor-stats-elsewhere-2", [vdir, "--stats", sock])
            assert emperor_cli("status").returncode == 0
        finally:
            stop_emperor(e)
    assert e.popen.returncode == 0
    assert not sock.exists()
    assert list(short_run_dir.iterdir()) == []


@needs_nginx
def test_readyz_waits_for_the_front_door(front):
    """/readyz is 503 while the front door has no nginx running on the
    current routes (here: its nginx killed, until the Emperor restarts it)."""
    sport = free_port()
    f = front({"app1": ini("app1", "domain = app1.localhost")},
              "--status-http", f"127.0.0.1:{sport}")
    url = f"http://127.0.0.1:{sport}/readyz"
    wait_for(lambda: http_get(url)[0] == 200, 60, "the fleet and its front door to be ready")
    f.routed("app1.localhost", "app1")
    old = f.nginx_pid()
    os.kill(old, 9)  # the nginx this test's Emperor started, by its pid
    code, why = wait_for(lambda: (r := http_get(url))[0] == 503 and r, 30,
                         "/readyz to say the front door is down")
    assert why.startswith("front door: "), why
    wait_for(lambda: http_get(url)[0] == 200 and f.nginx_pid() != old, 60, "ready again")
