"""`emperor prove`'s command line: a Perl test harness forked from a preloaded base.

(The common case is dispatched by entry.py before any of this is imported;
this parser serves `--help`, `--watch`, `--serve` and `--connect`.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_prove_arguments(pr: argparse.ArgumentParser) -> None:
    """`emperor prove`'s options (prove's, and the long-running modes')."""
    pr.add_argument("--help-long-running", action="help",
                    help="this help (--watch, --serve, --connect; without them: prove's options)")
    pr.add_argument("paths", metavar="PATH", nargs="*", help="test files and directories (default: t)")
    pr.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="run N tests at once")
    pr.add_argument("-I", dest="includes", action="append", default=[], metavar="DIR",
                    help="library directory (in the base and in every test's @INC)")
    pr.add_argument("-M", dest="modules", action="append", default=[], metavar="MODULE",
                    help="preload MODULE, as prove's -M (imported into main)")
    pr.add_argument("--preload", action="append", default=[], metavar="MODULE|FILE",
                    help="load MODULE (or require FILE) in the base before forking")
    pr.add_argument("-r", "--recurse", action="store_true", help="recurse into directories")
    pr.add_argument("-v", "--verbose", action="store_true", help="print every test's TAP")
    pr.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="kill a test file that runs longer than this")
    pr.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report")
    pr.add_argument("--perl", default="perl", metavar="PATH", help="the perl to run (default: perl)")
    pr.add_argument("--watch", action="store_true",
                    help="keep the base; rerun test files when they change, and start a new "
                         "base (then rerun all) when a preloaded file changes")
    pr.add_argument("--serve", type=Path, metavar="SOCK",
                    help="keep a base and run the files `--connect SOCK` clients hand over "
                         "(for `prove --exec`)")
    pr.add_argument("--connect", type=Path, metavar="SOCK",
                    help="run the one test file PATH [ARGS] through `emperor prove --serve SOCK`: "
                         "prove --exec 'emperor prove --connect SOCK'")
    pr.add_argument("--destruct", action="store_true",
                    help="forked tests end with perl's global destruction of the whole "
                         "inherited heap (slower; default: only what the test created)")


def prove_command(args: argparse.Namespace) -> int:
    from ..prove import ProveOptions, connect, main as prove_main

    if args.connect is not None:
        if not args.paths:
            print("emperor prove: --connect needs a test file", file=sys.stderr)
            return 2
        return connect(args.connect, args.paths[0], args.paths[1:], perl=args.perl)
    serve = args.serve.resolve() if args.serve else None
    return prove_main(watch=args.watch, serve=serve, opts=ProveOptions(
        paths=args.paths, jobs=max(1, args.jobs), includes=args.includes, modules=args.modules,
        preloads=args.preload, recurse=args.recurse, verbose=args.verbose,
        timeout=args.timeout, junit=args.junit, perl=args.perl, destruct=args.destruct,
    ))
