"""Code deploys in tests: a fleet whose base preloads versioned.psgi (it
reads version.txt once, at load time), `emperor reload-base`, and whether
every app serves a version."""

from __future__ import annotations

import os
import signal
import subprocess

from .apps import APPS, app_ini, base_ini, get
from .emperors import EMPEROR
from .processes import free_port, wait_for

VERSIONED_APP = APPS / "versioned.psgi"


def deploy_fleet(emperor, names, *extra, fork_server="fs.sock", version="v1", env=None,
                 base_at=None):
    """An Emperor (from the `emperor` fixture) whose base preloads
    versioned.psgi and adopts `names`, each answering on its port.
    `base_at`: the base file is a symlink to this path, outside the
    vassals directory: what is written there reaches the Emperor only when
    it reads its directory again (`read_now`), never by an inotify event."""
    e = emperor({}, *extra, base=False, env=env)
    (e.dir / "version.txt").write_text(version + "\n")
    if base_at is None:
        e.write("base", base_ini(VERSIONED_APP, fork_server))
    else:
        base_at.write_text(base_ini(VERSIONED_APP, fork_server))
        os.symlink(base_at, e.dir / "base.ini")
    ports = {n: free_port() for n in names}
    for n, port in ports.items():
        e.write(n, app_ini(n, port, processes=1))
    for n, port in ports.items():
        wait_for(lambda p=port, n=n: get(p)["name"] == n, 40, f"{n} to answer")
    return e, ports


def read_now(e):
    """SIGHUP, then wait until the Emperor (with --stats) has read its
    directory again: every change on disk is known to it."""
    before = e.doc()["emperor"]["rescans"]
    os.kill(e.pid, signal.SIGHUP)
    wait_for(lambda: e.doc()["emperor"]["rescans"] > before, 30, "the rescan SIGHUP asks for")


def reload_base(e, *args, timeout=120):
    return subprocess.run([EMPEROR, "reload-base", "--pidfile", e.pidfile, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def serve(ports, version):
    """Every port answers the given version."""
    return all(get(p)["value"] == version for p in ports.values())
