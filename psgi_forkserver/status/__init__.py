"""What runs and what it costs: the status document, the stats socket, the page.

- document.py: the document, from the Emperor's snapshot (memory measured
  a slice per loop turn);
- memory.py: the vassals' process trees and their memory;
- served.py: the requests files the vassals write, read and removed;
- server.py: the stats socket and the HTTP status server, in the Emperor's
  selector, attached with an `EmperorLink` (snapshot.py): the only way this
  package sees the Emperor;
- listen.py: the server's listening sockets and their addresses;
- requests.py: what the server's clients ask, and its answers;
- page.py: the HTML page and `emperor status`'s table;
- rundir.py: where the stats socket is, and the clients' side of it.

Every public name is importable from `psgi_forkserver.status`.
"""

from .document import BUDGET, SCHEMA, Collection, collect, emperor_status, vassal_status
from .page import COLUMNS, PAGE_REFRESH, format_table, human_bytes, human_seconds, render_html
from ..rundir import (RUN_DIR_ENV, STATS_NAME, default_stats_path, fetch, fetch_command, fetch_logs,
                     find_stats, run_dir)
from .requests import MAX_REQUEST
from .served import REQUESTS_SLOT, forget_requests, read_requests, requests_path, sweep_requests
from .listen import StatusConfigError, parse_http_address
from .server import ACCEPT_PAUSE, CLIENT_TIMEOUT, MAX_CLIENTS, WRITE_TIMEOUT, StatusServer

__all__ = [
    "ACCEPT_PAUSE", "BUDGET", "CLIENT_TIMEOUT", "COLUMNS", "MAX_CLIENTS", "MAX_REQUEST",
    "PAGE_REFRESH", "REQUESTS_SLOT", "RUN_DIR_ENV", "SCHEMA", "STATS_NAME", "WRITE_TIMEOUT",
    "Collection", "StatusConfigError", "StatusServer", "collect", "default_stats_path",
    "emperor_status", "fetch", "fetch_command", "fetch_logs", "find_stats", "format_table", "forget_requests",
    "human_bytes", "human_seconds", "parse_http_address", "read_requests", "render_html",
    "requests_path", "run_dir", "sweep_requests", "vassal_status",
]
