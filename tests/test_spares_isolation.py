"""What a spare keeps apart once adopted: no descriptor of its rehearsals,
no socket shared with its master but the listener, its request counts
under another uid and through recycled workers; the base sleeping while a
refill warms up."""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

import psutil
import pytest

from support import PROGRAM, base_ini, free_port, get, unix_peers, wait_for
from support.spares import spare_masters, spares, warm_base

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

NOBODY = pwd.getpwnam("nobody")


def _fds_of_vassal(pid: int) -> tuple[int, list[int]]:
    """Descriptors above 2 of a vassal's master and of each of its workers,
    less the client connections a worker may still hold."""
    def count(p: int) -> int:
        conns = [c for c in psutil.Process(p).net_connections("inet") if c.status != psutil.CONN_LISTEN]
        return len([fd for fd in os.listdir(f"/proc/{p}/fd") if int(fd) > 2]) - len(conns)
    return count(pid), sorted(count(c.pid) for c in psutil.Process(pid).children())


def test_the_rehearsals_leave_no_descriptor_in_an_adopted_spare(emp):
    """What a vassal taken from a spare holds, master and workers, is no more
    than what a forked one holds (the rehearsals' socket pairs, bound socket
    and /dev/null are all closed)."""
    ini = "[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\nenv = APP_NAME=fd\n"
    counts = {}
    for k in (1, 0):
        e = emp({"base": warm_base(k)}, base=False)
        if k:
            spares(e, 1)
            waiting = spare_masters(e)
        port = free_port()
        (e.dir / "fd.ini").write_text(ini.format(port=port))
        wait_for(lambda: get(port), 30, "the vassal")
        pid = e.vpid("fd")
        assert (pid in waiting) if k else True
        seen: set[str] = set()
        # a worker that answered is past its set-up (a worker just forked
        # still holds what it then closes)
        wait_for(lambda: seen.add(get(port)["pid"]) or len(seen) == 2, 30, "both workers to answer")
        counts[k] = _fds_of_vassal(pid)
    (spare_master, spare_workers), (fork_master, fork_workers) = counts[1], counts[0]
    assert spare_master <= fork_master, counts
    assert max(spare_workers) <= max(fork_workers), counts


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_worker_shares_no_socket_with_its_master_but_the_listener(emp, k):
    """The Emperor pipe and the config pipe are the master's alone: a worker
    holding them would hide the master's death from the Emperor, or read
    the config packets meant for the master. Besides the listener they share
    only the workers' queue of connections (both ends of its socket pair:
    the master keeps it for the workers it forks later)."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "sk.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n")
    seen: set[str] = set()
    wait_for(lambda: seen.add(get(port)["pid"]) or len(seen) == 2, 30, "both workers to answer")
    master = e.vpid("sk")
    workers = [c.pid for c in psutil.Process(master).children()]
    assert len(workers) == 2, workers
    for w in workers:
        shared = _socket_inodes(w) & _socket_inodes(master)
        peers = {f"socket:[{a}]": f"socket:[{b}]" for a, b in unix_peers().items()}
        queue = {i for i in shared if peers.get(i) in shared}
        assert len(queue) == 2, f"worker {w}: the queue's socket pair in {shared}"
        assert len(shared - queue) == 1, f"worker {w} shares {shared} with its master {master}"


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_vassal_that_drops_to_another_uid_still_counts_its_requests(emp, tmp_path, k):
    """The requests file (the status's REQS) is made before the vassal
    drops root, and made its uid's: as `nobody` it could create nothing in
    the run directory, and the status showed `-` for such a vassal."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "low.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n"
                                   f"uid = nobody\ngid = {NOBODY.pw_gid}\ndisable-logging = true\n")
    wait_for(lambda: get(port), 30, "the vassal")
    for _ in range(20):
        assert int(get(port)["uid"]) == NOBODY.pw_uid
    wait_for(lambda: (e.status()["low"].get("requests") or 0) >= 21, 20, "the requests in the status")


@pytest.mark.parametrize("k", [1, 0], ids=["from a spare", "forked"])
def test_a_uid_vassal_counts_through_recycled_workers_and_a_reload(emp, k):
    """Its workers reopen the requests file by descriptor: the ones a
    max-requests recycle or a SIGHUP to the master forks count too, and its
    file is gone once it stops (nobody cannot unlink in the run directory)."""
    e = emp({"base": warm_base(k)}, base=False)
    if k:
        spares(e, 1)
    port = free_port()
    (e.dir / "rq.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 2\n"
                                  f"max-requests = 3\nuid = nobody\ngid = {NOBODY.pw_gid}\n"
                                  "disable-logging = true\n")
    wait_for(lambda: get(port), 30, "the vassal")
    master = e.vpid("rq")
    pids = set()
    for _ in range(20):
        pids.add(get(port)["pid"])
    assert len(pids) >= 4, pids
    wait_for(lambda: (e.status()["rq"].get("requests") or 0) >= 21, 20, "21 requests counted")
    before = set(c.pid for c in psutil.Process(master).children())
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: not (set(c.pid for c in psutil.Process(master).children()) & before)
             and len(psutil.Process(master).children()) == 2, 30, "a new generation of workers")
    for _ in range(10):
        get(port)
    wait_for(lambda: (e.status()["rq"].get("requests") or 0) >= 31, 20, "31 requests counted")
    path = Path(os.environ["PSGI_FORKSERVER_RUN_DIR"]) / f"requests-{master}"
    assert path.exists()
    (e.dir / "rq.ini").unlink()
    wait_for(lambda: not psutil.pid_exists(master), 30, "the vassal to stop")
    wait_for(lambda: not path.exists(), 20, "its requests file to go")


def test_the_base_sleeps_while_a_refill_warms_up(emp, tmp_path):
    """After an adoption the pool refills once none came for a pause; while
    the spare it then makes warms up (slowly here: 3 x 0.4 s), the base
    waits in select() rather than spinning with a deadline already past (a
    CPU taken from the warm-up and the vassals just adopted)."""
    app = tmp_path / "slow.psgi"
    app.write_text("my $app = sub { select undef, undef, undef, 0.4 if $_[0]{PATH_INFO} eq '/slow';\n"
                   "  [200, ['Content-Type' => 'text/plain'], [\"pid=$$ uid=$<\\n\"]] };\n$app;\n")
    e = emp({"base": base_ini(app, "fs.sock", "early-warmup = /slow", "fork-server-spares = 2")}, base=False)
    spares(e, 2)
    base = psutil.Process(e.vpid("base"))
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        (e.dir / f"a{i}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n")
    for port in ports:
        wait_for(lambda p=port: get(p), 30, f"port {port}")
    # both spares were taken: the first of the two refills warms up now
    wait_for(lambda: (sp := e.status()["base"].get("spares")) and sp["count"] >= 1, 30,
             "a refill")
    cpu = base.cpu_times()
    spares(e, 2)
    used = sum(base.cpu_times()[:2]) - sum(cpu[:2])
    # a spin through the 1.2 s of a warm-up costs about that in CPU, even on a
    # loaded machine; a base waiting in select() costs almost nothing
    assert used < 0.4, f"the base used {used:.2f} s of CPU while a spare warmed up"
