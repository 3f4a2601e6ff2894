"""Logs an operator can read: every line timestamped and named,
everything a vassal's processes write relayed whole, `--log-format json`,
`logto` files and `emperor reopen-logs`, progress lines of long operations.

Real Emperors, the real Perl base and vassals, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

from psgi_forkserver import logs, paths
from psgi_forkserver.emperor.progress import StartProgress

from support import (
    EMPEROR, alive, base_ini, descendants, free_port, kill_all, start_emperor, stop_emperor, wait_for,
)

HERE = Path(__file__).resolve().parent
NOISY = HERE / "apps" / "noisy.psgi"
PROGRAM = paths.vassal_program()
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="no Perl vassal program")


def outputs(tag: str) -> list[str]:
    """What noisy.psgi writes for one request, one entry per output it has."""
    return [f"warn-{tag}", f"stderr-{tag}", f"errors-{tag}", f"stdout-{tag}",
            f"child-{tag}", "Use of uninitialized value $undef in concatenation"]


def get(port: int, query: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/?{query}", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


@pytest.fixture
def vdir():
    d = Path(tempfile.mkdtemp(prefix="pfs-logs-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def noisy_fleet(vdir: Path, adopted: bool, extra: str = "") -> int:
    port = free_port()
    if adopted:
        (vdir / "base.ini").write_text(base_ini(NOISY))
        app = ""
    else:
        app = f"psgi = {NOISY}\n"
    (vdir / "noisy.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n{app}{extra}")
    return port


@pytest.mark.parametrize("adopted", [True, False], ids=["adopted", "spawned"])
def test_every_output_of_a_vassal_reaches_the_log_whole_timestamped_and_named(
        xprocess, vdir, adopted):
    port = noisy_fleet(vdir, adopted)
    em = start_emperor(xprocess, "emperor-logs", [vdir, "--mercy", "5"])
    try:
        wait_for(lambda: get(port, "first"), 30, "noisy to answer")
        # concurrent requests on 2 workers sharing one pipe: lines must not
        # interleave (print STDERR "stderr", "-", TAG is three pieces)
        tags = [f"t{i}" for i in range(24)]
        errors: list[BaseException] = []

        def hit(chunk: list[str]) -> None:
            try:
                for t in chunk:
                    get(port, t)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=hit, args=(tags[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        want = {w for t in tags for w in outputs(t) if "Use of" not in w}

        def relayed() -> set[str]:
            got = set()
            for line in em.text().splitlines():
                m = re.match(rf"{TS} \[noisy\] (.*)$", line)
                if m:
                    got.add(m.group(1))
            return got

        wait_for(lambda: want <= relayed(), 30, "every output line of every request")
        got = relayed()
        # Perl's own warning, attributed too
        assert any(g.startswith("Use of uninitialized value $undef in concatenation") for g in got)
        # whole lines only: every relayed line of the app is one of its lines
        app_lines = {g for g in got if re.search(r"-(t\d+|first)$", g)}
        assert app_lines <= {w for t in tags + ["first"] for w in outputs(t)}, \
            sorted(app_lines - {w for t in tags + ["first"] for w in outputs(t)})
        # every line of the log starts with the timestamp; the Emperor's
        # lines about the vassal name it
        text = em.text()
        for line in text.splitlines():
            if line.strip():
                assert re.match(rf"{TS} ", line), line
        assert re.search(rf"^{TS} emperor: \[noisy\] ", text, re.M)
    finally:
        stop_emperor(em)


def test_log_format_json_is_one_object_a_line(xprocess, vdir):
    port, hport = noisy_fleet(vdir, adopted=True), free_port()
    em = start_emperor(xprocess, "emperor-logs-json", [vdir, "--mercy", "5", "--log-format", "json",
                                                       "--status-http", f"127.0.0.1:{hport}"])
    try:
        wait_for(lambda: get(port, "json1"), 30, "noisy to answer")

        def records() -> list[dict]:
            return [json.loads(line) for line in em.text().splitlines() if line.strip()]

        wait_for(lambda: any(r["message"] == "child-json1" for r in records()), 30,
                 "the child's line")
        recs = records()  # every line parses
        for r in recs:
            assert set(r) == {"time", "level", "vassal", "pid", "event", "message"}, r
            assert re.fullmatch(TS, r["time"]), r
        out = next(r for r in recs if r["message"] == "stderr-json1")
        assert out["vassal"] == "noisy" and out["event"] == "output"
        assert isinstance(out["pid"], int) and out["pid"] > 0
        mine = [r for r in recs if r["event"] == "emperor" and r["vassal"] == "noisy"]
        assert any(r["message"].startswith("adopted pid") for r in mine)
        assert all(r["pid"] == em.pid for r in mine)
        assert any(r["event"] == "emperor" and r["vassal"] is None
                   and r["message"].startswith("watching") for r in recs)
        # the status page's recent lines of the vassal have its own lines too
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}/log/noisy", timeout=10) as r:
            recent = r.read().decode()
        assert "stderr-json1" in recent and "adopted pid" in recent, recent
    finally:
        stop_emperor(em)


def test_logto_file_and_reopen_logs_after_a_rename(xprocess, vdir, tmp_path):
    port = noisy_fleet(vdir, adopted=True, extra="logto = noisy.log\n")
    pidfile = tmp_path / "emperor.pid"
    em = start_emperor(xprocess, "emperor-logs-logto",
                       [vdir, "--mercy", "5", "--pidfile", pidfile])
    own = vdir / "noisy.log"
    try:
        wait_for(lambda: get(port, "before"), 30, "noisy to answer")
        wait_for(lambda: own.exists() and "child-before" in own.read_text(), 30,
                 "the vassal's lines in its logto file")
        assert re.search(rf"^{TS} \[noisy\] stderr-before$", own.read_text(), re.M)
        assert "stderr-before" not in em.text()  # not in the Emperor's log
        # as logrotate does: rename, then ask for a reopen (on the stats
        # socket, then by signal with the pidfile)
        for i, how in enumerate([["--dir", vdir], ["--pidfile", pidfile]], 1):
            rotated = vdir / f"noisy.log.{i}"
            own.rename(rotated)
            out = subprocess.run([EMPEROR, "reopen-logs", *how],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            wait_for(lambda: len(em.lines("reopen-logs: log files reopened")) == i, 15,
                     "the reopen")
            get(port, f"after{i}")
            wait_for(lambda: own.exists() and f"child-after{i}" in own.read_text(), 30,
                     "new lines in a new file")
            assert "stderr-before" not in own.read_text()
            assert f"stderr-after{i}" not in rotated.read_text()
    finally:
        stop_emperor(em)
    # a pidfile no Emperor holds any more: nothing is signalled
    pidfile.write_text(str(os.getpid()))
    out = subprocess.run([EMPEROR, "reopen-logs", "--pidfile", pidfile],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "stale pidfile" in out.stderr


def test_a_logto_that_cannot_be_opened_is_one_line_and_the_vassal_serves(xprocess, vdir):
    port = noisy_fleet(vdir, adopted=True, extra="logto = no-such-dir/noisy.log\n")
    em = start_emperor(xprocess, "emperor-logs-badlogto", [vdir, "--mercy", "5"])
    try:
        wait_for(lambda: get(port, "bad"), 30, "noisy to answer")
        wait_for(lambda: em.lines("[noisy] child-bad"), 30, "its lines in the Emperor's log")
        bad = em.lines("logto: ")
        assert len(bad) == 1 and "no-such-dir/noisy.log: No such file or directory" in bad[0]
    finally:
        stop_emperor(em)


def test_the_emperors_own_logto_is_reopened_too(vdir, tmp_path):
    log = tmp_path / "emperor.log"
    pidfile = tmp_path / "emperor.pid"
    p = subprocess.Popen([EMPEROR, "run", vdir, "--logto", log, "--pidfile", pidfile],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: log.exists() and "emperor: watching" in log.read_text(), 20, "watching")
        log.rename(tmp_path / "emperor.log.1")
        subprocess.run([EMPEROR, "reopen-logs", "--pidfile", pidfile], check=True,
                       capture_output=True, timeout=30)
        wait_for(lambda: log.exists() and "reopen-logs: log files reopened" in log.read_text(),
                 20, "the reopened file")
    finally:
        p.terminate()
        p.wait(30)
        p.stderr.close()
    assert re.search(rf"^{TS} emperor: bye$", log.read_text(), re.M)


SLOW_BASE = """\
# a base whose codebase takes a while to load: its vassals all wait for it.
# Whole seconds would make it 1 to 2 s: a start as short as the first
# progress line's second.
use Time::HiRes ();
my $t = Time::HiRes::time() + 2; 1 while Time::HiRes::time() < $t;
my $app = sub { [200, ['Content-Type' => 'text/plain'], ["ok\\n"]] };
$app;
"""


def test_a_mass_start_logs_progress_lines_and_one_summary(xprocess, vdir):
    (vdir / "slow.psgi").write_text(SLOW_BASE)
    (vdir / "base.ini").write_text(base_ini("slow.psgi"))
    n = 12
    for i in range(n):
        (vdir / f"app{i:02d}.ini").write_text(
            f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\nprocesses = 1\n"
            "disable-logging = true\n")
    em = start_emperor(xprocess, "emperor-logs-mass", [vdir, "--mercy", "5"])
    try:
        summary = wait_for(lambda: em.lines(f"emperor: start: {n}/{n} running, 0 failed in "),
                           60, "the summary line")
        assert len(summary) == 1 and summary[0].endswith("(done)")
        text = em.text()
        progress = re.findall(rf"^{TS} emperor: start: (\d+)/{n} running, 0 failed$", text, re.M)
        # the base took 2 s to load: at least one line a second meanwhile
        assert progress, text
        assert text.index(f"start: {progress[0]}/{n}") < text.index(summary[0])
    finally:
        stop_emperor(em)


# -- the parts on their own ------------------------------------------------------


def test_a_line_is_timestamped_and_named_in_both_formats():
    t = 1795830000.5  # 2026-11-28T...
    text = logs.Log()
    assert text.format("adopted pid 3", "web", now=t).endswith(" emperor: [web] adopted pid 3\n")
    assert re.match(rf"{TS} \[web\] hello\n$", text.format("hello", "web", event="output", now=t))
    rec = json.loads(logs.Log(fmt="json").format("cannot start x", "web", now=t))
    assert rec["level"] == "error" and rec["vassal"] == "web" and rec["event"] == "emperor"
    assert rec["time"].endswith(".500Z") and rec["pid"] == os.getpid()


def test_output_pipe_cuts_lines_and_keeps_a_last_partial_line():
    out = logs.OutputPipe()
    try:
        os.write(out.wfd, b"one\ntwo\r\nthr")
        assert out.read() == (["one", "two"], False)
        os.write(out.wfd, b"ee" + b"x" * logs.MAX_LINE)
        lines, eof = out.read()
        assert lines == ["three" + "x" * (logs.MAX_LINE - 5)] and not eof
        out.passed()
        assert out.read() == (["xxxxx"], True)
    finally:
        out.close()


def test_start_progress_one_line_a_second_then_a_summary():
    lines: list[str] = []
    sp = StartProgress(lines.append)
    phases = {f"a{i}": "adopting" for i in range(10)}
    sp.observe(0.0, phases)
    sp.observe(0.5, phases)
    assert lines == []
    phases.update(a0="loyal", a1="throttled")
    sp.observe(1.0, phases)
    sp.observe(1.5, phases)
    assert lines == ["start: 1/10 running, 1 failed"]
    phases = {n: "loyal" for n in phases} | {"a1": "throttled"}
    sp.observe(2.25, phases)
    assert lines[-1] == "start: 9/10 running, 1 failed in 2.2 s (done)"
    sp.observe(3.5, phases)
    assert len(lines) == 2
    # a few vassals starting is not a mass start
    sp.observe(4.0, {"x": "new", "y": "new"})
    sp.observe(6.0, {"x": "loyal", "y": "loyal"})
    assert len(lines) == 2


def test_start_progress_looks_at_the_fleet_at_most_four_times_a_second():
    """A look is O(vassals), and a mass start of 1,000 turns the loop
    hundreds of times a second: the lines say a second at a time."""
    looks = []
    sp = StartProgress(lambda line: None)

    def phases():
        looks.append(1)
        return {f"a{i}": "adopting" for i in range(1000)}

    for i in range(21):  # 2 s of turns, every 0.1 s
        sp.observe(i / 10, phases)
    assert len(looks) <= 9


DIES = HERE / "apps" / "dies.psgi"


@pytest.mark.parametrize("mode", ["fork-server key", "--use-fork-server"])
def test_adopted_vassals_are_attributed_alike_in_both_fork_server_modes(xprocess, vdir, mode):
    """Our own base, named by its file's `fork-server` key or by
    `--use-fork-server SOCK --vassal-fork-base base.ini`: an adopted
    vassal's lines are its own, its `logto` is written and reopened, and
    its load error is its own, in the log and in the status."""
    sock = vdir / "fs.sock"
    (vdir / "base.ini").write_text(base_ini(NOISY, sock))
    port = free_port()
    (vdir / "noisy.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nlogto = noisy.log\n")
    (vdir / "dies.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {DIES}\n")
    args = [vdir, "--mercy", "5", "--backoff-max", "2"]
    if mode == "--use-fork-server":
        args += ["--use-fork-server", sock, "--vassal-fork-base", "base.ini"]
    em = start_emperor(xprocess, "emperor-logs-modes", args)
    own = vdir / "noisy.log"
    try:
        wait_for(lambda: get(port, "mode"), 30, "noisy to answer")
        wait_for(lambda: own.exists() and "child-mode" in own.read_text(), 30,
                 "the vassal's lines in its logto file")
        assert re.search(rf"^{TS} \[noisy\] warn-mode$", own.read_text(), re.M)
        wait_for(lambda: em.lines("[dies] psgi-vassal dies: error: cannot load app"), 30,
                 "the load error under the vassal's name")
        text = em.text()
        assert "warn-mode" not in text and "[base] psgi-vassal dies" not in text
        own.rename(vdir / "noisy.log.1")
        out = subprocess.run([EMPEROR, "reopen-logs", "--dir", vdir],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        get(port, "reopened")
        wait_for(lambda: own.exists() and "child-reopened" in own.read_text(), 30,
                 "new lines in a new file")
        out = subprocess.run([EMPEROR, "status", "--dir", vdir, "--json"],
                             capture_output=True, text=True, timeout=30)
        dies = json.loads(out.stdout)["vassals"]["dies"]
        assert "boom: this app refuses to load" in dies["last_error"], dies
        assert "a fork server this Emperor does not run" not in em.text()
    finally:
        stop_emperor(em)


def test_a_foreign_fork_server_is_said_once(xprocess, vdir, tmp_path):
    """Adopting through a fork server this Emperor does not run (here our
    vassal program started by hand): the vassals serve, and the Emperor
    says once that their output is not attributed to them."""
    sock = tmp_path / "fs.sock"
    base_file = tmp_path / "base.ini"
    base_file.write_text(base_ini(NOISY, sock))
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        (vdir / f"app{i}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\n")
    base = subprocess.Popen(["perl", str(PROGRAM), "--ini", str(base_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 30, "the hand-started fork server")
        em = start_emperor(xprocess, "emperor-logs-foreign", [vdir, "--mercy", "5",
                                                              "--use-fork-server", sock])
        try:
            for port in ports:
                wait_for(lambda p=port: get(p, "foreign"), 30, "the adopted vassals to answer")
            said = em.lines("a fork server this Emperor does not run")
            assert len(said) == 1, said
        finally:
            stop_emperor(em)
    finally:
        left = descendants(base.pid)
        base.terminate()
        base.wait(20)
        kill_all([p for p in left if alive(p)])
