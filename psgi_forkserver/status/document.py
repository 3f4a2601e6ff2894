"""The status document: what runs and what it costs, from the Emperor's snapshot.

Memory is measured when a client asks: PSS and USS (psutil's
memory_full_info, from /proc/PID/smaps_rollup) summed over each vassal's
process tree (during a reload, the successor's and retiring processes too).
That costs the kernel about 1 ms per 40 MB process, so it is done a slice
(BUDGET) per turn of the Emperor's loop, never in one block; concurrent
requests share one collection, and a process measured less than
MEASURE_INTERVAL ago is not measured again, whatever the number of
clients: the vassals' states and process trees are fresh in every
document, their memory figures at most that old. The document says what
it cost:
`collect_ms` (CPU time measuring), `elapsed_ms` (request to document),
`turns` (loop turns it was spread over).

Its input is an `EmperorSnapshot` (snapshot.py), never the Emperor. The
process trees and their memory are memory.py's, the vassals' own request
counts served.py's.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from ..launch import describe_status
from ..printable import valid_text
from ..procfs import spare_of
from ..proc import Phase
from ..snapshot import EmperorSnapshot, VassalSnapshot
from .memory import measure, process_tree, tree_map
from .served import read_requests

SCHEMA = 1
BUDGET = 0.01  # seconds of measuring per turn of the Emperor's loop




def _told(v: VassalSnapshot) -> str | None:
    """The last failure the Emperor logged, with the last line the process
    wrote before it died when it wrote one (the app's own `die`)."""
    if not v.last_error:
        return None
    if v.last_output:
        return f"{v.last_error}: {v.last_output[-1]}"
    return v.last_error


def _last_error(v: VassalSnapshot) -> str | None:
    """Why the vassal does not run: its file's error or why the Emperor
    refused it (no descriptors to spare), else (while it fails:
    throttled, or failures not yet reset by a loyal start) the last failure
    the Emperor logged, with the exit status."""
    if v.config_error or v.refused:
        return v.config_error or v.refused
    if v.phase == Phase.THROTTLED or v.failures > 0:
        return _told(v)
    return None


def vassal_status(v: VassalSnapshot, now: float,
                  children: dict[int, list[int]]) -> tuple[dict[str, Any], list[int]]:
    """The vassal's document (memory still 0) and the pids to measure."""
    throttled = v.phase == Phase.THROTTLED
    err = _last_error(v)
    doc: dict[str, Any] = {
        "name": v.name,
        "state": v.phase.value,
        "pid": v.pid,
        "kind": v.kind.value if v.kind is not None else None,
        "base_generation": v.base_generation,
        "generation": v.processes_started,
        "uptime": (round(now - v.started_at, 3)
                   if v.pid is not None and v.started_at is not None else None),
        "restarts": v.restarts,
        "operator_reloads": v.operator_reloads,
        "failures": v.failures,
        "throttle": round(max(0.0, v.not_before - now), 3) if throttled else 0.0,
        "file": v.file or None,
        # what the vassal serves: its address, and the host names it answers for
        "addresses": list(v.addresses),
        "names": list(v.names),
        "plack_env": v.plack_env,
        # why it does not run now (None while it is fine) ...
        "error": err,
        # ... and, in every state, the last failure and exit the Emperor saw
        "last_error": err or _told(v),
        # the last lines the process last_error is about wrote (its access log aside)
        "last_output": list(v.last_output),
        "last_exit": describe_status(v.last_status) if v.last_status is not None else None,
        "held": v.held,
        # seconds since its current process's last heartbeat (None: none yet)
        "heartbeat_age": (round(now - v.last_heartbeat, 3)
                          if v.last_heartbeat is not None else None),
        # its current process's cgroup (None: none, or cgroups not used)
        "cgroup": v.cgroup,
        # reported by the vassal itself (None: it reports nothing)
        "requests": None,
        "latency_avg_ms": None,
        "request_seconds": None,
        "processes": 0,
        "pss": 0,
        "uss": 0,
    }
    served = read_requests(v.pid) if v.pid is not None else None
    if served is not None:
        doc["requests"], doc["latency_avg_ms"], doc["request_seconds"] = served
    # every process of the vassal: during a reload, the successor and the
    # retiring ones too
    roots = list(v.pids)
    if len(roots) > 1:
        doc["other_pids"] = roots[1:]
    tree: list[int] = []
    for r in roots:
        tree += [p for p in process_tree(r, children) if p not in tree]
    if doc["kind"] == "base" and roots:
        masters = _spares(roots, children)
        spares = [p for s in masters for p in process_tree(s, children)]
        doc["spares"] = {"count": len(masters),
                         "ready": len([s for s in masters if spare_of(s, ready=True)]),
                         "pids": spares, "pss": 0, "uss": 0}
        tree += [p for p in spares if p not in tree]
    return doc, tree


def _spares(bases: list[int], children: dict[int, list[int]]) -> list[int]:
    """A base's warm spares (perl/ForkServer/Spares.pm): children of the
    Emperor, as adopted vassals are, titled after their base until an
    adoption makes them a vassal."""
    return [c for c in children.get(os.getpid(), ()) if c not in bases and spare_of(c) in bases]


_self_proc: psutil.Process | None = None


def emperor_status(snap: EmperorSnapshot) -> dict[str, Any]:
    global _self_proc
    if _self_proc is None or _self_proc.pid != os.getpid():
        _self_proc = psutil.Process()
        _self_proc.cpu_percent(None)  # first call only starts the measure
    p = _self_proc
    doc: dict[str, Any] = {"pid": p.pid}
    try:
        with p.oneshot():
            cpu = p.cpu_times()
            doc.update(
                rss=p.memory_info().rss,
                cpu_user=round(cpu.user, 3),
                cpu_system=round(cpu.system, 3),
                cpu_percent=p.cpu_percent(None),  # since the previous request
                uptime=round(time.time() - p.create_time(), 3),
                fds=p.num_fds(),
            )
    except psutil.Error:
        pass
    doc["vassals_dir"] = snap.vassals_dir
    doc["shutting_down"] = snap.shutting_down
    doc["rescans"] = snap.rescans  # full rescans of the vassals directory so far
    # code deploys (deploys.DeployTracker.as_dict): `emperor reload-base --wait` polls this
    doc["deploy"] = snap.deploy
    doc["front"] = snap.front

    # the vassals' cgroup subtree (emperor/cgroups.py); None where cgroups are not used
    doc["cgroup"] = snap.cgroup
    # adopted vassals born in their cgroup by the base's clone, and moved
    # there by the Emperor afterwards (a uWSGI base, a warm spare)
    doc["cgroup_adoptions"] = snap.cgroup_adoptions
    return doc


class Collection:
    """One status document, measured a slice at a time.

    Reading /proc/PID/smaps_rollup costs the kernel a page-table walk: about
    1 ms for a 40 MB process, more for a big preloaded Perl. Hundreds of
    vassals with their workers take seconds of CPU, so the Emperor's loop
    calls `step(budget)` once per turn and stays responsive meanwhile.
    The vassals' states and pids are taken at the start (one snapshot).
    """

    def __init__(self, snap: EmperorSnapshot) -> None:
        self.t0 = time.perf_counter()
        self.measure_s = 0.0
        self.turns = 0
        self.measured = 0  # processes measured for this document (the others: reused)
        now = time.monotonic()
        children = tree_map(now)
        vassals = snap.vassals
        self.vassals: dict[str, dict[str, Any]] = {}
        self.todo: list[tuple[str, int]] = []
        for name in sorted(vassals):
            try:
                doc, tree = vassal_status(vassals[name], now, children)
            except Exception as e:  # noqa: BLE001 - one odd vassal must not hide the rest
                doc, tree = {"name": name, "error": f"status: {e!r}"}, []
            self.vassals[name] = doc
            self.todo += [(name, pid) for pid in tree]
        self.todo.reverse()  # pop() in order
        self.emperor = emperor_status(snap)
        self.measure_s += time.perf_counter() - self.t0

    @property
    def done(self) -> bool:
        return not self.todo

    def step(self, budget: float = float("inf")) -> bool:
        """Measure processes for about `budget` seconds; True when all done."""
        t = time.perf_counter()
        deadline = t + budget
        self.turns += 1
        while self.todo:
            name, pid = self.todo.pop()
            pss, uss, n, fresh = measure(pid, time.monotonic())
            self.measured += fresh
            d = self.vassals[name]
            d["pss"] += pss
            d["uss"] += uss
            d["processes"] += n
            if pid in d.get("spares", {}).get("pids", ()):
                d["spares"]["pss"] += pss
                d["spares"]["uss"] += uss  # what they cost: their PSS is mostly their share of the base
            if time.perf_counter() >= deadline:
                break
        self.measure_s += time.perf_counter() - t
        return not self.todo

    def document(self) -> dict[str, Any]:
        out = self.vassals
        # a file name or a value that was not UTF-8 (read with
        # surrogateescape) must not make the JSON, the page or /metrics
        # unencodable: its bytes are written \xNN
        return valid_text({
            "schema": SCHEMA,
            "time": time.time(),
            "emperor": self.emperor,
            "vassals": out,
            "totals": {
                "vassals": len(out),
                "processes": sum(v.get("processes", 0) for v in out.values()),
                "pss": sum(v.get("pss", 0) for v in out.values()),
                "uss": sum(v.get("uss", 0) for v in out.values()),
            },
            # CPU spent measuring, and wall time from request to document
            "collect_ms": round(self.measure_s * 1000, 2),
            "elapsed_ms": round((time.perf_counter() - self.t0) * 1000, 2),
            "turns": self.turns,
            # processes measured for this document; the others' figures are
            # less than MEASURE_INTERVAL old
            "measured": self.measured,
        })


def collect(snap: EmperorSnapshot) -> dict[str, Any]:
    """The status document, all at once (tests, tools)."""
    c = Collection(snap)
    c.step()
    return c.document()
