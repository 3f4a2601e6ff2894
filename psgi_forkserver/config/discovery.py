"""Which files in the vassals directory are vassals, and reading one safely.

A vassal is `NAME.ini`, or `NAME.ini.j2` (a template); both name the vassal
NAME.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import time
from pathlib import Path

SUFFIX = ".ini"
TEMPLATE_SUFFIX = ".ini.j2"

# vim: .swp/.swo/.swx..., its write test file 4913 (and 4914, ...); emacs:
# backups~, #autosave#, .#lock; generic backup/temp suffixes.
_DROPPING = re.compile(
    r"""(
        .*~            |   # backups
        .*\.sw[a-z]    |   # vim swap files (.swp, .swo, .swx, ...)
        \d+            |   # vim's write test file (4913, 4914, ...)
        \#.*\#         |   # emacs autosave
        \.\#.*         |   # emacs lock symlink
        .*\.(bak|orig|rej|tmp|dpkg-[a-z]+|ucf-[a-z]+)
    )$""",
    re.X,
)


def is_dropping(name: str) -> bool:
    """An editor's or package manager's temporary file: never a vassal, and
    an event on it is not worth a rescan."""
    return bool(_DROPPING.fullmatch(name))


def is_vassal_file(name: str) -> bool:
    """`*.ini` or `*.ini.j2`, not a dotfile, not an editor's backup or swap file."""
    # the cheap tests first: a rescan asks this of every name in the directory
    return not name.startswith(".") and vassal_name(name) != name and not is_dropping(name)


def is_template(filename: str) -> bool:
    return filename.endswith(TEMPLATE_SUFFIX)


def vassal_name(filename: str) -> str:
    """`app.ini` and `app.ini.j2` are both the vassal `app`."""
    for suffix in (TEMPLATE_SUFFIX, SUFFIX):
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return filename


def candidates(directory: Path, name: str) -> tuple[Path, Path]:
    """The two files that may declare vassal `name`."""
    return Path(directory) / (name + SUFFIX), Path(directory) / (name + TEMPLATE_SUFFIX)


def discover(directory: Path, both: set[str] | None = None) -> dict[str, Path]:
    """Vassal name -> file path, for every vassal file in `directory`.

    When both NAME.ini and NAME.ini.j2 exist, NAME.ini is returned; `load`
    sees the other one and reports the conflict. NAME is added to `both`,
    when given.
    """
    return {name: Path(p) for name, p in discover_paths(directory, both).items()}


def discover_paths(directory: Path | str, both: set[str] | None = None) -> dict[str, str]:
    """`discover`, with the paths as strings (a rescan of a thousand files
    makes no Path of the files it only looks at)."""
    found: dict[str, str] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    templates = []
    for entry in entries:
        # anything named like a vassal file counts, even a directory or a
        # dangling symlink: load() reports it as that vassal's error
        # instead of the file being ignored without a word
        if not is_vassal_file(entry.name):
            continue
        if is_template(entry.name):
            templates.append(entry)
        else:
            found[entry.name[:-len(SUFFIX)]] = entry.path
    for entry in templates:
        name = entry.name[:-len(TEMPLATE_SUFFIX)]
        if name in found:
            if both is not None:
                both.add(name)
        else:
            found[name] = entry.path
    return found


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: a vassal file larger than this is refused (a vassal file is a few lines;
#: a huge one would only eat the Emperor's memory)
MAX_FILE = 1 << 20

#: errors that say nothing about the file, only about the Emperor's resources
#: at that moment: the file is read again later, its vassal is left alone
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})


class Unreadable(OSError):
    """A vassal file that exists but cannot be used as one (str(): why)."""


def read_vassal_file(path: Path) -> bytes | None:
    """The file's bytes; None when there is no such file.

    Opened with O_NONBLOCK, then only a regular file is read: a FIFO named
    `x.ini` must not block the Emperor, `/dev/zero` must not fill its memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise Unreadable(errno.ENOENT, f"dangling symlink to {os.readlink(path)}") from None
        return None
    except IsADirectoryError:
        raise Unreadable(errno.EISDIR, "a directory, not a file") from None
    try:
        _check_regular(os.fstat(fd))
        return _read_bounded(fd)
    finally:
        os.close(fd)


def _check_regular(st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise Unreadable(errno.EISDIR, "a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(errno.EINVAL, "not a regular file")
    if st.st_size > MAX_FILE:
        raise Unreadable(errno.EFBIG, f"{st.st_size} bytes: larger than {MAX_FILE}")


def _read_bounded(fd: int) -> bytes:
    """All of `fd`, refusing more than MAX_FILE bytes (the file may grow
    after fstat)."""
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_FILE:
            raise Unreadable(errno.EFBIG, f"larger than {MAX_FILE} bytes")
        chunks.append(chunk)


#: a file whose status changed this recently when it was read may change
#: again within its timestamps' granularity and keep the same status (a
#: Linux file system stamps with the kernel's coarse clock: one tick, 1 to
#: 10 ms; ten times that)
RACY_NS = 100_000_000
#: the same for a file system that stamps whole seconds (ext4 with 128-byte
#: inodes, ext3, an NFS server on one) or two (FAT): a change within the
#: second keeps every timestamp. Told by a ctime and an mtime without
#: nanoseconds (on a fine file system, one file in a few hundred looks so
#: and is merely read once more)
COARSE_RACY_NS = 2_000_000_000


def racy_ns(status: "FileStatus") -> int:
    """How long after its ctime a status may still hide a change."""
    coarse = status[-1] % 1_000_000_000 == 0 and status[-2] % 1_000_000_000 == 0
    return COARSE_RACY_NS if coarse else RACY_NS

FileStatus = tuple[str, int, int, int, int, int]


def file_status(path: Path | str) -> FileStatus | None:
    """What tells that a file changed without reading it: (path, device,
    inode, size, mtime, ctime), symbolic links followed (a ConfigMap's
    swapped `..data` is another inode); None when it cannot be had. Every
    write changes the ctime, and nothing can set it back."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ReadStatuses:
    """Per vassal, the status of its file taken just before its last read,
    kept when what was read came from that file alone (no template, no
    @(FILE), no error) and its status had not changed in the last RACY_NS
    (COARSE_RACY_NS on a file system of whole seconds):
    while the file keeps that status, reading it again would give the same
    config (uWSGI's own scan compares mtimes)."""

    def __init__(self) -> None:
        self.seen: dict[str, FileStatus] = {}

    def unchanged(self, name: str, path: Path | str) -> bool:
        seen = self.seen.get(name)
        return seen is not None and seen == file_status(path)

    def before_read(self, name: str, path: Path | None) -> FileStatus | None:
        self.seen.pop(name, None)
        return file_status(path) if path is not None else None

    def read(self, name: str, status: FileStatus | None, file_alone: bool) -> None:
        """It was read (`status`: taken before); what it said came from the
        file alone (`VassalConfig.file_alone`)."""
        if status is not None and file_alone and time.time_ns() - status[-1] >= racy_ns(status):
            self.seen[name] = status

    def forget(self, name: str) -> None:
        self.seen.pop(name, None)

    def clear(self) -> None:
        self.seen.clear()
