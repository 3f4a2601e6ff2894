"""The Emperor's own resilience with whole fleets: the vassals directory
swapped or recreated, many vassals at once, many reloads under load,
vassals flooding their Emperor pipe."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import psutil
import pytest

from psgi_forkserver.status import fetch

from support import (
    APP, PROGRAM, app_ini, assert_no_zombies, base_ini, descendants, free_port, get, spare_pids, wait_for,
)
from support.hostile import emperor_ok

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")


# -- the directory's identity ---------------------------------------------------------


def _cwd_is(pid: int, d: Path) -> bool:
    st = os.stat(f"/proc/{pid}/cwd")
    return (st.st_dev, st.st_ino) == (os.stat(d).st_dev, os.stat(d).st_ino)


def test_vassals_directory_swapped(hostile):
    """blue/green: `mv dir dir.old; mv dir.new dir`. Unchanged vassals keep
    serving, a changed one reloads, a removed one goes, a new one comes."""
    ports = {n: free_port() for n in ("same", "changed", "removed", "added")}
    e = hostile({n: app_ini(n, ports[n], processes=1) for n in ("same", "changed", "removed")},
                wait=[ports["same"], ports["changed"], ports["removed"]])
    new = Path(str(e.dir) + ".new")
    new.mkdir()
    try:
        (new / "base.ini").write_text(base_ini())
        (new / "same.ini").write_text(app_ini("same", ports["same"], processes=1))
        (new / "changed.ini").write_text(app_ini("changed", ports["changed"], "v2", processes=1))
        (new / "added.ini").write_text(app_ini("added", ports["added"], processes=1))
        os.rename(e.dir, str(e.dir) + ".old")
        os.rename(new, e.dir)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    wait_for(lambda: get(ports["added"])["name"] == "added", 30, "added answers")
    assert e.lines("is a new directory")
    wait_for(lambda: get(ports["changed"])["value"] == "v2", 30, "changed reloaded")
    wait_for(lambda: e.status().get("removed") is None, 30, "removed gone")
    assert get(ports["same"])["name"] == "same"
    assert not e.lines("[same] file changed")
    assert _cwd_is(e.pid, e.dir)
    # the vassals started now live in the new directory too
    wait_for(lambda: _cwd_is(e.vpid("added"), e.dir), 10, "added's cwd")
    # and the new directory is watched
    (e.dir / "late.ini").write_text(app_ini("late", ports["removed"], processes=1))
    wait_for(lambda: get(ports["removed"])["name"] == "late", 30, "a file added later")
    emperor_ok(e)
    assert_no_zombies(e)


def test_vassals_directory_removed_and_recreated(hostile):
    p1, p2 = free_port(), free_port()
    e = hostile({"a": app_ini("a", p1, processes=1)}, wait=[p1])
    shutil.rmtree(e.dir)
    wait_for(lambda: e.status().get("a") is None, 30, "a stopped with its file")
    e.dir.mkdir()
    (e.dir / "base.ini").write_text(base_ini())
    (e.dir / "a.ini").write_text(app_ini("a", p1, "again", processes=1))
    wait_for(lambda: get(p1)["value"] == "again", 30, "a back in the new directory")
    (e.dir / "b.ini").write_text(app_ini("b", p2, processes=1))
    wait_for(lambda: get(p2)["name"] == "b", 30, "a file added later")
    assert _cwd_is(e.pid, e.dir)
    emperor_ok(e)
    assert_no_zombies(e)


# -- fleets: many at once, many reloads -------------------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def distinct_ports(n: int) -> list[int]:
    """n free ports, never one twice, in this pytest-xdist worker's own range
    below the ephemeral one (free_port's)."""
    return [free_port() for _ in range(n)]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def test_300_vassals_added_and_removed_at_once(hostile):
    n = 300
    e = hostile({}, wait=[])
    wait_for(lambda: e.status().get("base", {}).get("state") in ("running", "loyal"), 30, "base up")
    fds_before = _fd_count(e.pid)
    kids_before = {p.pid for p in descendants(e.pid)} - spare_pids(e.pid)
    ports = {f"m{i:03d}": p for i, p in enumerate(distinct_ports(n))}
    for name, port in ports.items():  # written as fast as Python can
        _write_atomically(e.dir / f"{name}.ini", app_ini(name, port, processes=1))
    wait_for(lambda: sum(1 for k, v in e.status().items() if v["state"] == "loyal"
                         and k != "base") == n, 90, f"{n} vassals loyal", interval=0.5)
    for name, port in ports.items():
        assert get(port, timeout=10)["name"] == name
    assert len(descendants(e.pid)) >= 2 * n  # each: a master and its worker
    for name in ports:
        (e.dir / f"{name}.ini").unlink()
    wait_for(lambda: list(e.status()) == ["base"], 120, "every vassal gone", interval=0.5)
    wait_for(lambda: {p.pid for p in descendants(e.pid)} - spare_pids(e.pid) == kids_before, 60,
             "no process left but the base (and its spares)")
    wait_for(lambda: _fd_count(e.pid) == fds_before, 30,
             f"the Emperor's descriptors back to {fds_before}")
    emperor_ok(e)
    assert_no_zombies(e)


RELOAD_VASSALS = 20
RELOAD_ROUNDS = int(os.environ.get("PFS_RELOAD_ROUNDS", "100"))  # 100 rounds: 2,000 reloads


@pytest.mark.timeout(240)  # about 20 s here; room for a machine loaded by other work
def test_reloads_under_load_lose_no_request(hostile):
    """RELOAD_VASSALS vassals, each changed RELOAD_ROUNDS times while two
    clients hammer them: not one request fails, and the Emperor's RSS and
    descriptors do not grow (about 20 s here for 2,000 reloads)."""
    ports = {f"r{i:02d}": p for i, p in enumerate(distinct_ports(RELOAD_VASSALS))}
    e = hostile({n: app_ini(n, p, "0", processes=1) for n, p in ports.items()},
                wait=list(ports.values()))
    wait_for(lambda: all(e.status()[n]["state"] == "loyal" for n in ports), 30, "all loyal")
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []

    def client(offset: int) -> None:
        names = list(ports)
        i = offset
        while not stop.is_set():
            name = names[i % len(names)]
            i += 1
            try:
                assert get(ports[name], timeout=10)["name"] == name
                counts["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                counts["failed"] += 1
                errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    try:
        proc = psutil.Process(e.pid)
        baseline: tuple[int, int] | None = None
        for rnd in range(1, RELOAD_ROUNDS + 1):
            for name, port in ports.items():
                _write_atomically(e.dir / f"{name}.ini", app_ini(name, port, str(rnd), processes=1))
            wait_for(lambda: all(get(p)["value"] == str(rnd) for p in ports.values()), 60,
                     f"round {rnd} served")
            wait_for(lambda: all(v["state"] == "loyal" for k, v in e.status().items()
                                 if k != "base"), 60, f"round {rnd} settled")
            if rnd == 3:  # warmed up: the Emperor's caches and buffers are grown
                baseline = (proc.memory_info().rss, _fd_count(e.pid))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert counts["failed"] == 0, (counts, errors[:5])
    assert counts["ok"] > 0
    assert baseline is not None
    rss, fds = proc.memory_info().rss, _fd_count(e.pid)
    assert fds <= baseline[1], (baseline, fds)
    # a leak per reload would show over hundreds of them; allow allocator noise
    assert rss - baseline[0] < 4 << 20, f"RSS grew {(rss - baseline[0]) >> 10} KiB"
    emperor_ok(e)
    assert_no_zombies(e)


def test_a_vassal_flooding_its_emperor_pipe_with_config_requests_stalls_no_one(hostile):
    """A tenant's app holds its master's Emperor pipe while it loads: it
    asks for its config again 80,000 times and never reads the copies.
    The Emperor answers with one copy at a time, never waits on that pipe:
    the fleet's other vassals still start and the status still answers."""
    flood, good, late = free_port(), free_port(), free_port()
    e = hostile({"flood": f"[uwsgi]\nhttp-socket = 127.0.0.1:{flood}\nprocesses = 1\n"
                          f"psgi = {APP.parent / 'config_flood.psgi'}\n",
                 "good": app_ini("good", good, processes=1)}, wait=(good, flood))
    def flooding() -> bool:
        for p in descendants(e.pid):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "config flood" in " ".join(p.cmdline()):
                    return True
            except psutil.Error:
                pass
        return False

    wait_for(lambda: not flooding(), 30, "the flood helper to have written everything")
    (e.dir / "late.ini").write_text(app_ini("late", late, processes=1))
    wait_for(lambda: get(late), 20, "a vassal added after the flood to answer")
    assert "good" in fetch(e.stats, timeout=10)["vassals"]
    assert len([x for x in e.lines("config pipe") if "timed out" in x]) <= 1, e.lines("config pipe")
    emperor_ok(e)


def test_a_vassal_repeating_a_byte_on_its_emperor_pipe_is_logged_once(hostile):
    """80,000 times 'stop me' (byte 22) from a tenant's helper: at most one
    line in the Emperor's log and one stop a process, not one line a byte
    (the bytes that come before the process is loyal are its app's, and
    stop nothing)."""
    flood = free_port()
    e = hostile({"flood": f"[uwsgi]\nhttp-socket = 127.0.0.1:{flood}\nprocesses = 1\n"
                          f"env = FLOOD_BYTE=22\npsgi = {APP.parent / 'config_flood.psgi'}\n"})
    wait_for(lambda: get(flood), 30, "the flooded vassal to answer")
    pid = e.vpid("flood")

    def helper_done() -> bool:  # its 80,000 bytes written
        try:
            return not [c for c in psutil.Process(pid).children()
                        if "config flood helper" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            return True
    wait_for(helper_done, 30, "the helper to have written its bytes")
    e.after_a_rescan()  # a later turn of the loop: the bytes in the pipe are read
    assert len(e.lines("asked to be stopped")) <= len(e.vpids("flood")), \
        len(e.lines("asked to be stopped"))
    emperor_ok(e)


def test_an_app_starting_a_helper_while_it_loads_from_a_spare_starts(hostile):
    """A vassal with its own app, adopted from a spare (its warm worker let
    go), whose app forks a long-lived helper while loading: the helper
    holds the spare's link to the warm worker, so the worker never saw its
    end, and the vassal waited for it forever (starting, deaf to its
    Emperor pipe, surviving the Emperor). It answers."""
    port = free_port()
    e = hostile({})
    wait_for(lambda: e.lines("spares: 2 ready"), 30, "the base's spares")
    (e.dir / "helped.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nprocesses = 1\n"
        f"env = APP_NAME=helped\npsgi = {APP.parent / 'helper_at_load.psgi'}\n")
    wait_for(lambda: get(port), 20, "the vassal with a helper to answer")
    wait_for(lambda: e.lines("[helped] adopted"), 30, "the adoption logged")
    emperor_ok(e)
