"""`emperor prove --serve SOCK` keeps a base for `prove --exec 'emperor
prove --connect SOCK'`: each client hands over one test file."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .. import adoption
from .scheduler import Prove
from .tap import Job
from .testfiles import build_spec, cold_reason, taint_switches


def serve(prove: Prove, control: Path) -> int:
    """Keep a base and run the test files that `emperor prove --connect`
    clients hand over on the UNIX socket `control` (mode 0600): each
    client sends its file name with its stdout/stderr sockets, whose
    stderr already holds the spec; the reply is the test's wait status."""
    prove.stop_on_signals()
    prove.setup()
    umask = os.umask(0o177)
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(control))
    finally:
        os.umask(umask)
    listener.listen(64)
    listener.setblocking(False)
    prove.sel.register(listener, selectors.EVENT_READ, "listen")
    waiting: dict[int, socket.socket] = {}  # test pid -> its client's connection
    try:
        prove.base.start(prove.env)
        prove.errout.write(f"emperor prove: serving on {control} (Ctrl-C to stop)\n")
        prove.errout.flush()
        while True:
            for key, _ in prove.sel.select(1.0):
                if key.data is None:
                    prove.drain_wake()
                elif key.data == "listen":
                    serve_client(prove, listener, waiting)
            prove.reap()
            answer_ended(prove, waiting)
            if prove.base.pid is None:
                prove.base.start(prove.env)  # it died: the next client gets a new one
    except KeyboardInterrupt:
        return 0
    finally:
        for conn in waiting.values():
            conn.close()
        prove.sel.unregister(listener)
        listener.close()
        try:
            os.unlink(control)
        except OSError:
            pass
        prove.teardown()


def answer_ended(prove: Prove, waiting: dict[int, socket.socket]) -> None:
    """Each ended test's wait status to its client."""
    for pid, job in list(prove.jobs.items()):
        if job.status is not None:
            conn = waiting.pop(pid, None)
            prove.forget(pid)
            if conn is not None:
                try:
                    conn.sendall(f"{job.status}\n".encode())
                except OSError:
                    pass
                conn.close()


def serve_client(prove: Prove, listener: socket.socket, waiting: dict[int, socket.socket]) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    fds: list[int] = []
    try:
        conn.settimeout(5)
        msg, fds, _, _ = socket.recv_fds(conn, 4096, 2)
        file = msg.decode()
        if len(fds) != 2 or not file:
            raise ValueError(f"bad request ({len(fds)} descriptors)")
        job = Job(file, None, [], pid=prove.adopt(file, fds[0], fds[1]))
    except (OSError, ValueError, UnicodeDecodeError, adoption.AdoptionError) as e:
        prove.errout.write(f"emperor prove: refused a client: {e}\n")
        prove.errout.flush()
        conn.close()
        return
    finally:
        for fd in fds:
            os.close(fd)
    job.streams_elsewhere()  # the client reads them
    prove.track(job)
    waiting[job.pid] = conn


# -- the client -----------------------------------------------------------------------


def connect(control: Path, file: str, args: list[str], perl: str = "perl") -> int:
    """`prove --exec 'emperor prove --connect SOCK'`: run one test file
    through a base kept by `emperor prove --serve SOCK`, with this process's
    environment, working directory and arguments; its output on our stdout
    and stderr, its exit status ours. Runs it cold (`perl FILE`) when the
    file asks for that or when nothing serves on SOCK."""
    reason, switches = cold_reason(file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWSGI_EMPEROR_")}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if reason is None:
            conn.connect(str(control))
    except OSError as e:
        print(f"emperor prove: {control}: {e.strerror}: running {file} cold", file=sys.stderr)
        reason = "no base"
    if reason is not None:
        conn.close()
        taint = taint_switches(switches)
        libs = [f"-I{d}" for d in env.get("PERL5LIB", "").split(os.pathsep) if d] if taint else []
        os.execvpe(perl, [perl, *taint, *libs, file, *args], env)
    inc = subprocess.run([perl, "-e", 'print join "\\0", @INC'], env=env,
                         capture_output=True, check=True).stdout.decode().split("\0")
    _hand_over(conn, file, build_spec(file, switches, os.getcwd(), env, inc, args))
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            print(f"emperor prove: {control}: no status for {file}", file=sys.stderr)
            return 255
        reply += chunk
    status = int(reply)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))  # prove sees the same wait status
    return os.WEXITSTATUS(status)


def _hand_over(conn: socket.socket, file: str, spec: bytes) -> None:
    """Send `file` with a stdout and a stderr socket (the stderr one holding
    `spec`), and copy what comes out of them to ours until both close."""
    out_ours, out_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    err_ours.sendall(spec)
    socket.send_fds(conn, [file.encode()], [out_theirs.fileno(), err_theirs.fileno()])
    out_theirs.close()
    err_theirs.close()
    out_ours.shutdown(socket.SHUT_WR)
    err_ours.shutdown(socket.SHUT_WR)
    sel = selectors.DefaultSelector()
    sel.register(out_ours, selectors.EVENT_READ, 1)
    sel.register(err_ours, selectors.EVENT_READ, 2)
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            data = key.fileobj.recv(65536)
            if data:
                os.write(key.data, data)
            else:
                sel.unregister(key.fileobj)
                open_streams -= 1
    sel.close()
