"""`FrontDoorOptions`: how the front door is run (nginx on an address, or
an operator's nginx's include file), made by the command line, read by
the front door's parts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_KEEPALIVE


@dataclass
class FrontDoorOptions:
    run_dir: Path
    listen: str | None = None  # --http: run nginx on this address
    include: Path | None = None  # --nginx-include: keep this file up to date
    reload_cmd: str | None = None  # --nginx-reload: run after each write of `include`
    nginx: str | None = None  # the nginx binary (default: from PATH)
    keepalive: int = DEFAULT_KEEPALIVE  # idle connections nginx keeps per vassal (0: none)
    workers: int | None = None  # nginx's worker processes (None: config.default_workers)
    access_log: bool = True  # nginx's access log, in the Emperor's log
    log_format: str = "text"  # its lines' format: the Emperor's --log-format
    user: str | None = None  # nginx's `user` (USER GROUP) of its workers, as root
    worker_gid: int | None = None  # that group: the vassals' sockets are given to it
    batch: float = 0.05  # a change waits this long for the others of its turn
    min_gap: float = 1.0  # seconds between two reloads at least
    # a change the host links serve meanwhile waits until the routes were
    # still this long (nginx's reload closes its idle keep-alive
    # connections: a client's request crossing that close fails), at most
    # `settle_max` seconds
    settle: float = 10.0
    settle_max: float = 300.0
    backoff_first: float = 1.0
    backoff_max: float = 30.0
    stable_after: float = 10.0
