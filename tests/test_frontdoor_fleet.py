"""The front door with a real Emperor: routing by Host name through a real
nginx to real Perl vassals on UNIX sockets (and TCP ones), under load and
while apps come and go; bring-your-own nginx."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import frontdoor as fd

from support import (
    EMPEROR, PROGRAM, alive, base_ini, descendants, free_port, start_emperor, stop_emperor, wait_for,
)
from support.front import NGINX, answer, answers, fetch, ini, needs_nginx, status_of

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "front.psgi"
DIES = HERE / "apps" / "dies.psgi"

needs_perl = pytest.mark.skipif(not PROGRAM.is_file(), reason="no vassal program")


# -- a real Emperor with the front door ------------------------------------------------


@needs_nginx
@needs_perl
def test_apps_answer_by_name_through_nginx(front):
    tcp = free_port()
    f = front({
        "app1": ini("app1", "domain = app1.localhost"),
        "shop": ini("shop", "domain = *.shop.localhost", f"http-socket = 127.0.0.1:{tcp}"),
        "sock": ini("sock", "domain = sock.localhost", "http-socket = own.sock"),
    })
    f.routed("app1.localhost", "app1")
    # curl resolves *.localhost to loopback: the README's first command works as written
    out = subprocess.run(["curl", "-s", f"http://app1.localhost:{f.port}/"],
                         capture_output=True, text=True, timeout=30).stdout
    assert "name=app1" in out
    f.routed("x.shop.localhost", "shop")
    assert answer(f.port, "deep.er.shop.localhost")["name"] == "shop"
    assert answer(tcp, "anything")["name"] == "shop"  # its own port still serves
    f.routed("sock.localhost", "sock")
    got = answer(f.port, "app1.localhost")
    assert got["xff"] == "127.0.0.1" and got["xproto"] == "http"
    assert got["xhost"] == got["host"] == f"app1.localhost:{f.port}"
    status, headers, body = fetch(f.port, "nobody.localhost")
    assert status == 404 and "no app is served as nobody.localhost" in body
    assert fetch(f.port, "shop.localhost")[0] == 404  # *.shop is not shop itself
    # the sockets: in the run directory, mode 0660; a chosen path where chosen
    s = f.run / "sockets" / "app1.sock"
    assert stat.S_ISSOCK(s.stat().st_mode) and stat.S_IMODE(s.stat().st_mode) == 0o660
    assert stat.S_ISSOCK((f.dir / "own.sock").stat().st_mode)
    assert not (f.run / "sockets" / "shop.sock").exists()
    # nginx is the Emperor's child; its log lines are the Emperor's, prefixed
    ng = psutil.Process(f.nginx_pid())
    assert ng.ppid() == f.pid and "nginx" in ng.name()
    if os.geteuid() == 0:  # its workers run as www-data, to whose group the sockets are given
        import grp
        import pwd
        assert {w.username() for w in ng.children()} == {"www-data"}
        assert s.stat().st_gid == grp.getgrnam("www-data").gr_gid
        assert s.stat().st_uid == 0  # the vassal's (it runs as root here)
        assert pwd.getpwnam("www-data")
    wait_for(lambda: f.lines('[front] nobody.localhost 127.0.0.1 "GET / HTTP/1.1" 404'), 15,
             "the access log line")
    assert not list((f.run / "nginx").glob(".*.tmp"))


@needs_nginx
@needs_perl
def test_names_follow_the_files_and_a_taken_name_is_a_config_error(front):
    f = front({"app1": ini("app1", "domain = app1.localhost")})
    f.routed("app1.localhost", "app1")
    assert status_of(f.port, "app2.localhost") == 404
    f.write("app2", ini("app2", "domain = app2.localhost"))
    f.routed("app2.localhost", "app2")
    # a second vassal claiming app1's name is refused, naming the first
    f.write("dup", ini("dup", "domain = other.localhost", "domain = app1.localhost"))
    wait_for(lambda: f.lines("[dup] bad config"), 15, "dup refused")
    line = f.lines("[dup] bad config")[-1]
    assert "dup.ini:7: domain app1.localhost is already served by vassal app1 (app1.ini)" in line
    assert answer(f.port, "app1.localhost")["name"] == "app1"
    assert status_of(f.port, "other.localhost") == 404  # none of dup's names is served
    # app1 lets go of the name: dup gets it
    os.unlink(f.dir / "app1.ini")
    f.routed("app1.localhost", "dup")
    assert answer(f.port, "other.localhost")["name"] == "dup"
    os.unlink(f.dir / "app2.ini")
    wait_for(lambda: status_of(f.port, "app2.localhost") == 404, 30, "a removed file's name 404")
    wait_for(f.settled, 30, "nginx's old workers to leave")
    assert not (f.run / "sockets" / "app2.sock").exists()
    reloads = len(f.lines("nginx pid") ) - 1
    assert reloads >= 1


@needs_nginx
@needs_perl
def test_a_vassal_that_cannot_start_is_503_with_retry_after(front):
    f = front({"app1": ini("app1", "domain = app1.localhost"),
               "bad": ini("bad", "domain = bad.localhost", f"psgi = {DIES}")})
    f.routed("app1.localhost", "app1")
    wait_for(lambda: status_of(f.port, "bad.localhost") == 503, 30, "bad to be 503")
    wait_for(f.settled, 30, "nginx's old workers to leave")
    def emperor_answers() -> bool:
        # every answer is 503 with Retry-After; one that meets a start
        # attempt is nginx's "does not answer", between attempts the
        # Emperor answers the vassal's socket itself
        status, headers, body = fetch(f.port, "bad.localhost")
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, headers, body)
        return "bad is restarting" in body
    wait_for(emperor_answers, 30, "the Emperor's own answer while bad backs off")
    f.write("bad", ini("bad", "domain = bad.localhost"))  # fixed
    f.routed("bad.localhost", "bad")


@needs_nginx
@needs_perl
def test_on_demand_app_sleeps_until_a_request_comes_through_nginx(front):
    f = front({"app1": ini("app1", "domain = app1.localhost"),
               "sleepy": ini("sleepy", "domain = sleepy.localhost", "on-demand = true",
                             "idle = 1")})
    f.routed("app1.localhost", "app1")
    wait_for(lambda: f.lines("[sleepy] on demand: waiting"), 15, "sleepy asleep")
    assert not f.vpids("sleepy")  # no process yet; its socket exists
    assert stat.S_ISSOCK((f.run / "sockets" / "sleepy.sock").stat().st_mode)
    first = answer(f.port, "sleepy.localhost")  # wakes it
    # the Emperor may log its adoption a moment after it answered (a cgroup
    # migration can wait for an RCU grace period): vpid() waits for it
    assert first["name"] == "sleepy"
    pid = f.vpid("sleepy")
    wait_for(lambda: not psutil.pid_exists(pid) or not alive(psutil.Process(pid)), 20,
             "sleepy back to sleep after idle")
    wait_for(lambda: len(f.lines("[sleepy] on demand: waiting")) >= 2, 15, "waiting again")
    assert answer(f.port, "sleepy.localhost")["name"] == "sleepy"  # woken again
    wait_for(lambda: len(f.vpids("sleepy")) == 2, 15, "its second pid logged")


@needs_nginx
@needs_perl
def test_nginx_killed_comes_back_and_a_stopped_emperor_leaves_no_nginx(front):
    f = front({"app1": ini("app1", "domain = app1.localhost")})
    f.routed("app1.localhost", "app1")
    old = psutil.Process(f.nginx_pid())
    workers = old.children()
    assert workers
    old.send_signal(signal.SIGKILL)
    wait_for(lambda: f.lines(f"nginx pid {old.pid} died (killed by SIGKILL)"), 15, "death seen")
    wait_for(lambda: f.nginx_pid() != old.pid, 15, "a new nginx")
    f.routed("app1.localhost", "app1")
    assert not [w for w in workers if alive(w)], "old workers left"
    ng = psutil.Process(f.nginx_pid())
    everything = descendants(f.pid)
    assert ng in everything
    os.kill(f.pid, signal.SIGTERM)
    assert f.popen.wait(30) == 0
    assert not [p for p in everything if alive(p)], "processes left behind"
    assert status_of(f.port, "app1.localhost") == 0  # nothing listens
    assert not list((f.run / "sockets").glob("*.sock"))
    text = f.text()
    # nginx stopped last: after every vassal
    assert text.index(f"nginx pid {ng.pid} stopped") > text.index("[base] pid")


@needs_nginx
@needs_perl
def test_nginx_runs_the_workers_it_is_told(front):
    f = front({"app1": ini("app1", "domain = app1.localhost")}, "--nginx-workers", "3")
    f.routed("app1.localhost", "app1")
    wait_for(lambda: len(psutil.Process(f.nginx_pid()).children()) == 3, 15, "3 nginx workers")


class HostLoad(threading.Thread):
    """GET / with a Host header, each on a new connection, until stopped
    (at most `limit` seconds / `max_requests`)."""

    def __init__(self, port: int, host: str, limit: float = 30.0, max_requests: int = 20000):
        super().__init__(daemon=True)
        self.port, self.host, self.limit, self.max_requests = port, host, limit, max_requests
        self.ok = 0
        self.failed: list[str] = []
        self.seen: set[str] = set()
        self.stop_ev = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop_ev.is_set() and time.monotonic() < deadline \
                and self.ok + len(self.failed) < self.max_requests:
            try:
                self.seen.add(answer(self.port, self.host)["value"])
                self.ok += 1
            except (AssertionError, OSError, KeyError, ValueError) as e:
                self.failed.append(repr(e))

    def finish(self) -> "HostLoad":
        self.stop_ev.set()
        self.join(30)
        return self


@needs_nginx
@needs_perl
def test_config_change_under_load_through_the_front_door_fails_no_request(front):
    f = front({"app1": ini("app1", "domain = app1.localhost", processes=2),
               "app2": ini("app2", "domain = app2.localhost")})
    f.routed("app1.localhost", "app1")
    f.routed("app2.localhost", "app2")
    loads = [HostLoad(f.port, "app1.localhost"), HostLoad(f.port, "app1.localhost")]
    for load in loads:
        load.start()
    wait_for(lambda: sum(x.ok for x in loads) > 50, 20, "load to run")
    for value in ("v2", "v3"):
        f.write("app1", ini("app1", "domain = app1.localhost", value=value, processes=2))
        wait_for(lambda v=value: all(v in x.seen for x in loads), 30, f"{value} served")
    # another vassal coming and going reloads nginx under the same load
    f.write("app3", ini("app3", "domain = app3.localhost"))
    f.routed("app3.localhost", "app3")  # at once, through its host link
    wait_for(lambda: f.lines("routing changed"), 30, "nginx to reload once the routes are still")
    f.routed("app3.localhost", "app3")
    for load in loads:
        load.finish()
    ok, failed = sum(x.ok for x in loads), [e for x in loads for e in x.failed]
    print(f"front door, config change under load: {ok} requests, {len(failed)} failed")
    assert failed == [], failed[:5]
    assert ok > 100
    assert f.lines("routing changed")


@needs_nginx
@needs_perl
def test_bring_your_own_nginx_include_kept_up_to_date_and_reloaded(xprocess, tmp_path: Path):
    """An operator's nginx (started here, as an operator would) includes the
    file the Emperor keeps; the Emperor runs the operator's reload command
    after each change, and the new name answers through that nginx."""
    top = Path(tempfile.mkdtemp(prefix="pfs-byo-"))
    top.chmod(0o755)  # their workers must reach the sockets under it
    vdir, run, ng = top / "v", top / "run", top / "ng"
    for d in (vdir, ng):
        d.mkdir()
    include = ng / "psgi-routing.conf"
    include.write_text(fd.render_routing([]))  # `emperor nginx-conf` of an empty directory
    port = free_port()
    (ng / "nginx.conf").write_text(
        f"daemon off;\nmaster_process on;\nerror_log stderr;\npid {ng}/nginx.pid;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  include {include};\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n{fd.render_locations()}  }}\n}}\n")
    nginx = subprocess.Popen([NGINX, "-e", "stderr", "-p", str(ng), "-c", str(ng / "nginx.conf")],
                             stderr=subprocess.DEVNULL, start_new_session=True)
    em = None
    try:
        wait_for(lambda: status_of(port, "app1.localhost") == 404, 20, "the operator's nginx")
        (vdir / "base.ini").write_text(base_ini(APP))
        # their nginx's workers run as nobody (a root master's default), as
        # www-data under Debian's: the sockets are given to that user
        owner = "chown-socket = nobody:nogroup" if os.geteuid() == 0 else "domain = x.localhost"
        (vdir / "app1.ini").write_text(ini("app1", "domain = app1.localhost", owner))
        reloads = top / "reloads"
        em = start_emperor(xprocess, f"emperor-{top.name}", [
            vdir, "--run-dir", run, "--nginx-include", include,
            "--nginx-reload", f"echo reload >> {reloads}; kill -HUP {nginx.pid}"])
        wait_for(lambda: answers(port, "app1.localhost", "app1"), 30, "app1 through their nginx")
        assert f"server \"unix:{run}/sockets/app1.sock\";" in include.read_text()
        n = len(reloads.read_text().splitlines())
        assert n >= 1
        (vdir / "app2.ini").write_text(ini("app2", "domain = app2.localhost",
                                           owner.replace("x.localhost", "y.localhost")))
        wait_for(lambda: answers(port, "app2.localhost", "app2"), 30, "a new name, reloaded")
        if os.geteuid() == 0:
            st = (run / "sockets" / "app2.sock").stat()
            assert (st.st_uid, st.st_gid) == (65534, 65534) and stat.S_IMODE(st.st_mode) == 0o660
        assert len(reloads.read_text().splitlines()) > n
        # what `emperor nginx-conf` prints for the same directory is that file
        r = subprocess.run([EMPEROR, "nginx-conf", str(vdir), "--run-dir", str(run)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout == include.read_text(), r.stderr
    finally:
        if em is not None:
            stop_emperor(em)
        nginx.terminate()
        nginx.wait(20)
        shutil.rmtree(top, ignore_errors=True)


@needs_nginx
@needs_perl
def test_socket_speaks_uwsgi_to_the_front_door(front):
    """`socket = ADDR`: the vassal serves the uwsgi protocol; the front
    door reaches it with uwsgi_pass (Plack's suite over it: t/plack-suite-uwsgi.t)."""
    f = front({"legacy": ini("legacy", "domain = legacy.localhost", "socket = ./legacy.sock"),
               "both": ini("both", "socket = ./b.sock", "http-socket = ./c.sock")})
    f.routed("legacy.localhost", "legacy")
    got = answer(f.port, "legacy.localhost")
    assert got["xff"] == "127.0.0.1" and got["xhost"] == got["host"] == f"legacy.localhost:{f.port}"
    # it speaks uwsgi, not HTTP: an HTTP request on its socket gets no HTTP answer
    import socket as so
    s = so.socket(so.AF_UNIX)
    s.settimeout(10)
    s.connect(str(f.dir / "legacy.sock"))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not s.recv(100).startswith(b"HTTP/1.1 200")
    s.close()
    wait_for(lambda: f.lines("[both] bad config"), 15, "both refused")
    assert "socket and http-socket" in f.lines("[both] bad config")[-1]


class KeepAliveLoad(HostLoad):
    """GET / with a Host header over one keep-alive connection (as wrk and
    browsers do), a new one only after a failure."""

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        conn = None
        while not self.stop_ev.is_set() and time.monotonic() < deadline \
                and self.ok + len(self.failed) < self.max_requests:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/", headers={"Host": self.host})
                r = conn.getresponse()
                body = r.read().decode()
                if r.status != 200:
                    raise AssertionError(f"{r.status} {body}")
                self.ok += 1
            except (AssertionError, OSError, http.client.HTTPException) as e:
                self.failed.append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


@needs_nginx
@needs_perl
def test_apps_coming_and_going_fail_no_request_of_the_others(front):
    """Vassal files added and removed every 0.3 s beside steady apps under
    keep-alive load: no request of the steady apps fails (nginx is not
    reloaded for each: a new name answers at once through its host link,
    the configuration follows once the routes are still), and each new
    name answers as soon as its vassal does."""
    f = front({"app1": ini("app1", "domain = app1.localhost", processes=2),
               "app2": ini("app2", "domain = app2.localhost")}, "--http-settle", "30")
    f.routed("app1.localhost", "app1")
    f.routed("app2.localhost", "app2")
    loads = [KeepAliveLoad(f.port, "app1.localhost"), KeepAliveLoad(f.port, "app2.localhost")]
    for load in loads:
        load.start()
    wait_for(lambda: all(x.ok > 20 for x in loads), 20, "load to run")
    reloads_before = len(f.lines("reloads generation"))
    served = 0
    for round_ in range(6):
        for i in range(4):
            f.write(f"t{i}", ini(f"t{i}", f"domain = t{i}.localhost"))
        wait_for(lambda: all(answers(f.port, f"t{i}.localhost", f"t{i}") for i in range(4)),
                 30, "toggled apps to answer")
        served += 4
        for i in range(4):
            os.unlink(f.dir / f"t{i}.ini")
        wait_for(lambda: all(status_of(f.port, f"t{i}.localhost") in (404, 503)
                             for i in range(4)), 30, "toggled apps gone")
    for load in loads:
        load.finish()
    ok, failed = sum(x.ok for x in loads), [e for x in loads for e in x.failed]
    reloads = len(f.lines("reloads generation")) - reloads_before
    print(f"churn: {ok} requests, {len(failed)} failed, {reloads} reloads, {served} apps served")
    assert failed == [], failed[:5]
    assert ok > 100
