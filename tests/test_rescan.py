"""The periodic rescan of the vassals directory, the safety net under
inotify: it reads again only the files that changed, or whose meaning may
change without their own file changing, and still sees every change
inotify never reported."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import inotify_simple
import pytest

from support import app_ini, free_port, get, needs_program, wait_for

pytestmark = needs_program


def opened(watch: inotify_simple.INotify) -> list[str]:
    """The names opened in the watched directory since the last call."""
    return [ev.name for ev in watch.read(timeout=0)]


def test_a_rescan_reads_only_what_may_have_changed_and_sees_what_inotify_missed(emp, deploy_tmp):
    plain, linked, included = free_port(), free_port(), free_port()
    # files the vassals directory's inotify watch never hears of: a file
    # written through a hard link in another directory, and a file an
    # @(FILE) reads
    real = deploy_tmp / "linked.ini"
    real.write_text(app_ini("linked", linked, "v1", processes=1))
    value = deploy_tmp / "value.txt"
    value.write_text("v1\n")
    e = emp({"plain": app_ini("plain", plain, "v1", processes=1),
             "included": app_ini("included", included, f"@({value})", processes=1)},
            "--rescan-interval", "0.3", wait=[plain, included],
            prepare=lambda vdir: os.link(real, vdir / "linked.ini"))
    wait_for(lambda: get(linked)["value"] == "v1", 30, "linked to answer")
    watch = inotify_simple.INotify()
    try:
        watch.add_watch(e.dir, inotify_simple.flags.OPEN)

        def a_quiet_rescan() -> bool:
            """A full rescan ran and opened neither unchanged plain file."""
            opened(watch)
            e.after_a_rescan()
            names = opened(watch)
            return "plain.ini" not in names and "linked.ini" not in names
        # a file just written may be changed again within its timestamp's
        # granularity: read again until it is older than that
        wait_for(a_quiet_rescan, 20, "a rescan that opens no unchanged file")
        for _ in range(3):
            opened(watch)
            e.after_a_rescan()
            names = opened(watch)
            assert "plain.ini" not in names and "linked.ini" not in names, names
            # what an @(FILE) says may change with no change to the vassal's file
            assert "included.ini" in names, names
    finally:
        watch.close()
    # changes no inotify event tells of: the rescan sees them
    tmp = deploy_tmp / "value.tmp"
    tmp.write_text("v2\n")
    os.rename(tmp, value)
    with open(real, "r+") as f:  # in place: the same inode, the hard link sees it
        f.write(app_ini("linked", linked, "v2", processes=1))
    wait_for(lambda: get(included)["value"] == "v2", 30, "included reloaded with the new @(FILE)")
    wait_for(lambda: get(linked)["value"] == "v2", 30, "linked reloaded with its new content")
    assert get(plain)["value"] == "v1"
    assert not e.lines("bad config"), e.text()[-2000:]


@pytest.fixture
def coarse_fs(tmp_path) -> Iterator[Path]:
    """A file system whose timestamps count whole seconds (ext4 with
    128-byte inodes, as ext3, or an NFS server on one), mounted for the test."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 to mount a file system")
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", "-O", "^has_journal", str(img)], check=True,
                   capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a loop device here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_change_within_the_same_second_on_a_coarse_file_system_is_seen(emp, coarse_fs):
    """On a file system that stamps whole seconds, a file read (and its
    status trusted) 0.1 s after its change may change again in the same
    second and keep its status: size, mtime, ctime. The vassal file is a
    symbolic link to it, so no inotify event tells of the second change:
    the periodic rescan must still read it again."""
    port = free_port()
    real = coarse_fs / "real.ini"
    real.write_text(app_ini("coarse", port, "v0", processes=1))
    e = emp({}, "--rescan-interval", "0.1", prepare=lambda vdir: os.symlink(real, vdir / "coarse.ini"))
    wait_for(lambda: get(port)["value"] == "v0", 30, "coarse to answer")
    for attempt in range(1, 9):
        first, second = f"v{attempt}", f"w{attempt}"
        # early in a second, so that both changes may fall in it
        wait_for(lambda: time.time() % 1 < 0.05, 5, "the start of a second", interval=0.01)
        real.write_text(app_ini("coarse", port, first, processes=1))
        stamp = os.stat(real).st_ctime_ns
        wait_for(lambda: get(port)["value"] == first, 30, f"{first} served")
        e.after_a_rescan()
        e.after_a_rescan()    # read again once its status was 0.1 s old, and trusted
        real.write_text(app_ini("coarse", port, second, processes=1))
        if os.stat(real).st_ctime_ns == stamp:
            break
    else:
        pytest.skip("no two changes fell in the same second (a loaded machine)")
    wait_for(lambda: get(port)["value"] == second, 10, f"{second}, written in the same second, served")
