"""`emperor run`'s front-door options (`--http`, `--nginx-include`, ...) and
`emperor nginx-conf`: the command line side of frontdoor/."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..frontdoor import DEFAULT_KEEPALIVE



def add_front_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--run-dir", type=Path, metavar="DIR",
                     help="sockets of vassals with `domain` and the front door's files "
                          "(default: the default stats socket's directory, "
                          "/run/psgi-forkserver/HASH of VASSALS_DIR as root)")
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
    run.add_argument("--http-settle", type=float, default=10.0, metavar="SECONDS",
                     help="nginx is reloaded for vassals that come and go once the routes "
                          "were still this long (at most 30x as late); they answer through "
                          "host links meanwhile (default 10)")
    run.add_argument("--nginx-user", metavar="USER[:GROUP]",
                     help="the user nginx's workers run as when the Emperor runs as root "
                          "(default: www-data if it exists, else nobody)")
    run.add_argument("--nginx-keepalive", type=int, default=DEFAULT_KEEPALIVE, metavar="N",
                     help=f"idle connections nginx keeps open per vassal (default "
                          f"{DEFAULT_KEEPALIVE}; 0: one connection per request)")
    run.add_argument("--nginx-workers", metavar="N",
                     help="nginx's worker processes, 1 to 1024 (default: half the CPUs it may use, a cgroup's CPU quota included; at least 1)")


#: nginx's own limit (NGX_MAX_PROCESSES): past it, it says "no more than
#: 1024 processes can be spawned" and runs that many
MAX_NGINX_WORKERS = 1024


def nginx_workers(value: str | None) -> int | None:
    """--nginx-workers as a count (None: the default); ValueError if it is
    not one."""
    if value is None:
        return None
    # ASCII digits only: str.isdigit() takes a superscript two, which int() refuses
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 1 <= int(value) <= MAX_NGINX_WORKERS:
        raise ValueError(f"--nginx-workers {value}: a number of processes, 1 to {MAX_NGINX_WORKERS} "
                         "(nginx spawns no more)")
    return int(value)


def run_dir_of(args: argparse.Namespace) -> Path:
    from ..frontdoor import default_run_dir

    if getattr(args, "run_dir", None) is not None:
        return Path(os.path.abspath(args.run_dir))
    return default_run_dir(args.vassals_dir)


def check_front(args: argparse.Namespace) -> str | None:
    """The first front-door option of `emperor run` that cannot work, or None."""
    from ..frontdoor import check_listen, find_nginx
    from ..sockets import MAX_UNIX_PATH
    from ..rundir import make_private_dir, run_dir_mode

    run_dir = run_dir_of(args)
    # the longest socket path it will hold must fit in a sockaddr_un
    # the longest path it will hold (sockets.auto_socket_path: h-HASH.sock)
    if len(os.fsencode(str(run_dir / "sockets" / "h-0123456789abcdef.sock"))) > MAX_UNIX_PATH:
        return f"--run-dir {run_dir}: too long for UNIX socket paths under it"
    gid = None
    if args.http is not None and os.geteuid() == 0:
        from ..frontdoor import nginx_worker_user
        try:
            gid = nginx_worker_user(args.nginx_user)[1]
        except ValueError as e:
            return f"--nginx-user {args.nginx_user or ''}: {e}".replace("  ", " ")
    if args.run_dir is not None or args.http is not None or args.nginx_include is not None:
        # asked for: it must work now (otherwise it is made when a vassal
        # with `domain` first needs a socket, and a failure is that vassal's)
        try:
            make_private_dir(run_dir, tighten=args.run_dir is None,
                             mode=run_dir_mode(args.nginx_include, gid), group=gid)
        except OSError as e:
            return f"--run-dir {run_dir}: {e.strerror or e}"
    try:
        nginx_workers(args.nginx_workers)
    except ValueError as e:
        return str(e)
    if args.http is not None:
        nginx = args.nginx or find_nginx()
        if nginx is None or not os.access(nginx, os.X_OK):
            return f"--http: nginx not found{f' at {args.nginx}' if args.nginx else ''} " \
                   "(apt-get install nginx)"
        bad = check_listen(args.http)
        if bad is not None:
            return f"--http {args.http}: {bad}"
        if os.geteuid() == 0:
            from ..frontdoor import nginx_worker_user, unreachable_by
            try:
                user, gid = nginx_worker_user(args.nginx_user)
            except ValueError as e:
                return f"--nginx-user {args.nginx_user or ''}: {e}".replace("  ", " ")
            bad = unreachable_by(user.split()[0], gid, run_dir)
            if bad is not None:
                return f"--run-dir {run_dir}: nginx's workers ({user.split()[0]}) cannot " \
                       f"reach the sockets under it: {bad} (--nginx-user, or chmod o+x)"
    if args.nginx_include is not None:
        parent = Path(os.path.abspath(args.nginx_include)).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"--nginx-include {args.nginx_include}: cannot create files in {parent}"
    if args.nginx_reload is not None and args.nginx_include is None:
        return "--nginx-reload needs --nginx-include"
    return None


def front_options(args: argparse.Namespace):
    from ..frontdoor import FrontDoorOptions, find_nginx

    if args.http is None and args.nginx_include is None:
        return None
    user, gid = None, None
    if args.http is not None and os.geteuid() == 0:
        from ..frontdoor import nginx_worker_user
        user, gid = nginx_worker_user(args.nginx_user)
    return FrontDoorOptions(
        run_dir=run_dir_of(args), listen=args.http,
        include=Path(os.path.abspath(args.nginx_include)) if args.nginx_include else None,
        reload_cmd=args.nginx_reload, nginx=args.nginx or find_nginx(),
        keepalive=max(0, args.nginx_keepalive), workers=nginx_workers(args.nginx_workers),
        access_log=args.http_access_log,
        log_format=args.log_format,
        settle=max(0.0, args.http_settle), settle_max=30 * max(0.0, args.http_settle),
        user=user, worker_gid=gid,
        backoff_first=args.backoff_first, backoff_max=min(30.0, args.backoff_max),
        stable_after=args.stable_after,
    )


def static_routes(vassals_dir: Path, run_dir: Path):
    """The routes `emperor run` would serve once every vassal is up: each
    file read and judged as the Emperor reads it, names claimed in name
    order (the first keeps a name); (routes, one line per refused file)."""
    from .. import config as cfgmod
    from ..frontdoor import Route, nginx_target, route_limits
    from ..sockets import wanted_address

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
        domains = sorted(set(cfg.domains()))
        taken = [d for d in domains if d in claimed]
        if taken:
            errors.append(f"{name}: domain {taken[0]} is already served by vassal {claimed[taken[0]]}")
            continue
        want = wanted_address(cfg, run_dir / "sockets")
        if not domains or want is None:
            continue
        claimed.update((d, name) for d in domains)
        routes.append(Route(name, tuple(domains), nginx_target(want[0]),
                            protocol="uwsgi" if cfg.get("socket") else "http",
                            **route_limits(cfg)))
    return routes, errors


def nginx_conf_command(args: argparse.Namespace) -> int:
    from ..frontdoor import render_routing

    vdir: Path = args.vassals_dir
    if not vdir.is_dir():
        print(f"emperor: nginx-conf: {vdir}: not a directory", file=sys.stderr)
        return 2
    routes, errors = static_routes(vdir.resolve(), run_dir_of(args))
    for e in errors:
        print(f"emperor: nginx-conf: {e}", file=sys.stderr)
    sys.stdout.write(render_routing(routes, max(0, args.keepalive)))
    return 0
