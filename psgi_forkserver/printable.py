"""Names and values as they may be printed: no raw control characters.

A vassal file name, a config value or a line an app wrote can hold ESC
(terminal escape sequences), BEL, a carriage return or a newline (a forged
`emperor: [app1] ...` line in the text log). Everything the Emperor prints
for people (the text log, `emperor status`, the status page, the client
commands' lines) goes through `printable`, which writes each such character
as a visible escape: `\\n`, `\\r`, `\\t`, `\\e`, else `\\xNN` / `\\uNNNN`.
A backslash is left as it is (an app's `C:\\path` stays readable), so an
escape in the output may also have been typed literally; it never acts.
"""

from __future__ import annotations

import re

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
# C0, DEL, C1; the Unicode line and paragraph separators (some viewers
# break lines there); the bidirectional overrides and isolates (text that
# reads in another order than it is stored)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def printable(value: object) -> str:
    """`value` as text with every control character escaped."""
    text = value if isinstance(value, str) else str(value)
    return _UNPRINTABLE.sub(_escape, text)
