"""The periodic rescan of the vassals directory, the safety net under
inotify: it reads again only the files that changed, or whose meaning may
change without their own file changing, and still sees every change
inotify never reported."""

from __future__ import annotations

import os
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
