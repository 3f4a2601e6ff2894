"""`emperor prove`: a Perl test harness whose test processes are forked from a
preloaded base (ForkServer::Prove::TestFile), with prove's options, output and exit
status.

The base is an ordinary base vassal with a fork server, started with the
user's preloads; every test file is an adoption request whose argv starts
with `--test-file`, whose Emperor pipe is the test's stdout and whose config
pipe first carries the test's spec (file, cwd, argv, %ENV, @INC) and then is
its stderr. This process owns what the Emperor owns for vassals: the fork
requests, the subreaping (tests and whatever they leave behind are its
children), each test's wait status and its timeout. TAP is parsed by tap.py.
A file that cannot run forked (a `# emperor-prove: no-preload` line, a
shebang with switches other than -w, such as -T) runs cold: `perl FILE`.

The modules: testfiles (options, which files, cold or forked, the spec),
base (the base process), scheduler (running files in forks), tap (a file's
run and its TAP), report (prove's output, JUnit), watching and serving
(the long-running modes, and serving's client).
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing itself is not imported at run time: a test run's start-up)
if TYPE_CHECKING:
    from pathlib import Path  # (pathlib, re and enum: ~8 ms of a 1-file run's start)
    from typing import Any

# `emperor prove` (hosting.py) imports none of these: a test run starts
# without the TAP parser, psutil or the Emperor's config (~0.1 s of imports)
_EXPORTS = {"BaseError": ".base", "Prove": ".scheduler", "ProveOptions": ".testfiles",
            "build_spec": ".testfiles", "cold_reason": ".testfiles", "connect": ".serving",
            "find_tests": ".testfiles"}

__all__ = [*_EXPORTS, "main"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib  # (not at import: ~3 ms of a 1-file run's start)

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)


def main(opts: Any, watch: bool = False, serve: Path | None = None) -> int:
    import subprocess
    import sys

    from . import serving, watching
    from .base import BaseError
    from .scheduler import Prove

    try:
        prove = Prove(opts)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"emperor prove: {e}", file=sys.stderr)
        return 2
    try:
        if serve is not None:
            return serving.serve(prove, serve)
        return watching.watch(prove) if watch else prove.run()
    except BaseError as e:
        print(f"emperor prove: {e}", file=sys.stderr)
        return 2
