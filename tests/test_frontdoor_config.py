"""The front door's configuration: what it generates, checked by nginx
itself; `emperor nginx-conf`; `domain` and the uWSGI keys as both sides
judge them; bad front door options as one line and exit 2."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from psgi_forkserver import config as c
from psgi_forkserver import frontdoor as fd
from psgi_forkserver.frontdoor import FrontDoor, FrontDoorOptions, Route

from support import EMPEROR, base_ini, free_port
from support.front import NGINX, needs_nginx

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "front.psgi"


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
    # the regular expressions every request runs (the Host map, the access
    # log's time) compiled to machine code, and this nginx can
    assert "pcre_jit on;" in conf.read_text() and "JIT" not in r.stderr
    # nginx's workers: half the CPUs (a proxied request costs nginx about
    # a third of its CPU, the vassal the rest), at least one; or as told
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"worker_processes {half};" in conf.read_text()
    assert "worker_processes 3;" in fd.render_nginx_conf(ROUTES, "127.0.0.1:1", run, workers=3)
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


@pytest.mark.parametrize("value,ascii_form", [
    ("bücher.example", "xn--bcher-kva.example"), ("Bücher.Example", "xn--bcher-kva.example"),
    ("*.bücher.example", "*.xn--bcher-kva.example"), ("straße.de", "xn--strae-oqa.de"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_internationalized_domains_get_the_form_browsers_send(value: str, ascii_form: str):
    """What a browser puts in Host for the name (UTS #46, non-transitional:
    `ß` stays a letter of its own); names no browser could send are refused."""
    assert c.parse_domain(value) == ascii_form
    for bad in ("ü" * 70 + ".de", "bü cher.example", "*.*.bücher.example"):
        with pytest.raises(ValueError):
            c.parse_domain(bad)


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
            *((["--http", "127.0.0.1:1", "--nginx-workers", n],
               f"--nginx-workers {n}: a number of processes, 1 to 1024 (nginx spawns no more)")
              # a superscript two is a digit to str.isdigit; nginx cannot hold the huge one
              for n in ("0", "many", "\u00b2", "\u0663", "1025", "99999999999999999999")),
        ]
        for extra, want in cases:
            r = subprocess.run([EMPEROR, "run", str(vdir), "--run-dir", str(tmp_path / "r"), *extra],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (extra, r.stderr)
            assert want in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
    finally:
        taken.close()


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
