"""A `master = false` vassal adopted from a warm spare: the spare's warm
worker, which ran the base's `early-warmup` paths, becomes the vassal's one
process, with a real Emperor, the real Perl base and real HTTP. Its warm
state serves only a vassal whose env its warm-up fits."""

from __future__ import annotations

import os

import psutil
import pytest

from support import PROGRAM, free_port, get, wait_for
from support.apps import APPS
from support.spares import spare_masters, spares, warm_base

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

LAZY = APPS / "lazy_state.psgi"


def solo_ini(port: int, *lines: str) -> str:
    return "".join(f"{line}\n" for line in (
        "[uwsgi]", f"http-socket = 127.0.0.1:{port}", "master = false", "disable-logging = true", *lines))


def fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def spare_workers(e) -> dict[int, int]:
    """Each waiting spare's warm worker -> the spare."""
    return {c.pid: m for m in spare_masters(e) for c in psutil.Process(m).children()}


@pytest.fixture(scope="module")
def warm(xprocess):
    """One Emperor for the module: a base with two warm spares whose
    warm-up ran GET / of the lazy app (it reads APP_MODE)."""
    from support.emperors import Emperors
    emperors = Emperors(xprocess, "pfs-spsolo-")
    e = emperors({"base": warm_base(2, app=LAZY)}, base=False)
    try:
        yield e
    finally:
        emperors.stop()


def test_the_warm_worker_is_the_vassal_and_its_warm_state_answers_the_first_request(warm):
    e = warm
    spares(e, 2)
    workers = spare_workers(e)
    port = free_port()
    (e.dir / "lazy.ini").write_text(solo_ini(port))
    r = wait_for(lambda: get(port, timeout=10), 30, "the master = false vassal to answer")
    pid = int(r["pid"])
    # the first answer comes from state the warm-up built in this very process
    assert int(r["built_in"]) == pid and int(r["built_at"]) < int(r["requests"]), r
    assert pid in workers, f"pid {pid} is not one of the spares' warm workers {workers}"
    assert e.vpid("lazy") == pid  # the pid the Emperor supervises is the one that serves
    spare = workers[pid]
    wait_for(lambda: not psutil.pid_exists(spare), 10, "its spare to leave")
    p = psutil.Process(pid)
    assert p.ppid() == e.pid and os.getsid(pid) == pid, (p.ppid(), os.getsid(pid))
    assert p.children() == []
    assert " ".join(p.cmdline()) == "psgi-vassal lazy"
    base = e.vpid("base")
    # nothing of the base's, of the spare's or of its siblings'; beside
    # stdio: its listener, the Emperor pipe and the config pipe
    others = set().union(*(set(fds(q).values()) for q in [base, *spare_masters(e)] if psutil.pid_exists(q)))
    # (numbers the app held in the base stay open on /dev/null, as in any adopted vassal)
    own = {fd: t for fd, t in fds(pid).items() if fd > 2 and t != "/dev/null"}
    assert not set(own.values()) & others, (own, others)
    sockets = [t for t in own.values() if t.startswith("socket:")]
    assert len(sockets) == 3 and len(own) <= 4, own  # (and the status's requests file)
    assert [c for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN][0].laddr.port == port
    # it goes on as any master = false vassal: stopped by the Emperor when its file goes
    (e.dir / "lazy.ini").unlink()
    wait_for(lambda: not psutil.pid_exists(pid) or p.status() == psutil.STATUS_ZOMBIE, 30, "the vassal to stop")


def test_a_vassal_whose_env_the_warm_up_read_differently_gets_no_warm_state(warm):
    e = warm
    wait_for(lambda: len(spare_masters(e)) == 2, 60, "the pool refilled")
    spares(e, 2)
    workers = spare_workers(e)
    port = free_port()
    (e.dir / "other.ini").write_text(solo_ini(port, "env = APP_MODE=other"))
    r = wait_for(lambda: get(port, timeout=10), 30, "the master = false vassal to answer")
    pid = int(r["pid"])
    # never state built with another environment: built here, by this request
    assert r["mode"] == "other" and int(r["built_in"]) == pid and r["built_at"] == r["requests"] == "1", r
    assert e.vpid("other") == pid and pid not in workers, (pid, workers)
    assert pid in set(workers.values()), f"pid {pid} was forked, not one of the spares {set(workers.values())}"
    wait_for(lambda: not any(psutil.pid_exists(w) for w, m in workers.items() if m == pid), 10,
             "the warm worker that does not fit to leave")
    (e.dir / "other.ini").unlink()


def test_an_on_demand_vassal_woken_by_a_connection_is_served_by_the_warm_worker(warm):
    """The Emperor holds the socket and adopts on the first connection: the
    warm worker takes the socket (descriptor 0 of a forked vassal) and
    serves that connection with its warm state; after `idle` it goes back
    to sleep as any master = false vassal."""
    e = warm
    wait_for(lambda: len(spare_masters(e)) == 2, 60, "the pool refilled")
    spares(e, 2)
    workers = spare_workers(e)
    port = free_port()
    (e.dir / "sleepy.ini").write_text(solo_ini(port, "on-demand = true", "idle = 1"))
    wait_for(lambda: e.vassal("sleepy")["state"] == "on-demand", 30, "the Emperor to hold the socket")
    r = get(port, timeout=30)  # this connection wakes it
    pid = int(r["pid"])
    assert pid in workers and int(r["built_in"]) == pid and int(r["built_at"]) < int(r["requests"]), (r, workers)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
             "the vassal to go back to sleep after idle")
    wait_for(lambda: e.vassal("sleepy")["state"] == "on-demand", 30, "the Emperor to hold the socket again")
    (e.dir / "sleepy.ini").unlink()
