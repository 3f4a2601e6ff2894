"""The status document as people read it: the HTML page and the table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..printable import printable

def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def columns(text: str) -> int:
    """The terminal columns `text` (printable: no control characters) takes:
    two for a CJK character, none for a combining accent."""
    # imported here: its tables are a tenth of the Emperor's imports, which
    # stand between its start and its base's (the table is the CLI's)
    from wcwidth import wcswidth

    n = wcswidth(text)
    return n if n >= 0 else len(text)


_env = None
#: the page reads /json again this often (in place, see status.html)
PAGE_REFRESH = 2.0


def render_html(doc: dict[str, Any]) -> str:
    global _env
    if _env is None:
        import jinja2

        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent.parent / "templates")),
            autoescape=True,
            # names and values with control characters are shown escaped
            finalize=lambda v: printable(v) if type(v) is str else v,
            undefined=jinja2.ChainableUndefined,  # a missing field shows as empty
        )
        _env.filters["bytes"] = human_bytes
        _env.filters["seconds"] = human_seconds
    counts: dict[str, int] = {}
    for v in doc.get("vassals", {}).values():
        counts[str(v.get("state"))] = counts.get(str(v.get("state")), 0) + 1
    return _env.get_template("status.html").render(
        doc=doc, counts=sorted(counts.items()), refresh_ms=int(PAGE_REFRESH * 1000))


COLUMNS = ("NAME", "STATE", "KIND", "PID", "GEN", "BASE", "ADDRESS", "UPTIME", "RESTARTS",
           "LAST EXIT", "THROTTLE", "PROCS", "PSS", "USS", "REQS", "AVG MS", "PLACK_ENV", "CGROUP")


def front_line(f: dict[str, Any]) -> str:
    """The front door in one line: nginx, its configuration, its last error."""
    where = f.get("listen") or f.get("include") or "-"
    ago = "-" if not f.get("last_reload") else human_seconds(time.time() - f["last_reload"]) + " ago"
    line = (f"front door {where}: nginx pid {f.get('pid') or '-'}, generation "
            f"{f.get('generation')} (serving {f.get('serving_generation')}), "
            f"{f.get('names', 0)} names, {f.get('reloads', 0)} reloads, "
            f"{f.get('restarts', 0)} restarts, last {ago}")
    if f.get("last_error"):
        line += f"; error: {f['last_error']}"
    for vassal, why in (f.get("refused") or {}).items():
        line += f"\nfront door refused {vassal}: {why}"
    return line


def _below(cgroup: str | None, subtree: str | None) -> str:
    """A vassal's cgroup as the table shows it: below the Emperor's subtree
    (named on the last line)."""
    if not cgroup:
        return "-"
    if subtree and cgroup.startswith(subtree.rstrip("/") + "/"):
        return cgroup[len(subtree.rstrip("/")) + 1:]
    return cgroup


def format_table(doc: dict[str, Any]) -> str:
    rows = []
    for name, v in doc.get("vassals", {}).items():
        rows.append((
            name, v.get("state") or "-", v.get("kind") or "-",
            str(v["pid"]) if v.get("pid") else "-",
            str(v.get("generation", "-")),
            "-" if not v.get("base_generation") else str(v["base_generation"]),
            " ".join(v.get("addresses") or []) or "-",
            human_seconds(v.get("uptime")), str(v.get("restarts", "-")),
            v.get("last_exit") or "-",
            human_seconds(v["throttle"]) if v.get("throttle") else "-",
            str(v.get("processes", 0)), human_bytes(v.get("pss")), human_bytes(v.get("uss")),
            "-" if v.get("requests") is None else str(v["requests"]),
            "-" if v.get("latency_avg_ms") is None else f"{v['latency_avg_ms']:.1f}",
            v.get("plack_env") or "-",
            _below(v.get("cgroup"), doc.get("emperor", {}).get("cgroup")),
        ))
    rows = [tuple(printable(c) for c in r) for r in rows]
    widths = [max([len(c)] + [columns(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15}

    def fmt(cells):
        return "  ".join(
            " " * (w - columns(c)) + c if i in right else c + " " * (w - columns(c))
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines = [fmt(COLUMNS), *map(fmt, rows)]
    for name, v in doc.get("vassals", {}).items():
        name = printable(name)
        if v.get("error"):
            lines.append(f"{name}: {printable(v['error'])}")
        elif v.get("last_error"):
            lines.append(f"{name}: (earlier) {printable(v['last_error'])}")
        if v.get("spares"):
            sp = v["spares"]
            lines.append(f"{name}: {sp['count']} spares, {sp.get('ready', 0)} warm "
                         f"({len(sp['pids'])} processes), PSS {human_bytes(sp['pss'])}, "
                         f"USS {human_bytes(sp.get('uss'))} (counted in its own)")
    e = doc.get("emperor", {})
    t = doc.get("totals", {})
    front = e.get("front")
    if front:
        lines.append(front_line(front))
    lines.append(
        f"emperor pid {e.get('pid')}  rss {human_bytes(e.get('rss'))}  "
        f"cpu {e.get('cpu_user', 0) + e.get('cpu_system', 0):.2f}s ({e.get('cpu_percent', 0):.1f}%)  "
        f"up {human_seconds(e.get('uptime'))}  |  {t.get('vassals', 0)} vassals, "
        f"{t.get('processes', 0)} processes, PSS {human_bytes(t.get('pss'))}, "
        f"USS {human_bytes(t.get('uss'))}  |  collected in {doc.get('collect_ms', 0):.1f} ms "
        f"over {doc.get('turns', 1)} loop turns"
    )
    if e.get("cgroup"):
        lines.append(f"cgroups below {printable(e['cgroup'])}")
    return "\n".join(lines) + "\n"
