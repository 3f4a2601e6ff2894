import json
import struct

import pytest
from hypothesis import given, strategies as st

from psgi_forkserver import paths, protocol as p
from psgi_forkserver.protocol import ProtocolError

items = st.lists(st.binary(max_size=300), max_size=40)
dicts = st.dictionaries(st.binary(max_size=100), st.binary(max_size=200), max_size=30)


@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=2000))
def test_packet_round_trip(m1, m2, body):
    data = p.encode_packet(m1, body, m2)
    assert len(data) == 4 + len(body)
    assert data[:4] == bytes([m1]) + struct.pack("<H", len(body)) + bytes([m2])
    assert p.decode_packet(data) == p.Packet(m1, m2, body)


@given(items)
def test_array_round_trip(xs):
    assert p.decode_array(p.encode_array(xs)) == xs


@given(dicts)
def test_dict_round_trip(d):
    assert p.decode_dict(p.encode_dict(d)) == d


@given(items.filter(lambda xs: any(xs)), st.data())
def test_truncated_array_is_rejected(xs, data):
    body = p.encode_array(xs)
    cut = data.draw(st.integers(1, len(body)))
    truncated = body[: len(body) - cut]
    # a cut exactly on an item boundary is a valid shorter array; anything
    # else must raise, never yield a short item
    try:
        got = p.decode_array(truncated)
    except ProtocolError:
        return
    assert got == xs[: len(got)] and p.encode_array(got) == truncated


@given(st.binary(max_size=200), st.integers(1, 0xFF00))
def test_length_past_end_is_an_error(item, extra):
    body = struct.pack("<H", min(len(item) + extra, 0xFFFF)) + item
    with pytest.raises(ProtocolError):
        p.decode_array(body)


@given(st.integers(0, 255), st.integers(0, 255), st.binary(min_size=1, max_size=500), st.data())
def test_truncated_packet_is_rejected(m1, m2, body, data):
    packet = p.encode_packet(m1, body, m2)
    cut = data.draw(st.integers(1, len(packet)))
    with pytest.raises(ProtocolError):
        p.decode_packet(packet[:-cut])


@given(st.binary(max_size=100), st.binary(min_size=1, max_size=10))
def test_overlong_packet_is_rejected(body, junk):
    with pytest.raises(ProtocolError):
        p.decode_packet(p.encode_packet(35, body) + junk)


def test_odd_dict_is_rejected():
    with pytest.raises(ProtocolError):
        p.decode_dict(p.encode_array([b"pid"]))


def test_single_dangling_length_byte():
    with pytest.raises(ProtocolError):
        p.decode_array(b"\x01")


def test_body_limits():
    p.encode_packet(0, b"x" * 0xFFFF)
    with pytest.raises(ProtocolError):
        p.encode_packet(0, b"x" * 0x10000)
    with pytest.raises(ProtocolError):
        p.encode_array([b"x" * 0x10000])


@given(st.lists(st.text(max_size=50), min_size=1, max_size=10), st.sampled_from([1, 3, 5, 7]))
def test_adoption_request_bytes(argv, mask):
    data = p.adoption_request(argv, mask)
    pkt = p.decode_packet(data)
    assert (pkt.modifier1, pkt.modifier2) == (35, mask)
    assert p.decode_array(pkt.body) == [a.encode() for a in argv]


@pytest.mark.parametrize("mask", [0, 2, 8, 0x11])
def test_adoption_request_needs_pipe_bit(mask):
    with pytest.raises(ProtocolError):
        p.adoption_request(["x"], mask)


@given(st.integers(1, 2**22))
def test_pid_reply(pid):
    pkt = p.decode_packet(p.encode_packet(35, p.encode_dict({"pid": str(pid)})))
    assert p.parse_pid_reply(pkt) == pid


@pytest.mark.parametrize("pairs", [{}, {"pid": ""}, {"pid": "-5"}, {"pid": "0"},
                                   {"pid": "12x"}, {"pid": "abc"}, {"pod": "12"}])
def test_bad_pid_reply(pairs):
    with pytest.raises(ProtocolError):
        p.parse_pid_reply(p.Packet(35, 0, p.encode_dict(pairs)))


def test_reply_wrong_modifier():
    with pytest.raises(ProtocolError):
        p.parse_pid_reply(p.Packet(0, 0, p.encode_dict({"pid": "12"})))


@given(st.binary(max_size=300), st.data())
def test_incremental_reader(body, data):
    packet = p.encode_packet(35, body, 0)
    r = p.PacketReader()
    pos = 0
    got = None
    while pos < len(packet):
        n = data.draw(st.integers(1, len(packet) - pos))
        got = r.feed(packet[pos : pos + n])
        pos += n
        if pos < len(packet):
            assert got is None
    assert got == p.Packet(35, 0, body)


def test_pipe_bytes():
    assert p.VassalByte.LOYAL == 17 and p.VassalByte.HEARTBEAT == 26
    assert p.EmperorByte.STOP == 2 and p.EmperorByte.STOP_NOW == 0


def test_the_vocabulary_is_protocol_json():
    """Every name and byte of perl/ForkServer/protocol.json, and no other,
    is defined here with that value (t/protocol.t holds the Perl side to
    the same file)."""
    decl = json.loads((paths.perl_dir() / "ForkServer" / "protocol.json").read_text())
    assert sorted(k for k in decl if k != "about") == [
        "emperor_bytes", "mask", "modifier1", "packet", "vassal_bytes"]
    assert {b.name: b.value for b in p.EmperorByte} == decl["emperor_bytes"]
    assert {b.name: b.value for b in p.VassalByte} == decl["vassal_bytes"]
    for group, prefix in (("mask", "MASK_"), ("modifier1", "MODIFIER1_")):
        ours = {k: v for k, v in vars(p).items() if k.startswith(prefix)}
        assert ours == decl[group], group
    assert {k: getattr(p, k) for k in decl["packet"]} == decl["packet"]


def test_protocol_md_names_every_value():
    """docs/PROTOCOL.md's tables give each byte its one name: every name
    of protocol.json appears there, in a table row with its value."""
    decl = json.loads((paths.perl_dir() / "ForkServer" / "protocol.json").read_text())
    doc = (paths.perl_dir().parent / "docs" / "PROTOCOL.md").read_text()
    rows = [line.strip() for line in doc.splitlines() if line.strip().startswith("|")]
    for group in ("mask", "vassal_bytes", "emperor_bytes"):
        for name, value in decl[group].items():
            assert any(f"`{name}`" in r and (f"| {value} |" in r or f"| {value:#04x} |" in r)
                       for r in rows), name
    for name in [*decl["modifier1"], *decl["packet"]]:
        assert f"`{name}`" in doc, name
