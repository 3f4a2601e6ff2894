"""The cockpit and its surroundings: systemd's notify messages through a
real datagram socket, every command's help, run directories (unusable,
shared, given, left clean) and /readyz waiting for the front door."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import status

from support import (
    app_ini, base_ini, descendants, free_port, get, start_emperor, stop_emperor, wait_for,
)
from support.front import ini, needs_nginx
from support.cockpit import emperor_cli, http_get

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "hello.psgi"

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


def test_readyz_is_not_flapped_by_a_vassal_in_a_crash_loop(xprocess, tmp_path):
    """A vassal that failed and tries again holds /readyz back no more while
    it retries: each of its start attempts (here 1.5 s long, as an app
    waiting for a database that is down) would otherwise make the whole
    host unready, every app with it (Kubernetes: two failed probes)."""
    from support import FAST
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    dies = tmp_path / "dies_slowly.psgi"
    dies.write_text("select undef, undef, undef, 1.5; die qq{no database\\n};\n")
    (vdir / "ok.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {APP}\n")
    (vdir / "dies.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {dies}\n")
    sport = free_port()
    em = start_emperor(xprocess, "emperor-readyz-crashloop",
                       [vdir, *FAST, "--status-http", f"127.0.0.1:{sport}"])
    try:
        url = f"http://127.0.0.1:{sport}/readyz"
        wait_for(lambda: http_get(url)[0] == 200, 60, "ok served and dies failed once")
        seen = []
        deadline = time.monotonic() + 6  # several attempts of dies
        while time.monotonic() < deadline:
            seen.append(http_get(url))
            time.sleep(0.05)  # a probe's period, not a synchronisation
        assert all(code == 200 for code, _ in seen), [r for r in seen if r[0] != 200][:3]
        assert em.popen.poll() is None
    finally:
        stop_emperor(em)
