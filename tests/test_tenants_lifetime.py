"""Tenant isolation over time: nothing a tenant's app started outlives its
fleet (deploys, kill -9 of the Emperor), and a socket swapped for a symlink
while bound changes no other file. Real users made with useradd, real
Emperors started as root."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from support import Emperors, alive, descendants, free_port, kill_all, wait_for
from support.tenants import NEEDS_TENANTS, ARGS, add, ask, start_fleet, tag_of, tenant_user, vassal_ini, wait_spares

pytestmark = NEEDS_TENANTS


@pytest.fixture(scope="module")
def tenant():
    with tenant_user() as t:
        yield t


# -- nothing of a vassal outlives it ------------------------------------------


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def helpers(tag: str) -> list[psutil.Process]:
    """The live helpers the fleet's app started (their title names the fleet)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and f"tenant helper of {tag}" in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


@pytest.mark.parametrize("k", [2, 0])
def test_helpers_started_in_warm_ups_go_on_deploys_and_when_the_emperor_is_killed(xprocess, tenant, k):
    """The app starts 3 helpers in each warm-up (the base's early-warmup,
    each spare's worker): a deploy leaves only the new generation's, and
    kill -9 of the Emperor leaves nothing of the fleet."""
    emperors = Emperors(xprocess, "pf-tn-", args=ARGS)
    tag = None
    try:
        f = start_fleet(emperors, tenant, k, TENANT_HELPERS="3")
        tag = tag_of(f.dir)
        want = 3 * (1 + k)
        wait_for(lambda: len(helpers(tag)) == want, 30, f"{want} helpers")
        if k:
            # a uid vassal adopted from a spare: the warm worker and the helpers
            # its warm-up started ran as root; none of them is in its session
            port = free_port()
            vpid = add(f, "low", vassal_ini(port, f"uid = {tenant.name}"), port)
            session = [p for p in psutil.process_iter() if _sid(p.pid) == vpid]
            assert session and all(p.uids().effective == tenant.uid for p in session), \
                [(p.pid, p.cmdline(), p.uids()) for p in session]
            (f.dir / "low.ini").unlink()
            wait_for(lambda: not [p for p in session if alive(p)], 30, "the vassal to stop")
            wait_spares(f, k)
            wait_for(lambda: len(helpers(tag)) == want, 30, f"{want} helpers again")
        for gen in (2, 3):
            os.kill(f.pid, signal.SIGUSR1)
            wait_for(lambda g=gen: f.lines(f"code deploy to generation {g} done"), 60, f"generation {gen}")
            if k:
                wait_spares(f, k)
            wait_for(lambda: len(helpers(tag)) == want, 30,
                     f"{want} helpers after the deploy to generation {gen} (not {len(helpers(tag))})")
        fleet = [*descendants(f.pid), *helpers(tag)]
        assert len(fleet) >= want + 1 + 2 * k, fleet
        os.kill(f.pid, signal.SIGKILL)
        f.popen.wait(10)
        wait_for(lambda: not [p for p in fleet if alive(p)], 30, "every process of the fleet to end")
    finally:
        if tag is not None:
            kill_all(helpers(tag))
        emperors.stop()


def test_a_socket_swapped_for_a_symlink_while_bound_changes_no_other_file(tmp_path: Path):
    """A tenant that may write the directory of its own socket
    (`http-socket = /srv/alice/app.sock`) renames a symlink to a root file
    over the socket, again and again, while the Emperor binds it: the
    Emperor's chmod and chown reach the socket it bound or nothing, never
    the root file (before: mode 0666 and owner nobody within a second)."""
    import stat
    import sys
    import time

    from psgi_forkserver.sockets import bind_unix_listener

    victim = tmp_path / "root-only"
    victim.write_text("secret")
    victim.chmod(0o600)
    tenant_dir = tmp_path / "alice"
    tenant_dir.mkdir()
    path = tenant_dir / "app.sock"
    attacker = subprocess.Popen([sys.executable, "-c", f"""
import os
path, tmp = {str(path)!r}, {str(tenant_dir / '.swap')!r}
while True:
    for f in (tmp, path):
        try:
            os.unlink(f)
        except OSError:
            pass
    try:
        os.symlink({str(victim)!r}, tmp)
        os.rename(tmp, path)
    except OSError:
        pass
"""])
    binds = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                bind_unix_listener(str(path), uid=65534, gid=65534, mode=0o666).close()
                binds += 1
            except OSError:
                pass
            st = victim.stat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), \
                f"after {binds} binds: {oct(st.st_mode)} uid {st.st_uid}"
    finally:
        attacker.kill()
        attacker.wait()
    assert binds > 0  # the Emperor did bind, between the swaps
    sock = tmp_path / "plain.sock"  # and an untouched socket gets its mode and owner
    s = bind_unix_listener(str(sock), uid=65534, gid=65534, mode=0o640)
    try:
        st = os.lstat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 65534, 65534)
    finally:
        s.close()


# -- what a vassal leaves open in the Emperor ---------------------------------


def _pipes(pid: int) -> int:
    """The pipes process `pid` holds open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return n


def test_output_pipes_handed_out_of_the_vassal_do_not_pile_up_in_the_emperor(xprocess, tenant):
    """A tenant's one-process vassal hands its standard output (the
    Emperor's pipe of that process) to a process of the tenant outside the
    vassal (SCM_RIGHTS), then asks for its replacement, again and again.
    Each pipe the Emperor read until its end of file, which never came: one
    descriptor of the Emperor's more with each replacement (6 after 6 rounds,
    20,000 would have left it none to start anybody's vassal). Now an exited
    process's pipe is read for `mercy` seconds at most, and at most 2 a
    vassal; what is written there meanwhile is still logged."""
    import shutil
    import socket
    import tempfile

    emperors = Emperors(xprocess, "pf-tn-", args=ARGS)
    held: list[int] = []
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    where = Path(tempfile.mkdtemp(prefix="pf-tn-holder-"))
    try:
        where.chmod(0o755)  # the tenant reaches the socket
        path = where / "holder.sock"
        holder.bind(str(path))
        holder.listen(8)
        os.chown(path, tenant.uid, tenant.gid)
        f = start_fleet(emperors, tenant, 0)
        port = free_port()
        pid = add(f, "solo", vassal_ini(port, f"uid = {tenant.name}", "master = false", processes=1), port)
        wait_for(lambda: f.vassal("solo")["state"] == "loyal", 20, "solo to be loyal")
        baseline = _pipes(f.pid)
        for round_ in range(6):
            assert ask(port, f"/give?sock={path}&replace=1")["gave"] == 1
            conn, _ = holder.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 1, 1)
            held.extend(fds)
            if round_ == 0:
                os.write(fds[0], b"written by a process outside the vassal\n")
            old = pid
            pid = wait_for(lambda: (p := ask(port, "/ids")["pid"]) != old and p, 30, f"round {round_}'s successor")
            # the next round's byte 22 is the current process's, not a successor's
            wait_for(lambda: f.lines(f"old pid {old} stopped"), 30, f"round {round_}'s old process to stop")
        wait_for(lambda: f.lines("written by a process outside the vassal"), 10, "the outsider's line logged")
        wait_for(lambda: _pipes(f.pid) <= baseline + 2, 10,
                 f"at most 2 pipes of exited processes kept (baseline {baseline}, now {_pipes(f.pid)})")
        wait_for(lambda: _pipes(f.pid) <= baseline, 20,
                 f"no pipe of an exited process kept after mercy (baseline {baseline}, now {_pipes(f.pid)})")
        assert f.lines("still held by a process outside it"), f.text()
    finally:
        holder.close()
        shutil.rmtree(where, ignore_errors=True)
        for fd in held:
            os.close(fd)
        emperors.stop()


# A local user listens on the path a base's fork server is to bind (in a
# directory anyone may write, as /tmp) and says what each connection brought.
SQUAT = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1]); s.listen(16); s.settimeout(0.2)
print("listening", flush=True)
until = time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    msg, fds, _, _ = socket.recv_fds(c, 65536, 16)
    print("got", len(msg), "bytes and", len(fds), "descriptors", flush=True)
    c.close()
"""


def test_a_fork_server_path_taken_by_another_user_gets_nothing(xprocess, tenant):
    """The base's fork-server socket in a directory anyone may write (the
    example's is in /tmp): a local user listens there first. The Emperor
    took its socket for the base's (ready: 'fork server ... accepts') and
    sent it each adoption request, with a uid vassal's listening socket,
    its Emperor pipe and its config pipe (4 descriptors: it could accept
    that tenant's connections and read its config). Now a fork server that
    is neither root's nor the Emperor's user's is not the base: nothing is
    sent to it."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pf-tn-shared-"))
    shared.chmod(0o1777)  # as /tmp
    squatter = None
    emperors = Emperors(xprocess, "pf-tn-", args=ARGS)
    try:
        path = shared / "fs.sock"
        squatter = subprocess.Popen(["/usr/bin/python3", "-c", SQUAT, str(path), "60"], user=tenant.uid,
                                    group=tenant.gid, extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True)
        assert squatter.stdout.readline().strip() == "listening"
        f = emperors({"victim": vassal_ini(free_port(), f"uid = {tenant.name}")}, fork_server=path)
        wait_for(lambda: len(f.lines("another fork server is listening")) >= 2, 30, "the base to refuse twice")
        assert not f.lines("fork server accepts"), f.text()
    finally:
        import shutil
        emperors.stop()
        out = ""
        if squatter is not None:
            squatter.terminate()
            out, _ = squatter.communicate(timeout=10)
        shutil.rmtree(shared, ignore_errors=True)
    got = [ln for ln in out.splitlines() if ln.startswith("got")]
    # the readiness probe's connections bring nothing
    assert got and set(got) == {"got 0 bytes and 0 descriptors"}, out
