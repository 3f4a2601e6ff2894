"""The fork server runs ahead of the vassals it forks (fork-server-priority):
its process and its session's scheduling group at a lower nice value, every
process it forks back at nice 0 in a group of its own. A warm spare is the
base's work until its vassal is set up: its session's group and its waiting
worker run at the base's level, and its adopted vassal at nice 0 again."""

from __future__ import annotations

import os
import re

import psutil
import pytest

from support import app_ini, free_port, get, wait_for
from support.spares import spare_masters, spares as warm_spares, warm_base

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (or CAP_SYS_NICE)")


def autogroup_nice(pid: int) -> int | None:
    """The nice value of a process's session scheduling group, None where
    the kernel has none."""
    try:
        text = open(f"/proc/{pid}/autogroup").read()
    except OSError:
        return None
    return int(re.search(r"nice (-?\d+)", text).group(1))


def groups_on() -> bool:
    try:
        return open("/proc/sys/kernel/sched_autogroup_enabled").read().strip() == "1"
    except OSError:
        return False


def test_the_base_runs_ahead_and_what_it_forks_does_not(emp):
    port = free_port()
    e = emp({"a": app_ini("a", port, processes=1)}, wait=[port])
    base = psutil.Process(e.vpid("base"))
    master = psutil.Process(e.vpid("a"))
    worker = psutil.Process(int(get(port)["pid"]))
    assert worker.ppid() == master.pid
    assert base.nice() == -10
    assert e.lines("priority: nice -10"), e.text()
    if groups_on():
        assert autogroup_nice(base.pid) == -10
    # the base's spares are forked by it too (fork-server-spares 2 by default)
    spares = wait_for(lambda: [p for p in psutil.Process(e.pid).children()
                               if "spare of" in " ".join(p.cmdline())], 20, "a spare")
    for p in (master, worker, *spares):
        assert p.nice() == 0, p.cmdline()
        # the reset flag is not inherited: a vassal forking its workers is plain
        assert os.sched_getscheduler(p.pid) == os.SCHED_OTHER
        if groups_on():
            assert autogroup_nice(p.pid) == 0 or "spare of" in " ".join(p.cmdline()), p.cmdline()


def test_a_warm_spare_runs_at_the_bases_priority_and_its_vassal_at_nice_0(emp):
    e = emp({"base": warm_base(2)}, base=False)
    warm_spares(e, 2)
    waiting = spare_masters(e)
    warm_workers = set()
    for pid in waiting:
        spare = psutil.Process(pid)
        (worker,) = spare.children()
        warm_workers.add(worker.pid)
        # the spare itself at nice 0: its warm worker runs ahead of it
        assert spare.nice() == 0 and worker.nice() == -10, (spare.nice(), worker.nice())
        if groups_on():
            assert autogroup_nice(pid) == -10
    port = free_port()
    # nothing in it the warm-up read differently: the warm worker serves it
    (e.dir / "one.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n")
    r = wait_for(lambda: get(port), 30, "the adopted vassal")
    master = psutil.Process(e.vpid("one"))
    assert master.pid in waiting, "adopted by a fork, not by a spare"
    wait_for(lambda: len(master.children()) == 2, 30, "both workers")
    assert warm_workers & {p.pid for p in master.children()}, "the warm worker does not serve"
    for p in (master, *master.children()):
        assert p.nice() == 0, (p.pid, p.cmdline(), p.nice(), r)
        # nor the reset flag the warm worker set on itself: a plain worker
        assert os.sched_getscheduler(p.pid) == os.SCHED_OTHER, p.cmdline()
        if groups_on():
            assert autogroup_nice(p.pid) == 0, p.cmdline()


def test_priority_zero_leaves_the_base_as_it_was(emp):
    port = free_port()
    e = emp({"a": app_ini("a", port, processes=1)}, wait=[port],
            prepare=lambda vdir: (vdir / "base.ini").write_text(
                (vdir / "base.ini").read_text() + "fork-server-priority = 0\n"))
    base = psutil.Process(e.vpid("base"))
    assert base.nice() == 0
    assert e.lines("priority: unchanged (fork-server-priority = 0)"), e.text()


# Read by the app as it loads (in the vassal's master) and again in each
# request (in a worker): the nice values of the process and of its session.
PRIORITY_APP = """use strict; use warnings;
sub nices { my ($g) = do { local @ARGV = ('/proc/self/autogroup'); <> } =~ /nice (-?\\d+)/;
            (getpriority(0, 0), $g // 'none') }
my @at_load = nices();
sub { my @now = nices();
      [200, ['Content-Type' => 'text/plain'], ["load_nice=$at_load[0] load_group=$at_load[1] nice=$now[0] group=$now[1]\\n"]] };
"""


def test_a_spares_vassal_that_loads_its_own_app_loads_it_at_nice_0(emp, tmp_path):
    """Its warm worker does not serve it (the app is its own): the master's
    start-up, loading the app, is no adoption's fast path."""
    app = tmp_path / "priority.psgi"
    app.write_text(PRIORITY_APP)
    os.chmod(tmp_path, 0o755)
    e = emp({"base": warm_base(1)}, base=False)
    warm_spares(e, 1)
    waiting = spare_masters(e)
    port = free_port()
    (e.dir / "own.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\npsgi = {app}\ndisable-logging = true\n")
    r = wait_for(lambda: get(port), 30, "the vassal with its own app")
    assert e.vpid("own") in waiting, "adopted by a fork, not by a spare"
    want = {"load_nice": "0", "nice": "0"}
    if groups_on():
        want |= {"load_group": "0", "group": "0"}
    assert {k: r[k] for k in want} == want, r

