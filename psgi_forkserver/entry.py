"""The `emperor` command. `emperor prove` is dispatched before the rest of
the Emperor is imported (a tenth of a second saved on every test run)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prove"]:
        from .prove.command import LONG_RUNNING_PROVE, prove_run

        if not LONG_RUNNING_PROVE.intersection(argv[1:]):
            return prove_run(argv[1:])
    from .cli import main as cli_main

    return cli_main(argv)
