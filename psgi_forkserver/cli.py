"""`emperor run VASSALS_DIR ...`, `emperor reload-base --pidfile PATH`"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import paths
from .emperor import Emperor, Options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emperor", description="psgi-forkserver Emperor")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the vassals of a directory")
    run.add_argument("vassals_dir", metavar="VASSALS_DIR", type=Path)
    run.add_argument(
        "--use-fork-server", "--emperor-use-fork-server", dest="use_fork_server",
        metavar="SOCK", type=Path,
        help="adopt vassals through this fork-server socket",
    )
    run.add_argument(
        "--vassal-fork-base", dest="fork_bases", metavar="NAME", action="append", default=[],
        help="this vassal file is a base (repeatable); default: files with a fork-server key",
    )
    run.add_argument(
        "--vassal-binary", "--emperor-wrapper", dest="program", metavar="PATH",
        help="the vassal program (default: the installed ForkServer.pm)",
    )
    run.add_argument("--mercy", type=float, default=30.0, metavar="SECONDS",
                     help="graceful stop time before SIGKILL (default 30)")
    run.add_argument("--adopt-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="wait this long for a fork server's reply (default 10)")
    run.add_argument("--rescan-interval", type=float, default=10.0, metavar="SECONDS",
                     help="full rescan of the directory, besides inotify (default 10)")
    run.add_argument("--pidfile", type=Path, metavar="PATH",
                     help="write the Emperor's pid here (for `emperor reload-base`)")
    run.add_argument("--backoff-first", type=float, default=1.0, metavar="SECONDS",
                     help="crash loop: first restart delay, doubling (default 1)")
    run.add_argument("--backoff-max", type=float, default=180.0, metavar="SECONDS",
                     help="crash loop: longest restart delay (default 180)")
    run.add_argument("--stable-after", type=float, default=10.0, metavar="SECONDS",
                     help="a vassal that lived this long did not crash-loop (default 10)")
    run.add_argument("--reload-grace", type=float, default=1.0, metavar="SECONDS",
                     help="a new vassal that never sends byte 17 replaces the old one "
                          "this long after byte 1/5 (default 1)")
    run.add_argument("--deploy-parallel", type=int, default=4, metavar="N",
                     help="code deploy: vassals moved to the new base at a time (default 4)")
    run.add_argument("--adopt-parallel", type=int, default=8, metavar="N",
                     help="adoption requests in flight at once; the others queue (default 8)")
    run.add_argument("--emperor-sockets", dest="own_sockets", default=None,
                     action=argparse.BooleanOptionalAction,
                     help="bind each vassal's http-socket in the Emperor and pass it "
                          "(default: only with the built-in vassal program)")
    rb = sub.add_parser("reload-base",
                        help="code deploy: new base generation, move every adopted vassal")
    rb.add_argument("--pidfile", type=Path, metavar="PATH", required=True,
                    help="the running Emperor's --pidfile")
    add_status_arguments(run)
    add_status_command(sub)
    return p


def reload_base(pidfile: Path) -> int:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError) as e:
        print(f"emperor: reload-base: {pidfile}: {e}", file=sys.stderr)
        return 1
    print(f"emperor: reload-base: signalled pid {pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reload-base":
        return reload_base(args.pidfile)
    if args.command == "status":
        return status_command(args)
    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        print(f"emperor: {vdir}: not a directory", file=sys.stderr)
        return 2
    program = args.program or str(paths.vassal_program())
    if os.sep in program:
        program = os.path.abspath(program)
    use_fs = args.use_fork_server.resolve() if args.use_fork_server else None
    opts = Options(
        vassals_dir=vdir.absolute(),  # not resolved: a symlink flipped to a new directory is followed
        program=program,
        use_fork_server=use_fs,
        fork_bases=tuple(args.fork_bases),
        mercy=args.mercy,
        adopt_timeout=args.adopt_timeout,
        rescan_interval=args.rescan_interval,
        backoff_first=args.backoff_first,
        backoff_max=args.backoff_max,
        stable_after=args.stable_after,
        reload_grace=args.reload_grace,
        deploy_parallel=max(1, args.deploy_parallel),
        adopt_parallel=max(1, args.adopt_parallel),
        own_sockets=args.own_sockets,
        pidfile=args.pidfile.resolve() if args.pidfile else None,
    )
    try:
        opts.status = bind_status(args)  # before anything starts: errors exit 2
    except (OSError, ValueError) as e:
        print(f"emperor: {e}", file=sys.stderr)
        return 2
    return Emperor(opts).run()


# -- status: `run --stats/--status-http`, `emperor status` ---------------------


def add_status_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--stats", type=Path, metavar="PATH",
                     help="serve a JSON status document on this UNIX socket (mode 0600)")
    run.add_argument("--status-http", metavar="HOST:PORT",
                     help="serve a status page over HTTP (loopback addresses only)")
    run.add_argument("--status-http-public", action="store_true",
                     help="allow --status-http on a non-loopback address (no authentication!)")


def add_status_command(sub) -> None:
    st = sub.add_parser("status", help="what runs and what it costs (needs `run --stats`)")
    st.add_argument("--stats", type=Path, metavar="PATH", required=True,
                    help="the running Emperor's --stats socket")
    st.add_argument("--json", action="store_true", help="print the JSON document as is")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")


def bind_status(args: argparse.Namespace):
    """The status server with its sockets bound, or None when not asked for."""
    if args.stats is None and args.status_http is None:
        return None
    from .status import StatusServer

    return StatusServer(
        stats_path=args.stats, http=args.status_http, http_public=args.status_http_public,
    ).bind()


def status_command(args: argparse.Namespace) -> int:
    import json

    from .status import fetch, format_table

    try:
        doc = fetch(args.stats, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"emperor: status: {args.stats}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        sys.stdout.write(format_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
