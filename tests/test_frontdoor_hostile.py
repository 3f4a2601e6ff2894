"""The front door against what could take it down: names nginx reads
specially, routes nginx refuses, stopped or crashing apps, what the app
answers passed through as it is, busy workers on kept connections."""

from __future__ import annotations

import http.client
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from psgi_forkserver.frontdoor import FrontDoor, FrontDoorOptions, Route

from support import EMPEROR, PROGRAM, free_port, wait_for
from support.front import answer, answers, fetch, ini, needs_nginx, status_of

HERE = Path(__file__).resolve().parent
DIES = HERE / "apps" / "dies.psgi"

needs_perl = pytest.mark.skipif(not PROGRAM.is_file(), reason="no vassal program")


# -- no vassal file can take the front door down ------------------------------------

#: names the vassal-file checker accepts that nginx reads specially or that
#: overflow its default hash buckets, and vassal names whose nginx
#: identifiers collide when made naively
HOSTILE_NAMES = {
    "kw-default": "default", "kw-include": "include", "kw-hostnames": "hostnames",
    "kw-volatile": "volatile", "long": "billing-dashboard.eu-central-1.staging.example.com",
    "longest": ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]),  # 253 characters
    "x-y": "xy-dash.localhost", "x_y_cc96fed8": "xy-underscore.localhost",
    "Case": "case-upper.localhost", "case": "case-lower.localhost",
}


@needs_nginx
@needs_perl
def test_no_name_the_checker_accepts_breaks_the_front_door(front):
    """Every name above is served by its own vassal, and each of them (and
    app1) answers through nginx: from the first start, and when they come
    later to a running front door."""
    files = {"app1": ini("app1", "domain = app1.localhost")}
    files.update({v: ini(v, f"domain = {d}") for v, d in HOSTILE_NAMES.items()})
    f = front(files)
    for vassal, name in HOSTILE_NAMES.items():
        f.routed(name, vassal)
    f.routed("app1.localhost", "app1")
    # the same names arriving at a running front door
    for vassal, name in HOSTILE_NAMES.items():
        os.unlink(f.dir / f"{vassal}.ini")
    wait_for(lambda: status_of(f.port, "default") == 404, 30, "names gone")
    for vassal, name in HOSTILE_NAMES.items():
        f.write(vassal, ini(vassal, f"domain = {name}"))
    for vassal, name in HOSTILE_NAMES.items():
        f.routed(name, vassal)
    f.routed("app1.localhost", "app1")
    assert not f.lines("[emerg]"), f.lines("[emerg]")


def http_json(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


@needs_nginx
def test_routes_nginx_refuses_are_found_refused_and_the_rest_installed(tmp_path: Path):
    """What nginx -t refuses never replaces the running configuration: the
    routes that broke it are found (bisecting over the changed ones), each
    refused with nginx's own message, the others installed. A TCP address
    by a name that no longer resolves is one such route."""
    lines: list[str] = []
    refused: dict[str, str] = {}
    front = FrontDoor(FrontDoorOptions(run_dir=tmp_path, listen=f"127.0.0.1:{free_port()}",
                                       batch=0, min_gap=0, settle=0), lines.append,
                      on_refused=lambda v, why: refused.__setitem__(v, why))
    front.next_start = float("inf")  # the configurations only: no nginx runs here

    def settle(t: float) -> None:
        for _ in range(200):
            front.poll(t)
            if front.check is None:
                return
            pid, status = os.waitpid(front.check.pid, 0)
            front.exited(pid, status, t, str)
        raise AssertionError("no end of checks")

    good = [Route(f"a{i}", (f"a{i}.localhost",), f"unix:/s/a{i}.sock") for i in range(6)]
    bad = [Route("gone1", ("gone1.localhost",), "no-such-host.invalid:80"),
           Route("gone2", ("gone2.localhost",), "also-gone.invalid:81")]
    front.update(good[:2], 1.0)
    settle(1.0)
    assert front.installed == tuple(good[:2]) and front.generation == 1 and not refused
    # installed, but no nginx serves it: /healthz says so
    assert front.health() == (False, "front door: nginx is not running")
    front.update(good + bad, 2.0)  # four good and two bad at once
    settle(2.0)
    assert set(refused) == {"gone1", "gone2"}, lines
    assert "host not found in upstream" in refused["gone1"] and "[emerg]" in refused["gone1"]
    assert front.installed == tuple(sorted(good))
    conf = front.conf_path.read_text()
    assert "a5.localhost" in conf and "gone1" not in conf
    assert front.state()["refused"].keys() == {"gone1", "gone2"}
    assert front.last_error is None
    # the same routes again: nothing to try; a changed one is tried again
    n = front.generation
    front.update(good + bad, 3.0)
    settle(3.0)
    assert front.generation == n
    fixed = Route("gone1", ("gone1.localhost",), "unix:/s/gone1.sock")
    front.update(good + [fixed, bad[1]], 4.0)
    settle(4.0)
    assert "gone1.localhost" in front.conf_path.read_text() and "gone1" not in front.refused
    # nginx itself refusing everything is no route's fault: nobody is blamed
    refused.clear()
    front.opts.nginx = str(tmp_path / "false-nginx")
    (tmp_path / "false-nginx").write_text("#!/bin/sh\necho 'nginx: [emerg] broken here' >&2\nexit 1\n")
    (tmp_path / "false-nginx").chmod(0o755)
    front.update(good[:3], 5.0)
    settle(5.0)
    assert refused == {} and front.last_error and "broken here" in front.last_error
    assert front.health()[0] is False


@needs_nginx
@needs_perl
def test_the_front_doors_state_in_status_json_metrics_and_healthz(front):
    import json

    status_port = free_port()
    f = front({"app1": ini("app1", "domain = app1.localhost")},
              "--status-http", f"127.0.0.1:{status_port}")
    f.routed("app1.localhost", "app1")
    f.write("app2", ini("app2", "domain = app2.localhost"))
    f.routed("app2.localhost", "app2")

    def front_state() -> dict:
        return json.loads(http_json(status_port, "/json")[1])["emperor"]["front"]

    wait_for(lambda: front_state()["generation"] >= 2, 30, "a reload once the routes are still")
    state = front_state()
    assert state["pid"] == f.nginx_pid() and state["generation"] >= 2
    assert state["serving_generation"] == state["generation"]
    assert state["last_error"] is None and state["last_reload"] > 0 and state["refused"] == {}
    assert http_json(status_port, "/healthz")[0] == 200
    metrics = http_json(status_port, "/metrics")[1]
    assert f"psgi_forkserver_front_generation {float(state['generation'])}" in metrics
    assert "psgi_forkserver_front_up 1.0" in metrics
    r = subprocess.run([EMPEROR, "status", "--dir", str(f.dir)], capture_output=True,
                       text=True, timeout=30)
    assert f"front door 127.0.0.1:{f.port}: nginx pid {f.nginx_pid()}, generation " \
           f"{state['generation']}" in r.stdout, r.stdout
    page = http_json(status_port, "/")[1]
    assert f"nginx pid {f.nginx_pid()}, generation {state['generation']}" in page


def timed_fetch(port: int, host: str, out: list, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    try:
        status, headers, _ = fetch(port, host, timeout=timeout)
        out.append((status, headers.get("retry-after"), time.monotonic() - t0))
    except OSError as e:
        out.append((repr(e), None, time.monotonic() - t0))


def concurrent_fetches(port: int, host: str, n: int) -> list:
    out: list = []
    threads = [threading.Thread(target=timed_fetch, args=(port, host, out)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@needs_nginx
@needs_perl
def test_a_stopped_or_crashing_app_answers_503_at_once_through_the_front_door(front):
    """Nobody accepts on a stopped vassal's socket, nor on a crashing one's
    between two attempts: 20 clients through nginx are answered 503 (with
    Retry-After when a retry can help), none waits in the backlog; the
    same on the vassal's own port."""
    own = free_port()
    f = front({"app1": ini("app1", "domain = app1.localhost", f"http-socket = 127.0.0.1:{own}"),
               "crash": ini("crash", "domain = crash.localhost", f"psgi = {DIES}"),
               "sleepy": ini("sleepy", "domain = sleepy.localhost", "on-demand = true",
                             f"psgi = {DIES}")}, "--backoff-first", "8", "--backoff-max", "8")
    f.routed("app1.localhost", "app1")
    r = subprocess.run([EMPEROR, "stop", "app1", "--dir", str(f.dir)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = concurrent_fetches(f.port, "app1.localhost", 20)
    assert [g[0] for g in got] == [503] * 20, got
    assert not [g for g in got if g[1]], got  # stopped: a retry does not help
    got = concurrent_fetches(own, "app1.localhost", 5)  # its own port: the same answer
    assert [g[0] for g in got] == [503] * 5, got
    # a crash loop between two attempts (8 s apart): 503 with Retry-After
    wait_for(lambda: f.lines("[crash] pid") and f.lines("respawn in"), 30, "crash throttled")
    got = concurrent_fetches(f.port, "crash.localhost", 20)
    assert all(g[0] == 503 and g[1] and int(g[1]) >= 1 for g in got), got
    # an on-demand app that cannot start: its first request is answered, not held
    wait_for(lambda: f.lines("[sleepy] on demand: waiting"), 30, "sleepy waiting")
    got = concurrent_fetches(f.port, "sleepy.localhost", 5)
    assert all(g[0] in (502, 503) for g in got), got
    print("answers (status, retry-after, seconds):", got)


def raw_request(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Bytes sent as they are on one connection; what came back until close."""
    import socket as so

    s = so.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    except ConnectionResetError:
        return out
    finally:
        s.close()


@needs_nginx
@needs_perl
def test_what_the_app_answers_is_what_the_client_gets(front):
    """A 5 KB response head passes; limit-post is the front door's
    client_max_body_size (a 2 MB POST is 413 every time, a small one
    passes); the Host the app sees is the name nginx routed by, never a
    Host header that disagrees; REMOTE_ADDR is the client's address over
    both routes, whatever X-Real-IP / X-Forwarded-For the client sent."""
    f = front({"app1": ini("app1", "domain = app1.localhost", "limit-post = 65536"),
               "app2": ini("app2", "domain = app2.localhost"),
               "legacy": ini("legacy", "domain = legacy.localhost", "socket = ./legacy.sock")})
    for name in ("app1", "app2", "legacy"):
        f.routed(f"{name}.localhost", name)
    # a response head of about 5 KB
    for host in ("app2.localhost", "legacy.localhost"):
        status, headers, body = fetch(f.port, host, "/cookies")
        assert status == 200, (host, status, headers)
    # limit-post: 413 at the front door, every time
    big = b"x" * (2 * 1024 * 1024)
    for _ in range(3):
        reply = raw_request(f.port, b"POST / HTTP/1.1\r\nHost: app1.localhost\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(big) + big)
        assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    reply = raw_request(f.port, b"POST / HTTP/1.1\r\nHost: app1.localhost\r\n"
                        b"Content-Length: 1000\r\nConnection: close\r\n\r\n" + b"y" * 1000)
    assert reply.startswith(b"HTTP/1.1 200 ") and b"posted=1000" in reply, reply[:300]
    # the routed name is the Host the app sees
    reply = raw_request(f.port, b"GET http://app2.localhost/reset HTTP/1.1\r\n"
                        b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    assert b"name=app2" in reply and b"host=app2.localhost " in reply, reply
    assert b"evil" not in reply
    reply = raw_request(f.port, b"GET http://legacy.localhost/ HTTP/1.1\r\n"
                        b"Host: evil.example\r\nConnection: close\r\n\r\n")
    assert b"name=legacy" in reply and b"host=legacy.localhost " in reply, reply
    assert b"evil" not in reply
    got = answer(f.port, "APP2.localhost")  # the same host, its port kept
    assert got["name"] == "app2" and got["host"] == f"APP2.localhost:{f.port}"
    # the client's address, not what it claims
    for host in ("app2.localhost", "legacy.localhost"):
        reply = raw_request(f.port, f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Real-IP: 6.6.6.6\r\n"
                            "X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n".encode())
        assert b" remote=127.0.0.1 " in reply, reply
        assert b"xff=6.6.6.6, 127.0.0.1 " in reply, reply  # the last one is nginx's


@needs_nginx
@needs_perl
def test_a_busy_worker_keeps_no_request_nginx_sends_on_a_kept_connection(front, tmp_path: Path):
    """nginx keeps idle connections to the vassal; a worker busy with a
    slow request leaves those it holds to its free sibling, so requests sent
    on them are answered while the slow one still runs."""
    gate = tmp_path / "gate"
    gate.mkdir()
    gate.chmod(0o777)
    f = front({"fair": ini("fair", "domain = fair.localhost", f"env = GATE_DIR={gate}",
                           processes=2)})
    f.routed("fair.localhost", "fair")

    def burst(n: int, timeout: float) -> list:
        out: list = []
        threads = [threading.Thread(target=timed_fetch, args=(f.port, "fair.localhost", out, timeout))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # nginx opens and then keeps connections to both workers
    assert all(r[0] == 200 for r in burst(16, 20)), "warm-up"
    slow: list = []
    slow_thread = threading.Thread(target=lambda: slow.append(fetch(f.port, "fair.localhost", "/block", 90)))
    slow_thread.start()
    try:
        wait_for(lambda: (gate / "started").exists(), 30, "the slow request to start")
        for _ in range(3):
            results = burst(16, 15)
            assert [r[0] for r in results] == [200] * 16, results
        assert not (gate / "go").exists() and not slow, "answered while the slow request still ran"
    finally:
        (gate / "go").touch()
        slow_thread.join(90)
    assert slow and slow[0][0] == 200


@needs_nginx
@needs_perl
def test_a_name_that_changes_hands_is_routed_to_its_new_vassal_at_once(front):
    """The host links serve a name nginx has never seen; a name the running
    configuration routes elsewhere (moved from a live vassal, or under a
    wildcard another vassal serves) must not wait for the settle time: the
    old vassal would answer for the new one meanwhile."""
    f = front({"old": ini("old", "domain = moving.localhost", "domain = old.localhost"),
               "wild": ini("wild", "domain = *.w.localhost")}, "--http-settle", "120")
    f.routed("moving.localhost", "old")
    f.routed("x.w.localhost", "wild")
    f.write("old", ini("old", "domain = old.localhost"))
    f.write("new", ini("new", "domain = moving.localhost"))
    wait_for(lambda: answers(f.port, "moving.localhost", "new"), 20, "moving -> new")
    f.write("exact", ini("exact", "domain = x.w.localhost"))
    wait_for(lambda: answers(f.port, "x.w.localhost", "exact"), 20, "x.w -> exact")
    assert answers(f.port, "y.w.localhost", "wild") and answers(f.port, "old.localhost", "old")
    # a vassal that lets a name go (its socket stays) no longer answers it
    f.write("old", ini("old", "domain = renamed.localhost"))
    wait_for(lambda: answers(f.port, "renamed.localhost", "old"), 20, "renamed -> old")
    wait_for(lambda: status_of(f.port, "old.localhost") == 404, 20, "old.localhost let go")


@needs_nginx
@needs_perl
def test_stopping_or_crashing_vassals_reload_nothing(front):
    """Whether a vassal answers right now is not part of the routing: a
    stop, a start and a crash loop leave nginx's generation as it was."""
    import json

    status_port = free_port()
    f = front({"app1": ini("app1", "domain = app1.localhost"),
               "crash": ini("crash", "domain = crash.localhost", f"psgi = {DIES}")},
              "--status-http", f"127.0.0.1:{status_port}", "--http-settle", "0.5",
              "--backoff-first", "0.5", "--backoff-max", "1")
    f.routed("app1.localhost", "app1")

    def front_state() -> dict:
        return json.loads(http_json(status_port, "/json")[1])["emperor"]["front"]

    wait_for(lambda: front_state()["serving_generation"] == front_state()["generation"], 30,
             "nginx serving its configuration")
    before = front_state()
    for cmd in ("stop", "start", "stop"):
        r = subprocess.run([EMPEROR, cmd, "app1", "--dir", str(f.dir)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: status_of(f.port, "app1.localhost") == (503 if cmd == "stop" else 200),
                 30, f"app1 after {cmd}")
    # the crash loop is the clock: six attempts are many times the settle time
    wait_for(lambda: len(f.lines("respawn in")) >= 6, 60, "six crashes")
    after = front_state()
    assert (after["generation"], after["reloads"]) == (before["generation"], before["reloads"]), \
        (before, after)
