"""Real inotify on a temporary directory."""

import os
import select
import time
from pathlib import Path

from psgi_forkserver import watcher as w


def collect(watcher, until, timeout=5.0):
    """Read events until `until(events)` holds or the deadline passes."""
    events = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {events}"
        select.select([watcher], [], [], left)
        events += watcher.read()
    return events


def has(events, name, bit):
    return any(e.name == name and e.mask & bit for e in events)


def test_create_write_move_delete(tmp_path: Path):
    with w.Watcher(tmp_path) as wt:
        assert wt.read() == []
        f = tmp_path / "a.ini"
        f.write_text("[uwsgi]\n")
        ev = collect(wt, lambda e: has(e, "a.ini", w.IN_CLOSE_WRITE))
        assert has(ev, "a.ini", w.IN_CREATE)

        tmp = tmp_path / ".a.ini.tmp"
        tmp.write_text("[uwsgi]\nenv=A=2\n")
        os.rename(tmp, tmp_path / "b.ini")
        collect(wt, lambda e: has(e, "b.ini", w.IN_MOVED_TO))

        os.rename(tmp_path / "b.ini", tmp_path / "c.txt")
        collect(wt, lambda e: has(e, "b.ini", w.IN_MOVED_FROM))

        os.chmod(f, 0o600)
        collect(wt, lambda e: has(e, "a.ini", w.IN_ATTRIB))

        f.unlink()
        collect(wt, lambda e: has(e, "a.ini", w.IN_DELETE))


def test_directory_removed(tmp_path: Path):
    d = tmp_path / "v"
    d.mkdir()
    with w.Watcher(d) as wt:
        d.rmdir()
        ev = collect(wt, lambda e: any(x.directory_gone for x in e))
        assert any(x.name == "" for x in ev)


def test_created_only_flag():
    assert w.Event("a", w.IN_CREATE).created_only
    assert not w.Event("a", w.IN_CREATE | w.IN_CLOSE_WRITE).created_only


def test_fd_closed(tmp_path: Path):
    wt = w.Watcher(tmp_path)
    fd = wt.fileno()
    wt.close()
    assert wt.fileno() == -1
    try:
        os.fstat(fd)
    except OSError:
        pass
    else:  # the number may have been reused, but not by an inotify
        assert not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:inotify")
