"""uWSGI's magic variables in a vassal file's values, expanded as uWSGI 2.0
expands them when an Emperor starts it with `--ini /abs/path/NAME.ini`.

Expanded (the file is FILE, its absolute path without resolving symbolic
links, as uWSGI takes it):

    %n %N  FILE's name without its extension     %s %S  FILE's name
    %e %E  its extension                         %p %P  its absolute path
    %d %D  its directory, with a trailing /      %c %C  that directory's name
    %v     the vassals directory (the vassal's working directory)
    %x %X  the section named on the command line: none under an Emperor, ""
    %%     a literal %
    %(key) the value of `key` set earlier in the file (left as is when none)
    $(ENV) the environment variable ENV (left as is when unset)
    @(PATH) the content of the file PATH (relative: to the vassals
           directory), without its trailing newline

Every other %X (the hostname, the time, uid and gid, path components...)
and @(exec://...) and the like are refused by name with the file's line:
they mean nothing stable here, or would run or fetch something while the
Emperor reads its files. A value ending in a lone % is refused too (uWSGI
joins it with the next line). Files included with `ini = ...` are read by
the vassal itself, unexpanded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from .ini import ConfigError

_TOKEN = re.compile(r"%\((?P<key>[^)]*)\)|\$\((?P<env>[^)]*)\)|@\((?P<file>[^)]*)\)|%(?P<letter>.?)")

#: uWSGI's other magic variables: refused by name
_REFUSED = {
    "o": "the config file as given", "O": "the config file as given", "h": "the hostname",
    "t": "the start time", "T": "the start time", "i": "the file's inode", "I": "the file's inode",
    "k": "the CPU cores", "u": "the uid", "U": "the user name", "g": "the gid", "G": "the group",
    "j": "a hash of the file's path", "J": "a hash of the file's path", "V": "uWSGI's version",
    "[": "an ANSI escape", **{str(i): "a component of the file's directory" for i in range(10)},
}
#: @(...) schemes uWSGI reads other than plain files
_SCHEMES = re.compile(r"^[a-z0-9+.-]+://", re.I)
MAX_INCLUDED = 65536


def _file_vars(path: Path, vassals_dir: Path) -> dict[str, str]:
    p = os.path.abspath(path)
    d = os.path.dirname(p)
    s = os.path.basename(p)
    stem, dot, ext = s.rpartition(".")
    n = stem if dot else s
    e = ext if dot else ""
    return {"n": n, "N": n, "s": s, "S": s, "e": e, "E": e, "p": p, "P": p,
            "d": d.rstrip("/") + "/", "D": d.rstrip("/") + "/",
            "c": os.path.basename(d), "C": os.path.basename(d),
            "v": str(vassals_dir), "x": "", "X": ""}


def _read_included(spec: str, vassals_dir: Path, lineno: int) -> str:
    if _SCHEMES.match(spec):
        raise ConfigError(f"line {lineno}: uWSGI's @({spec}) is not supported here "
                          "(only @(FILE): a file's content)")
    target = Path(spec) if os.path.isabs(spec) else vassals_dir / spec
    try:
        with open(target, "rb") as f:
            data = f.read(MAX_INCLUDED + 1)
    except OSError as e:
        raise ConfigError(f"line {lineno}: @({spec}): {e.strerror or e}") from None
    if len(data) > MAX_INCLUDED:
        raise ConfigError(f"line {lineno}: @({spec}): larger than {MAX_INCLUDED} bytes")
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text:
        raise ConfigError(f"line {lineno}: @({spec}): more than one line, not a value")
    return text


def expand_value(value: str, lineno: int, fvars: Mapping[str, str], earlier: Mapping[str, str],
                 environ: Mapping[str, str], vassals_dir: Path) -> str:
    """One value with its magic variables expanded (one pass, left to right)."""
    def one(m: re.Match[str]) -> str:
        if m.group("key") is not None:
            key = m.group("key")
            return earlier[key] if key in earlier else m.group(0)
        if m.group("env") is not None:
            return environ.get(m.group("env"), m.group(0))
        if m.group("file") is not None:
            return _read_included(m.group("file"), vassals_dir, lineno)
        letter = m.group("letter")
        if letter == "%":
            return "%"
        if letter in fvars:
            return fvars[letter]
        if letter == "":
            raise ConfigError(f"line {lineno}: a lone % ends the value (write %% for a %)")
        what = _REFUSED.get(letter)
        if what is not None:
            raise ConfigError(f"line {lineno}: uWSGI's magic variable %{letter} ({what}) "
                              "is not supported here")
        raise ConfigError(f"line {lineno}: %{letter} is not a magic variable "
                          "(write %% for a %)")
    return _TOKEN.sub(one, value)


def expand(entries: list[tuple[int, str, str]], path: Path, vassals_dir: Path,
           environ: Mapping[str, str] | None = None) -> tuple[list[tuple[int, str, str]], bool]:
    """(the entries with their values expanded, whether any value changed).
    ConfigError("line N: ...") names the first variable that cannot be."""
    env = os.environ if environ is None else environ
    fvars = _file_vars(path, vassals_dir)
    earlier: dict[str, str] = {}
    out: list[tuple[int, str, str]] = []
    changed = False
    for lineno, key, value in entries:
        new = expand_value(value, lineno, fvars, earlier, env, vassals_dir) \
            if ("%" in value or "$(" in value or "@(" in value) else value
        changed = changed or new != value
        earlier[key] = new
        out.append((lineno, key, new))
    return out, changed


def as_ini(entries: list[tuple[int, str, str]]) -> str:
    """The [uwsgi] section holding these entries (what the vassal is sent)."""
    return "[uwsgi]\n" + "".join(f"{k} = {v}\n" for _, k, v in entries)
