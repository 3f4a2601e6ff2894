"""Tenant isolation: what a vassal that drops to another user can see of
root, of the base and of the other vassals (docs/tenants.md).

Real users and groups made with useradd/groupadd (unique names with the
test's pid, removed at the end), real Emperors, started as root with the
supplementary groups root and adm as a login shell may give it, with
spares on (K = 2) and off (K = 0), and without a base (plain spawn).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from support import free_port, start_emperor, stop_emperor, wait_for
from test_emperor import PROGRAM
from test_robustness import Emp

HERE = Path(__file__).resolve().parent
TENANT = HERE / "apps" / "tenant.psgi"
ADM = grp.getgrnam("adm").gr_gid

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes users and drops to them"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd (passwd)"),
    pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there"),
]


@dataclass
class Tenant:
    name: str
    uid: int
    gid: int       # its primary group (made by useradd)
    extra: int     # a supplementary group it is a member of
    files: Path    # root's files, in a directory anyone may enter

    def path(self, which: str) -> str:
        return str(self.files / which)


@pytest.fixture(scope="module")
def tenant():
    tag = f"pft{os.getpid()}"
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
        yield Tenant(tag, pw.pw_uid, pw.pw_gid, grp.getgrnam(extra).gr_gid, files)
    finally:
        for cmd in made:
            subprocess.run(cmd, check=False)
        shutil.rmtree(files, ignore_errors=True)


def ask(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def answers(port: int) -> dict | None:
    try:
        return ask(port, "/ids")
    except OSError:
        return None


def base_ini(k: int) -> str:
    return (f"[uwsgi]\nearly-psgi = {TENANT}\nfork-server = fs.sock\n"
            f"early-warmup = /warm\nfork-server-spares = {k}\n")


def vassal_ini(port: int, *extra: str, processes: int = 2) -> str:
    return "\n".join(["[uwsgi]", f"http-socket = 127.0.0.1:{port}", f"processes = {processes}",
                      "disable-logging = true", *extra, ""])


class Fleet:
    """An Emperor on its own vassals directory, started as root with the
    groups root and adm."""

    def __init__(self, xprocess, tenant: Tenant, k: int | None, **env: str):
        self.vdir = Path(tempfile.mkdtemp(prefix="pf-tn-"))
        self.k = k
        if k is not None:
            (self.vdir / "base.ini").write_text(base_ini(k))
        stats = Path(str(self.vdir) + ".stats")
        environ = {"TENANT_PRELOAD_FILE": tenant.path("preload"), "TENANT_WARM_FILE": tenant.path("warm"),
                   "TENANT_HELPER_TAG": self.vdir.name, **env}
        em = start_emperor(xprocess, f"emperor-{self.vdir.name}", [
            self.vdir, "--stats", stats, "--mercy", "5", "--backoff-first", "0.2", "--backoff-max", "1"],
            environ, groups=[0, ADM])
        self.e = Emp(em.pid, self.vdir, em.log, em.popen, stats)
        if k:
            self.wait_spares()

    def wait_spares(self) -> None:
        def ready():
            sp = self.e.status()["base"].get("spares")
            return sp and sp["ready"] == sp["count"] == self.k
        wait_for(ready, 30, f"{self.k} warm spares")

    def spares(self) -> set[int]:
        return set(self.e.status()["base"]["spares"]["pids"])

    def add(self, name: str, text: str, port: int) -> int:
        """A new vassal; its pid once it answers."""
        (self.vdir / f"{name}.ini").write_text(text)
        wait_for(lambda: answers(port), 30, f"{name} to answer")
        return self.e.vpid(name)

    def stop(self) -> None:
        stop_emperor(self.e)
        shutil.rmtree(self.vdir, ignore_errors=True)
        Path(str(self.vdir) + ".stats").unlink(missing_ok=True)


@pytest.fixture(scope="module", params=[2, 0, None], ids=["spares", "forked", "plain"])
def fleet(request, xprocess, tenant):
    f = Fleet(xprocess, tenant, request.param)
    yield f
    f.stop()


def every_worker(port: int, path: str, workers: int = 2) -> list[dict]:
    """The answer of each of the vassal's workers (new connections spread
    over them)."""
    seen: dict[int, dict] = {}

    def all_seen():
        r = ask(port, path)
        seen[r["pid"]] = r
        return len(seen) >= workers
    wait_for(all_seen, 20, f"{workers} workers to answer {path}")
    return list(seen.values())


# -- privileges ---------------------------------------------------------------


def test_uid_alone_drops_gid_and_groups_too(fleet, tenant):
    """`uid` without `gid`: the user's primary group and its own
    supplementary groups (initgroups), never root's gid 0 nor the Emperor's
    adm; every uid and gid (real, effective, saved, file system)."""
    port = free_port()
    extra = [f"psgi = {TENANT}"] if fleet.k is None else []
    spares_before = fleet.spares() if fleet.k else set()
    pid = fleet.add("low", vassal_ini(port, f"uid = {tenant.name}", *extra), port)
    if fleet.k:
        assert pid in spares_before, f"{pid} was forked, not one of the spares {spares_before}"
    for r in every_worker(port, "/ids"):
        assert r["Uid"].split() == [str(tenant.uid)] * 4, r
        assert r["Gid"].split() == [str(tenant.gid)] * 4, r
        assert sorted(map(int, r["Groups"].split())) == sorted({tenant.gid, tenant.extra}), r
    for secret in ("root-only", "adm-only", "preload", "warm"):
        r = ask(port, f"/read?path={tenant.path(secret)}")
        assert "content" not in r and r["error"] == "Permission denied", (secret, r)
    assert ask(port, f"/read?path={tenant.path('group-only')}")["content"] == "secret group-only\n"
    (fleet.vdir / "low.ini").unlink()


def test_a_uid_without_passwd_entry_needs_gid(fleet, tenant):
    port = free_port()
    extra = [f"psgi = {TENANT}"] if fleet.k is None else []
    (fleet.vdir / "ghost.ini").write_text(vassal_ini(port, "uid = 4123456", *extra))
    wait_for(lambda: [ln for ln in fleet.e.lines("error: uid 4123456 has no passwd entry: give gid too") if "[ghost]" in ln], 30,
             "the refusal")
    assert answers(port) is None
    (fleet.vdir / "ghost.ini").unlink()
