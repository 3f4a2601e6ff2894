"""`emperor run VASSALS_DIR ...`"""

from __future__ import annotations

import argparse
import os
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        print(f"emperor: {vdir}: not a directory", file=sys.stderr)
        return 2
    program = args.program or str(paths.vassal_program())
    if os.sep in program:
        program = os.path.abspath(program)
    use_fs = args.use_fork_server.resolve() if args.use_fork_server else None
    opts = Options(
        vassals_dir=vdir.resolve(),
        program=program,
        use_fork_server=use_fs,
        fork_bases=tuple(args.fork_bases),
        mercy=args.mercy,
        adopt_timeout=args.adopt_timeout,
        rescan_interval=args.rescan_interval,
    )
    return Emperor(opts).run()


if __name__ == "__main__":
    sys.exit(main())
