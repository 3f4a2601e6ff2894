"""The fork server answers a clone's adoption itself: the Emperor's pid
reply does not wait for the new vassal's first turn on a core (in a mass
start, behind every other vassal starting)."""

from __future__ import annotations

from support import APP, app_ini, base_ini, free_port, get, wait_for


def writes(pid: int) -> int:
    """write(2)-family system calls the process made (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("syscw:")).split()[1])


def test_the_base_sends_the_pid_of_the_vassal_it_cloned(emp):
    # no spares: the adoption takes the clone path (a spare's pid is the base's to send anyway)
    e = emp({"base": base_ini(APP, "fs.sock", "fork-server-spares = 0")}, base=False)
    wait_for(lambda: e.lines("fork server listening"), 30, "the base to listen")
    assert e.lines("clone(CLONE_PARENT)"), e.text()
    base = e.vpid("base")
    before = writes(base)
    port = free_port()
    e.write("a", app_ini("a", port, processes=1))
    wait_for(lambda: get(port), 30, "the vassal to answer")
    vassal = e.vpid("a")
    assert get(port)["pid"] != str(base)
    # one write: the pid reply (the base logs nothing for an adoption)
    assert writes(base) - before == 1
    assert e.lines(f"[a] adopted pid {vassal} from base"), e.text()
