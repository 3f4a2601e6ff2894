"""The records of the process table (processes.py): a process's OS objects,
what a new one is given, and the facts the table reports."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass, field

from .. import launch, logs
from ..rights import of_vassal as rights_of
from ..adoption import PendingAdoption
from ..config import VassalConfig
from ..config.options import declared_options
from .ondemand import VassalSockets
from .vassal import Vassal


@dataclass
class ProcHandles:
    """The live OS objects of one process of a vassal (its state is a Proc)."""

    pipe: socket.socket | None = None
    config_pipe: socket.socket | None = None
    config_text: bytes | None = None
    adoption: PendingAdoption | None = None
    output: logs.OutputPipe | None = None  # its output pipe (adopted: passed with its config)

    def given(self, output: logs.OutputPipe | None) -> None:
        """Its output pipe (an adopted vassal of ours takes it from its config)."""
        self.output = output

    def adopting(self, pending: PendingAdoption) -> None:
        self.adoption = pending

    def kept(self, pipe: socket.socket) -> None:
        """Our end of its Emperor pipe, tracked from now on."""
        self.pipe = pipe

    def take_adoption(self) -> PendingAdoption | None:
        """The adoption under way, once: it is over (the caller closes it)."""
        pending, self.adoption = self.adoption, None
        return pending

    def take_pipe(self) -> socket.socket | None:
        """Our end of its Emperor pipe, once: the caller closes it."""
        pipe, self.pipe = self.pipe, None
        return pipe

    def close_config_pipe(self) -> None:
        if self.config_pipe is not None:
            self.config_pipe.close()
            self.config_pipe = None


@dataclass(frozen=True)
class StartFailed:
    """A spawn or an adoption request failed after its pipes were made: the
    vassal retries after its backoff; a deploy that started it learns it."""

    why: str  # the vassal's reason (Vassal.start_failed)
    deploy_why: str  # what a code deploy that started it learns
    line: str  # the log line, before "; retry in ..."
    adoption: bool  # an adoption request (else a spawn)


@dataclass(frozen=True)
class Reaped:
    """A child reaped: `owner` is (vassal name, Proc.seq) if it is a vassal's process."""

    pid: int
    status: int
    owner: tuple[str, int] | None


@dataclass
class Prepared:
    """What a new process is given, made ready before it is spawned or
    adopted: our end of its Emperor pipe (and its config pipe, in
    `handles`), the descriptors to pass, and the vassal's ends to close
    once they are passed."""

    handles: ProcHandles
    ours: socket.socket
    pipe_fd: int
    config_fd: int | None
    listener_fd: int | None
    theirs: list[socket.socket] = field(default_factory=list)

    def close_theirs(self) -> None:
        for s in self.theirs:
            s.close()



def prepare(v: Vassal, seq: int, now: float, vsockets: VassalSockets, log: Callable[..., None],
        always_config: bool = False) -> Prepared | None:
    """Socket, pipes and config text for a new process of v (with
    `always_config`, a config pipe whatever the file: an adopted vassal
    of ours takes its output pipe from it); None (the start failed,
    logged, retried after a backoff) when the socket cannot be bound or
    the pipes cannot be made (out of descriptors)."""
    p = v.proc(seq)
    assert p is not None
    ok, lst = vsockets.for_start(v)
    if not ok:
        v.start_failed(now, "bind", seq)
        return None
    text = launch.config_text(p.config, always=always_config)
    try:
        pairs = launch.make_pipes(text is not None)
    except OSError as e:
        v.start_failed(now, str(e), seq)
        log(f"cannot create the Emperor pipe: {e.strerror or e}; "
                 f"retry in {max(0.0, v.not_before - now):.1f} s", v.name)
        return None
    h = ProcHandles()
    ours, theirs = pairs[0]
    prepared = Prepared(h, ours, theirs.fileno(), None,
                        lst.fileno() if lst is not None else None, [theirs])
    if text is not None:
        h.config_pipe, ctheirs = pairs[1]
        h.config_text = text
        prepared.config_fd = ctheirs.fileno()
        prepared.theirs.append(ctheirs)
    return prepared


def output_pipe(v: Vassal, cfg: VassalConfig, logbook: logs.Log, vassals_dir: Path,
                log: Callable[..., None]) -> logs.OutputPipe | None:
    """A new process's output pipe (logs.py), its vassal's `logto` file
    (re)opened; None, logged, if the pipe cannot be made: the process
    then writes to the Emperor's stderr as it is."""
    logto = cfg.get("logto") if hasattr(cfg, "get") else None
    rights = rights_of(cfg.get("uid"), cfg.get("gid")) if logto else None  # a tenant's file: opened as it
    err = logbook.set_logto(v.name, vassals_dir / logto if logto else None, rights)
    logbook.set_limit(v.name, _log_limit(cfg, "log-lines-per-second"), _log_limit(cfg, "log-bytes-per-second"))
    if err is not None:
        log(f"logto: {err}; its lines go to the Emperor's log", v.name)
    try:
        return logs.OutputPipe()
    except OSError as e:
        log(f"cannot make its output pipe: {e.strerror or e}; its output is "
            "not attributed", v.name)
        return None


def _log_limit(cfg: VassalConfig, key: str) -> int:
    """A log limit of the vassal's file (checked when it was read), or its
    default for a tenant's vassal (one with `uid`). A vassal that runs as
    the Emperor's own user is the operator's: its lines (a busy access log
    on stderr, say) are not dropped unless its file says so."""
    get = cfg.get if hasattr(cfg, "get") else (lambda _key: None)
    value = get(key)
    if value is None:
        value = declared_options()[key].default if get("uid") else 0
    try:
        return int(value or 0)
    except ValueError:
        return 0
