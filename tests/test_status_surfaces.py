"""What the Emperor's control surfaces show, and to whom: the status page
answers only its own Host names (DNS rebinding) and, with a token file, only
holders of the token; control characters in file names and values never
reach a terminal or the log raw; the run directory is private.

One real Emperor (base, adopted vassals, nginx front door), shared."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from psgi_forkserver import paths
from psgi_forkserver.printable import printable
from psgi_forkserver.status import default_stats_path
from psgi_forkserver.status.access import Access, split_host

from support import EMPEROR, base_ini, free_port, start_emperor, stop_emperor, wait_for

HERE = Path(__file__).resolve().parent
NOISY = HERE / "apps" / "noisy.psgi"
PROGRAM = paths.vassal_program()
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
SECRET = "s3cr3t-db-password-7f1c"
TOKEN = "tok-4b9e1d0c2a"
#: a vassal file name that tries to forge a log line, drive a terminal
#: (clear screen, set the window title) and ring the bell
EVIL = "evil\n2026-01-01T00:00:00.000Z emperor: [app1] forged line\x1b[2J\x1b]0;pwned\x07"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n

needs_perl = pytest.mark.skipif(not PROGRAM.is_file(), reason="no Perl vassal program")
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None
                                 and not os.access("/usr/sbin/nginx", os.X_OK),
                                 reason="nginx is not installed")


# -- units --------------------------------------------------------------------------


def test_printable_escapes_every_control_character_and_nothing_else():
    assert printable("app-1.example_ü ✓ C:\\x") == "app-1.example_ü ✓ C:\\x"
    assert printable("a\nb\rc\td\x1b[2J\x07\x00\x7f\x9b\u2028\u202e") == \
        "a\\nb\\rc\\td\\e[2J\\x07\\x00\\x7f\\x9b\\u2028\\u202e"
    assert not RAW.search(printable("".join(map(chr, range(0x100)))))


def test_host_names_answered():
    lo = Access.for_address(("127.0.0.1", 9100), ("status.example",))
    for host in (None, "127.0.0.1", "127.0.0.1:9100", "localhost", "LOCALHOST:9100",
                 "localhost.", "status.example", "Status.Example.:9100"):
        assert lo.host_allowed(host), host
    for host in ("rebind.attacker.example", "rebind.attacker.example:9100", "127.0.0.1:80",
                 "127.0.0.2", "[::1]", "localhost.attacker.example", "", "a b", "127.0.0.1:x",
                 "status.example.attacker"):
        assert not lo.host_allowed(host), host
    v6 = Access.for_address(("::1", 9100, 0, 0))
    assert v6.host_allowed("[::1]:9100") and v6.host_allowed("localhost")
    assert not v6.host_allowed("127.0.0.1")
    anyaddr = Access.for_address(("0.0.0.0", 9100))
    assert anyaddr.host_allowed("192.0.2.7:9100") and not anyaddr.host_allowed("evil.example")
    public = Access.for_address(("192.0.2.7", 9100))
    assert public.host_allowed("192.0.2.7") and not public.host_allowed("localhost")
    assert split_host("[::1") is None and split_host("[::1]x") is None


# -- one real Emperor ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(xprocess):
    vdir = Path(tempfile.mkdtemp(prefix="pfs-surfaces-"))
    run_root = Path(tempfile.mkdtemp(prefix="pfs-surfaces-run-"))
    run_root.chmod(0o711)  # as /run is: nginx's workers (www-data) pass through it
    tokdir = Path(tempfile.mkdtemp(prefix="pfs-surfaces-tok-"))
    token_file = tokdir / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    ports = {"app1": free_port(), "evil": free_port()}
    http_port, front_port = free_port(), free_port()
    (vdir / "base.ini").write_text(base_ini(NOISY))
    (vdir / "app1.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{ports['app1']}\n"
                                   "processes = 1\n")
    (vdir / f"{EVIL}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{ports['evil']}\n"
                                      "processes = 1\n")
    # a value with control characters, quoted back in its config error
    (vdir / "badval.ini").write_text("[uwsgi]\nprocesses = 2\x1b[31m\x07\n")
    # a vassal of the front door: its socket goes in the run directory
    (vdir / "fronted.ini").write_text("[uwsgi]\ndomain = fronted.localhost\nprocesses = 1\n")
    env = {"PSGI_FORKSERVER_RUN_DIR": str(run_root / "fresh")}  # made by the Emperor
    em = None
    try:
        em = start_emperor(xprocess, "emperor-surfaces", [
            vdir, "--mercy", "5", "--http", f"127.0.0.1:{front_port}",
            "--status-http", f"127.0.0.1:{http_port}", "--status-http-host", "status.example",
            "--status-http-token-file", token_file], env)
        f = SimpleNamespace(em=em, dir=vdir, ports=ports, http_port=http_port,
                            run_root=run_root, env={**os.environ, **env})
        # the app prints a secret: it is in the vassal's recent lines
        wait_for(lambda: request(f, f"/?{SECRET}", port=ports["app1"])[0] == 200, 30,
                 "app1 to answer")
        wait_for(lambda: request(f, f"/?x", port=ports["evil"])[0] == 200, 30, "evil to answer")
        wait_for(lambda: f"stderr-{SECRET}" in em.text(), 15, "the secret in the log")
        yield f
    finally:
        if em is not None:
            stop_emperor(em)
        for d in (vdir, run_root, tokdir):
            shutil.rmtree(d, ignore_errors=True)


def request(f, path: str, host: str | None = "default", port: int | None = None,
            headers: dict | None = None) -> tuple[int, str, dict]:
    """One GET; (status, body, headers). `host`: the Host header sent
    ("default": the address itself; None: no Host header at all)."""
    port = port or f.http_port
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.putrequest("GET", path, skip_host=True)
        if host == "default":
            host = f"127.0.0.1:{port}"
        if host is not None:
            c.putheader("Host", host)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    finally:
        c.close()


def basic(token: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{token}".encode()).decode()}


@needs_perl
@needs_nginx
def test_a_rebound_host_reads_nothing(fleet):
    for path in ("/", "/json", "/log/app1", "/metrics", "/healthz"):
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{fleet.http_port}",
                     "127.0.0.1.nip.io"):
            # even with the right token: a page of another origin may not read it
            code, body, _ = request(fleet, path, host=host, headers=basic(TOKEN))
            assert code == 421, (path, host, code, body)
            assert SECRET not in body and "app1" not in body and "vassals" not in body, body
    assert fleet.em.lines('refused Host "rebind.attacker.example" with 421')


@needs_perl
@needs_nginx
def test_the_right_host_with_the_token_reads_everything(fleet):
    for host in (f"127.0.0.1:{fleet.http_port}", "localhost", f"localhost:{fleet.http_port}",
                 "status.example", None):
        code, body, _ = request(fleet, "/log/app1", host=host, headers=basic(TOKEN))
        assert code == 200 and f"stderr-{SECRET}" in body, (host, code, body)
    code, body, _ = request(fleet, "/json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and "app1" in json.loads(body)["vassals"]
    code, body, _ = request(fleet, "/", headers=basic(TOKEN))
    assert code == 200 and "app1" in body


@needs_perl
@needs_nginx
def test_without_the_token_only_health_is_answered(fleet):
    for path in ("/", "/json", "/log/app1", "/metrics"):
        for headers in ({}, basic("wrong"), {"Authorization": "Bearer " + TOKEN[:-1]},
                        {"Authorization": "Basic !!!"}, {"Authorization": TOKEN}):
            code, body, hdrs = request(fleet, path, headers=headers)
            assert code == 401, (path, headers, code)
            assert SECRET not in body and "app1" not in body
            assert hdrs["WWW-Authenticate"].startswith("Basic realm=")
    code, body, _ = request(fleet, "/healthz")
    assert code == 200
    # two Authorization headers: which one did a proxy in front check?
    c = http.client.HTTPConnection("127.0.0.1", fleet.http_port, timeout=10)
    try:
        c.putrequest("GET", "/json")
        c.putheader("Authorization", "Bearer x")
        c.putheader("Authorization", f"Bearer {TOKEN}")
        c.endheaders()
        assert c.getresponse().status == 400
    finally:
        c.close()


def test_a_token_file_others_can_read_is_refused(tmp_path: Path):
    tok = tmp_path / "token"
    tok.write_text("secret\n")
    tok.chmod(0o644)
    r = subprocess.run([EMPEROR, "run", tmp_path, "--status-http", f"127.0.0.1:{free_port()}",
                        "--status-http-token-file", tok], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2, r
    assert "lets others read or change it (chmod 600)" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@needs_perl
@needs_nginx
def test_control_characters_in_names_and_values_are_escaped_everywhere(fleet):
    shown = printable(EVIL)
    assert "\\n" in shown and "\\e[2J" in shown and "\\x07" in shown
    wait_for(lambda: fleet.em.lines("badval"), 15, "badval's error in the log")
    log = fleet.em.text()
    # the text log: no forged line, no raw escape
    assert not re.search(rf"^{TS} emperor: \[app1\] forged", log, re.M), log
    for line in log.splitlines():  # every line is one of the log's own
        assert not line.strip() or re.match(rf"{TS} ", line), line
    assert not RAW.search(log), [ln for ln in log.splitlines() if RAW.search(ln)]
    assert f"emperor: [{shown}] adopted pid" in log
    assert "\\e[31m\\x07" in log  # the value, escaped in its error line

    # `emperor status`: the table and its error lines
    out = subprocess.run([EMPEROR, "status", "--dir", fleet.dir], capture_output=True,
                         text=True, timeout=30, env=fleet.env)
    assert out.returncode == 0, out.stderr
    assert not RAW.search(out.stdout), out.stdout
    assert any(line.startswith(shown + " ") for line in out.stdout.splitlines()), out.stdout
    assert "\\e[31m\\x07" in out.stdout
    # --json: JSON's own escapes
    out = subprocess.run([EMPEROR, "status", "--dir", fleet.dir, "--json"],
                         capture_output=True, text=True, timeout=30, env=fleet.env)
    assert not RAW.search(out.stdout) and EVIL in json.loads(out.stdout)["vassals"]
    # a client command naming it
    out = subprocess.run([EMPEROR, "reload", EVIL, "--dir", fleet.dir], capture_output=True,
                         text=True, timeout=60, env=fleet.env)
    assert out.returncode == 0, out.stderr
    assert not RAW.search(out.stdout + out.stderr) and shown in out.stdout + out.stderr

    # the page, and the vassal's recent lines
    code, html, _ = request(fleet, "/", headers=basic(TOKEN))
    assert code == 200 and not RAW.search(html) and shown in html
    code, lines, _ = request(fleet, "/log/" + "".join(f"%{b:02X}" for b in EVIL.encode()),
                             headers=basic(TOKEN))
    assert code == 200 and not RAW.search(lines) and "adopted pid" in lines


@needs_perl
@needs_nginx
def test_the_run_directory_is_private(fleet):
    run = fleet.run_root / "fresh" / default_stats_path(fleet.dir).parent.name
    wait_for(lambda: (run / "sockets" / "fronted.sock").exists()
             or any((run / "sockets").glob("*.sock")), 15, "the front door's vassal socket")
    assert run.parent == fleet.run_root / "fresh"
    st = os.stat(run)
    if os.geteuid() == 0:  # nginx's workers run as www-data: their group alone passes
        import grp
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, grp.getgrnam("www-data").gr_gid), \
            (oct(st.st_mode), st.st_gid)
    else:
        assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    assert (run / "nginx").is_dir()
