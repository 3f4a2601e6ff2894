"""`master = false`: a vassal whose one process serves, with a real Emperor,
real adoptions and real requests. One fleet for the module: a vassal with
max-requests, harakiri and heartbeat, and a file that asks for two processes
without a master (a config error). The Emperor's death is its own fleet."""

from __future__ import annotations

import http.client
import os
import pwd
import signal
import subprocess
import threading
import time

import psutil
import pytest

from psgi_forkserver.config.ini import ConfigError
from psgi_forkserver.config.options import judge_options
from psgi_forkserver.emperor.vassal import Adopt, Phase, Policy, Send, Vassal
from psgi_forkserver.protocol import EmperorByte
from support.apps import APPS, get
from support.emperors import EMPEROR, Emperors
from support.processes import free_port, pid_alive, wait_for
from support.vassals import POLICY, cfg, ctx

SOLO_APP = APPS / "solo.psgi"
SAYS_DONE = APPS / "says_done.psgi"
NOBODY = pwd.getpwnam("nobody")
MAX_REQUESTS = 5


def solo_ini(name: str, port: int, *lines: str) -> str:
    return "".join(f"{line}\n" for line in (
        "[uwsgi]", f"http-socket = 127.0.0.1:{port}", "master = false", f"env = APP_NAME={name}",
        "disable-logging = true", *lines))


@pytest.fixture(scope="module")
def fleet(xprocess):
    emperors = Emperors(xprocess, "pfs-solo-", app=SOLO_APP)
    port, nobody_port, alias_port = free_port(), free_port(), free_port()
    done_ports = {"done-solo": free_port(), "done-master": free_port()}
    alias_ini = solo_ini("alias", 0, f"max-requests = {MAX_REQUESTS}").replace(
        "http-socket = 127.0.0.1:0", f"uwsgi-socket = 127.0.0.1:{alias_port}")
    e = emperors({
        "solo": solo_ini("solo", port, f"max-requests = {MAX_REQUESTS}", "harakiri = 1", "heartbeat = 6"),
        "plural": solo_ini("plural", free_port(), "processes = 2"),
        "nobody": solo_ini("nobody", nobody_port, "uid = nobody", f"gid = {NOBODY.pw_gid}"),
        "alias": alias_ini,
        # each app says byte 22 as it loads
        "done-solo": solo_ini("done-solo", done_ports["done-solo"], f"psgi = {SAYS_DONE}"),
        "done-master": solo_ini("done-master", done_ports["done-master"], f"psgi = {SAYS_DONE}").replace(
            "master = false", "master = true"),
    }, wait=[port, nobody_port, *done_ports.values()])
    e.ports.update(done_ports)
    e.ports["alias"] = alias_port
    e.ports["solo"] = port
    e.ports["nobody"] = nobody_port
    try:
        yield e
    finally:
        emperors.stop()


def answer(port: int) -> dict[str, str]:
    return get(port, timeout=10)


def request_cut_short(port: int, path: str) -> float:
    """GET `path`, which the process does not live to answer: the seconds
    until the connection ended."""
    t0 = time.monotonic()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        c.request("GET", path)
        with pytest.raises((OSError, http.client.HTTPException)):
            c.getresponse().read()
    finally:
        c.close()
    return time.monotonic() - t0


def solo_state(fleet) -> dict:
    return fleet.vassal("solo")


def test_the_vassal_is_one_process_that_serves(fleet):
    got = answer(fleet.ports["solo"])
    pid = int(got["pid"])
    assert got["name"] == "solo"
    v = solo_state(fleet)
    assert v["pid"] == pid  # the process the Emperor knows answers itself
    assert psutil.Process(pid).children() == []
    assert v["processes"] == 1
    assert " ".join(psutil.Process(pid).cmdline()) == "psgi-vassal solo"  # no "worker N"
    fleet.heartbeats_seen(["solo"])


def test_a_vassal_that_drops_root_serves_as_its_user_and_its_requests_are_counted(fleet):
    pid = int(answer(fleet.ports["nobody"])["pid"])
    assert psutil.Process(pid).uids().real == NOBODY.pw_uid
    assert psutil.Process(pid).children() == []
    # the fixture's and this one: both counted (the count is the process's own)
    before = wait_for(lambda: (n := fleet.vassal("nobody")["requests"]) >= 2 and n, 20, "its requests counted")
    answer(fleet.ports["nobody"])
    wait_for(lambda: fleet.vassal("nobody")["requests"] == before + 1, 20, "one more request counted")


def test_processes_above_one_without_a_master_is_a_config_error(fleet):
    v = wait_for(lambda: (v := fleet.vassal("plural"))["state"] == "config-error" and v, 20,
                 "plural to be a config error")
    assert "processes = 2 with master = false" in v["error"], v["error"]
    assert v["pid"] is None


def test_max_requests_replaces_the_process_without_a_refusal_or_a_throttle(fleet):
    """Two clients without pause, each request on a new connection: every
    answer is a 200, the processes change every MAX_REQUESTS requests, and
    the Emperor counts no failure."""
    port = fleet.ports["solo"]
    before = solo_state(fleet)
    pids: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(40):
            try:
                pid = answer(port)["pid"]
                with lock:
                    pids.append(pid)
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    failed.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    assert failed == []
    assert len(pids) == 80
    counts = {p: pids.count(p) for p in set(pids)}
    assert len(counts) >= 2, counts
    # each process asked after its max-requests and served on until its
    # successor accepted: none but the first (it served before) and the
    # last was replaced early
    for pid in set(pids) - {pids[0], pids[-1]}:
        assert counts[pid] >= MAX_REQUESTS, counts
    v = wait_for(lambda: (v := solo_state(fleet))["state"] == "loyal" and v, 20, "solo loyal")
    assert v["failures"] == 0 and v["restarts"] == before["restarts"], v
    assert v["generation"] >= before["generation"] + len(counts) - 1
    assert not [line for line in fleet.lines("[solo]") if "died" in line or "throttled" in line]
    assert fleet.lines("[solo] asked to be replaced")


def test_a_process_that_asked_after_max_requests_serves_until_its_successor_accepts(fleet):
    """Requests one after the other, as fast as they come: processes born
    less than a second before they ask wait out a back-off before their
    successor starts (0.2 s for the second in a row here). The asking
    process goes on serving meanwhile, so some process serves more than
    its max-requests, and no request waits for an empty socket."""
    port = fleet.ports["solo"]
    before = solo_state(fleet)
    pids = [answer(port)["pid"] for _ in range(6 * MAX_REQUESTS)]
    counts = {p: pids.count(p) for p in set(pids)}
    assert max(counts.values()) > MAX_REQUESTS, counts
    v = wait_for(lambda: (v := solo_state(fleet))["state"] == "loyal" and v, 20, "solo loyal")
    assert v["failures"] == 0 and v["restarts"] == before["restarts"], v
    # the Emperor stopped each one that asked, once its successor accepted
    wait_for(lambda: not any(pid_alive(int(p)) for p in counts if int(p) != v["pid"]), 20,
             "the processes that asked to be gone")


def test_a_reload_asked_by_sighup_is_a_new_process(fleet):
    port = fleet.ports["solo"]
    old = int(answer(port)["pid"])
    os.kill(old, signal.SIGHUP)
    wait_for(lambda: not pid_alive(old), 20, "the old process to stop")
    new = int(answer(port)["pid"])
    assert new != old
    # the Emperor logs the reap after its waitpid: the pid can be gone first
    wait_for(lambda: fleet.lines(f"old pid {old} stopped (exit status 0)"), 10, "the old pid's stop logged")
    assert solo_state(fleet)["failures"] == 0


def test_emperor_reload_starts_a_successor_before_the_old_process_stops(fleet):
    port = fleet.ports["solo"]
    old = int(answer(port)["pid"])
    before = solo_state(fleet)["operator_reloads"]
    r = subprocess.run([EMPEROR, "reload", "--stats", str(fleet.stats), "solo"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not pid_alive(old), 20, "the old process to stop")
    assert int(answer(port)["pid"]) != old
    v = solo_state(fleet)
    assert v["operator_reloads"] == before + 1 and v["failures"] == 0, v
    wait_for(lambda: fleet.lines(f"old pid {old} stopped (exit status 0)"), 10, "the old pid's stop logged")


def test_harakiri_ends_the_process_and_the_emperor_starts_another(fleet):
    port = fleet.ports["solo"]
    old = int(answer(port)["pid"])
    assert request_cut_short(port, "/sleep?8") < 7  # ended by harakiri (1 s), not by the app's 8 s
    wait_for(lambda: fleet.lines(f"harakiri: worker 1 (pid {old}) stuck more than 1s"), 20, "the harakiri line")
    wait_for(lambda: fleet.lines(f"pid {old} died (exit status 86)"), 20, "the Emperor to see it die")
    got = wait_for(lambda: answer(port), 20, "a new process to answer")
    assert int(got["pid"]) != old


def test_a_process_stuck_where_its_harakiri_handler_cannot_run_is_killed_and_logged_so(fleet):
    port = fleet.ports["solo"]
    old = int(answer(port)["pid"])
    assert request_cut_short(port, "/stuck") < 8  # its timer, 1 + 1 s, not the app's 10 s
    line = wait_for(lambda: fleet.lines(f"pid {old} died"), 20, "the Emperor to see it die")[0]
    assert "killed by SIGKILL" in line and "harakiri = 1 without a master" in line, line
    got = wait_for(lambda: answer(port), 20, "a new process to answer")
    assert int(got["pid"]) != old


def test_the_process_does_not_outlive_its_emperor(xprocess):
    emperors = Emperors(xprocess, "pfs-solo-gone-", app=SOLO_APP)
    port = free_port()
    try:
        e = emperors({"alone": solo_ini("alone", port)}, wait=[port])
        pid = int(answer(port)["pid"])
        assert pid == e.vpid("alone")
        left = [p for p in psutil.Process(e.pid).children(recursive=True)]
        os.kill(e.pid, signal.SIGKILL)
        e.popen.wait(10)
        wait_for(lambda: not pid_alive(pid), 15, "the vassal to exit after its Emperor's death")
        wait_for(lambda: not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                 20, "the base and its spares to exit too")
    finally:
        emperors.stop()


# -- the Emperor's side, as a state machine (no processes) ---------------------


def solo_vassal(owns_socket: bool = True) -> Vassal:
    v = Vassal("app1", cfg(master="false"), policy=POLICY, owns_socket=owns_socket)
    assert v.step(ctx(0)) == [Adopt()]
    v.adopted(100, 0.01)
    v.on_byte(17, 0.1)
    return v


def test_byte_22_of_a_solo_vassal_asks_for_a_successor_not_a_stop():
    v = solo_vassal()
    assert v.on_byte(22, 1.0) == "asked to be replaced"
    acts = v.step(ctx(1.0))
    assert acts == [Adopt()] and v.successor is not None and v.successor.reason == "replacement asked"
    v.adopted(200, 1.01, seq=acts[0].seq)
    v.on_byte(17, 1.02, seq=acts[0].seq)
    assert v.step(ctx(1.03)) == [Send(EmperorByte.STOP)]  # the old one, now that the new one accepts
    assert v.exited(0, 1.1, pid=100) == "retired"
    assert (v.pid, v.failures, v.restarts, v.phase) == (200, 0, 0, Phase.LOYAL)


def test_a_successor_that_asks_before_its_promotion_is_replaced_once_promoted():
    """It served its max-requests before the Emperor promoted it: the byte
    is kept, not dropped (the process would wait for a stop forever)."""
    v = solo_vassal()
    v.on_byte(22, 1.0)
    seq = v.step(ctx(1.0))[0].seq
    v.adopted(200, 1.01, seq=seq)
    v.on_byte(17, 1.02, seq=seq)
    assert v.on_byte(22, 1.02, seq=seq).startswith(
        "successor asked to be replaced 0.0 s after its start (2 in a row before 1 s): its successor starts in")
    assert v.step(ctx(1.03)) == [Send(EmperorByte.STOP)]
    # the second in a row from a young process: the crash-loop back-off (0.2 s from its start)
    assert v.step(ctx(1.04)) == [] and v.next_wakeup() <= 1.22
    acts = v.step(ctx(1.22))
    assert acts == [Adopt()] and v.pid == 200 and v.successor.reason == "replacement asked"


def replaced_after_asking(v: Vassal, t: float) -> tuple[float, float]:
    """Byte 22 from the current process at `t`; the loop's steps until its
    successor is adopted, then promoted and the asker retired: (how long the
    successor waited, rounded, and the time it started)."""
    v.on_byte(22, t)
    asked = t
    while not (acts := v.step(ctx(t))):
        t = v.next_wakeup()
    seq = acts[0].seq
    v.adopted(300 + seq, t, seq=seq)
    v.on_byte(17, t, seq=seq)
    v.step(ctx(t))
    v.exited(0, t, pid=v.retiring[0].pid)
    return round(t - asked, 2), t


def test_replacements_asked_young_wait_longer_each_time_until_one_lived_long():
    """Byte 22 from processes younger than a second counts as a crash
    does: 0.2, 0.4, 0.8 s... from the asking process's start; one that
    lived a second is replaced at once and starts the count again (a busy
    vassal recycled by max-requests every few seconds never waits)."""
    v = solo_vassal()
    t, waits = 1.0, []
    for _ in range(4):
        wait, t = replaced_after_asking(v, t)
        waits.append(wait)
    assert waits == [0.0, 0.2, 0.4, 0.8], waits
    assert v.on_byte(22, t + 1.5) == "asked to be replaced" and v.quick_replacements == 0
    assert v.step(ctx(t + 1.5)) == [Adopt()]


def test_a_vassal_recycled_by_max_requests_many_times_a_second_waits_a_second_at_most():
    """A busy `master = false` vassal whose max-requests is served in 50 ms
    asks for its replacement young, again and again (it serves on
    meanwhile): with the default back-off (1 s doubling to 180 s) its
    successors still start within a second of the asking process's start,
    so no process serves far past its max-requests; a hostile app asking after
    every request still gets one adoption a second at most."""
    v = Vassal("busy", cfg(master="false"), policy=Policy(), owns_socket=True)
    assert v.step(ctx(0)) == [Adopt()]
    v.adopted(100, 0.01)
    v.on_byte(17, 0.01)
    t, waits = 0.05, []
    for _ in range(10):
        wait, t = replaced_after_asking(v, t)
        waits.append(wait)
        t += 0.05
    assert max(waits) <= 1.0, waits
    assert min(waits[1:]) >= 0.9, waits  # one adoption a second, not one a request


def test_without_the_socket_byte_22_stops_and_starts_again_without_a_backoff():
    v = solo_vassal(owns_socket=False)
    v.on_byte(22, 1.0)
    assert v.step(ctx(1.0)) == [Send(EmperorByte.STOP)]
    assert v.exited(0, 1.1, pid=100) == "stopped"
    assert v.step(ctx(1.1)) == [Adopt()] and v.failures == 0


def test_byte_22_of_a_vassal_with_a_master_still_stops_it():
    v = Vassal("app1", cfg(), policy=POLICY, owns_socket=True)
    v.step(ctx(0))
    v.adopted(100, 0.01)
    v.on_byte(17, 0.1)
    assert v.on_byte(22, 1.0) == "asked to be stopped"
    assert v.step(ctx(1.0)) == [Send(EmperorByte.STOP)]


@pytest.mark.parametrize("lines, error", [
    (["master = false", "processes = 3"], "line 3: processes = 3 with master = false (line 2)"),
    (["workers = 2", "master = 0"], "line 2: processes = 2 with master = false (line 3)"),
    (["fork-server = fs.sock", "master = false"], "line 3: master = false in a base vassal"),
])
def test_what_master_false_cannot_be_is_one_config_error_line(lines, error):
    entries = [(i, *line.split(" = ")) for i, line in enumerate(lines, start=2)]
    with pytest.raises(ConfigError) as e:
        judge_options(entries, True)
    assert str(e.value).startswith(error), str(e.value)


def uwsgi_get(port: int) -> bytes:
    """GET / over the uwsgi protocol: the answer's status line."""
    import socket
    import struct

    env = {"REQUEST_METHOD": "GET", "REQUEST_URI": "/", "PATH_INFO": "/", "QUERY_STRING": "",
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "x", "SERVER_PORT": "80", "HTTP_HOST": "x"}
    body = b"".join(struct.pack("<H", len(k)) + k.encode() + struct.pack("<H", len(v)) + v.encode()
                    for k, v in env.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack("<BHB", 0, len(body), 0) + body)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got.split(b"\r\n", 1)[0]


def test_uwsgi_socket_is_bound_by_the_emperor_as_socket_is(fleet):
    """`uwsgi-socket` is `socket` by another name: the Emperor binds it too,
    so the process's replacements after max-requests refuse nothing."""
    port = fleet.ports["alias"]
    wait_for(lambda: fleet.vassal("alias")["state"] == "loyal", 20, "alias loyal")
    assert [c for c in psutil.Process(fleet.pid).net_connections()
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    answers = [uwsgi_get(port) for _ in range(3 * MAX_REQUESTS)]
    assert answers == [b"HTTP/1.1 200 OK"] * (3 * MAX_REQUESTS)


def test_byte_22_from_an_app_that_has_not_served_yet_restarts_nothing(fleet):
    """Byte 22 on the Emperor pipe before the process is loyal is its app's,
    as it loads (our server says it only after serving: max-requests, a
    reload, idle): a stop or a replacement for it would start a new process
    that says it again, a loop no back-off slows."""
    for name in ("done-solo", "done-master"):
        pid = int(answer(fleet.ports[name])["pid"])
        deadline = time.monotonic() + 3  # a loop restarted it ~20 times a second
        while time.monotonic() < deadline:
            assert int(answer(fleet.ports[name])["pid"]) == pid, name
            time.sleep(0.1)
        assert fleet.vassal(name)["restarts"] == 0, name
        assert not fleet.lines(f"[{name}] asked to be"), name
