"""The cockpit against clients and names nobody on the team wrote: local
processes (a tenant's app included) that fill the status page's connection
slots and send nothing, a vassal file whose name is not UTF-8, names that
are wide or invisible on a terminal. /healthz keeps answering, every view
keeps answering and stays valid, the table stays aligned.

One real fleet (base, adopted vassals, `--status-http`), shared."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wcwidth import wcswidth

from psgi_forkserver.status import fetch
from psgi_forkserver.status.page import COLUMNS, format_table
from psgi_forkserver.status.server import MAX_CLIENTS

from support import PROGRAM, wait_for
from support.cockpit import EMPEROR, cockpit_fleet

pytestmark = pytest.mark.skipif(not PROGRAM.is_file(), reason="the Perl vassal program is not there")

#: a file name as a tenant's upload or a Latin-1 shell may leave it: é in
#: Latin-1, and 0x9b, which an 8-bit terminal takes for CSI (an escape)
NOT_UTF8 = b"latin\xe9\x9b"


@pytest.fixture(scope="module")
def fleet(xprocess):
    with cockpit_fleet(xprocess) as f:
        yield f


def get(url: str, timeout: float = 20) -> tuple[int, bytes]:
    """Status and body of GET `url`; a page never answered fails the test
    (urllib's timeout), it does not hang it."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def no_lone_surrogates(value: object) -> bool:
    """True when every string in a decoded JSON value is valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(no_lone_surrogates(k) and no_lone_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(no_lone_surrogates, value))
    return True


def test_health_and_pages_answer_while_idle_connections_hold_every_slot(fleet):
    """Any local process may connect to a loopback port and send nothing.
    Connections beyond the slots must not make /healthz fail (a liveness
    probe would restart the whole fleet), nor keep the page from the
    operator: the idle ones give way."""
    idle = []
    try:
        for _ in range(MAX_CLIENTS + 44):
            idle.append(socket.create_connection(("127.0.0.1", fleet.status_http_port), timeout=10))
        code, body = get(fleet.url("/healthz"))
        assert code == 200, body
        code, body = get(fleet.url("/json"))
        assert code == 200, body
        assert "a" in json.loads(body)["vassals"]
        # those that gave way were closed, not left half-open
        gone = 0
        for s in idle:
            s.settimeout(0.0)
            try:
                gone += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                gone += 1
        assert gone >= 2, gone
    finally:
        for s in idle:
            s.close()
    assert fleet.running()


def test_a_file_name_that_is_not_utf8_leaves_every_view_answering_and_valid(fleet):
    path = os.path.join(os.fsencode(fleet.dir), NOT_UTF8 + b".ini")
    value = os.path.join(os.fsencode(fleet.dir), b"latinvalue.ini")  # and a value
    with open(path, "wb") as f:
        f.write(b"[uwsgi]\nhttp-socket = 127.0.0.1:1\nprocesses = 1\n")
    with open(value, "wb") as f:
        f.write(b"[uwsgi]\nhttp-socket = 127.0.0.1:1\nprocesses = " + NOT_UTF8 + b"\n")
    try:
        shown = "latin\\xe9\\x9b"  # its undecodable bytes, as the views write them
        wait_for(lambda: len([n for n in fleet.status() if n.startswith("latin")]) == 2, 20,
                 "the files to be seen")
        # the pages made from the document: never answered before (the
        # client waited for its own timeout)
        code, body = get(fleet.url("/metrics"))
        assert code == 200, body
        labels = {s.labels.get("vassal") for fam in text_string_to_metric_families(body.decode())
                  for s in fam.samples}
        assert {shown, "a", "b", "dies"} <= labels, labels

        code, body = get(fleet.url("/"))
        assert code == 200, body
        assert shown.encode() in body

        code, body = get(fleet.url("/json"))
        assert code == 200
        doc = json.loads(body.decode("utf-8"))  # strict: no invalid UTF-8 either
        assert no_lone_surrogates(doc), [n for n in doc["vassals"] if n.startswith("latin")]
        assert doc["vassals"][shown]["state"] == "config-error"
        # a value's bytes are decoded with replacement characters as the file is read
        assert "latinvalue.ini:3: bad value 'latin" in doc["vassals"]["latinvalue"]["error"]

        out = subprocess.run([EMPEROR, "status", "--stats", fleet.stats], capture_output=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode("utf-8")  # strict: no raw byte reaches the terminal
        assert "\x9b" not in text
        assert any(line.startswith(shown + " ") for line in text.splitlines()), text
        # the rest of the fleet is as it was
        assert fleet.vassal("a")["state"] == "loyal"
    finally:
        os.unlink(path)
        os.unlink(value)


def _columns(line: str) -> list[int]:
    """The terminal column each cell of a table line starts at (cells are
    separated by two spaces or more)."""
    starts, col, i = [], 0, 0
    while i < len(line):
        if line[i] != " " and (i == 0 or line[i - 2:i] == "  "):
            starts.append(col)
        col += max(wcswidth(line[i]), 0)
        i += 1
    return starts


def test_the_table_stays_aligned_with_wide_and_invisible_characters_in_names():
    names = ["plain", "日本語-shop", "wide全角全角", "zero\u200bwidth", "café\u0301", "a" * 40]
    doc = {"vassals": {n: {"state": "loyal", "kind": "adopted", "pid": 100 + i, "generation": 1,
                           "addresses": [f"127.0.0.1:{9000 + i}"], "uptime": 5.0, "restarts": 0,
                           "processes": 1, "pss": 1 << 20, "uss": 1 << 19, "plack_env": "deployment"}
                       for i, n in enumerate(names)},
           "emperor": {"pid": 1}, "totals": {}}
    lines = format_table(doc).splitlines()[:len(names) + 1]
    assert lines[0].startswith("NAME ")
    header = _columns(lines[0])
    assert len(header) == len(COLUMNS)
    for line in lines[1:]:
        # STATE, the column after the name, starts where its heading does
        assert _columns(line)[1] == header[1], (line, _columns(line), header)
    # an invisible character is shown, not hidden in the name (two names
    # that look the same on the screen are not the same vassal)
    assert any(line.startswith("zero\\u200bwidth ") for line in lines), lines


def test_a_page_that_cannot_be_made_is_answered_500_not_left_waiting():
    """Whatever goes wrong making a page from the document, its client is
    told, at once: not left to wait for its own timeout."""
    import selectors
    import time

    from psgi_forkserver import status
    from psgi_forkserver.proc import Phase
    from psgi_forkserver.snapshot import EmperorLink, EmperorSnapshot, VassalSnapshot
    from support import free_port

    # a count that is not a number: /metrics cannot be made of it, /json can
    odd = VassalSnapshot(name="odd", phase=Phase.LOYAL, pid=None, kind=None, base_generation=1,
                         processes_started=1, restarts="many", failures=0, started_at=None,
                         not_before=0.0, file=None, config_error=None, refused=None,
                         last_error=None)
    snap = EmperorSnapshot(vassals_dir="/x", vassals={"odd": odd})
    sel = selectors.DefaultSelector()
    srv = status.StatusServer(http=f"127.0.0.1:{free_port()}").bind()
    srv.attach(sel, lambda m: None, EmperorLink(lambda: snap, lambda: (True, "ok"),
                                                lambda name: None, lambda command, name: {}))
    port = srv.http_sock.getsockname()[1]

    def ask(path: str) -> bytes:
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        c.setblocking(False)
        got = b""
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                for key, _ in sel.select(0.05):
                    key.data(time.monotonic())
                srv.poll(time.monotonic())
                try:
                    chunk = c.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return got
                got += chunk
            raise AssertionError(f"{path}: no complete answer in 10 s: {got[:200]!r}")
        finally:
            c.close()

    try:
        assert ask("/metrics").startswith(b"HTTP/1.0 500 ")
        assert ask("/json").startswith(b"HTTP/1.0 200 ")
    finally:
        srv.close()
        sel.close()


def test_status_into_a_pipe_closed_early_ends_quietly(fleet):
    """`emperor status --json | head -1`: the reader goes away before the
    command is done writing; it ends without a traceback on the terminal."""
    for args in (["--json"], []):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first byte: no race
        try:
            out = subprocess.run([EMPEROR, "status", "--stats", fleet.stats, *args], stdout=w,
                                 stderr=subprocess.PIPE, timeout=30)
        finally:
            os.close(w)
        err = out.stderr.decode()
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert (out.returncode, err) == (141, ""), (out.returncode, err)


def test_nginx_deaths_are_counted_in_every_view(front, tmp_path):
    """The front door's nginx killed twice and restarted by the Emperor
    each time: between two scrapes, /metrics and `emperor status` must
    still say it happened (a /healthz blip of a second is all a probe sees)."""
    from support import free_port
    from support.cockpit import http_get
    from support.front import ini, needs_nginx

    if needs_nginx.args[0]:
        pytest.skip(needs_nginx.kwargs["reason"])
    sport, stats = free_port(), tmp_path / "s.sock"
    f = front({"app1": ini("app1", "domain = app1.localhost")},
              "--status-http", f"127.0.0.1:{sport}", "--stats", stats)
    f.routed("app1.localhost", "app1")
    for _ in range(2):
        old = f.nginx_pid()
        os.kill(old, 9)  # the nginx this test's Emperor started, by its pid
        wait_for(lambda: f.nginx_pid() not in (None, old), 60, "nginx started again")
        f.routed("app1.localhost", "app1")
    assert fetch(stats)["emperor"]["front"]["restarts"] == 2
    code, text = http_get(f"http://127.0.0.1:{sport}/metrics")
    assert code == 200
    restarts = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "psgi_forkserver_front_restarts_total"]
    assert restarts == [2.0], restarts
    out = subprocess.run([EMPEROR, "status", "--stats", stats], capture_output=True, text=True,
                         timeout=30)
    assert "2 restarts" in [ln for ln in out.stdout.splitlines() if ln.startswith("front door")][0]


def test_every_deploy_outcome_is_exported_from_zero():
    """A labelled counter whose series appears at its first increment hides
    that increment from rate() and increase(): an alert on
    `increase(psgi_forkserver_deploys_total{outcome="failed"}[10m]) > 0`
    missed the first failed deploy of every Emperor. Every outcome is there
    from the start, at 0."""
    from psgi_forkserver.emperor.deploys import DeployState
    from psgi_forkserver.metrics import DEPLOY_OUTCOMES, EmperorMetrics, render

    assert set(DEPLOY_OUTCOMES) == {s.value for s in DeployState if s.finished}

    text = render({"vassals": {}, "emperor": {}}, EmperorMetrics()).decode()
    deploys = {s.labels["outcome"]: s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "psgi_forkserver_deploys_total"}
    assert deploys == {"done": 0.0, "partial": 0.0, "failed": 0.0, "interrupted": 0.0}, deploys
