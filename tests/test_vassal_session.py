"""A vassal's session goes with it even when the Emperor is
kill -9'd (the vassal master, seeing its Emperor pipe's end of file,
stops what the app left in its session)."""

from __future__ import annotations

import os
import signal

import psutil

from support import free_port, kill_all, wait_for
from test_robustness import _reap_reparented, _set_subreaper, daemon_ini, emp, spawn_left_behind  # noqa: F401 (fixture)


def test_a_helper_in_the_vassal_session_dies_with_a_kill_9_of_the_emperor(emp):  # noqa: F811
    port = free_port()
    e = emp({"d": daemon_ini("d", port)}, wait=[port])
    helper = psutil.Process(spawn_left_behind(port, "300"))  # double-forked, no setsid
    vassal = psutil.Process(e.vpid("d"))
    assert os.getsid(helper.pid) == vassal.pid
    # orphans come to us, so that "gone" means exited and reaped
    _set_subreaper(True)
    try:
        os.kill(e.pid, signal.SIGKILL)
        e.popen.wait(5)

        def helper_gone() -> bool:
            for p in (helper, vassal):
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            # the base and its spares came to us too: gone and reaped
            return _reap_reparented() and not psutil.pid_exists(helper.pid)

        assert wait_for(helper_gone, 15, "the helper to go with its vassal", interval=0.05)
    finally:
        _set_subreaper(False)
        kill_all([p for p in (helper, vassal) if psutil.pid_exists(p.pid)])
