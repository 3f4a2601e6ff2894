"""Where an Emperor's stats socket is, and the clients' side of it.

`emperor run` opens its stats socket at `--stats PATH`, else at
RUNDIR/HASH/stats (`default_stats_path`); the client commands find it
(`find_stats`) and read a document (`fetch`) or send a command
(`fetch_command`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

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


def make_private_dir(path: Path, tighten: bool = True, mode: int = 0o700,
                     group: int | None = None) -> None:
    """`mkdir -p path`, the last one mode 0700: a vassal's socket, the stats
    socket and nginx's files are the Emperor's, and no other user lists or
    reaches them (the directories above, shared by every Emperor here, keep
    the usual mode). An operator's own nginx (`--nginx-include`) runs its
    workers as another user: `mode` 0711 then lets them reach a socket given
    to them (`chown-socket`), still without listing the directory. The
    embedded nginx's workers (`--http` under a root Emperor) are in `group`:
    mode 0710 lets that group alone reach the sockets given to it.
    `tighten`: one that exists, and is ours, is given `mode` (an earlier
    run's, or another version's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = os.stat(path)
        if tighten and st.st_uid == os.geteuid() and st.st_mode & 0o777 != mode:
            os.chmod(path, mode)
        if group is not None and st.st_uid == os.geteuid() and st.st_gid != group:
            os.chown(path, -1, group)  # nginx's workers reach what they were given
    else:
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)  # the umask could only take bits away; be exact


def run_dir_mode(nginx_include: object, worker_gid: int | None = None) -> int:
    """The run directory's mode: 0700; 0710 with the embedded nginx's
    workers' group (`worker_gid`); 0711 for an operator's nginx."""
    if nginx_include:
        return 0o711
    return 0o700 if worker_gid is None else 0o710


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



def fetch(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The client side: read the stats socket's document."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.shutdown(socket.SHUT_WR)  # no command: the document at once
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


def fetch_logs(path: Path, name: str, since: int | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """A vassal's recent lines (`lines`), those after the `since`-th line
    the Emperor kept for it when given; `next` is the `since` of the next ask."""
    return fetch_command(path, "logs", name, timeout, extra={"since": since})


def fetch_command(path: Path, command: str, name: str | None = None,
                  timeout: float = 10.0, tries: int = 5,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send one command on the stats socket; its reply. The Emperor takes a
    line that arrives after it sent the document as too late: then ask again."""
    line = (json.dumps({"command": command, "name": name, **(extra or {})}) + "\n").encode()
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
