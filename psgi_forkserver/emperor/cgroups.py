"""One cgroup (v2) per vassal process: nothing of a vassal outlives it.

Sessions (orphans.py) attribute what a vassal leaves behind only while it
stays in the vassal's session; a helper that calls setsid() and forks
again belongs to nobody. A cgroup holds every process forked below it,
whatever it does, and `cgroup.kill` (Linux 5.14) kills them all at once.

Where the Emperor owns a delegated subtree (as root, under systemd with
`Delegate=yes`, in a container with its own cgroup namespace), it makes

    <its own cgroup>/psgi-forkserver-HASH/     (HASH: the vassals directory's,
        v-NAME/SEQ                              as the run directory's)
        front/SEQ                              (nginx)

and puts each vassal process (the base too) in its own SEQ cgroup:

- spawned (the base, plain vassals, nginx): the Emperor steps into the
  cgroup around posix_spawn, so the child is born there (no window);
- adopted from our own base: the adoption request carries the cgroup's
  directory (mask 0x08, docs/PROTOCOL.md) and the base clones the vassal
  straight into it (`clone3` with `CLONE_INTO_CGROUP`), saying so in its
  reply: no window, and no move (a write to `cgroup.procs` can wait for an
  RCU grace period, in the Emperor's loop, once per adoption);
- adopted otherwise (a uWSGI fork server, a warm spare, a kernel that
  refused clone3): the fork server forks it in the base's cgroup; the
  Emperor moves it, and whatever it forked by then, when the pid reply
  comes. A process forked in that window by an adopted vassal that escapes
  the move stays in the base's cgroup, and goes with the base at the latest.

When a vassal process ends, what is left in its cgroup gets SIGTERM (its
session's members from the orphan sweep, the others from here), and
`cgroup.kill` after the mercy timeout; the cgroup is removed once empty.
At shutdown the whole subtree is killed.

The Emperor killed with SIGKILL cannot do that, so a guard does: a fork of
the Emperor made at start, outside the subtree, that blocks on a pipe
whose other end only the Emperor holds. End of file without the Emperor's
goodbye byte means it died: the guard kills the subtree and exits. If the
guard is killed too (kill -9 of both), the next start for the same vassals
directory finds the subtree (its own path, or the one recorded in the run
directory) and kills what is left in it before starting anything; until
then the vassals' own parent-death chain (end of file on their Emperor
pipe) is all that stops them, as it is where cgroups are not available.

Where they are not (no cgroup2 mount, not writable, no `cgroup.kill`), the
Emperor says so once at start and runs as before.

This module is the Emperor's side (`Cgroups`): making the subtree,
placing each process, stopping what an ended one left. The hierarchy's
files are cgroup_tree.py's, the guard is cgroup_guard.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cgroup_guard import say_goodbye, start_guard
from .cgroup_tree import (children, cgroup2_mount, dir_name, kill_tree, own_cgroup, populated,
                          procs, remove_tree, subtree_name, write)

#: the run directory's record of the subtree (for the next start's sweep)
RECORD = "cgroup"


@dataclass
class Cgroups:
    """The Emperor's side: the subtree, which process is in which cgroup,
    the ones being stopped, and the guard."""

    root: Path  # <mount><own cgroup>/psgi-forkserver-HASH
    home: Path  # the Emperor's own cgroup
    mount: Path
    log: Callable[[str], None]
    mercy: float
    record: Path | None = None
    where: dict[tuple[str | None, int], Path] = field(default_factory=dict)
    # ended ones: cgroup -> when cgroup.kill follows (inf: killed, not yet empty)
    dying: dict[Path, float] = field(default_factory=dict)
    guard_pid: int | None = None
    guard_fd: int | None = None
    # a vassal's directory -> its cgroups in `where` or `dying` (_cgroup)
    made: dict[Path, int] = field(default_factory=dict)
    born_in: int = 0  # adopted vassals born in their cgroup (the base's clone3)
    moved: int = 0  # adopted vassals the Emperor moved into theirs
    made_ahead: int = 0  # cgroups made while the fork server started (prepare)

    # -- start, sweep, shutdown ---------------------------------------------------

    @classmethod
    def start(cls, vassals_dir: Path, run_dir: Path | None, log: Callable[[str], None],
              mercy: float) -> "Cgroups | None":
        """The subtree made (leftovers of an earlier run killed first) and
        its guard running; None, said once in the log, where cgroups cannot
        be used."""
        mount = cgroup2_mount()
        own = own_cgroup()
        why = None
        if mount is None:
            why = "no cgroup2 hierarchy is mounted"
        elif own is None:
            why = "/proc/self/cgroup has no cgroup2 line (0::)"
        if why is None:
            assert mount is not None and own is not None
            home = mount / own.lstrip("/")
            root = home / subtree_name(vassals_dir)
            record = Path(run_dir) / RECORD if run_dir is not None else None
            cg = cls(root, home, mount, log, mercy, record)
            why = cg._open()
            if why is None:
                return cg
        log(f"cgroups: not used ({why}); a vassal's leftovers are stopped by "
            "session, and by the vassals themselves when the Emperor dies")
        return None

    def _open(self) -> str | None:
        self._sweep_leftovers()
        try:
            self.root.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            return f"cannot create {self.root}: {e.strerror or e}"
        if not (self.root / "cgroup.kill").exists():
            remove_tree(self.root)
            return "no cgroup.kill (Linux 5.14 or later)"
        try:  # can we step in and out (spawning)? write access to both
            with self._inside(self.root):
                pass
        except OSError as e:
            remove_tree(self.root)
            return f"cannot move processes into {self.root}: {e.strerror or e}"
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.write_text(str(self.root) + "\n")
        self._start_guard()
        self.log(f"cgroups: each vassal process in its own cgroup below {self.root} "
                 f"(guard pid {self.guard_pid})")
        return None

    def _sweep_leftovers(self) -> None:
        """An earlier Emperor for the same vassals directory, killed with
        its guard, left its subtree: kill what is in it."""
        seen = {self.root}
        if self.record is not None:
            try:
                recorded = Path(self.record.read_text().strip())
            except (OSError, ValueError):
                recorded = None
            # only a subtree of ours, for this vassals directory
            if (recorded is not None and recorded.name == self.root.name
                    and recorded.is_relative_to(self.mount) and ".." not in recorded.parts):
                seen.add(recorded)
        for cg in seen:
            n = kill_tree(cg)
            if n:
                self.log(f"cgroups: killed {n} processes an earlier run left in {cg}")

    def _start_guard(self) -> None:
        self.guard_pid, self.guard_fd = start_guard(self.root, self.record)

    def dismiss_guard(self) -> None:
        """Shutdown, every vassal gone: the guard exits (the goodbye byte:
        nothing for it to do), so that the Emperor has no child left."""
        if self.guard_fd is not None:
            say_goodbye(self.guard_fd)
            self.guard_fd = None

    def close(self) -> None:
        """Teardown: kill whatever is left in the subtree, remove it."""
        self.dismiss_guard()
        n = kill_tree(self.root)
        if n:
            self.log(f"cgroups: killed {n} processes left at shutdown")
        self.where.clear()
        self.dying.clear()
        self.made.clear()
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.unlink()

    # -- placing processes ---------------------------------------------------------

    def _cgroup(self, name: str | None, seq: int) -> Path:
        """(name, seq)'s cgroup, made now if it is new. A vassal's directory
        is made with its first process's cgroup and removed with its last
        (`poll`): counted in `made`, so that neither needs a look at the
        other cgroups (a mass start makes hundreds, one a turn)."""
        cg = self.where.get((name, seq))
        if cg is not None:
            return cg
        parent = self.root / dir_name(name)
        cg = parent / str(seq)
        if parent not in self.made:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent)
        try:
            os.mkdir(cg)
        except FileExistsError:
            pass
        except FileNotFoundError:  # its directory went behind our back
            os.mkdir(parent)
            os.mkdir(cg)
        self.made[parent] = self.made.get(parent, 0) + 1
        self.where[(name, seq)] = cg
        return cg

    def _unmade(self, cg: Path) -> None:
        """A cgroup of `made` is gone or given up: its vassal's directory is
        removed with the last of them."""
        parent = cg.parent
        left = self.made.get(parent, 0) - 1
        if left > 0:
            self.made[parent] = left
            return
        self.made.pop(parent, None)
        with contextlib.suppress(OSError):
            parent.rmdir()

    def _give_up(self, name: str | None, seq: int) -> None:
        cg = self.where.pop((name, seq), None)
        if cg is not None:
            with contextlib.suppress(OSError):
                cg.rmdir()
            self._unmade(cg)

    @contextlib.contextmanager
    def _inside(self, cg: Path) -> Iterator[None]:
        write(cg / "cgroup.procs", "0")
        try:
            yield
        finally:
            write(self.home / "cgroup.procs", "0")

    @contextlib.contextmanager
    def spawning(self, name: str | None, seq: int) -> Iterator[None]:
        """Around a posix_spawn: the child is born in (name, seq)'s cgroup.
        A cgroup that cannot be made or entered is logged; the child is
        then born in the Emperor's."""
        try:
            cg = self._cgroup(name, seq)
            ctx = self._inside(cg)
            ctx.__enter__()
        except OSError as e:
            self._give_up(name, seq)
            self.log(f"cgroups: cannot place it: {e.strerror or e}", name)
            yield
            return
        try:
            yield
        finally:
            ctx.__exit__(None, None, None)

    def prepare(self, processes: Iterable[tuple[str, int]]) -> int:
        """Cgroups made ahead for processes (name, seq) to be adopted; those
        made already are left as they are. How many were made. One that
        cannot be made is left to its adoption (which logs why)."""
        made = 0
        for key in processes:
            if key not in self.where:
                try:
                    self._cgroup(*key)
                except OSError:
                    return made  # the adoption says why, once per vassal
                made += 1
        self.made_ahead += made
        return made

    def birthplace(self, name: str, seq: int) -> int | None:
        """The cgroup of an adoption about to be asked for, made and opened:
        a descriptor of its directory for the request (the caller closes
        it), or None, logged, where it cannot be made (the reply's move then
        tries again)."""
        try:
            cg = self._cgroup(name, seq)
            return os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self._give_up(name, seq)
            self.log(f"cgroups: cannot make its cgroup: {e.strerror or e}", name)
            return None

    def adopt(self, name: str, seq: int, pid: int, born_there: bool = False) -> None:
        """An adopted vassal process, and what it forked by now, into a
        cgroup of its own; nothing to do when its fork server cloned it
        there (`born_there`, the reply said so)."""
        if born_there and (name, seq) in self.where:
            self.born_in += 1
            return
        self.moved += 1
        try:
            cg = self._cgroup(name, seq)
            moved: set[int] = set()
            todo = [pid]
            while todo:
                p = todo.pop()
                if p in moved:
                    continue
                moved.add(p)
                try:
                    write(cg / "cgroup.procs", str(p))
                except ProcessLookupError:
                    continue
                todo += children(p)
        except OSError as e:
            self.log(f"cgroups: cannot place pid {pid}: {e.strerror or e}", name)

    def path_of(self, name: str | None, seq: int) -> str | None:
        """The cgroup (path in the hierarchy) of a vassal process."""
        cg = self.where.get((name, seq))
        return None if cg is None else "/" + str(cg.relative_to(self.mount))

    # -- ending ----------------------------------------------------------------------

    def ended(self, name: str | None, seq: int, now: float,
              session: int | None = None) -> None:
        """The vassal process exited: what it left in its cgroup outside its
        `session` gets SIGTERM now (its session's members are the orphan
        sweep's, which names them: orphans.py), and everything left gets
        cgroup.kill after the mercy timeout."""
        cg = self.where.pop((name, seq), None)
        if cg is None:
            return
        left = procs(cg)
        strays = []
        for pid in left:
            try:
                if os.getsid(pid) == session:
                    continue
                os.kill(pid, signal.SIGTERM)
                strays.append(pid)
            except OSError:
                pass
        if strays:
            self.log(f"cgroups: {len(strays)} processes out of its session left in "
                     f"{self.path_of_dir(cg)} sent SIGTERM", name)
        if left:
            self.dying[cg] = now + self.mercy
        else:
            self.dying[cg] = now  # removed at once (poll)

    def path_of_dir(self, cg: Path) -> str:
        return "/" + str(cg.relative_to(self.mount))

    def poll(self, now: float) -> None:
        """Every turn while some cgroup is being stopped."""
        for cg, when in list(self.dying.items()):
            if now < when:
                continue
            if populated(cg):
                if when != float("inf"):
                    with contextlib.suppress(OSError):
                        write(cg / "cgroup.kill", "1")
                    self.dying[cg] = float("inf")
                continue
            with contextlib.suppress(OSError):
                cg.rmdir()
            del self.dying[cg]
            self._unmade(cg)  # the vassal's directory, once it has none left

    def next_wakeup(self, now: float) -> float | None:
        if not self.dying:
            return None
        # killed ones: look again soon (they empty within milliseconds)
        return min(now + 0.05 if t == float("inf") else t for t in self.dying.values())
