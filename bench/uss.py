"""What an idle adopted vassal keeps private (`--only uss`).

`emperor run` with the heavy base and a few vassals (`processes = 1`,
never sent a request); once the Emperor says all are loyal and a second
has passed, each vassal's master and worker are read from
/proc/PID/smaps: private pages (Private_Clean + Private_Dirty) summed by
mapping ([heap], [stack], anonymous, perl's own and other libraries,
files), the median over the vassals. The figure it is measured against is
the issue's goal, 2 MB of USS for master and worker together.

USS counts a page in none of a vassal's processes when two of them share it
(the master copied it before it forked its worker): beside it, the pages
the vassal's processes hold that the base does not (distinct page frames
of their writable mappings, /proc/PID/pagemap, as root), what the vassal
adds to the machine's memory, master and worker or one process alike.
"""

from __future__ import annotations

import os
import re
import shlex
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil

from anatomy import frames_by_page
from benchlib import BenchError, Ports, Procs, rmtree

KB = 1024
HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def kind_of(name: str) -> str:
    if not name:
        return "anonymous"
    if name.startswith("["):
        return name.split(":")[0] + "]" if ":" in name else name
    base = os.path.basename(name)
    if "libperl" in base or base == "perl":
        return "perl"
    if ".so" in base:
        return "other libraries (.so)"
    return "files"


def private_by_mapping(pid: int) -> dict[str, int]:
    """Private bytes (clean + dirty) of a process by kind of mapping."""
    out: dict[str, int] = defaultdict(int)
    kind = "anonymous"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = HEADER.match(line)
            if m and not line.startswith(("Private", "Shared", "Size", "Rss", "Pss")):
                kind = kind_of(m.group(1).strip())
                continue
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                out[kind] += int(line.split()[1]) * KB
    return dict(out)


def _pte(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                return int(line.split()[1]) * KB
    return 0


def run(procs: Procs, ports: Ports, tmp: Path, emperor_cls, base_ini, vassal_ini, wait_fork_server,
        wait_loyal_count, say: Callable[[str], None], n: int = 5, spares: int = 0,
        lines: tuple[str, ...] = ()) -> dict:
    say(f"uss: {n} idle adopted heavy vassals under `emperor run` (fork-server-spares = {spares}"
        + "".join(f", {x}" for x in lines) + "), smaps of each master and worker")
    vdir = tmp / f"uss-{spares}-{len(lines)}"
    vdir.mkdir()
    sock = tmp / "uss.sock"
    stats = tmp / "uss-stats.sock"
    (vdir / "base.ini").write_text(base_ini("heavy", sock) + f"fork-server-spares = {spares}\n")
    for i in range(n):
        (vdir / f"u{i}.ini").write_text(vassal_ini(f"u{i}", ports.get(), *lines))
    em = emperor_cls(procs, vdir, "emperor-uss", ["--stats", str(stats)])
    res: dict = {"command": shlex.join(em.argv), "n": n, "spares": spares, "vassal_lines": list(lines)}
    try:
        wait_fork_server(sock, em, 60)
        wait_loyal_count(stats, n, em, 60)
        time.sleep(1.0)
        # the Emperor's children: the base, the vassals, and spares (their title says so)
        kids = [p for p in em.under() if p.ppid() == em.proc.pid and "spare of" not in " ".join(p.cmdline())]
        base = min(kids, key=lambda q: q.create_time())
        base_frames = {fr for fr, _ in (frames_by_page(base.pid) or {}).values()}
        per: list[dict] = []
        for master in kids:
            if master.pid == base.pid:
                continue
            try:
                workers = master.children()
                m = private_by_mapping(master.pid)
                w = [private_by_mapping(q.pid) for q in workers]
            except (OSError, psutil.Error):
                continue
            # psutil's USS (what `emperor status` shows) and the page tables (VmPTE), for comparison
            ps_uss = sum(q.memory_full_info().uss for q in (master, *workers))
            pte = sum(_pte(q.pid) for q in (master, *workers))
            frames = [frames_by_page(q.pid) for q in (master, *workers)]
            added = (len({fr for f in frames for fr, _ in f.values()} - base_frames) * 4 * KB
                     if base_frames and all(frames) else None)
            per.append({"master": m, "workers": w, "psutil_uss": ps_uss, "page_tables": pte, "added": added})
        if not per:
            raise BenchError("no adopted vassal found under the Emperor")
        kinds = sorted({k for p in per for d in (p["master"], *p["workers"]) for k in d})

        def med(f) -> int:
            return int(statistics.median(f(p) for p in per))

        res["master"] = {k: med(lambda p, k=k: p["master"].get(k, 0)) for k in kinds}
        res["worker"] = {k: med(lambda p, k=k: sum(w.get(k, 0) for w in p["workers"])) for k in kinds}
        res["total_master_bytes"] = med(lambda p: sum(p["master"].values()))
        res["total_worker_bytes"] = med(lambda p: sum(sum(w.values()) for w in p["workers"]))
        totals = sorted(sum(p["master"].values()) + sum(sum(w.values()) for w in p["workers"]) for p in per)
        res["min_bytes"], res["max_bytes"] = totals[0], totals[-1]
        res["psutil_uss_bytes"] = med(lambda p: p["psutil_uss"])
        res["page_tables_bytes"] = med(lambda p: p["page_tables"])
        if all(p["added"] is not None for p in per):
            res["added_bytes"] = med(lambda p: p["added"])
            say(f"  pages the vassal holds that the base does not (median): {res['added_bytes'] / KB / KB:.2f} MB")
        res["total_bytes"] = med(lambda p: sum(p["master"].values()) + sum(sum(w.values()) for w in p["workers"]))
        say(f"  USS per idle vassal (median of {len(per)}): {res['total_bytes'] / KB / KB:.2f} MB = master "
            f"{res['total_master_bytes'] / KB:.0f} KB + worker {res['total_worker_bytes'] / KB:.0f} KB; psutil "
            f"{res['psutil_uss_bytes'] / KB / KB:.2f} MB; page tables {res['page_tables_bytes'] / KB:.0f} KB")
        for k in kinds:
            say(f"    {k:24} master {res['master'][k] / KB:7.0f} KB  worker {res['worker'][k] / KB:7.0f} KB")
    finally:
        res["stop_s"] = em.stop()
        rmtree(vdir)
    return res


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    out = []
    for u in r.get("uss") or []:
        if "total_bytes" in u:
            out += _rows(u)
    return out


def _rows(u: dict) -> list[tuple[str, str, str, str]]:
    how = "forked" if u["spares"] == 0 else f"fork-server-spares = {u['spares']}"
    shape = "master + 1 worker"
    if u.get("vassal_lines"):
        how += ", " + ", ".join(u["vassal_lines"])
        shape = "one process" if "master = false" in u["vassal_lines"] else shape
    out = [(f"USS of an idle adopted heavy vassal ({how}; {shape}, never sent a request; "
            f"median of {u['n']})",
            f"{u['total_bytes'] / KB / KB:.2f} MB (master {u['total_master_bytes'] / KB:.0f} KB, worker "
            f"{u['total_worker_bytes'] / KB:.0f} KB; psutil {u['psutil_uss_bytes'] / KB / KB:.2f} MB; "
            f"min / max {u['min_bytes'] / KB / KB:.2f} / {u['max_bytes'] / KB / KB:.2f} MB); "
            f"page tables {u['page_tables_bytes'] / KB:.0f} KB more"
            + (f"; pages its processes hold that the base does not {u['added_bytes'] / KB / KB:.2f} MB"
               if "added_bytes" in u else ""), "<= 2 MB",
            "met" if u["total_bytes"] <= 2 * KB * KB else "**not met**")]
    big = sorted(u["master"], key=lambda k: -(u["master"][k] + u["worker"][k]))
    out.append(("  private by mapping, master / worker",
                "; ".join(f"{k} {u['master'][k] / KB:.0f} / {u['worker'][k] / KB:.0f} KB" for k in big
                          if u["master"][k] + u["worker"][k] >= 8 * KB), "", ""))
    return out
