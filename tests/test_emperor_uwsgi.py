"""Plain vassals (no base): the Emperor with Debian's uWSGI 2.0 as the vassal
program, a real peer that speaks the Emperor pipe protocol."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

from support import alive, descendants, free_port, kill_all, start_emperor, stop_emperor, wait_for

APP = Path(__file__).resolve().parent / "apps" / "hello.psgi"
UWSGI = shutil.which("uwsgi")


def has_psgi_plugin() -> bool:
    return UWSGI is not None and any(
        Path(d, "psgi_plugin.so").exists() for d in ("/usr/lib/uwsgi/plugins", "/usr/lib/uwsgi")
    )


pytestmark = pytest.mark.skipif(not has_psgi_plugin(), reason="uwsgi with the psgi plugin needed")


def get(port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
        return dict(kv.split("=", 1) for kv in r.read().decode().split())


def start_uwsgi_emperor(xprocess, vdir: Path):
    """An Emperor whose vassal program is uWSGI; `vdir` removed if it fails to start."""
    try:
        return start_emperor(xprocess, f"emperor-{vdir.name}", [vdir, "--vassal-binary", "uwsgi", "--mercy", "5"])
    except BaseException:
        shutil.rmtree(vdir, ignore_errors=True)
        raise


def test_plain_uwsgi_vassals(xprocess):
    vdir = Path(tempfile.mkdtemp(prefix="pfs-u-"))
    ports = {f"u{i}": free_port() for i in (1, 2)}
    for name, port in ports.items():
        (vdir / f"{name}.ini").write_text(
            f"[uwsgi]\nplugin = psgi\nhttp-socket = 127.0.0.1:{port}\npsgi = {APP}\n"
            f"env = APP_NAME={name}\ndisable-logging = true\n"
        )
    em = start_uwsgi_emperor(xprocess, vdir)
    emp, log = em.popen, em.log
    procs: list[psutil.Process] = []
    try:
        for name, port in ports.items():
            wait_for(lambda n=name, p=port: get(p)["name"] == n, 20, f"{name} to answer")
        procs = descendants(emp.pid)
        children = psutil.Process(emp.pid).children()
        assert len(children) == 2
        assert all("--ini" in c.cmdline() for c in children)
        # a uWSGI vassal that dies is respawned
        victim = children[0]
        victim.kill()
        wait_for(lambda: len([c for c in psutil.Process(emp.pid).children()
                              if c.pid != victim.pid]) == 2, 15, "a respawned vassal")
        for name, port in ports.items():
            wait_for(lambda n=name, p=port: get(p)["name"] == n, 20, f"{name} to answer again")
        procs += descendants(emp.pid)
        emp.send_signal(signal.SIGTERM)
        assert emp.wait(20) == 0
        assert not [p for p in procs if alive(p)]
    finally:
        stop_emperor(em)
        kill_all([p for p in procs if alive(p)])
        text = log.read_text(errors="replace")
        shutil.rmtree(vdir, ignore_errors=True)
    assert "started plain vassal" in text


def test_uwsgi_vassal_loyal_reloaded_and_stopped_through_the_pipe(xprocess):
    vdir = Path(tempfile.mkdtemp(prefix="pfs-u2-"))
    port = free_port()

    def ini(value):
        return (f"[uwsgi]\nplugin = psgi\nhttp-socket = 127.0.0.1:{port}\npsgi = {APP}\n"
                f"env = APP_NAME=u\nenv = APP_VALUE={value}\ndisable-logging = true\n")

    (vdir / "u.ini").write_text(ini("v1"))
    em = start_uwsgi_emperor(xprocess, vdir)
    emp, log = em.popen, em.log
    procs: list[psutil.Process] = []
    try:
        wait_for(lambda: get(port)["value"] == "v1", 20, "u to answer")
        wait_for(lambda: "[u] loyal" in log.read_text(errors="replace"), 20, "byte 17 from uWSGI")
        first = psutil.Process(emp.pid).children()[0]
        procs = descendants(emp.pid)
        tmp = vdir / ".u.tmp"
        tmp.write_text(ini("v2"))
        tmp.rename(vdir / "u.ini")
        wait_for(lambda: get(port)["value"] == "v2", 30, "the reloaded u to answer v2")
        wait_for(lambda: not alive(first), 10, "the first uWSGI to be gone")
        procs += descendants(emp.pid)
        (vdir / "u.ini").unlink()
        wait_for(lambda: not [p for p in procs if alive(p)], 20, "u stopped through byte 2")
        text = log.read_text(errors="replace")
        # stopped gracefully (byte 2), not killed after the mercy timeout
        assert re.search(r"\[u\] pid \d+ stopped \(exit status \d+\)", text), text
        assert "SIGKILL" not in text
        emp.send_signal(signal.SIGTERM)
        assert emp.wait(20) == 0
    finally:
        stop_emperor(em)
        kill_all([p for p in procs if alive(p)])
        shutil.rmtree(vdir, ignore_errors=True)
