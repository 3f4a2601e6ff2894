"""Real framework apps (tests/apps/frameworks/) under Starman and under
`emperor run`, adopted from one base that preloads all of them, with warm
spares on and off: the same requests, the same answers (docs/frameworks.md
lists what differs, and why). Also PLACK_ENV, what an app leaves for its
exit, and the warning about a database handle opened in the base.

One Starman (every app, chosen by Host) and two Emperors (spares on; spares
off, with --plack-env staging) are started once for the module.

The requests, the comparison of replies and the servers are
support/frameworks.py's."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from psgi_forkserver import status

from support import EMPEROR, Emp, Emperors, descendants, pid_alive, stop_emperor, wait_for
from support.frameworks import (
    APPS, UPLOAD, VASSALS, exchange, normalize, request, same_length, start_fleet, start_starman, state_of,
    stop_starman,
)

pytestmark = pytest.mark.skipif(shutil.which("starman") is None, reason="no starman")


@pytest.fixture(scope="module")
def starman(xprocess):
    state = Path(tempfile.mkdtemp(prefix="pf-starman-"))
    s = start_starman(xprocess, "starman-frameworks", APPS / "starman.psgi", 2,
                      {"FRAMEWORKS_STATE": str(state)})
    try:
        yield s
    finally:
        stop_starman(s)
        shutil.rmtree(state, ignore_errors=True)


def _fleet(xprocess, name: str, spares: bool, args: list[str]):
    emperors = Emperors(xprocess, f"pf-{name}-", stats=False,
                        args=["--mercy", "20", "--rescan-interval", "600"])
    try:
        yield start_fleet(emperors, spares, args)
    finally:
        emperors.stop()


@pytest.fixture(scope="module")
def fleet_spares(xprocess):
    yield from _fleet(xprocess, "frameworks-spares", True, [])


@pytest.fixture(scope="module")
def fleet_nospares(xprocess):
    yield from _fleet(xprocess, "frameworks-nospares", False, ["--plack-env", "staging"])


@pytest.fixture(scope="module")
def fleets(fleet_spares, fleet_nospares):
    return {"spares": fleet_spares, "no-spares": fleet_nospares}


@pytest.fixture(scope="module")
def starman_replies(starman):
    return {app: exchange(starman.port, app) for app in VASSALS}


# -- the same answers -----------------------------------------------------------------


#: differences listed in docs/frameworks.md, by (app, request): what each side does
KNOWN: dict[tuple[str, str], str] = {
    ("mojo", "stream"): "Mojolicious writes its own chunked framing with a Transfer-Encoding "
                        "header; Starman adds a second header and chunks it again (the client "
                        "sees the chunk sizes in the body); we pass it through once",
}


@pytest.mark.parametrize("app", list(VASSALS))
def test_same_answers_as_starman(app, fleets, starman_replies):
    want = starman_replies[app]
    assert want["index"].status == 200 and want["session2"].body.strip().endswith(b"2"), \
        "Starman itself does not serve the app as expected"
    differences = []
    for fname, f in fleets.items():
        got = exchange(f.ports[app], app)
        for req, r in want.items():
            if (app, req) in KNOWN:
                continue
            if normalize(got[req]) != normalize(r) or not same_length(got[req], r):
                differences.append((fname, req, normalize(got[req]), normalize(r)))
    assert not differences, "\n".join(map(repr, differences))


def test_every_request_kind_is_what_the_app_meant(fleets):
    """Not only the same as Starman: right (a broken app would be broken on both)."""
    for f in fleets.values():
        for app in VASSALS:
            r = exchange(f.ports[app], app)
            assert r["index"].status == 200 and b"<html" in r["index"].body.lower()
            assert r["head"].status == 200 and r["head"].body == b""
            assert r["json"].status == 200 and json.loads(r["json"].body)["items"] == [1, 2, 3]
            assert r["upload"].body.split() == [b"bytes.bin", str(len(UPLOAD)).encode(),
                                               hashlib.md5(UPLOAD).hexdigest().encode()]
            assert r["stream"].body == b"chunk 1\nchunk 2\nchunk 3\n"
            assert r["redirect"].status == 302
            assert r["redirect"].headers["location"] in (f"http://{app}.test/json", "/json")
            assert r["session1"].body.strip().endswith(b"1") and r["session2"].body.strip().endswith(b"2")
            assert r["die"].status == 500 and r["missing"].status == 404
        p = exchange(f.ports["plack"], "plack")
        assert p["static"].body == b"hello, static file\n"
        assert p["gzip"].headers["content-encoding"] == "gzip"
        assert p["proxied"].body == b"203.0.113.9 https://www.example.com/ https\n"
        c = exchange(f.ports["cat"], "cat")
        assert "caf\u00e9" in c["notes"].body.decode()


# -- the Catalyst app, preloaded ----------------------------------------------------


def test_a_preloaded_catalyst_app_serves_and_logs_through_its_layers(fleets):
    for f in fleets.values():
        assert f.doc()["vassals"]["cat"]["state"] == "loyal"
        r = request(f.ports["cat"], "cat.test", "GET", "/log")
        assert r.status == 200
        wait_for(lambda: f.lines("[cat] catapp says \u2603 caf\u00e9"), 10,
                 "the app's UTF-8 line in the log")
        # our own lines kept coming: the access log of that very request
        wait_for(lambda: f.lines('"GET /log HTTP/1.1" 200'), 10, "its access log line")
        assert not f.lines("isn't allowed on :utf8"), f.text()


# -- PLACK_ENV -------------------------------------------------------------------------


def test_plack_env_is_deployment_by_default_and_overridable(fleets, starman_replies):
    on, off = fleets["spares"], fleets["no-spares"]
    want = starman_replies["mojo"]["die"]
    for f in (on, off):
        r = request(f.ports["mojo"], "mojo.test", "GET", "/die")
        assert r.status == 500 and len(r.body) == len(want.body) < 2000, len(r.body)
        assert b"the route died" not in r.body
    dev = request(on.ports["mojodev"], "mojodev.test", "GET", "/die")
    assert dev.status == 500 and b"the route died" in dev.body and len(dev.body) > 10000
    vs = on.doc()["vassals"]
    assert vs["mojo"]["plack_env"] == vs["base"]["plack_env"] == "deployment"
    assert vs["mojodev"]["plack_env"] == "development"
    vs = off.doc()["vassals"]
    assert vs["mojo"]["plack_env"] == "staging" and vs["mojodev"]["plack_env"] == "development"
    table = subprocess.run([EMPEROR, "status", "--dir", str(off.dir)], capture_output=True,
                           text=True, timeout=30)
    assert "PLACK_ENV" in table.stdout and "staging" in table.stdout, table.stdout
    page = status.render_html(off.doc())
    assert '<td data-k="plack_env">staging</td>' in page


# -- handles opened at preload ----------------------------------------------------------


def test_a_connected_database_handle_from_the_base_is_warned_about_once(fleets):
    for f in fleets.values():
        for n in VASSALS:
            lines = f.lines(f"[{n}] psgi-vassal {n}: a database handle the base opened")
            assert len(lines) == 1, (n, lines)
            assert "preload.db" in lines[0] and "docs/frameworks.md" in lines[0]
            # not the DBIx::Class one (catapp.db): it reconnects by itself
        assert not [line for line in f.lines("a database handle the base opened")
                    if "catapp.db" in line]


# -- exit -------------------------------------------------------------------------------


def events(d: Path) -> list[str]:
    try:
        return (d / "events").read_text().split()
    except FileNotFoundError:
        return []


def events_lines(d: Path) -> list[str]:
    try:
        return (d / "events").read_text().splitlines()
    except FileNotFoundError:
        return []


def exit_counts(d: Path) -> tuple[int, int, int]:
    """END blocks run, DEMOLISH run, lines of serve_six's requests in the
    app's buffered log."""
    ev = (d / "events").read_text().splitlines() if (d / "events").exists() else []
    log = (d / "app.log").read_text().splitlines() if (d / "app.log").exists() else []
    return (sum(e.startswith("END ") for e in ev), sum(e.startswith("DEMOLISH ") for e in ev),
            sum(" /r" in line for line in log))


@pytest.fixture(scope="module")
def starman_exit(xprocess):
    d = Path(tempfile.mkdtemp(prefix="pf-starman-exit-"))
    s = start_starman(xprocess, "starman-exit", APPS / "exit.psgi", 1, {"EXIT_DIR": str(d)})
    try:
        for i in range(6):
            assert request(s.port, "x", "GET", f"/r{i}").status == 200
        stop_starman(s)
        yield exit_counts(d)
    finally:
        stop_starman(s)
        shutil.rmtree(d, ignore_errors=True)


def serve_six(f: Emp, name: str) -> int:
    pid = f.vpid(name)
    for i in range(6):
        assert request(f.ports[name], "x", "GET", f"/r{i}").status == 200
    return pid


def test_a_graceful_stop_runs_end_blocks_destructors_and_flushes(fleets, starman_exit):
    # END and DEMOLISH in the master and in the worker; the worker's 6 lines
    assert starman_exit == (2, 2, 6), starman_exit
    for fname, f in fleets.items():
        pids = {n: serve_six(f, n) for n in ("exit-rm", "exit-reload", "exit-stop")}
        (f.dir / "exit-rm.ini").unlink()
        with open(f.dir / "exit-reload.ini", "a") as fh:
            fh.write("; changed\n")
        r = subprocess.run([EMPEROR, "stop", "--dir", str(f.dir), "exit-stop"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for n, pid in pids.items():
            wait_for(lambda pid=pid: not pid_alive(pid), 30, f"{n}'s pid {pid} to leave")
            wait_for(lambda n=n: exit_counts(state_of(f.dir) / n) == starman_exit, 15,
                     f"{fname} {n}: END, DEMOLISH, log lines as under Starman "
                     f"{starman_exit}, got {exit_counts(state_of(f.dir) / n)}")


def test_the_preloaded_codebase_end_block_runs_in_the_vassal_and_its_worker(fleets):
    """... and the object the base's app holds is not destroyed there: it is
    inherited (freeing it would copy the pages of all it holds)."""
    for fname, f in fleets.items():
        pid = f.vpid("exit-warm")
        worker = [p.pid for p in descendants(pid)]
        assert request(f.ports["exit-warm"], "cat.test", "GET", "/json").status == 200
        (f.dir / "exit-warm.ini").unlink()
        wait_for(lambda: not pid_alive(pid), 30, f"{fname}: exit-warm to leave")
        want = sorted(f"END {p}" for p in [pid, *worker])
        wait_for(lambda: sorted(events_lines(state_of(f.dir) / "exit-warm")) == want, 15,
                 f"{fname}: END in {want}, got {events_lines(state_of(f.dir) / 'exit-warm')}")


def test_harakiri_stays_immediate(fleets):
    f = fleets["no-spares"]
    d = state_of(f.dir) / "harakiri"
    pid = f.vpid("harakiri")
    r = None
    try:
        r = request(f.ports["harakiri"], "x", "GET", "/sleep", timeout=20)
    except (OSError, http.client.HTTPException):
        pass
    assert r is None or r.status >= 500
    wait_for(lambda: f.lines("harakiri: worker"), 20, "the harakiri line")
    # the vassal's master still runs; the killed worker ran no END block
    assert pid_alive(pid)
    assert not [e for e in events(d) if e == "END"], events(d)


def test_shutdown_runs_them_too(fleets, starman_exit):
    """Last: it stops both Emperors."""
    for fname, f in fleets.items():
        serve_six(f, "exit-shutdown")
        stop_emperor(f)
        assert exit_counts(state_of(f.dir) / "exit-shutdown") == starman_exit, fname
