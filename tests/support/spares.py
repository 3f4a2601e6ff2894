"""Warm spares in tests: a base that keeps `spares` warm, and the spares as
`emperor status` and the Emperor's children show them."""

from __future__ import annotations

from pathlib import Path

import psutil

from psgi_forkserver.procfs import spare_of

from .apps import APPS, base_ini
from .processes import wait_for

WHOAMI = APPS / "whoami.psgi"


def warm_base(spares: int, app: Path = WHOAMI) -> str:
    return base_ini(app, "fs.sock", "early-warmup = /", f"fork-server-spares = {spares}")


def spares(e, count: int) -> dict:
    """The base's spares in `emperor status`, once `count` of them are warm."""
    def ready():
        sp = e.status()["base"].get("spares")
        # each spare and its warm first worker (forked just after the spare)
        return sp if sp and sp["ready"] == sp["count"] == count and len(sp["pids"]) == 2 * count else None
    return wait_for(ready, 30, f"{count} spares in the status")


def spare_masters(e) -> set[int]:
    """The spares themselves, waiting for an adoption (their workers are
    their children), as the Emperor knows them: its children titled after
    the base."""
    base = e.vpid("base")
    return {p.pid for p in psutil.Process(e.pid).children() if spare_of(p.pid) == base}

