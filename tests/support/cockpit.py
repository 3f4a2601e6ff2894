"""The cockpit's tests: `emperor` run as a command, a page fetched over
HTTP whatever its status, and the one fleet each cockpit module shares."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

from psgi_forkserver import status

from .apps import APPS, app_ini, get
from .emperors import EMPEROR, Emp, Emperors
from .processes import free_port, wait_for

DIES = APPS / "dies.psgi"


def emperor_cli(*args, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([EMPEROR, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def cockpit_fleet(xprocess) -> Iterator[Emp]:
    """An Emperor with its status page on HTTP and no --stats (the default
    socket in the run directory), running `a` (2 workers), `b` and `dies`
    (an app that dies as it loads), once both answer and `dies` failed."""
    ports = {"a": free_port(), "b": free_port()}
    http_port = free_port()
    # no --stats: the default socket in the run directory (tests/conftest.py)
    emperors = Emperors(xprocess, "pfs-cockpit-", stats=False, args=[
        "--mercy", "5", "--rescan-interval", "600", "--backoff-max", "2", "--status-http", f"127.0.0.1:{http_port}"])
    try:
        f = emperors({"a": app_ini("a", ports["a"], processes=2), "b": app_ini("b", ports["b"], processes=1),
                      "dies": f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {DIES}\n"})
        f.ports, f.status_http_port, f.stats = ports, http_port, status.default_stats_path(f.dir)
        for name, port in ports.items():
            wait_for(lambda p=port, n=name: get(p)["name"] == n, 40, f"{name} to answer")
        wait_for(lambda: f.vassal("dies")["failures"] >= 1, 40, "dies to fail")
        yield f
    finally:
        emperors.stop()
