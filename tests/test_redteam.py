"""Attacks on the Emperor, each with a real fleet.

Tests of defects fixed here pass; the ones whose fix belongs to a module
another helper is restructuring (emperor.py, config.py, ...) are
`xfail(strict=True)` with the reason, so they fail `make test` the day the
defect is fixed without removing the mark (strict), and never before.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from psgi_forkserver.status import fetch

from support import PROGRAM, app_ini, free_port, get, wait_for
from support.deploys import deploy_fleet, reload_base, serve

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")


def test_reload_base_wait_while_the_base_is_down_is_not_a_success(emperor, deploy_tmp):
    """A deploy asked while the base is down (crashed, waiting out its
    back-off) deploys nothing: `reload-base --wait` must say so. It used to
    report `generation 0: done, 0 moved` and exit 0, so a deploy pipeline
    went green while every vassal kept the old code."""
    stats = deploy_tmp / "stats.sock"
    # a back-off far longer than the test: once down, the base stays down
    e, ports = deploy_fleet(emperor, ["app1"], "--stats", stats,
                            "--backoff-first", "300", "--backoff-max", "300", "--stable-after", "3600")
    base_pid = e.vpid("base")
    # the new code cannot load, and the base crashes: it waits out its back-off
    (e.dir / "version.txt").unlink()
    os.kill(base_pid, signal.SIGKILL)
    wait_for(lambda: any("respawn in" in line for line in e.lines("[base] pid")), 30,
             "the base to wait out its back-off")
    out = reload_base(e, "--wait", "--stats", stats, "--timeout", "60")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "no running base vassal" in out.stderr, out.stderr
    assert "done" not in out.stdout, out.stdout
    # the fleet is unaffected: the adopted vassal keeps serving the old code
    assert serve(ports, "v1")


def test_a_template_that_loops_does_not_freeze_the_emperor(emperor, deploy_tmp):
    stats = deploy_tmp / "stats.sock"
    e, ports = deploy_fleet(emperor, ["app1"], "--stats", stats)
    port = free_port()
    try:
        # 4*10**8 turns of an empty loop: about 10 s of the Emperor's
        # only thread, far more than the probe's 1 s (bounded, so that the
        # Emperor can still be stopped)
        tmp = e.dir / ".slow.tmp"
        tmp.write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\n"
                       "{% for x in range(4 * 10**8) %}{% endfor %}\n")
        os.rename(tmp, e.dir / "slow.ini.j2")

        def probe():
            try:
                # a freeze lasts the loop's ~10 s; a loaded machine can
                # take more than 1 s to answer without any freeze
                doc = fetch(stats, timeout=3)
            except (OSError, ValueError):
                return "frozen"
            # a settled state: the render ended (or was cut off) meanwhile
            state = doc["vassals"].get("slow", {}).get("state")
            return "answered" if state in ("config-error", "loyal", "running") else None

        # fixed: the Emperor answers all along and shows the vassal; today
        # its status socket stops answering while the template renders
        assert wait_for(probe, 60, "the template's vassal in the status, or a freeze") == "answered"
    finally:
        (e.dir / "slow.ini.j2").unlink(missing_ok=True)
        # the render in progress ends; then the fixture can stop the Emperor
        wait_for(lambda: fetch(stats, timeout=5), 120, "the Emperor to answer again")


def test_a_wedged_base_does_not_stop_vassal_restarts(emperor, deploy_tmp):
    """Fixed: after repeated adoption timeouts (bases.WedgeWatch) the base
    is judged wedged: one log line, its last error in the status, SIGKILL,
    and its ordinary restart; the waiting vassal is adopted from the new one."""
    stats = deploy_tmp / "stats.sock"
    port = free_port()
    e = emperor({"app1": app_ini("app1", port, processes=1)}, "--adopt-timeout", "2",
                "--stats", stats, wait=[port])
    base = e.vpid("base")
    old = e.vpid("app1")
    os.kill(base, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: e.lines("[app1] adoption failed: no reply"), 30, "an adoption to time out")
        # the fleet heals: app1 serves again although the base never wakes up
        # by itself (a new base, or whatever the fix chooses)
        wait_for(lambda: get(port)["name"] == "app1", 60, "app1 to serve again")
    finally:
        with contextlib.suppress(ProcessLookupError):  # replaced: killed and reaped
            os.kill(base, signal.SIGCONT)
    assert len(e.lines("[base] base wedged: 3 adoptions in a row")) == 1, e.lines("[base]")
    assert e.vpid("base") != base
    err = fetch(stats, timeout=10)["vassals"]["base"]["last_error"]
    assert err.startswith(f"wedged: 3 adoptions in a row got no reply within 2 s (pid {base}"), err
