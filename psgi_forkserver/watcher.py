"""Directory watching with inotify (ctypes), for the Emperor's selector.

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

import ctypes
import ctypes.util
import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from . import config as cfgmod

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

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ATTRIB
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_init1.restype = ctypes.c_int
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc.inotify_add_watch.restype = ctypes.c_int
    return _libc


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


def parse_events(buf: bytes) -> list[Event]:
    events: list[Event] = []
    pos = 0
    while pos + _EVENT.size <= len(buf):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
        pos += _EVENT.size
        raw = buf[pos : pos + length]
        pos += length
        events.append(Event(raw.split(b"\0", 1)[0].decode(errors="surrogateescape"), mask))
    return events


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
        lib = _lib()
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self._fd = fd
        wd = lib.inotify_add_watch(fd, os.fsencode(self.directory), WATCH_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            os.close(fd)
            self._fd = -1
            raise OSError(e, f"inotify_add_watch {self.directory}: {os.strerror(e)}")

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[Event]:
        """Every event queued now, cooked (see the module's doc); non-blocking."""
        return cook(self.directory, self.read_raw())

    def read_raw(self) -> list[Event]:
        """Every event queued now, as the kernel sent them (non-blocking)."""
        events: list[Event] = []
        while True:
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                break
            events += parse_events(buf)
        return events

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
