"""Tenant isolation: what a vassal that drops to another user can see of
root, of the base and of the other vassals (docs/tenants.md).

Real users and groups made with useradd/groupadd (unique names with the
test's pid, removed at the end), real Emperors, started as root with the
supplementary groups root and adm as a login shell may give it, with
spares on (K = 2) and off (K = 0), and without a base (plain spawn)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from support import Emp, Emperors, free_port, wait_for
from support.tenants import (
    NEEDS_TENANTS,
    ARGS, TENANT, Tenant, add, answers, ask, start_fleet, tenant_user, vassal_ini, wait_spares,
)

pytestmark = NEEDS_TENANTS


@pytest.fixture(scope="module")
def tenant():
    with tenant_user() as t:
        yield t


def spares(e: Emp) -> set[int]:
    return set(e.status()["base"]["spares"]["pids"])


@pytest.fixture(scope="module", params=[2, 0, None], ids=["spares", "forked", "plain"])
def k(request) -> int | None:
    """The fleet's spares: 2, none (each vassal forked), or no base at all."""
    return request.param


@pytest.fixture(scope="module")
def fleet(xprocess, tenant, k):
    emperors = Emperors(xprocess, "pf-tn-", args=ARGS)
    try:
        yield start_fleet(emperors, tenant, k)
    finally:
        emperors.stop()


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


def own_app(k: int | None, tenant: Tenant) -> list[str]:
    """A plain vassal (no base) loads the tenant app itself, as its user
    (after the drop): its copy the user can read, without the root-only
    file the base preloads."""
    return [f"psgi = {tenant.app}", "env = TENANT_PRELOAD_FILE="] if k is None else []


# -- privileges ---------------------------------------------------------------


def test_uid_alone_drops_gid_and_groups_too(fleet, k, tenant):
    """`uid` without `gid`: the user's primary group and its own
    supplementary groups (initgroups), never root's gid 0 nor the Emperor's
    adm; every uid and gid (real, effective, saved, file system)."""
    port = free_port()
    extra = own_app(k, tenant)
    spares_before = spares(fleet) if k else set()
    pid = add(fleet, "low", vassal_ini(port, f"uid = {tenant.name}", *extra), port)
    if k:
        assert pid in spares_before, f"{pid} was forked, not one of the spares {spares_before}"
    for r in every_worker(port, "/ids"):
        assert r["Uid"].split() == [str(tenant.uid)] * 4, r
        assert r["Gid"].split() == [str(tenant.gid)] * 4, r
        assert sorted(map(int, r["Groups"].split())) == sorted({tenant.gid, tenant.extra}), r
    for secret in ("root-only", "adm-only", "preload", "warm"):
        r = ask(port, f"/read?path={tenant.path(secret)}")
        assert "content" not in r and r["error"] == "Permission denied", (secret, r)
    assert ask(port, f"/read?path={tenant.path('group-only')}")["content"] == "secret group-only\n"
    (fleet.dir / "low.ini").unlink()


def test_a_uid_without_passwd_entry_needs_gid(fleet, k, tenant):
    port = free_port()
    extra = [f"psgi = {tenant.app}"] if k is None else []
    (fleet.dir / "ghost.ini").write_text(vassal_ini(port, "uid = 4123456", *extra))
    wait_for(lambda: [ln for ln in fleet.lines("error: uid 4123456 has no passwd entry: give gid too") if "[ghost]" in ln], 30,
             "the refusal")
    assert answers(port, 0.5) is None  # the Emperor may hold the socket: no answer
    (fleet.dir / "ghost.ini").unlink()


# -- descriptors --------------------------------------------------------------


def base_fd(fleet, path: str) -> int:
    """The descriptor number the base holds `path` on."""
    base = fleet.vpid("base")
    for fd in os.listdir(f"/proc/{base}/fd"):
        try:
            if os.readlink(f"/proc/{base}/fd/{fd}") == path:
                return int(fd)
        except OSError:
            pass
    raise AssertionError(f"the base does not hold {path}")


@pytest.mark.parametrize("uid", [True, False], ids=["uid vassal", "root vassal"])
def test_a_vassal_holds_none_of_the_descriptors_the_app_opened_in_the_base(fleet, k, tenant, uid):
    if k is None:
        pytest.skip("no base: a plain vassal opens its own")
    n = base_fd(fleet, tenant.path("preload"))
    port = free_port()
    add(fleet, "nofd", vassal_ini(port, *([f"uid = {tenant.name}"] if uid else [])), port)
    for r in every_worker(port, "/fds"):
        assert r["preloaded"] == n, r    # the app's handle is still there, its descriptor is not
        held = set(r["fds"].values())
        assert tenant.path("preload") not in held, r
        # a spare's warm worker warmed up as root: it serves root vassals only (its warm-up
        # is then that vassal's first request's), never one that runs as another user
        if uid or not k:
            assert tenant.path("warm") not in held, r
    for r in every_worker(port, f"/fd?n={n}"):
        assert "secret" not in json.dumps(r) and r["target"] == "/dev/null", r
    vpid = fleet.vpid("nofd")
    for p in [vpid, *(c.pid for c in psutil.Process(vpid).children())]:
        for fd in os.listdir(f"/proc/{p}/fd"):
            try:  # a descriptor closed since the listing holds nothing
                target = os.readlink(f"/proc/{p}/fd/{fd}")
            except FileNotFoundError:
                continue
            assert target != tenant.path("preload"), (p, fd)
    line = fleet.lines("adopted vassals close the descriptors the app holds: ")
    assert line and f"{n} ({tenant.path('preload')})" in line[0], fleet.text()
    (fleet.dir / "nofd.ini").unlink()


def test_keep_fd_keeps_one_for_a_root_vassal_and_refuses_it_to_a_uid_vassal(fleet, k, tenant):
    if k is None:
        pytest.skip("no base")
    n = base_fd(fleet, tenant.path("preload"))
    port = free_port()
    add(fleet, "keeper", vassal_ini(port, f"keep-fd = {n}"), port)
    for r in every_worker(port, f"/fd?n={n}"):
        assert r.get("fd") == "secret preload\n", r
    (fleet.dir / "keeper.ini").unlink()
    bad = free_port()
    (fleet.dir / "sneaky.ini").write_text(vassal_ini(bad, f"uid = {tenant.name}", f"keep-fd = {n}"))
    (fleet.dir / "stray.ini").write_text(vassal_ini(free_port(), "keep-fd = 1"))
    want = (f"error: keep-fd {n} ({tenant.path('preload')}): refused for uid {tenant.uid}: "
            f"the base opened it as root and it belongs to uid 0, not to uid {tenant.uid}")
    wait_for(lambda: [ln for ln in fleet.lines(want) if "[sneaky]" in ln], 30, "the refusal")
    wait_for(lambda: [ln for ln in fleet.lines("error: keep-fd 1: not a descriptor the base's app holds")
                      if "[stray]" in ln], 30, "the refusal")
    assert answers(bad, 0.5) is None
    (fleet.dir / "sneaky.ini").unlink()
    (fleet.dir / "stray.ini").unlink()


# -- state not shared by accident ---------------------------------------------


def test_every_worker_sees_its_own_vassals_emperor_variables(fleet, k):
    """A spare's warm worker was forked before its adoption: it is given its
    vassal's UWSGI_EMPEROR_FD and UWSGI_EMPEROR_FD_CONFIG as its siblings
    inherit them."""
    port = free_port()
    extra = [f"psgi = {TENANT}"] if k is None else []
    add(fleet, "envs", vassal_ini(port, "env = APP_NAME=envs", *extra, processes=3), port)
    seen = every_worker(port, "/env", 3)
    values = {(r["UWSGI_EMPEROR_FD"], r["UWSGI_EMPEROR_FD_CONFIG"], r["APP_NAME"]) for r in seen}
    assert len(values) == 1, seen
    fd, config_fd, _ = values.pop()
    assert fd is not None, seen
    if k is not None:    # adopted: the config pipe stays open (a spawned vassal's is read and closed)
        assert config_fd is not None, seen
    (fleet.dir / "envs.ini").unlink()


def test_every_process_draws_its_own_random_numbers(fleet, k):
    """Each worker of 4 vassals (a spare's warm worker, whose token is drawn
    in its warm-up, and the workers forked at adoption) has its own token
    and its own next rand()."""
    ports = []
    for i in range(4):
        if k and i % k == 0:
            wait_spares(fleet, k)    # each vassal from a spare
        port = free_port()
        extra = [f"psgi = {TENANT}"] if k is None else []
        add(fleet, f"rnd{i}", vassal_ini(port, *extra), port)
        ports.append(port)
    answers_ = [r for port in ports for r in every_worker(port, "/token")]
    assert len(answers_) == 8
    assert len({r["token"] for r in answers_}) == 8, answers_
    assert len({r["rand"] for r in answers_}) == 8, answers_
    for i in range(4):
        (fleet.dir / f"rnd{i}.ini").unlink()


# -- a hostile tenant's inputs ------------------------------------------------


def test_a_tenant_symlink_in_its_access_log_path_reaches_no_root_file(fleet, k, tenant):
    """The access log is opened before the vassal drops root: a tenant that
    owns the log's directory puts a symlink to a root-only file there. It
    is opened with the tenant's rights: the vassal refuses to start and the
    root file is untouched."""
    logs = Path(tempfile.mkdtemp(prefix="pf-tlogs-"))
    try:
        os.chmod(logs, 0o755)
        os.chown(logs, tenant.uid, tenant.gid)
        victim = tenant.files / "root-only"
        before = victim.read_bytes()
        (logs / "access.log").symlink_to(victim)
        os.lchown(logs / "access.log", tenant.uid, tenant.gid)
        port = free_port()
        extra = own_app(k, tenant)
        (fleet.dir / "logger.ini").write_text(
            vassal_ini(port, f"uid = {tenant.name}", *extra).replace("disable-logging = true\n", "")
            + f"access-log = {logs / 'access.log'}\n")
        wait_for(lambda: [ln for ln in fleet.lines(f"cannot open access-log '{logs / 'access.log'}': Permission denied")
                          if "[logger]" in ln], 30, "the refusal")
        (fleet.dir / "logger.ini").unlink()
        assert victim.read_bytes() == before
        # its own file, in its own directory, is written
        (logs / "access.log").unlink()
        own = free_port()
        (fleet.dir / "logger2.ini").write_text(
            vassal_ini(own, f"uid = {tenant.name}", *extra).replace("disable-logging = true\n", "")
            + f"access-log = {logs / 'access.log'}\n")
        wait_for(lambda: answers(own), 30, "the vassal")
        wait_for(lambda: (logs / "access.log").exists() and (logs / "access.log").stat().st_size > 0, 10,
                 "the access log line")
        assert (logs / "access.log").stat().st_uid == tenant.uid
        (fleet.dir / "logger2.ini").unlink()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def test_a_tenants_own_app_file_never_runs_as_root(fleet, k, tenant):
    """A vassal that loads its app itself (`psgi`: on top of a base, or a
    plain vassal) with `uid`: the app is its tenant's file, in its
    tenant's directory, and its code runs as the tenant from its first
    line: the ids it sees while it loads are the tenant's (they were
    root's and root's groups: the tenant's code ran as root), and a
    root-only file is not opened."""
    own = Path(tempfile.mkdtemp(prefix="pf-tapp-"))
    try:
        os.chmod(own, 0o755)
        (own / "app.psgi").write_text(f"""
use JSON::PP ();
my %at_load = (uid => $<, euid => $>, gids => "$(", egids => "$)",
               secret => open(my $fh, '<', '{tenant.path("root-only")}') ? 'read' : "$!");
sub {{ [200, ['Content-Type' => 'application/json'], [JSON::PP::encode_json(\\%at_load)]] }};
""")
        for p in (own, own / "app.psgi"):
            os.chown(p, tenant.uid, tenant.gid)
        port = free_port()
        add(fleet, "ownapp", vassal_ini(port, f"uid = {tenant.name}", f"psgi = {own / 'app.psgi'}"), port)
        at_load = ask(port, "/")
        assert (at_load["uid"], at_load["euid"]) == (tenant.uid, tenant.uid), at_load
        for key in ("gids", "egids"):
            assert set(at_load[key].split()) == {str(tenant.gid), str(tenant.extra)}, at_load
        assert at_load["secret"] == "Permission denied", at_load
    finally:
        (fleet.dir / "ownapp.ini").unlink(missing_ok=True)
        shutil.rmtree(own, ignore_errors=True)


def test_a_tenant_symlink_in_its_logto_path_reaches_no_root_file(fleet, k, tenant):
    """`logto` is opened by the Emperor, as root: a tenant that owns the
    file's directory swaps the file for a symlink to a root-only file and
    waits for logrotate's reopen; its app's lines (any text: a shell
    command, for a root file that is a script) went there. Now it is opened
    with the tenant's rights, as its access log is: the reopen is refused
    and the root file is untouched."""
    if k != 0:
        pytest.skip("the Emperor's own: once is enough")
    logs = Path(tempfile.mkdtemp(prefix="pf-tlogs-"))
    try:
        os.chmod(logs, 0o755)
        os.chown(logs, tenant.uid, tenant.gid)
        port = free_port()
        (fleet.dir / "tolog.ini").write_text(
            vassal_ini(port, f"uid = {tenant.name}", "master = false", processes=1).replace(
                "disable-logging = true\n", "") + f"logto = {logs / 'app.log'}\n")
        wait_for(lambda: answers(port), 30, "the vassal")
        wait_for(lambda: "/ids" in (logs / "app.log").read_text(), 10, "its access line in its logto file")
        assert (logs / "app.log").stat().st_uid == tenant.uid  # made as the tenant
        victim = tenant.files / "root-only"
        before = victim.read_bytes()
        (logs / "app.log").unlink()
        (logs / "app.log").symlink_to(victim)
        os.lchown(logs / "app.log", tenant.uid, tenant.gid)
        os.kill(fleet.pid, signal.SIGUSR2)  # emperor reopen-logs, as logrotate's postrotate
        wait_for(lambda: fleet.lines(f"reopen-logs: {logs / 'app.log'}: Permission denied"), 10, "the refusal")
        ask(port, "/ids?after-the-reopen")
        wait_for(lambda: fleet.lines("reopen-logs: log files reopened"), 10, "the reopen")
        assert victim.read_bytes() == before
    finally:
        (fleet.dir / "tolog.ini").unlink(missing_ok=True)
        shutil.rmtree(logs, ignore_errors=True)


def test_a_user_in_roots_group_is_refused_without_an_explicit_gid(fleet, k, tenant):
    """initgroups of a user listed in group root would keep gid 0: refused
    unless the vassal file says gid = 0 itself."""
    name = f"{tenant.name}r"
    subprocess.run(["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", "-G", "root", name],
                   check=True)
    try:
        port = free_port()
        extra = [f"psgi = {tenant.app}"] if k is None else []
        (fleet.dir / "rooty.ini").write_text(vassal_ini(port, f"uid = {name}", *extra))
        want = f"error: uid {pwd.getpwnam(name).pw_uid} ({name}) is a member of group 0 (root): give gid"
        wait_for(lambda: [ln for ln in fleet.lines(want) if "[rooty]" in ln], 30, "the refusal")
        assert answers(port, 0.5) is None  # the Emperor may hold the socket: no answer
    finally:
        (fleet.dir / "rooty.ini").unlink(missing_ok=True)
        subprocess.run(["userdel", "-f", name], check=False)


def test_keep_fd_in_a_plain_vassal_is_refused(fleet, k):
    if k is not None:
        pytest.skip("adopted: tested above")
    (fleet.dir / "plainkeep.ini").write_text(vassal_ini(free_port(), f"psgi = {TENANT}", "keep-fd = 3"))
    wait_for(lambda: [ln for ln in fleet.lines("error: keep-fd: only a vassal adopted from a base keeps one")
                      if "[plainkeep]" in ln], 30, "the refusal")
    (fleet.dir / "plainkeep.ini").unlink()
