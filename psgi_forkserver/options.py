"""The Emperor's options, each declared once: its default, its flags, its description.

`Options` is what `Emperor` runs with; `cli.build_parser` builds
`emperor run`'s options from the same fields (`run_arguments`), the
vassals' `Policy` takes its defaults from here (`DEFAULTS`), and the
docs/options.md's option table is `readme_table()` (a test compares them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import paths

if TYPE_CHECKING:
    from .logs import Log


def option(default: Any, help: str, *flags: str, metavar: str | None = None,
           action: Any = None, choices: tuple[str, ...] | None = None) -> Any:
    """A field of Options that `emperor run` takes as `flags` (the first
    one is shown; default: --NAME-WITH-DASHES)."""
    meta = {"help": help, "flags": flags, "metavar": metavar, "action": action,
            "choices": choices}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Options:
    vassals_dir: Path
    # cli: None is the installed ForkServer.pm (paths.vassal_program)
    program: str = option(dataclasses.MISSING, "the vassal program (default: the installed "
                          "ForkServer.pm)", "--vassal-binary", "--emperor-wrapper",
                          metavar="PATH")
    use_fork_server: Path | None = option(
        None, "adopt vassals through this fork-server socket",
        "--use-fork-server", "--emperor-use-fork-server", metavar="SOCK")
    fork_bases: tuple[str, ...] = option(
        (), "this vassal file is a base (repeatable); default: files with a fork-server key",
        "--vassal-fork-base", metavar="NAME", action="append")
    # None: the Emperor's own PLACK_ENV, else deployment (plack_env_of)
    plack_env: str | None = option(
        None, "PLACK_ENV of every vassal without a plack-env key (default: the Emperor's own "
        "PLACK_ENV, else deployment, as Plack servers do)", metavar="NAME")
    mercy: float = option(30.0, "graceful stop time before SIGKILL", metavar="SECONDS")
    adopt_timeout: float = option(10.0, "wait this long for a fork server's reply",
                                  metavar="SECONDS")
    # config/render.py: a template still rendering after this long is killed
    template_timeout: float = option(5.0, "a vassal template still rendering after this long "
                                     "is stopped: config-error", metavar="SECONDS")
    rescan_interval: float = option(10.0, "full rescan of the directory, besides inotify: a file "
                                    "whose status is unchanged since it was read is not read again "
                                    "(templates, `@(FILE)` and files in error are); `SIGHUP` reads "
                                    "every file", metavar="SECONDS")
    backoff_first: float = option(1.0, "crash loop: first restart delay, doubling",
                                  metavar="SECONDS")
    backoff_max: float = option(180.0, "crash loop: longest restart delay", metavar="SECONDS")
    stable_after: float = option(10.0, "a vassal that lived this long did not crash-loop",
                                 metavar="SECONDS")
    reload_grace: float = option(
        1.0, "a new vassal that never sends byte 17 replaces the old one this long after "
        "byte 1/5", metavar="SECONDS")
    deploy_parallel: int = option(
        4, "code deploy: vassals moved to the new base at a time", metavar="N")
    adopt_parallel: int = option(
        8, "adoption requests in flight at once; the others queue", metavar="N")
    # None: only when the vassal program is ours (a uWSGI 2.0 vassal binds its own)
    own_sockets: bool | None = option(
        None, "bind each vassal's http-socket in the Emperor and pass it "
        "(default: only with the built-in vassal program)",
        "--emperor-sockets", action=argparse.BooleanOptionalAction)
    pidfile: Path | None = option(
        None, "write the Emperor's pid here (for `emperor reload-base`)", metavar="PATH")
    log_format: str = option(
        "text", "text: TIME emperor: [VASSAL] message; json: one object a line "
        "(time, level, vassal, pid, event, message)", choices=("text", "json"))
    logto: Path | None = option(
        None, "the Emperor's log to this file (default stderr); reopened by "
        "`emperor reopen-logs`", metavar="PATH")
    status_http_hosts: tuple[str, ...] = option(
        (), "the status page also answers to this Host name (repeatable); besides them only "
        "its address's own (and localhost's, on loopback): others get 421",
        "--status-http-host", metavar="NAME", action="append")
    status_http_token_file: Path | None = option(
        None, "the status page asks for the token in this file (mode 0600) on every path but "
        "/healthz: `curl -u :TOKEN`, or `Authorization: Bearer TOKEN`", metavar="PATH")
    log: Log | None = None  # where lines go (built from log_format and logto); default stderr
    # sockets of vassals with `domain` and no http-socket (run_dir/sockets),
    # the embedded nginx's files (run_dir/nginx)
    run_dir: Path | None = None
    # the subsystems' own options, made by the cli; not imported here, which
    # every subsystem imports: frontdoor.FrontDoorOptions, status.StatusServer
    front: Any = None  # cli --http / --nginx-include
    status: Any = None  # sockets bound (cli --stats/--status-http)

    @property
    def program_is_ours(self) -> bool:
        """The vassal program is ForkServer.pm (not a uWSGI 2.0 vassal)."""
        return os.path.basename(self.program) == "ForkServer.pm"

    def bound(self, status: Any) -> None:
        """The status sockets, bound once the Emperor holds its locks (so
        that a second Emperor never touches the first one's)."""
        self.status = status

    @classmethod
    def from_args(cls, args: argparse.Namespace, **made: Any) -> Options:
        """`emperor run`'s parsed options, with paths made absolute; `made`:
        the fields the cli makes itself (`log`, `run_dir`, `front`)."""
        opts = cls(args.vassals_dir, **{f.name: getattr(args, f.name) for f in run_options()},
                   **made)
        # not resolved: a symlink flipped to a new directory is followed
        opts.vassals_dir = opts.vassals_dir.absolute()
        program = opts.program or str(paths.vassal_program())
        opts.program = os.path.abspath(program) if os.sep in program else program
        if opts.use_fork_server is not None:
            opts.use_fork_server = opts.use_fork_server.resolve()
        opts.fork_bases = tuple(opts.fork_bases)
        opts.status_http_hosts = tuple(opts.status_http_hosts)
        opts.deploy_parallel = max(1, opts.deploy_parallel)
        opts.adopt_parallel = max(1, opts.adopt_parallel)
        if opts.pidfile is not None:
            opts.pidfile = opts.pidfile.resolve()
        if opts.logto is not None:
            opts.logto = opts.logto.absolute()
        return opts


def plack_env_of(opts: Any) -> str:
    """The PLACK_ENV vassals without a plack-env key get: --plack-env, else
    the Emperor's own PLACK_ENV, else deployment."""
    return getattr(opts, "plack_env", None) or os.environ.get("PLACK_ENV") or "deployment"


DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Options)
                            if f.default is not dataclasses.MISSING}


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + f.name.replace("_", "-"),)


def _shown_default(f: dataclasses.Field) -> str | None:
    if f.default in (None, (), dataclasses.MISSING):
        return None
    return f.default if isinstance(f.default, str) else f"{f.default:g}"


def _help(f: dataclasses.Field) -> str:
    if _shown_default(f) is None or "default" in f.metadata["help"]:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default {_shown_default(f)})"


def run_options() -> list[dataclasses.Field]:
    """The fields `emperor run` takes as options, in declaration order."""
    return [f for f in dataclasses.fields(Options) if "help" in f.metadata]


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of Options to `emperor run`'s parser."""
    for f in run_options():
        kw: dict[str, Any] = {"dest": f.name, "help": _help(f)}
        action = f.metadata["action"]
        if action is not None:
            kw["action"] = action
        if action == "append":
            kw["default"] = []
        else:
            kw["default"] = None if f.default is dataclasses.MISSING else f.default
        if f.metadata["metavar"]:
            kw["metavar"] = f.metadata["metavar"]
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
        if action is None:
            kw["type"] = {"float": float, "int": int, "str": str, "str | None": str}.get(str(f.type), Path)
        parser.add_argument(*_flags(f), **kw)


def readme_table() -> str:
    """`emperor run`'s options as docs/options.md shows them."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in run_options():
        flag = _flags(f)[0]
        if f.metadata["action"] is argparse.BooleanOptionalAction:
            flag = f"{flag}, --no-{flag[2:]}"
        elif f.metadata["metavar"]:
            flag = f"{flag} {f.metadata['metavar']}"
        elif f.metadata["choices"]:
            flag = f"{flag} {{{','.join(f.metadata['choices'])}}}"  # no '|' in a table
        default = f"`{_shown_default(f)}`" if _shown_default(f) is not None else ""
        rows.append(f"| `{flag}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
