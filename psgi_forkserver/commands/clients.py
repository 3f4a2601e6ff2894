"""The client commands: `emperor status`, (verbs.py: `emperor reload|stop|start NAME...`, `logs`),
`emperor reload-base [--wait]`, `emperor reopen-logs`. They talk to a running Emperor over its
stats socket (status.rundir finds it), or signal it by its pidfile."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..emperor.locks import pidfile_is_held


def _print(text: str, **kw) -> None:
    """A line for people: names and values in it may hold control characters."""
    from ..printable import printable

    print(printable(text), **kw)


def is_emperor(pid: int) -> bool:
    """Whether `pid` runs `emperor run` (its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    for i, a in enumerate(argv[:3]):
        if os.path.basename(a) == "emperor" or a.endswith("psgi_forkserver.cli"):
            return "run" in argv[i + 1:]
    return False


def signal_emperor(pidfile: Path, sig: signal.Signals, command: str) -> int | None:
    """`sig` to the Emperor of `pidfile`, only once it is sure to be one (a
    stale pidfile may name any process by now): its pid, or None with the
    reason printed."""
    try:
        pid = int(pidfile.read_text().strip())
        held = pidfile_is_held(pidfile)
    except (OSError, ValueError) as e:
        _print(f"emperor: {command}: {pidfile}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return None
    if not held or not is_emperor(pid):
        why = "no Emperor holds it" if not held else f"pid {pid} is not an Emperor"
        _print(f"emperor: {command}: {pidfile}: stale pidfile ({why}); nothing signalled",
              file=sys.stderr)
        return None
    try:
        os.kill(pid, sig)
    except OSError as e:
        _print(f"emperor: {command}: pid {pid}: {e.strerror}", file=sys.stderr)
        return None
    _print(f"emperor: {command}: signalled pid {pid}", flush=True)
    return pid


def reopen_logs(args: argparse.Namespace) -> int:
    """`emperor reopen-logs`: SIGUSR2 with --pidfile, else the command on
    the stats socket (whose reply says which files could not be reopened)."""
    if args.pidfile is not None:
        return 0 if signal_emperor(args.pidfile, signal.SIGUSR2, "reopen-logs") else 1
    stats = stats_socket(args, "reopen-logs")
    if stats is None:
        return 1
    return 0 if ask(stats, "reopen-logs") is not None else 1


WAIT_POLL = 0.25  # --wait: seconds between two looks at the stats document


def reload_base(pidfile: Path, wait: bool = False, stats: Path | None = None,
                timeout: float = 300.0) -> int:
    """SIGUSR1 to the Emperor of `pidfile`, only once it is sure to be one
    (a stale pidfile may name any process by now); with `wait`, follow the
    deploy on the stats socket until it ends (the document's
    `emperor.deploy`, see emperor/deploys.py).

    Which deploy is ours: `requests` counts the SIGUSR1s the Emperor
    handled; ours is the first deploy whose `request` is past the count
    read before signalling (a request that arrives while the same new
    generation is still starting shares that deploy)."""
    if wait and stats is None:
        _print("emperor: reload-base: --wait needs the Emperor's stats socket (--stats)",
              file=sys.stderr)
        return 2
    before = 0
    if wait:
        try:
            before = _deploy_doc(stats)["requests"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            _print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
    if signal_emperor(pidfile, signal.SIGUSR1, "reload-base") is None:
        return 1
    if not wait:
        return 0
    return _wait_deploy(stats, before, timeout)


def ask(stats: Path, cmd: str, name: str | None = None) -> dict[str, Any] | None:
    """Send one command on the stats socket and print its reply as one line:
    the reply when the Emperor did it, None (said on stderr) when not."""
    from ..rundir import fetch_command

    what = f"{cmd} {name}" if name else cmd
    try:
        reply = fetch_command(stats, cmd, name)
    except (OSError, ValueError) as e:
        _print(f"emperor: {cmd}: {stats}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        _print(f"emperor: {what}: {reply.get('message')}", file=sys.stderr)
        return None
    _print(f"emperor: {what}: {reply.get('message')}", flush=True)
    return reply


def reload_base_by_socket(stats: Path, wait: bool, timeout: float) -> int:
    """`emperor reload-base` over the stats socket (no pidfile needed)."""
    reply = ask(stats, "reload-base")
    if reply is None:
        return 1
    if not wait:
        return 0
    return _wait_deploy(stats, reply["requests"] - 1, timeout)


def _wait_deploy(stats: Path, before: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            doc = _deploy_doc(stats)
        except (OSError, ValueError, KeyError, TypeError) as e:
            _print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
        last = doc.get("last")
        if last is not None and last.get("request", 0) > before and last.get("finished"):
            return _outcome(last)
        time.sleep(WAIT_POLL)
    state = f" (last seen: {last['state']}, generation {last['generation']})" if last else ""
    _print(f"emperor: reload-base: no outcome within {timeout:g} s{state}", file=sys.stderr)
    return 1


def _deploy_doc(stats: Path) -> dict[str, Any]:
    from ..rundir import fetch

    deploy = fetch(stats)["emperor"]["deploy"]
    if not isinstance(deploy, dict):
        raise ValueError("this Emperor does not report deploys")
    return deploy


def _outcome(d: dict[str, Any]) -> int:
    what = (f"generation {d['generation']}: {d['state']}, {d['moved']} moved, "
            f"{len(d['failed'])} failed, {d['duration_s']:.2f} s")
    if d["state"] == "done":
        _print(f"emperor: reload-base: {what}")
        return 0
    why = d.get("reason") or "; ".join(f"{n}: {r}" for n, r in d["failed"].items())
    _print(f"emperor: reload-base: {what}: {why}", file=sys.stderr)
    return 1


def stats_socket(args: argparse.Namespace, what: str, quiet: bool = False) -> Path | None:
    """The stats socket a client command talks to (--stats, --dir, or the
    only Emperor running here); None after saying why not."""
    if args.stats is not None:
        return args.stats
    from ..rundir import find_stats

    try:
        return find_stats(args.vassals_dir)
    except ValueError as e:
        if not quiet:
            _print(f"emperor: {what}: {e}", file=sys.stderr)
        return None


#: states in which a started (or reloaded) vassal serves
SERVING = ("loyal", "running", "on-demand")
