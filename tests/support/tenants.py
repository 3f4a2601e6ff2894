"""Tenants in tests: a real user made with useradd (removed after), the
tenant app's vassals, and fleets an Emperor runs as root with the groups
root and adm."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .apps import APPS, PROGRAM, base_ini
from .emperors import Emp, Emperors
from .processes import wait_for

TENANT = APPS / "tenant.psgi"
ADM = grp.getgrnam("adm").gr_gid


@dataclass
class Tenant:
    name: str
    uid: int
    gid: int       # its primary group (made by useradd)
    extra: int     # a supplementary group it is a member of
    files: Path    # root's files, in a directory anyone may enter
    app: Path      # the tenant app, where the tenant may read it (it loads after the drop)

    def path(self, which: str) -> str:
        return str(self.files / which)


@contextlib.contextmanager
def tenant_user(suffix: str = "") -> Iterator[Tenant]:
    """A user made for the test (its name has the pid, then `suffix`, for a
    second tenant of the same test) with a supplementary group, and root's
    files it may or may not read; all removed after."""
    tag = f"pft{os.getpid()}{suffix}"
    extra = f"{tag}x"
    made: list[list[str]] = []
    files = Path(tempfile.mkdtemp(prefix="pf-tenant-"))
    try:
        subprocess.run(["groupadd", extra], check=True)
        made.append(["groupdel", extra])
        subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", "-G", extra, tag],
                       check=True)
        made.insert(0, ["userdel", tag])
        pw = pwd.getpwnam(tag)
        os.chmod(files, 0o755)
        for name, gid, mode in (("root-only", 0, 0o640), ("adm-only", ADM, 0o640),
                                ("group-only", grp.getgrnam(extra).gr_gid, 0o640),
                                ("preload", 0, 0o600), ("warm", 0, 0o600)):
            p = files / name
            p.write_text(f"secret {name}\n")
            os.chown(p, 0, gid)
            os.chmod(p, mode)
        # a plain vassal loads its app as the tenant: from a copy it can read,
        # wherever the checkout is (a clone in a 0700 directory is not)
        app = files / TENANT.name
        shutil.copyfile(TENANT, app)
        os.chmod(app, 0o644)
        yield Tenant(tag, pw.pw_uid, pw.pw_gid, grp.getgrnam(extra).gr_gid, files, app)
    finally:
        for cmd in made:
            subprocess.run(cmd, check=False)
        shutil.rmtree(files, ignore_errors=True)


def ask(port: int, path: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def answers(port: int, timeout: float = 5) -> dict | None:
    try:
        return ask(port, "/ids", timeout)
    except OSError:
        return None


def tenant_base(k: int) -> str:
    return base_ini(TENANT, "fs.sock", "early-warmup = /warm", f"fork-server-spares = {k}")


def vassal_ini(port: int, *extra: str, processes: int = 2) -> str:
    return "\n".join(["[uwsgi]", f"http-socket = 127.0.0.1:{port}", f"processes = {processes}",
                      "disable-logging = true", *extra, ""])


# every tenant fleet: root with the groups root and adm, restarts fast
ARGS = ["--mercy", "5", "--backoff-first", "0.2", "--backoff-max", "1"]


def start_fleet(emperors: Emperors, tenant: Tenant, k: int | None, **env: str) -> Emp:
    """An Emperor on its own vassals directory: a base with `k` spares, or
    none (k None: plain vassals). Its app's helpers are named after the
    fleet (`tag_of`)."""
    vdir = emperors.directory()
    e = emperors({} if k is None else {"base": tenant_base(k)}, base=False, vdir=vdir,
                 groups=[0, ADM], env={"TENANT_PRELOAD_FILE": tenant.path("preload"),
                                        "TENANT_WARM_FILE": tenant.path("warm"),
                                        "TENANT_HELPER_TAG": tag_of(vdir), **env})
    if k:
        wait_spares(e, k)
    return e


def tag_of(vdir: Path) -> str:
    """The fleet's own name: its directory's (made unique by mkdtemp)."""
    return vdir.parent.name


def wait_spares(e: Emp, k: int) -> None:
    def ready():
        sp = e.status()["base"].get("spares")
        return sp and sp["ready"] == sp["count"] == k
    wait_for(ready, 30, f"{k} warm spares")


def add(e: Emp, name: str, text: str, port: int) -> int:
    """A new vassal; its pid once it answers."""
    e.write(name, text)
    wait_for(lambda: answers(port), 30, f"{name} to answer")
    return e.vpid(name)


# the marks of every tenants test module
NEEDS_TENANTS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes users and drops to them"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd (passwd)"),
    pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there"),
]
