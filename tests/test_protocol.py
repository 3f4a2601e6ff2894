import functools
import json
import operator
import os
import shutil
import struct
import subprocess
import sys

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


def declaration() -> dict:
    return json.loads((paths.perl_dir() / "ForkServer" / "protocol.json").read_text())


def test_protocol_json_is_complete_and_well_formed():
    """The one declaration of the vocabulary: its groups, each value an
    integer in range, no byte with two names in one direction, each mask
    bit its own."""
    decl = declaration()
    assert sorted(k for k in decl if k != "about") == [
        "emperor_bytes", "mask", "modifier1", "packet", "vassal_bytes"]
    assert decl["packet"] == {"HEADER_SIZE": struct.calcsize("<BHB"), "MAX_BODY": 0xFFFF}  # a 16-bit size
    for group in ("modifier1", "mask", "vassal_bytes", "emperor_bytes"):
        values = list(decl[group].values())
        assert values and all(type(v) is int and 0 <= v <= 255 for v in values), group
        assert len(set(values)) == len(values), f"{group}: one byte, two names"
    masks = list(decl["mask"].values())
    assert all(m and m & (m - 1) == 0 for m in masks) and sum(masks) == functools.reduce(operator.or_, masks)


def test_the_module_defines_every_name_of_protocol_json():
    """Every name and byte of the file, and no other, is defined here with
    that value (t/protocol.t holds the Perl side to the same file)."""
    decl = declaration()
    assert {b.name: b.value for b in p.EmperorByte} == decl["emperor_bytes"]
    assert {b.name: b.value for b in p.VassalByte} == decl["vassal_bytes"]
    for group, prefix in (("mask", "MASK_"), ("modifier1", "MODIFIER1_")):
        ours = {k: v for k, v in vars(p).items() if k.startswith(prefix)}
        assert ours == decl[group], group
    assert {k: getattr(p, k) for k in decl["packet"]} == decl["packet"]


def test_the_bytes_on_the_wire_are_uwsgis():
    """What uWSGI 2.1's fork server reads and writes, byte for byte: an
    adoption request (modifier1 35, the argv array, modifier2 the
    descriptor mask), its reply, and the Emperor pipe's bytes."""
    assert p.adoption_request([b"psgi-vassal", b"-s"], p.MASK_PIPE | p.MASK_CONFIG) == (
        b"\x23\x11\x00\x03" b"\x0b\x00psgi-vassal" b"\x02\x00-s")
    reply = p.decode_packet(b"\x23\x0a\x00\x00" b"\x03\x00pid" b"\x03\x00123")
    assert p.parse_pid_reply(reply) == 123
    assert p.encode_packet(p.MODIFIER1_CONFIG, b"[uwsgi]\n") == b"\x73\x08\x00\x00[uwsgi]\n"
    assert [int(b) for b in p.VassalByte] == [1, 2, 5, 17, 22, 26]
    assert [int(b) for b in p.EmperorByte] == [0, 1, 2]


def test_the_values_are_read_from_the_file_at_load(tmp_path):
    """One copy: a changed protocol.json changes what both sides load, and
    a broken one stops the load with the file and the reason."""
    shutil.copytree(paths.perl_dir().parent / "psgi_forkserver", tmp_path / "psgi_forkserver",
                    ignore=shutil.ignore_patterns("__pycache__", "perl"))
    shutil.copytree(paths.perl_dir(), tmp_path / "perl")
    decl_file = tmp_path / "perl" / "ForkServer" / "protocol.json"
    decl = declaration()
    decl["vassal_bytes"]["HEARTBEAT"] = 27
    decl_file.write_text(json.dumps(decl))
    python = [sys.executable, "-S", "-c",
              "from psgi_forkserver import protocol as p; print(p.__file__, int(p.VassalByte.HEARTBEAT))"]
    perl = ["perl", f"-I{tmp_path / 'perl'}", "-MForkServer::Protocol=HEARTBEAT", "-e", "print HEARTBEAT, qq{\n}"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)}
    got = subprocess.run(python, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert got.stdout.split() == [str(tmp_path / "psgi_forkserver" / "protocol.py"), "27"], got.stderr
    got = subprocess.run(perl, capture_output=True, text=True, env=env, timeout=60)
    assert got.stdout == "27\n", got.stderr
    decl["vassal_bytes"]["HEARTBEAT"] = "twenty-six"
    decl_file.write_text(json.dumps(decl))
    for argv in (python, perl):
        got = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert got.returncode != 0
        assert f"{decl_file}: vassal_bytes.HEARTBEAT: not a non-negative integer" in got.stderr, got.stderr


def test_protocol_md_names_every_value():
    """docs/PROTOCOL.md's tables give each byte its one name: every name
    of protocol.json appears there, in a table row with its value."""
    decl = declaration()
    doc = (paths.perl_dir().parent / "docs" / "PROTOCOL.md").read_text()
    rows = [line.strip() for line in doc.splitlines() if line.strip().startswith("|")]
    for group in ("mask", "vassal_bytes", "emperor_bytes"):
        for name, value in decl[group].items():
            assert any(f"`{name}`" in r and (f"| {value} |" in r or f"| {value:#04x} |" in r)
                       for r in rows), name
    for name in [*decl["modifier1"], *decl["packet"]]:
        assert f"`{name}`" in doc, name
