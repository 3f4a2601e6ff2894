"""The Emperor's side of the status link: snapshots, health, logs, and commands.

`link(emperor)` is all the status server gets (an `EmperorLink`): a
read-only snapshot of the fleet, /healthz's answer, a vassal's recent log
lines, and the operator's commands over the stats socket (reload, stop,
start NAME, reload-base). A command is told to the vassal as a fact
(`hold`, `release`, `request_reload`, `request_deploy`) and the loop's next
turn acts on it, at once (`again`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .notify import settled
from .options import plack_env_of
from .snapshot import EmperorLink, EmperorSnapshot, VassalSnapshot
from .status import SCHEMA
from .vassal import Kind, ProcState, Vassal

if TYPE_CHECKING:
    from .emperor import Emperor

COMMANDS = ("reload", "stop", "start", "reload-base", "reopen-logs")


def link(emperor: Emperor) -> EmperorLink:
    return EmperorLink(lambda: snapshot(emperor), lambda: health(emperor),
                       lambda name: log_lines(emperor, name),
                       lambda command, name: control(emperor, command, name), emperor.metrics,
                       lambda: readiness(emperor), lambda name, since: logs(emperor, name, since))


def snapshot(emperor: Emperor) -> EmperorSnapshot:
    """A read-only copy of the fleet: what the status package reads."""
    cg = emperor.cgroups
    vassals = {name: v.snapshot(plack_env_of(emperor.opts)) for name, v in emperor.vassals.items()}
    if cg is not None:
        for name, v in emperor.vassals.items():
            p = v.current
            if p is not None and p.pid is not None:
                vassals[name] = dataclasses.replace(vassals[name], cgroup=cg.path_of(name, p.seq))
    return EmperorSnapshot(
        vassals_dir=str(emperor.dir), shutting_down=emperor.shutting_down,
        deploy=emperor.deploy_status(),
        front=emperor.front.state() if emperor.front is not None else None,
        vassals={name: _with_last_output(emperor, v) for name, v in vassals.items()},
        cgroup=cg.path_of_dir(cg.root) if cg is not None else None)


def _with_last_output(emperor: Emperor, s: VassalSnapshot) -> VassalSnapshot:
    """The snapshot with what the process its last error is about wrote
    last (read from its pipe up to its end, after it was reaped too)."""
    words = emperor.last_output(s.name, s.error_seq)
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


def _reload_base(emperor: Emperor, out: dict[str, Any]) -> dict[str, Any]:
    deploys = emperor.deploys
    emperor.reload_base()
    last = deploys.last
    out["requests"] = deploys.requests
    if last is not None and last.request == deploys.requests and last.state.finished \
            and last.reason:
        out["message"] = f"refused: {last.reason}"
        return out
    base = emperor._base()
    gen = base.want_base_generation if base is not None else None
    out.update(ok=True, generation=gen, message=f"code deploy to base generation {gen} started")
    return out


def control(emperor: Emperor, command: str, name: str | None) -> dict[str, Any]:
    """Carry out one operator command in the Emperor's loop; the reply says
    what happened (`ok`, `message`). The loop's next turn acts on it."""
    out: dict[str, Any] = {"schema": SCHEMA, "command": command, "name": name, "ok": False}
    if command not in COMMANDS:
        out["message"] = f"unknown command {command!r} (one of: {', '.join(COMMANDS)})"
        return out
    log = emperor.log
    if command == "reopen-logs":  # logs.py: every log file reopened by its path
        errors = emperor.reopen_logs()
        out.update(ok=not errors, message="; ".join(errors) or "log files reopened")
        return out
    if command == "reload-base":
        return _reload_base(emperor, out)
    v = emperor.vassals.get(name) if name else None
    if v is None:
        known = ", ".join(sorted(emperor.vassals)) or "none"
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
            return control(emperor, "reload-base", None) | {"name": name}
        v.request_reload()
        log("reload: asked by the operator", v.name)
        out.update(ok=True, message=f"reloading pid {v.pid}" if v.pid else "starting now")
    emperor.again = True
    out["vassal"] = vassal_brief(v)
    return out


def health(emperor: Emperor) -> tuple[bool, str]:
    """/healthz: (healthy, why). The answer comes from the Emperor's loop
    itself, so an answer means the loop turns; the rest is the base: up
    (a fork server that accepts) when there is one."""
    if emperor.shutting_down:
        return False, "shutting down"
    if emperor.front is not None:
        ok, why = emperor.front.health()
        if not ok:
            return False, why
    base = emperor._base()
    if base is None:
        if emperor.opts.use_fork_server is not None:
            if emperor.external_ready:
                return True, "ok: loop turns, external fork server accepts"
            return False, "external fork server does not accept"
        return True, "ok: loop turns, no base vassal"
    cur = base.current
    if cur is not None and cur.kind == Kind.BASE and cur.state in (ProcState.RUNNING,
                                                                     ProcState.LOYAL):
        return True, f"ok: loop turns, base {base.name} generation {cur.base_generation} up"
    return False, f"base {base.name} is {base.phase.value}"


def readiness(emperor: Emperor) -> tuple[bool, str]:
    """/readyz: (ready, why). Ready is systemd's READY=1 rule (notify.settled)
    for every vassal there is now, the Emperor healthy (/healthz), and the
    front door, when there is one, running nginx on the routes of now."""
    ok, why = health(emperor)
    if not ok:
        return False, why
    waiting = sorted(name for name, v in emperor.vassals.items() if not settled(v.snapshot()))
    if waiting:
        more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        return False, f"not settled: {', '.join(waiting[:5])}{more}"
    front = emperor.front
    if front is not None:
        if front.embedded and front.pid is None:
            return False, "front door: nginx is not running"
        if front.routes is None or front.dirty_since is not None or front.reload_pid is not None:
            return False, "front door: routes not applied yet"
    return True, f"ready: {len(emperor.vassals)} vassals settled"


def logs(emperor: Emperor, name: str, since: int | None) -> dict[str, Any]:
    """`emperor logs NAME`: the vassal's recent lines (all that are kept, or
    those after the `since`-th line ever kept for it), and `next`, the
    `since` of the next ask."""
    out: dict[str, Any] = {"schema": SCHEMA, "command": "logs", "name": name, "ok": False}
    lines = emperor.recent.get(name)
    if lines is None and name not in emperor.vassals:
        known = ", ".join(sorted(emperor.vassals)) or "none"
        out["message"] = f"no vassal {name!r} (vassals: {known})"
        return out
    kept = list(lines or ())
    total = emperor.recent_total.get(name, 0)
    if since is not None and 0 <= since <= total:
        kept = kept[len(kept) - min(len(kept), total - since):]
    out.update(ok=True, lines=kept, next=total)
    return out


def log_lines(emperor: Emperor, name: str) -> list[str] | None:
    """A vassal's recent log lines (/log/NAME); None: no such vassal."""
    lines = emperor.recent.get(name)
    if lines is None and name not in emperor.vassals:
        return None
    return list(lines or ())
