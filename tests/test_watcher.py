"""Real inotify on a temporary directory."""

import os
import select
import time
from pathlib import Path

from psgi_forkserver.emperor import watcher as w


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
        # IN_CREATE of a regular file is held back until it is closed
        assert not any(x.created_only for x in ev)

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


# -- cooked events --------------------------------------------------------------


def drain(wt, settle_marker: Path):
    """Every cooked event up to a marker file we create last (no sleeps)."""
    settle_marker.write_text("")
    ev = collect(wt, lambda e: has(e, settle_marker.name, w.IN_CLOSE_WRITE))
    return [e for e in ev if e.name != settle_marker.name]


def marker(tmp_path: Path, n: int = [0]) -> Path:  # noqa: B006 - a counter
    n[0] += 1
    return tmp_path / f"zz-marker-{n[0]}.ini"


def test_raw_events_still_available(tmp_path: Path):
    with w.Watcher(tmp_path) as wt:
        (tmp_path / "a.ini").write_text("[uwsgi]\n")
        ev = []
        deadline = time.monotonic() + 5
        while not has(ev, "a.ini", w.IN_CLOSE_WRITE):
            assert time.monotonic() < deadline
            select.select([wt], [], [], 1)
            ev += wt.read_raw()
        assert has(ev, "a.ini", w.IN_CREATE)


def test_atomic_replace_by_rename_and_template(tmp_path: Path):
    (tmp_path / "a.ini").write_text("[uwsgi]\n")
    with w.Watcher(tmp_path) as wt:
        tmp = tmp_path / ".a.ini.tmp"
        tmp.write_text("[uwsgi]\nenv = X=1\n")
        os.replace(tmp, tmp_path / "a.ini")
        (tmp_path / "t.ini.j2").write_text("[uwsgi]\nenv = N={{ name }}\n")
        ev = drain(wt, marker(tmp_path))
        assert has(ev, "a.ini", w.IN_MOVED_TO)
        assert has(ev, "t.ini.j2", w.IN_CLOSE_WRITE)
        # the temporary file is an editor dropping: no event, no rescan
        assert not any(e.rescan for e in ev), ev
        assert {e.name for e in ev} == {"a.ini", "t.ini.j2"}


def test_editor_droppings_are_ignored(tmp_path: Path):
    with w.Watcher(tmp_path) as wt:
        for n in [".a.ini.swp", ".a.ini.swx", "a.ini~", "4913", "#a.ini#", "a.ini.swp",
                  "a.ini.bak", "a.ini.dpkg-new"]:
            (tmp_path / n).write_text("x")
            (tmp_path / n).unlink()
        os.symlink("user@host.123:456", tmp_path / ".#a.ini")  # emacs lock
        (tmp_path / ".#a.ini").unlink()
        assert drain(wt, marker(tmp_path)) == []


def test_symlink_created_in_place_is_complete_at_once(tmp_path: Path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.ini").write_text("[uwsgi]\n")
    with w.Watcher(tmp_path) as wt:
        os.symlink("real/a.ini", tmp_path / "a.ini")
        os.link(tmp_path / "real" / "a.ini", tmp_path / "b.ini")
        ev = drain(wt, marker(tmp_path))
        for n in ("a.ini", "b.ini"):
            got = [e for e in ev if e.name == n]
            assert got and not any(e.created_only for e in got), ev
            assert any(e.mask & w.IN_LINKED for e in got)


def test_configmap_symlink_swap_asks_for_a_rescan(tmp_path: Path):
    """Kubernetes' AtomicWriter: ..data -> ..TS, app.ini -> ..data/app.ini;
    an update writes ..TS2, points ..data_tmp at it, renames it to ..data."""
    d = tmp_path
    (d / "..2026_01_01").mkdir()
    (d / "..2026_01_01" / "app.ini").write_text("[uwsgi]\nenv = V=1\n")
    os.symlink("..2026_01_01", d / "..data")
    os.symlink("..data/app.ini", d / "app.ini")
    with w.Watcher(d) as wt:
        (d / "..2026_01_02").mkdir()
        (d / "..2026_01_02" / "app.ini").write_text("[uwsgi]\nenv = V=2\n")
        ev = drain(wt, marker(tmp_path))
        assert [e.name for e in ev if not e.rescan] == []  # mkdir: a rescan, harmless

        os.symlink("..2026_01_02", d / "..data_tmp")
        os.rename(d / "..data_tmp", d / "..data")
        ev = drain(wt, marker(tmp_path))
        assert [e for e in ev if e.rescan], ev
        assert not [e for e in ev if e.name == "app.ini"], "the kernel says nothing about app.ini"
        assert (d / "app.ini").read_text() == "[uwsgi]\nenv = V=2\n"


def test_overflow_asks_for_a_rescan(tmp_path: Path):
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 20000:
        import pytest

        pytest.skip(f"max_queued_events is {limit}: too many files to overflow quickly")
    with w.Watcher(tmp_path) as wt:
        f = tmp_path / "a.ini"
        f.write_text("")
        # the kernel merges identical consecutive events: alternate two kinds
        for _ in range(limit // 2 + 10):
            os.chmod(f, 0o644)  # IN_ATTRIB
            os.close(os.open(f, os.O_WRONLY))  # IN_CLOSE_WRITE
        ev = wt.read()
        assert any(e.queue_overflow and e.rescan for e in ev)


def test_cook_without_kernel():
    ev = w.cook(Path("/nonexistent"), [
        w.Event("a.ini", w.IN_CLOSE_WRITE),
        w.Event(".a.ini.swp", w.IN_CREATE),
        w.Event("..data", w.IN_MOVED_TO),
        w.Event("..data_tmp", w.IN_MOVED_FROM),
        w.Event("sub", w.IN_CREATE | w.IN_ISDIR),
        w.Event("x.ini", w.IN_CREATE),  # vanished already: passed on
    ])
    assert [e.name for e in ev if not e.rescan] == ["a.ini", "x.ini"]
    assert len([e for e in ev if e.rescan]) == 1  # coalesced
    assert not any(e.directory_gone for e in ev)
