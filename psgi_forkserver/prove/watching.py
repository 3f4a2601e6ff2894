"""`emperor prove --watch`: rerun the test files that change, and start a
new base when a file it preloaded changes (the code deploy)."""

from __future__ import annotations

import os

from .scheduler import Prove

Fingerprints = dict[str, tuple[int, int, int] | None]


def watch(prove: Prove, interval: float = 0.3) -> int:
    """Run everything, then rerun the test files that change (and new
    ones); when a preloaded file changes, start a new base (the code
    deploy), then rerun everything. Until Ctrl-C."""
    prove.stop_on_signals()
    prove.setup()
    try:
        prove.run_batch(prove.test_files())
        tests = fingerprints(prove.test_files())
        preloaded = fingerprints(preloaded_files(prove))
        prove.errout.write("emperor prove: watching for changes (Ctrl-C to stop)\n")
        prove.errout.flush()
        while True:
            prove.wait_events([], interval)  # also reaps what tests left behind
            now_tests = fingerprints(prove.test_files())
            now_pre = fingerprints(list(preloaded))
            if now_pre != preloaded:
                changed = sorted(f for f in preloaded if now_pre.get(f) != preloaded[f])
                prove.out.write(f"\nemperor prove: {', '.join(changed)} changed: new base\n")
                prove.base.stop()
                prove.run_batch(sorted(now_tests))
                preloaded = fingerprints(preloaded_files(prove))
            elif now_tests != tests:
                changed = sorted(f for f in now_tests if now_tests[f] != tests.get(f))
                if changed:
                    prove.out.write(f"\nemperor prove: {', '.join(changed)} changed\n")
                    prove.run_batch(changed)
            tests = now_tests
    except KeyboardInterrupt:
        return 0
    finally:
        prove.teardown()


def fingerprints(files: list[str]) -> Fingerprints:
    found: Fingerprints = {}
    for f in files:
        try:
            st = os.stat(f)
            found[f] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            found[f] = None
    return found


def preloaded_files(prove: Prove) -> list[str]:
    """The files the base loaded that belong to the project: its
    --preload files and what it loaded from the -I directories or from
    below the working directory (not the system's modules)."""
    if prove.base.pid is None:
        prove.base.start(prove.env)
    roots = [os.path.abspath(d) + os.sep for d in [*prove.opts.includes, os.getcwd()]]
    mine = {os.path.abspath(f) for f in prove.opts.preloads}
    for f in prove.base.loaded_files():
        path = os.path.abspath(f) if f else ""
        if path and any(path.startswith(r) for r in roots):
            mine.add(path)
    return sorted(mine)
