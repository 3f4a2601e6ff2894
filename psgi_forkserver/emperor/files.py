"""The desired state: the vassals directory, its files, and admission.

Every vassal file is read (`_load`) when inotify names it, on a rescan, or
when a read that failed for lack of descriptors is retried; what it says is
handed to its Vassal as a fact (`update_config`, `touch`). The directory's
identity (device, inode) tells when a new directory was swapped in under
the same name. The descriptor budget admits only as many vassals as the
Emperor has descriptors for; the others are `refused` until room is made.

`VassalFiles` is the Emperor's part for it: it owns the fleet's desired
state (`vassals`, name -> Vassal, which the other parts read) and the
template renderer (config/render.py); `forget` drops a vassal that is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import time
from collections.abc import Callable
from pathlib import Path

from .. import config as cfgmod
from .. import launch
from ..config import render
from ..options import Options
from ..sockets import Listeners
from .routing import DomainClaims
from .vassal import Kind, Policy, Vassal
from .watcher import Watcher

SETTLE = 0.5  # IN_CREATE alone: wait for the writer to close the file
RETRY_READ = 1.0  # a vassal file that could not be read for lack of descriptors
# The descriptor budget: what the Emperor keeps per vassal (its Emperor pipe,
# its config pipe, its http-socket), and what it needs besides (its own
# files, the status server's clients, adoptions in flight, a successor's
# pipes during reloads).
FDS_PER_VASSAL = 4  # ... and the read end of its output pipe (logs.py)
FDS_RESERVED = 32


Boundary = Callable[[str, float], contextlib.AbstractContextManager]


class VassalFiles:
    """The Emperor's reading of its vassals directory: the desired state."""

    def __init__(self, opts: Options, log: Callable[..., None], sel: selectors.BaseSelector,
                 boundary: Boundary, listeners: Listeners, socket_dir: Path | None,
                 own_sockets: bool, our_program: bool) -> None:
        self.opts = opts
        self.log = log
        self.sel = sel
        self.boundary = boundary  # the Emperor's: one vassal's failure is its own
        self.listeners = listeners
        self.socket_dir = socket_dir
        self.own_sockets = own_sockets
        self.our_program = our_program
        # vassal files are judged against our option table only when our
        # program reads them (uWSGI's vassals have uWSGI's options)
        self.judge = our_program and opts.use_fork_server is None
        self.policy = Policy.of(opts)
        self.base_files = cfgmod.BaseSelector.from_names(opts.fork_bases)
        self.vassals: dict[str, Vassal] = {}
        # the vassals whose file said base at some time while in the fleet:
        # where the fork servers' base is looked for (ForkServers.base), a
        # handful, not the fleet
        self.base_names: set[str] = set()
        self.domains = DomainClaims(self.vassals)
        # templates render in children with a deadline (config/render.py);
        # the file is read again when its render ends
        self.renderer = render.Renderer(sel, lambda path: self.due.__setitem__(path.name, 0.0),
                                        timeout=opts.template_timeout)
        # absolute, symlinks kept: a directory swapped under the same name
        # (`mv`, a symlink flipped, removed and re-created) is the one we
        # serve; its identity (check_dir) tells when it was swapped
        self.dir = Path(os.path.abspath(self.opts.vassals_dir))
        self.dir_id: tuple[int, int] | None = None
        self.dir_missing = False
        self.watcher: Watcher | None = None
        self.due: dict[str, float] = {}  # file names to re-read, and when
        self.next_rescan = 0.0
        self.rescans = 0  # full rescans done (the status says it: a reader can wait for one)
        self.reads = 0  # vassal files read (or found gone) so far
        self.read_errors: dict[str, str] = {}  # transient read error logged, per vassal
        # vassals whose handling failed for a reason the same file would
        # meet again: name -> (fingerprint, reason); cleared when it changes
        self.failed: dict[str, tuple[str, str]] = {}
        # the file per vassal (device, inode, mtime): `touch` reloads
        self.mtimes: dict[str, tuple[int, int, int]] = {}
        # a periodic rescan reads again only the files whose status changed:
        # a stat a file, not a read, a parse and a judgement (the first,
        # SIGHUP's and inotify's rescans read every file: `read_all`)
        self.read_as = cfgmod.ReadStatuses()
        self.read_all = True
        self.fds: launch.Descriptors | None = None  # once the limit is raised
        self.max_vassals = 1 << 30  # set from the descriptor limit at start
        self.admitted: set[str] = set()  # vassals counted in the budget (bases are not)
        self.n_refused = 0

    # -- the descriptor budget -----------------------------------------------

    @property
    def nofile(self) -> int | None:
        """The descriptor limit we were started with (a child gets it back)."""
        return self.fds.inherited if self.fds is not None else None

    def descriptor_budget(self) -> None:
        """Raise the soft descriptor limit to the hard one, and admit only as
        many vassals as it leaves room for: the others are `refused` (and
        admitted once room is made), rather than failing at random."""
        fds = self.fds = launch.raise_nofile()
        reserved = FDS_RESERVED + self.opts.adopt_parallel
        self.max_vassals = max(1, (fds.soft - reserved) // FDS_PER_VASSAL)
        raised = f" (raised from {fds.inherited})" if fds.soft > fds.inherited else ""
        self.log(f"descriptors: limit {fds.soft}{raised}, hard limit {fds.hard}: room for "
                 f"{self.max_vassals} vassals ({FDS_PER_VASSAL} each, {reserved} reserved)")

    def _admit(self, v: Vassal, is_base: bool) -> None:
        """A vassal new to the Emperor: admitted if the budget has room. A
        base always is (every adopted vassal needs it), within the reserve."""
        if is_base:
            return
        if len(self.admitted) < self.max_vassals:
            self.admitted.add(v.name)
            return
        why = (f"refused: no descriptors to spare (limit {self.fds.soft if self.fds else '?'}"
               f": room for {self.max_vassals} vassals)")
        v.refuse(why)
        self.n_refused += 1
        if self.n_refused == 1 or self.n_refused % 100 == 0:  # not one line each
            self.log(f"{why}; {self.n_refused} vassal(s) refused now, "
                     "admitted once others go", v.name)

    @property
    def room(self) -> int:
        """Vassals the budget has room for now (the plan admits the refused)."""
        return max(0, self.max_vassals - len(self.admitted)) if self.n_refused else 0

    def admit(self, v: Vassal) -> None:
        """Room was made (vassals removed): a refused vassal is admitted."""
        if not v.refused:
            return
        v.admit()
        self.n_refused -= 1
        self.admitted.add(v.name)
        self.log("admitted: descriptors to spare again", v.name)

    def forget(self, v: Vassal) -> None:
        """A vassal with no process and no file: dropped from the fleet."""
        del self.vassals[v.name]
        self.read_as.forget(v.name)
        self.base_names.discard(v.name)
        if v.refused:
            self.n_refused -= 1
        self.admitted.discard(v.name)

    def config_failed(self, name: str, why: str) -> bool:
        """Handling the vassal failed for a reason its file would meet again:
        config-error until the file changes. True if it failed so before."""
        v = self.vassals.get(name)
        again = self.failed.get(name, ("", ""))[1] == why
        if v is not None and v.config is not None:
            self.failed[name] = (v.config.fingerprint, why)
            v.config_failed(why)
        return again

    def front_refused(self, name: str, why: str) -> None:
        """nginx cannot take this vassal's route: config-error, with
        nginx's own words, until its file changes; everyone else is
        served from the configuration without it."""
        v = self.vassals.get(name)
        if v is None or v.config is None:
            return
        msg = f"the front door cannot route it: {why}"
        self.config_failed(name, msg)
        self.log(f"bad config {v.config.path}: {msg}", name)

    def rescan_soon(self, now: float) -> None:
        """SIGHUP: every file read again at once."""
        self.next_rescan = now
        self.read_all = True

    def next_wakeup(self) -> list[float]:
        times = [self.next_rescan, *self.due.values()]
        t = self.renderer.next_wakeup()
        return times if t is None else [*times, t]


    # -- the directory and its files -------------------------------------------

    def enter(self) -> None:
        """At start: the directory becomes our working directory (vassals
        inherit it) and is watched."""
        os.chdir(self.dir)
        st = os.stat(".")
        self.dir_id = (st.st_dev, st.st_ino)
        self.rewatch()

    def on_inotify(self, now: float) -> None:
        assert self.watcher is not None
        for ev in self.watcher.read():
            if ev.rescan or ev.directory_gone:
                self.next_rescan = now
                self.read_all = True
                if ev.directory_gone:
                    self.log("vassals directory moved or deleted")
                continue
            if not cfgmod.is_vassal_file(ev.name):
                continue
            when = now + SETTLE if ev.created_only else now
            self.due[ev.name] = min(self.due.get(ev.name, when), when)

    def check_dir(self, now: float) -> bool:
        """Is the vassals directory the one we watch? A new directory under
        its name (removed and re-created, `mv new dir`, a symlink flipped):
        it becomes our working directory and is watched, and the caller
        rereads every file (vassals whose config is the same keep running).
        False while there is no directory: the fleet is left as it is (a
        removed file stops its vassal; a directory moved away removes
        nothing) and the name is looked at again soon."""
        try:
            st = os.stat(self.dir)
        except OSError as e:
            if not self.dir_missing:
                self.log(f"vassals directory {self.dir}: {e.strerror or e}; the fleet is "
                         f"left as it is, looking again every {RETRY_READ:g} s")
            self.dir_missing = True
            self.next_rescan = now + RETRY_READ
            return False
        self.dir_missing = False
        ident = (st.st_dev, st.st_ino)
        if ident == self.dir_id:
            return True
        self.dir_id = ident
        self.log(f"vassals directory {self.dir} is a new directory: watching it, "
                 "reading every file again")
        try:
            os.chdir(self.dir)
        except OSError as e:
            self.log(f"cannot enter {self.dir}: {e.strerror or e}")
        self.rewatch()
        self.mtimes.clear()  # its files are new files, not touched ones
        self.read_as.clear()
        for v in self.vassals.values():
            # a base serving on a socket in the old directory (a relative
            # `fork-server`): a new generation in this one, every adopted
            # vassal moving onto it without closing its port
            cur = v.current
            fs = cur.config.fork_server if cur is not None else None
            if cur is not None and cur.kind == Kind.BASE and fs and not os.path.isabs(fs):
                v.request_deploy()
                self.log("its fork-server socket was in the old directory: "
                         f"base generation {v.want_base_generation}", v.name)
        return True

    def rewatch(self) -> None:
        """inotify on the directory now under our name (the old watch died
        with the old directory, or watches one moved elsewhere)."""
        if self.watcher is not None:
            try:
                self.sel.unregister(self.watcher.fileno())
            except (KeyError, ValueError):
                pass
            self.watcher.close()
            self.watcher = None
        try:
            self.watcher = Watcher(self.dir)
            self.sel.register(self.watcher.fileno(), selectors.EVENT_READ, self.on_inotify)
        except OSError as e:
            self.log(f"inotify unavailable ({e}); rescanning every {self.opts.rescan_interval:g} s")

    def rescan(self, now: float, bases_only: bool = False) -> None:
        if not self.check_dir(now):
            return
        both: set[str] = set()
        try:
            found = cfgmod.discover_paths(self.dir, both)
        except OSError as e:  # EMFILE, ENOMEM, ...: keep what we know, try again
            self.log(f"cannot scan {self.dir}: {e.strerror or e}; retry in {RETRY_READ:g} s")
            self.next_rescan = now + RETRY_READ
            return
        names = (set(found) | set(self.vassals) if not bases_only  # bases_only: Emperor.run
                 else {n for n, p in found.items() if self.base_files.may_be_base(n, p)})
        for name in sorted(names):  # refusals: the last by name
            path = found.get(name)
            if not self.read_all and path is not None and name not in both and self.read_as.unchanged(name, path):
                continue
            with self.boundary(name, now):
                self._load(name, Path(path) if path is not None else None, now)
        self.read_all = False
        self.rescans += 1
        self.next_rescan = now + self.opts.rescan_interval

    def turn(self, now: float) -> None:
        """The directory's part of a turn: the full rescan when due, the
        renders that ran out of time, the files due to be read again."""
        if now >= self.next_rescan:
            self.rescan(now)
        self.renderer.expire(now)
        self.reload_due(now)

    def reload_due(self, now: float) -> None:
        for fname, when in list(self.due.items()):
            if when <= now:
                del self.due[fname]
                name = cfgmod.vassal_name(fname)
                with self.boundary(name, now):
                    self._load(name, self.dir / fname, now)

    def _load(self, name: str, path: Path | None, now: float) -> None:
        self.reads += 1
        status = self.read_as.before_read(name, path)
        cfg = (cfgmod.load(path, judge=self.judge, render=self.renderer.render,
                           magic=self.our_program)
               if path is not None else None)
        if cfg is not None and cfg.pending:
            return  # a template rendering: read again when it ends (config/render.py)
        if cfg is not None and cfg.transient:
            # out of descriptors or memory: says nothing about the file;
            # keep the vassal as it is and read the file again soon
            if self.read_errors.get(name) != cfg.error:
                self.log(f"cannot read {cfg.path.name}: {cfg.error}; retrying every "
                         f"{RETRY_READ:g} s", name)
            self.read_errors[name] = cfg.error or ""
            assert path is not None
            self.due[path.name] = min(self.due.get(path.name, now + RETRY_READ), now + RETRY_READ)
            return
        if self.read_errors.pop(name, None) is not None:
            self.log(f"{path.name if path else name} read again", name)
        self._apply(name, cfg, self._touched(name, cfg))
        self.read_as.read(name, status, cfg is not None and cfg.file_alone)

    def _touched(self, name: str, cfg: cfgmod.VassalConfig | None) -> bool:
        """The file's mtime changed while its content did not (`touch
        app.ini`): uWSGI reloads the vassal then, and so do we. The same
        file, that is: another file with the same content (a Kubernetes
        ConfigMap update writes every key anew and swaps `..data`; an
        editor's rename into place) is no touch, and reloads nothing."""
        ident = None
        if cfg is not None:
            try:
                st = os.stat(cfg.path)
                ident = (st.st_dev, st.st_ino, st.st_mtime_ns)
            except OSError:
                pass
        old = self.mtimes.pop(name, None)
        if ident is None:
            return False
        self.mtimes[name] = ident
        v = self.vassals.get(name)
        return (old is not None and old[:2] == ident[:2] and old[2] != ident[2]
                and v is not None and v.config is not None
                and v.config.fingerprint == cfg.fingerprint)

    def _apply(self, name: str, cfg: cfgmod.VassalConfig | None, touched: bool = False) -> None:
        v = self.vassals.get(name)
        failed = self.failed.get(name)
        if failed is not None and cfg is not None:
            if touched or cfg.fingerprint != failed[0]:
                del self.failed[name]  # changed or touched: try it again
                if v is not None:
                    v.config_failure_cleared(failed[1])
            elif cfg.error is None:
                cfg = dataclasses.replace(cfg, error=failed[1])
        elif cfg is None:
            self.failed.pop(name, None)
        if cfg is not None and not cfg.error:
            cfg = self.domains.claim(name, cfg)
        for fname in self.domains.released(name):  # a vassal refused for a name: read again
            self.due[fname] = time.monotonic()
        if cfg is not None and cfg.error:
            if v is None or v.config is None or v.config.fingerprint != cfg.fingerprint:
                self.log(f"bad config {cfg.path}: {cfg.error}", name)
        is_base = cfg is not None and self.base_files.is_base(cfg)
        if v is None:
            if cfg is None:
                return
            v = Vassal(name, cfg, is_base=is_base, policy=self.policy,
                       owns_socket=self.own_sockets, auto_socket=self.socket_dir is not None)
            self.vassals[name] = v
            if is_base:
                self.base_names.add(name)
            self._admit(v, is_base)
            return
        changed = v.update_config(cfg, is_base)
        if v.is_base:
            self.base_names.add(name)
        if changed:
            if cfg is None:
                self.log("file removed", name)
                self.listeners.close(name)  # the running process keeps its copy
            elif v.has_process:
                self.log("file changed", name)
        elif touched and cfg is not None and cfg.error is None:
            v.touch()
            if v.has_process:
                self.log("file touched: reloading", name)
