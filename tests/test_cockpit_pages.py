"""The cockpit's pages on one real fleet: /metrics read back by
prometheus_client's parser, /healthz, /readyz, the recent log lines,
`reload-base --wait` over the stats socket, the status page in a real
browser, raw command lines, the requests each vassal served."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from psgi_forkserver import status
from psgi_forkserver.proc import Phase

import browser
from support import app_ini, free_port, get, start_emperor, stop_emperor, wait_for
from support.cockpit import cockpit_fleet, emperor_cli, http_get

HERE = Path(__file__).resolve().parent
APP = HERE / "apps" / "hello.psgi"

@pytest.fixture(scope="module")
def fleet(xprocess):
    with cockpit_fleet(xprocess) as f:
        yield f


# -- pages ----------------------------------------------------------------------------


def metrics(fleet) -> dict[str, list]:
    """Samples by sample name (a counter's family `x` has samples `x_total`)."""
    code, text = http_get(fleet.url("/metrics"))
    assert code == 200
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, []).extend(family.samples)
        for s in family.samples:
            if s.name != family.name:
                out.setdefault(s.name, []).append(s)
    return out


def sample(families: dict, name: str, **labels) -> float:
    for s in families[name]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


def test_metrics_parse_as_prometheus_text(fleet):
    m = metrics(fleet)
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="loyal") == 1
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="stopped") == 0
    assert sample(m, "psgi_forkserver_vassal_up", vassal="dies") == 0
    assert sample(m, "psgi_forkserver_vassal_restarts_total", vassal="dies") >= 1
    assert sample(m, "psgi_forkserver_vassal_pss_bytes", vassal="a") > 0
    assert sample(m, "psgi_forkserver_vassal_uss_bytes", vassal="base") > 0
    adoptions = sample(m, "psgi_forkserver_adoptions_total")
    assert adoptions >= 3  # a, b, and dies at least once
    hist = m["psgi_forkserver_adoption_seconds"]
    count = next(s.value for s in hist if s.name.endswith("_count"))
    inf = next(s.value for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    assert count == inf == adoptions
    assert sample(m, "psgi_forkserver_base_generation") >= 1


def test_metrics_request_duration_as_counters_every_state_and_sleeping_is_up(fleet):
    """Request durations as a sum and a count Prometheus can rate (not an
    average since start); every state a vassal can be in, `refused`
    included; an on-demand vassal asleep is up (its socket serves)."""
    for _ in range(3):
        get(fleet.ports["b"])
    sleepy = free_port()
    (fleet.dir / "sleepy.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{sleepy}\non-demand = true\npsgi = {APP}\n")
    try:
        wait_for(lambda: fleet.vassal("sleepy")["state"] == "on-demand", 30, "sleepy to sleep")
        # the master copies its workers' counts to the file once a turn (docs/CONTRACT.md)
        wait_for(lambda: (fleet.vassal("b")["requests"] or 0) >= 3, 10, "b's requests counted")
        m = metrics(fleet)
        assert sample(m, "psgi_forkserver_vassal_up", vassal="sleepy") == 1
        assert sample(m, "psgi_forkserver_vassal_up", vassal="a") == 1
        states = {s.labels["state"] for s in m["psgi_forkserver_vassal_state"]
                  if s.labels["vassal"] == "a"}
        assert states == {p.value for p in Phase}, states ^ {p.value for p in Phase}
        count = sample(m, "psgi_forkserver_vassal_request_duration_seconds_count", vassal="b")
        total = sample(m, "psgi_forkserver_vassal_request_duration_seconds_sum", vassal="b")
        assert count >= 3 and 0 < total < count * 5
        assert count == sample(m, "psgi_forkserver_vassal_requests_total", vassal="b")
        assert "psgi_forkserver_vassal_latency_avg_seconds" not in m
        assert fleet.vassal("b")["request_seconds"] == pytest.approx(total, abs=1e-3)
    finally:
        (fleet.dir / "sleepy.ini").unlink()
        wait_for(lambda: "sleepy" not in fleet.doc()["vassals"], 30, "sleepy to go")


def test_healthz_and_recent_log_lines(fleet):
    code, text = http_get(fleet.url("/healthz"))
    assert code == 200 and text.startswith("ok: loop turns, base base generation"), text
    code, text = http_get(fleet.url("/log/dies"))
    assert code == 200 and "died (exit status 1)" in text
    assert http_get(fleet.url("/log/nope"))[0] == 404


def test_readyz_waits_for_every_vassal_to_settle_healthz_does_not(fleet, tmp_path):
    """/readyz is systemd's READY=1 rule for the vassals of now: a vassal
    still loading holds it at 503 (naming it) while /healthz stays 200; a
    vassal that failed for good (dies: throttled) does not."""
    wait_for(lambda: http_get(fleet.url("/readyz"))[0] == 200, 60, "the fleet to be ready")
    slow = tmp_path / "slow.psgi"
    slow.write_text('sleep 4; sub { [200, ["Content-Type" => "text/plain"], ["slow\\n"]] };\n')
    (fleet.dir / "slow.ini").write_text(
        f"[uwsgi]\nhttp-socket = 127.0.0.1:{free_port()}\npsgi = {slow}\n")
    try:
        code, why = wait_for(lambda: (r := http_get(fleet.url("/readyz")))[0] == 503 and r, 30,
                             "/readyz to wait for the new vassal")
        assert "not settled: slow" in why, why
        assert http_get(fleet.url("/healthz"))[0] == 200
        wait_for(lambda: http_get(fleet.url("/readyz"))[0] == 200, 60, "slow to settle")
        assert fleet.vassal("slow")["state"] == "loyal"
    finally:
        (fleet.dir / "slow.ini").unlink()
        wait_for(lambda: "slow" not in fleet.doc()["vassals"], 30, "slow to go")


def test_reload_base_wait_over_the_stats_socket_and_deploy_metrics(fleet):
    before = sample(metrics(fleet), "psgi_forkserver_base_generation")
    r = emperor_cli("reload-base", "--wait", timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "started" in r.stdout and ": done," in r.stdout
    m = metrics(fleet)
    assert sample(m, "psgi_forkserver_base_generation") == before + 1
    assert sample(m, "psgi_forkserver_deploys_total", outcome="done") >= 1
    assert sample(m, "psgi_forkserver_vassal_state", vassal="a", state="loyal") == 1
    code, _ = http_get(fleet.url("/healthz"))
    assert code == 200


# -- the page in a real browser ---------------------------------------------------------


def visible_rows(page) -> list[str]:
    return page.evaluate(
        "[...document.querySelectorAll('#vassals tbody tr')]"
        ".filter(tr => tr.offsetParent !== null).map(tr => tr.dataset.name)")


@pytest.mark.skipif(browser.CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_status_page_in_headless_chromium(fleet, tmp_path):
    """What a person sees: the counts at the top, the failing vassal's error
    in its row, the page following the fleet without reloading, filter and
    sort; the screenshot goes to $PFS_SCREENSHOT when set (docs/status-page.png)."""
    shot = Path(os.environ.get("PFS_SCREENSHOT") or tmp_path / "status-page.png")
    page = browser.Chromium(width=1280, height=560)
    profile = page.profile
    try:
        page.navigate(fleet.url("/"))
        wait_for(lambda: page.evaluate("Number(document.body.dataset.refreshes)") >= 1, 30,
                 "the page's first refresh")
        counts = page.evaluate("document.getElementById('counts').innerText")
        assert "4 vassals" in " ".join(counts.split()) and "loyal" in counts, counts
        row = page.evaluate("document.querySelector('tr[data-name=\"dies\"]').innerText")
        assert "died (exit status 1)" in row and "exit status 1" in row, row

        # the fleet changes; the page follows in place: no navigation, no reload
        page.evaluate("window.stillTheSamePage = true")
        r = emperor_cli("stop", "b")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: "stopped" in page.evaluate(
            "document.querySelector('tr[data-name=\"b\"] td[data-k=\"state\"]').innerText"),
            30, "the page to show b stopped")
        assert page.evaluate("window.stillTheSamePage") is True
        assert "stopped" in page.evaluate("document.getElementById('counts').innerText")

        # filter by name, as typed; by state, from the counts; sort by a click
        page.type_text("#filter", "di")
        assert visible_rows(page) == ["dies"]
        page.evaluate("const f = document.getElementById('filter'); f.value = '';"
                      "f.dispatchEvent(new Event('input'))")
        page.click(".count.stopped")
        assert visible_rows(page) == ["b"]
        page.click(".count.all")
        assert visible_rows(page) == ["a", "b", "base", "dies"]
        page.click("th[data-k=name]")  # already sorted by name: now descending
        assert visible_rows(page) == ["dies", "base", "b", "a"]
        page.click("th[data-k=name]")
        page.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        page.close()
        r = emperor_cli("start", "b")
        assert r.returncode == 0, r.stderr
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(profile in a for a in (p.info["cmdline"] or []))]
    assert left == [], f"chromium processes left: {left}"


def raw_command(path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(line)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data)


def test_bad_command_lines_get_a_precise_reply_and_the_fleet_runs_on(fleet):
    r = raw_command(fleet.stats, b"frobnicate a\n")
    assert r["ok"] is False and r["message"].startswith("unknown command 'frobnicate'")
    r = raw_command(fleet.stats, b'{"command": \n')
    assert r["ok"] is False and "JSONDecodeError" in r["message"]
    r = raw_command(fleet.stats, b"stop\n")  # no name
    assert r["ok"] is False and "no vassal None" in r["message"]
    r = raw_command(fleet.stats, b"x" * 9000)  # never a line
    assert r["ok"] is False and r["message"] == "command line too long"
    assert fleet.vassal("a")["state"] == "loyal" and get(fleet.ports["a"])["name"] == "a"


def test_a_command_written_after_connect_is_never_taken_for_a_plain_read(fleet):
    """Documents come in the next loop turn now that process figures are
    reused: a client that writes its command right after connect() still
    gets the command's reply, and one that only reads still gets the document."""
    for _ in range(20):
        r = raw_command(fleet.stats, b"frobnicate a\n")
        assert r["message"].startswith("unknown command 'frobnicate'"), r
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(fleet.stats))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert "a" in json.loads(data)["vassals"]


def test_two_emperors_status_names_both_and_dir_picks_one(fleet, xprocess, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    em = start_emperor(xprocess, "emperor-other", [other, "--mercy", "5"])
    try:
        r = emperor_cli("status")
        assert r.returncode == 1 and "2 Emperors run here" in r.stderr, r.stderr
        assert str(fleet.dir.resolve()) in r.stderr and str(other.resolve()) in r.stderr
        r = emperor_cli("status", "--dir", other, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["vassals"] == {}
    finally:
        stop_emperor(em)
    assert emperor_cli("status").returncode == 0


def test_requests_served_and_average_latency_reported_by_the_vassal(fleet):
    before = fleet.vassal("a")
    assert before["requests"] is not None, before  # the vassal reports from its start
    for _ in range(25):
        assert get(fleet.ports["a"])["name"] == "a"
    after = wait_for(lambda: (v := fleet.vassal("a"))["requests"] >= before["requests"] + 25 and v,
                     20, "25 more requests in the status")
    assert after["pid"] == before["pid"] and after["latency_avg_ms"] > 0
    assert sample(metrics(fleet), "psgi_forkserver_vassal_requests_total", vassal="a") \
        >= after["requests"]
    assert status.requests_path(after["pid"]).is_file()
    assert fleet.vassal("dies")["requests"] is None  # never served: no file
    table = emperor_cli("status").stdout
    row = next(line for line in table.splitlines() if line.startswith("a "))
    assert f" {fleet.vassal('a')['requests']} " in row or str(after["requests"]) in row, row


def test_a_vassals_requests_file_goes_with_its_process(fleet):
    pid = fleet.vassal("b")["pid"]
    path = status.requests_path(pid)
    assert path.is_file()
    r = emperor_cli("reload", "b")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not path.exists(), 20, "the old process's requests file to go")
    assert status.requests_path(fleet.vassal("b")["pid"]).is_file()


def test_recycled_workers_keep_counting_in_their_slot(fleet):
    """max-requests recycles a worker: its successor goes on from the slot's
    numbers, so the vassal's total does not drop."""
    port = free_port()
    (fleet.dir / "recycled.ini").write_text(app_ini("recycled", port, processes=1)
                                            + "max-requests = 4\n")
    try:
        wait_for(lambda: get(port)["name"] == "recycled", 40, "recycled to answer")
        pids = {get(port)["pid"] for _ in range(11)}
        assert len(pids) >= 3, pids  # 12 requests, a new worker every 4
        v = wait_for(lambda: (v := fleet.vassal("recycled"))["requests"] == 12 and v, 20,
                     "12 requests counted")
        assert v["latency_avg_ms"] > 0
    finally:
        (fleet.dir / "recycled.ini").unlink()
        wait_for(lambda: "recycled" not in fleet.doc()["vassals"], 30, "recycled to go")
