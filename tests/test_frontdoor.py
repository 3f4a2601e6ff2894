"""The front door: routing by Host name through a real nginx started by a
real Emperor, to real Perl vassals on UNIX sockets (and TCP ones); the
configuration it generates, checked by nginx itself; `emperor nginx-conf`;
`domain` and the uWSGI keys as both sides judge them."""

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

from psgi_forkserver import config as c
from psgi_forkserver import frontdoor as fd
from psgi_forkserver.frontdoor import FrontDoor, FrontDoorOptions, Route

from support import (
    EMPEROR, PROGRAM, alive, base_ini, descendants, free_port, start_emperor, stop_emperor, wait_for,
)
from support.front import NGINX, answer, answers, fetch, ini, needs_nginx, status_of

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "front.psgi"
DIES = HERE / "apps" / "dies.psgi"

needs_perl = pytest.mark.skipif(not PROGRAM.is_file(), reason="no vassal program")


# -- the generated configuration ----------------------------------------------

ROUTES = [
    Route("app1", ("app1.localhost",), "unix:/run/x/sockets/app1.sock"),
    Route("shop", ("*.shop.localhost", "shop.localhost"), "127.0.0.1:9101"),
    Route("weird name", ("weird.localhost",), "unix:/run/x/sockets/weird name.sock"),
    Route("broken", ("broken.localhost",), "", up=False, retry_after=8),
    Route("legacy", ("legacy.localhost",), "127.0.0.1:9102", protocol="uwsgi"),
]


def test_routing_is_a_pure_function_of_the_routes():
    a = fd.render_routing(ROUTES)
    assert a == fd.render_routing(list(reversed(ROUTES)))  # order does not matter
    # keys escaped: `default`, `include`... are names like any other
    assert '    "\\\\app1.localhost" "psgi_fs_v_app1";' in a
    assert '    "\\\\*.shop.localhost" "psgi_fs_v_shop";' in a
    assert "server \"unix:/run/x/sockets/app1.sock\";" in a
    # a down vassal has no upstream: its names map to 503 with its Retry-After
    assert '    "\\\\broken.localhost" "@down";' in a and '    "\\\\broken.localhost" 8;' in a
    assert "upstream psgi_fs_v_broken " not in a
    assert '    "\\\\legacy.localhost" uwsgi;' in a  # nginx speaks uwsgi to it
    name = fd.upstream_name("weird name")
    assert name.startswith("psgi_fs_x_weird_name_") and name != fd.upstream_name("weird_name")
    # upstream names never collide: nginx compares them without case
    names = ["x-y", "x_y", "x_y_cc96fed8", "X_y", "App", "app", "a" * 200, "a" * 201]
    assert len({fd.upstream_name(n).lower() for n in names}) == len(names)
    assert "keepalive 16;" in a and "keepalive 8;" in fd.render_routing(ROUTES, keepalive=8)
    assert "keepalive" not in fd.render_routing(ROUTES, keepalive=0)
    assert fd.render_routing(ROUTES[:1]) != a


@needs_nginx
def test_nginx_accepts_the_generated_configuration(tmp_path: Path):
    """`nginx -t` on the whole file the Emperor would run nginx with."""
    run = tmp_path / "run"
    (run / "nginx" / "tmp").mkdir(parents=True)
    conf = run / "nginx" / "nginx.conf"
    conf.write_text(fd.render_nginx_conf(ROUTES, f"127.0.0.1:{free_port()}", run, keepalive=4))
    r = subprocess.run([NGINX, "-t", "-e", "stderr", "-p", str(run / "nginx"), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr
    # a reload's old workers are bounded: a response still streaming after 30 s is cut
    assert "worker_shutdown_timeout 30s;" in conf.read_text()
    inc = tmp_path / "routing.conf"
    inc.write_text(fd.render_routing(ROUTES))
    # an operator's nginx: the include at http level, the locations in their server
    conf.write_text(
        "daemon off; error_log stderr; pid %s/ng.pid;\nevents {}\nhttp {\n include %s;\n"
        " server { listen 127.0.0.1:%d;\n%s }\n}\n"
        % (tmp_path, inc, free_port(), fd.render_locations()))
    r = subprocess.run([NGINX, "-t", "-e", "stderr", "-p", str(run / "nginx"), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_changes_of_one_turn_and_bursts_are_batched(tmp_path: Path):
    """Every loop turn reports its routes; the file is written once for the
    changes that arrive together, and at most once per min_gap."""
    lines: list[str] = []
    inc = tmp_path / "routing.conf"
    front = FrontDoor(FrontDoorOptions(run_dir=tmp_path, include=inc, batch=0.1, min_gap=1.0),
                      lines.append)
    t = 100.0

    def poll(t: float) -> None:
        front.poll(t)
        if front.check is not None:  # nginx -t of the candidate (when nginx is here)
            pid, status = os.waitpid(front.check.pid, 0)
            front.exited(pid, status, t, str)

    for i in range(1, 201):  # 200 vassals come up over 2 s of loop turns
        front.update([Route(f"a{j}", (f"a{j}.localhost",), f"unix:/s/a{j}.sock")
                      for j in range(i)], t)
        poll(t)
        t += 0.01
    poll(t + 5)
    writes = [x for x in lines if "written" in x]
    assert 2 <= len(writes) <= 4, lines
    assert "a199.localhost" in inc.read_text()
    front.update(front.routes or (), t + 10)  # the same routes: nothing to do
    assert front.next_wakeup() is None
    poll(t + 20)
    assert len([x for x in lines if "written" in x]) == len(writes)


# -- judging the keys ------------------------------------------------------------


@pytest.mark.parametrize("value,ok", [
    ("app.example.com", True), ("*.example.com", True), ("APP.Example.COM", True),
    ("localhost", True), ("a_b.local", True), ("*", False), ("a.*.com", False),
    ("-a.com", False), ("a..com", False), ("a.com:80", False), ("", False), ("a b", False),
])
def test_domain_values(value: str, ok: bool):
    if ok:
        assert c.parse_domain(value) == value.lower()
    else:
        with pytest.raises(ValueError):
            c.parse_domain(value)


def test_uwsgi_keys_accepted_or_refused_by_name_on_both_sides(tmp_path: Path):
    text = ("[uwsgi]\nplugins = psgi\nmaster = true\nvacuum = true\ndie-on-term\n"
            "thunder-lock = true\nhttp-socket = /tmp/x.sock\ndomain = a.localhost\n")
    f = tmp_path / "a.ini"
    f.write_text(text)
    assert c.load(f, judge=True).error is None
    f.write_text("[uwsgi]\nmaster = true\nmodule = app:application\n")
    err = c.load(f, judge=True).error
    assert err == "a.ini:3: uWSGI's option 'module' is not supported: use psgi = FILE.psgi"
    root = Path(__file__).resolve().parent.parent
    script = r'''
        use strict; use warnings; use ForkServer::Config;
        my $ok = eval { ForkServer::Config->new->parse_ini_text($ARGV[0], "a.ini"); 1 } ? "ok" : $@;
        my $bad = eval { ForkServer::Config->new->parse_ini_text($ARGV[1], "a.ini"); 1 } ? "ok" : $@;
        print "$ok\n$bad";
    '''
    r = subprocess.run(["perl", "-I", str(root / "perl"), "-e", script, text,
                        "[uwsgi]\nmaster = true\nmodule = app:application\n"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ok, bad = r.stdout.split("\n", 1)
    assert ok == "ok"
    assert bad.strip() == ("uWSGI's option 'module' is not supported: use psgi = FILE.psgi "
                           "(a.ini line 3)")


# -- emperor nginx-conf ------------------------------------------------------------


def test_nginx_conf_prints_the_routing_of_a_directory(tmp_path: Path):
    vdir = tmp_path / "v"
    vdir.mkdir()
    (vdir / "base.ini").write_text(base_ini(APP))
    (vdir / "a.ini").write_text("[uwsgi]\ndomain = a.localhost\ndomain = *.a.localhost\n")
    (vdir / "b.ini").write_text("[uwsgi]\nhttp-socket = 127.0.0.1:9999\ndomain = b.localhost\n")
    (vdir / "c.ini").write_text("[uwsgi]\ndomain = a.localhost\n")  # taken by a
    (vdir / "d.ini").write_text("[uwsgi]\nhttp-socket = 127.0.0.1:9998\n")  # no name
    r = subprocess.run([EMPEROR, "nginx-conf", str(vdir), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == fd.render_routing([
        Route("a", ("*.a.localhost", "a.localhost"), f"unix:{tmp_path}/r/sockets/a.sock"),
        Route("b", ("b.localhost",), "127.0.0.1:9999"),
    ])
    assert r.stderr == "emperor: nginx-conf: c: domain a.localhost is already served by vassal a\n"


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
    assert got["xhost"] == "app1.localhost" and got["host"] == f"app1.localhost:{f.port}"
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
    status, headers, body = fetch(f.port, "bad.localhost")
    assert status == 503 and int(headers["retry-after"]) >= 1, (status, headers)
    assert "bad is restarting" in body  # the Emperor answers its socket
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


def test_unix_listener_replaces_a_stale_socket_and_refuses_a_live_one(tmp_path: Path):
    import socket as so

    from psgi_forkserver import sockets

    path = str(tmp_path / "a.sock")
    stale = so.socket(so.AF_UNIX)
    stale.bind(path)
    stale.close()  # its file stays: a process that died
    s = sockets.bind_unix_listener(path, uid=None, gid=None)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        c = so.socket(so.AF_UNIX)
        c.connect(path)
        c.close()
        with pytest.raises(OSError, match="another process listens"):
            sockets.bind_unix_listener(path)
    finally:
        sockets.Listener(path, 1, s).close()
    assert not os.path.exists(path)  # closing removes it
    (tmp_path / "f").write_text("mine")
    with pytest.raises(OSError, match="not a socket"):
        sockets.bind_unix_listener(str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "mine"
    assert sockets.is_unix_address("app.sock") and sockets.is_unix_address("/a:b")
    assert not sockets.is_unix_address(":9101") and not sockets.is_unix_address("[::1]:80")
    long = tmp_path / ("x" * 120)
    assert len(str(sockets.auto_socket_path(long, "app"))) > 107  # a long dir stays long...
    p = sockets.auto_socket_path(Path("/run/x"), "a" * 120)  # ...a long name is hashed
    assert len(str(p)) <= 107 and p.name.startswith("h-")


def test_bad_front_door_options_are_one_line_and_exit_2(tmp_path: Path):
    import socket as so

    vdir = tmp_path / "v"
    vdir.mkdir()
    taken = so.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        cases = [
            (["--http", f"127.0.0.1:{port}"], f"--http 127.0.0.1:{port}: cannot listen on"),
            (["--http", "nowhere"], "--http nowhere: bad address"),
            (["--nginx-reload", "true"], "--nginx-reload needs --nginx-include"),
            (["--nginx-include", str(tmp_path / "no" / "such" / "f.conf")],
             "cannot create files in"),
            (["--http", "127.0.0.1:1", "--nginx", str(tmp_path / "nginx")], "nginx not found at"),
        ]
        for extra, want in cases:
            r = subprocess.run([EMPEROR, "run", str(vdir), "--run-dir", str(tmp_path / "r"), *extra],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (extra, r.stderr)
            assert want in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
    finally:
        taken.close()


@needs_nginx
@needs_perl
def test_socket_speaks_uwsgi_to_the_front_door(front):
    """`socket = ADDR`: the vassal serves the uwsgi protocol; the front
    door reaches it with uwsgi_pass (Plack's suite over it: t/plack-suite-uwsgi.t)."""
    f = front({"legacy": ini("legacy", "domain = legacy.localhost", "socket = ./legacy.sock"),
               "both": ini("both", "socket = ./b.sock", "http-socket = ./c.sock")})
    f.routed("legacy.localhost", "legacy")
    got = answer(f.port, "legacy.localhost")
    assert got["xff"] == "127.0.0.1" and got["xhost"] == "legacy.localhost"
    assert got["host"] == f"legacy.localhost:{f.port}"
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


@needs_nginx
@needs_perl
def test_nginx_user_option_and_the_access_log_in_json(front):
    """--nginx-user USER:GROUP: the workers' user, and the group the
    sockets are given to; the access log follows --log-format json like
    every other line."""
    import json

    f = front({"app1": ini("app1", "domain = app1.localhost")},
              "--nginx-user", "nobody:nogroup", "--log-format", "json")
    wait_for(lambda: answers(f.port, "app1.localhost", "app1"), 30, "app1")
    if os.geteuid() == 0:
        pid = int(f.lines('"message": "nginx pid ')[-1].split("nginx pid ")[1].split()[0])
        ng = psutil.Process(pid)
        assert {w.username() for w in ng.children()} == {"nobody"}
        assert (f.run / "sockets" / "app1.sock").stat().st_gid == 65534
    # the 503s of app1's start may be relayed first: wait for the 200's line
    answered = wait_for(lambda: [line for line in map(json.loads, (
        x for x in f.lines("app1.localhost 127.0.0.1") if x.startswith("{")))
        if '"GET / HTTP/1.1" 200 ' in line["message"]], 20, "a JSON access line of a 200")
    line = answered[-1]
    assert line["vassal"] == "front" and line["time"].endswith("Z")
    assert line["message"].startswith('app1.localhost 127.0.0.1 "GET / HTTP/1.1" 200 ')


def test_a_bad_nginx_user_is_one_line_and_exit_2(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("only a root Emperor sets nginx's user")
    vdir = tmp_path / "v"
    vdir.mkdir()
    r = subprocess.run([EMPEROR, "run", str(vdir), "--run-dir", str(tmp_path / "r"), "--http",
                        f"127.0.0.1:{free_port()}", "--nginx-user", "no-such-user-x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--nginx-user no-such-user-x: no such user 'no-such-user-x'" in r.stderr


@needs_nginx
def test_limits_the_checker_accepts_make_a_configuration_nginx_accepts(tmp_path: Path):
    """limit-post and buffer-size are any number the checker lets through:
    the configuration stays one nginx accepts (a huge limit is no limit
    nginx can hold; a huge head buffer is capped)."""
    run = tmp_path / "run"
    (run / "nginx" / "tmp").mkdir(parents=True)
    conf = run / "nginx" / "nginx.conf"
    routes = [Route("huge", ("huge.localhost",), "unix:/s/huge.sock",
                    limit_post=10 ** 30, head_size=10 ** 15),
              Route("tiny", ("tiny.localhost",), "unix:/s/tiny.sock", limit_post=1, head_size=1)]
    conf.write_text(fd.render_nginx_conf(routes, f"127.0.0.1:{free_port()}", run))
    r = subprocess.run([NGINX, "-t", "-e", "stderr", "-p", str(run / "nginx"), "-c", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "large_client_header_buffers 4 1048576;" in conf.read_text()


def test_a_run_dir_nginx_cannot_reach_is_one_line_and_exit_2(tmp_path: Path):
    """As root, nginx's workers are www-data: a --run-dir under a directory
    they cannot search would make every request a 503."""
    if os.geteuid() != 0:
        pytest.skip("only a root Emperor gives nginx's workers another user")
    top = Path(tempfile.mkdtemp(prefix="pfs-fd-closed-"))
    try:
        top.chmod(0o755)
        closed = top / "closed"
        closed.mkdir(mode=0o700)
        vdir = top / "v"
        vdir.mkdir()
        r = subprocess.run([EMPEROR, "run", str(vdir), "--run-dir", str(closed / "run"), "--http",
                            f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                           timeout=60)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"nginx's workers (www-data) cannot reach the sockets under it: {closed} is mode " \
           "0700" in r.stderr, r.stderr


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
