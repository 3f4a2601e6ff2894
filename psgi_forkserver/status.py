"""What runs and what it costs: the stats socket and the local status page.

Both are opt-in and live in the Emperor's own selector (no threads):

- `emperor run --stats PATH`: a UNIX socket (mode 0600). A client connects
  and gets one JSON document, then end of file. `emperor status --stats PATH`
  prints it as a table (`--json`: as is).
- `emperor run --status-http 127.0.0.1:PORT`: a tiny HTTP/1.0 server, GET /
  is an HTML table (Jinja2, auto-escaped), GET /json the same document.
  Loopback addresses only unless `--status-http-public` is given.

Memory is measured when a client asks: PSS and USS (psutil's
memory_full_info, from /proc/PID/smaps_rollup) summed over each vassal's
process tree (during a reload, the successor's and retiring processes too).
That costs the kernel about 1 ms per 40 MB process, so it is done a slice
(BUDGET) per turn of the Emperor's loop, never in one block; concurrent
requests share one collection. The document says what it cost:
`collect_ms` (CPU time measuring), `elapsed_ms` (request to document),
`turns` (loop turns it was spread over).

The Emperor's Vassal objects are read with getattr and defaults, so this
module does not depend on the exact fields of a given Vassal version.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import ipaddress
import json
import os
import re
import selectors
import socket
import stat
import struct
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .orphans import spare_of

SCHEMA = 1
#: connections in progress; a client beyond that is refused with a message
#: (never dropped without a word, and never at the expense of one in progress)
MAX_CLIENTS = 256
CLIENT_TIMEOUT = 60.0
#: a client that does not read its document is dropped after this long, so
#: that clients that never read cannot keep the slots of those that do
WRITE_TIMEOUT = 10.0
BUDGET = 0.01  # seconds of measuring per turn of the Emperor's loop
MAX_REQUEST = 8192
#: accept() failed for lack of descriptors (EMFILE...): the listening socket
#: stays readable, so it leaves the selector this long instead of spinning
ACCEPT_PAUSE = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


# -- collecting ---------------------------------------------------------------


def _ppid_map() -> dict[int, list[int]]:
    """ppid -> children pids, from one pass over /proc (cheaper than psutil's
    children() per vassal, which rescans /proc every time)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rindex(b")") + 2 :].split(None, 2)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    return children


def _tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo, seen = [], [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _memory(pids: list[int]) -> tuple[int, int, int]:
    """(pss, uss, processes counted) over `pids`; vanished ones are skipped."""
    pss = uss = n = 0
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        pss += getattr(m, "pss", 0)
        uss += m.uss
        n += 1
    return pss, uss, n


def _enum(value: Any) -> Any:
    if value is None:
        return None
    return getattr(value, "value", value)


def _config_values(cfg: Any, key: str) -> list[str]:
    get_all = getattr(cfg, "get_all", None)
    if not callable(get_all):
        return []
    out: list[str] = []
    for raw in get_all(key):
        out += [x for x in str(raw).replace(",", " ").split() if x not in out]
    return out


def _describe_exit(status: int | None) -> str | None:
    if status is None:
        return None
    from .launch import describe_status

    return describe_status(status)


def _last_error(v: Any, phase: Any) -> str | None:
    """Why the vassal does not run: its file's error or why the Emperor
    refused it (no descriptors to spare), else (while it fails:
    throttled, or failures not yet reset by a loyal start) the last failure
    the Emperor logged, with the exit status."""
    err = getattr(getattr(v, "config", None), "error", None) or getattr(v, "refused", None)
    if err:
        return err
    if phase == "throttled" or (getattr(v, "failures", 0) or 0) > 0:
        return getattr(v, "last_error", None) or None
    return None


#: what a vassal reports about its requests (docs/CONTRACT.md): the file
#: RUNDIR/requests-PID of its master process, one slot per worker, each two
#: little-endian u64: requests served, their latency summed in microseconds
REQUESTS_SLOT = struct.Struct("<QQ")


def requests_path(pid: int) -> Path:
    return run_dir() / f"requests-{pid}"


def read_requests(pid: int) -> tuple[int, float | None] | None:
    """(requests served, average latency in ms) that process reported;
    None when it reports nothing."""
    try:
        with open(requests_path(pid), "rb") as f:
            data = f.read(REQUESTS_SLOT.size * 4096)
    except OSError:
        return None
    n = total_us = 0
    for off in range(0, len(data) - len(data) % REQUESTS_SLOT.size, REQUESTS_SLOT.size):
        r, us = REQUESTS_SLOT.unpack_from(data, off)
        n += r
        total_us += us
    return n, (round(total_us / n / 1000, 3) if n else None)


def forget_requests(pid: int) -> None:
    """The process was reaped: its file goes (it may have been SIGKILLed)."""
    try:
        os.unlink(requests_path(pid))
    except OSError:
        pass


def vassal_status(v: Any, now: float, children: dict[int, list[int]]) -> tuple[dict[str, Any], list[int]]:
    """The vassal's document (memory still 0) and the pids to measure."""
    pid = getattr(v, "pid", None)
    phase = _enum(getattr(v, "phase", None))
    started_at = getattr(v, "started_at", None)
    generation = getattr(v, "generation", 0) or 0
    not_before = getattr(v, "not_before", 0.0) or 0.0
    restarts = getattr(v, "restarts", None)
    if restarts is None:
        restarts = max(0, generation - 1)
    cfg = getattr(v, "config", None) or getattr(v, "running", None)
    err = _last_error(v, phase)
    doc: dict[str, Any] = {
        "name": getattr(v, "name", "?"),
        "state": phase,
        "pid": pid,
        "kind": _enum(getattr(v, "kind", None)),
        "base_generation": getattr(v, "base_generation", None),
        "generation": generation,
        "uptime": round(now - started_at, 3) if pid is not None and started_at is not None else None,
        "restarts": restarts,
        "failures": getattr(v, "failures", 0),
        "throttle": round(max(0.0, not_before - now), 3) if phase == "throttled" else 0.0,
        "file": str(getattr(cfg, "path", "")) or None,
        # what the vassal serves: its address, and the host names it answers for
        "addresses": _config_values(cfg, "http-socket"),
        "names": _config_values(cfg, "domain"),
        # why it does not run now (None while it is fine) ...
        "error": err,
        # ... and, in every state, the last failure and exit the Emperor saw
        "last_error": err or getattr(v, "last_error", None) or None,
        "last_exit": _describe_exit(getattr(v, "last_status", None)),
        "held": bool(getattr(v, "held", False)),
        # reported by the vassal itself (None: it reports nothing)
        "requests": None,
        "latency_avg_ms": None,
        "processes": 0,
        "pss": 0,
        "uss": 0,
    }
    served = read_requests(pid) if pid is not None else None
    if served is not None:
        doc["requests"], doc["latency_avg_ms"] = served
    # every process of the vassal: during a reload, the successor and the
    # retiring ones too (Vassal.procs() where the Vassal has it)
    roots = [pid] if pid is not None else []
    procs = getattr(v, "procs", None)
    if callable(procs):
        try:
            roots += [p.pid for p in procs() if getattr(p, "pid", None) not in (None, pid)]
        except Exception:  # noqa: BLE001
            pass
    if len(roots) > 1:
        doc["other_pids"] = roots[1:]
    tree: list[int] = []
    for r in roots:
        tree += [p for p in _tree(r, children) if p not in tree]
    if doc["kind"] == "base" and roots:
        masters = _spares(roots, children)
        spares = [p for s in masters for p in _tree(s, children)]
        doc["spares"] = {"count": len(masters), "ready": len([s for s in masters if spare_of(s, ready=True)]),
                         "pids": spares, "pss": 0, "uss": 0}
        tree += [p for p in spares if p not in tree]
    return doc, tree


def _spares(bases: list[int], children: dict[int, list[int]]) -> list[int]:
    """A base's warm spares (perl/ForkServer/Spares.pm): children of the
    Emperor, as adopted vassals are, titled after their base until an
    adoption makes them a vassal."""
    return [c for c in children.get(os.getpid(), ()) if c not in bases and spare_of(c) in bases]


_self_proc: psutil.Process | None = None


def emperor_status(emperor: Any) -> dict[str, Any]:
    global _self_proc
    if _self_proc is None or _self_proc.pid != os.getpid():
        _self_proc = psutil.Process()
        _self_proc.cpu_percent(None)  # first call only starts the measure
    p = _self_proc
    doc: dict[str, Any] = {"pid": p.pid}
    try:
        with p.oneshot():
            cpu = p.cpu_times()
            doc.update(
                rss=p.memory_info().rss,
                cpu_user=round(cpu.user, 3),
                cpu_system=round(cpu.system, 3),
                cpu_percent=p.cpu_percent(None),  # since the previous request
                uptime=round(time.time() - p.create_time(), 3),
                fds=p.num_fds(),
            )
    except psutil.Error:
        pass
    d = getattr(emperor, "dir", None) or getattr(getattr(emperor, "opts", None), "vassals_dir", None)
    doc["vassals_dir"] = str(d) if d is not None else None
    doc["shutting_down"] = bool(getattr(emperor, "shutting_down", False))
    # code deploys (bases.DeployTracker.as_dict): `emperor reload-base --wait` polls this
    deploy = getattr(emperor, "deploy_status", None)
    doc["deploy"] = deploy() if callable(deploy) else None
    return doc


class Collection:
    """One status document, measured a slice at a time.

    Reading /proc/PID/smaps_rollup costs the kernel a page-table walk: about
    1 ms for a 40 MB process, more for a big preloaded Perl. Hundreds of
    vassals with their workers take seconds of CPU, so the Emperor's loop
    calls `step(budget)` once per turn and stays responsive meanwhile.
    The vassals' states and pids are taken at the start (one snapshot).
    """

    def __init__(self, emperor: Any) -> None:
        self.t0 = time.perf_counter()
        self.measure_s = 0.0
        self.turns = 0
        now = time.monotonic()
        children = _ppid_map()
        vassals = getattr(emperor, "vassals", {}) or {}
        self.vassals: dict[str, dict[str, Any]] = {}
        self.todo: list[tuple[str, int]] = []
        for name in sorted(vassals):
            try:
                doc, tree = vassal_status(vassals[name], now, children)
            except Exception as e:  # noqa: BLE001 - one odd vassal must not hide the rest
                doc, tree = {"name": name, "error": f"status: {e!r}"}, []
            self.vassals[name] = doc
            self.todo += [(name, pid) for pid in tree]
        self.todo.reverse()  # pop() in order
        self.emperor = emperor_status(emperor)
        self.measure_s += time.perf_counter() - self.t0

    @property
    def done(self) -> bool:
        return not self.todo

    def step(self, budget: float = float("inf")) -> bool:
        """Measure processes for about `budget` seconds; True when all done."""
        t = time.perf_counter()
        deadline = t + budget
        self.turns += 1
        while self.todo:
            name, pid = self.todo.pop()
            pss, uss, n = _memory([pid])
            d = self.vassals[name]
            d["pss"] += pss
            d["uss"] += uss
            d["processes"] += n
            if pid in d.get("spares", {}).get("pids", ()):
                d["spares"]["pss"] += pss
                d["spares"]["uss"] += uss  # what they cost: their PSS is mostly their share of the base
            if time.perf_counter() >= deadline:
                break
        self.measure_s += time.perf_counter() - t
        return not self.todo

    def document(self) -> dict[str, Any]:
        out = self.vassals
        return {
            "schema": SCHEMA,
            "time": time.time(),
            "emperor": self.emperor,
            "vassals": out,
            "totals": {
                "vassals": len(out),
                "processes": sum(v.get("processes", 0) for v in out.values()),
                "pss": sum(v.get("pss", 0) for v in out.values()),
                "uss": sum(v.get("uss", 0) for v in out.values()),
            },
            # CPU spent measuring, and wall time from request to document
            "collect_ms": round(self.measure_s * 1000, 2),
            "elapsed_ms": round((time.perf_counter() - self.t0) * 1000, 2),
            "turns": self.turns,
        }


def collect(emperor: Any) -> dict[str, Any]:
    """The status document, all at once (tests, tools)."""
    c = Collection(emperor)
    c.step()
    return c.document()


# -- the default stats socket ------------------------------------------------------

RUN_DIR_ENV = "PSGI_FORKSERVER_RUN_DIR"
STATS_NAME = "stats"


def run_dir() -> Path:
    """Where `emperor run` opens its stats socket when `--stats` is not given:
    $PSGI_FORKSERVER_RUN_DIR, else $XDG_RUNTIME_DIR/psgi-forkserver, else
    /run/psgi-forkserver for root (systemd's RuntimeDirectory=), else
    $TMPDIR/psgi-forkserver-UID."""
    d = os.environ.get(RUN_DIR_ENV)
    if d:
        return Path(d)
    x = os.environ.get("XDG_RUNTIME_DIR")
    if x:
        return Path(x) / "psgi-forkserver"
    if os.geteuid() == 0:
        return Path("/run/psgi-forkserver")
    return Path(tempfile.gettempdir()) / f"psgi-forkserver-{os.geteuid()}"


def default_stats_path(vassals_dir: Path) -> Path:
    """RUNDIR/HASH/stats: HASH is 12 hex digits of the SHA-256 of the
    vassals directory's resolved path (the directory lock makes it one
    Emperor's); the same per-Emperor directory as the front door's files."""
    key = hashlib.sha256(str(Path(vassals_dir).resolve()).encode()).hexdigest()[:12]
    return run_dir() / key / STATS_NAME


def _answers(path: Path) -> dict[str, Any] | None:
    """The document of the Emperor serving `path`, or None (stale socket)."""
    try:
        return fetch(path, timeout=5.0)
    except (OSError, ValueError):
        return None


def find_stats(vassals_dir: Path | None = None) -> Path:
    """The stats socket of the running Emperor: the one of `vassals_dir`,
    else the only one that answers in run_dir(). ValueError says why not."""
    if vassals_dir is not None:
        return default_stats_path(vassals_dir)
    d = run_dir()
    try:
        found = sorted(d.glob("*/" + STATS_NAME))
    except OSError:
        found = []
    live = [(p, doc) for p in found if (doc := _answers(p)) is not None]
    if len(live) == 1:
        return live[0][0]
    if not live:
        raise ValueError(f"no running Emperor has a stats socket in {d} "
                         "(start one with `emperor run DIR`, or name its socket with --stats)")
    dirs = ", ".join(str(doc.get("emperor", {}).get("vassals_dir")) for _, doc in live)
    raise ValueError(f"{len(live)} Emperors run here (vassals directories {dirs}): "
                     "say which with --dir VASSALS_DIR or --stats PATH")


# -- control commands ---------------------------------------------------------------

COMMANDS = ("reload", "stop", "start", "reload-base", "reopen-logs")


def vassal_brief(v: Any) -> dict[str, Any]:
    """What a command's reply says about its vassal (the CLI follows it)."""
    return {
        "state": _enum(getattr(v, "phase", None)),
        "pid": getattr(v, "pid", None),
        "generation": getattr(v, "generation", 0),
        "last_error": getattr(v, "last_error", None),
        "held": bool(getattr(v, "held", False)),
    }


def control(emperor: Any, command: str, name: str | None) -> dict[str, Any]:
    """Carry out one operator command in the Emperor's loop; the reply says
    what happened (`ok`, `message`). The loop's next turn acts on it."""
    out: dict[str, Any] = {"schema": SCHEMA, "command": command, "name": name, "ok": False}
    if command not in COMMANDS:
        out["message"] = f"unknown command {command!r} (one of: {', '.join(COMMANDS)})"
        return out
    log = getattr(emperor, "log", lambda m, n=None: None)
    if command == "reopen-logs":  # logs.py: every log file reopened by its path
        errors = emperor.reopen_logs()
        out.update(ok=not errors, message="; ".join(errors) or "log files reopened")
        return out
    if command == "reload-base":
        deploys = emperor.deploys
        emperor.reload_base()
        last = deploys.last
        out["requests"] = deploys.requests
        if last is not None and last.request == deploys.requests and last.state.finished \
                and last.reason:
            out["message"] = f"refused: {last.reason}"
            return out
        base = emperor._base()
        gen = base.want_base_generation if base is not None else None
        out.update(ok=True, generation=gen, message=f"code deploy to base generation {gen} started")
        return out
    v = emperor.vassals.get(name) if name else None
    if v is None:
        known = ", ".join(sorted(emperor.vassals)) or "none"
        out["message"] = f"no vassal {name!r} (vassals: {known})"
        return out
    out["vassal"] = vassal_brief(v)
    if v.config is None:
        out["message"] = "its file is gone: it is stopping for good"
        return out
    if v.config.error is not None:
        out["message"] = f"its file cannot be used: {v.config.error}"
        return out
    if command == "stop":
        if v.is_base:
            out["message"] = ("is a base: the fleet's adoptions need it "
                              "(`emperor reload-base` deploys a new one)")
            return out
        if v.held:
            out.update(ok=True, message="already stopped" if not v.has_process else "stopping")
            return out
        v.hold()
        log("stop: asked by the operator", v.name)
        out.update(ok=True, message=f"stopping pid {v.pid}" if v.pid else "stopped")
    elif command == "start":
        if not v.held:
            what = f"already running (pid {v.pid})" if v.pid else f"already wanted ({v.phase})"
            v.release()  # a throttled one starts now
            out.update(ok=True, message=what)
            return out
        v.release()
        log("start: asked by the operator", v.name)
        out.update(ok=True, message="starting")
    else:  # reload
        if v.held:
            out["message"] = f"is stopped: `emperor start {v.name}` runs it again"
            return out
        if v.is_base:
            return control(emperor, "reload-base", None) | {"name": name}
        v.request_reload()
        log("reload: asked by the operator", v.name)
        out.update(ok=True, message=f"reloading pid {v.pid}" if v.pid else "starting now")
    if hasattr(emperor, "again"):
        emperor.again = True
    out["vassal"] = vassal_brief(v)
    return out


# -- addresses ------------------------------------------------------------------


class StatusConfigError(ValueError):
    pass


def parse_http_address(addr: str, public: bool = False) -> tuple[int, tuple]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback) -> (family, sockaddr).
    Refuses non-loopback addresses unless `public`."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not port_s.isdigit():
        raise StatusConfigError(f"{addr!r}: expected HOST:PORT")
    port = int(port_s)
    if not 1 <= port <= 65535:
        # getaddrinfo() would take 99999 and bind() serve it on another port
        raise StatusConfigError(f"{addr!r}: port {port} out of range (1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StatusConfigError(f"{addr!r}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
    if not public and not ip.is_loopback:
        raise StatusConfigError(
            f"{addr!r} is not a loopback address; the status page is unauthenticated "
            "(use --status-http-public to serve it there anyway)"
        )
    return family, sockaddr


# -- the servers -------------------------------------------------------------------


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    inbuf: bytes = b""
    out: memoryview | None = None
    command: bool = False  # stats socket: it sent a command line (no document then)


@dataclass
class StatusServer:
    """Listening sockets bound early (by the CLI, so errors come before
    anything starts); `attach(emperor)` registers them in its selector."""

    stats_path: Path | None = None
    http: str | None = None
    http_public: bool = False
    max_clients: int = MAX_CLIENTS
    log: Callable[[str], None] = field(default=lambda m: print(f"emperor: {m}", file=sys.stderr))

    def __post_init__(self) -> None:
        self.emperor: Any = None
        self.sel: selectors.BaseSelector | None = None
        self.stats_sock: socket.socket | None = None
        self.http_sock: socket.socket | None = None
        self.clients: dict[int, _Client] = {}
        self._stats_ino: tuple[int, int] | None = None
        self.requests = 0
        self.refused = 0
        self.now = time.monotonic()  # the loop's clock, as last handed to a callback
        self.job: Collection | None = None
        self.waiters: list[Callable[[dict[str, Any]], None]] = []
        # registered for EVENT_WRITE while a collection runs: always ready,
        # so the loop comes back to us every turn (no timer needed)
        self._tick_r: socket.socket | None = None
        self._tick_w: socket.socket | None = None
        # listening sockets out of the selector after EMFILE: fd -> (sock, http, until)
        self.paused: dict[int, tuple[socket.socket, bool, float]] = {}

    # -- set-up ------------------------------------------------------------------

    def bind(self) -> "StatusServer":
        try:
            if self.stats_path is not None:
                self.stats_path = Path(os.path.abspath(self.stats_path))
                try:
                    self.stats_sock = self._bind_unix(self.stats_path)
                except OSError as e:  # one line naming the option and the path
                    why = e.strerror or str(e)
                    if str(self.stats_path) not in why:
                        why = f"{self.stats_path}: {why}"
                    raise OSError(e.errno, f"--stats {why}") from None
            if self.http is not None:
                family, sockaddr = parse_http_address(self.http, self.http_public)
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(sockaddr)
                    s.listen(64)
                except OSError as e:
                    s.close()
                    raise OSError(e.errno, f"--status-http {self.http}: {e.strerror or e}") from None
                s.setblocking(False)
                self.http_sock = s
        except Exception:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def _bind_unix(self, path: Path) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    os.unlink(path)  # stale: nobody listens
                else:
                    raise OSError(errno.EADDRINUSE, f"{path}: another process serves it")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # born 0600: no window where others may connect
        try:
            s.bind(str(path))
        except OSError:
            s.close()
            raise
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(64)
        s.setblocking(False)
        st = os.stat(path)
        self._stats_ino = (st.st_dev, st.st_ino)
        return s

    def attach(self, emperor: Any) -> None:
        """Register in the Emperor's selector; callbacks get `now`."""
        self.emperor = emperor
        self.sel = emperor.sel
        elog = getattr(emperor, "log", None)
        if callable(elog):
            self.log = elog
        if self.stats_sock is not None:
            self.sel.register(self.stats_sock, selectors.EVENT_READ,
                              lambda now: self._accept(self.stats_sock, now, http=False))
            self.log(f"stats socket {self.stats_path}")
        if self.http_sock is not None:
            self.sel.register(self.http_sock, selectors.EVENT_READ,
                              lambda now: self._accept(self.http_sock, now, http=True))
            host, port = self.http_sock.getsockname()[:2]
            self.log(f"status page http://{'[%s]' % host if ':' in host else host}:{port}/")

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        for s in (self.stats_sock, self.http_sock):
            if s is None:
                continue
            if self.sel is not None:
                try:
                    self.sel.unregister(s)
                except Exception:  # noqa: BLE001 - KeyError, or a closed selector
                    pass
            s.close()
        self.stats_sock = self.http_sock = None
        self.paused.clear()
        for t in (self._tick_r, self._tick_w):
            if t is not None:
                t.close()
        self._tick_r = self._tick_w = None
        self.job = None
        self.waiters.clear()
        if self.stats_path is not None and self._stats_ino is not None:
            try:
                st = os.stat(self.stats_path)
                if (st.st_dev, st.st_ino) == self._stats_ino:  # still ours
                    os.unlink(self.stats_path)
            except OSError:
                pass
            self._stats_ino = None

    # -- connections ------------------------------------------------------------------

    def _accept(self, lsock: socket.socket | None, now: float, http: bool) -> None:
        if lsock is None:
            return
        self.now = now
        self._expire(now)
        for _ in range(MAX_CLIENTS):
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause(lsock, http, now, e)
                    return
                self.log(f"status: accept: {e}")
                return
            conn.setblocking(False)
            if len(self.clients) >= self.max_clients:
                self._refuse(conn, http)
                continue
            c = _Client(conn, now + CLIENT_TIMEOUT)
            self.clients[conn.fileno()] = c
            try:
                if http:
                    self.sel.register(conn, selectors.EVENT_READ,
                                      lambda t, fd=conn.fileno(): self._on_http_readable(fd, t))
                else:
                    # a line first is a command (see _on_stats_readable);
                    # nothing yet: the document, as a plain reader expects
                    self.sel.register(conn, selectors.EVENT_READ,
                                      lambda t, fd=conn.fileno(): self._on_stats_readable(fd, t))
                    if not self._on_stats_readable(conn.fileno(), now):
                        self._when_ready(lambda doc, c=c: self._send_doc(c, doc))
            except Exception as e:  # noqa: BLE001 - never take the Emperor down
                self.log(f"status: {type(e).__name__}: {e}")
                self._drop(conn.fileno())

    def _refuse(self, conn: socket.socket, http: bool) -> None:
        """Too many clients: say so in what fits the socket buffer, close."""
        why = f"too many status clients ({self.max_clients} in progress); try again"
        data = (_http(503, "text/plain", why.encode() + b"\n") if http
                else _json({"schema": SCHEMA, "error": why}))
        try:
            conn.send(data)
        except OSError:
            pass
        conn.close()
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:
            self.log(f"status: {why} ({self.refused} refused so far)")

    def _pause(self, lsock: socket.socket, http: bool, now: float, e: OSError) -> None:
        """Out of descriptors: stop accepting for ACCEPT_PAUSE seconds (the
        clients wait in the backlog) rather than spin on a readable socket."""
        try:
            self.sel.unregister(lsock)
        except (KeyError, ValueError):
            pass
        self.paused[lsock.fileno()] = (lsock, http, now + ACCEPT_PAUSE)
        self.log(f"status: accept: {e.strerror or e}; not accepting for {ACCEPT_PAUSE:g} s")

    def next_wakeup(self) -> float | None:
        """When poll() has something to do (the Emperor's loop asks)."""
        return min((until for _, _, until in self.paused.values()), default=None)

    def poll(self, now: float) -> None:
        """Called every turn of the Emperor's loop: resume paused sockets."""
        for fd, (lsock, http, until) in list(self.paused.items()):
            if now < until:
                continue
            del self.paused[fd]
            if lsock.fileno() < 0:
                continue
            self.sel.register(lsock, selectors.EVENT_READ,
                              lambda t, s=lsock, h=http: self._accept(s, t, http=h))

    # -- the collection in progress ----------------------------------------------------

    def _when_ready(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call back with the next document; requests arriving meanwhile
        share the collection in progress."""
        self.requests += 1
        self.waiters.append(callback)
        if self.job is not None:
            return
        self.job = Collection(self.emperor)
        if self._tick_w is None:
            self._tick_r, self._tick_w = socket.socketpair()
        self.sel.register(self._tick_w, selectors.EVENT_WRITE, self._tick)

    def _tick(self, now: float) -> None:
        self.now = now
        job = self.job
        try:
            if job is not None and not job.step(BUDGET):
                return
        except Exception as e:  # noqa: BLE001
            self.log(f"status: {type(e).__name__}: {e}")
        try:
            self.sel.unregister(self._tick_w)
        except Exception:  # noqa: BLE001
            pass
        self.job = None
        waiters, self.waiters = self.waiters, []
        if job is None:
            return
        doc = job.document()
        for cb in waiters:
            try:
                cb(doc)
            except Exception as e:  # noqa: BLE001
                self.log(f"status: {type(e).__name__}: {e}")
        self._expire(now)

    def _respond(self, c: _Client, data: bytes) -> None:
        fd = c.sock.fileno()
        if self.clients.get(fd) is not c:
            return  # dropped (timeout, too many clients) while it waited
        c.out = memoryview(data)
        c.deadline = min(c.deadline, self.now + WRITE_TIMEOUT)
        self._flush(fd)
        if fd in self.clients:
            try:
                self.sel.modify(c.sock, selectors.EVENT_WRITE, lambda t, fd=fd: self._flush(fd))
            except KeyError:
                self.sel.register(c.sock, selectors.EVENT_WRITE, lambda t, fd=fd: self._flush(fd))

    def _flush(self, fd: int) -> None:
        c = self.clients.get(fd)
        if c is None or c.out is None:
            return
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
            c.out = c.out[n:]
        self._drop(fd)

    def _send_doc(self, c: _Client, doc: dict[str, Any]) -> None:
        if not c.command:
            self._respond(c, _json(doc))

    def _on_stats_readable(self, fd: int, now: float) -> bool:
        """A stats client's bytes: one line (`stop NAME`, or JSON
        `{"command": ..., "name": ...}`) is a command, answered with its
        outcome instead of the document. True when a command came or is
        coming; False for nothing yet, or end of file (a plain reader).

        A command client writes right after connect(): its line is almost
        always there when we accept. If the document went out first, the
        client sees a reply without "command" and asks again (fetch_command)."""
        self.now = now
        c = self.clients.get(fd)
        if c is None:
            return True
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return c.command
        except OSError:
            data = b""
        if not data:
            try:
                self.sel.unregister(c.sock)  # a plain reader shut its side
            except (KeyError, ValueError):
                pass
            return c.command
        c.command = True
        c.inbuf += data
        if b"\n" not in c.inbuf:
            if len(c.inbuf) > MAX_REQUEST:
                self._respond(c, _json({"schema": SCHEMA, "ok": False,
                                        "message": "command line too long"}))
            return True
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        line = c.inbuf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
        try:
            if line.startswith("{"):
                req = json.loads(line)
                command, name = str(req.get("command", "")), req.get("name")
            else:
                command, _, name = line.partition(" ")
                name = name.strip() or None
            reply = control(self.emperor, command, None if name is None else str(name))
            if self.job is not None:
                # a collection in progress took its snapshot before the
                # command: whoever waits on it (or joins it) sees the new state
                self.job = Collection(self.emperor)
        except Exception as e:  # noqa: BLE001 - a bad line must not take the loop down
            reply = {"schema": SCHEMA, "command": line[:80], "ok": False,
                     "message": f"{type(e).__name__}: {e}"}
        self._respond(c, _json(reply))
        return True

    def _on_http_readable(self, fd: int, now: float) -> None:
        self.now = now
        c = self.clients.get(fd)
        if c is None:
            return
        try:
            data = c.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        c.inbuf += data
        if b"\r\n\r\n" not in c.inbuf and b"\n\n" not in c.inbuf:
            if len(c.inbuf) > MAX_REQUEST:
                self._respond(c, _http(431, "text/plain", b"request too large\n"))
            return
        try:  # the request is complete: stop reading, answer (maybe later)
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        try:
            self._http_request(c)
        except Exception as e:  # noqa: BLE001
            self.log(f"status page: {type(e).__name__}: {e}")
            self._respond(c, _http(500, "text/plain", b"internal error\n"))

    def _http_request(self, c: _Client) -> None:
        line = c.inbuf.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return self._respond(c, _http(400, "text/plain", b"bad request\n"))
        method, target = parts[0], parts[1].split("?", 1)[0]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return self._respond(
                c, _http(405, "text/plain", b"only GET\n", extra="Allow: GET, HEAD\r\n"))
        if target == "/json":
            self._when_ready(
                lambda doc: self._respond(c, _http(200, "application/json", _json(doc), head)))
        elif target == "/metrics":
            from .metrics import render

            em = getattr(self.emperor, "metrics", None)
            self._when_ready(lambda doc: self._respond(
                c, _http(200, "text/plain; version=0.0.4; charset=utf-8", render(doc, em), head)))
        elif target == "/healthz":
            ok, why = health(self.emperor)
            self._respond(c, _http(200 if ok else 503, "text/plain", why.encode() + b"\n", head))
        elif target.startswith("/log/"):
            name = urllib.parse.unquote(target[len("/log/"):])
            lines = getattr(self.emperor, "recent", {}).get(name)
            if lines is None and name not in getattr(self.emperor, "vassals", {}):
                self._respond(c, _http(404, "text/plain", b"no such vassal\n", head))
            else:
                body = "".join(line + "\n" for line in (lines or ()))
                self._respond(c, _http(200, "text/plain; charset=utf-8",
                                       (body or "(nothing logged yet)\n").encode(), head))
        elif target in ("/", "/index.html"):
            self._when_ready(lambda doc: self._respond(
                c, _http(200, "text/html; charset=utf-8", render_html(doc).encode(), head)))
        else:
            self._respond(c, _http(404, "text/plain", b"not found\n"))

    def _expire(self, now: float) -> None:
        for fd, c in list(self.clients.items()):
            if now >= c.deadline:
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        c = self.clients.pop(fd, None)
        if c is None:
            return
        if self.sel is not None:
            try:
                self.sel.unregister(c.sock)
            except Exception:  # noqa: BLE001 - KeyError, or a closed selector
                pass
        c.sock.close()


def health(emperor: Any) -> tuple[bool, str]:
    """/healthz: (healthy, why). The answer comes from the Emperor's loop
    itself, so an answer means the loop turns; the rest is the base: up
    (a fork server that accepts) when there is one."""
    if getattr(emperor, "shutting_down", False):
        return False, "shutting down"
    base_of = getattr(emperor, "_base", None)
    base = base_of() if callable(base_of) else None
    if base is None:
        if getattr(getattr(emperor, "opts", None), "use_fork_server", None) is not None:
            if getattr(emperor, "external_ready", False):
                return True, "ok: loop turns, external fork server accepts"
            return False, "external fork server does not accept"
        return True, "ok: loop turns, no base vassal"
    cur = getattr(base, "current", None)
    state = _enum(getattr(cur, "state", None))
    if cur is not None and _enum(getattr(cur, "kind", None)) == "base" and state in ("running", "loyal"):
        return True, f"ok: loop turns, base {base.name} generation {cur.base_generation} up"
    return False, f"base {base.name} is {_enum(getattr(base, 'phase', None))}"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def _http(code: int, ctype: str, body: bytes, head: bool = False, extra: str = "") -> bytes:
    hdr = (
        f"HTTP/1.0 {code} {_REASONS.get(code, '')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return hdr.encode("latin-1") + (b"" if head else body)


# -- presentation ------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


_env = None
#: the page reads /json again this often (in place, see status.html)
PAGE_REFRESH = 2.0


def render_html(doc: dict[str, Any]) -> str:
    global _env
    if _env is None:
        import jinja2

        _env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
            autoescape=True,
            undefined=jinja2.ChainableUndefined,  # a missing field shows as empty
        )
        _env.filters["bytes"] = human_bytes
        _env.filters["seconds"] = human_seconds
    counts: dict[str, int] = {}
    for v in doc.get("vassals", {}).values():
        counts[str(v.get("state"))] = counts.get(str(v.get("state")), 0) + 1
    return _env.get_template("status.html").render(
        doc=doc, counts=sorted(counts.items()), refresh_ms=int(PAGE_REFRESH * 1000))


COLUMNS = ("NAME", "STATE", "KIND", "PID", "GEN", "BASE", "ADDRESS", "UPTIME", "RESTARTS",
           "LAST EXIT", "THROTTLE", "PROCS", "PSS", "USS", "REQS", "AVG MS")


def format_table(doc: dict[str, Any]) -> str:
    rows = []
    for name, v in doc.get("vassals", {}).items():
        rows.append((
            name, v.get("state") or "-", v.get("kind") or "-",
            str(v["pid"]) if v.get("pid") else "-",
            str(v.get("generation", "-")),
            "-" if not v.get("base_generation") else str(v["base_generation"]),
            " ".join(v.get("addresses") or []) or "-",
            human_seconds(v.get("uptime")), str(v.get("restarts", "-")),
            v.get("last_exit") or "-",
            human_seconds(v["throttle"]) if v.get("throttle") else "-",
            str(v.get("processes", 0)), human_bytes(v.get("pss")), human_bytes(v.get("uss")),
            "-" if v.get("requests") is None else str(v["requests"]),
            "-" if v.get("latency_avg_ms") is None else f"{v['latency_avg_ms']:.1f}",
        ))
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines = [fmt(COLUMNS), *map(fmt, rows)]
    for name, v in doc.get("vassals", {}).items():
        if v.get("error"):
            lines.append(f"{name}: {v['error']}")
        elif v.get("last_error"):
            lines.append(f"{name}: (earlier) {v['last_error']}")
        if v.get("spares"):
            sp = v["spares"]
            lines.append(f"{name}: {sp['count']} spares, {sp.get('ready', 0)} warm ({len(sp['pids'])} processes), "
                         f"PSS {human_bytes(sp['pss'])}, USS {human_bytes(sp.get('uss'))} (counted in its own)")
    e = doc.get("emperor", {})
    t = doc.get("totals", {})
    lines.append(
        f"emperor pid {e.get('pid')}  rss {human_bytes(e.get('rss'))}  "
        f"cpu {e.get('cpu_user', 0) + e.get('cpu_system', 0):.2f}s ({e.get('cpu_percent', 0):.1f}%)  "
        f"up {human_seconds(e.get('uptime'))}  |  {t.get('vassals', 0)} vassals, "
        f"{t.get('processes', 0)} processes, PSS {human_bytes(t.get('pss'))}, "
        f"USS {human_bytes(t.get('uss'))}  |  collected in {doc.get('collect_ms', 0):.1f} ms "
        f"over {doc.get('turns', 1)} loop turns"
    )
    return "\n".join(lines) + "\n"


def fetch(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The client side: read the stats socket's document."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    if not chunks:
        raise ValueError("the Emperor closed the connection without a document")
    doc = json.loads(b"".join(chunks))
    if "vassals" not in doc and doc.get("error"):
        raise ValueError(doc["error"])
    return doc


def fetch_command(path: Path, command: str, name: str | None = None,
                  timeout: float = 10.0, tries: int = 5) -> dict[str, Any]:
    """Send one command on the stats socket; its reply. The Emperor takes a
    line that arrives after it sent the document as too late: then ask again."""
    line = (json.dumps({"command": command, "name": name}) + "\n").encode()
    for _ in range(tries):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            chunks = []
            try:
                s.sendall(line)
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    chunks.append(b)
            except (BrokenPipeError, ConnectionResetError):
                continue  # it answered with the document and closed: again
        if not chunks:
            raise ValueError("the Emperor closed the connection without a reply")
        reply = json.loads(b"".join(chunks))
        if "command" in reply:
            return reply
        if "vassals" not in reply and reply.get("error"):
            raise ValueError(reply["error"])
    raise ValueError(f"no reply to {command!r} after {tries} tries")

