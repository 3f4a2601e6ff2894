"""Hostile scenarios end to end: a real Emperor, the real Perl base, real HTTP.

Code deploys (issue 9): every adoption goes to the socket of the base
generation it names, moved vassals run the new code, a deploy moves vassals
as soon as the new base is ready, a vassal that waited for a removed base
is adopted once a base is back, `reload-base --wait` reports the outcome.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support import EMPEROR, free_port, wait_for
from test_emperor import PROGRAM, app_ini, get
from test_fleet_lifecycle import Load, emperor  # noqa: F401 - the fixture

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
