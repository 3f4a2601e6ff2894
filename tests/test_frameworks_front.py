"""Framework apps as their users deploy them, behind the front door
(`emperor run DIR --http`): a base file that loads the Catalyst scaffold's
psgi file (no `use lib`: its lib/ comes from `env = PERL5LIB=...`, as under
uWSGI) and a `dancer2 gen` app, with the base's own `env` and `chdir`; the
Catalyst app served from the base; the plain Plack app (ReverseProxy,
Session, Static) and two `dancer2 gen` apps (lib/ found with FindBin)
loaded in their vassals. What a user checks in a browser: redirects back to the address
they typed (port included), sessions, uploads, streaming, the client's real
address, and the apps' log lines in the Emperor's log.

One fleet for the module."""

from __future__ import annotations

import hashlib
import io
import http.client
import shutil
import socket
from pathlib import Path

import pytest

from support import TESTS, base_ini, free_port, wait_for
from support.frameworks import APPS, multipart, request
from support.front import FrontDoors, needs_nginx

pytestmark = [needs_nginx, pytest.mark.skipif(shutil.which("starman") is None, reason="no starman")]

CATALYST = APPS / "catalyst"
GEN = APPS / "gen"


@pytest.fixture(scope="module")
def fleet(xprocess):
    emperors = FrontDoors(xprocess)
    vdir = emperors.directory()
    state = vdir.parent / "state"
    state.mkdir()
    state.chmod(0o777)  # the Plack app's sessions, written by its workers
    mojo_port = free_port()
    files = {
        # the codebase: the scaffold's psgi file, its lib/ on PERL5LIB, and
        # what the app reads while it loads (its state directory) from env
        "base": base_ini(GEN / "preload.psgi", "fs.sock", f"env = PERL5LIB={CATALYST / 'lib'}",
                         f"env = FRAMEWORKS_STATE={state}", f"chdir = {state}"),
        "cat": "[uwsgi]\ndomain = cat.localhost\nprocesses = 2\n",
        "plack": f"[uwsgi]\ndomain = plack.localhost\npsgi = {APPS / 'plack.psgi'}\nprocesses = 2\n",
        **{app: f"[uwsgi]\ndomain = {app}.localhost\npsgi = {GEN / app / 'bin' / 'app.psgi'}\n"
           for app in ("shop", "blog")},
        "idn": f"[uwsgi]\ndomain = bücher.localhost\npsgi = {TESTS / 'apps' / 'exits.psgi'}\n",
        # on its own port too: HTTP/1.0 clients straight to the vassal
        "mojo": (f"[uwsgi]\ndomain = mojo.localhost\nhttp-socket = 127.0.0.1:{mojo_port}\n"
                 f"psgi = {APPS / 'mojo.psgi'}\nmaster = false\n"),
        # the same app over the uwsgi protocol (nginx's uwsgi_pass)
        "mojou": f"[uwsgi]\ndomain = mojou.localhost\nsocket = ./mojou.sock\npsgi = {APPS / 'mojo.psgi'}\n",
    }
    try:
        # nginx's configuration is written once: a vassal added later is
        # served through its host link only
        f = emperors(files, "--http-settle", "600", base=False, vdir=vdir, env={"PLACK_ENV": ""})
        f.ports = {"front": f.port, "mojo": mojo_port}
        for name in ("cat", "plack", "shop", "mojo", "mojou"):
            wait_for(lambda n=name: request(f.port, f"{n}.localhost", "GET", "/json", timeout=5).status == 200,
                     90, f"{name} to answer through the front door")
        f.state = state
        yield f
    finally:
        emperors.stop()


def test_base_applies_its_env_and_chdir_before_it_loads_the_app(fleet):
    """`env` (PERL5LIB included) and `chdir` in a base's file are in effect
    while it loads its `early-psgi`, as uWSGI applies them: the scaffold's
    `use CatApp` finds its lib/, the app keeps its database where its env
    says, and the vassals forked from the base inherit both."""
    got = request(fleet.port, "cat.localhost", "GET", "/where")
    assert got.status == 200, got
    where = dict(line.split("=", 1) for line in got.body.decode().splitlines())
    assert where == {"cwd": str(fleet.state), "state": str(fleet.state),
                     "lib": str(CATALYST / "lib" / "CatApp.pm")}
    posted = request(fleet.port, "cat.localhost", "POST", "/notes", b"body=kept",
                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert posted.status == 200 and b"kept" in posted.body
    assert (fleet.state / "catapp.db").exists()
    # the relative fork-server socket is still the one the Emperor adopts through
    assert (fleet.dir / "fs.sock").is_socket()


def test_each_generated_app_finds_its_own_lib_with_findbin(fleet):
    """`dancer2 gen`'s bin/app.psgi finds its lib/ with FindBin. The base
    loaded FindBin for the shop; the blog's vassal, forked from it, still
    gets its own directory (as plackup gives each app), not the shop's."""
    wait_for(lambda: request(fleet.port, "blog.localhost", "GET", "/", timeout=5).status == 200, 60,
             "the blog to answer")
    for app in ("shop", "blog"):
        got = request(fleet.port, f"{app}.localhost", "GET", "/")
        name, package, appdir = got.body.decode().split()
        assert (got.status, name, package) == (200, app, app.capitalize()), got
        assert Path(appdir).resolve() == GEN / app, got


def test_redirects_lead_back_to_the_address_the_client_used(fleet):
    """A redirect the app builds from the request (`uri_for`, Plack's
    `$req->base` behind ReverseProxy) names the front door's host and port,
    whatever X-Forwarded-Host the client sent."""
    port = fleet.port
    for app in ("cat", "plack"):
        host = f"{app}.localhost:{port}"
        got = request(port, host, "GET", "/redirect")
        assert got.status == 302 and got.headers["location"] == f"http://{host}/json", (app, got)
        spoofed = request(port, host, "GET", "/redirect", headers={"X-Forwarded-Host": "evil.example"})
        assert spoofed.headers["location"] == f"http://{host}/json", (app, spoofed)
        # a Host without a port: the default one, as the client meant
        plain = request(port, f"{app}.localhost", "GET", "/redirect")
        assert plain.headers["location"] == f"http://{app}.localhost/json", (app, plain)
        # a fully qualified name (trailing dot) keeps its port too
        dotted = request(port, f"{app}.LOCALHOST.:{port}", "GET", "/redirect")
        # (URI.pm lower-cases a host: Plack's base does, Catalyst's keeps it)
        assert dotted.headers["location"].lower() == f"http://{app}.localhost.:{port}/json", (app, dotted)


def test_the_app_sees_the_client_not_what_the_client_claims(fleet):
    """X-Forwarded-For and X-Real-IP sent by the client do not make the
    app's address (ReverseProxy reads the last X-Forwarded-For entry,
    which nginx adds)."""
    got = request(fleet.port, f"plack.localhost:{fleet.port}", "GET", "/proxied", headers={
        "X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "X-Forwarded-Proto": "https"})
    address, base, scheme = got.body.decode().split()
    assert (address, base, scheme) == ("127.0.0.1", f"http://plack.localhost:{fleet.port}/", "http")


def test_what_a_browser_does_through_the_front_door(fleet):
    """Sessions across requests, a 5 MB multipart upload (with and without
    `Expect: 100-continue`), a chunked request body, a streamed response,
    HEAD, HTTP/1.0 and pipelined requests, through nginx to each app."""
    port = fleet.port
    data = bytes(range(256)) * (5 * 1024 * 4)  # 5 MB, every byte value
    digest = hashlib.md5(data).hexdigest()
    body, ctype = multipart("file", "big.bin", data)
    for app in ("cat", "plack"):
        host = f"{app}.localhost"
        first = request(port, host, "GET", "/session")
        cookie = "; ".join(f"{k}={v}" for k, v in first.cookies.items())
        counts = [request(port, host, "GET", "/session", headers={"Cookie": cookie}).body for _ in range(2)]
        assert [first.body, *counts] == [b"count 1\n", b"count 2\n", b"count 3\n"], app
        for extra in ({}, {"Expect": "100-continue"}):
            up = request(port, host, "POST", "/upload", body, {"Content-Type": ctype, **extra}, timeout=60)
            assert up.status == 200 and up.body.decode().split() == ["big.bin", str(len(data)), digest], (app, up)
        # chunked: http.client frames an iterable body itself
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/upload", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers={"Host": host, "Content-Type": ctype, "Transfer-Encoding": "chunked"},
                     encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 200 and r.read().decode().split()[2] == digest, app
        conn.close()
        assert request(port, host, "GET", "/stream").body == b"chunk 1\nchunk 2\nchunk 3\n", app
        head = request(port, host, "HEAD", "/json")
        assert head.status == 200 and head.body == b"", app
    # HTTP/1.0 and two requests in one write, on raw sockets
    for req, want in [(b"GET /json HTTP/1.0\r\nHost: plack.localhost\r\n\r\n", 1),
                      (b"GET /json HTTP/1.1\r\nHost: cat.localhost\r\n\r\n"
                       b"GET /json HTTP/1.1\r\nHost: plack.localhost\r\nConnection: close\r\n\r\n", 2)]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(req)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got.count(b" 200 OK\r\n") == want and got.count(b'"framework"') == want, got[:500]


def test_app_log_lines_are_attributed_to_their_vassal(fleet):
    """What an app logs (Catalyst's error log of a route that died) is in
    the Emperor's log under the vassal's name."""
    assert request(fleet.port, "cat.localhost", "GET", "/die").status == 500
    wait_for(lambda: [line for line in fleet.lines("[cat] ") if "the route died" in line], 30,
             "the app's error line under [cat]")


def test_an_app_that_dies_in_a_request_is_unavailable_not_unknown(fleet):
    """A vassal added since nginx's last reload answers through its host
    link; when its worker dies in the middle of a request, the client is
    told what the configured names tell (503, retry in 1 s), not that no
    app is served under that name."""
    fleet.write("late", f"[uwsgi]\ndomain = late.localhost\npsgi = {TESTS / 'apps' / 'exits.psgi'}\n"
                        "processes = 2\n")
    wait_for(lambda: request(fleet.port, "late.localhost", "GET", "/", timeout=5).status == 200, 60,
             "the late app to answer through its host link")
    got = request(fleet.port, "late.localhost", "GET", "/exit")
    assert (got.status, got.headers.get("retry-after")) == (503, "1"), got
    assert b"late.localhost does not answer" in got.body, got
    assert request(fleet.port, "late.localhost", "GET", "/").status == 200


def test_an_internationalized_domain_answers_to_the_host_browsers_send(fleet):
    """`domain = bücher.localhost` is served as xn--bcher-kva.localhost,
    the Host a browser or curl sends for it, in any case, with a port or a
    trailing dot."""
    for host in ("xn--bcher-kva.localhost", f"XN--BCHER-KVA.localhost:{fleet.port}", "xn--bcher-kva.localhost."):
        got = request(fleet.port, host, "GET", "/")
        assert got.status == 200 and got.body.startswith(b"alive "), (host, got)


def raw_exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    """(head, body) of the answer to `data`, read to the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return head, body


def test_an_app_that_chunks_its_own_body_answers_http10_clients_unchunked(fleet):
    """Mojolicious's write_chunk frames the chunks itself and says
    Transfer-Encoding: chunked; an HTTP/1.0 client must not get that
    encoding (it reads the sizes as text): it gets the data, ended by the
    close. An HTTP/1.1 client keeps the app's chunks."""
    port = fleet.ports["mojo"]
    head, body = raw_exchange(port, b"GET /stream HTTP/1.0\r\nHost: mojo.localhost\r\n\r\n")
    assert b" 200 OK" in head.split(b"\r\n")[0] and b"transfer-encoding" not in head.lower(), head
    assert body == b"chunk 1\nchunk 2\nchunk 3\n", body
    head, body = raw_exchange(port, b"GET /stream HTTP/1.1\r\nHost: mojo.localhost\r\nConnection: close\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    assert body == b"8\r\nchunk 1\n\r\n8\r\nchunk 2\n\r\n8\r\nchunk 3\n\r\n0\r\n\r\n", body
    # and through the front door, for either client, over HTTP and over
    # uwsgi (whose responses nginx reads to the close, without unchunking)
    for host, proto in [(h, p) for h in (b"mojo", b"mojou") for p in (b"1.0", b"1.1")]:
        head, body = raw_exchange(fleet.port, b"GET /stream HTTP/" + proto + b"\r\nHost: " + host
                                  + b".localhost\r\nConnection: close\r\n\r\n")
        if proto == b"1.1" and b"chunked" in head.lower():  # nginx's own chunks
            r = http.client.HTTPResponse(FakeSocket(head + b"\r\n\r\n" + body))
            r.begin()
            body = r.read()
        assert body == b"chunk 1\nchunk 2\nchunk 3\n", (host, proto, head, body)


class FakeSocket:
    """Bytes already read, for http.client to parse a response from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *args, **kwargs):
        return io.BytesIO(self.data)
