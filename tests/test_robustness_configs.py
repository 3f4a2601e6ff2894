"""Trying to break the Emperor with what it reads and writes: bad vassal
files, its stats socket and pidfile against planted symlinks.

Every scenario runs a real Emperor (pytest-xprocess), the real Perl base and
real HTTP. The tests run as root, so "unreadable" files are made with a
directory named x.ini and a dangling symlink, not with chmod 000."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from psgi_forkserver.emperor.locks import write_pidfile

from support import EMPEROR, PROGRAM, app_ini, assert_no_zombies, free_port, get, wait_for

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

HERE = Path(__file__).resolve().parent
DIES = HERE / "apps" / "dies.psgi"


# -- 1. bad configs ---------------------------------------------------------------


def test_bad_configs_fail_alone_with_one_clear_line(emp):
    okport, busyport = free_port(), free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", busyport))
    busy.listen(1)

    def vassal(port, **kv):
        return "[uwsgi]\n" + f"http-socket = 127.0.0.1:{port}\n" + "".join(
            f"{k.replace('_', '-')} = {v}\n" for k, v in kv.items())

    files = {
        "ok": app_ini("ok", okport, processes=1),
        "invalid": "[uwsgi\nhttp-socket = 127.0.0.1:1\n",
        "unknown": vassal(free_port(), no_such_option=1),
        "badport": vassal(99999),
        "inuse": vassal(busyport),
        "missing": vassal(free_port(), psgi="/nonexistent/app.psgi"),
        "dies": vassal(free_port(), psgi=DIES),
        "tmpl.ini.j2": "[uwsgi]\nhttp-socket = 127.0.0.1:{{ port }}\n",
    }

    def prepare(vdir):
        (vdir / "dir.ini").mkdir()  # root reads anything: a directory is unreadable as a file
        (vdir / "dangling.ini").symlink_to(vdir / "no-such-target")

    try:
        e = emp(files, wait=[okport], prepare=prepare)
        # created while it runs: a FIFO must not block the Emperor's read
        os.mkfifo(e.dir / "fifo.ini")
        # (vassal, a piece of the line that names the cause)
        expect = {
            "invalid": "emperor: [invalid] bad config",
            "dir": "emperor: [dir] bad config",
            "dangling": "emperor: [dangling] bad config",
            "tmpl": "emperor: [tmpl] bad config",
            "fifo": "emperor: [fifo] bad config",
            "badport": "emperor: [badport] bad config",
            "inuse": "emperor: [inuse] cannot bind http-socket",
            "unknown": "emperor: [unknown] bad config",
            "missing": "psgi-vassal missing: error: app file '/nonexistent/app.psgi' not found",
            "dies": "psgi-vassal dies: error: cannot load app",
        }
        causes = {
            "invalid": "invalid.ini:1: unterminated section header",
            "dir": "dir.ini: unreadable: a directory",
            "dangling": "dangling.ini: unreadable: dangling symlink",
            "tmpl": "tmpl.ini.j2:2: 'port' is undefined",
            "fifo": "fifo.ini: unreadable: not a regular file",
            "badport": "badport.ini:2: bad value '127.0.0.1:99999' for option 'http-socket': port out of range",
            "inuse": "Address already in use",
            "unknown": "unknown.ini:3: unknown option 'no-such-option'",
            "missing": "not found",
            "dies": "boom: this app refuses to load",
        }
        for name, needle in expect.items():
            wait_for(lambda n=needle: e.lines(n), 20, f"the error line of {name}")
            line = e.lines(needle)[0]
            assert causes[name] in line, line
        # the vassal fails alone, several times: throttled with failures counted
        crashing = ["missing", "dies", "inuse"]
        wait_for(lambda: all(e.status()[n]["failures"] >= 2 for n in crashing), 20,
                 "each crashing vassal to fail twice")
        st = e.status()
        for n in crashing:
            assert st[n]["failures"] >= 2, st[n]
            assert st[n]["state"] in ("throttled", "adopting", "starting"), st[n]
            # the last failure, with its exit status or reason, is in the status
            assert st[n]["error"] and ("died (exit status 1)" in st[n]["error"]
                                       or "cannot bind" in st[n]["error"]), st[n]
        for n in ("invalid", "dir", "dangling", "tmpl", "fifo", "unknown", "badport"):
            assert st[n]["error"] and causes[n] in st[n]["error"], st[n]
            assert st[n]["state"] == "config-error", st[n]
            assert e.vpids(n) == [], f"{n} was started despite its error"
        # a config error is logged once, not at every rescan (2 s)
        e.after_a_rescan()
        for n in ("invalid", "dir", "dangling", "tmpl", "fifo", "unknown", "badport"):
            assert len(e.lines(expect[n])) == 1, e.lines(expect[n])
        assert len(e.lines("emperor: [inuse] cannot bind")) == 1
        # everything else is fine
        assert get(okport)["name"] == "ok"
        assert e.running() and psutil.Process(e.pid).status() != psutil.STATUS_ZOMBIE
        assert st["base"]["state"] in ("running", "loyal"), st["base"]
        assert "Traceback" not in e.text()
        assert_no_zombies(e)
        # fixing a file brings its vassal up
        port = free_port()
        tmp = e.dir / ".dir.tmp"
        tmp.write_text(app_ini("dir", port, processes=1))
        (e.dir / "dir.ini").rmdir()
        os.rename(tmp, e.dir / "dir.ini")
        wait_for(lambda: get(port)["name"] == "dir", 20, "the fixed vassal to answer")
    finally:
        busy.close()


# -- 5. files and sockets of the Emperor -----------------------------------------------


def test_stats_socket_is_0600(emp):
    e = emp({}, base=True)
    st = os.lstat(e.stats)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def test_stats_path_refuses_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    link = tmp_path / "stats.sock"
    link.symlink_to(victim)
    out = subprocess.run([EMPEROR, "run", tmp_path, "--stats", link],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert "not a socket" in out.stderr
    assert victim.read_text() == "keep me\n" and link.is_symlink()


def test_pidfile_refuses_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    pidfile = tmp_path / "emperor.pid"
    (tmp_path / ".emperor.pid.4242").symlink_to(victim)  # the temporary file's name
    with pytest.raises(FileExistsError):
        write_pidfile(pidfile, 4242)
    assert victim.read_text() == "keep me\n"
    assert not pidfile.exists()
    # a symlink at the pidfile itself is replaced, not followed
    pidfile.symlink_to(victim)
    write_pidfile(pidfile, 4243)
    assert victim.read_text() == "keep me\n"
    assert not pidfile.is_symlink() and pidfile.read_text() == "4243\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".emperor.pid.4242", "emperor.pid", "victim"]
