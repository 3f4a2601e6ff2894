"""Descriptor hygiene: what the Emperor, the base and the vassals hold open,
checked in /proc on a real fleet."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil
import pytest

from support import PROGRAM, app_ini, assert_no_zombies, free_port, unix_peers, wait_for

pytestmark = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)

O_CLOEXEC_OCTAL = 0o2000000  # the `flags:` line of /proc/PID/fdinfo/N is octal


# -- 3. descriptor hygiene --------------------------------------------------------------


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def _socket_inode(target: str) -> int | None:
    m = re.fullmatch(r"socket:\[(\d+)\]", target)
    return int(m.group(1)) if m else None


def _tcp_listen_inode(port: int) -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                inodes.add(int(f[9]))
    return inodes


def test_descriptor_hygiene(emp):
    ports = {"a1": free_port(), "a2": free_port()}
    files = {n: app_ini(n, p, processes=2) for n, p in ports.items()}
    # a template: this vassal gets its config on a config pipe (mask 0x02)
    p3 = free_port()
    files["t3.ini.j2"] = app_ini("t3", 0).replace("127.0.0.1:0", "127.0.0.1:{{ %d }}" % p3)
    e = emp(files, wait=[*ports.values(), p3])
    ports["t3"] = p3
    peers = unix_peers()
    emperor_fds = _fds(e.pid)
    emperor_inodes = {_socket_inode(t) for t in emperor_fds.values()} - {None}
    base = e.vpid("base")
    base_inodes = {_socket_inode(t) for t in _fds(base).values()} - {None}
    vassal_inodes = {}

    def tree_targets(name):
        vpid = e.vpid(name)
        return {t for p in [vpid, *(c.pid for c in psutil.Process(vpid).children())]
                for fd, t in _fds(p).items() if fd > 2}

    outside = {n: set(_fds(e.pid).values()) | set(_fds(base).values()) | set().union(
        *(tree_targets(o) for o in ports if o != n)) for n in ports}
    for name in ports:
        vpid = e.vpid(name)
        fds = _fds(vpid)
        inodes = {fd: _socket_inode(t) for fd, t in fds.items()}
        listen = _tcp_listen_inode(ports[name])
        roles = {}
        for fd, target in sorted(fds.items()):
            ino = inodes[fd]
            if fd in (0, 1, 2):
                assert ino is None, f"{name}: stdio fd {fd} is a socket ({target}): the listener left on 0?"
                roles[fd] = "stdio"
            elif ino in listen:
                assert ino in emperor_inodes, f"{name}: its listener is not the Emperor's"
                roles[fd] = "listener"
            elif ino is not None and peers.get(ino) in emperor_inodes:
                roles[fd] = "emperor pipe"
            elif target.startswith("pipe:") and target not in outside[name]:
                roles[fd] = "private"  # e.g. between the vassal and its workers
            elif ino is not None and peers.get(ino) in inodes.values() and target not in outside[name]:
                roles[fd] = "private"  # a socket pair of its own: its workers' queue of connections
            elif target.startswith("/memfd:psgi-forkserver-board"):
                roles[fd] = "private"  # a memory file its master made: its workers' board of free workers
            elif target.startswith("/memfd:psgi-forkserver-desk"):
                roles[fd] = "private"  # a memory file its master made: its workers' desk (Desk.pm)
            elif target.startswith("/memfd:psgi-forkserver-requests"):
                roles[fd] = "private"  # a memory file its master made: its workers' requests counts (Counts.pm)
            else:
                pytest.fail(f"{name} (pid {vpid}) holds fd {fd} -> {target}: not its own")
        # every adopted vassal has a config pipe: its output pipe came on it (logs.py)
        want = ["emperor pipe", "listener", "emperor pipe"]
        assert sorted(r for r in roles.values() if r not in ("stdio", "private")) == sorted(want), \
            (name, fds, roles)
        assert not ({i for i in inodes.values() if i} & base_inodes), f"{name} holds a base socket"
        vassal_inodes[name] = {i for i in inodes.values() if i}
        # the workers inherit nothing more than their vassal
        for w in psutil.Process(vpid).children():
            winodes = {_socket_inode(t) for t in _fds(w.pid).values()} - {None}
            assert winodes <= vassal_inodes[name], (name, w.pid, _fds(w.pid))
    names = list(vassal_inodes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not vassal_inodes[a] & vassal_inodes[b], f"{a} and {b} share a socket"
    # the base holds stdio, its pipe, its config pipe (the Emperor sends it
    # the text of its file) and the fork-server socket only, the spare
    # descriptor it gives up to refuse a client when out of them, the
    # datagram socket its vassals report their lazy loads to (preload-learned),
    # and two links per warm spare (fork-server-spares, default 2) once its
    # pool is full: the spare's and its warm worker's (the base hands it the request)
    wait_for(lambda: (e.status()["base"].get("spares") or {}).get("ready") == 2, 30, "the base's 2 spares")
    bfds = {fd: t for fd, t in _fds(base).items() if fd > 2}
    assert sorted(bfds.values()).count("/dev/null") == 1, bfds
    assert len(bfds) == 4 + 1 + 2 * 2, bfds
    for ino in base_inodes:
        assert not any(ino in v for v in vassal_inodes.values())
    # every descriptor of the Emperor, stdio aside, is close-on-exec
    leaky = []
    for fd, target in emperor_fds.items():
        if fd <= 2:
            continue
        try:
            info = Path(f"/proc/{e.pid}/fdinfo/{fd}").read_text()
        except FileNotFoundError:
            continue
        flags = int(re.search(r"^flags:\s*(\d+)", info, re.M).group(1), 8)
        if not flags & O_CLOEXEC_OCTAL:
            leaky.append((fd, target))
    assert leaky == [], f"Emperor descriptors without close-on-exec: {leaky}"
    kinds = " ".join(emperor_fds.values())
    assert "inotify" in kinds and "eventpoll" in kinds  # the check did look at them
    assert_no_zombies(e)
