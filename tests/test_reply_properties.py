"""Properties of the Emperor's reading of fork-server replies (PROTOCOL.md
section 3): whatever a fork server (or anything listening on its socket)
sends, the Emperor gets a plausible pid or the documented exception —
ProtocolError from the parser, AdoptionError from the adoption — and never
anything else (an exception of another type would end the Emperor's loop).
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from psgi_forkserver import protocol as p
from psgi_forkserver.adoption import AdoptionError, PendingAdoption

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

pids = st.integers(min_value=1, max_value=p.PID_MAX)
keys = st.binary(max_size=20).filter(lambda k: k != b"pid")
extra = st.dictionaries(keys, st.binary(max_size=40), max_size=5)


def reply(pairs: dict) -> bytes:
    return p.encode_packet(p.MODIFIER1_FORK_SERVER, p.encode_dict(pairs))


def parse_bytes(data: bytes) -> int:
    return p.parse_pid_reply(p.decode_packet(data))


# -- the parser ------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))
def test_any_packet_gives_a_pid_or_protocol_error(m1, m2, body):
    try:
        pid = p.parse_pid_reply(p.Packet(m1, m2, body))
    except p.ProtocolError:
        return
    assert type(pid) is int and 0 < pid <= p.PID_MAX


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_give_a_pid_or_protocol_error(data):
    try:
        pid = parse_bytes(data)
    except p.ProtocolError:
        return
    assert 0 < pid <= p.PID_MAX


@SETTINGS
@given(pids, extra, st.booleans())
def test_a_valid_reply_with_extra_keys_gives_its_pid(pid, more, pid_first):
    pairs = {b"pid": str(pid).encode(), **more} if pid_first else {**more, b"pid": str(pid).encode()}
    assert parse_bytes(reply(pairs)) == pid


@SETTINGS
@given(st.one_of(
    st.integers(max_value=0),                            # negative, zero
    st.integers(min_value=p.PID_MAX + 1),                # beyond any Linux pid
    st.integers(min_value=p.PID_MAX + 1, max_value=10**30),
).map(str) | st.text(alphabet="0123456789", min_size=8, max_size=6000)
    | st.sampled_from(["", " ", "+5", "-0", "0x10", "1e3", "12abc", "½", "٣", "１２", "1 2", "nan"]))
@example("1" * 5000)  # int() of it raises a plain ValueError: must be caught first
@example(str(2**63))
@example(str(p.PID_MAX + 1))
def test_bad_pids_are_protocol_errors(raw):
    try:
        pid = parse_bytes(reply({"pid": raw}))
    except p.ProtocolError:
        return
    # only a string that really is a plausible pid may pass (e.g. "00000042")
    assert raw.strip().isascii() and 0 < int(raw) <= p.PID_MAX, (raw, pid)


@SETTINGS
@given(pids, extra, st.data())
def test_every_truncation_of_a_valid_reply_is_an_error(pid, more, data):
    whole = reply({**more, b"pid": str(pid).encode()})
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(p.ProtocolError):
        parse_bytes(whole[:cut])


def test_pid_limits():
    assert parse_bytes(reply({"pid": "1"})) == 1
    assert parse_bytes(reply({"pid": str(p.PID_MAX)})) == p.PID_MAX
    assert parse_bytes(reply({"pid": " 42\n"})) == 42
    for bad in ("0", "-1", str(p.PID_MAX + 1), str(2**31), str(2**64), "9" * 100_00):
        with pytest.raises(p.ProtocolError):
            parse_bytes(reply({"pid": bad[:60000]}))


# -- the adoption as the Emperor runs it: bytes arriving on a socket -----------------


def feed(chunks: list[bytes], close: bool) -> int | None:
    """Drive a PendingAdoption as the Emperor does: each chunk arrives, the
    socket is readable, on_readable() runs. Returns the pid, or None when
    no verdict came (more bytes could still come)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    pending = PendingAdoption(sock=ours, deadline=float("inf"))
    try:
        for chunk in chunks:
            theirs.sendall(chunk)
            pid = pending.on_readable()
            if pid is not None:
                return pid
        if close:
            theirs.close()
            return pending.on_readable()
        return pending.on_readable()
    finally:
        pending.close()
        theirs.close()


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


@SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6), st.booleans())
@example(b"", [], True)                                      # closed at once
@example(b"\x23\x00", [], True)                               # half a header
@example(struct.pack("<BHB", 35, 0xFFFF, 0) + b"x" * 10, [], True)  # promises more
@example(reply({"pid": "1" * 5000})[:65539], [], True)
def test_any_bytes_on_the_socket_give_a_pid_or_adoption_error(data, cuts, close):
    try:
        pid = feed(chunked(data, cuts), close)
    except AdoptionError:
        return
    if pid is not None:
        assert 0 < pid <= p.PID_MAX
        assert parse_bytes(data[: p.HEADER_SIZE + struct.unpack_from("<H", data, 1)[0]]) == pid
    else:
        assert not close, "end of file without a pid must be an AdoptionError"


@SETTINGS
@given(pids, extra, st.lists(st.integers(0, 200), max_size=6))
def test_a_valid_reply_in_any_pieces_gives_its_pid(pid, more, cuts):
    data = reply({**more, b"pid": str(pid).encode()})
    assert feed(chunked(data, cuts), close=True) == pid


@SETTINGS
@given(pids, extra, st.data())
def test_a_truncated_reply_then_eof_is_an_adoption_error(pid, more, data):
    whole = reply({**more, b"pid": str(pid).encode()})
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(AdoptionError):
        feed([whole[:cut]] if cut else [], close=True)


@SETTINGS
@given(pids, st.binary(min_size=1, max_size=50))
def test_bytes_after_the_reply_in_one_read_are_an_adoption_error(pid, junk):
    with pytest.raises(AdoptionError):
        feed([reply({"pid": str(pid)}) + junk], close=True)
