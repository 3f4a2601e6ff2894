"""The test apps, the vassal files a test writes (`base_ini` is the one
writer of a base vassal's file), and HTTP to an app on loopback."""

from __future__ import annotations

import http.client
import os
import urllib.request
from pathlib import Path

import pytest

from psgi_forkserver import paths

TESTS = Path(__file__).resolve().parent.parent
APPS = TESTS / "apps"
APP = APPS / "hello.psgi"
DAEMON = APPS / "daemon.psgi"
PROGRAM = paths.vassal_program()

needs_program = pytest.mark.skipif(
    not PROGRAM.is_file() or os.path.getsize(PROGRAM) < 200,
    reason="the Perl vassal program is not there yet",
)


def base_ini(app: Path | str = APP, fork_server: Path | str = "fs.sock", *lines: str) -> str:
    """A base vassal's file: preload `app`, listen on `fork_server` (relative
    to the vassals directory), then `lines` as they are ("key = value")."""
    return "".join(f"{line}\n" for line in ("[uwsgi]", f"early-psgi = {app}", f"fork-server = {fork_server}",
                                             *lines))


def app_ini(name: str, port: int, value: str = "v1", processes: int = 2) -> str:
    return (
        "[uwsgi]\n"
        f"http-socket = 127.0.0.1:{port}\n"
        f"processes = {processes}\n"
        f"env = APP_NAME={name}\n"
        f"env = APP_VALUE={value}\n"
        "disable-logging = true\n"
    )


def daemon_ini(name: str, port: int) -> str:
    return ("[uwsgi]\n" f"http-socket = 127.0.0.1:{port}\n" f"psgi = {DAEMON}\n"
            f"processes = 1\nenv = APP_NAME={name}\ndisable-logging = true\n")


def get(port: int, timeout: float = 2.0) -> dict[str, str]:
    """GET / of a test app: its `key=value` words (name, value, pid...)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as r:
        assert r.status == 200
        body = r.read().decode()
    return dict(kv.split("=", 1) for kv in body.split())


def refused(port: int) -> bool:
    try:
        get(port, timeout=1)
    except OSError:
        return True
    return False


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> str:
    """The body of GET `path`, asserted 200."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, (r.status, body)
        return body
    finally:
        c.close()


def spawn_left_behind(port: int, query: str) -> int:
    """A `sleep` the vassal double-forks (daemon.psgi): its pid."""
    body = http_get(port, f"/spawn?{query}")
    pid = int(dict(kv.split("=", 1) for kv in body.split())["daemon"])
    assert pid > 0, body
    return pid
