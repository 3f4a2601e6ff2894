"""The workers' desk in vassals that drop root (docs/security.md, "The HTTP
workers' desk and vassals that drop root").

A free worker takes a busy sibling's waiting keep-alive connections with
pidfd_getfd(2). Real users made with useradd (names with the test's pid,
removed at the end), one Emperor run as root with a base (each vassal forked
from it), two vassals of two workers, each dropping to its own tenant's uid:

- a fast request on a kept connection of a worker that started a slow one
  while its sibling was busy is served by the sibling once it is free, not
  after the slow request;
- what a worker may take that way: its sibling's descriptors, and nothing of
  the other tenant's vassal, of its own master, of the base or of the
  Emperor."""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import socket
import subprocess

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from support import Emp, Emperors, free_port, wait_for
from support.tenants import NEEDS_TENANTS, ARGS, Tenant, add, ask, start_fleet, tenant_user, vassal_ini

pytestmark = NEEDS_TENANTS


@dataclass
class Vassal:
    name: str
    port: int
    tenant: Tenant
    gates: Path    # where its /block route says it started and waits for its go

    def workers(self, e: Emp) -> list[int]:
        master = e.vpid(self.name)
        return sorted(c.pid for c in psutil.Process(master).children())


def base_pid(e: Emp) -> int | None:
    return e.vpid("base") if (e.dir / "base.ini").exists() else None


@pytest.fixture(scope="module")
def tenants() -> Iterator[tuple[Tenant, Tenant]]:
    with tenant_user() as ta, tenant_user("b") as tb:
        yield ta, tb


@pytest.fixture(scope="module", params=[0, 2, None], ids=["forked", "spares", "plain"])
def fleet(xprocess, tenants, request) -> Iterator[tuple[Emp, Vassal, Vassal]]:
    """Vassals forked from a base, adopted from its spares, or spawned
    without a base."""
    k = request.param
    emperors = Emperors(xprocess, "pf-td-", args=ARGS)
    gates: list[Path] = []
    try:
        e = start_fleet(emperors, tenants[0], k)
        vassals = []
        for name, t in zip("ab", tenants):
            gate = Path(tempfile.mkdtemp(prefix="pf-td-gate-"))
            gates.append(gate)
            os.chown(gate, t.uid, t.gid)
            port = free_port()
            # a plain vassal loads its app before it drops root: this one opens no root-only file then
            extra = [f"psgi = {t.app}", "env = TENANT_PRELOAD_FILE="] if k is None else []
            add(e, name, vassal_ini(port, f"uid = {t.name}", *extra, processes=2), port)
            v = Vassal(name, port, t, gate)
            wait_for(lambda: len(v.workers(e)) == 2, 20, f"{name}'s two workers")
            vassals.append(v)
        yield (e, *vassals)
    finally:
        emperors.stop()
        for gate in gates:
            shutil.rmtree(gate, ignore_errors=True)


class Kept:
    """One kept (HTTP/1.1) connection: a request is sent, its answer read
    later."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def send(self, path: str) -> None:
        self.conn.request("GET", path)

    def answer(self) -> dict:
        r = self.conn.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        assert not r.will_close, "the connection is kept"
        return json.loads(body)

    def ask(self, path: str) -> dict:
        self.send(path)
        return self.answer()

    def close(self) -> None:
        self.conn.close()


def block(v: Vassal, name: str) -> str:
    return f"/block?name={name}&dir={v.gates}"


def started(v: Vassal, name: str) -> None:
    wait_for(lambda: (v.gates / f"{name}.started").exists(), 20, f"{v.name}'s request {name} to start")


def go(v: Vassal, name: str) -> None:
    (v.gates / f"{name}.go").touch()


def test_a_fast_request_behind_a_slow_one_is_served_by_the_free_worker(fleet):
    """Both workers busy; a slow and a fast request arrive on two kept
    connections of one of them: it starts the slow one with the fast one
    waiting and its sibling busy (the earlier hand-over keeps that
    connection). Once the sibling is free, it serves the fast request, and
    the next one on that connection, while the slow request still runs."""
    _, v, _ = fleet
    z, y, slow, fast = conns = [Kept(v.port) for _ in range(4)]
    try:
        for c in conns:
            c.ask("/ids")
        z.send(block(v, "b"))
        started(v, "b")
        # one worker busy: the other connections are all the free worker's
        free = {c.ask("/ids")["pid"] for c in (y, slow, fast)}
        assert len(free) == 1, free
        (pid_a,) = free
        y.send(block(v, "a"))
        started(v, "a")
        # both busy; a slow and a fast request wait on two of a's connections
        slow.send(block(v, "slow"))
        fast.send("/ids")
        go(v, "a")
        started(v, "slow")
        assert y.answer()["done"] == "a"
        go(v, "b")
        assert z.answer()["done"] == "b"
        # within the connection's timeout (10 s), long before the slow request ends
        fast.answer()
        again = fast.ask("/ids")
        assert again["pid"] != pid_a, "served by the free sibling"
        assert not (v.gates / "slow.go").exists()
        go(v, "slow")
        r = slow.answer()
        assert (r["done"], r["pid"]) == ("slow", pid_a), r
    finally:
        for name in ("a", "b", "slow"):
            go(v, name)
        for c in conns:
            c.close()


def getfd(v: Vassal, pid: int, fd: int = 0) -> dict:
    """What a worker of `v` gets when it asks for descriptor `fd` of `pid`."""
    return ask(v.port, f"/getfd?pid={pid}&fd={fd}")


def test_a_worker_takes_its_siblings_descriptors_and_nobody_elses(fleet):
    """pidfd_getfd(2) from a worker of tenant a: its sibling's descriptor,
    yes; a worker of tenant b, its own master, the base, the Emperor
    (root): refused (EPERM). The same from b's side."""
    e, a, b = fleet
    for v, other in ((a, b), (b, a)):
        workers = v.workers(e)
        seen: set[int] = set()
        # new connections spread over the workers: each asks for its sibling's
        for _ in range(100):
            c = Kept(v.port)
            try:
                me = c.ask("/ids")["pid"]
                sibling = next(w for w in workers if w != me)
                r = c.ask(f"/getfd?pid={sibling}&fd=0")
            finally:
                c.close()
            assert r["pid"] == me and r.get("got") and "errno" not in r, r
            seen.add(me)
            if seen == set(workers):
                break
        assert seen == set(workers), (seen, workers)
        # what that is given to: processes of its own uid and gid, and what the
        # workers hold is the vassal's own
        master = e.vpid(v.name)
        assert os.stat(f"/proc/{master}/environ").st_uid == 0, "the master stays not dumpable"
        for w in workers:
            assert os.stat(f"/proc/{w}/environ").st_uid == v.tenant.uid, "the worker is dumpable"
            status = dict(ln.split(":", 1) for ln in Path(f"/proc/{w}/status").read_text().splitlines())
            for cap in ("CapPrm", "CapEff", "CapAmb"):
                assert int(status[cap], 16) == 0, (w, cap, status[cap])
            assert status["Uid"].split() == [str(v.tenant.uid)] * 4, status["Uid"]
            for fd in os.listdir(f"/proc/{w}/fd"):
                try:
                    target, st = os.readlink(f"/proc/{w}/fd/{fd}"), os.stat(f"/proc/{w}/fd/{fd}")
                except FileNotFoundError:    # closed since the listing
                    continue
                if target.startswith("/") and not target.startswith("/memfd:") and target != "/dev/null":
                    assert st.st_uid == v.tenant.uid, (w, fd, target, st.st_uid)
        others = [(other.workers(e)[0], "the other tenant's worker"), (e.vpid(v.name), "its own master"),
                  (e.pid, "the Emperor")] + ([(base_pid(e), "the base")] if base_pid(e) else [])
        for target, what in others:
            r = getfd(v, target)
            assert r.get("errno") == errno.EPERM and r.get("step") == "pidfd_getfd" and "got" not in r, (what, r)
        # nor their environment (the vassal file's `env =` lines, often credentials)
        for target, what in others:
            r = ask(v.port, f"/read?path=/proc/{target}/environ")
            assert "content" not in r and r.get("error") == os.strerror(errno.EACCES), (what, r)


def test_a_vassal_run_as_nobody_keeps_its_workers_not_dumpable(fleet, request):
    """`nobody` is the uid unrelated daemons share: no process of theirs may
    read such a vassal's workers, whose siblings then keep the earlier
    hand-over; they still serve."""
    if request.node.callspec.params["fleet"] != 0:
        pytest.skip("once is enough: the same workers in every fleet")
    e, a, _ = fleet
    port = free_port()
    v = Vassal("nob", port, a.tenant, a.gates)
    add(e, "nob", vassal_ini(port, "uid = nobody", processes=2), port)
    try:
        wait_for(lambda: len(v.workers(e)) == 2, 20, "nob's two workers")
        for w in v.workers(e):
            assert os.stat(f"/proc/{w}").st_uid == 65534
            assert os.stat(f"/proc/{w}/environ").st_uid == 0, "not dumpable"
        assert ask(port, "/ids")["Uid"].split() == ["65534"] * 4
    finally:
        (e.dir / "nob.ini").unlink()


def test_an_app_that_made_itself_not_dumpable_stays_so(fleet, request):
    """The workers are made dumpable again only when dropping root cleared
    the flag, not when the app did (a plain vassal's app loads after the
    drop, which cleared it already)."""
    if request.node.callspec.params["fleet"] is not None:
        pytest.skip("a plain vassal's")
    e, a, _ = fleet
    port, t = free_port(), a.tenant
    v = Vassal("private", port, t, a.gates)
    add(e, "private", vassal_ini(port, f"uid = {t.name}", f"psgi = {t.app}", "env = TENANT_PRELOAD_FILE=",
                                 "env = TENANT_NOT_DUMPABLE=1", processes=2), port)
    try:
        wait_for(lambda: len(v.workers(e)) == 2, 20, "private's two workers")
        for w in v.workers(e):
            assert os.stat(f"/proc/{w}/environ").st_uid == 0, "not dumpable"
        assert ask(port, "/ids")["Uid"].split() == [str(t.uid)] * 4
    finally:
        (e.dir / "private.ini").unlink()


# A tenant's own process (its shell, a cron job) asks for descriptor FD of
# process PID (pidfd_getfd, 438 on every architecture) and says what it got.
TAKE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(int(sys.argv[1]))
fd = libc.syscall(438, pidfd, int(sys.argv[2]), 0)
print(f"errno {ctypes.get_errno()}" if fd < 0 else f"got {os.readlink(f'/proc/self/fd/{fd}')}")
"""


@pytest.mark.parametrize("what", ["file", "socket", "pipe"])
def test_a_plain_vassals_app_loads_as_its_user_and_holds_nothing_of_roots(fleet, request, what):
    """A plain vassal loads its app (its tenant's code) after dropping
    root: a root-only file, or a daemon's control socket in a root-only
    directory, is refused to it, and the vassal does not start (one line);
    a helper the app starts runs as the tenant, its pipe is the tenant's
    to take, and the workers are dumpable for the desk."""
    if request.node.callspec.params["fleet"] is not None:
        pytest.skip("a plain vassal's")
    e, a, _ = fleet
    port, t = free_port(), a.tenant
    name = f"root{what}"
    v = Vassal(name, port, t, a.gates)
    private = Path(tempfile.mkdtemp(prefix="pf-td-root-"))
    os.chmod(private, 0o700)
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        daemon.bind(str(private / "control.sock"))
        daemon.listen(8)
        env = {"file": [],  # the fleet's TENANT_PRELOAD_FILE: root-only
               "socket": ["env = TENANT_PRELOAD_FILE=", f"env = TENANT_PRELOAD_SOCKET={private / 'control.sock'}"],
               "pipe": ["env = TENANT_PRELOAD_FILE=", "env = TENANT_PRELOAD_PIPE=1"]}[what]
        (e.dir / f"{name}.ini").write_text(vassal_ini(port, f"uid = {t.name}", f"psgi = {t.app}", *env))
        if what != "pipe":
            wait_for(lambda: [ln for ln in e.lines(f"cannot load app '{t.app}'") if f"[{name}]" in ln
                              and "Permission denied" in ln], 30, "the refusal")
            return
        wait_for(lambda: ask(port, "/ids"), 30, f"{name} to answer")
        def workers() -> list[int]:    # not its helper
            return [w for w in v.workers(e) if not " ".join(psutil.Process(w).cmdline()).startswith("tenant helper")]
        wait_for(lambda: len(workers()) == 2, 20, f"{name}'s two workers")
        helpers = [p for p in psutil.Process(e.vpid(name)).children()
                   if " ".join(p.cmdline()).startswith("tenant helper")]
        assert helpers and all(p.uids().real == t.uid for p in helpers), helpers
        r = ask(port, "/fds")
        held = r["preloaded_pipe"]
        for w in workers():
            took = subprocess.run(["/usr/bin/python3", "-c", TAKE, str(w), str(held)], user=t.uid, group=t.gid,
                                  extra_groups=[], cwd="/", capture_output=True, text=True, timeout=20)
            assert took.stdout.strip().startswith("got pipe:"), (w, took.stdout, took.stderr)
            assert os.stat(f"/proc/{w}/environ").st_uid == t.uid, "dumpable"
    finally:
        (e.dir / f"{name}.ini").unlink(missing_ok=True)
        daemon.close()
        shutil.rmtree(private, ignore_errors=True)
