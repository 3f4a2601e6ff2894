"""Hostile scenarios at the control surfaces, end to end with real Emperors
and the real Perl base: a second Emperor, stale pidfiles, bad paths, judged
vassal files, many stats clients, last errors (helpers prefixed ctl_)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from psgi_forkserver.status import fetch

from support import APP, EMPEROR, PROGRAM, app_ini, base_ini, free_port, get, wait_for

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")


ctl_needs_perl = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


def ctl_run(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    """`emperor ARGS...` to completion (a command expected to refuse)."""
    return subprocess.run([EMPEROR, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def ctl_one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- a second Emperor ----------------------------------------------------------------


@ctl_needs_perl
def test_ctl_second_emperor_on_same_dir_pidfile_or_fork_server_refuses(ctl_emperor, tmp_path):
    port = free_port()
    sockdir = Path(tempfile.mkdtemp(prefix="pfs-ctl-run-"))
    try:
        fs = sockdir / "fs.sock"
        e = ctl_emperor({"app": app_ini("app", port, processes=1)}, fork_server=fs, wait=[port])
        assert e.pidfile.read_text().strip() == str(e.pid)

        # the same vassals directory
        r = ctl_run("run", e.dir, timeout=60)
        assert r.returncode == 2, r
        assert f"vassals directory {e.dir} is in use by another Emperor (pid {e.pid})" \
            in ctl_one_line(r)

        # another directory, the same pidfile
        other = tmp_path / "other"
        other.mkdir()
        r = ctl_run("run", other, "--pidfile", e.pidfile, timeout=60)
        assert r.returncode == 2, r
        assert f"pidfile {e.pidfile} is held by a running Emperor (pid {e.pid})" in ctl_one_line(r)

        # another directory whose base names the same fork-server socket
        third = tmp_path / "third"
        third.mkdir()
        (third / "base.ini").write_text(base_ini(APP, fs))
        r = ctl_run("run", third, timeout=60)
        assert r.returncode == 2, r
        assert f"fork-server socket {fs} is in use by another Emperor (pid {e.pid})" in ctl_one_line(r)
        # and through --use-fork-server
        r = ctl_run("run", other, "--use-fork-server", fs, timeout=60)
        assert r.returncode == 2 and "in use by another Emperor" in ctl_one_line(r), r

        # the first one was not disturbed
        assert e.popen.poll() is None
        assert e.pidfile.read_text().strip() == str(e.pid)
        assert get(port)["name"] == "app"
        assert len(e.vpids("base")) == 1 and len(e.vpids("app")) == 1
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# -- reload-base --------------------------------------------------------------------


@pytest.fixture
def ctl_bystander():
    """An unrelated process that SIGUSR1 would kill (default action)."""
    p = subprocess.Popen(["sleep", "120"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_ctl_reload_base_never_signals_what_is_not_an_emperor(tmp_path, ctl_bystander):
    pidfile = tmp_path / "emperor.pid"
    pidfile.write_text(f"{ctl_bystander.pid}\n")
    # a stale pidfile: nobody holds it
    r = ctl_run("reload-base", "--pidfile", pidfile)
    assert r.returncode == 1, r
    assert "stale pidfile" in ctl_one_line(r) and str(pidfile) in r.stderr
    # held (as an Emperor holds its pidfile), but the pid is not an Emperor
    with open(pidfile) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        r = ctl_run("reload-base", "--pidfile", pidfile)
    assert r.returncode == 1, r
    assert f"pid {ctl_bystander.pid} is not an Emperor" in ctl_one_line(r)
    assert ctl_bystander.poll() is None, "the bystander was signalled"


@ctl_needs_perl
def test_ctl_reload_base_signals_the_running_emperor(ctl_emperor):
    port = free_port()
    e = ctl_emperor({"app": app_ini("app", port, processes=1)}, wait=[port])
    r = ctl_run("reload-base", "--pidfile", e.pidfile)
    assert r.returncode == 0, r
    wait_for(lambda: e.lines("code deploy: base generation 2"), 30, "the code deploy")


# -- paths of `emperor run` ------------------------------------------------------------


def test_ctl_every_bad_path_of_run_is_one_line_naming_it(tmp_path):
    vdir = tmp_path / "v"
    vdir.mkdir()
    long_sock = tmp_path / ("s" * 120)
    cases = [
        (["run", tmp_path / "nonexistent"], str(tmp_path / "nonexistent")),
        (["run", vdir, "--pidfile", "/nonexistent/x.pid"], "/nonexistent/x.pid"),
        (["run", vdir, "--pidfile", tmp_path], str(tmp_path)),
        (["run", vdir, "--stats", "/nonexistent/s.sock"], "/nonexistent/s.sock"),
        (["run", vdir, "--stats", long_sock], str(long_sock)),
        (["run", vdir, "--use-fork-server", "/nonexistent/fs.sock"], "/nonexistent/fs.sock"),
        (["run", vdir, "--vassal-binary", "/nonexistent/prog"], "/nonexistent/prog"),
        (["run", vdir, "--vassal-binary", "no-such-program-here"], "no-such-program-here"),
    ]
    for args, path in cases:
        r = ctl_run(*args)
        assert r.returncode == 2, (args, r)
        line = ctl_one_line(r)
        assert line.startswith("emperor: ") and path in line, (args, line)
    assert sorted(p.name for p in vdir.iterdir()) == [], "a refused start left files behind"


# -- vassal files the Emperor judges -------------------------------------------------


@ctl_needs_perl
def test_ctl_files_the_emperor_can_judge_are_config_errors_not_crash_loops(ctl_emperor):
    okport = free_port()
    p = free_port

    files = {
        "ok": app_ini("ok", okport, processes=1),
        "unknown": f"[uwsgi]\nhttp-socket = 127.0.0.1:{p()}\npsgi = {APP}\nfrobnicate = 1\n",
        "badbool": f"[uwsgi]\nhttp-socket = 127.0.0.1:{p()}\npsgi = {APP}\ndisable-logging = maybe\n",
        "idle": f"[uwsgi]\nhttp-socket = 127.0.0.1:{p()}\npsgi = {APP}\nidle = 5\n",
        "twice": f"[uwsgi]\nhttp-socket = 127.0.0.1:{p()}\npsgi = {APP}\nhttp-socket = 127.0.0.1:{p()}\n",
        "nosection": f"http-socket = 127.0.0.1:{p()}\npsgi = {APP}\n",
        "runbad": base_ini(APP, "/nonexistent/run/fs.sock"),
        "tmpl.ini.j2": "[uwsgi]\npsgi = " + str(APP) + "\n{% for k in ['a', 'b'] %}x-{{ k }} = 1\n{% endfor %}",
    }
    causes = {
        "unknown": "unknown.ini:4: unknown option 'frobnicate'",
        "badbool": "badbool.ini:4: bad value 'maybe' for option 'disable-logging': expected a boolean",
        "idle": "idle.ini:4: idle without on-demand",
        "twice": "twice.ini:4: 'http-socket' given again (first on line 2)",
        "nosection": "nosection.ini: no [uwsgi] section",
        "tmpl": "tmpl.ini.j2 (rendered):3: unknown option 'x-a'",
        "runbad": "runbad.ini:3: fork-server /nonexistent/run/fs.sock: directory /nonexistent/run "
                  "does not exist",
    }
    e = ctl_emperor(files, wait=[okport])
    for name, cause in causes.items():
        wait_for(lambda n=name: e.lines(f"emperor: [{n}] bad config"), 20, f"{name}'s error line")
        assert cause in e.lines(f"emperor: [{name}] bad config")[0]
    st = e.status()
    for name, cause in causes.items():
        assert st[name]["state"] == "config-error", st[name]
        assert cause in st[name]["error"], st[name]
        assert e.vpids(name) == [], f"{name} was started despite its error"
    # `emperor status` shows the reasons too
    r = ctl_run("status", "--stats", e.stats)
    assert r.returncode == 0, r
    for name, cause in causes.items():
        assert f"{name}: " in r.stdout and cause in r.stdout, r.stdout
    # logged once: a rescan (2 s) reads the files again but says nothing new
    before = e.text().count("bad config")
    wait_for(lambda: fetch(e.stats)["emperor"]["uptime"] > 5, 20, "a few rescans")
    assert e.text().count("bad config") == before, e.text()
    for name in causes:
        assert f"psgi-vassal {name}" not in e.text(), f"{name} was started to complain itself"
    # a fixed file brings its vassal up
    port = free_port()
    (e.dir / ".idle.tmp").write_text(app_ini("idle", port, processes=1) + "on-demand = true\nidle = 5\n")
    os.rename(e.dir / ".idle.tmp", e.dir / "idle.ini")
    wait_for(lambda: get(port)["name"] == "idle", 20, "the fixed vassal to answer")
    assert get(okport)["name"] == "ok"


@ctl_needs_perl
def test_ctl_uwsgi_vassals_are_not_judged_by_our_table(tmp_path):
    """--vassal-binary uwsgi: uWSGI's keys (module, threads...) are not ours to judge."""
    from psgi_forkserver import config as cfgmod
    from psgi_forkserver.emperor import Emperor
    from psgi_forkserver.options import Options

    f = tmp_path / "u.ini"
    # plugin and master are accepted (and ignored) by ours too; module and threads are not
    f.write_text("[uwsgi]\nplugin = psgi\nmaster = true\nmodule = app\nthreads = 4\n"
                 "http-socket = 127.0.0.1:1\n")
    assert cfgmod.load(f, judge=True).error  # ours would refuse it
    assert not Emperor(Options(tmp_path, "uwsgi")).files.judge
    assert Emperor(Options(tmp_path, str(PROGRAM))).files.judge


# -- the stats socket under many clients -------------------------------------------------


@ctl_needs_perl
def test_ctl_stats_socket_answers_50_concurrent_clients_despite_one_that_never_reads(ctl_emperor):
    port = free_port()
    e = ctl_emperor({"app": app_ini("app", port, processes=1)}, wait=[port])
    stuck = socket.socket(socket.AF_UNIX)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.connect(str(e.stats))  # connects and never reads
    clients = []
    try:
        for _ in range(50):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(e.stats))  # all connected before any is read
            clients.append(c)
        answered = 0
        for c in clients:
            c.settimeout(30)
            data = b""
            while chunk := c.recv(65536):
                data += chunk
            doc = json.loads(data)  # not an empty or cut document
            assert "app" in doc["vassals"], doc
            answered += 1
        assert answered == 50
        assert "Traceback" not in e.text()
    finally:
        stuck.close()
        for c in clients:
            c.close()


# -- a throttled vassal says why -----------------------------------------------------------


@ctl_needs_perl
def test_ctl_throttled_vassal_shows_its_last_error(ctl_emperor):
    okport = free_port()
    dies = Path(__file__).resolve().parent / "apps" / "dies.psgi"
    hport = free_port()
    e = ctl_emperor({
        "ok": app_ini("ok", okport, processes=1),
        "dies": f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {dies}\n",
    }, "--status-http", f"127.0.0.1:{hport}", wait=[okport])
    wait_for(lambda: e.status()["dies"]["failures"] >= 2, 30, "dies to fail twice")
    st = wait_for(lambda: (s := e.status()["dies"])["state"] == "throttled" and s, 30,
                  "dies to be throttled")
    assert st["error"] and "died (exit status 1)" in st["error"], st
    r = ctl_run("status", "--stats", e.stats)
    assert "dies: pid" in r.stdout and "died (exit status 1)" in r.stdout, r.stdout
    r = ctl_run("status", "--stats", e.stats, "--json")
    assert "died (exit status 1)" in json.loads(r.stdout)["vassals"]["dies"]["error"]
    with urllib.request.urlopen(f"http://127.0.0.1:{hport}/", timeout=10) as page:
        html = page.read().decode()
    assert "died (exit status 1)" in html, html
