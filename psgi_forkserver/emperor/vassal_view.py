"""What a vassal reads as, without changing it: its current process's
fields flat (`pid`, `kind`, ...), its processes, whether it is seamless or
on demand, its backoff, and the copy status readers get (`snapshot`).

A mixin of `vassal.Vassal`, whose fields (declared there) it only reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..proc import Kind, Phase, Proc
from ..snapshot import VassalSnapshot, config_values

if TYPE_CHECKING:
    from ..config import VassalConfig


class VassalView:
    """The read-only side of a Vassal (a mixin of it)."""

    if TYPE_CHECKING:  # Vassal's fields, read here
        name: str
        config: VassalConfig | None
        is_base: bool
        owns_socket: bool
        auto_socket: bool
        phase: Phase
        current: Proc | None
        successor: Proc | None
        retiring: list[Proc]
        since: float
        not_before: float
        failures: int
        last_status: int | None
        processes_started: int
        restarts: int
        operator_reloads: int
        last_kind: Kind | None
        last_error: str | None
        error_seq: int | None
        held: bool
        refused: str | None

    @property
    def pid(self) -> int | None:
        return self.current.pid if self.current else None

    @property
    def kind(self) -> Kind | None:
        return self.current.kind if self.current else self.last_kind

    @property
    def started_at(self) -> float | None:
        return self.current.started_at if self.current else None

    @property
    def running(self) -> VassalConfig | None:
        return self.current.config if self.current else None

    @property
    def last_heartbeat(self) -> float | None:
        return self.current.last_heartbeat if self.current else None

    @property
    def stop_deadline(self) -> float | None:
        return self.current.stop_deadline if self.current else None

    @property
    def killed(self) -> bool:
        return self.current.killed if self.current else False

    @property
    def base_generation(self) -> int:
        return self.current.base_generation if self.current else 0

    @property
    def seamless(self) -> bool:
        """Reloads overlap (a successor, then the old process stops): the
        Emperor owns the vassal's socket, so both serve on it."""
        cfg = self.config
        return self.owns_socket and not self.is_base and cfg is not None and bool(
            cfg.get("http-socket") or cfg.get("socket")
            or (self.auto_socket and cfg.get("domain")))

    @property
    def on_demand(self) -> bool:
        cfg = self.config
        raw = (cfg.get("on-demand") or "") if cfg else ""
        return raw.lower() in ("1", "true", "yes", "on")

    @property
    def serving_generation(self) -> int:
        """Base: the generation of the base process that serves (0: none)."""
        cur = self.current
        return cur.base_generation if cur is not None and cur.kind == Kind.BASE else 0

    @property
    def has_process(self) -> bool:
        return self.current is not None or self.successor is not None or bool(self.retiring)

    def procs(self) -> list[Proc]:
        return [p for p in (self.current, self.successor, *self.retiring) if p is not None]

    def proc(self, seq: int | None = None, pid: int | None = None) -> Proc | None:
        if seq is None and pid is None:
            return self.current
        for p in self.procs():
            if (seq is not None and p.seq == seq) or (pid is not None and p.pid == pid):
                return p
        return None

    def snapshot(self, plack_env: str | None = None) -> VassalSnapshot:
        """What status readers see: a copy, so they never hold the machine.
        `plack_env`: the Emperor's, for a file without a plack-env key."""
        cfg = self.config or self.running
        pids = [p.pid for p in (self.current, self.successor, *self.retiring)
                if p is not None and p.pid is not None]
        return VassalSnapshot(
            name=self.name, phase=self.phase, pid=self.pid, kind=self.kind,
            base_generation=self.base_generation, processes_started=self.processes_started,
            restarts=self.restarts, operator_reloads=self.operator_reloads,
            failures=self.failures, started_at=self.started_at,
            not_before=self.not_before, file=str(cfg.path) if cfg is not None else None,
            config_error=self.config.error if self.config is not None else None,
            refused=self.refused, last_error=self.last_error, error_seq=self.error_seq,
            pids=tuple(pids),
            addresses=config_values(cfg, "http-socket"), names=config_values(cfg, "domain"),
            last_status=self.last_status, held=self.held, is_base=self.is_base,
            last_heartbeat=self.last_heartbeat,
            plack_env=(cfg.get("plack-env") if cfg is not None else None) or plack_env)

    @property
    def backoff(self) -> float:
        return max(0.0, self.not_before - self.since) if self.phase == Phase.THROTTLED else 0.0
