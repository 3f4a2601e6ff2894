"""Hostile scenarios of code deploys: every adoption goes to its
generation's socket, moved vassals run the new code, prompt moves,
`reload-base --wait`, a base that cannot load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support import EMPEROR, Load, PROGRAM, app_ini, base_ini, free_port, get, wait_for
from support.deploys import VERSIONED_APP, deploy_fleet, read_now, reload_base, serve

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")


# -- code deploys ------------------------------------------------------------


def test_deploy_with_use_fork_server_forks_from_the_new_generation(emperor, deploy_tmp):
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
    # a moved vassal may serve before the fork server's reply is read and logged
    for n in ports:
        line = wait_for(lambda n=n: e.lines(f"[{n}] adopted successor pid"), 30,
                        f"{n}'s move logged")[-1]
        assert "base generation 2" in line
    wait_for(lambda: not sock.exists(), 30, "the old base to drain and remove its socket")
    assert (deploy_tmp / "fs.sock.gen2").exists()
    # the operator's next step: a new vassal file comes up on the new generation
    port = free_port()
    e.write("late", app_ini("late", port, processes=1))
    wait_for(lambda: get(port)["name"] == "late", 30, "the vassal added after the deploy")
    assert get(port)["value"] == "v2"
    assert "base generation 2" in wait_for(lambda: e.lines("[late] adopted pid"), 30,
                                           "late's adoption logged")[-1]
    assert not [line for line in e.lines("[late]") if "adoption failed" in line]


def test_deploy_moves_vassals_as_soon_as_the_new_base_is_ready(emperor):
    # no rescan for an hour, no heartbeat: once the new base is ready,
    # nothing but the Emperor's own decision can start the moves
    e, ports = deploy_fleet(emperor, ["app1", "app2", "app3"], "--rescan-interval", "3600",
                            "--deploy-parallel", "1")
    (e.dir / "version.txt").write_text("v2\n")
    assert reload_base(e).returncode == 0
    wait_for(lambda: "[base] successor ready" in e.text(), 30, "the new base to be ready")
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal to move (no rescan comes)")
    wait_for(lambda: e.lines("code deploy to generation 2 done"), 30, "the summary line")


def test_a_new_base_seen_accepting_before_its_ready_byte_is_said_ready(emperor):
    # its socket listens a second before its byte 1: the Emperor's probe
    # finds it first, and the log says the same as when the byte comes first
    lib = Path(__file__).resolve().parent / "apps" / "lib"
    e, ports = deploy_fleet(emperor, ["app1"], env={
        "PERL5LIB": f"{lib}:{PROGRAM.parent}", "PERL5OPT": "-MLateBaseReadyByte"})
    (e.dir / "version.txt").write_text("v2\n")
    assert reload_base(e).returncode == 0
    ready = wait_for(lambda: e.lines("[base] successor ready (pid "), 30, "the new base to be said ready")
    assert len(ready) == 1, ready  # once, whichever way it was seen
    wait_for(lambda: serve(ports, "v2"), 60, "the vassal to move")


def test_vassal_waiting_for_a_removed_base_is_adopted_when_a_base_is_back(emperor):
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
    adoptions = len(e.lines("[app1] adopted pid"))
    e.write("base", base_text)
    wait_for(lambda: get(ports["app1"])["value"] == "v1", 60, "app1 adopted once the base is back")
    line = wait_for(lambda: e.lines("[app1] adopted pid")[adoptions:], 30, "the adoption logged")[-1]
    assert "base generation 1" in line


def test_reload_base_wait_exits_0_once_every_vassal_moved(emperor, deploy_tmp):
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
        emperor, deploy_tmp):
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
    # without --stats, --wait finds the Emperor's --stats socket where the
    # run directory records it: the same outcome, with its reason
    again = reload_base(e, "--wait")
    assert again.returncode == 1 and "failed" in again.stderr, (again.stdout, again.stderr)


def test_changed_base_file_that_cannot_load_fails_the_deploy_until_fixed(emperor):
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


def test_a_failed_deploy_retried_before_its_fix_is_read_stays_that_deploy(ctl_emperor, deploy_tmp):
    # The base file is a symlink out of the vassals directory: its fix
    # reaches the Emperor only when the test says so (read_now), after the
    # base's back-off retry has started a new base. Whatever that retry
    # ran, the fix is still deploy generation 2: one summary, no second
    # generation for the same file.
    target = deploy_tmp / "base-target.ini"
    e, ports = deploy_fleet(ctl_emperor, ["app1", "app2"], "--rescan-interval", "3600",
                            base_at=target)
    good = target.read_text()
    # the new code first: a write in the vassals directory makes the
    # Emperor read every file, and the fix must come after that
    (e.dir / "version.txt").write_text("v2\n")
    target.write_text(good.replace(str(VERSIONED_APP), str(VERSIONED_APP) + ".missing"))
    read_now(e)
    wait_for(lambda: e.lines("code deploy to generation 2 failed"), 30, "the failed deploy's summary")
    # fixed on disk; the Emperor does not know yet
    started = len(e.lines("[base] started base vassal"))
    target.write_text(good + "; fixed\n")
    # a back-off retry starts after the fix, and ends one way or the other
    pid = wait_for(lambda: e.lines("[base] started base vassal")[started:], 30,
                   "a retry of the new base")[0].split("pid ")[1].split(",")[0]
    wait_for(lambda: e.lines(f"new pid {pid} died") or e.lines(f"successor ready (pid {pid}"), 30,
             "the retry's outcome")
    read_now(e)
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal on the fixed base")
    done = wait_for(lambda: e.lines("code deploy to generation 2 done"), 30, "the deploy's summary")
    assert len(done) == 1 and "2 moved, 0 failed" in done[0], done
    assert not e.lines("generation 3"), e.lines("generation 3")
    deploy = e.doc()["emperor"]["deploy"]
    assert (deploy["serving_generation"], deploy["requested_generation"]) == (2, 2), deploy
    assert deploy["last"]["state"] == "done", deploy


def held_fleet(ctl_emperor, deploy_tmp):
    """deploy_fleet whose new bases keep loading while `hold` exists."""
    hold = deploy_tmp / "hold"
    e, ports = deploy_fleet(ctl_emperor, ["app1", "app2"], env={"VERSIONED_HOLD": str(hold)})
    hold.touch()
    return e, ports, hold


def moved_once(e, ports):
    """Each vassal was moved by exactly one adoption from a new base."""
    return {n: len(e.lines(f"[{n}] adopted successor pid")) for n in ports} == {n: 1 for n in ports}


def test_a_base_file_changed_while_its_new_base_loads_starts_that_generation_again(
        ctl_emperor, deploy_tmp):
    # the loading base read the older file: it is superseded, never
    # served, and the same deploy goes on with the newer file; vassals
    # move once, onto what the last change asked for
    e, ports, hold = held_fleet(ctl_emperor, deploy_tmp)
    (e.dir / "version.txt").write_text("v2\n")
    text = (e.dir / "base.ini").read_text()
    e.write("base", text + "; first change\n")
    wait_for(lambda: e.lines("generation 2 (config changed)"), 30, "the new base loading")
    e.write("base", text + "; second change\n")
    wait_for(lambda: len(e.lines("[base] file changed")) == 2, 30, "the second change read")
    hold.unlink()
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal on the new base")
    done = wait_for(lambda: e.lines("code deploy to generation 2 done"), 30, "the deploy's summary")
    assert "2 moved, 0 failed" in done[0], done
    assert not e.lines("generation 3"), e.lines("generation 3")
    assert moved_once(e, ports)
    assert not e.lines("code deploy to generation 2 failed")


def test_reload_base_while_the_new_base_loads_is_one_deploy_and_every_wait_is_answered(
        ctl_emperor, deploy_tmp):
    e, ports, hold = held_fleet(ctl_emperor, deploy_tmp)
    (e.dir / "version.txt").write_text("v2\n")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(reload_base, e, "--wait", "--stats", e.stats)
        wait_for(lambda: e.lines("generation 2 (code deploy)"), 30, "the new base loading")
        # newer code while it loads: the second request must get it
        (e.dir / "version.txt").write_text("v3\n")
        second = pool.submit(reload_base, e, "--wait", "--stats", e.stats)
        wait_for(lambda: e.doc()["emperor"]["deploy"]["requests"] == 2, 30,
                 "the second request handled")
        hold.unlink()
        outs = [first.result(), second.result()]
    # every vassal moved once, by the one deploy both requests share
    assert moved_once(e, ports), [e.lines(f"[{n}] adopted successor pid") for n in ports]
    for out in outs:
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "generation 2: done, 2 moved, 0 failed" in out.stdout, out.stdout
    assert serve(ports, "v3")
    assert not e.lines("generation 3"), e.lines("generation 3")


def test_a_base_file_changed_five_times_at_once_is_one_deploy_of_the_last(ctl_emperor, deploy_tmp):
    e, ports = deploy_fleet(ctl_emperor, ["app1", "app2"])
    (e.dir / "version.txt").write_text("v2\n")
    text = (e.dir / "base.ini").read_text()
    for i in range(5):  # as fast as a script writes them
        e.write("base", text + f"; change {i}\n")
    wait_for(lambda: serve(ports, "v2"), 60, "every vassal on the new base")
    wait_for(lambda: e.doc()["emperor"]["deploy"]["last"]["state"] == "done", 30, "the deploy done")
    # every vassal moved once: never onto a base that read a replaced file
    assert moved_once(e, ports), [e.lines(f"[{n}] adopted successor pid") for n in ports]
    deploy = e.doc()["emperor"]["deploy"]
    # one deploy, of the last file
    assert deploy["serving_generation"] == deploy["requested_generation"] == 2, deploy
    assert e.lines("code deploy to generation 2 done"), e.lines("code deploy to generation")
    assert not e.lines("generation 2 failed") and not e.lines("generation 3")


def test_reload_base_wait_is_answered_when_the_emperor_stops_under_it(ctl_emperor, deploy_tmp):
    e, ports, hold = held_fleet(ctl_emperor, deploy_tmp)
    (e.dir / "version.txt").write_text("v2\n")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(reload_base, e, "--wait", "--stats", e.stats, "--timeout", "90")
        wait_for(lambda: e.lines("generation 2 (code deploy)"), 30, "the new base loading")
        os.kill(e.pid, signal.SIGTERM)
        out = waiting.result()
    e.popen.wait(30)
    # an answer that says the deploy did not happen, not the client's own time-out
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "no outcome within" not in out.stderr, out.stderr
    assert "interrupted" in out.stderr or "stopped" in out.stderr, out.stderr


def fleet_with_a_slow_mover(ctl_emperor, slow: Path):
    """app1, and aslow, whose own app loads (so its move lasts) while the
    file `slow` exists; moves one at a time (--deploy-parallel 1)."""
    e, ports = deploy_fleet(ctl_emperor, ["app1"], "--deploy-parallel", "1")
    ports["aslow"] = free_port()
    e.write("aslow", app_ini("aslow", ports["aslow"], processes=1)
            + f"psgi = {VERSIONED_APP}\nenv = VERSIONED_HOLD={slow}\n")
    wait_for(lambda: get(ports["aslow"])["name"] == "aslow", 40, "aslow to answer")
    return e, ports


def test_a_vassal_stopped_while_it_waits_for_its_move_does_not_keep_the_deploy_open(
        ctl_emperor, deploy_tmp):
    # one move at a time (in the order the files came), and aslow's (its
    # own app loads while `slow` exists) takes as long as the test says;
    # zlast, waiting for its turn, is stopped by the operator: it has
    # nothing left to move, and the deploy must end without it
    slow = deploy_tmp / "slow"
    e, ports = fleet_with_a_slow_mover(ctl_emperor, slow)
    ports["zlast"] = free_port()
    e.write("zlast", app_ini("zlast", ports["zlast"], processes=1))
    wait_for(lambda: get(ports["zlast"])["name"] == "zlast", 40, "zlast to answer")
    slow.touch()
    (e.dir / "version.txt").write_text("v2\n")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(reload_base, e, "--wait", "--stats", e.stats, "--timeout", "60")
        wait_for(lambda: e.lines("[aslow] starting a successor (code deploy)"), 30, "aslow's move")
        assert not e.lines("[zlast] starting a successor")
        stop = subprocess.run([EMPEROR, "stop", "zlast", "--stats", e.stats],
                              capture_output=True, text=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
        wait_for(lambda: e.doc()["vassals"]["zlast"]["state"] == "stopped", 30, "zlast stopped")
        slow.unlink()
        out = waiting.result()
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "generation 2: done, 2 moved, 0 failed" in out.stdout, out.stdout
    assert get(ports["app1"])["value"] == "v2" and get(ports["aslow"])["value"] == "v2"
    # started again, it comes from the new generation
    subprocess.run([EMPEROR, "start", "zlast", "--stats", e.stats], capture_output=True, timeout=30)
    wait_for(lambda: get(ports["zlast"])["value"] == "v2", 30, "zlast on the new generation")


def test_a_vassal_whose_file_turned_unusable_ends_the_deploy_as_its_failure(ctl_emperor):
    # its old process keeps serving (the file cannot say what to run
    # instead), on the old code: the deploy ends, and says so
    e, ports = deploy_fleet(ctl_emperor, ["app1", "app2"])
    e.write("app2", "[uwsgi]\nthis line is no option\n")
    wait_for(lambda: e.lines("[app2] bad config"), 30, "app2's file refused")
    (e.dir / "version.txt").write_text("v2\n")
    out = reload_base(e, "--wait", "--stats", e.stats, "--timeout", "60")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "generation 2: partial, 1 moved, 1 failed" in out.stderr, out.stderr
    assert "app2: its file is unusable" in out.stderr, out.stderr
    assert get(ports["app1"])["value"] == "v2" and get(ports["app2"])["value"] == "v1"
    # fixed, it moves onto the serving generation
    e.write("app2", app_ini("app2", ports["app2"], processes=1))
    wait_for(lambda: get(ports["app2"])["value"] == "v2", 30, "app2 on the new generation")


def test_reload_base_while_vassals_move_supersedes_the_deploy_and_answers_both(
        ctl_emperor, deploy_tmp):
    slow = deploy_tmp / "slow"
    e, ports = fleet_with_a_slow_mover(ctl_emperor, slow)
    slow.touch()
    (e.dir / "version.txt").write_text("v2\n")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(reload_base, e, "--wait", "--stats", e.stats, "--timeout", "90")
        wait_for(lambda: e.lines("[aslow] starting a successor (code deploy)"), 30, "aslow's move")
        (e.dir / "version.txt").write_text("v3\n")
        second = pool.submit(reload_base, e, "--wait", "--stats", e.stats, "--timeout", "90")
        wait_for(lambda: e.lines("code deploy to generation 2 superseded by generation 3"), 30,
                 "the first deploy superseded")
        slow.unlink()
        outs = [first.result(), second.result()]
    for out in outs:  # both asked for the newest code: both see the deploy that brought it
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "generation 3: done" in out.stdout, out.stdout
    assert serve(ports, "v3")


def test_a_second_base_file_deploying_stops_its_old_generation(ctl_emperor):
    # vassals are adopted from the first base by name; the second base's
    # old process has no vassal on it, whatever the first base's vassals'
    # generation number: it stops once replaced, it is not kept forever
    e, ports = deploy_fleet(ctl_emperor, ["app1"])
    e.write("base2", base_ini(VERSIONED_APP, "fs2.sock"))
    wait_for(lambda: e.lines("[base2] ready"), 30, "the second base")
    old = e.doc()["vassals"]["base2"]["pid"]
    e.write("base2", (e.dir / "base2.ini").read_text() + "; changed\n")
    wait_for(lambda: e.lines(f"[base2] old pid {old} stopped"), 30, "its old generation to stop")
    assert get(ports["app1"])["value"] == "v1"  # the first base's vassals untouched
    assert e.doc()["vassals"]["app1"]["base_generation"] == 1
