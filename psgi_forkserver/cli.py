"""`emperor run VASSALS_DIR ...`, `emperor reload-base --pidfile PATH [--wait --stats SOCK]`"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import paths
from .frontdoor import DEFAULT_KEEPALIVE
from .emperor import Emperor, Options, StartupError, pidfile_is_held


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
    add_front_arguments(run)
    nc = sub.add_parser("nginx-conf",
                        help="print the routing by domain as an include file for your own nginx")
    nc.add_argument("vassals_dir", metavar="VASSALS_DIR", type=Path)
    nc.add_argument("--run-dir", type=Path, metavar="DIR",
                    help="the Emperor's --run-dir (default: the one `emperor run` picks "
                         "for VASSALS_DIR)")
    nc.add_argument("--keepalive", type=int, default=DEFAULT_KEEPALIVE, metavar="N",
                    help=f"idle connections nginx keeps per vassal (default {DEFAULT_KEEPALIVE}; "
                         "0: a new connection per request)")
    rb = sub.add_parser("reload-base",
                        help="code deploy: new base generation, move every adopted vassal")
    rb.add_argument("--pidfile", type=Path, metavar="PATH", required=True,
                    help="the running Emperor's --pidfile")
    rb.add_argument("--wait", action="store_true",
                    help="wait for the outcome: exit 0 once every vassal runs on the new "
                         "generation, 1 with the reason otherwise (needs --stats)")
    rb.add_argument("--stats", type=Path, metavar="PATH",
                    help="the running Emperor's --stats socket (for --wait)")
    rb.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                    help="--wait: give up after this long (default 300)")
    add_status_arguments(run)
    add_status_command(sub)
    add_prove_command(sub)
    return p


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


WAIT_POLL = 0.25  # --wait: seconds between two looks at the stats document


def reload_base(pidfile: Path, wait: bool = False, stats: Path | None = None,
                timeout: float = 300.0) -> int:
    """SIGUSR1 to the Emperor of `pidfile`, only once it is sure to be one
    (a stale pidfile may name any process by now); with `wait`, follow the
    deploy on the stats socket until it ends (the document's
    `emperor.deploy`, see bases.py).

    Which deploy is ours: `requests` counts the SIGUSR1s the Emperor
    handled; ours is the first deploy whose `request` is past the count
    read before signalling (a request that arrives while the same new
    generation is still starting shares that deploy)."""
    if wait and stats is None:
        print("emperor: reload-base: --wait needs --stats (the Emperor's stats socket)",
              file=sys.stderr)
        return 2
    before = 0
    if wait:
        try:
            before = _deploy_doc(stats)["requests"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
    try:
        pid = int(pidfile.read_text().strip())
        held = pidfile_is_held(pidfile)
    except (OSError, ValueError) as e:
        print(f"emperor: reload-base: {pidfile}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return 1
    if not held or not is_emperor(pid):
        why = "no Emperor holds it" if not held else f"pid {pid} is not an Emperor"
        print(f"emperor: reload-base: {pidfile}: stale pidfile ({why}); nothing signalled",
              file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as e:
        print(f"emperor: reload-base: pid {pid}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"emperor: reload-base: signalled pid {pid}", flush=True)
    if not wait:
        return 0
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        try:
            doc = _deploy_doc(stats)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"emperor: reload-base: {stats}: {e}", file=sys.stderr)
            return 1
        last = doc.get("last")
        if last is not None and last.get("request", 0) > before and last.get("finished"):
            return _outcome(last)
        time.sleep(WAIT_POLL)
    state = f" (last seen: {last['state']}, generation {last['generation']})" if last else ""
    print(f"emperor: reload-base: no outcome within {timeout:g} s{state}", file=sys.stderr)
    return 1


def _deploy_doc(stats: Path) -> dict[str, Any]:
    from .status import fetch

    deploy = fetch(stats)["emperor"]["deploy"]
    if not isinstance(deploy, dict):
        raise ValueError("this Emperor does not report deploys")
    return deploy


def _outcome(d: dict[str, Any]) -> int:
    what = (f"generation {d['generation']}: {d['state']}, {d['moved']} moved, "
            f"{len(d['failed'])} failed, {d['duration_s']:.2f} s")
    if d["state"] == "done":
        print(f"emperor: reload-base: {what}")
        return 0
    why = d.get("reason") or "; ".join(f"{n}: {r}" for n, r in d["failed"].items())
    print(f"emperor: reload-base: {what}: {why}", file=sys.stderr)
    return 1


def check_paths(args: argparse.Namespace) -> str | None:
    """The first path option of `emperor run` that cannot work, as one line
    naming it; None when all can."""
    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        return f"{vdir}: not a directory"
    if not os.access(vdir, os.R_OK | os.X_OK):
        return f"{vdir}: cannot read the vassals directory"
    for opt, path, sock in (("--pidfile", args.pidfile, False), ("--stats", args.stats, True),
                            ("--use-fork-server", args.use_fork_server, True)):
        if path is None:
            continue
        parent = Path(os.path.abspath(path)).parent
        if not parent.is_dir():
            return f"{opt} {path}: directory {parent} does not exist"
        if opt != "--use-fork-server" and not os.access(parent, os.W_OK | os.X_OK):
            return f"{opt} {path}: cannot create files in {parent}"
        if os.path.isdir(path):
            return f"{opt} {path}: is a directory"
        if sock and len(os.fsencode(os.path.abspath(path))) > 107:
            return f"{opt} {path}: longer than a UNIX socket path may be (107 bytes)"
    if args.program is not None:
        if os.sep in args.program:
            if not (os.path.isfile(args.program) and os.access(args.program, os.X_OK)):
                return f"--vassal-binary {args.program}: not an executable file"
        elif shutil.which(args.program) is None:
            return f"--vassal-binary {args.program}: not found in PATH"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reload-base":
        return reload_base(args.pidfile, args.wait, args.stats, args.timeout)
    if args.command == "status":
        return status_command(args)
    if args.command == "nginx-conf":
        return nginx_conf_command(args)
    if args.command == "prove":
        return prove_command(args)
    vdir: Path = args.vassals_dir
    bad = check_paths(args) or check_front(args)
    if bad is not None:
        print(f"emperor: {bad}", file=sys.stderr)
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
        run_dir=run_dir_of(args),
        front=front_options(args),
    )
    emperor = Emperor(opts)
    try:
        emperor.claim()  # locks and pidfile first: a second Emperor stops here
    except StartupError as e:
        print(f"emperor: {e}", file=sys.stderr)
        return 2
    try:
        opts.status = bind_status(args)  # before anything starts: errors exit 2
    except (OSError, ValueError) as e:
        emperor.release()
        if emperor.opts.pidfile is not None:
            emperor.opts.pidfile.unlink(missing_ok=True)
        msg = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"emperor: {msg}", file=sys.stderr)
        return 2
    return emperor.run()


# -- the front door: `run --http/--nginx-include`, `emperor nginx-conf` -------


def add_front_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--run-dir", type=Path, metavar="DIR",
                     help="sockets of vassals with `domain` and the front door's files "
                          "(default: /run/psgi-forkserver/HASH of VASSALS_DIR as root)")
    run.add_argument("--http", metavar="HOST:PORT",
                     help="the front door: run nginx on this address, routing by Host name "
                          "(the vassals' `domain` keys)")
    run.add_argument("--nginx-include", type=Path, metavar="PATH",
                     help="keep this nginx include file (upstreams and a $host map) up to date")
    run.add_argument("--nginx-reload", metavar="COMMAND",
                     help="run this shell command after each change of --nginx-include")
    run.add_argument("--nginx", metavar="PATH", help="the nginx binary (default: from PATH)")
    run.add_argument("--http-access-log", default=True, action=argparse.BooleanOptionalAction,
                     help="nginx's access log in the Emperor's log, prefixed [front] (default: on)")
    run.add_argument("--nginx-keepalive", type=int, default=DEFAULT_KEEPALIVE, metavar="N",
                     help=f"idle connections nginx keeps open per vassal (default "
                          f"{DEFAULT_KEEPALIVE}; 0: one connection per request)")


def run_dir_of(args: argparse.Namespace) -> Path:
    from .frontdoor import default_run_dir

    if getattr(args, "run_dir", None) is not None:
        return Path(os.path.abspath(args.run_dir))
    return default_run_dir(args.vassals_dir)


def check_front(args: argparse.Namespace) -> str | None:
    """The first front-door option of `emperor run` that cannot work, or None."""
    from .frontdoor import check_listen, find_nginx
    from .sockets import MAX_UNIX_PATH

    run_dir = run_dir_of(args)
    # the longest socket path it will hold must fit in a sockaddr_un
    # the longest path it will hold (sockets.auto_socket_path: h-HASH.sock)
    if len(os.fsencode(str(run_dir / "sockets" / "h-0123456789abcdef.sock"))) > MAX_UNIX_PATH:
        return f"--run-dir {run_dir}: too long for UNIX socket paths under it"
    if args.run_dir is not None or args.http is not None or args.nginx_include is not None:
        # asked for: it must work now (otherwise it is made when a vassal
        # with `domain` first needs a socket, and a failure is that vassal's)
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as e:
            return f"--run-dir {run_dir}: {e.strerror or e}"
    if args.http is not None:
        nginx = args.nginx or find_nginx()
        if nginx is None or not os.access(nginx, os.X_OK):
            return f"--http: nginx not found{f' at {args.nginx}' if args.nginx else ''} " \
                   "(apt-get install nginx)"
        bad = check_listen(args.http)
        if bad is not None:
            return f"--http {args.http}: {bad}"
    if args.nginx_include is not None:
        parent = Path(os.path.abspath(args.nginx_include)).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"--nginx-include {args.nginx_include}: cannot create files in {parent}"
    if args.nginx_reload is not None and args.nginx_include is None:
        return "--nginx-reload needs --nginx-include"
    return None


def front_options(args: argparse.Namespace):
    from .frontdoor import FrontDoorOptions, find_nginx

    if args.http is None and args.nginx_include is None:
        return None
    return FrontDoorOptions(
        run_dir=run_dir_of(args), listen=args.http,
        include=Path(os.path.abspath(args.nginx_include)) if args.nginx_include else None,
        reload_cmd=args.nginx_reload, nginx=args.nginx or find_nginx(),
        keepalive=max(0, args.nginx_keepalive), access_log=args.http_access_log,
        backoff_first=args.backoff_first, backoff_max=min(30.0, args.backoff_max),
        stable_after=args.stable_after,
    )


def static_routes(vassals_dir: Path, run_dir: Path):
    """The routes `emperor run` would serve once every vassal is up: each
    file read and judged as the Emperor reads it, names claimed in name
    order (the first keeps a name); (routes, one line per refused file)."""
    from . import config as cfgmod
    from .frontdoor import Route, nginx_target
    from .sockets import wanted_address

    claimed: dict[str, str] = {}
    routes, errors = [], []
    selector = cfgmod.BaseSelector()
    for name, path in sorted(cfgmod.discover(vassals_dir).items()):
        cfg = cfgmod.load(path, judge=True)
        if cfg is None:
            continue
        if cfg.error:
            errors.append(f"{name}: {cfg.error}")
            continue
        if selector.is_base(cfg):
            continue
        domains = sorted({d.lower() for d in cfg.get_all("domain")})
        taken = [d for d in domains if d in claimed]
        if taken:
            errors.append(f"{name}: domain {taken[0]} is already served by vassal {claimed[taken[0]]}")
            continue
        want = wanted_address(cfg, run_dir / "sockets")
        if not domains or want is None:
            continue
        claimed.update((d, name) for d in domains)
        routes.append(Route(name, tuple(domains), nginx_target(want[0]),
                            protocol="uwsgi" if cfg.get("socket") else "http"))
    return routes, errors


def nginx_conf_command(args: argparse.Namespace) -> int:
    from .frontdoor import render_routing

    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        print(f"emperor: nginx-conf: {vdir}: not a directory", file=sys.stderr)
        return 2
    routes, errors = static_routes(vdir.resolve(), run_dir_of(args))
    for e in errors:
        print(f"emperor: nginx-conf: {e}", file=sys.stderr)
    sys.stdout.write(render_routing(routes, max(0, args.keepalive)))
    return 0


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


# -- prove: a Perl test harness forked from a preloaded base ---------------------


def add_prove_command(sub) -> None:
    pr = sub.add_parser("prove", help="run Perl test files forked from a preloaded base (prove's options)")
    pr.add_argument("paths", metavar="PATH", nargs="*", help="test files and directories (default: t)")
    pr.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="run N tests at once")
    pr.add_argument("-I", dest="includes", action="append", default=[], metavar="DIR",
                    help="library directory (in the base and in every test's @INC)")
    pr.add_argument("-M", dest="modules", action="append", default=[], metavar="MODULE",
                    help="preload MODULE, as prove's -M (imported into main)")
    pr.add_argument("--preload", action="append", default=[], metavar="FILE",
                    help="require FILE in the base before forking")
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
    from .prove import ProveOptions, connect, main as prove_main

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


if __name__ == "__main__":
    sys.exit(main())
