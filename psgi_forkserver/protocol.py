"""The uwsgi packet and its array/dict bodies, and the Emperor pipe bytes.

See docs/PROTOCOL.md. The names and values are the protocol's vocabulary,
declared once for both sides in perl/ForkServer/protocol.json and read
from it when this module loads (perl/ForkServer/Protocol.pm reads the same
file). All integers are little-endian. Every decoder is strict: a length
that runs past the end of its input, or trailing bytes that do not form a
whole item, raise ProtocolError.
"""

from __future__ import annotations

import json
import struct
from collections import namedtuple
from collections.abc import Iterable, Mapping
from enum import IntEnum
from pathlib import Path

from psgi_forkserver import paths


def protocol_file() -> Path:
    return paths.perl_dir() / "ForkServer" / "protocol.json"


def _declaration() -> dict[str, dict[str, int]]:
    """protocol.json's groups (name -> value), each value checked."""
    decl = json.loads(protocol_file().read_text())
    groups = {g: names for g, names in decl.items() if isinstance(names, dict)}
    for g, names in groups.items():
        for name, value in names.items():
            if type(value) is not int or value < 0:
                raise ValueError(f"{protocol_file()}: {g}.{name}: not a non-negative integer: {value!r}")
    return groups


VOCABULARY = _declaration()

HEADER = struct.Struct("<BHB")
HEADER_SIZE = VOCABULARY["packet"]["HEADER_SIZE"]
MAX_BODY = VOCABULARY["packet"]["MAX_BODY"]
if HEADER_SIZE != HEADER.size:
    raise ValueError(f"{protocol_file()}: HEADER_SIZE {HEADER_SIZE}, but the header's layout is {HEADER.size} bytes")

MODIFIER1_FORK_SERVER = VOCABULARY["modifier1"]["MODIFIER1_FORK_SERVER"]
MODIFIER1_CONFIG = VOCABULARY["modifier1"]["MODIFIER1_CONFIG"]

# Descriptor mask bits of an adoption request (modifier2).
MASK_PIPE = VOCABULARY["mask"]["MASK_PIPE"]
MASK_CONFIG = VOCABULARY["mask"]["MASK_CONFIG"]
MASK_ON_DEMAND = VOCABULARY["mask"]["MASK_ON_DEMAND"]
MASK_CGROUP = VOCABULARY["mask"]["MASK_CGROUP"]
_MASK_ALL = MASK_PIPE | MASK_CONFIG | MASK_ON_DEMAND | MASK_CGROUP

#: Linux's PID_MAX_LIMIT (2**22): no process id is larger. A reply claiming
#: more is garbage (and would make os.kill() raise OverflowError).
PID_MAX = 4194304


class ProtocolError(ValueError):
    """Malformed uwsgi packet, array or dict."""


#: Bytes a vassal writes on its Emperor pipe (SPAWNED, CONFIG_AGAIN,
#: ACCEPTING, LOYAL, DONE, HEARTBEAT).
VassalByte = IntEnum("VassalByte", VOCABULARY["vassal_bytes"], module=__name__)

#: Bytes the Emperor writes on a vassal's pipe (STOP_NOW, RELOAD, and STOP:
#: gracefully, finishing the requests in flight).
EmperorByte = IntEnum("EmperorByte", VOCABULARY["emperor_bytes"], module=__name__)


class Packet(namedtuple("Packet", "modifier1 modifier2 body")):
    """A decoded packet. (A named tuple, not a dataclass: dataclasses
    imports inspect, ~15 ms of CPU of every `emperor prove` start.)"""

    __slots__ = ()
    modifier1: int
    modifier2: int
    body: bytes

    def encode(self) -> bytes:
        return encode_packet(self.modifier1, self.body, self.modifier2)


def _as_bytes(item: bytes | str) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)


def encode_packet(modifier1: int, body: bytes, modifier2: int = 0) -> bytes:
    if not 0 <= modifier1 <= 0xFF or not 0 <= modifier2 <= 0xFF:
        raise ProtocolError("modifier out of range")
    if len(body) > MAX_BODY:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(modifier1, len(body), modifier2) + body


def decode_header(data: bytes) -> tuple[int, int, int]:
    """Return (modifier1, size, modifier2) of a 4-byte header."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header needs {HEADER_SIZE} bytes, got {len(data)}")
    return HEADER.unpack(data)


def decode_packet(data: bytes) -> Packet:
    """Decode exactly one packet; nothing may follow it."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError("truncated header")
    m1, size, m2 = decode_header(data[:HEADER_SIZE])
    body = data[HEADER_SIZE:]
    if len(body) < size:
        raise ProtocolError(f"truncated body: {len(body)} of {size} bytes")
    if len(body) > size:
        raise ProtocolError(f"{len(body) - size} bytes after the packet")
    return Packet(m1, m2, bytes(body))


class PacketReader:
    """Incremental reader: feed() bytes, get the packet once it is whole."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Packet | None:
        self._buf += data
        if len(self._buf) < HEADER_SIZE:
            return None
        _, size, _ = decode_header(bytes(self._buf[:HEADER_SIZE]))
        if len(self._buf) < HEADER_SIZE + size:
            return None
        if len(self._buf) > HEADER_SIZE + size:
            raise ProtocolError("bytes after the packet")
        return decode_packet(bytes(self._buf))

    @property
    def pending(self) -> int:
        return len(self._buf)


def _encode_item(item: bytes) -> bytes:
    if len(item) > 0xFFFF:
        raise ProtocolError(f"item of {len(item)} bytes exceeds 65535")
    return struct.pack("<H", len(item)) + item


def encode_array(items: Iterable[bytes | str]) -> bytes:
    body = b"".join(_encode_item(_as_bytes(i)) for i in items)
    if len(body) > MAX_BODY:
        raise ProtocolError(f"array body of {len(body)} bytes exceeds {MAX_BODY}")
    return body


def _read_items(body: bytes) -> list[bytes]:
    items: list[bytes] = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 2:
            raise ProtocolError(f"truncated length at offset {pos}")
        (n,) = struct.unpack_from("<H", body, pos)
        pos += 2
        if pos + n > end:
            raise ProtocolError(f"item of {n} bytes at offset {pos} runs past the end")
        items.append(bytes(body[pos : pos + n]))
        pos += n
    return items


def decode_array(body: bytes) -> list[bytes]:
    return _read_items(body)


def encode_dict(pairs: Mapping[bytes | str, bytes | str]) -> bytes:
    flat: list[bytes] = []
    for k, v in pairs.items():
        flat += [_as_bytes(k), _as_bytes(v)]
    body = b"".join(_encode_item(i) for i in flat)
    if len(body) > MAX_BODY:
        raise ProtocolError(f"dict body of {len(body)} bytes exceeds {MAX_BODY}")
    return body


def decode_dict(body: bytes) -> dict[bytes, bytes]:
    items = _read_items(body)
    if len(items) % 2:
        raise ProtocolError("dict has a key without a value")
    return {items[i]: items[i + 1] for i in range(0, len(items), 2)}


def adoption_request(argv: Iterable[bytes | str], mask: int) -> bytes:
    """The data part of an adoption request (descriptors go as SCM_RIGHTS)."""
    if not mask & MASK_PIPE or mask & ~_MASK_ALL:
        raise ProtocolError(f"bad descriptor mask {mask:#x}")
    return encode_packet(MODIFIER1_FORK_SERVER, encode_array(argv), mask)


def parse_pid_reply(packet: Packet) -> int:
    """The pid of an adoption reply; ProtocolError if there is none."""
    if packet.modifier1 != MODIFIER1_FORK_SERVER:
        raise ProtocolError(f"reply has modifier1 {packet.modifier1}, not 35")
    pairs = decode_dict(packet.body)
    raw = pairs.get(b"pid")
    if raw is None:
        raise ProtocolError("reply has no pid")
    text = raw.decode("ascii", "replace").strip()
    # checked before int(): a 5000-digit "pid" would make int() raise a
    # plain ValueError (Python's int max str digits), not a ProtocolError
    if not text.isascii() or not text.isdigit() or len(text) > len(str(PID_MAX)):
        raise ProtocolError(f"unparsable pid {raw[:40]!r}")
    pid = int(text)
    if not 0 < pid <= PID_MAX:
        raise ProtocolError(f"bad pid {pid}")
    return pid


def reply_born_in_cgroup(packet: Packet) -> bool:
    """Whether an adoption reply says the vassal was born in the cgroup the
    request's descriptor (MASK_CGROUP) named: `"cgroup": "1"`, from our
    base only; uWSGI's replies have the pid alone."""
    return decode_dict(packet.body).get(b"cgroup") == b"1"
