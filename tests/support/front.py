"""The front door in tests: an Emperor with `--http` (nginx in front,
routing by name), the vassal files it routes, and requests by host name."""

from __future__ import annotations

import http.client
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from psgi_forkserver import frontdoor

from .apps import APPS
from .emperors import Emp, Emperors
from .processes import free_port, wait_for

FRONT_APP = APPS / "front.psgi"
NGINX = frontdoor.find_nginx()

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make setup)")


def ini(name: str, *lines: str, value: str = "v1", processes: int = 1) -> str:
    return "\n".join(["[uwsgi]", f"processes = {processes}", f"env = APP_NAME={name}",
                      f"env = APP_VALUE={value}", "disable-logging = true", *lines]) + "\n"


def fetch(port: int, host: str, path: str = "/", timeout: float = 10.0
          ) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of GET http://HOST:PORT/ sent to loopback."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def answer(port: int, host: str) -> dict[str, str]:
    status, _, body = fetch(port, host)
    assert status == 200, (status, body)
    return dict(kv.split("=", 1) for kv in body.split())


def answers(port: int, host: str, name: str) -> bool:
    try:
        return answer(port, host)["name"] == name
    except (AssertionError, OSError):
        return False


def status_of(port: int, host: str) -> int:
    try:
        return fetch(port, host)[0]
    except OSError:
        return 0


@dataclass
class Front(Emp):
    """An Emperor with its front door: nginx on `port`, its files in `run`."""

    run: Path = Path()
    port: int = 0

    def settled(self) -> bool:
        """nginx runs one generation of workers: after a reload it runs the
        old ones beside the new for 100 ms or more (they still accept),
        so a request may meet the routing before the last change."""
        try:
            kids = psutil.Process(self.nginx_pid()).children()
            titles = [" ".join(k.cmdline()) for k in kids]
        except psutil.Error:
            return False
        m = re.search(r"^worker_processes (\d+);", (self.run / "nginx" / "nginx.conf").read_text(), re.M)
        return m is not None and len(kids) == int(m.group(1)) \
            and not any("shutting down" in t for t in titles)

    def routed(self, host: str, name: str, timeout: float = 30) -> None:
        """`host` answers from vassal `name`, and keeps doing so: nginx's
        workers of older routings are gone."""
        wait_for(lambda: answers(self.port, host, name), timeout, f"{host} -> {name}")
        wait_for(self.settled, timeout, "nginx's old workers to leave")
        assert answers(self.port, host, name)

    def nginx_pid(self) -> int:
        lines = self.lines("[front] nginx pid ")
        assert lines, self.text()
        return int(lines[-1].split("nginx pid ")[1].split()[0])


class FrontDoors(Emperors):
    """Emperors with `--http` on a free port and `--run-dir` of their own;
    the base preloads front.psgi."""

    kind = Front

    def __init__(self, xprocess) -> None:
        super().__init__(xprocess, "pfs-fd-", stats=False, shared=True, app=FRONT_APP, args=(
            "--mercy", "5", "--rescan-interval", "2", "--backoff-first", "0.5", "--backoff-max", "4",
            "--reload-grace", "0.3", "--http-settle", "2"))
        self.port = 0

    def args_in(self, top: Path) -> list:
        self.port = free_port()
        return ["--http", f"127.0.0.1:{self.port}", "--run-dir", top / "run"]

    def __call__(self, files: dict, *extra, **kw) -> Front:
        f = super().__call__(files, *extra, **kw)
        assert isinstance(f, Front)
        f.port, f.run = self.port, f.dir.parent / "run"
        return f
