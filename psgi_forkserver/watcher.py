"""Directory watching with inotify (ctypes), for the Emperor's selector.

The Watcher only reports which names changed; the Emperor re-reads them
(and rescans the whole directory now and then, as a safety net for anything
inotify misses, e.g. when it is unavailable or its queue overflowed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

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
    def overflow(self) -> bool:
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
        """Every event queued now (non-blocking; [] when there is none)."""
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
