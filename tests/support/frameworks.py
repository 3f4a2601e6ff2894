"""Framework apps in tests: the requests each app is sent and its replies
made comparable, one Starman serving every app, and the Emperor fleet of the
same apps adopted from one base that preloads all of them."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from xprocess import ProcessStarter

from psgi_forkserver import status

from .apps import TESTS, base_ini
from .emperors import Emp, Emperors
from .processes import descendants, free_port, pid_alive, wait_for

APPS = TESTS / "apps" / "frameworks"

#: the apps, by the vassal's name; each is served as NAME.test
VASSALS = {
    "cat": None,  # the base's own preloaded app: no psgi key
    "mojo": APPS / "mojo.psgi",
    "dancer": APPS / "dancer" / "app.psgi",
    "plack": APPS / "plack.psgi",
}
#: one vassal of exit.psgi per way a vassal is stopped gracefully
EXITS = ("exit-rm", "exit-reload", "exit-stop", "exit-shutdown")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: dict[str, str] = field(default_factory=dict)


def request(port: int, host: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 15) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        hdrs: dict[str, str] = {}
        cookies: dict[str, str] = {}
        for k, v in r.getheaders():
            k = k.lower()
            if k == "set-cookie":
                name, _, value = v.split(";")[0].partition("=")
                cookies[name.strip()] = value
                v = cookie_shape(v)
            hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
        return Reply(r.status, hdrs, data, cookies)
    finally:
        conn.close()


def cookie_shape(v: str) -> str:
    """A Set-Cookie without its value and dates: its name and attributes."""
    parts = [p.strip() for p in v.split(";")]
    name = parts[0].split("=", 1)[0]
    attrs = sorted(p.split("=", 1)[0].lower() if p.lower().startswith(("expires", "max-age"))
                   else p.lower() for p in parts[1:] if p)
    return "; ".join([name, *attrs])


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----frameworks-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


UPLOAD = bytes(range(256)) * 300  # 76.8 kB, every byte value

#: the headers whose values must be the same (Date, Server, Connection and
#: keep-alive are the server's own)
COMPARED = ("content-type", "content-length", "location", "content-encoding", "vary",
            "x-framework", "x-hook", "set-cookie", "transfer-encoding", "cache-control",
            "last-modified")


def normalize(r: Reply) -> tuple[int, dict[str, str], bytes]:
    body = r.body
    if r.headers.get("content-encoding") == "gzip" and body:
        body = gzip.decompress(body)
    body = re.sub(rb"Request ID: [\w-]+", b"Request ID: X", body)  # Mojolicious
    body = re.sub(rb"(logged|layers) \d+", rb"\1 PID", body)
    hdrs = {k: v for k, v in r.headers.items() if k in COMPARED}
    # the framing is the server's: Starman chunks a streamed body that we,
    # having all of it in our first write, send with a Content-Length
    # (docs/frameworks.md); same_length() compares the lengths both gave
    hdrs.pop("transfer-encoding", None)
    hdrs.pop("content-length", None)
    if r.headers.get("content-type", "").startswith("application/json") and body:
        body = json.dumps(json.loads(body), sort_keys=True).encode()  # the app's hash order
    if "last-modified" in hdrs:
        hdrs["last-modified"] = "DATE"
    return r.status, hdrs, body


def same_length(a: Reply, b: Reply) -> bool:
    return ("content-length" not in a.headers or "content-length" not in b.headers
            or a.headers["content-length"] == b.headers["content-length"])


def exchange(port: int, app: str) -> dict[str, Reply]:
    """The same requests to one app, by name: every kind a user's app gets."""
    host = f"{app}.test"
    out: dict[str, Reply] = {}
    for name, method, path in [("index", "GET", "/"), ("head", "HEAD", "/"),
                               ("json", "GET", "/json"), ("stream", "GET", "/stream"),
                               ("redirect", "GET", "/redirect"), ("die", "GET", "/die"),
                               ("missing", "GET", "/no/such/page")]:
        out[name] = request(port, host, method, path)
    body, ctype = multipart("file", "bytes.bin", UPLOAD)
    out["upload"] = request(port, host, "POST", "/upload", body, {"Content-Type": ctype})
    first = request(port, host, "GET", "/session")
    cookie = "; ".join(f"{k}={v}" for k, v in first.cookies.items())
    out["session1"] = first
    out["session2"] = request(port, host, "GET", "/session", headers={"Cookie": cookie})
    if app == "plack":
        out["static"] = request(port, host, "GET", "/static/hello.txt")
        out["gzip"] = request(port, host, "GET", "/", headers={"Accept-Encoding": "gzip"})
        out["proxied"] = request(port, host, "GET", "/proxied", headers={
            "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "www.example.com",
            "X-Forwarded-Proto": "https"})
    if app == "cat":
        out["note"] = request(port, host, "POST", "/notes", "body=caf%C3%A9".encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})
        out["notes"] = request(port, host, "GET", "/notes")
    return out


# -- the servers ----------------------------------------------------------------------


@dataclass
class Starman:
    port: int
    popen: subprocess.Popen
    pid: int
    state: Path


def start_starman(xprocess, name: str, psgi: Path, workers: int, env: dict[str, str]) -> Starman:
    port = free_port()

    class Starter(ProcessStarter):
        pattern = "Binding to TCP port"
        timeout = 60
        terminate_on_interrupt = True
        args = ["starman", "--listen", f"127.0.0.1:{port}", "--workers", str(workers),
                "--preload-app", str(psgi)]
    Starter.env = {**{k: v for k, v in os.environ.items() if k != "PLACK_ENV"}, **env}
    pid, _ = xprocess.ensure(name, Starter, restart=True)
    popen = next(r.popen for r in reversed(xprocess.resources) if r.popen and r.popen.pid == pid)
    s = Starman(port, popen, pid, Path(env.get("FRAMEWORKS_STATE") or env["EXIT_DIR"]))
    try:  # it binds, then loads the app (--preload-app), then forks its workers
        wait_for(lambda: request(port, "plack.test", "GET", "/json", timeout=5).status, 60,
                 "Starman to answer")
    except BaseException:
        stop_starman(s)
        raise
    return s


def stop_starman(s: Starman) -> None:
    left = descendants(s.pid)
    if s.popen.poll() is None:
        s.popen.send_signal(signal.SIGTERM)  # graceful: its workers finish and leave
        try:
            s.popen.wait(30)
        except subprocess.TimeoutExpired:
            s.popen.kill()
            s.popen.wait()
    for p in left:
        wait_for(lambda p=p: not pid_alive(p.pid) or p.status() == "zombie", 15,
                 f"Starman's worker {p.pid} to leave")


def exit_ini(name: str, port: int, state: Path, extra: str = "") -> str:
    d = state / name
    d.mkdir(exist_ok=True)
    return (f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\npsgi = {APPS / 'exit.psgi'}\n"
            f"processes = 1\nenv = EXIT_DIR={d}\ndisable-logging = true\n{extra}")


def start_fleet(emperors: Emperors, spares: bool, args: list[str]) -> Emp:
    """The apps' fleet; what they write goes to `state` beside its files
    (`state_of`); its status is read from its default stats socket."""
    vdir = emperors.directory()
    state = state_of(vdir)
    state.mkdir()
    ports = {n: free_port() for n in (*VASSALS, *EXITS, "mojodev", "harakiri", "exit-warm")}
    files = {"base": base_ini(APPS / "preload.psgi", "fs.sock",
                              *([] if spares else ["fork-server-spares = 0"]))}
    for n, psgi in VASSALS.items():
        files[n] = (f"[uwsgi]\nhttp-socket = 127.0.0.1:{ports[n]}\nprocesses = 2\n"
                    + (f"psgi = {psgi}\n" if psgi else ""))
    files["mojodev"] = (f"[uwsgi]\nhttp-socket = 127.0.0.1:{ports['mojodev']}\n"
                        f"psgi = {VASSALS['mojo']}\nplack-env = development\ndisable-logging = true\n")
    for n in EXITS:
        files[n] = exit_ini(n, ports[n], state)
    # the base's own app (a spare's warm worker serves it when spares are on)
    (state / "exit-warm").mkdir()
    files["exit-warm"] = (f"[uwsgi]\nhttp-socket = 127.0.0.1:{ports['exit-warm']}\nprocesses = 1\n"
                          f"env = CODEBASE_EXIT_DIR={state / 'exit-warm'}\n")
    files["harakiri"] = exit_ini("harakiri", ports["harakiri"], state, "harakiri = 1\n")
    f = emperors(files, *args, base=False, vdir=vdir,
                 env={"FRAMEWORKS_STATE": str(state), "PLACK_ENV": ""})
    f.ports, f.stats = ports, status.default_stats_path(f.dir)
    for n, port in ports.items():
        wait_for(lambda p=port, n=n: request(p, f"{n}.test", "GET", "/json", timeout=5).status
                 in (200, 404), 90, f"{n} to answer")
    return f


def state_of(vdir: Path) -> Path:
    return vdir / "state"
