"""What one tenant's app can take from the others: processes (limit-nproc),
the Emperor's log relay, and successors asked for in a loop. Real users
made with useradd, a real Emperor as root, a real hostile app
(tests/apps/greedy.psgi)."""

from __future__ import annotations

import urllib.request

import pytest

from support import APPS, Emperors, free_port, wait_for
from support.hostile import emperor_ok
from support.tenants import ARGS, NEEDS_TENANTS, tenant_user, vassal_ini

pytestmark = NEEDS_TENANTS

GREEDY = APPS / "greedy.psgi"


def call(port: int, path: str, timeout: float = 20) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return dict(kv.split("=", 1) for kv in r.read().decode().split())


def answers(port: int) -> dict[str, str] | None:
    try:
        return call(port, "/", timeout=5)
    except OSError:
        return None


@pytest.fixture(scope="module")
def tenants():
    with tenant_user("a") as a, tenant_user("b") as b:
        yield a, b


@pytest.fixture(scope="module")
def fleet(xprocess, tenants):
    """An Emperor as root whose base preloads the hostile app."""
    emperors = Emperors(xprocess, "pf-lim-", args=ARGS, app=GREEDY)
    try:
        yield emperors({})
    finally:
        emperors.stop()


def add(e, name: str, port: int, *lines: str, processes: int = 1) -> None:
    e.write(name, vassal_ini(port, f"env = APP_NAME={name}", *lines, processes=processes))
    wait_for(lambda: answers(port), 30, f"{name} to answer")


def max_processes(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return next(line.split()[2:4] for line in f if line.startswith("Max processes"))


# -- processes ---------------------------------------------------------------


def test_a_fork_bomb_is_held_to_its_tenants_limit_and_the_others_still_fork(fleet, tenants):
    """A tenant's app forks until fork fails: with `limit-nproc = 12` it
    gets fewer than 12 processes (its master and worker count), and while
    it holds them another tenant's vassal is adopted and forks its workers,
    and the Emperor answers."""
    a, b = tenants
    bomb, other = free_port(), free_port()
    add(fleet, "bomb", bomb, f"uid = {a.name}", "limit-nproc = 12")
    try:
        got = call(bomb, "/fork?max=60")
        assert int(got["forked"]) <= 10, got
        assert got["stopped"] == "Resource_temporarily_unavailable", got
        # every one of them is the tenant's: the same limit holds in each
        assert max_processes(int(got["pid"])) == ["12", "12"]
        add(fleet, "other", other, f"uid = {b.name}", processes=2)
        assert call(other, "/")["name"] == "other"
        assert fleet.vassal("other")["state"] == "loyal", fleet.vassal("other")
        emperor_ok(fleet)
    finally:
        call(bomb, "/release")


def test_a_uid_vassal_has_a_process_limit_by_default(fleet, tenants):
    """Without `limit-nproc`, a vassal with `uid` runs under 1024; one
    without `uid` (root's, which the kernel does not hold to it) is left
    as it was; `limit-nproc = 0` sets none."""
    a, b = tenants
    dflt, none = free_port(), free_port()
    add(fleet, "dflt", dflt, f"uid = {a.name}")
    add(fleet, "none", none, f"uid = {b.name}", "limit-nproc = 0")
    with open("/proc/self/limits") as f:
        ours = next(line.split()[2:4] for line in f if line.startswith("Max processes"))
    assert max_processes(int(call(dflt, "/")["pid"])) == ["1024", "1024"]
    assert max_processes(int(call(none, "/")["pid"])) == ours
