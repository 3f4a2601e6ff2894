"""The status collection and the stats socket without an Emperor: snapshots
of a child process read and measured, the socket under many clients, stale
sockets, addresses refused before anything starts."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psgi_forkserver import status
from psgi_forkserver.proc import Kind, Phase
from psgi_forkserver.snapshot import EmperorLink, EmperorSnapshot, VassalSnapshot

from support import EMPEROR, free_port, wait_for


# -- units, no Emperor -----------------------------------------------------------


def test_http_address_loopback_only_unless_public():
    assert status.parse_http_address("127.0.0.1:8080")[1] == ("127.0.0.1", 8080)
    assert status.parse_http_address(":8080")[1] == ("127.0.0.1", 8080)
    assert status.parse_http_address("[::1]:8080")[1][:2] == ("::1", 8080)
    for bad in ("0.0.0.0:8080", "[::]:8080", "192.0.2.1:80"):
        with pytest.raises(status.StatusConfigError, match="not a loopback"):
            status.parse_http_address(bad)
    assert status.parse_http_address("0.0.0.0:8080", public=True)[1] == ("0.0.0.0", 8080)
    with pytest.raises(status.StatusConfigError):
        status.parse_http_address("8080")


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def fake_emperor(pid: int) -> EmperorSnapshot:
    """What the Emperor hands status.py: snapshots, no live objects."""
    v_run = VassalSnapshot(name="run<1>", phase=Phase.LOYAL, pid=pid, kind=Kind.ADOPTED,
                           base_generation=1, processes_started=3, restarts=2, failures=0,
                           started_at=0.0, not_before=0.0, file=None, config_error=None,
                           refused=None, last_error=None, pids=(pid,))
    v_thr = VassalSnapshot(name="thr", phase=Phase.THROTTLED, pid=None, kind=None,
                           base_generation=0, processes_started=1, restarts=0, failures=2,
                           started_at=None, not_before=1e12, file=None, config_error=None,
                           refused=None, last_error=None)
    return EmperorSnapshot(vassals_dir="/x", vassals={"run<1>": v_run, "thr": v_thr})


def link(snap: EmperorSnapshot) -> EmperorLink:
    """What the Emperor attaches a status server with: here, a fixed snapshot."""
    return EmperorLink(lambda: snap, lambda: (True, "ok"), lambda name: None,
                       lambda command, name: {"ok": False})


def test_collect_reads_snapshots_and_measures_pss_uss(child):
    doc = status.collect(fake_emperor(child.pid))
    json.dumps(doc)  # serialisable
    r = doc["vassals"]["run<1>"]
    assert (r["state"], r["pid"], r["kind"], r["restarts"], r["base_generation"]) == (
        "loyal", child.pid, "adopted", 2, 1)
    assert r["processes"] == 1 and r["pss"] > 0 and r["uss"] > 0
    t = doc["vassals"]["thr"]
    assert t["state"] == "throttled" and t["throttle"] > 0 and t["restarts"] == 0
    assert t["pid"] is None and t["pss"] == 0
    assert doc["emperor"]["pid"] == os.getpid() and doc["emperor"]["rss"] > 0
    assert doc["collect_ms"] >= 0
    table = status.format_table(doc)
    assert "run<1>" in table and "throttled" in table and "collected in" in table


def test_collection_is_spread_over_turns(child):
    job = status.Collection(fake_emperor(child.pid))
    assert not job.done and job.vassals["run<1>"]["pss"] == 0
    turns = 0
    while not job.step(budget=0):  # one process per turn
        turns += 1
    doc = job.document()
    assert doc["vassals"]["run<1>"]["pss"] > 0 and doc["turns"] == turns + 1


def test_html_is_escaped(child):
    html = status.render_html(status.collect(fake_emperor(child.pid)))
    assert "run&lt;1&gt;" in html and "run<1>" not in html
    assert "<table id=\"vassals\">" in html


def test_stats_socket_serves_many_clients_without_blocking(tmp_path: Path, child):
    """A selector loop like the Emperor's; a slow client does not stop others."""
    import selectors

    sel = selectors.DefaultSelector()
    emp = fake_emperor(child.pid)
    port = free_port()
    srv = status.StatusServer(stats_path=tmp_path / "s.sock", http=f"127.0.0.1:{port}").bind()
    srv.attach(sel, lambda m: None, link(emp))
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
        slow = socket.create_connection(("127.0.0.1", port))  # never sends a request
        clients = []
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(tmp_path / "s.sock"))
            c.setblocking(False)
            clients.append(c)
        got = {c: b"" for c in clients}
        eof: set = set()

        def all_answered():
            now = time.monotonic()
            for key, _ in sel.select(0.05):  # the "Emperor" loop turns
                key.data(now)
            srv.poll(now)
            for c in clients:
                try:
                    chunk = c.recv(1 << 20)
                except BlockingIOError:
                    continue
                if chunk:
                    got[c] += chunk
                else:
                    eof.add(c)
            return len(eof) == len(clients)

        wait_for(all_answered, 10, "every stats client to get its document")
        for c in clients:
            assert "run<1>" in json.loads(got[c])["vassals"]
            c.close()
        slow.close()
    finally:
        srv.close()
        sel.close()
    assert not (tmp_path / "s.sock").exists()


def test_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path):
    p = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))  # bound, not listening: stale
    s.close()
    srv = status.StatusServer(stats_path=p).bind()
    try:
        with pytest.raises(OSError, match="another process"):
            status.StatusServer(stats_path=p).bind()
    finally:
        srv.close()
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match="not a socket"):
        status.StatusServer(stats_path=tmp_path / "f").bind()


def test_non_loopback_status_page_is_refused_before_anything_starts(tmp_path: Path):
    r = subprocess.run(
        [EMPEROR, "run", tmp_path, "--status-http", f"0.0.0.0:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2 and "not a loopback address" in r.stderr


def test_stats_clients_beyond_the_cap_are_refused_with_a_message_and_a_non_reader_expires(
        tmp_path: Path):
    """At the cap, a new client is told why (not a client in progress dropped
    without a word); a client that never reads its (large) document holds
    its slot only until WRITE_TIMEOUT."""
    import selectors
    import time

    sel = selectors.DefaultSelector()
    vassals = {f"v{i:04d}": VassalSnapshot(
        name=f"v{i:04d}", phase=Phase.NEW, pid=None, kind=None, base_generation=0,
        processes_started=0, restarts=0, failures=0, started_at=None, not_before=0.0,
        file=None, config_error=None, refused=None, last_error=None)
        for i in range(3000)}  # a document far larger than a socket buffer
    emp = EmperorSnapshot(vassals_dir="/x", vassals=vassals)
    path = tmp_path / "s.sock"
    srv = status.StatusServer(stats_path=path, max_clients=2).bind()
    srv.attach(sel, lambda m: None, link(emp))
    clock = [time.monotonic()]
    socks: list[socket.socket] = []

    def connect(rcvbuf: int | None = None) -> socket.socket:
        c = socket.socket(socket.AF_UNIX)
        if rcvbuf:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        c.connect(str(path))
        c.shutdown(socket.SHUT_WR)  # plain readers, as status.fetch: the document at once
        c.setblocking(False)
        socks.append(c)
        return c

    def turn():
        for key, _ in sel.select(0.05):
            key.data(clock[0])
        srv.poll(clock[0])

    def read_all(c: socket.socket, into: dict) -> bool:
        turn()
        try:
            chunk = c.recv(1 << 20)
        except BlockingIOError:
            return False
        into.setdefault(c, b"")
        into[c] += chunk
        return not chunk

    try:
        got: dict = {}
        stuck = connect(rcvbuf=4096)  # never reads
        reader = connect()
        wait_for(lambda: read_all(reader, got), 20, "the reader's document")
        assert len(json.loads(got[reader])["vassals"]) == 3000
        assert len(srv.clients) == 1, "the stalled client holds one slot"
        second, third = connect(), connect()  # one slot left: the third is refused
        wait_for(lambda: read_all(third, got), 20, "the refusal")
        assert "too many status clients" in json.loads(got[third])["error"]
        wait_for(lambda: read_all(second, got), 20, "the second reader's document")
        assert len(json.loads(got[second])["vassals"]) == 3000
        # time passes (the clock the Emperor's loop hands in): the non-reader goes
        clock[0] += status.WRITE_TIMEOUT + 1
        late = connect()
        wait_for(lambda: read_all(late, got), 20, "a document after the non-reader expired")
        assert len(json.loads(got[late])["vassals"]) == 3000
        assert stuck.fileno() not in srv.clients and len(srv.clients) == 0
        assert srv.refused == 1
    finally:
        for c in socks:
            c.close()
        srv.close()
        sel.close()
    assert not path.exists()


def test_a_process_is_measured_at_most_once_per_interval(child, monkeypatch):
    """However many clients ask, a process's memory is read from the kernel
    once per interval; the documents in between reuse it (their states
    are still their own)."""
    from psgi_forkserver.status import memory

    monkeypatch.setattr(memory, "MEASURE_INTERVAL", 600.0)
    first = status.collect(fake_emperor(child.pid))
    second = status.collect(fake_emperor(child.pid))
    assert first["measured"] == 1 and second["measured"] == 0
    pss = first["vassals"]["run<1>"]["pss"]
    assert pss > 0 and second["vassals"]["run<1>"]["pss"] == pss


def test_a_client_command_imports_none_of_the_emperors_run_side(tmp_path: Path, child):
    """`emperor status` (a table from a stats socket) and the other commands
    that only talk to a running Emperor start without the Emperor itself,
    the status server, psutil, Jinja2, Prometheus or the installed
    version's metadata: run in a loop, that start-up was most of their CPU."""
    import re
    import selectors
    import threading

    sel = selectors.DefaultSelector()
    path = tmp_path / "s.sock"
    srv = status.StatusServer(stats_path=path).bind()
    srv.attach(sel, lambda m: None, link(fake_emperor(child.pid)))
    done = threading.Event()

    def serve() -> None:  # the Emperor's loop, for the commands below
        while not done.is_set():
            now = time.monotonic()
            for key, _ in sel.select(0.05):
                key.data(now)
            srv.poll(now)

    loop = threading.Thread(target=serve)
    loop.start()
    python = Path(EMPEROR).parent / "python"
    heavy = {"psgi_forkserver.emperor.loop", "psgi_forkserver.launch", "psgi_forkserver.config",
             "psgi_forkserver.status.server", "psgi_forkserver.status.document",
             "psgi_forkserver.frontdoor.door", "psgi_forkserver.metrics", "psutil", "jinja2",
             "prometheus_client", "importlib.metadata", "wcwidth"}
    try:
        for argv, says in ((["status"], "run<1>"), (["status", "thr"], "throttled"),
                           (["logs", "thr"], ""), (["stop", "thr"], ""),
                           (["reload-base"], ""), (["reopen-logs"], "")):
            r = subprocess.run([python, "-X", "importtime", EMPEROR, *argv, "--stats", path],
                               capture_output=True, text=True, timeout=60)
            assert "Traceback" not in r.stderr, (argv, r.stderr)
            assert says in r.stdout, (argv, r.stdout, r.stderr)
            imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", r.stderr, re.M))
            assert "psgi_forkserver.cli" in imported, argv
            assert not heavy & imported, (argv, sorted(heavy & imported))
    finally:
        done.set()
        loop.join()
        srv.close()
        sel.close()
