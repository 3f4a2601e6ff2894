"""A vassal's processes: starting them (spawn or adoption), their pipes, reaping.

`_spawn` (fork+exec) and `_adopt` (a request to the fork server) share one
preparation (`_prepare`: the vassal's listening socket, its Emperor pipe
and config pipe, its config text) and one way to fail (`_abandon`). The OS
objects of a process live in `ProcHandles`, keyed by (vassal name, Proc.seq);
its state lives in the vassal's `Proc`. Every child is reaped in `_reap`,
adopted vassals included (the Emperor is a child subreaper); the outcome
goes back to the vassal as a fact (`spawned`, `adopted`, `on_byte`,
`exited`, `start_failed`).

A mixin of `emperor.Emperor`.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import adoption, launch, logs
from .config import VassalConfig
from . import status as status_requests
from .adoption import AdoptionError, PendingAdoption
from .launch import describe_status
from .nonblocking import recv_ready
from .options import plack_env_of
from .protocol import EmperorByte, VassalByte
from .sockets import Listener, answer_unavailable
from .vassal import Exit, Kind, Phase, Vassal


@dataclass
class ProcHandles:
    """The live OS objects of one process of a vassal (its state is a Proc)."""

    pipe: socket.socket | None = None
    config_pipe: socket.socket | None = None
    config_text: bytes | None = None
    adoption: PendingAdoption | None = None
    next_probe: float = 0.0
    fork_server: Path | None = None  # base: the socket it serves
    output: logs.OutputPipe | None = None  # adopted: its output pipe, passed with its config


@dataclass(frozen=True)
class ForVassal:
    """A selector callback about one vassal (its pipe, its adoption, its
    on-demand socket): whatever goes wrong in it is that vassal's failure."""

    name: str
    seq: int | None
    fn: Callable[[float], None]


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


class Processes:
    """Starting, feeding and reaping the vassals' processes (a mixin)."""

    # -- starting: one preparation for spawn and adoption ----------------------

    def _prepare(self, v: Vassal, seq: int, now: float,
                 always_config: bool = False) -> Prepared | None:
        """Socket, pipes and config text for a new process of v (with
        `always_config`, a config pipe whatever the file: an adopted vassal
        of ours takes its output pipe from it); None (the start failed,
        logged, retried after a backoff) when the socket cannot be bound or
        the pipes cannot be made (out of descriptors)."""
        p = v.proc(seq)
        assert p is not None
        ok, lst = self._listener(v, now)
        if not ok:
            v.start_failed(now, "bind", seq)
            return None
        text = launch.config_text(p.config, always=always_config)
        try:
            pairs = launch.make_pipes(text is not None)
        except OSError as e:
            v.start_failed(now, str(e), seq)
            self.log(f"cannot create the Emperor pipe: {e.strerror or e}; "
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

    def _abandon(self, v: Vassal, seq: int, now: float, pr: Prepared, why: str,
                 deploy_why: str) -> None:
        """The spawn or adoption failed after its pipes were made: a deploy
        that started it learns it, our ends are closed, and the vassal
        retries after its backoff."""
        self._start_failed_for_deploy(v, seq, now, deploy_why)
        pr.ours.close()
        if pr.handles.config_pipe is not None:
            pr.handles.config_pipe.close()
        v.start_failed(now, why, seq)
        v.note_error(f"cannot start: {why}")

    def _keep(self, v: Vassal, seq: int, pr: Prepared) -> None:
        """The new process exists (or its adoption is under way): its pipes
        are tracked from now on, and its config goes out on the config pipe."""
        h = pr.handles
        if h.config_pipe is not None:
            self._send_config(h)
        pr.ours.setblocking(False)
        h.pipe = pr.ours
        self.procs[(v.name, seq)] = h

    def _watch_pipe(self, name: str, seq: int, pipe: socket.socket) -> None:
        self.sel.register(pipe, selectors.EVENT_READ,
                          ForVassal(name, seq, lambda t, n=name, q=seq: self._on_pipe(n, q, t)))

    def _spawn(self, v: Vassal, kind: Kind, seq: int, now: float) -> None:
        p = v.proc(seq)
        assert p is not None
        pr = self._prepare(v, seq, now)
        if pr is None:
            return
        out = self._output(v, p.config)
        argv = [*self.argv0, "--ini", str(p.config.path)]
        if kind == Kind.BASE:
            pr.handles.fork_server = self.base_socket_path(p.config, p.base_generation)
            if p.base_generation > 1 and pr.handles.fork_server is not None:
                argv += ["--fork-server", str(pr.handles.fork_server)]
        try:
            # PLACK_ENV: what a vassal without a plack-env key (and the
            # vassals adopted from this base) take (perl/ForkServer/Config.pm)
            env = {**os.environ, "PLACK_ENV": plack_env_of(self.opts)}
            with self._cg_spawning(v.name, seq):  # born in its own cgroup
                pid = launch.spawn_vassal(
                    argv, env, pr.pipe_fd, pr.config_fd, pr.listener_fd,
                    nofile=self.fds.inherited if self.fds is not None else None,
                    output_fd=out.wfd if out is not None else None,
                )
        except OSError as e:
            if self.cgroups is not None:
                self.cgroups.ended(v.name, seq, now)
            if out is not None:
                out.close()
            self._abandon(v, seq, now, pr, str(e), f"cannot start {argv[0]}: {e.strerror}")
            self.log(f"cannot start {argv[0]}: {e.strerror}; retry in {v.backoff:.1f} s", v.name)
            return
        finally:
            pr.close_theirs()
        self._keep(v, seq, pr)
        if out is not None:
            self.relay.watch(out, v.name, lambda: pid, seq)
        self._watch_pipe(v.name, seq, pr.ours)
        v.spawned(pid, now, seq)
        self.pids[pid] = (v.name, seq)
        extra = f" ({p.reason})" if p.reason != "start" else ""
        gen = f", generation {p.base_generation}" if kind == Kind.BASE else ""
        self.log(f"started {kind} vassal, pid {pid}{gen}{extra}", v.name)

    def _adopt(self, v: Vassal, seq: int, now: float) -> None:
        p = v.proc(seq)
        assert p is not None
        # the generation step() chose (Proc.base_generation): during a deploy
        # the old one listens too, and a moved vassal must come from the new one
        path = self._fork_server_path(p.base_generation)
        assert path is not None
        ours = self._base_is_ours()
        pr = self._prepare(v, seq, now, always_config=ours)
        if pr is None:
            return
        if ours:  # our program takes its output pipe from the config packet
            pr.handles.output = self._output(v, p.config)
        argv = [self.opts.program, "--ini", str(p.config.path)]
        try:
            pending = adoption.start_adoption(
                path, argv, pr.pipe_fd, config_fd=pr.config_fd,
                on_demand_fd=pr.listener_fd, timeout=self.opts.adopt_timeout,
            )
        except AdoptionError as e:
            if pr.handles.output is not None:
                pr.handles.output.close()
            self.external_ready = False
            self._abandon(v, seq, now, pr, str(e), f"adoption failed: {e}")
            self.log(f"adoption failed: {e}; retry in {max(0, v.not_before - now):.1f} s", v.name)
            return
        finally:
            pr.close_theirs()
        pr.handles.adoption = pending
        self._keep(v, seq, pr)
        if pr.handles.output is not None:
            self.relay.watch(pr.handles.output, v.name, lambda: self.pid_of(v.name, seq), seq)
        self.sel.register(pending.sock, selectors.EVENT_READ,
                          ForVassal(v.name, seq, lambda t, n=v.name, q=seq: self._on_adoption(n, q, t)))
        if p.reason != "start":
            self.log(f"starting a successor ({p.reason})", v.name)

    def _base_is_ours(self) -> bool:
        """Adoptions come from our own vassal program: a base this Emperor
        runs (its file here; with `--use-fork-server` too, as with
        `--vassal-fork-base`). Its adopted vassals take their output pipe
        and config from us, so their lines, `logto` and last words are
        theirs. A foreign fork server's (another program's) keep its
        stderr: said once."""
        if not self.our_program:
            return False
        if self.opts.use_fork_server is None or self._base() is not None:
            return True
        if not self.told_foreign:
            self.told_foreign = True
            self.log(f"adopting through {self.opts.use_fork_server}, a fork server this "
                     "Emperor does not run: its vassals' output stays on its stderr, "
                     "not attributed to them (no logto)")
        return False

    def _cg_spawning(self, name: str | None, seq: int) -> contextlib.AbstractContextManager:
        """Around a spawn: the child is born in its own cgroup (if any)."""
        if self.cgroups is None:
            return contextlib.nullcontext()
        return self.cgroups.spawning(name, seq)

    def _send(self, v: Vassal, seq: int, byte: EmperorByte) -> None:
        h = self.procs.get((v.name, seq))
        if h is None or h.pipe is None:
            return
        try:
            launch.send_byte(h.pipe, byte)
        except OSError:
            pass  # it is exiting anyway; reaping will tell

    # -- the config pipe --------------------------------------------------------

    def _output(self, v: Vassal, cfg: VassalConfig) -> logs.OutputPipe | None:
        """A new process's output pipe (logs.py), its vassal's `logto` file
        (re)opened; None, logged, if the pipe cannot be made: the process
        then writes to the Emperor's stderr as it is."""
        logto = cfg.get("logto") if hasattr(cfg, "get") else None
        err = self.logbook.set_logto(v.name, self.dir / logto if logto else None)
        if err is not None:
            self.log(f"logto: {err}; its lines go to the Emperor's log", v.name)
        try:
            return logs.OutputPipe()
        except OSError as e:
            self.log(f"cannot make its output pipe: {e.strerror or e}; its output is "
                     "not attributed", v.name)
            return None

    def pid_of(self, name: str, seq: int) -> int | None:
        """A vassal process's pid, once known (for its relayed lines)."""
        v = self.vassals.get(name)
        p = v.proc(seq) if v is not None else None
        return p.pid if p is not None else None

    def _send_config(self, h: ProcHandles) -> None:
        assert h.config_pipe is not None and h.config_text is not None
        try:
            out = h.output.wfd if h.output is not None and h.output.wfd >= 0 else None
            launch.send_config(h.config_pipe, h.config_text, output_fd=out)
        except OSError as e:
            self.log(f"config pipe: {e}")


    # -- its sockets: the listener, on demand ------------------------------------

    def _listener(self, v: Vassal, now: float) -> tuple[bool, Listener | None]:
        """(ok, the socket to pass) for starting a process of v."""
        if not self.own_sockets or v.is_base or v.config is None:
            return True, None
        err, lst = self.listeners.get(v.name, v.config, self.socket_dir)
        if err is not None:
            v.note_error(err)
            return False, None
        return True, lst

    def _closed_sign(self, v: Vassal, now: float) -> None:
        """A vassal whose socket nobody will accept on for a while (stopped,
        or waiting out a crash-loop backoff, no process left): the Emperor
        answers its queued connections itself, 503 (with Retry-After when a
        retry can help), instead of leaving them in the backlog."""
        lst = self.listeners.by_name.get(v.name)
        closed = (lst is not None and not v.has_process and self.own_sockets
                  and v.phase in (Phase.STOPPED, Phase.THROTTLED))
        if not closed:
            self.listeners.unanswer(v.name)
            return
        assert lst is not None
        if v.name in self.listeners.answering:
            return
        self.listeners.unwatch(v.name)  # not waiting for a connection to wake it
        self.listeners.answer(v.name, lst, ForVassal(
            v.name, None, lambda t, n=v.name: self._answer_closed(n, t)))

    def _answer_closed(self, name: str, now: float) -> None:
        v = self.vassals.get(name)
        lst = self.listeners.by_name.get(name)
        if v is None or lst is None:
            self.listeners.unanswer(name)
            return
        if v.phase == Phase.THROTTLED:
            retry = max(1, math.ceil(v.not_before - now))
            answer_unavailable(lst, f"{name} is restarting, retry in {retry} s", retry)
        else:
            answer_unavailable(lst, f"{name} is stopped", None)

    def _watch_on_demand(self, v: Vassal, now: float) -> None:
        """An on-demand vassal without process: its socket in the selector."""
        if v.phase != Phase.ON_DEMAND:
            self.listeners.unwatch(v.name)
            return
        if v.name in self.listeners.watched:
            return
        if not self.own_sockets or v.is_base or v.config is None:
            return
        err, lst = self.listeners.get(v.name, v.config, self.socket_dir)
        if err is not None:  # port in use: throttle, like a failed start
            v.cannot_bind(now, err)
            return
        if lst is None:
            return
        self.listeners.watch(v.name, lst, ForVassal(v.name, None,
                                                    lambda t, n=v.name: self._on_listener(n, t)))
        self.log(f"on demand: waiting for a connection on {lst.addr}", v.name)

    def _on_listener(self, name: str, now: float) -> None:
        v = self.vassals.get(name)
        if v is not None and not v.woken:
            v.on_connection(now)
            self.log("connection waiting: starting on demand", name)
        self.listeners.unwatch(name)
    # -- events: its bytes, its adoption, its exit --------------------------------

    def _on_pipe(self, name: str, seq: int, now: float) -> None:
        h = self.procs.get((name, seq))
        if h is None or h.pipe is None:
            return
        data = recv_ready(h.pipe, 4096)
        if data is None:
            return
        if not data:
            self._close_pipe(name, seq)
            return
        v = self.vassals.get(name)
        if v is None:
            return
        p = v.proc(seq)
        config_again = False
        for b in data:
            if b == VassalByte.CONFIG_AGAIN:
                config_again = True
                continue
            note = v.on_byte(b, now, seq)
            if note and p is not None:
                ms = (now - p.started_at) * 1000 if p.started_at is not None else 0.0
                self.log(f"{note} (pid {p.pid}, {ms:.1f} ms after start)", name)
        # any number of requests is one copy, and none while an earlier copy
        # is unread: the pipe is the vassal's (its app's code can write on
        # it), and a blocking send would stall the whole fleet
        if config_again and h.config_pipe is not None and h.config_text \
                and not launch.unread_bytes(h.config_pipe):
            self._send_config(h)


    def _on_adoption(self, name: str, seq: int, now: float) -> None:
        h = self.procs[(name, seq)]
        v = self.vassals[name]
        pending = h.adoption
        assert pending is not None
        try:
            pid = pending.on_readable()
        except AdoptionError as e:
            self._adoption_failed(name, seq, now, str(e))
            return
        if pid is None:
            return
        self._finish_adoption(name, seq)
        self.metrics.adopted(pending.elapsed_ms(now) / 1000)
        v.adopted(pid, now, seq)
        self.pids[pid] = (name, seq)
        if (q := v.proc(seq)) is not None:
            self.wedges.replied(q.base_generation)
        p = v.proc(seq)
        what = "successor " if p is v.successor else ""
        gen = f", base generation {p.base_generation}" if p else ""
        self.log(f"adopted {what}pid {pid} from base ({pending.elapsed_ms(now):.1f} ms{gen})", name)
        if self.cgroups is not None:
            # born in its base's cgroup: into its own. After the line: the
            # move can wait for an RCU grace period (~20 ms after an idle
            # spell), and the line says when the adoption was answered
            self.cgroups.adopt(name, seq, pid)
        if h.pipe is not None:
            self._watch_pipe(name, seq, h.pipe)
        early = self.early_exits.pop(pid, None)
        if early is not None:
            self.pids.pop(pid, None)
            self._vassal_exited(name, seq, pid, early[0], now)

    def _finish_adoption(self, name: str, seq: int) -> None:
        h = self.procs.get((name, seq))
        if h is not None and h.adoption is not None:
            try:
                self.sel.unregister(h.adoption.sock)
            except (KeyError, ValueError):
                pass
            h.adoption.close()
            h.adoption = None

    def _adoption_failed(self, name: str, seq: int, now: float, reason: str) -> None:
        self.metrics.adoption_failed()
        self._finish_adoption(name, seq)
        self._drop_proc(name, seq)  # a vassal forked anyway sees EOF and stops
        v = self.vassals[name]
        self._start_failed_for_deploy(v, seq, now, f"adoption failed: {reason}")
        v.start_failed(now, reason, seq)
        v.note_error(f"adoption failed: {reason}")
        self.log(f"adoption failed: {reason}; retry in {max(0, v.not_before - now):.1f} s", name)

    def _reap(self, now: float) -> None:
        """The one place where children are reaped."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.no_children = True
                return
            except InterruptedError:
                continue
            if pid == 0:
                self.no_children = False
                return
            owner = self.pids.pop(pid, None)
            if owner is not None:
                with self._boundary(owner[0], now):
                    self._vassal_exited(owner[0], owner[1], pid, status, now)
            elif self.renderer.reaped(pid):
                continue
            elif self.front is not None and self.front.owns(pid):
                self.front.exited(pid, status, now, describe_status)
            else:
                self.sweeper.reaped(pid)
                self.early_exits[pid] = (status, now)
                self.log(f"reaped pid {pid} ({describe_status(status)})")

    def _vassal_exited(self, name: str, seq: int, pid: int, status: int, now: float) -> None:
        v = self.vassals[name]
        self._drop_proc(name, seq)
        if self.cgroups is not None:  # what is left in its cgroup goes too
            self.cgroups.ended(name, seq, now, session=pid)
        # what it forked and left behind is ours now: swept once this turn
        self.sweeper.vassal_ended(pid, name)
        st = describe_status(status)
        status_requests.forget_requests(pid)  # its requests file, if it wrote one
        p = v.proc(pid=pid)
        seq = p.seq if p is not None else None
        if p is not None and p is v.successor:
            self._start_failed_for_deploy(v, p.seq, now, f"pid {pid} died ({st})")
        what = v.exited(status, now, pid)
        if what == Exit.RETIRED:
            self.log(f"old pid {pid} stopped ({st})", name)
        elif what == Exit.STOPPED:
            self.log(f"pid {pid} stopped ({st})", name)
        elif what == Exit.SUCCESSOR_DIED:
            v.note_error(f"new pid {pid} died ({st})", seq)
            self.log(f"new pid {pid} died ({st}); old one keeps serving; retry in "
                     f"{max(0.0, v.not_before - now):.1f} s", name)
        elif what == Exit.TOOK_OVER:
            self.log(f"pid {pid} died ({st}); its successor pid {v.pid} takes over", name)
        else:
            # a base killed as wedged keeps that reason in the status
            v.note_error(self.wedges.exited(pid) or f"pid {pid} died ({st})", seq)
            self.log(f"pid {pid} died ({st}); respawn in {v.backoff:.1f} s"
                     + (" (throttled)" if v.failures > 0 else ""), name)

    def _drop_proc(self, name: str, seq: int) -> None:
        self._close_pipe(name, seq)
        h = self.procs.pop((name, seq), None)
        if h is not None and h.config_pipe is not None:
            h.config_pipe.close()
            h.config_pipe = None

    def _close_pipe(self, name: str, seq: int) -> None:
        h = self.procs.get((name, seq))
        if h is None or h.pipe is None:
            return
        try:
            self.sel.unregister(h.pipe)
        except (KeyError, ValueError):
            pass
        h.pipe.close()
        h.pipe = None

