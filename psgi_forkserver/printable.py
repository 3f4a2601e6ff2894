"""Names and values as they may be printed: no raw control characters.

A vassal file name, a config value or a line an app wrote can hold ESC
(terminal escape sequences), BEL, a carriage return or a newline (a forged
`emperor: [app1] ...` line in the text log). Everything the Emperor prints
for people (the text log, `emperor status`, the status page, the client
commands' lines) goes through `printable`, which writes each such character
as a visible escape: `\\n`, `\\r`, `\\t`, `\\e`, else `\\xNN` / `\\uNNNN`.
A backslash is left as it is (an app's `C:\\path` stays readable), so an
escape in the output may also have been typed literally; it never acts.

Characters that take no room on a screen (a zero-width space, a soft
hyphen, a byte-order mark) are escaped too: `app\\u200b1` is not `app1`,
and must not look like it. A byte that was not UTF-8 (a file name written
in Latin-1, read with Python's surrogateescape) is written `\\xNN`, never
passed raw to a terminal, where 0x9b is an escape (CSI).

`valid_text` is the lighter rule for the status document itself: only
those undecodable bytes are rewritten (as `\\xNN`), so that JSON, HTML and
Prometheus' text, all UTF-8, can carry every name and value.
"""

from __future__ import annotations

import re
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
# C0, DEL, C1; the Unicode line and paragraph separators (some viewers
# break lines there); the bidirectional overrides and isolates (text that
# reads in another order than it is stored); the invisible ones; lone
# surrogates (bytes that were not UTF-8)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028\u2029\u202a-\u202e"
                          "\u2060-\u2064\u2066-\u2069\ufeff\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if 0xdc80 <= code <= 0xdcff:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{code - 0xdc00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """`value` as text with every control character escaped."""
    text = value if isinstance(value, str) else str(value)
    return _UNPRINTABLE.sub(_escape, text)


def valid_text(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them, keys included) with
    every lone surrogate escaped as `printable` writes it, and nothing else
    changed. Strings without one are returned as they are (no copy)."""
    if isinstance(value, str):
        if value.isascii() or not _SURROGATE.search(value):
            return value
        return _SURROGATE.sub(_escape, value)
    if isinstance(value, dict):
        return {valid_text(k): valid_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [valid_text(v) for v in value]
    return value
