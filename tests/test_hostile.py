"""Hostile scenarios end to end, in one place: real Emperors, the real Perl
base, real sockets and real HTTP. What an operator or a hostile environment
does to a fleet, and what must hold afterwards.

Sections: control surfaces (second Emperor, stale pidfiles, bad paths, judged
vassal files, many stats clients, last errors; helpers prefixed ctl_), code
deploys (every adoption goes to its generation's socket, moved vassals run
the new code, prompt moves, `reload-base --wait`), and the Emperor's own
resilience (exception boundary per vassal, descriptor budget, directory swaps,
freezes, mass changes).
"""

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

from support import EMPEROR, EmperorLog, free_port, wait_for, start_emperor, stop_emperor
from test_emperor import APP, PROGRAM, app_ini, get
from test_fleet_lifecycle import Load, emperor  # noqa: F401 - the fixture

ctl_needs_perl = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


class CtlEmp(EmperorLog):
    def __init__(self, em, vdir: Path, stats: Path, pidfile: Path):
        self.pid, self.popen, self.log = em.pid, em.popen, Path(em.log)
        self.dir, self.stats, self.pidfile = vdir, stats, pidfile

    def status(self) -> dict[str, dict]:
        return fetch(self.stats, timeout=10)["vassals"]


@pytest.fixture
def ctl_emperor(xprocess):
    """start(files, *extra, base=..., fork_server=...) -> CtlEmp; all stopped after."""
    started: list[CtlEmp] = []
    tmps: list[Path] = []

    def start(files: dict[str, str], *extra, base: bool = True, fork_server: str = "fs.sock",
              wait=()):
        tmp = Path(tempfile.mkdtemp(prefix="pfs-ctl-"))
        tmps.append(tmp)
        vdir = tmp / "vassals"
        vdir.mkdir()
        if base:
            (vdir / "base.ini").write_text(
                f"[uwsgi]\nearly-psgi = {APP}\nfork-server = {fork_server}\n")
        for fname, text in files.items():
            (vdir / (fname if "." in fname else f"{fname}.ini")).write_text(text)
        stats, pidfile = tmp / "stats.sock", tmp / "emperor.pid"
        em = start_emperor(xprocess, f"emperor-{tmp.name}", [
            vdir, "--mercy", "5", "--rescan-interval", "2", "--stats", stats,
            "--pidfile", pidfile, "--backoff-first", "0.2", "--backoff-max", "1", *extra])
        e = CtlEmp(em, vdir, stats, pidfile)
        started.append(e)
        for port in wait:
            wait_for(lambda p=port: get(p), 30, f"port {port} to answer")
        return e

    start.tmps = tmps  # type: ignore[attr-defined]
    yield start
    for e in started:
        stop_emperor(e)
    for t in tmps:
        shutil.rmtree(t, ignore_errors=True)


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
        (third / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {APP}\nfork-server = {fs}\n")
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
        "runbad": f"[uwsgi]\nearly-psgi = {APP}\nfork-server = /nonexistent/run/fs.sock\n",
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
    from psgi_forkserver.emperor import Emperor, Options

    f = tmp_path / "u.ini"
    # plugin and master are accepted (and ignored) by ours too; module and threads are not
    f.write_text("[uwsgi]\nplugin = psgi\nmaster = true\nmodule = app\nthreads = 4\n"
                 "http-socket = 127.0.0.1:1\n")
    assert cfgmod.load(f, judge=True).error  # ours would refuse it
    assert not Emperor(Options(tmp_path, "uwsgi")).judge
    assert Emperor(Options(tmp_path, str(PROGRAM))).judge


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


# -- code deploys ------------------------------------------------------------

VERSIONED_APP = Path(__file__).resolve().parent / "apps" / "versioned.psgi"

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")


@pytest.fixture
def deploy_tmp():
    """A directory for sockets that live outside the vassals directory."""
    d = Path(tempfile.mkdtemp(prefix="pfs-hd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def deploy_fleet(emperor, names, *extra, fork_server="fs.sock", version="v1"):  # noqa: F811
    """An Emperor whose base preloads versioned.psgi (it reads version.txt
    once, at load time) and adopts `names`, each answering on its port."""
    e = emperor({}, *extra, base=False)
    (e.dir / "version.txt").write_text(version + "\n")
    e.write("base", f"[uwsgi]\nearly-psgi = {VERSIONED_APP}\nfork-server = {fork_server}\n")
    ports = {n: free_port() for n in names}
    for n, port in ports.items():
        e.write(n, app_ini(n, port, processes=1))
    for n, port in ports.items():
        wait_for(lambda p=port, n=n: get(p)["name"] == n, 40, f"{n} to answer")
    return e, ports


def reload_base(e, *args, timeout=120):
    return subprocess.run([EMPEROR, "reload-base", "--pidfile", e.pidfile, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def serve(ports, version):
    """Every port answers the given version."""
    return all(get(p)["value"] == version for p in ports.values())


def test_deploy_with_use_fork_server_forks_from_the_new_generation(emperor, deploy_tmp):  # noqa: F811
    sock = deploy_tmp / "fs.sock"
    e, ports = deploy_fleet(emperor, ["app1", "app2", "app3"], "--use-fork-server", sock,
                            fork_server=sock)
    assert serve(ports, "v1")
    (e.dir / "version.txt").write_text("v2\n")
    out = reload_base(e)
    assert out.returncode == 0, out.stderr
    # the moved vassals come from the new base: they run the code it loaded
    wait_for(lambda: serve(ports, "v2"), 60, "every moved vassal to serve v2")
    assert "No such file" not in e.text()
    for n in ports:
        assert "base generation 2" in e.lines(f"[{n}] adopted successor pid")[-1]
    wait_for(lambda: not sock.exists(), 30, "the old base to drain and remove its socket")
    assert (deploy_tmp / "fs.sock.gen2").exists()
    # the operator's next step: a new vassal file comes up on the new generation
    port = free_port()
    e.write("late", app_ini("late", port, processes=1))
    wait_for(lambda: get(port)["name"] == "late", 30, "the vassal added after the deploy")
    assert get(port)["value"] == "v2"
    assert "base generation 2" in e.lines("[late] adopted pid")[-1]
    assert not [line for line in e.lines("[late]") if "adoption failed" in line]


def test_deploy_moves_vassals_as_soon_as_the_new_base_is_ready(emperor):  # noqa: F811
    # no rescan for an hour, no heartbeat: once the new base is ready,
    # nothing but the Emperor's own decision can start the moves
    e, ports = deploy_fleet(emperor, ["app1", "app2", "app3"], "--rescan-interval", "3600",
                            "--deploy-parallel", "1")
    (e.dir / "version.txt").write_text("v2\n")
    assert reload_base(e).returncode == 0
    wait_for(lambda: "[base] successor ready" in e.text(), 30, "the new base to be ready")
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal to move (no rescan comes)")
    wait_for(lambda: e.lines("code deploy to generation 2 done"), 30, "the summary line")


def test_vassal_waiting_for_a_removed_base_is_adopted_when_a_base_is_back(emperor):  # noqa: F811
    # a back-off far longer than the test's deadlines: only the base's
    # return may start the vassal
    e, ports = deploy_fleet(emperor, ["app1"], "--backoff-first", "300", "--backoff-max", "300",
                            "--stable-after", "3600")
    base_text = (e.dir / "base.ini").read_text()
    old = e.vpid("app1")
    (e.dir / "base.ini").unlink()
    wait_for(lambda: e.lines("[base] pid") and "stopped" in e.lines("[base] pid")[-1], 30,
             "the base to stop")
    # the vassal ends while there is no base: it waits in a crash-loop back-off
    subprocess.run(["kill", str(old)], check=True)
    wait_for(lambda: any("respawn in 300.0 s" in line for line in e.lines("[app1] pid")), 30,
             "the long back-off")
    e.write("base", base_text)
    wait_for(lambda: get(ports["app1"])["value"] == "v1", 60, "app1 adopted once the base is back")
    assert "base generation 1" in e.lines("[app1] adopted pid")[-1]


def test_reload_base_wait_exits_0_once_every_vassal_moved(emperor, deploy_tmp):  # noqa: F811
    stats = deploy_tmp / "stats.sock"
    e, ports = deploy_fleet(emperor, ["app1", "app2", "app3", "app4"], "--stats", stats,
                            "--deploy-parallel", "2")
    load = Load(ports.values())
    load.start()
    try:
        wait_for(lambda: load.ok > 20, 20, "load to run")
        (e.dir / "version.txt").write_text("v2\n")
        out = reload_base(e, "--wait", "--stats", stats)
    finally:
        load.finish()
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "generation 2: done, 4 moved, 0 failed" in out.stdout
    # when it returns, every vassal already runs on the new generation
    assert serve(ports, "v2")
    doc = json.loads(subprocess.run([EMPEROR, "status", "--stats", stats, "--json"],
                                    capture_output=True, text=True, timeout=30).stdout)
    adopted = [v for v in doc["vassals"].values() if v["kind"] == "adopted"]
    assert len(adopted) == 4 and {v["base_generation"] for v in adopted} == {2}
    assert doc["emperor"]["deploy"]["last"]["state"] == "done"
    summary = e.lines("code deploy to generation 2")
    assert len(summary) == 1, summary
    assert "done: 4 moved, 0 failed" in summary[0]
    assert load.failed == [], load.failed[:5]


def test_reload_base_wait_fails_with_the_reason_when_the_new_base_cannot_start(
        emperor, deploy_tmp):  # noqa: F811
    stats = deploy_tmp / "stats.sock"
    e, ports = deploy_fleet(emperor, ["app1", "app2"], "--stats", stats)
    # the new code cannot load: the new base dies before it is ready
    (e.dir / "version.txt").unlink()
    out = reload_base(e, "--wait", "--stats", stats)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "generation 2: failed" in out.stderr and "died" in out.stderr, out.stderr
    summary = e.lines("code deploy to generation 2 failed")
    assert len(summary) == 1 and "generation 1 keeps serving" in summary[0], summary
    # the old generation keeps serving every vassal
    assert serve(ports, "v1")
    # without --stats, --wait cannot learn anything: a usage error, nothing signalled
    bad = reload_base(e, "--wait")
    assert bad.returncode == 2 and "--stats" in bad.stderr


def test_changed_base_file_that_cannot_load_fails_the_deploy_until_fixed(emperor):  # noqa: F811
    e, ports = deploy_fleet(emperor, ["app1", "app2"])
    good = (e.dir / "base.ini").read_text()
    e.write("base", good.replace(str(VERSIONED_APP), str(VERSIONED_APP) + ".missing"))
    wait_for(lambda: e.lines("code deploy to generation 2 failed"), 30, "the failed deploy's summary")
    assert "generation 1 keeps serving" in e.lines("code deploy to generation 2 failed")[0]
    assert serve(ports, "v1")
    # the file fixed (with new code): the same generation comes up, every vassal moves
    (e.dir / "version.txt").write_text("v2\n")
    e.write("base", good + "; fixed\n")
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal on the fixed base")
    wait_for(lambda: e.lines("code deploy to generation 2 done"), 30, "the deploy's summary")
    assert "2 moved, 0 failed" in e.lines("code deploy to generation 2 done")[0]
