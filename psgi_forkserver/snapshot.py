"""Read-only snapshots of the Emperor and its vassals: all that status.py sees.

The Emperor copies its state into these once per status request
(`Emperor.snapshot`, `Vassal.snapshot`); status readers never hold the live
objects, so the arrow points one way: the Emperor knows status.py, status.py
knows only this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .proc import Kind, Phase


@dataclass(frozen=True)
class VassalSnapshot:
    """A vassal as status readers see it (`Vassal.snapshot`): copied, read-only."""

    name: str
    phase: Phase
    pid: int | None  # the current process
    kind: Kind | None  # of the current process (or the last one)
    base_generation: int  # the base generation the current process runs on (is, for a base)
    processes_started: int  # how many processes it has had
    restarts: int  # started again after an unexpected death or a kill
    failures: int  # consecutive deaths without being loyal or stable
    started_at: float | None  # the current process's start (monotonic)
    not_before: float  # THROTTLED: when it is started again (monotonic)
    file: str | None  # its vassal file (the running one's once the file is gone)
    config_error: str | None  # why its file cannot be used
    refused: str | None  # why the Emperor cannot take it on
    last_error: str | None  # the last failure the Emperor logged
    error_seq: int | None = None  # the process last_error is about (its sequence number)
    last_output: tuple[str, ...] = ()  # the last lines that process wrote (why it died)
    pids: tuple[int, ...] = ()  # every process it has: the current one first
    addresses: tuple[str, ...] = ()  # its http-socket(s)
    names: tuple[str, ...] = ()  # the host names it answers for (`domain`)
    last_status: int | None = None  # wait status of its last process that exited
    held: bool = False  # stopped by the operator (`emperor stop NAME`)
    is_base: bool = False
    plack_env: str | None = None  # the PLACK_ENV its processes run with
    cgroup: str | None = None  # its current process's cgroup (emperor/cgroups.py), if it has one
    last_heartbeat: float | None = None  # its current process's last heartbeat (monotonic)
    operator_reloads: int = 0  # `emperor reload NAME` carried out


@dataclass(frozen=True)
class EmperorSnapshot:
    vassals_dir: str | None
    shutting_down: bool = False
    # code deploys (deploys.DeployTracker.as_dict): `emperor reload-base --wait` polls this
    deploy: dict[str, Any] | None = None
    # the front door (frontdoor.FrontDoor.state): nginx's pid, generation, errors
    front: dict[str, Any] | None = None
    vassals: dict[str, VassalSnapshot] = field(default_factory=dict)
    cgroup: str | None = None  # the vassals' subtree (emperor/cgroups.py); None: not used
    # adopted vassals born in their cgroup (the base's clone3), and moved
    # there by the Emperor (emperor/cgroups.py); None: cgroups not used
    cgroup_adoptions: dict[str, int] | None = None
    rescans: int = 0  # full rescans of the vassals directory so far


@dataclass(frozen=True)
class EmperorLink:
    """All the status server knows of the Emperor: callables it is attached with."""

    snapshot: Callable[[], EmperorSnapshot]
    health: Callable[[], tuple[bool, str]]  # /healthz: (healthy, why)
    log_lines: Callable[[str], list[str] | None]  # a vassal's recent lines; None: no such vassal
    control: Callable[[str, str | None], dict[str, Any]]  # an operator's command, its reply
    metrics: Any = None  # metrics.EmperorMetrics: the Emperor's own counters
    ready: Callable[[], tuple[bool, str]] | None = None  # /readyz: (ready, why)
    # `emperor logs NAME`: (name, since) -> the reply (control.logs)
    logs: Callable[[str, int | None], dict[str, Any]] | None = None


def config_values(cfg: Any, key: str) -> tuple[str, ...]:
    """Every value of a repeatable key (split on commas and blanks), once each."""
    out: list[str] = []
    if cfg is None:
        return ()
    for raw in cfg.get_all(key):
        out += [x for x in str(raw).replace(",", " ").split() if x not in out]
    return tuple(out)
