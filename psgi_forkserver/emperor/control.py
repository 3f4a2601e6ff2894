"""The Emperor's side of the status link: snapshots, health, logs, and commands.

`Fleet` is what this module sees of the Emperor: its parts (the vassals
directory, the fork servers, the routes, the recent lines) and a few
callables, never the loop itself. `link(fleet)` is all the status server
gets (an `EmperorLink`): a
read-only snapshot of the fleet, /healthz's answer, a vassal's recent log
lines, and the operator's commands over the stats socket (reload, stop,
start NAME, reload-base). A command is told to the vassal as a fact
(`hold`, `release`, `request_reload`, `request_deploy`) and the loop's next
turn acts on it, at once (`again`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..metrics import EmperorMetrics
from ..options import Options, plack_env_of
from ..snapshot import EmperorLink, EmperorSnapshot, VassalSnapshot
from ..status import SCHEMA
from .bases import ForkServers
from .files import VassalFiles
from .notify import settled
from .recent import RecentLines
from .routing import Routes
from .vassal import Kind, ProcState, Vassal

COMMANDS = ("reload", "stop", "start", "reload-base", "reopen-logs")


@dataclass(frozen=True)
class Fleet:
    """The Emperor's parts, as the status and the operator's commands see them."""

    opts: Options
    files: VassalFiles
    bases: ForkServers
    routes: Routes
    lines: RecentLines
    metrics: EmperorMetrics
    log: Callable[..., None]
    cgroups: Callable[[], Any]  # cgroups.Cgroups once started, or None
    shutting_down: Callable[[], bool]
    reopen_logs: Callable[[], list[str]]
    wake: Callable[[], None]  # the loop's next turn runs at once

    @property
    def vassals(self) -> dict[str, Vassal]:
        return self.files.vassals

    @property
    def front(self):
        return self.routes.front


def link(fleet: Fleet) -> EmperorLink:
    return EmperorLink(lambda: snapshot(fleet), lambda: health(fleet),
                       lambda name: log_lines(fleet, name),
                       lambda command, name: control(fleet, command, name), fleet.metrics,
                       lambda: readiness(fleet), lambda name, since: logs(fleet, name, since))


def snapshot(fleet: Fleet) -> EmperorSnapshot:
    """A read-only copy of the fleet: what the status package reads."""
    cg = fleet.cgroups()
    vassals = {name: v.snapshot(plack_env_of(fleet.opts)) for name, v in fleet.vassals.items()}
    if cg is not None:
        for name, v in fleet.vassals.items():
            p = v.current
            if p is not None and p.pid is not None:
                vassals[name] = dataclasses.replace(vassals[name], cgroup=cg.path_of(name, p.seq))
    return EmperorSnapshot(
        vassals_dir=str(fleet.files.dir), shutting_down=fleet.shutting_down(),
        deploy=fleet.bases.deploy_status(),
        front=fleet.front.state() if fleet.front is not None else None,
        vassals={name: _with_last_output(fleet, v) for name, v in vassals.items()},
        cgroup=cg.path_of_dir(cg.root) if cg is not None else None,
        cgroup_adoptions={"born_in": cg.born_in, "moved": cg.moved,
                          "made_ahead": cg.made_ahead} if cg is not None else None,
        rescans=fleet.files.rescans)


def _with_last_output(fleet: Fleet, s: VassalSnapshot) -> VassalSnapshot:
    """The snapshot with what the process its last error is about wrote
    last (read from its pipe up to its end, after it was reaped too)."""
    words = fleet.lines.last_output(s.name, s.error_seq)
    return dataclasses.replace(s, last_output=words) if words else s


def vassal_brief(v: Vassal) -> dict[str, Any]:
    """What a command's reply says about its vassal (the CLI follows it)."""
    return {
        "state": v.phase.value,
        "pid": v.pid,
        "generation": v.processes_started,
        "last_error": v.last_error,
        "held": v.held,
    }


def _reload_base(fleet: Fleet, out: dict[str, Any]) -> dict[str, Any]:
    deploys = fleet.bases.deploys
    fleet.bases.reload()
    last = deploys.last
    out["requests"] = deploys.requests
    if last is not None and last.request == deploys.requests and last.state.finished \
            and last.reason:
        out["message"] = f"refused: {last.reason}"
        return out
    gen = fleet.bases.wanted_generation()
    out.update(ok=True, generation=gen, message=f"code deploy to base generation {gen} started")
    return out


def control(fleet: Fleet, command: str, name: str | None) -> dict[str, Any]:
    """Carry out one operator command in the Emperor's loop; the reply says
    what happened (`ok`, `message`). The loop's next turn acts on it."""
    out: dict[str, Any] = {"schema": SCHEMA, "command": command, "name": name, "ok": False}
    if command not in COMMANDS:
        out["message"] = f"unknown command {command!r} (one of: {', '.join(COMMANDS)})"
        return out
    log = fleet.log
    if command == "reopen-logs":  # logs.py: every log file reopened by its path
        errors = fleet.reopen_logs()
        out.update(ok=not errors, message="; ".join(errors) or "log files reopened")
        return out
    if command == "reload-base":
        return _reload_base(fleet, out)
    v = fleet.vassals.get(name) if name else None
    if v is None:
        known = ", ".join(sorted(fleet.vassals)) or "none"
        out["message"] = f"no vassal {name!r} (vassals: {known})"
        return out
    out["vassal"] = vassal_brief(v)
    if v.config is None:
        out["message"] = "its file is gone: it is stopping for good"
        return out
    if v.config.error is not None:
        out["message"] = f"its file cannot be used: {v.config.error}"
        return out
    if command == "stop":
        if v.is_base:
            out["message"] = ("is a base: the fleet's adoptions need it "
                              "(`emperor reload-base` deploys a new one)")
            return out
        if v.held:
            out.update(ok=True, message="already stopped" if not v.has_process else "stopping")
            return out
        v.hold()
        log("stop: asked by the operator", v.name)
        out.update(ok=True, message=f"stopping pid {v.pid}" if v.pid else "stopped")
    elif command == "start":
        if not v.held:
            what = f"already running (pid {v.pid})" if v.pid else f"already wanted ({v.phase})"
            v.release()  # a throttled one starts now
            out.update(ok=True, message=what)
            return out
        v.release()
        log("start: asked by the operator", v.name)
        out.update(ok=True, message="starting")
    else:  # reload
        if v.held:
            out["message"] = f"is stopped: `emperor start {v.name}` runs it again"
            return out
        if v.is_base:
            return control(fleet, "reload-base", None) | {"name": name}
        v.request_reload()
        log("reload: asked by the operator", v.name)
        out.update(ok=True, message=f"reloading pid {v.pid}" if v.pid else "starting now")
    fleet.wake()
    out["vassal"] = vassal_brief(v)
    return out


def health(fleet: Fleet) -> tuple[bool, str]:
    """/healthz: (healthy, why). The answer comes from the Emperor's loop
    itself, so an answer means the loop turns; the rest is the base: up
    (a fork server that accepts) when there is one."""
    if fleet.shutting_down():
        return False, "shutting down"
    if fleet.front is not None:
        ok, why = fleet.front.health()
        if not ok:
            return False, why
    base = fleet.bases.base()
    if base is None:
        if fleet.opts.use_fork_server is not None:
            if fleet.bases.external_ready:
                return True, "ok: loop turns, external fork server accepts"
            return False, "external fork server does not accept"
        return True, "ok: loop turns, no base vassal"
    cur = base.current
    if cur is not None and cur.kind == Kind.BASE and cur.state in (ProcState.RUNNING,
                                                                     ProcState.LOYAL):
        return True, f"ok: loop turns, base {base.name} generation {cur.base_generation} up"
    return False, f"base {base.name} is {base.phase.value}"


def readiness(fleet: Fleet) -> tuple[bool, str]:
    """/readyz: (ready, why). Ready is systemd's READY=1 rule (notify.settled)
    for every vassal there is now, the Emperor healthy (/healthz), and the
    front door, when there is one, running nginx on the routes of now."""
    ok, why = health(fleet)
    if not ok:
        return False, why
    waiting = sorted(name for name, v in fleet.vassals.items() if not settled(v.snapshot()))
    if waiting:
        more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        return False, f"not settled: {', '.join(waiting[:5])}{more}"
    front = fleet.front
    if front is not None:
        if front.embedded and front.pid is None:
            return False, "front door: nginx is not running"
        if front.routes is None or front.dirty_since is not None or front.reload_pid is not None:
            return False, "front door: routes not applied yet"
    return True, f"ready: {len(fleet.vassals)} vassals settled"


def logs(fleet: Fleet, name: str, since: int | None) -> dict[str, Any]:
    """`emperor logs NAME`: the vassal's recent lines (all that are kept, or
    those after the `since`-th line ever kept for it), and `next`, the
    `since` of the next ask."""
    out: dict[str, Any] = {"schema": SCHEMA, "command": "logs", "name": name, "ok": False}
    lines = fleet.lines.lines(name)
    if lines is None and name not in fleet.vassals:
        known = ", ".join(sorted(fleet.vassals)) or "none"
        out["message"] = f"no vassal {name!r} (vassals: {known})"
        return out
    kept = list(lines or ())
    total = fleet.lines.total.get(name, 0)
    if since is not None and 0 <= since <= total:
        kept = kept[len(kept) - min(len(kept), total - since):]
    out.update(ok=True, lines=kept, next=total)
    return out


def log_lines(fleet: Fleet, name: str) -> list[str] | None:
    """A vassal's recent log lines (/log/NAME); None: no such vassal."""
    lines = fleet.lines.lines(name)
    if lines is None and name not in fleet.vassals:
        return None
    return lines or []
