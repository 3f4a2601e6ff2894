"""The fleet's lifecycle with a real Emperor (pytest-xprocess), the real Perl
base and real HTTP: Emperor-owned sockets, gap-free reloads and code deploys
under load, crash-loop throttling, heartbeats, on-demand vassals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import psutil
import pytest

from support import APP, EMPEROR, Load, PROGRAM, alive, app_ini, base_ini, free_port, get, wait_for

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


def test_gap_free_reload_under_load(emperor):
    port = free_port()
    e = emperor({"app1": app_ini("app1", port)}, wait=[port])
    old = e.vpid("app1")  # waits: the app may answer before its adoption is logged
    load = Load([port])
    load.start()
    wait_for(lambda: load.ok > 50, 10, "load to run")
    for value in ("v2", "v3"):
        e.write("app1", app_ini("app1", port, value=value))
        wait_for(lambda v=value: v in load.seen[port], 20, f"{value} to be served")
    wait_for(lambda: not psutil.pid_exists(old) or not alive(psutil.Process(old)), 15, "old pid gone")
    load.finish()
    print(f"gap-free reload: {load.ok} requests, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    # the same client stream was answered by all three configs in turn (a
    # count of requests would measure the machine's speed, not the reload)
    assert {"v1", "v2", "v3"} <= load.seen[port], load.seen[port]
    assert "starting a successor (config changed)" in e.text()


def test_code_deploy_moves_every_vassal_without_a_failed_request(emperor):
    ports = {f"app{i}": free_port() for i in range(1, 7)}
    e = emperor({n: app_ini(n, p, processes=1) for n, p in ports.items()},
                "--deploy-parallel", "2", wait=ports.values())
    base_old = e.vpid("base")
    before = {n: e.vpid(n) for n in ports}
    load = Load(ports.values())
    load.start()
    wait_for(lambda: load.ok > 50, 10, "load to run")
    out = subprocess.run([EMPEROR, "reload-base", "--pidfile", e.pidfile],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: all(e.vpids(n)[-1] != before[n] for n in ports), 40, "every vassal to move")
    wait_for(lambda: not alive(psutil.Process(base_old)) if psutil.pid_exists(base_old) else True,
             20, "old base to stop")
    wait_for(lambda: all(not psutil.pid_exists(p) for p in before.values()), 20, "old vassals gone")
    load.finish()
    print(f"code deploy: {load.ok} requests, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    text = e.text()
    assert "generation 2" in text and "adoption failed" not in text
    new_base = e.vpids("base")[-1]
    assert new_base != base_old
    for n in ports:
        vp = e.vpids(n)[-1]
        assert psutil.Process(vp).ppid() == e.pid
        assert get(ports[n])["name"] == n
    # the new base serves on fs.sock.gen2, the old one removed its own socket
    assert (e.dir / "fs.sock.gen2").exists() and not (e.dir / "fs.sock").exists()
    # a changed base file is a deploy too
    (e.dir / "base.ini").write_text(base_ini(APP, "fs.sock", "; v3"))
    wait_for(lambda: "generation 3" in e.text(), 20, "generation 3")
    wait_for(lambda: all(get(p)["name"] == n for n, p in ports.items()), 20, "all answer")


def test_port_in_use_throttles_only_that_vassal(emp):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    bport = busy.getsockname()[1]
    port = free_port()
    try:
        e = emp({"busy": app_ini("busy", bport), "ok": app_ini("ok", port)}, wait=[port])
        wait_for(lambda: "[busy] cannot bind http-socket" in e.text(), 15, "the bind error")
        # several retries (backoff 0.2 .. 1 s): still one line
        wait_for(lambda: e.status()["busy"]["failures"] >= 3, 15, "several retries of busy")
        lines = [l for l in e.text().splitlines() if "[busy] cannot bind" in l]
        assert len(lines) == 1, lines
        assert "Address already in use" in lines[0]
        assert get(port)["name"] == "ok"
    finally:
        busy.close()
    wait_for(lambda: get(bport)["name"] == "busy", 15, "busy to start once the port is free")


def test_crash_loop_is_throttled_and_others_unaffected(emperor):
    port, okport = free_port(), free_port()
    bad = "[uwsgi]\nhttp-socket = 127.0.0.1:%d\npsgi = /nonexistent/app.psgi\n" % port
    e = emperor({"bad": bad, "ok": app_ini("ok", okport)}, wait=[okport])
    wait_for(lambda: e.text().count("[bad] pid") >= 4, 20, "several deaths of bad")
    delays = [float(m) for m in re.findall(r"\[bad\] pid \d+ died .*?respawn in ([\d.]+) s", e.text())]
    assert delays[:3] == [0.2, 0.4, 0.8] and max(delays) <= 1.0, delays
    assert "(throttled)" in e.text()
    assert get(okport)["name"] == "ok"
    # a fixed file cuts the back-off
    e.write("bad", app_ini("bad", port))
    wait_for(lambda: get(port)["name"] == "bad", 15, "bad fixed")


def test_heartbeat_silence_kills_and_restarts(emp):
    port = free_port()
    e = emp({"hb": app_ini("hb", port, processes=1) + "heartbeat = 1\n"}, wait=[port])
    pid = e.vpid("hb")
    e.heartbeats_seen(["hb"])  # judged from the first heartbeat on
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "[hb] SIGKILL pid %d: no heartbeat" % pid in e.text(), 15, "heartbeat kill")
        wait_for(lambda: e.vpids("hb")[-1] != pid, 15, "a new hb pid")
        new = e.vpids("hb")[-1]
        wait_for(lambda: get(port)["pid"] and new in
                 [int(get(port)["pid"])] + [p.pid for p in psutil.Process(int(get(port)["pid"])).parents()],
                 15, "the new hb to answer")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_on_demand_starts_on_first_connection_and_stops_when_idle(emperor):
    port = free_port()
    e = emperor({"od": app_ini("od", port, processes=1) + "on-demand = true\nidle = 1\n"})
    wait_for(lambda: "[od] on demand: waiting" in e.text(), 20, "od waiting")
    assert e.vpids("od") == []
    assert get(port, timeout=15)["name"] == "od"  # the first connection starts it
    # it may answer before the Emperor has read its adoption reply (Emp.vpid)
    first = wait_for(lambda: e.vpids("od"), 15, "the first od pid logged")
    assert len(first) == 1
    wait_for(lambda: "[od] idle" in e.text(), 15, "idle byte")
    wait_for(lambda: not psutil.pid_exists(first[0]), 15, "od to stop")
    wait_for(lambda: e.text().count("[od] on demand: waiting") >= 2, 10, "waiting again")
    assert get(port, timeout=15)["name"] == "od"
    # an adopted vassal may answer before the Emperor has read its adoption
    # reply and logged its pid (see Emp.vpid)
    wait_for(lambda: len(e.vpids("od")) == 2, 15, "the second od pid logged")
