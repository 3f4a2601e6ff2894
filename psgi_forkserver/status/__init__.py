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

from __future__ import annotations

from ..lazy import exports, grouped

# imported when first used: a client of the stats socket (`emperor status`)
# needs rundir's functions, not the server, psutil or the page's wcwidth
_EXPORTS = grouped({
    ".document": ("BUDGET", "SCHEMA", "Collection", "collect", "emperor_status", "vassal_status"),
    ".page": ("COLUMNS", "PAGE_REFRESH", "format_table", "human_bytes", "human_seconds",
              "render_html"),
    "..rundir": ("RUN_DIR_ENV", "STATS_NAME", "default_stats_path", "fetch", "fetch_command",
                 "fetch_logs", "find_stats", "run_dir"),
    ".requests": ("MAX_REQUEST",),
    ".served": ("REQUESTS_SLOT", "forget_requests", "read_requests", "requests_path",
                "sweep_requests"),
    ".listen": ("StatusConfigError", "parse_http_address"),
    ".server": ("ACCEPT_PAUSE", "CLIENT_TIMEOUT", "MAX_CLIENTS", "WRITE_TIMEOUT", "StatusServer"),
})

__all__ = sorted(_EXPORTS)
__getattr__ = exports(globals(), _EXPORTS)
