"""The option declaration both sides read (perl/ForkServer/options.json),
the checker of each option type, and the judge of a vassal file's options.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import idna

from .ini import SECTION, ConfigError


@dataclass(frozen=True)
class OptionSpec:
    """One row of perl/ForkServer/options.json."""

    key: str
    type: str
    repeat: bool = False
    default: str | None = None
    doc: str = ""
    flag: bool = False
    alias: str | None = None
    emperor: bool = False  # read by the Emperor only; the vassal ignores it
    ignored: bool = False  # uWSGI's harmless key: checked, then ignored by both sides


def options_file() -> Path:
    from .. import paths

    return paths.perl_dir() / "ForkServer" / "options.json"


_declared: dict[str, OptionSpec] | None = None
_refused: dict[str, str] = {}


def declared_options() -> dict[str, OptionSpec]:
    """key -> OptionSpec, from the declaration both sides read."""
    global _declared
    if _declared is None:
        decl = json.loads(options_file().read_text())
        fields = set(OptionSpec.__dataclass_fields__)
        _declared = {r["key"]: OptionSpec(**{k: v for k, v in r.items() if k in fields})
                     for r in decl["options"]}
        _refused.update(decl.get("refused", {}))
    return _declared


def refused_options() -> dict[str, str]:
    """uWSGI keys we do not implement -> what to use instead (options.json)."""
    declared_options()
    return dict(_refused)


def unknown_option(key: str) -> str:
    """Why `key` is refused, as ForkServer::Config::unknown_option says it."""
    advice = refused_options().get(key)
    if advice:
        return f"uWSGI's option '{key}' is not supported: {advice}"
    return f"unknown option '{key}'"


def emperor_keys() -> frozenset[str]:
    return frozenset(k for k, o in declared_options().items() if o.emperor)


# -- the checkers: the normalised value, or ValueError with the reason --------

_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")


def parse_address(value: str) -> tuple[str | None, int]:
    """`127.0.0.1:9101`, `[::1]:9101`, `:9101` -> (host or None, port), as
    ForkServer::Config::parse_address reads them."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)", value) or \
        re.fullmatch(r"([^:\[\]]*):([0-9]+)", value)
    if not m:
        raise ValueError("expected HOST:PORT, [IPV6]:PORT or :PORT")
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError("port out of range")
    return (m.group(1) or None), port


def _id_of(lookup: Callable[[str], int], missing: str) -> Callable[[str], int]:
    """The checker of a user or group: a number, or a name `lookup` knows."""
    def check(value: str) -> int:
        if re.fullmatch(r"[0-9]+", value):
            return int(value)
        try:
            return lookup(value)
        except KeyError:
            raise ValueError(missing) from None
    return check


def _matching(pattern: str, why: str, convert: Callable[[str], object] = str,
              flags: int = 0) -> Callable[[str], object]:
    """The checker of a value that must match `pattern` (from its start)."""
    def check(value: str) -> object:
        if not re.match(pattern, value, flags):
            raise ValueError(why)
        return convert(value)
    return check


def _count(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise ValueError("expected an integer >= 1")
    return int(value)


_nonempty = _matching(r".", "expected a non-empty value", flags=re.S)


def _socket_address(value: str) -> str:
    """A UNIX socket path (it has a `/`, or no `:`) or HOST:PORT, as
    ForkServer::Config reads it."""
    if not value:
        raise ValueError("expected HOST:PORT or a UNIX socket path")
    if "/" not in value and ":" in value:
        parse_address(value)
    return value


_DOMAIN = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def parse_domain(value: str) -> str:
    """`app.example.com` or `*.example.com`, lower-cased; ValueError otherwise.

    An internationalized name (`bücher.example`) is given its ASCII form
    (`xn--bcher-kva.example`): that is the Host browsers and curl send, and
    what nginx's server names compare (UTS #46 mapping, as browsers do)."""
    d = value.lower()
    if not d.isascii():
        wildcard = "*." if d.startswith("*.") else ""
        try:
            d = wildcard + idna.encode(d[len(wildcard):], uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a valid internationalized name: {e}") from None
    if not _DOMAIN.fullmatch(d) or len(d) > 253:
        raise ValueError("expected a host name (app.example.com) or a wildcard (*.example.com)")
    return d

#: the checker of each option type (ForkServer::Config has the same, in Perl)
CHECKERS: dict[str, Callable[[str], object]] = {
    "string": _nonempty,
    "path": _nonempty,
    "include": _nonempty,
    "url-path": _matching(r"/[^\s#]*\Z", "expected a path starting with / (a query string may follow)"),
    "octal": _matching(r"0?[0-7]{3,4}\Z", "expected an octal mode like 0600", lambda v: int(v, 8)),
    "user": _id_of(lambda v: pwd.getpwnam(v).pw_uid, "no such user"),
    "group": _id_of(lambda v: grp.getgrnam(v).gr_gid, "no such group"),
    "count": _count,
    "uint": _matching(r"[0-9]+\Z", "expected a non-negative integer", int),
    "bool": parse_bool,
    "address": parse_address,
    "env": _matching(r"[^=]+=", "expected KEY=VALUE", flags=re.S),
    "socket-address": _socket_address,
    "domain": parse_domain,
}


def parse_owner(value: str) -> tuple[int, int | None]:
    """`USER` or `USER:GROUP` (names or numbers) -> (uid, gid or None)."""
    user, sep, group = value.partition(":")
    return CHECKERS["user"](user), (CHECKERS["group"](group) if sep else None)  # type: ignore[return-value]


CHECKERS["owner"] = parse_owner


# -- the judge ----------------------------------------------------------------


@dataclass
class _Judge:
    euid: int
    groups: frozenset[int]
    values: dict[str, tuple[int, object]]

    def option(self, lineno: int, key: str, value: str) -> None:
        """Judge one `key = value` on line `lineno`."""
        spec = declared_options().get(key)
        if spec is None:
            raise ConfigError(f"line {lineno}: {unknown_option(key)}")
        try:
            norm = CHECKERS[spec.type](value)
        except ValueError as e:
            raise ConfigError(f"line {lineno}: bad value '{value}' for option '{key}': {e}") from None
        name = spec.alias or key
        if not spec.repeat and name in self.values:
            raise ConfigError(f"line {lineno}: '{key}' given again (first on line "
                              f"{self.values[name][0]}); it takes one value")
        self.values[name] = (lineno, norm)
        self.can_become(lineno, key, value, spec, norm)

    def can_become(self, lineno: int, key: str, value: str, spec: OptionSpec, norm: object) -> None:
        """Only root switches to another user or to a group it is not in."""
        if self.euid == 0:
            return
        if spec.type == "user" and not spec.repeat and norm != self.euid:
            raise ConfigError(f"line {lineno}: {key} = {value}: the Emperor runs as uid {self.euid} "
                              "and cannot switch to another user")
        if spec.type == "group" and norm not in self.groups:
            raise ConfigError(f"line {lineno}: {key} = {value}: the Emperor (uid {self.euid}) "
                              "is not in that group")

    def together(self, base_dir: Path | None) -> None:
        """What options say together."""
        fs = self.values.get("fork-server")
        if fs is not None and base_dir is not None and "chdir" not in self.values:
            sock_dir = (Path(base_dir) / str(fs[1])).parent
            if not sock_dir.is_dir():
                raise ConfigError(f"line {fs[0]}: fork-server {fs[1]}: directory {sock_dir} "
                                  "does not exist")
        if "socket" in self.values and "http-socket" in self.values:
            raise ConfigError(f"line {self.values['socket'][0]}: socket and http-socket: a "
                              "vassal serves one of them (uwsgi or HTTP)")
        master = self.values.get("master")
        if master is not None and not master[1]:
            processes = self.values.get("processes")
            if processes is not None and processes[1] > 1:
                raise ConfigError(f"line {processes[0]}: processes = {processes[1]} with master = false "
                                  f"(line {master[0]}): without a master the vassal is one process")
            if fs is not None:
                raise ConfigError(f"line {master[0]}: master = false in a base vassal: set it in the "
                                  "files of the vassals that should serve without a master")
        nproc = self.values.get("limit-nproc")
        if nproc is not None and nproc[1] and "uid" not in self.values and "ini" not in self.values:
            # it would be left unset without a word: the kernel does not
            # hold the Emperor's user (root) to it, and the drop that sets
            # it happens only with uid (which an included file may give)
            raise ConfigError(f"line {nproc[0]}: limit-nproc = {nproc[1]} without uid: it holds the "
                              "processes of the user a vassal drops to (set uid, or limit-nproc = 0)")
        idle = self.values.get("idle")
        on_demand = self.values.get("on-demand")
        if idle is not None and idle[1] and not (on_demand is not None and on_demand[1]):
            raise ConfigError(f"line {idle[0]}: idle without on-demand = true "
                              "(only an on-demand vassal stops when idle)")


def judge_options(entries: list[tuple[int, str, str]], has_section: bool,
                  euid: int | None = None, groups: Iterable[int] | None = None,
                  base_dir: Path | None = None) -> None:
    """Raise ConfigError(`line N: why`) for the first option the vassal
    program would refuse, or the Emperor could not honour (another user's
    uid without root, `idle` without `on-demand`, a fork-server socket in a
    directory that does not exist). `euid` and `groups` stand for the
    Emperor's own (tests judge as another user); relative paths resolve
    against `base_dir` (the vassals directory, the vassal's working one)."""
    if not has_section:
        raise ConfigError(f"no [{SECTION}] section")
    judge = _Judge(
        euid=os.geteuid() if euid is None else euid,
        groups=frozenset(os.getgroups() + [os.getegid()] if groups is None else groups),
        values={},
    )
    for lineno, key, value in entries:
        judge.option(lineno, key, value)
    judge.together(base_dir)
