"""The stats socket, `emperor status`, the status page on a real Emperor;
and, on the same real Emperor, templates and the Kubernetes ConfigMap
symlink swap end to end."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import paths, status

from support import EMPEROR, Emperors, app_ini, base_ini, free_port, get, start_emperor, stop_emperor, wait_for

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "hello.psgi"
PROGRAM = paths.vassal_program()

needs_perl = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


# -- a real Emperor --------------------------------------------------------------------


@pytest.fixture
def fleet(xprocess):
    ports = {"app1": free_port(), "tpl": free_port(), "cm": free_port()}
    http_port = free_port()

    def configmap(vdir: Path) -> None:
        """A Kubernetes ConfigMap volume: cm.ini -> ..data/cm.ini, ..data -> ..TS1"""
        (vdir / "..2026_01_01").mkdir()
        (vdir / "..2026_01_01" / "cm.ini").write_text(app_ini("cm", ports["cm"], "cm1"))
        os.symlink("..2026_01_01", vdir / "..data")
        os.symlink("..data/cm.ini", vdir / "cm.ini")

    emperors = Emperors(xprocess, "pfs-status-", args=[
        "--mercy", "5", "--rescan-interval", "600", "--status-http", f"127.0.0.1:{http_port}"])
    try:
        f = emperors({
            "app1": app_ini("app1", ports["app1"], "v1"),
            # a template: its name and port come from the rendering
            "tpl.ini.j2": "[uwsgi]\nhttp-socket = 127.0.0.1:{{ env.PFS_TPL_PORT }}\n"
                          "env = APP_NAME={{ name }}\nenv = APP_VALUE={{ name | upper }}\nprocesses = 2\n"
                          "disable-logging = true\n",
        }, env={"PFS_TPL_PORT": str(ports["tpl"])}, prepare=configmap)
        f.ports, f.status_http_port = ports, http_port
        for name, port in ports.items():
            wait_for(lambda p=port, n=name: get(p)["name"] == n, 30, f"{name} to answer")
        yield f
    finally:
        emperors.stop()


def emperor_status(f, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([EMPEROR, "status", "--stats", f.stats, *extra],
                          capture_output=True, text=True, timeout=30, check=True)


@needs_perl
def test_status_json_table_and_page(fleet):
    assert stat.S_IMODE(os.stat(fleet.stats).st_mode) == 0o600
    doc = json.loads(emperor_status(fleet, "--json").stdout)
    assert set(doc["vassals"]) == {"base", "app1", "tpl", "cm"}
    kids = {p.pid for p in psutil.Process(fleet.pid).children()}
    for name, v in doc["vassals"].items():
        assert v["pid"] in kids, (name, v)
        assert v["state"] in ("running", "loyal"), (name, v)
        assert v["pss"] > 0 and v["uss"] > 0 and v["processes"] >= 1, (name, v)
        assert v["uptime"] >= 0 and v["throttle"] == 0
    assert doc["vassals"]["base"]["kind"] == "base"
    assert doc["vassals"]["app1"]["kind"] == "adopted"
    assert doc["vassals"]["tpl"]["processes"] >= 3  # the vassal and its 2 workers
    assert doc["emperor"]["pid"] == fleet.pid and doc["emperor"]["rss"] > 0
    assert doc["collect_ms"] >= 0

    table = emperor_status(fleet).stdout
    for name in ("base", "app1", "tpl", "cm"):
        assert f"\n{name} " in table
    assert "PSS" in table and "collected in" in table

    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.status_http_port}/", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        html = r.read().decode()
    for name in ("base", "app1", "tpl", "cm"):
        assert f"<td data-k=\"name\">{name}</td>" in html
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.status_http_port}/json", timeout=10) as r:
        assert set(json.loads(r.read())["vassals"]) == {"base", "app1", "tpl", "cm"}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{fleet.status_http_port}/nope", timeout=10)
    assert e.value.code == 404


@needs_perl
def test_template_and_configmap_swap_end_to_end(fleet):
    # the template was rendered: name and value from Jinja2, port from env
    assert get(fleet.ports["tpl"]) | {"pid": ""} == {"name": "tpl", "value": "TPL", "pid": ""}
    assert get(fleet.ports["cm"])["value"] == "cm1"

    # the ConfigMap update: new timestamped dir, ..data swapped by rename;
    # the kernel reports nothing about cm.ini itself (rescan interval: 600 s)
    d = fleet.dir
    (d / "..2026_01_02").mkdir()
    (d / "..2026_01_02" / "cm.ini").write_text(app_ini("cm", fleet.ports["cm"], "cm2"))
    os.symlink("..2026_01_02", d / "..data_tmp")
    os.rename(d / "..data_tmp", d / "..data")
    shutil.rmtree(d / "..2026_01_01")
    wait_for(lambda: get(fleet.ports["cm"])["value"] == "cm2", 15, "cm to serve cm2")

    # a broken template: one line naming file and line, the others unharmed
    (d / "bad.ini.j2").write_text("[uwsgi]\nhttp-socket = {{ nope }}\n")
    wait_for(lambda: "bad.ini.j2:2: 'nope' is undefined" in fleet.log.read_text(), 15,
             "the template error in the log")
    doc = json.loads(emperor_status(fleet, "--json").stdout)
    assert "'nope' is undefined" in (doc["vassals"]["bad"]["error"] or "")
    assert doc["vassals"]["bad"]["pid"] is None
    assert get(fleet.ports["app1"])["name"] == "app1"


def test_out_of_range_status_port_is_refused_before_anything_starts(tmp_path: Path):
    for port in ("99999", "65536", "0"):
        r = subprocess.run([EMPEROR, "run", tmp_path, "--status-http", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (port, r)
        assert f"port {int(port)} out of range" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_configmap_swap_reloads_only_what_changed_and_touch_still_reloads(xprocess, tmp_path):
    """kubelet's layout: a.ini -> ..data/a.ini, ..data -> ..TIMESTAMP/. An
    update writes every key anew in a new directory and swaps ..data by a
    rename: only the vassal whose content changed reloads (the others'
    files have a new mtime, but they are other files, not touched ones);
    `touch` of a plain file still reloads its vassal."""
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini(APP))
    ports = {"a": free_port(), "b": free_port(), "c": free_port()}
    old = vdir / "..2026_01_01_00_00_00.1"
    old.mkdir()
    for n in ("a", "b"):
        (old / f"{n}.ini").write_text(app_ini(n, ports[n], "v1", processes=1))
        os.symlink(f"..data/{n}.ini", vdir / f"{n}.ini")
    os.symlink(old.name, vdir / "..data")
    (vdir / "c.ini").write_text(app_ini("c", ports["c"], "v1", processes=1))
    stats = tmp_path / "s.sock"
    em = start_emperor(xprocess, "emperor-configmap", [vdir, "--mercy", "5",
                                                        "--rescan-interval", "600", "--stats", stats])
    try:
        for n, port in ports.items():
            wait_for(lambda p=port, n=n: get(p)["name"] == n, 30, f"{n} to answer")
        pids = {n: status.fetch(stats)["vassals"][n]["pid"] for n in ports}
        new = vdir / "..2026_01_02_00_00_00.2"
        new.mkdir()
        (new / "a.ini").write_text(app_ini("a", ports["a"], "v1", processes=1))
        (new / "b.ini").write_text(app_ini("b", ports["b"], "v2", processes=1))
        os.symlink(new.name, vdir / "..data_tmp")
        os.rename(vdir / "..data_tmp", vdir / "..data")
        shutil.rmtree(old)
        wait_for(lambda: get(ports["b"])["value"] == "v2", 30, "b to serve its new content")
        wait_for(lambda: status.fetch(stats)["vassals"]["b"]["state"] == "loyal", 30, "b loyal")
        assert status.fetch(stats)["vassals"]["a"]["pid"] == pids["a"]
        assert not em.lines("[a] file touched") and not em.lines("[a] file changed"), em.text()
        os.utime(vdir / "c.ini")  # touch
        wait_for(lambda: status.fetch(stats)["vassals"]["c"]["pid"] not in (None, pids["c"]), 30,
                 "c to be reloaded by the touch")
        assert status.fetch(stats)["vassals"]["a"]["pid"] == pids["a"]
    finally:
        stop_emperor(em)


@pytest.mark.parametrize("adopted", [True, False], ids=["adopted", "spawned"])
def test_magic_variables_reach_the_vassal(xprocess, tmp_path, adopted):
    """`env = APP_NAME=%n` and `$(ENV)` as uWSGI expands them, in the vassal's
    environment; a refused one is that vassal's config-error with its line."""
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    if adopted:
        (vdir / "base.ini").write_text(base_ini(APP))
    port = free_port()
    (vdir / "magic.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\n" + ("" if adopted else f"psgi = {APP}\n")
        + "env = APP_NAME=%n\nenv = APP_VALUE=$(PFS_MAGIC)-%%\n")
    (vdir / "bad.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\n"
                                  "procname = %h\n")
    stats = tmp_path / "s.sock"
    em = start_emperor(xprocess, "emperor-magic", [vdir, "--mercy", "5", "--stats", stats],
                       {"PFS_MAGIC": "from-env"})
    try:
        got = wait_for(lambda: get(port), 30, "magic to answer")
        assert (got["name"], got["value"]) == ("magic", "from-env-%")
        bad = wait_for(lambda: status.fetch(stats)["vassals"]["bad"]["error"], 30, "bad's error")
        assert bad.startswith("bad.ini:3: uWSGI's magic variable %h (the hostname)"), bad
    finally:
        stop_emperor(em)


def test_requests_files_of_processes_gone_are_swept_at_start(xprocess, tmp_path: Path):
    """A vassal's requests file goes when the Emperor reaps it; an Emperor
    killed with -9 reaps nothing (and a cgroup kill leaves the vassals no
    time): the next start removes the files of processes that are gone,
    and keeps a live one's."""
    from psgi_forkserver.rundir import run_dir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir().mkdir(parents=True, exist_ok=True)
    stale, live = run_dir() / f"requests-{gone.pid}", run_dir() / f"requests-{os.getpid()}"
    stale.write_bytes(b"\0" * 16)
    live.write_bytes(b"\0" * 16)
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    e = start_emperor(xprocess, "emperor-requests-sweep", [vdir, "--mercy", "5"])
    try:
        assert not stale.exists()
        assert live.exists()
    finally:
        stop_emperor(e)
        live.unlink()
