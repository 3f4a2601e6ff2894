"""What each vassal said lately: its recent log lines and its processes' last words.

The status page and `emperor logs NAME` show a vassal's recent lines (the
Emperor's about it and, relayed, its own); the last lines a dead process
wrote (its access log aside) explain its death in the status.
"""

from __future__ import annotations

import re
import time
from collections import deque

RECENT_LINES = 200  # log lines kept per vassal (/log/NAME, `emperor logs NAME`)
LAST_OUTPUT = 3  # lines a process wrote last, kept to explain its death in the status
LAST_PROCESSES = 4  # a vassal's processes whose last lines are kept (the newest)
# an access-log line (HTTPServer/Response.pm, combined format): never why it died
ACCESS_LINE = re.compile(r'\S+ \S+ \S+ \S+ \[[^\]]*\] "')


class RecentLines:
    """Per vassal: its recent lines, how many ever, and its processes' last words."""

    def __init__(self) -> None:
        self.recent: dict[str, deque[str]] = {}
        self.total: dict[str, int] = {}  # lines ever kept per vassal (`logs -f` follows it)
        # the last lines each of a vassal's latest processes wrote, by their
        # sequence number: a dead process's are the status's last error
        # (status/document.py), whatever its successors write since
        self.last_words: dict[str, dict[int | None, deque[str]]] = {}

    def remember(self, name: str, msgs: list[str], seq: int | None = None,
                 relayed: bool = True) -> None:
        """A vassal's recent lines: the Emperor's about it and, relayed, its
        own (logs.Log.keep)."""
        lines = self.recent.get(name)
        if lines is None:
            lines = self.recent[name] = deque(maxlen=RECENT_LINES)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
        lines.extend(stamp + m for m in msgs)
        self.total[name] = self.total.get(name, 0) + len(msgs)
        if relayed:
            kept = [m for m in msgs if m.strip() and not ACCESS_LINE.match(m)]
            if not kept:
                return
            per = self.last_words.setdefault(name, {})
            words = per.get(seq)
            if words is None:
                words = per[seq] = deque(maxlen=LAST_OUTPUT)
                while len(per) > LAST_PROCESSES:  # the oldest process's go
                    del per[min(per, key=lambda q: -1 if q is None else q)]
            words.extend(kept)

    def last_output(self, name: str, seq: int | None) -> tuple[str, ...]:
        """The last lines process `seq` of vassal `name` wrote (its access
        log aside): why it died, when it said so."""
        if seq is None:
            return ()
        return tuple(self.last_words.get(name, {}).get(seq, ()))

    def lines(self, name: str) -> list[str] | None:
        """Its recent lines; None if none were ever kept."""
        lines = self.recent.get(name)
        return None if lines is None else list(lines)

    def forget(self, name: str) -> None:
        self.last_words.pop(name, None)
        self.recent.pop(name, None)
        self.total.pop(name, None)
