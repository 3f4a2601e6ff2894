"""Directory watching with inotify (inotify_simple), for the Emperor's selector.

The Watcher only reports which names changed; the Emperor re-reads them
(and rescans the whole directory now and then, as a safety net for anything
inotify misses, e.g. when it is unavailable or its queue overflowed).

`Watcher.read()` returns *cooked* events, ready to act on at once:

- a vassal file (`*.ini`, `*.ini.j2`) created, written and closed, renamed
  into place or away, deleted, chmod'ed: an event with its name. A regular
  file that was only created (IN_CREATE, not yet closed) is held back: its
  IN_CLOSE_WRITE follows. A symlink or hard link created in place is
  complete at once (marked IN_LINKED, so `created_only` is False).
- editor droppings (`.swp`, `~`, `4913`, `#x#`, `.#x`, `*.tmp`, ...): dropped.
- anything else (dot entries such as Kubernetes' `..data` symlink swapped by
  rename, directories, other files, e.g. an included template): one event
  with `rescan` set, since vassal files may resolve through them. The
  Emperor re-reads every file and compares fingerprints.
- queue overflow: `rescan` set too.

`read_raw()` returns the kernel's events unchanged.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import inotify_simple

from .. import config as cfgmod

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

# Synthetic bits (never set by the kernel in an event mask) used by read():
IN_RESCAN = 0x00010000  # rescan every vassal file (fingerprints)
IN_LINKED = 0x00020000  # IN_CREATE of a symlink / hard link: complete at once

WATCH_MASK = (
    IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ATTRIB
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)

@dataclass(frozen=True)
class Event:
    name: str  # "" for an event about the directory itself
    mask: int

    @property
    def rescan(self) -> bool:
        """The Emperor must rescan every file: the queue overflowed, or an
        entry vassal files may resolve through changed (`..data` swap)."""
        return bool(self.mask & (IN_Q_OVERFLOW | IN_RESCAN))

    @property
    def queue_overflow(self) -> bool:
        return bool(self.mask & IN_Q_OVERFLOW)

    @property
    def directory_gone(self) -> bool:
        return bool(self.mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED))

    @property
    def created_only(self) -> bool:
        """IN_CREATE alone: the file may still be half written."""
        return self.mask & ~IN_ATTRIB == IN_CREATE


def cook(directory: Path, raw: list[Event]) -> list[Event]:
    """Turn kernel events into the events the Emperor acts on (module doc)."""
    out: list[Event] = []
    rescan_mask = 0
    for ev in raw:
        if ev.queue_overflow or ev.directory_gone or not ev.name:
            out.append(ev)
            continue
        name = ev.name
        if cfgmod.is_vassal_file(name) and not ev.mask & IN_ISDIR:
            if ev.created_only:
                kind = _created_kind(Path(directory) / name)
                if kind == "file":
                    continue  # being written: IN_CLOSE_WRITE follows
                if kind == "link":
                    ev = Event(name, ev.mask | IN_LINKED)
            out.append(ev)
            continue
        if cfgmod.is_dropping(name):
            continue
        rescan_mask |= ev.mask
    if rescan_mask:
        out.append(Event("", (rescan_mask | IN_RESCAN) & ~(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED)))
    return out


def _created_kind(path: Path) -> str:
    """After IN_CREATE: "file" (a regular file its writer has open, one link),
    "link" (a symlink or a hard link: complete), or "gone"."""
    try:
        st = os.lstat(path)
    except OSError:
        return "gone"
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return "file"
    return "link"


class Watcher:
    """inotify on one directory. fileno() goes into the selector; read() drains."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        # non-blocking (read() drains what is queued), close-on-exec
        self._inotify: inotify_simple.INotify | None = inotify_simple.INotify(nonblocking=True)
        try:
            self._inotify.add_watch(self.directory, WATCH_MASK)
        except OSError as e:
            self.close()
            raise OSError(e.errno, f"inotify_add_watch {self.directory}: {e.strerror}") from None

    def fileno(self) -> int:
        return self._inotify.fileno() if self._inotify is not None else -1

    def read(self) -> list[Event]:
        """Every event queued now, cooked (see the module's doc); non-blocking."""
        return cook(self.directory, self.read_raw())

    def read_raw(self) -> list[Event]:
        """Every event queued now, as the kernel sent them (non-blocking)."""
        if self._inotify is None:
            return []
        # names as os.fsdecode gives them: a name that is not UTF-8 keeps
        # its bytes as surrogates, as os.listdir() has it
        return [Event(ev.name, ev.mask) for ev in self._inotify.read(timeout=0)]

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
