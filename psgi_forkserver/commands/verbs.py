"""The operator's verbs on vassals, over the stats socket:

- `emperor reload|stop|start NAME...` (names, shell-style globs, or
  `--all`): every command sent, then every outcome waited for;
- `emperor status NAME`: one vassal, with why it does not serve;
- `emperor logs NAME [-n N] [-f]`: its recent lines, kept by the Emperor
  (no --status-http needed).

Exit codes (docs/operators.md): 0 done; 1 failed, not done in time, or no
Emperor to ask; 2 a bad command line; 3 (`status NAME`) the vassal does not
serve; 4 no vassal of that name or glob.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..printable import printable
from .clients import SERVING, WAIT_POLL, ask, stats_socket

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_SERVING, EXIT_NO_VASSAL = 0, 1, 2, 3, 4
FOLLOW_POLL = 0.25  # seconds between two asks of `logs -f`


def _say(msg: str, err: bool = False) -> None:
    """A line for people: names and values in it may hold control characters."""
    print(printable(f"emperor: {msg}"), file=sys.stderr if err else sys.stdout, flush=True)


def resolve_names(patterns: list[str], every: bool, vassals: dict[str, dict[str, Any]],
                  cmd: str) -> tuple[list[str], list[str]]:
    """(vassal names in order, patterns that matched none). `--all` is
    every vassal but the bases (a base's reload is `reload-base`; it
    cannot be stopped)."""
    if every:
        return sorted(n for n, v in vassals.items() if v.get("kind") != "base"), []
    names: list[str] = []
    unmatched: list[str] = []
    for pat in patterns:
        if pat in vassals:  # a name is itself, whatever glob characters it holds
            hits = [pat]
        elif any(ch in pat for ch in "*?["):
            hits = sorted(n for n in vassals if fnmatch.fnmatchcase(n, pat))
        else:
            hits = []
        if not hits:
            unmatched.append(pat)
        names += [n for n in hits if n not in names]
    return names, unmatched


@dataclass
class Waiting:
    """One vassal's command, until its outcome."""

    name: str
    before: dict[str, Any]
    done: bool = False
    ok: bool = False
    message: str = ""


def judge(cmd: str, w: Waiting, v: dict[str, Any]) -> None:
    """Whether `cmd` on w's vassal has come out, from its status now."""
    state = v.get("state")
    err = v.get("last_error")
    if not v:
        w.done, w.message = True, "gone"
        return
    if cmd == "stop":
        if state == "stopped":
            w.done, w.ok, w.message = True, True, f"stopped ({v.get('last_exit') or 'no process'})"
        return
    pid = v.get("pid")
    fresh = cmd == "start" or pid != w.before.get("pid") or state == "on-demand"
    if state in SERVING and fresh and not v.get("other_pids"):
        w.done, w.ok, w.message = True, True, f"{state}, pid {pid}"
        return
    # (the first document may be taken before the loop acted on the
    # command: "stopped" counts only once held again)
    if (err and err != w.before.get("last_error")) or state == "config-error" or v.get("held"):
        w.done, w.message = True, f"{state}: {v.get('error') or err or 'stopped again'}"


def control_many(args: argparse.Namespace) -> int:
    """`emperor reload|stop|start NAME... | --all`: ask for each, then wait
    for every outcome (unless --no-wait); one line per vassal."""
    from ..rundir import fetch

    cmd = args.command
    if bool(args.names) == bool(args.all):
        _say(f"{cmd}: name vassals (names or globs) or give --all, not both", err=True)
        return EXIT_USAGE
    stats = stats_socket(args, cmd)
    if stats is None:
        return EXIT_FAILED
    try:
        vassals = fetch(stats)["vassals"]
    except (OSError, ValueError, KeyError) as e:
        _say(f"{cmd}: {stats}: {getattr(e, 'strerror', None) or e}", err=True)
        return EXIT_FAILED
    names, unmatched = resolve_names(args.names, args.all, vassals, cmd)
    for pat in unmatched:
        _say(f"{cmd} {pat}: no such vassal (vassals: {', '.join(sorted(vassals)) or 'none'})",
             err=True)
    waiting: list[Waiting] = []
    failed = False
    for name in names:
        reply = ask(stats, cmd, name)
        if reply is None:
            failed = True
        elif args.wait and reply.get("command") != "reload-base":
            waiting.append(Waiting(name, reply.get("vassal") or {}))
    if waiting and not _wait_all(stats, cmd, waiting, args.timeout):
        failed = True
    if failed:
        return EXIT_FAILED
    return EXIT_NO_VASSAL if unmatched else EXIT_OK


def _wait_all(stats: Path, cmd: str, waiting: list[Waiting], timeout: float) -> bool:
    from ..rundir import fetch

    deadline = time.monotonic() + timeout
    while True:
        try:
            vassals = fetch(stats)["vassals"]
        except (OSError, ValueError, KeyError) as e:
            _say(f"{cmd}: {stats}: {e}", err=True)
            return False
        for w in waiting:
            if not w.done:
                judge(cmd, w, vassals.get(w.name) or {})
                if w.done:
                    _say(f"{cmd} {w.name}: {w.message}", err=not w.ok)
        left = [w for w in waiting if not w.done]
        if not left:
            return all(w.ok for w in waiting)
        if time.monotonic() >= deadline:
            for w in left:
                state = (vassals.get(w.name) or {}).get("state")
                _say(f"{cmd} {w.name}: not done within {timeout:g} s (state {state})", err=True)
            return False
        time.sleep(WAIT_POLL)


def status_of(doc: dict[str, Any], name: str) -> tuple[int, str]:
    """`emperor status NAME`: (exit code, text)."""
    from ..status.page import format_table

    v = doc["vassals"].get(name)
    if v is None:
        known = ", ".join(sorted(doc["vassals"])) or "none"
        return EXIT_NO_VASSAL, f"emperor: status {name}: no such vassal (vassals: {known})\n"
    one = {**doc, "vassals": {name: v}}
    text = format_table(one).rsplit("\n", 2)[0] + "\n"  # without the Emperor's line
    said = v.get("error") or v.get("last_error") or ""
    for line in v.get("last_output") or []:  # the lines before the one the error quotes
        if line not in said:
            text += f"{name}: | {line}\n"
    up = v.get("state") in SERVING + ("reloading",) or (v.get("kind") == "base"
                                                         and v.get("state") == "running")
    return (EXIT_OK if up else EXIT_NOT_SERVING), text


def logs_command(args: argparse.Namespace) -> int:
    """`emperor logs NAME [-n N] [-f]`: the vassal's recent lines from the
    Emperor (its own lines and the vassal's output); -f: then every new one."""
    from ..rundir import fetch_logs

    stats = stats_socket(args, "logs")
    if stats is None:
        return EXIT_FAILED
    since: int | None = None
    first = True
    try:
        while True:
            try:
                reply = fetch_logs(stats, args.name, since)
            except (OSError, ValueError) as e:
                _say(f"logs {args.name}: {stats}: {getattr(e, 'strerror', None) or e}", err=True)
                return EXIT_FAILED
            if not reply.get("ok"):
                _say(f"logs {args.name}: {reply.get('message')}", err=True)
                return EXIT_NO_VASSAL if first else EXIT_FAILED
            lines = reply.get("lines") or []
            if first and args.lines is not None:
                lines = lines[-args.lines:] if args.lines > 0 else []
            if lines:
                sys.stdout.write("".join(line + "\n" for line in lines))
                sys.stdout.flush()
            if not args.follow:
                return EXIT_OK
            first, since = False, reply.get("next")
            time.sleep(FOLLOW_POLL)
    except KeyboardInterrupt:
        return EXIT_OK


def add_verbs(sub, _sub, add_finder) -> None:
    """The parsers of reload/stop/start, status NAME is in `status`; logs."""
    for name, what in (("reload", "a new process for vassals (gap-free when the Emperor "
                                  "owns their socket)"),
                       ("stop", "stop vassals; they stay stopped until `start` or their file "
                                "changes"),
                       ("start", "run stopped (or throttled) vassals again now")):
        c = _sub(sub, name, help=what)
        c.add_argument("names", metavar="NAME", nargs="*",
                       help="vassals (file names without .ini), or shell-style globs ('shop-*')")
        c.add_argument("--all", action="store_true", help="every vassal but the bases")
        add_finder(c)
        c.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="wait this long for the outcome (default 60)")
        c.add_argument("--no-wait", dest="wait", action="store_false",
                       help="exit once the Emperor took the commands")
    lg = _sub(sub, "logs", help="a vassal's recent lines, from the Emperor")
    lg.add_argument("name", metavar="NAME", help="the vassal")
    lg.add_argument("-n", "--lines", type=int, default=None, metavar="N",
                    help="the last N lines only (the Emperor keeps the last 200)")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="then print new lines as they come (Ctrl-C to stop)")
    add_finder(lg)


def print_json(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, indent=1))


def status_command(args: argparse.Namespace) -> int:
    import json

    from ..rundir import fetch
    from ..status.page import format_table

    stats = stats_socket(args, "status")
    if stats is None:
        return 1
    try:
        doc = fetch(stats, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(printable(f"emperor: status: {stats}: {getattr(e, 'strerror', None) or e}"),
              file=sys.stderr)
        return 1
    if getattr(args, "name", None):
        code, text = status_of(doc, args.name)
        if args.json and args.name in doc["vassals"]:
            print(json.dumps(doc["vassals"][args.name], indent=1))
        else:
            for line in text.splitlines():
                print(printable(line), file=sys.stderr if code == 4 else sys.stdout)
        return code
    return write_out(json.dumps(doc, indent=1) + "\n" if args.json else format_table(doc))


#: the exit status of a command whose reader went away, as a shell shows a
#: program killed by SIGPIPE (128 + 13)
EXIT_PIPE = 141


def write_out(text: str) -> int:
    """`text` on stdout, 0; or EXIT_PIPE, quietly, when the reader is gone
    (`emperor status | head`): no traceback on the operator's terminal."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # what is still buffered would fail again as Python exits
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    return 0
