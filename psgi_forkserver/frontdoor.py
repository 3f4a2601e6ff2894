"""The front door: one nginx in front of every vassal, routing by Host name.

Two halves:

- the configuration, a pure function of the vassals' routing facts
  (`Route`: which names, which socket, up or down): `render_routing` is the
  http-level part (one `upstream` per vassal, a `map` from `$host` to it),
  `render_nginx_conf` the whole file of the embedded nginx. `emperor
  nginx-conf` prints `render_routing` for an operator's own nginx;
- `FrontDoor`, the Emperor's side: it keeps the last routes it was given,
  writes the configuration when it changed (atomically, batched: the first
  change waits `batch` seconds for the others of the same turn and no two
  reloads come closer than `min_gap`), and runs nginx as a supervised child
  (`daemon off`, its own session, restarted with a backoff when it dies,
  SIGHUP to reload, stopped last) or, for an operator's nginx, runs their
  reload command after each write.

Nothing here waits: the Emperor's loop calls `update`, `poll`, `exited`
and `next_wakeup`; the one reaping of children stays in the Emperor.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .logs import OutputPipe
from .nonblocking import recv_ready

#: nginx variables this configuration defines (a prefix nobody else uses)
BACKEND = "$psgi_fs_backend"
RETRY = "$psgi_fs_retry_after"
DOWN = "@down"  # map value of a vassal that cannot answer now

#: idle connections nginx keeps to each vassal: a vassal's worker holds an
#: idle connection in its select() set, not as a busy worker, so they cost
#: little there and save a connect/accept/close per request
DEFAULT_KEEPALIVE = 16

#: what nginx sends a `socket` vassal (Debian's uwsgi_params but PATH_INFO
#: and DOCUMENT_ROOT, plus the Host and X-* headers the HTTP route sets)
UWSGI_PARAMS = (
    ("QUERY_STRING", "$query_string"), ("REQUEST_METHOD", "$request_method"),
    ("CONTENT_TYPE", "$content_type"), ("CONTENT_LENGTH", "$content_length"),
    ("REQUEST_URI", "$request_uri"),  # PATH_INFO: the vassal decodes it from this
    ("SERVER_PROTOCOL", "$server_protocol"), ("REQUEST_SCHEME", "$scheme"),
    ("HTTPS", "$https if_not_empty"), ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"), ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$host"),
    # HTTP_* params replace the client's header of that name
    ("HTTP_HOST", "$psgi_fs_host"), ("HTTP_X_REAL_IP", "$remote_addr"),
    ("HTTP_X_FORWARDED_FOR", "$proxy_add_x_forwarded_for"),
    ("HTTP_X_FORWARDED_PROTO", "$scheme"), ("HTTP_X_FORWARDED_HOST", "$host"),
)

PR_SET_PDEATHSIG = 1
F_SETPIPE_SZ = 1031


@dataclass(frozen=True, order=True)
class Route:
    """What the front door needs to know about one vassal."""

    vassal: str
    domains: tuple[str, ...]
    target: str  # "unix:/run/.../app.sock" or "127.0.0.1:9101", as nginx writes them
    up: bool = True  # False: answered with 503 (and Retry-After)
    retry_after: int = 1  # seconds, for a vassal that is down (0: no Retry-After)
    protocol: str = "http"  # "uwsgi": the vassal's `socket` (nginx's uwsgi_pass)
    limit_post: int = 0  # the vassal's `limit-post`: nginx's client_max_body_size (0: none)
    head_size: int = 8192  # the vassal's `buffer-size` (largest request head)


def route_limits(cfg) -> dict[str, int]:
    """The vassal file's limits the front door applies too (Route's
    limit_post, head_size), from its `limit-post` and `buffer-size`."""
    def number(key: str, default: int) -> int:
        value = cfg.get(key)
        return int(value) if value is not None and value.isdigit() else default
    return {"limit_post": number("limit-post", 0), "head_size": number("buffer-size", 8192)}


def nginx_target(addr: str) -> str:
    """A vassal's socket address as an nginx `server` writes it."""
    if "/" in addr:
        return f"unix:{addr}"
    if addr.startswith(":"):
        return f"127.0.0.1{addr}"  # all addresses: loopback reaches it
    return addr


def upstream_name(vassal: str) -> str:
    """An nginx identifier for a vassal's upstream, one per vassal name.

    nginx compares upstream names without case, so only names of lower-case
    letters, digits and `_` are used as they are (`psgi_fs_v_NAME`); any
    other name is hashed into a second namespace (`psgi_fs_x_...`) that no
    plain name can reach: `x-y` and `x_y_HASH`, `App` and `app` never meet."""
    if re.fullmatch(r"[a-z0-9_]+", vassal):
        return f"psgi_fs_v_{vassal}"
    safe = re.sub(r"[^a-z0-9_]", "_", vassal.lower())[:48]
    return f"psgi_fs_x_{safe}_{hashlib.sha256(vassal.encode()).hexdigest()[:16]}"


def _quote(s: str) -> str:
    """An nginx string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


def hash_sizes(names: Iterable[str]) -> tuple[int, int]:
    """(bucket_size, max_size) for an nginx hash of these names (a `map`'s
    or the server names'): a bucket must hold the longest name (nginx's
    NGX_HASH_ELT_SIZE: a pointer, the name and 2 bytes, rounded to pointers)
    plus the bucket's end pointer; the table may grow to 4 slots a name."""
    names = list(names)
    longest = max((len(n) for n in names), default=0)
    bucket = _pow2_at_least(8 + (longest + 2 + 7) // 8 * 8 + 8, 64)
    return bucket, _pow2_at_least(4 * len(names), 2048)


def _map_key(domain: str) -> str:
    """A name as a `map ... { hostnames; }` key: the leading backslash makes
    nginx read it as a plain key even when it is `default`, `include`,
    `hostnames` or `volatile` (it drops the backslash)."""
    return _quote("\\" + domain)


def _claimed_once(routes: Iterable[Route]) -> list[tuple[Route, tuple[str, ...]]]:
    """Each route with the names it keeps: a name claimed twice (the
    Emperor refuses that, but a running vassal keeps its last good names)
    stays with the first in order, so the configuration never repeats one."""
    seen: set[str] = set()
    out = []
    for r in sorted(routes):
        mine = tuple(d for d in r.domains if d not in seen)
        seen.update(mine)
        out.append((r, mine))
    return out


def render_routing(routes: Iterable[Route], keepalive: int = DEFAULT_KEEPALIVE) -> str:
    """The http-level part for an operator's own nginx: upstreams and the
    `$host` maps, with the map hash sized for the names. Deterministic
    (sorted), so an unchanged fleet renders the same bytes."""
    claimed = _claimed_once(routes)
    bucket, max_size = hash_sizes(d for _, names in claimed for d in names)
    out = [
        "# generated by psgi-forkserver: do not edit (the Emperor rewrites it)",
        f"map_hash_bucket_size {bucket};",
        f"map_hash_max_size {max_size};",
        "map $host $psgi_fs_backend {",
        "    hostnames;",
        '    default "";',
    ]
    retry = ["map $host $psgi_fs_retry_after {", "    hostnames;", "    default 1;"]
    proto = ["map $host $psgi_fs_protocol {", "    hostnames;", "    default http;"]
    for r, names in claimed:
        value = upstream_name(r.vassal) if r.up else DOWN
        for d in names:
            out.append(f"    {_map_key(d)} {_quote(value)};")
            if not r.up:
                retry.append(f"    {_map_key(d)} {max(1, r.retry_after)};")
            if r.up and r.protocol != "http":
                proto.append(f"    {_map_key(d)} {r.protocol};")
    out.append("}")
    retry.append("}")
    proto.append("}")
    out += retry + proto + HOST_MAP
    for r, names in claimed:
        if r.up and names:
            out += _upstream(r, keepalive)
    return "\n".join(out) + "\n"


#: `$psgi_fs_host`, the Host the vassal sees: the name nginx routed by
#: (`$host`: the request line's host if it has one, else the Host header),
#: with the Host header's port when the header names that same host
HOST_MAP = [
    'map "$host $http_host" $psgi_fs_host {',
    '    "~*^(\\S+) \\1(:[0-9]+)?$" $http_host;',
    "    default $host;",
    "}",
]


def _upstream(r: Route, keepalive: int) -> list[str]:
    # one server: nginx never marks it failed; the vassal's socket is the
    # Emperor's and queues connections across restarts
    out = [f"upstream {upstream_name(r.vassal)} {{", f"    server {_quote(r.target)};"]
    if keepalive:
        out.append(f"    keepalive {keepalive};")
    out.append("}")
    return out


#: a response head up to this size passes (nginx's default is one page: a
#: 5 KB head of cookies would be a 502); a bigger one is the app's error
RESPONSE_HEAD = 32768

#: the largest request head nginx's buffers take, whatever a buffer-size says
MAX_HEAD = 1 << 20

#: seconds nginx waits for a vassal's socket to accept; a UNIX socket's
#: backlog accepts at once, a TCP one that nobody serves does not
CONNECT_TIMEOUT = 2


def _proxy_lines(keepalive: int) -> list[str]:
    """How a request is passed on, HTTP (`proxy_*`) and uwsgi (`uwsgi_*`):
    the Host and the client's address are the front door's, never the
    client's own claims."""
    lines = [
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";' if keepalive else "proxy_set_header Connection close;",
        "proxy_set_header Host $psgi_fs_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Real-IP $remote_addr;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "proxy_set_header X-Forwarded-Host $host;",
        "proxy_redirect off;",
        f"proxy_connect_timeout {CONNECT_TIMEOUT}s;",
        "proxy_read_timeout 3600s;",
        f"proxy_buffer_size {RESPONSE_HEAD};",
        f"proxy_buffers 4 {RESPONSE_HEAD};",
        *(f"uwsgi_param {k} {v};" for k, v in UWSGI_PARAMS),
        f"uwsgi_connect_timeout {CONNECT_TIMEOUT}s;",
        "uwsgi_read_timeout 3600s;",
        f"uwsgi_buffer_size {RESPONSE_HEAD};",
        f"uwsgi_buffers 4 {RESPONSE_HEAD};",
    ]
    return lines


UNAVAILABLE = [
    "location @psgi_fs_unavailable {",
    "    add_header Retry-After 1 always;",
    '    return 503 "psgi-forkserver: $host does not answer, retry in 1 s\\n";',
    "}",
]


def render_locations(keepalive: int = DEFAULT_KEEPALIVE) -> str:
    """The body of an operator's `server` block that serves the routing of
    `render_routing`: 404 for an unknown name, 503 with Retry-After for a
    vassal that is down or does not answer, proxy to the vassal otherwise."""
    lines = [
        "default_type text/plain;",
        "location / {",
        '    if ($psgi_fs_backend = "") {',
        '        return 404 "psgi-forkserver: no app is served as $host here\\n";',
        "    }",
        f'    if ($psgi_fs_backend = "{DOWN}") {{',
        "        add_header Retry-After $psgi_fs_retry_after always;",
        '        return 503 "psgi-forkserver: $host is down, retry in $psgi_fs_retry_after s\\n";',
        "    }",
        '    if ($psgi_fs_protocol = "uwsgi") {',
        "        uwsgi_pass $psgi_fs_backend;",
        "    }",
        "    proxy_pass http://$psgi_fs_backend;",
        *("    " + x for x in _proxy_lines(keepalive)),
        "    error_page 502 504 = @psgi_fs_unavailable;",
        "}",
        *UNAVAILABLE,
    ]
    return "\n".join(lines) + "\n"


def _server(r: Route, names: tuple[str, ...], listen: str, keepalive: int) -> list[str]:
    """One vassal's `server` block of the embedded nginx: its own limits
    (`limit-post` as client_max_body_size) and its own upstream."""
    out = ["server {", f"    listen {listen};",
           "    server_name " + " ".join(_quote(d) for d in names) + ";"]
    if not r.up:
        out.append("    location / {")
        if r.retry_after > 0:
            out += [f"        add_header Retry-After {r.retry_after} always;",
                    f'        return 503 "psgi-forkserver: $host is down, retry in '
                    f'{r.retry_after} s\\n";']
        else:
            out.append('        return 503 "psgi-forkserver: $host is stopped\\n";')
        out += ["    }", "}"]
        return out
    # past 2^62 nginx cannot hold the number: no limit it could reach anyway
    limit = r.limit_post if 0 < r.limit_post < 2 ** 62 else 0
    out.append(f"    client_max_body_size {limit};")
    out.append("    location / {")
    if r.protocol == "uwsgi":
        out.append(f"        uwsgi_pass {upstream_name(r.vassal)};")
    else:
        out.append(f"        proxy_pass http://{upstream_name(r.vassal)};")
    out += ["        " + x for x in _proxy_lines(keepalive)]
    out += ["        error_page 502 504 = @psgi_fs_unavailable;", "    }"]
    out += ["    " + x for x in UNAVAILABLE]
    out.append("}")
    return out


def listen_directive(addr: str) -> str:
    """`127.0.0.1:8080`, `[::1]:8080`, `:8080` as nginx's `listen`."""
    if addr.startswith(":"):
        return addr[1:]
    return addr


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))


def render_nginx_conf(routes: Iterable[Route], listen: str, run_dir: Path,
                      keepalive: int = DEFAULT_KEEPALIVE, user: str | None = None,
                      workers: str = "auto", access_log: bool = True,
                      generation: int = 0) -> str:
    """The whole configuration of the embedded nginx: foreground master,
    every path under `run_dir/nginx`, errors on stderr (the Emperor reads
    them), the access log on stdout (the Emperor reads it and writes it by
    its log rules), one `server` per vassal (its names, its limits) and a
    default one answering 404 for any other name."""
    ng = Path(run_dir) / "nginx"
    claimed = [(r, names) for r, names in _claimed_once(routes) if names]
    names = [d for _, ns in claimed for d in ns]
    bucket, max_size = hash_sizes(names)
    # the largest request head a vassal takes (its buffer-size), 8 KB to 1 MB
    head_size = min(MAX_HEAD, _pow2_at_least(max((min(r.head_size, MAX_HEAD)
                                                  for r, _ in claimed), default=8192), 8192))
    listen = listen_directive(listen)
    head = [
        f"# generated by psgi-forkserver (emperor run --http): do not edit; generation {generation}",
        "daemon off;",
        "master_process on;",
        f"worker_processes {workers};",
        f"pid {ng / 'nginx.pid'};",
        "error_log stderr warn;",
        f"worker_shutdown_timeout {SHUTDOWN_TIMEOUT}s;",
    ]
    if user:
        head.append(f"user {user};")
    head += ["events {", "    worker_connections 4096;", "}", "http {"]
    # the access log: on a pipe the Emperor relays as it relays a vassal's
    # lines (its timestamps, --log-format, --logto), attributed to [front]
    http = [
        "log_format psgi_fs '$host $remote_addr \"$request\" $status $body_bytes_sent "
        "$request_time';",
        # writes of at most PIPE_BUF bytes: two workers' lines never interleave
        "access_log /dev/stdout psgi_fs buffer=4k flush=1s;" if access_log else "access_log off;",
        "server_tokens off;",
        "default_type text/plain;",
        f"client_body_temp_path {ng / 'tmp' / 'body'};",
        f"proxy_temp_path {ng / 'tmp' / 'proxy'};",
        f"fastcgi_temp_path {ng / 'tmp' / 'fastcgi'};",
        f"uwsgi_temp_path {ng / 'tmp' / 'uwsgi'};",
        f"scgi_temp_path {ng / 'tmp' / 'scgi'};",
        "keepalive_timeout 65s;",
        f"server_names_hash_bucket_size {bucket};",
        f"server_names_hash_max_size {max_size};",
        f"large_client_header_buffers 4 {head_size};",
        *HOST_MAP,
    ]
    for r, _ in claimed:
        if r.up:
            http += _upstream(r, keepalive)
    # any other name: the vassal's socket through its host link, if it has
    # one (a vassal that came since the last reload), else 404
    http += ["server {", f"    listen {listen} default_server;", '    server_name "";',
             "    client_max_body_size 0;",
             "    location / {",
             # no link, no connect: an unknown name is no error line (`-f`:
             # nginx's -e opens the file, which a socket is not)
             f'        if (!-f "{ng / HOSTS}/$host.known") {{',
             '            return 404 "psgi-forkserver: no app is served as $host here\\n";',
             "        }",
             f"        proxy_pass http://unix:{ng / HOSTS}/$host.sock:;",
             *("        " + x for x in _proxy_lines(0)),
             "        error_page 502 504 = @psgi_fs_nohost;",
             "    }",
             "    location @psgi_fs_nohost {",
             '        return 404 "psgi-forkserver: no app is served as $host here\\n";',
             "    }", "}"]
    for r, ns in claimed:
        http += _server(r, ns, listen, keepalive)
    return "\n".join(head) + "\n" + _indent("\n".join(http) + "\n", 4) + "}\n"


#: the directory of host links: NAME.sock -> the socket of the vassal
#: serving NAME, for names nginx's configuration does not have yet, each
#: with an empty NAME.known beside it (what nginx tests before connecting)
HOSTS = "hosts"


def host_link_name(domain: str, hosts_dir: Path) -> str | None:
    """The host link of an exact name, or None when nginx cannot reach it
    that way (a wildcard, or a path too long for a UNIX socket address)."""
    if domain.startswith("*"):
        return None
    from .sockets import MAX_UNIX_PATH

    name = f"{domain}.sock"
    if len(f"{domain}.known") > 255 or len(os.fsencode(str(hosts_dir / name))) > MAX_UNIX_PATH:
        return None
    return name


def _known(hosts_dir: Path, link: str) -> Path:
    return hosts_dir / (link[:-len(".sock")] + ".known")


def served_by_link(r: Route, hosts_dir: Path) -> bool:
    """Whether the host links serve every name of this route (an HTTP
    vassal on a UNIX socket, exact names of a reachable length)."""
    return (r.up and r.protocol == "http" and r.target.startswith("unix:")
            and all(host_link_name(d, hosts_dir) for d in r.domains))


#: seconds an old nginx worker may keep serving after a reload: a response
#: still streaming then is cut (the client sees a truncated body)
SHUTDOWN_TIMEOUT = 30


def installed_route(name: str, routes: Iterable[Route]) -> Route | None:
    """The route nginx picks for `name` in a configuration of these routes:
    an exact name first, else the longest wildcard above it."""
    best: tuple[int, Route] | None = None
    for r in routes:
        for d in r.domains:
            if d == name:
                return r
            if d.startswith("*.") and name.endswith(d[1:]) and (best is None or len(d) > best[0]):
                best = (len(d), r)
    return best[1] if best else None


def _rerouted(r: Route, installed: Iterable[Route]) -> bool:
    """Whether the running configuration routes one of this route's names
    somewhere else (a name moved from a live vassal, an exact name under
    another vassal's wildcard), or this vassal's dropped names to it: the
    host links cannot help there (nginx consults them only for names it
    does not know), so waiting to reload would let the wrong vassal answer."""
    installed = tuple(installed)
    for d in r.domains:
        now = installed_route(d, installed)
        if now is not None and (now.target != r.target or not now.up):
            return True
    before = next((o for o in installed if o.vassal == r.vassal), None)
    return before is not None and not set(before.domains) <= set(r.domains)


def write_if_changed(path: Path, text: str) -> bool:
    """Replace `path` with `text` atomically (rename), only if it differs;
    True when it was written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def default_run_dir(vassals_dir: Path) -> Path:
    """Where an Emperor keeps its sockets and nginx files, unless told: the
    directory of its default stats socket (status.default_stats_path), one
    per vassals directory (whose lock guarantees one Emperor)."""
    from .status import default_stats_path

    return default_stats_path(vassals_dir).parent


def nginx_worker_user(spec: str | None) -> tuple[str, int]:
    """(`user` directive value, gid) of nginx's workers under a root
    master: USER[:GROUP] as asked, else www-data (Debian's nginx user) if
    there is one, else nobody; the group defaults to the user's own.
    ValueError (one line) for a user or group that does not exist."""
    import grp
    import pwd

    if spec:
        name, _, group = spec.partition(":")
    else:
        name, group = "www-data", ""
        try:
            pwd.getpwnam(name)
        except KeyError:
            name = "nobody"
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise ValueError(f"no such user {name!r}") from None
    try:
        gr = (grp.getgrgid(pw.pw_gid) if not group else
              grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group))
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None
    return f"{pw.pw_name} {gr.gr_name}", gr.gr_gid


def unreachable_by(user: str, gid: int, path: Path) -> str | None:
    """The first directory on the way to `path` that `user` (with group
    `gid` and its other groups) cannot search, as one phrase; None if
    every one can be."""
    import grp
    import pwd
    import stat as st

    pw = pwd.getpwnam(user)
    groups = {gid, pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    p = Path(os.path.abspath(path))
    for d in [*reversed(p.parents), p]:
        try:
            s = os.stat(d)
        except OSError:
            return None  # made later by the Emperor, 0755
        if pw.pw_uid == 0:
            return None
        mode = s.st_mode
        ok = (mode & st.S_IXUSR if s.st_uid == pw.pw_uid else
              mode & st.S_IXGRP if s.st_gid in groups else mode & st.S_IXOTH)
        if not ok:
            return f"{d} is mode {st.S_IMODE(mode):04o}, owner {s.st_uid}:{s.st_gid}"
    return None


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def check_listen(addr: str) -> str | None:
    """Why nginx could not listen on `addr` (one line), or None."""
    from .sockets import parse_address

    try:
        host, port = parse_address(addr)
    except ValueError as e:
        return str(e)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as e:
        return f"cannot listen on {addr}: {e.strerror or e}"
    finally:
        s.close()
    return None


def _spawn_nginx(argv: list[str], out_w: int, err_w: int) -> int:
    """fork+exec nginx in its own session, with stdout (the access log) and
    stderr (its error log) on pipes the Emperor reads;
    it gets SIGTERM if the Emperor dies (PR_SET_PDEATHSIG), so a killed
    Emperor leaves no nginx holding the port."""
    parent = os.getpid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pid = os.fork()
    if pid == 0:  # the child: only system calls until exec
        try:
            os.setsid()
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM,
                        signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    return pid


@dataclass
class FrontDoorOptions:
    run_dir: Path
    listen: str | None = None  # --http: run nginx on this address
    include: Path | None = None  # --nginx-include: keep this file up to date
    reload_cmd: str | None = None  # --nginx-reload: run after each write of `include`
    nginx: str | None = None  # the nginx binary (default: from PATH)
    keepalive: int = DEFAULT_KEEPALIVE  # idle connections nginx keeps per vassal (0: none)
    access_log: bool = True  # nginx's access log, in the Emperor's log
    user: str | None = None  # nginx's `user` (USER GROUP) of its workers, as root
    worker_gid: int | None = None  # that group: the vassals' sockets are given to it
    batch: float = 0.05  # a change waits this long for the others of its turn
    min_gap: float = 1.0  # seconds between two reloads at least
    # a change the host links serve meanwhile waits until the routes were
    # still this long (nginx's reload closes its idle keep-alive
    # connections: a client's request crossing that close fails), at most
    # `settle_max` seconds
    settle: float = 10.0
    settle_max: float = 300.0
    backoff_first: float = 1.0
    backoff_max: float = 30.0
    stable_after: float = 10.0


@dataclass
class Check:
    """`nginx -t` of one candidate configuration, running."""

    pid: int
    routes: tuple[Route, ...]
    path: Path  # the candidate file
    err: Path  # nginx's messages about it


@dataclass
class Bisect:
    """A candidate nginx refused: which routes broke it. `accepted` routes
    passed together; each group of `queue` is tried with them, a group that
    fails is halved, a single route that fails is refused."""

    accepted: tuple[Route, ...]
    queue: list[tuple[Route, ...]]
    base_checked: bool = False  # `accepted` alone passed: a failure is a route's


def nginx_message(text: str) -> str:
    """nginx's reason, one line: its first [emerg] (or last) line, without
    the `nginx: ` prefix and the candidate file's path and line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    line = next((x for x in lines if "[emerg]" in x), lines[-1] if lines else "nginx -t failed")
    line = re.sub(r"^nginx: ", "", line)
    return re.sub(r" in /\S+:\d+$", "", line)


@dataclass
class FrontDoor:
    opts: FrontDoorOptions
    log: Callable[[str], None]
    routes: tuple[Route, ...] | None = None  # the routes wanted now
    dirty_since: float | None = None
    changed_at: float = 0.0  # the last change of the routes
    last_apply: float = -1e9
    links: dict[str, str] = field(default_factory=dict)  # host link -> socket path
    links_swept: bool = False  # the host links of an earlier run removed
    pid: int | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    failures: int = 0
    stopping: bool = False
    reloads: int = 0  # SIGHUPs sent (status, tests)
    reload_pid: int | None = None  # --nginx-reload command running
    reload_again: bool = False
    err_r: int | None = None
    err_buf: bytes = b""
    # what the configuration file holds: checked by nginx -t, numbered
    installed: tuple[Route, ...] | None = None
    generation: int = 0
    serving: int = 0  # the generation the running nginx was started or reloaded with
    last_reload: float | None = None  # wall clock of the last start or reload
    last_error: str | None = None  # the front door's own, not a vassal's
    check: Check | None = None
    bisect: Bisect | None = None
    next_check: float = 0.0  # after a failure of nginx -t that is no route's
    # vassal -> (its route nginx refused, nginx's message); a changed route
    # is tried again
    refused: dict[str, tuple[Route, str]] = field(default_factory=dict)
    # the Emperor's selector: watch(fd, callback), unwatch(fd)
    watch: Callable[[int, Callable[[float], None]], None] = field(default=lambda fd, cb: None)
    unwatch: Callable[[int], None] = field(default=lambda fd: None)
    # relay(pipe, pid): nginx's access log, relayed as a vassal's output
    relay: Callable[[OutputPipe, Callable[[], int | None]], None] | None = None
    # the Emperor is told of a vassal whose route nginx refused
    on_refused: Callable[[str, str], None] = field(default=lambda vassal, why: None)
    # around the spawn: nginx is born in the front door's cgroup (cgroups.py)
    spawning: Callable[[], contextlib.AbstractContextManager] = field(
        default=contextlib.nullcontext)

    def __post_init__(self) -> None:
        self.ng_dir = Path(self.opts.run_dir) / "nginx"
        self.conf_path = self.ng_dir / "nginx.conf"

    # -- facts ------------------------------------------------------------

    def update(self, routes: Iterable[Route], now: float) -> None:
        """The routing facts after a loop turn; a change is applied by `poll`."""
        new = tuple(sorted(routes))
        if new != self.routes:
            self.routes = new
            self.changed_at = now
            if self.dirty_since is None:
                self.dirty_since = now
            if self.embedded:
                self._sync_links()

    def _sync_links(self) -> None:
        """The host links follow the routes at once (no reload): a new
        vassal answers by its names before nginx's configuration has them."""
        hosts = self.ng_dir / HOSTS
        want: dict[str, str] = {}
        for r in self.routes or ():
            if not served_by_link(r, hosts) or self.refused.get(r.vassal, (None,))[0] == r:
                continue
            for d in r.domains:
                name = host_link_name(d, hosts)
                if name is not None:
                    want.setdefault(name, r.target[len("unix:"):])
        if want == self.links and self.links_swept:
            return
        try:
            hosts.mkdir(parents=True, exist_ok=True)
            if not self.links_swept:  # a killed Emperor's links name vassals gone since
                for old in os.listdir(hosts):
                    os.unlink(hosts / old)
                self.links_swept = True
        except OSError as e:
            self.log(f"cannot create {hosts}: {e.strerror or e}")
            return
        for name in [n for n in self.links if n not in want]:
            try:
                for path in (_known(hosts, name), hosts / name):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
            except OSError as e:
                self.log(f"cannot remove {hosts / name}: {e.strerror or e}")
                continue
            del self.links[name]
        for name, target in want.items():
            if self.links.get(name) == target:
                continue
            tmp = hosts / f".{name}.tmp"
            try:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                os.symlink(target, tmp)
                os.replace(tmp, hosts / name)
                os.close(os.open(_known(hosts, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                 0o644))
            except OSError as e:
                self.log(f"cannot link {hosts / name}: {e.strerror or e}")
                continue
            self.links[name] = target

    def _due(self) -> float | None:
        """When the pending change of the routes is applied: at once (a
        batch) for a first configuration, an operator's include, or a route
        the host links cannot serve; else once the routes were still for
        `settle` seconds."""
        if self.dirty_since is None:
            return None
        at = self.dirty_since + self.opts.batch
        if self.embedded and self.installed is not None and self.routes is not None:
            hosts = self.ng_dir / HOSTS
            old = set(self.installed)
            if all((served_by_link(r, hosts) and not _rerouted(r, self.installed)) or not r.up
                   for r in self.routes if r not in old):
                at = max(at, min(self.changed_at + self.opts.settle,
                                 self.dirty_since + self.opts.settle_max))
        return max(at, self.last_apply + self.opts.min_gap, self.next_check)

    def owns(self, pid: int) -> bool:
        return pid in (self.pid, self.reload_pid) or (self.check is not None
                                                       and pid == self.check.pid)

    def pids(self) -> dict[int, tuple[str, int]]:
        """Our children, as the Emperor's orphan sweep counts live processes."""
        mine = [self.pid, self.reload_pid, self.check.pid if self.check else None]
        return {p: ("front", 0) for p in mine if p is not None}

    def exited(self, pid: int, status: int, now: float, describe: Callable[[int], str]) -> None:
        if pid == self.reload_pid:
            self.reload_pid = None
            if status != 0:
                self.log(f"--nginx-reload command failed ({describe(status)})")
            return
        if self.check is not None and pid == self.check.pid:
            self._checked(status == 0, now)
            return
        assert pid == self.pid
        self.pid = None
        try:  # its workers are in its session (its pid): none may keep the port
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        if self.stopping:
            self.log(f"nginx pid {pid} stopped ({describe(status)})")
            return
        if now - self.started_at >= self.opts.stable_after:
            self.failures = 0
        self.failures += 1
        delay = min(self.opts.backoff_max, self.opts.backoff_first * 2 ** (self.failures - 1))
        self.next_start = now + delay
        self.log(f"nginx pid {pid} died ({describe(status)}); restart in {delay:.1f} s")

    # -- state, for status and /healthz ---------------------------------------

    def state(self) -> dict:
        return {
            "pid": self.pid, "listen": self.opts.listen,
            "include": str(self.opts.include) if self.opts.include else None,
            "generation": self.generation, "serving_generation": self.serving,
            "reloads": self.reloads, "last_reload": self.last_reload,
            "last_error": self.last_error,
            "names": sum(len(r.domains) for r in self.installed or ()),
            "refused": {v: why for v, (_, why) in sorted(self.refused.items())},
        }

    def health(self) -> tuple[bool, str]:
        """Healthy while nginx serves the generation last installed."""
        if self.stopping:
            return True, "front door stopping"
        if self.last_error is not None:
            return False, f"front door: {self.last_error}"
        if self.embedded:
            if self.pid is None:
                return False, "front door: nginx is not running"
            if self.serving != self.generation:
                return False, (f"front door: nginx serves generation {self.serving}, "
                               f"not {self.generation}")
        return True, "front door ok"

    # -- the loop -----------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.opts.listen is not None

    def next_wakeup(self) -> float | None:
        times = []
        due = self._due()
        if due is not None and self.check is None:
            times.append(due)
        if self.embedded and self.pid is None and not self.stopping \
                and self.installed is not None:
            times.append(self.next_start)
        if self.reload_again and self.reload_pid is None:
            times.append(0.0)
        return min(times) if times else None

    def poll(self, now: float) -> None:
        if self.routes is None or self.stopping:
            return
        if self.embedded and self.pid is None and self.installed is not None \
                and now >= self.next_start:
            self._start(now)
        due = self._due()
        if self.check is None and due is not None and now >= due:
            self._propose(now)
        if self.reload_again and self.reload_pid is None:
            self._run_reload_cmd()

    def _wanted(self) -> tuple[Route, ...]:
        """The routes wanted, but those nginx refused (unless changed since)."""
        assert self.routes is not None
        out = []
        for r in self.routes:
            refused = self.refused.get(r.vassal)
            if refused is not None:
                if refused[0] == r:
                    continue
                del self.refused[r.vassal]  # changed: it gets another chance
            out.append(r)
        live = {r.vassal for r in self.routes}
        for gone in [v for v in self.refused if v not in live]:
            del self.refused[gone]
        return tuple(out)

    def _propose(self, now: float) -> None:
        """The routes changed: check the new configuration (nginx -t) before
        it replaces the running one."""
        self.dirty_since = None
        self.last_apply = now
        wanted = self._wanted()
        if wanted == self.installed:
            return
        self.bisect = None
        self._check(wanted)

    def _render(self, routes: tuple[Route, ...], generation: int) -> str:
        if self.embedded:
            assert self.opts.listen is not None
            return render_nginx_conf(routes, self.opts.listen, self.opts.run_dir,
                                     self.opts.keepalive, user=self._user(),
                                     access_log=self.opts.access_log, generation=generation)
        return render_routing(routes, self.opts.keepalive)

    def _check_text(self, routes: tuple[Route, ...]) -> str:
        """What nginx -t reads: the embedded configuration, or an operator's
        include inside a minimal nginx configuration."""
        if self.embedded:
            return self._render(routes, self.generation + 1)
        inc = self.ng_dir / "check-include.conf"
        inc.write_text(render_routing(routes, self.opts.keepalive))
        # every path nginx -t would touch is ours (Debian's are root's)
        temps = "".join(f"    {k}_temp_path {self.ng_dir / 'tmp' / k};\n"
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (f"pid {self.ng_dir / 'check.pid'};\nerror_log stderr;\nevents {{}}\nhttp {{\n"
                f"{temps}    include {inc};\n    server {{\n        listen 127.0.0.1:9;\n"
                + _indent(render_locations(self.opts.keepalive), 8) + "    }\n}\n")

    def _private_dirs(self) -> None:
        """nginx's directory in the run directory, which is private (0700;
        with an operator's include, 0711: its nginx reaches the sockets)."""
        from .status.rundir import make_private_dir, run_dir_mode
        gid = self.opts.worker_gid if self.embedded else None
        make_private_dir(self.ng_dir.parent, tighten=False, group=gid,
                         mode=run_dir_mode(self.opts.include, gid))
        (self.ng_dir / "tmp").mkdir(parents=True, exist_ok=True)

    def _check(self, routes: tuple[Route, ...]) -> None:
        nginx = self.opts.nginx or find_nginx()
        if nginx is None:
            if self.embedded:
                self._trouble("nginx not found (apt-get install nginx)")
                return
            self._install(routes)  # an operator's include, and no nginx here to check it
            return
        try:
            self._private_dirs()
            path = self.ng_dir / "candidate.conf"
            err = self.ng_dir / "candidate.err"
            path.write_text(self._check_text(routes))
            pid = os.posix_spawn(
                nginx, [nginx, "-t", "-q", "-e", "stderr", "-p", str(self.ng_dir),
                        "-c", str(path)], os.environ,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 2, str(err),
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)],
                setsigdef=(signal.SIGPIPE, signal.SIGTERM, signal.SIGHUP, signal.SIGINT),
                setsigmask=(), setsid=True)
        except OSError as e:
            self._trouble(f"cannot check the nginx configuration: {e.strerror or e}")
            return
        self.check = Check(pid, routes, path, err)

    def _trouble(self, why: str) -> None:
        """A failure that is no vassal's: logged once, retried later."""
        if why != self.last_error:
            self.log(f"error: {why}")
        self.last_error = why
        self.bisect = None
        self.dirty_since = self.dirty_since if self.dirty_since is not None else 0.0
        self.next_check = self.last_apply + self.opts.backoff_max

    def _checked(self, ok: bool, now: float) -> None:
        check, self.check = self.check, None
        assert check is not None
        try:
            why = nginx_message(check.err.read_text(errors="replace")) if not ok else ""
            check.err.unlink(missing_ok=True)
        except OSError as e:
            why = f"cannot read nginx -t's messages: {e.strerror or e}"
        if self.bisect is None:
            if ok:
                self._install(check.routes, check.path)
                return
            # which route broke it? Those that did not change since the last
            # installed configuration passed together; the others are tried
            keep = set(self.installed or ()) & set(check.routes)
            suspects = tuple(r for r in check.routes if r not in keep)
            self.log(f"nginx refuses the new configuration ({why}); finding the route")
            self.bisect = Bisect(tuple(sorted(keep)), [suspects] if suspects else [])
            self._check(self.bisect.accepted)  # alone first: is it a route's fault?
            return
        b = self.bisect
        if not b.base_checked:
            if not ok:
                self._trouble(f"nginx refuses even the last good routes: {why}")
                return
            b.base_checked = True
        elif ok:
            b.accepted = tuple(sorted({*b.accepted, *b.queue.pop(0)}))
        else:
            group = b.queue.pop(0)
            if len(group) == 1:
                r = group[0]
                self.refused[r.vassal] = (r, why)
                self.log(f"[{r.vassal}] refused by nginx: {why}")
                self.on_refused(r.vassal, why)
                if self.embedded:
                    self._sync_links()
            else:
                half = len(group) // 2
                b.queue[:0] = [group[:half], group[half:]]
        if b.queue:
            self._check(tuple(sorted({*b.accepted, *b.queue[0]})))
            return
        self.bisect = None
        if b.accepted != self.installed:
            self._check(b.accepted)  # checked as a whole, then installed

    def _install(self, routes: tuple[Route, ...], checked: Path | None = None) -> None:
        """A configuration nginx -t accepted replaces the running one."""
        self.last_error = None
        self.installed = routes
        self.generation += 1
        n = sum(len(r.domains) for r in routes)
        text = self._render(routes, self.generation)
        if self.embedded:
            try:
                if checked is not None and checked.read_text() == text:
                    os.replace(checked, self.conf_path)
                else:
                    write_if_changed(self.conf_path, text)
            except OSError as e:
                self.installed = None
                self._trouble(f"cannot write {self.conf_path}: {e.strerror or e}")
                return
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.SIGHUP)
                    self.reloads += 1
                    self.serving = self.generation
                    self.last_reload = time.time()
                    self.log(f"routing changed ({n} names, {len(routes)} vassals): "
                             f"nginx pid {self.pid} reloads generation {self.generation}")
                except OSError:
                    pass
        if self.opts.include is not None:
            try:
                changed = write_if_changed(self.opts.include, text if not self.embedded
                                           else render_routing(routes, self.opts.keepalive))
            except OSError as e:
                self._trouble(f"cannot write {self.opts.include}: {e.strerror or e}")
                return
            if changed:
                self.log(f"routing changed ({n} names): {self.opts.include} written")
                if self.opts.reload_cmd:
                    self.reload_again = True
                    if self.reload_pid is None:
                        self._run_reload_cmd()
                else:
                    self.serving = self.generation

    def _run_reload_cmd(self) -> None:
        self.reload_again = False
        try:
            self.reload_pid = os.posix_spawn(
                "/bin/sh", ["sh", "-c", self.opts.reload_cmd or "true"], os.environ,
                setsigdef=(signal.SIGPIPE,), setsigmask=(), setsid=True)
            self.serving = self.generation
            self.last_reload = time.time()
        except OSError as e:
            self.log(f"cannot run --nginx-reload: {e.strerror or e}")

    def _user(self) -> str | None:
        """nginx's workers' user: only a root master can change it."""
        return self.opts.user if os.geteuid() == 0 else None

    def _start(self, now: float) -> None:
        nginx = self.opts.nginx or find_nginx()
        try:
            self._private_dirs()
        except OSError as e:
            self.log(f"cannot create {self.ng_dir}: {e.strerror or e}")
            self._failed_start(now)
            return
        if nginx is None:
            self.log("nginx not found (apt-get install nginx)")
            self._failed_start(now)
            return
        out = None
        try:
            out = OutputPipe()
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            if out is not None:
                out.close()
            self.log(f"cannot start nginx: {e.strerror or e}")
            self._failed_start(now)
            return
        try:
            with self.spawning():
                self.pid = _spawn_nginx([nginx, "-e", "stderr", "-p", str(self.ng_dir),
                                         "-c", str(self.conf_path)], out.wfd, err_w)
        except OSError as e:
            out.close()
            os.close(err_r)
            self.log(f"cannot start nginx: {e.strerror or e}")
            self._failed_start(now)
            return
        finally:
            os.close(err_w)
        self.started_at = now
        self.serving = self.generation
        self.last_reload = time.time()
        self._close_pipes()  # a previous run's, if its workers are still dying
        os.set_blocking(err_r, False)
        self.err_r = err_r
        pid = self.pid
        if self.relay is not None and self.opts.access_log:
            self.relay(out, lambda: pid)
        else:
            out.close()
        self.watch(err_r, self.on_stderr)
        self.log(f"nginx pid {self.pid} serves {self.opts.listen} "
                 f"({sum(len(x.domains) for x in self.installed or ())} names, "
                 f"generation {self.generation})")

    def _failed_start(self, now: float) -> None:
        self.failures += 1
        self.next_start = now + min(self.opts.backoff_max,
                                    self.opts.backoff_first * 2 ** (self.failures - 1))

    def _close_pipes(self) -> None:
        if self.err_r is not None:
            self.unwatch(self.err_r)
            os.close(self.err_r)
        self.err_r = None

    def on_stderr(self, now: float) -> None:
        """nginx wrote to its stderr (its error log): each line logged as
        ours; an [emerg] of the running nginx (a reload it could not do)
        is the front door's error until the next configuration."""
        if self.err_r is None:
            return
        data = recv_ready(self.err_r)
        if data is None:
            return
        if not data:  # every nginx process of that run is gone
            self.unwatch(self.err_r)
            os.close(self.err_r)
            self.err_r = None
            if self.err_buf:
                self.log(self.err_buf.decode(errors="replace"))
                self.err_buf = b""
            return
        self.err_buf += data
        *lines, self.err_buf = self.err_buf.split(b"\n")
        for line in lines:
            if line.strip():
                text = line.decode(errors="replace").rstrip()
                # its own timestamp goes (ours leads the line); its worst
                # levels read as errors in ours
                text = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)
                if re.match(r"\[(emerg|alert|crit|error)\]", text):
                    text = "error: nginx: " + text
                self.log(text)
                if "[emerg]" in text and self.pid is not None:
                    self.serving = -1
                    self.last_error = nginx_message(text)

    def stop(self) -> None:
        """Shutdown: the vassals are gone; nginx goes now (fast stop)."""
        if self.stopping:
            return
        self.stopping = True
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass

    @property
    def stopped(self) -> bool:
        return self.pid is None

    def close(self) -> None:
        """Teardown: nothing of ours may outlive the Emperor."""
        for pid in (self.pid, self.reload_pid, self.check.pid if self.check else None):
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._close_pipes()
        hosts = self.ng_dir / HOSTS
        for name in list(self.links):
            for path in (_known(hosts, name), hosts / name):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self.links.clear()
