"""The fork-server client against a stand-in fork server written here.

The stand-in is a real UNIX socket in a thread: it receives the sendmsg,
checks the bytes and descriptors and replies. The real Perl fork server is
exercised by test_emperor.py.
"""

import array
import os
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from psgi_forkserver import adoption, protocol
from psgi_forkserver.adoption import AdoptionError


class StandIn:
    """Accepts one connection, records what came, replies with `reply`."""

    def __init__(self, path: Path, reply=None, hold: float = 0.0):
        self.path = str(path)
        self.reply = reply
        self.hold = hold
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.got: dict = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            fds = array.array("i")
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, typ, cdata in anc:
                assert (level, typ) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            while len(data) >= 4 and len(data) < 4 + protocol.decode_header(data[:4])[1]:
                more = conn.recv(65536)
                if not more:
                    break
                data += more
            self.got = {"data": data, "fds": list(fds)}
            if self.hold:
                time.sleep(self.hold)  # a slow fork server, for the timeout test
            if self.reply is not None:
                conn.sendall(self.reply)
        self.done.set()

    def close(self):
        self.done.wait(10)
        self.sock.close()
        for fd in self.got.get("fds", []):
            os.close(fd)
        os.unlink(self.path)


@pytest.fixture
def sockpath(tmp_path):
    return tmp_path / "fs.sock"


def pid_reply(pid: str) -> bytes:
    return protocol.encode_packet(35, protocol.encode_dict({"pid": pid}), 0)


def test_adopt_sends_argv_mask_and_descriptors(sockpath):
    srv = StandIn(sockpath, pid_reply("4321"))
    ours, theirs = socket.socketpair()
    cfg_r, cfg_w = os.pipe()
    od = socket.socket()
    try:
        pid = adoption.adopt(sockpath, ["/bin/prog", "--ini", "/v/a.ini"], theirs.fileno(),
                               config_fd=cfg_r, on_demand_fd=od.fileno(), timeout=5)
        assert pid == 4321
        srv.done.wait(5)
        pkt = protocol.decode_packet(srv.got["data"])
        assert (pkt.modifier1, pkt.modifier2) == (35, 0x07)
        assert protocol.decode_array(pkt.body) == [b"/bin/prog", b"--ini", b"/v/a.ini"]
        pipe_fd, config_fd, od_fd = srv.got["fds"]
        # the first descriptor is the other end of our Emperor pipe
        os.write(pipe_fd, b"\x11")
        assert ours.recv(1) == b"\x11"
        os.write(cfg_w, b"x")
        assert os.read(config_fd, 1) == b"x"
        assert socket.socket(fileno=os.dup(od_fd)).family == socket.AF_INET
    finally:
        for s in (ours, theirs, od):
            s.close()
        os.close(cfg_r), os.close(cfg_w)
        srv.close()


@pytest.mark.parametrize("extra, born", [({"cgroup": "1"}, True), ({}, False)])
def test_a_cgroup_directory_goes_last_and_the_reply_says_if_the_vassal_was_born_there(
        sockpath, tmp_path, extra, born):
    srv = StandIn(sockpath, protocol.encode_packet(35, protocol.encode_dict({"pid": "77", **extra}), 0))
    ours, theirs = socket.socketpair()
    cg = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pending = adoption.start_adoption(sockpath, ["/bin/prog"], theirs.fileno(), cgroup_fd=cg)
        srv.done.wait(5)
        with selectors.DefaultSelector() as sel:
            sel.register(pending.sock, selectors.EVENT_READ)
            while (pid := pending.on_readable()) is None:
                assert sel.select(5), "no reply"
        pending.close()
        assert (pid, pending.born_in_cgroup) == (77, born)
        assert protocol.decode_packet(srv.got["data"]).modifier2 == 0x09
        pipe_fd, dir_fd = srv.got["fds"]
        assert os.stat(dir_fd)[:2] == os.stat(tmp_path)[:2]  # the directory itself (inode, device)
    finally:
        ours.close(), theirs.close(), os.close(cg)
        srv.close()


def test_adopt_pipe_only_mask(sockpath):
    srv = StandIn(sockpath, pid_reply("7"))
    a, b = socket.socketpair()
    try:
        assert adoption.adopt(sockpath, ["p"], b.fileno(), timeout=5) == 7
        srv.done.wait(5)
        assert protocol.decode_packet(srv.got["data"]).modifier2 == 0x01
        assert len(srv.got["fds"]) == 1
    finally:
        a.close(), b.close()
        srv.close()


@pytest.mark.parametrize("reply", [
    b"",  # EOF without a reply
    pid_reply("-3"),
    pid_reply("zz"),
    protocol.encode_packet(35, protocol.encode_dict({"nopid": "1"})),
    pid_reply("123")[:-1],  # truncated
    protocol.encode_packet(35, b"\x05\x00pi", 0),  # length past the end
])
def test_bad_replies_fail(sockpath, reply):
    srv = StandIn(sockpath, reply)
    a, b = socket.socketpair()
    try:
        with pytest.raises(AdoptionError):
            adoption.adopt(sockpath, ["p"], b.fileno(), timeout=5)
    finally:
        a.close(), b.close()
        srv.close()


def test_timeout_fails(sockpath):
    srv = StandIn(sockpath, reply=None, hold=0.5)
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(AdoptionError, match="no reply"):
            adoption.adopt(sockpath, ["p"], b.fileno(), timeout=0.2)
        assert time.monotonic() - t0 < 0.45
    finally:
        a.close(), b.close()
        srv.close()


def test_no_server(sockpath):
    a, b = socket.socketpair()
    try:
        with pytest.raises(AdoptionError):
            adoption.start_adoption(sockpath, ["p"], b.fileno())
    finally:
        a.close(), b.close()


def test_start_adoption_does_not_block(sockpath):
    srv = StandIn(sockpath, reply=None, hold=0.3)
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        pending = adoption.start_adoption(sockpath, ["p"], b.fileno(), timeout=5)
        assert time.monotonic() - t0 < 0.1
        assert pending.on_readable() is None  # nothing there yet
        pending.close()
    finally:
        a.close(), b.close()
        srv.close()


def test_probe(sockpath):
    assert not adoption.probe(sockpath)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sockpath))
    assert not adoption.probe(sockpath)  # bound, not listening
    s.listen(1)
    assert adoption.probe(sockpath)
    s.close()
    assert not adoption.probe(sockpath)  # stale file
    os.unlink(sockpath)
