"""What one tenant's app can take from the others: processes (limit-nproc),
the Emperor's log relay, and successors asked for in a loop. Real users
made with useradd, a real Emperor as root, a real hostile app
(tests/apps/greedy.psgi)."""

from __future__ import annotations

import re
import threading
import time
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
        wait_for(lambda: fleet.vassal("other")["state"] == "loyal", 20, "the other tenant's vassal to be loyal")
        emperor_ok(fleet)
    finally:
        call(bomb, "/release")


def test_a_uid_vassal_has_a_process_limit_by_default(fleet, tenants):
    """Without `limit-nproc`, a vassal with `uid` runs under a quarter of
    the machine's process slots (pid_max, threads-max: a big fleet under one
    uid fits); `limit-nproc = 0` sets none."""
    a, b = tenants
    dflt, none = free_port(), free_port()
    add(fleet, "dflt", dflt, f"uid = {a.name}")
    add(fleet, "none", none, f"uid = {b.name}", "limit-nproc = 0")
    with open("/proc/self/limits") as f:
        ours = next(line.split()[2:4] for line in f if line.startswith("Max processes"))
    slots = min(int(open(f"/proc/sys/kernel/{k}").read()) for k in ("pid_max", "threads-max"))
    assert max_processes(int(call(dflt, "/")["pid"])) == [str(slots // 4)] * 2
    assert max_processes(int(call(none, "/")["pid"])) == ours


# -- the log relay -------------------------------------------------------------


def test_a_flood_of_output_is_cut_to_its_limit_and_said_while_the_others_are_relayed(fleet, tenants):
    """A tenant's app writes 200,000 lines (20 MB) as fast as it can with
    `log-lines-per-second = 200`: about 200 a second reach the log (and
    two seconds' worth of burst), the rest are dropped and said in lines of
    their own, every one of them counted; meanwhile another vassal's line
    is in the log within seconds."""
    a, b = tenants
    flood, calm = free_port(), free_port()
    add(fleet, "flood", flood, f"uid = {a.name}", "log-lines-per-second = 200")
    add(fleet, "calm", calm, f"uid = {b.name}")
    done: list[float] = []
    started = time.monotonic()
    writer = threading.Thread(target=lambda: (call(flood, "/flood?lines=200000", timeout=120),
                                              done.append(time.monotonic())))
    writer.start()
    try:
        wait_for(lambda: fleet.lines("[flood] 00000001 "), 30, "the flood's first line")
        for i in range(3):
            call(calm, f"/say?word=calm-{i}")
            wait_for(lambda i=i: fleet.lines(f"[calm] said calm-{i}"), 5, f"calm's line {i} in the log")
    finally:
        writer.join(150)
    assert done, "the flood did not end"
    took = done[0] - started

    def counted() -> tuple[int, int]:
        said = [re.search(r"\[flood\] log limit: (\d+) lines \((\d+) bytes\) of its output dropped", line)
                for line in fleet.lines("[flood] log limit: ")]
        return sum(int(m.group(1)) for m in said if m), len(said)

    def relayed() -> int:
        return len(re.findall(r"\[flood\] \d{8} x", fleet.text()))

    # the last drops are said a second after the one before
    wait_for(lambda: relayed() + counted()[0] == 200000, 10, "every line relayed or said dropped")
    relayed, (dropped, reports) = relayed(), counted()
    assert relayed <= 200 * (took + 2) + 200, (relayed, took)
    assert reports <= took + 3, (reports, took)  # the first at once, then one a second, the last
    emperor_ok(fleet)


def test_a_vassal_without_uid_is_not_held_to_the_log_limits_by_default(fleet):
    """The log limits' defaults are a tenant's: a vassal that runs as the
    Emperor's own user (a busy access log on stderr, say) has every line
    relayed, 30,000 at once, and no drop said."""
    port = free_port()
    add(fleet, "trusted", port)
    call(port, "/flood?lines=30000", timeout=120)
    wait_for(lambda: fleet.lines("[trusted] 00030000 "), 60, "the flood's last line")
    assert len(re.findall(r"\[trusted\] \d{8} x", fleet.text())) == 30000
    assert not fleet.lines("[trusted] log limit: ")


# -- successors asked for in a loop ------------------------------------------


def test_byte_22_after_every_request_gets_the_crash_loop_back_off(fleet, tenants):
    """A `master = false` tenant asks for its replacement (byte 22) after
    every request, for 4 s of requests without pause: its successors come
    with the crash-loop back-off (0.2 s doubling to 1 s here), not one per
    request; the throttling is said with the first of them, and another
    vassal answers all along."""
    a, b = tenants
    solo, calm = free_port(), free_port()
    add(fleet, "again", solo, f"uid = {a.name}", "master = false")
    add(fleet, "steady", calm, f"uid = {b.name}", processes=1)
    before = len(fleet.lines("[again] adopted successor pid"))
    end = time.monotonic() + 4
    asked = 0
    while time.monotonic() < end:
        if call(solo, "/again", timeout=10):
            asked += 1
        assert call(calm, "/")["name"] == "steady"
    successors = len(fleet.lines("[again] adopted successor pid")) - before
    assert asked >= 12, asked  # it asked many times (more than 8 successors would be, without the back-off)
    assert 1 <= successors <= 8, (successors, asked)
    assert fleet.lines("its successor starts in"), fleet.text()[-3000:]
    emperor_ok(fleet)
