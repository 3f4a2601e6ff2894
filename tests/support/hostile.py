"""What the hostile scenarios check after each blow: the Emperor still runs
and logged no traceback."""

from __future__ import annotations

from .emperors import Emp


def emperor_ok(e: Emp) -> None:
    assert e.running(), "the Emperor died:\n" + e.text()[-3000:]
    assert "Traceback" not in e.text(), e.text()[-3000:]
