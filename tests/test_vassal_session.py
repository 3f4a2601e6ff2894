"""A vassal's session goes with it even when the Emperor is
kill -9'd (the vassal master, seeing its Emperor pipe's end of file,
stops what the app left in its session)."""

from __future__ import annotations

import os
import signal

import psutil

from support import daemon_ini, free_port, kill_all, reap_reparented, set_subreaper, spawn_left_behind, wait_for


def test_a_helper_in_the_vassal_session_dies_with_a_kill_9_of_the_emperor(emp):
    port = free_port()
    e = emp({"d": daemon_ini("d", port)}, wait=[port])
    helper = psutil.Process(spawn_left_behind(port, "300"))  # double-forked, no setsid
    vassal = psutil.Process(e.vpid("d"))
    assert os.getsid(helper.pid) == vassal.pid
    # orphans come to us, so that "gone" means exited and reaped
    set_subreaper(True)
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
            return reap_reparented() and not psutil.pid_exists(helper.pid)

        assert wait_for(helper_gone, 15, "the helper to go with its vassal", interval=0.05)
    finally:
        set_subreaper(False)
        kill_all([p for p in (helper, vassal) if psutil.pid_exists(p.pid)])
