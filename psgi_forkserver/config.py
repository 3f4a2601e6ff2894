"""Vassal files: discovery, the [uwsgi] INI reader, Jinja2 templates, base
detection, fingerprints.

A vassal is `NAME.ini`, or `NAME.ini.j2`: a Jinja2 template rendered before
use (see `render_template`). Both for one NAME is an error of that vassal.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SUFFIX = ".ini"
TEMPLATE_SUFFIX = ".ini.j2"
SECTION = "uwsgi"

# vim: .swp/.swo/.swx..., its write test file 4913 (and 4914, ...); emacs:
# backups~, #autosave#, .#lock; generic backup/temp suffixes.
_DROPPING = re.compile(
    r"""(
        .*~            |   # backups
        .*\.sw[a-z]    |   # vim swap files (.swp, .swo, .swx, ...)
        \d+            |   # vim's write test file (4913, 4914, ...)
        \#.*\#         |   # emacs autosave
        \.\#.*         |   # emacs lock symlink
        .*\.(bak|orig|rej|tmp|dpkg-[a-z]+|ucf-[a-z]+)
    )$""",
    re.X,
)


def is_dropping(name: str) -> bool:
    """An editor's or package manager's temporary file: never a vassal, and
    an event on it is not worth a rescan."""
    return bool(_DROPPING.fullmatch(name))


def is_vassal_file(name: str) -> bool:
    """`*.ini` or `*.ini.j2`, not a dotfile, not an editor's backup or swap file."""
    if name.startswith(".") or is_dropping(name):
        return False
    for suffix in (SUFFIX, TEMPLATE_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return True
    return False


def is_template(filename: str) -> bool:
    return filename.endswith(TEMPLATE_SUFFIX)


def vassal_name(filename: str) -> str:
    """`app.ini` and `app.ini.j2` are both the vassal `app`."""
    for suffix in (TEMPLATE_SUFFIX, SUFFIX):
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return filename


def candidates(directory: Path, name: str) -> tuple[Path, Path]:
    """The two files that may declare vassal `name`."""
    return Path(directory) / (name + SUFFIX), Path(directory) / (name + TEMPLATE_SUFFIX)


def discover(directory: Path) -> dict[str, Path]:
    """Vassal name -> file path, for every vassal file in `directory`.

    When both NAME.ini and NAME.ini.j2 exist, NAME.ini is returned; `load`
    sees the other one and reports the conflict.
    """
    found: dict[str, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in sorted(entries, key=lambda e: is_template(e.name)):
        if is_vassal_file(entry.name):
            # anything named like a vassal file counts, even a directory or
            # a dangling symlink: load() reports it as that vassal's error
            # instead of the file being ignored without a word
            found.setdefault(vassal_name(entry.name), Path(directory) / entry.name)
    return found


class ConfigError(ValueError):
    pass


def parse_ini_lines(text: str, section: str = SECTION) -> tuple[list[tuple[int, str, str]], bool]:
    """(`(line, key, value)` of `[section]` in order, whether the section is there).

    `;` and `#` start comment lines; a line without `=` is a flag (value
    "true"), as uWSGI reads it. Several [section] blocks are concatenated.
    """
    entries: list[tuple[int, str, str]] = []
    current: str | None = None
    seen = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"line {lineno}: unterminated section header")
            current = line[1:-1].strip()
            seen = seen or current == section
            continue
        if current != section:
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"line {lineno}: empty key")
        entries.append((lineno, key, value.strip() if sep else "true"))
    return entries, seen


def parse_ini(text: str, section: str = SECTION) -> list[tuple[str, str]]:
    """The `key = value` pairs of `[section]`, in order, repeated keys kept."""
    return [(k, v) for _, k, v in parse_ini_lines(text, section)[0]]


@dataclass(frozen=True)
class VassalConfig:
    """What a vassal file says, read once."""

    name: str
    path: Path
    fingerprint: str
    options: tuple[tuple[str, str], ...] = ()
    error: str | None = None  # unreadable / malformed: the vassal will not start
    text: str = ""  # what the vassal must see: the rendered template, or the file
    rendered: bool = False  # a template: pass `text` on the config pipe
    transient: bool = False  # error: out of descriptors or memory; read it again later

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in reversed(self.options):
            if k == key:
                return v
        return default

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.options if k == key]

    @property
    def fork_server(self) -> str | None:
        return self.get("fork-server")

    def fork_server_path(self) -> Path | None:
        """The fork-server socket path, relative ones against the vassals dir."""
        fs = self.fork_server
        if not fs:
            return None
        return (self.path.parent / fs).resolve() if not os.path.isabs(fs) else Path(fs)


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: a vassal file larger than this is refused (a vassal file is a few lines;
#: a huge one would only eat the Emperor's memory)
MAX_FILE = 1 << 20

#: errors that say nothing about the file, only about the Emperor's resources
#: at that moment: the file is read again later, its vassal is left alone
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})


class Unreadable(OSError):
    """A vassal file that exists but cannot be used as one (str(): why)."""


def _read(path: Path) -> bytes | None:
    """The file's bytes; None when there is no such file.

    Opened with O_NONBLOCK, then only a regular file is read: a FIFO named
    `x.ini` must not block the Emperor, `/dev/zero` must not fill its memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise Unreadable(errno.ENOENT, f"dangling symlink to {os.readlink(path)}") from None
        return None
    except IsADirectoryError:
        raise Unreadable(errno.EISDIR, "a directory, not a file") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Unreadable(errno.EISDIR, "a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_FILE:
            raise Unreadable(errno.EFBIG, f"{st.st_size} bytes: larger than {MAX_FILE}")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_FILE:
                raise Unreadable(errno.EFBIG, f"larger than {MAX_FILE} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load(path: Path, judge: bool = False) -> VassalConfig | None:
    """Read the vassal that `path` declares; None when it has no file any more.

    With `judge` (the vassal program is ours), the options are checked
    against the declaration (`judge_options`): a file the vassal would
    refuse is a config error here, with its line, rather than a vassal that
    fails the same way at every restart. A template is judged as rendered.

    The vassal is known by name: for `app.ini` or `app.ini.j2` whichever of
    the two exists is read (so removing one of two, or replacing `app.ini`
    by `app.ini.j2`, never looks like a removal); both existing is an error.
    """
    path = Path(path)
    name = vassal_name(path.name)
    plain, template = candidates(path.parent, name)
    try:
        datas = {p: _read(p) for p in (plain, template)}
    except OSError as e:
        why = e.strerror or str(e)
        return VassalConfig(
            name, path, fingerprint(f"unreadable: {why}".encode()),
            error=f"{path.name}: unreadable: {why}",
            transient=e.errno in TRANSIENT_ERRNOS,
        )
    present = [p for p, d in datas.items() if d is not None]
    if not present:
        return None
    if len(present) == 2:
        fp = fingerprint(b"\0".join(datas[p] for p in present))  # type: ignore[misc]
        return VassalConfig(
            name, path, fp,
            error=f"both {plain.name} and {template.name} exist: remove one",
        )
    path = present[0]
    data = datas[path]
    assert data is not None
    text = data.decode("utf-8", "replace")
    rendered = is_template(path.name)
    where = path.name
    if rendered:
        try:
            text = render_template(path, text, name)
        except TemplateFailure as e:
            return VassalConfig(name, path, fingerprint(data), error=str(e), rendered=True)
        where = f"{path.name} (rendered)"
    fp = fingerprint(text.encode("utf-8", "surrogateescape"))
    try:
        entries, has_section = parse_ini_lines(text)
        if judge:
            judge_options(entries, has_section, base_dir=path.parent)
    except ConfigError as e:
        msg = str(e)
        m = re.match(r"line (\d+): (.*)", msg)
        error = f"{where}:{m.group(1)}: {m.group(2)}" if m else f"{where}: {msg}"
        return VassalConfig(name, path, fp, error=error, text=text, rendered=rendered)
    options = tuple((k, v) for _, k, v in entries)
    return VassalConfig(name, path, fp, options, text=text, rendered=rendered)


# -- the option declaration, shared with the vassal --------------------------


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
    from . import paths

    return paths.perl_dir() / "ForkServer" / "options.json"


_declared: dict[str, OptionSpec] | None = None
_refused: dict[str, str] = {}


def declared_options() -> dict[str, OptionSpec]:
    """key -> OptionSpec, from the declaration both sides read."""
    global _declared
    if _declared is None:
        import json

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
    """`app.example.com` or `*.example.com`, lower-cased; ValueError otherwise."""
    d = value.lower()
    if not _DOMAIN.fullmatch(d) or len(d) > 253:
        raise ValueError("expected a host name (app.example.com) or a wildcard (*.example.com)")
    return d


def _user(value: str) -> int:
    import pwd

    if re.fullmatch(r"[0-9]+", value):
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError("no such user") from None


def _group(value: str) -> int:
    import grp

    if re.fullmatch(r"[0-9]+", value):
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError("no such group") from None


def parse_owner(value: str) -> tuple[int, int | None]:
    """`USER` or `USER:GROUP` (names or numbers) -> (uid, gid or None)."""
    user, sep, group = value.partition(":")
    return _user(user), (_group(group) if sep else None)


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def _count(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise ValueError("expected an integer >= 1")
    return int(value)


def _uint(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError("expected a non-negative integer")
    return int(value)


def _octal(value: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3,4}", value):
        raise ValueError("expected an octal mode like 0600")
    return int(value, 8)


def _url_path(value: str) -> str:
    if not re.fullmatch(r"/[^\s#]*", value):
        raise ValueError("expected a path starting with / (a query string may follow)")
    return value


def _env(value: str) -> str:
    if not re.match(r"[^=]+=", value, re.S):
        raise ValueError("expected KEY=VALUE")
    return value


#: the checker of each option type (ForkServer::Config has the same, in Perl):
#: the normalised value, or ValueError with the reason
CHECKERS: dict[str, Callable[[str], object]] = {
    "string": _nonempty,
    "path": _nonempty,
    "include": _nonempty,
    "url-path": _url_path,
    "octal": _octal,
    "user": _user,
    "group": _group,
    "count": _count,
    "uint": _uint,
    "bool": parse_bool,
    "address": parse_address,
    "socket-address": _socket_address,
    "domain": parse_domain,
    "owner": parse_owner,
    "env": _env,
}


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
    table = declared_options()
    euid = os.geteuid() if euid is None else euid
    values: dict[str, tuple[int, object]] = {}
    for lineno, key, value in entries:
        spec = table.get(key)
        if spec is None:
            raise ConfigError(f"line {lineno}: {unknown_option(key)}")
        try:
            norm = CHECKERS[spec.type](value)
        except ValueError as e:
            raise ConfigError(f"line {lineno}: bad value '{value}' for option '{key}': {e}") from None
        name = spec.alias or key
        if not spec.repeat and name in values:
            raise ConfigError(f"line {lineno}: '{key}' given again (first on line "
                              f"{values[name][0]}); it takes one value")
        values[name] = (lineno, norm)
        if euid != 0 and spec.type == "user" and not spec.repeat and norm != euid:
            raise ConfigError(f"line {lineno}: {key} = {value}: the Emperor runs as uid {euid} "
                              "and cannot switch to another user")
        if euid != 0 and spec.type == "group" and norm not in set(
                os.getgroups() + [os.getegid()] if groups is None else groups):
            raise ConfigError(f"line {lineno}: {key} = {value}: the Emperor (uid {euid}) "
                              "is not in that group")
    fs = values.get("fork-server")
    if fs is not None and base_dir is not None and "chdir" not in values:
        sock_dir = (Path(base_dir) / str(fs[1])).parent
        if not sock_dir.is_dir():
            raise ConfigError(f"line {fs[0]}: fork-server {fs[1]}: directory {sock_dir} "
                              "does not exist")
    if "socket" in values and "http-socket" in values:
        raise ConfigError(f"line {values['socket'][0]}: socket and http-socket: a vassal "
                          "serves one of them (uwsgi or HTTP)")
    idle = values.get("idle")
    on_demand = values.get("on-demand")
    if idle is not None and idle[1] and not (on_demand is not None and on_demand[1]):
        raise ConfigError(f"line {idle[0]}: idle without on-demand = true "
                          "(only an on-demand vassal stops when idle)")


# -- templates ----------------------------------------------------------------


class TemplateFailure(Exception):
    """A template that does not render; str() is `FILE:LINE: message`."""


_envs: dict[Path, object] = {}
_compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
_COMPILED_MAX = 1024


def _environment(directory: Path):
    import jinja2

    env = _envs.get(directory)
    if env is None:
        env = jinja2.Environment(
            loader=_FreshLoader(str(directory)),  # {% include "common.j2" %}
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        _envs[directory] = env
    return env


def _fresh_loader_class():
    import jinja2

    class FreshLoader(jinja2.FileSystemLoader):
        """Included files are read again at every rendering: jinja2's own
        check compares mtimes, which two quick writes may leave equal."""

        def get_source(self, environment, template):
            source, filename, _ = super().get_source(environment, template)
            return source, filename, lambda: False

    return FreshLoader


def _FreshLoader(directory: str):  # noqa: N802 - a class, built lazily
    global _fresh_cls
    if _fresh_cls is None:
        _fresh_cls = _fresh_loader_class()
    return _fresh_cls(directory)


_fresh_cls = None


def template_context(path: Path, name: str) -> dict[str, object]:
    return {
        "name": name,
        "env": dict(os.environ),
        "vassals_dir": str(path.parent),
        "file": str(path),
    }


def render_template(path: Path, source: str, name: str) -> str:
    """Render a vassal template. Compiled templates are cached by content,
    so a rescan of hundreds of templates only renders them."""
    import jinja2

    filename = str(path)
    env = _environment(path.parent)
    key = (filename, hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest())
    tmpl = _compiled.get(key)
    try:
        if tmpl is None:
            code = env.compile(source, name=path.name, filename=filename)
            tmpl = env.template_class.from_code(env, code, env.make_globals(None))
            _compiled[key] = tmpl
            while len(_compiled) > _COMPILED_MAX:
                _compiled.popitem(last=False)
        else:
            _compiled.move_to_end(key)
        return tmpl.render(template_context(path, name))  # type: ignore[attr-defined]
    except jinja2.TemplateSyntaxError as e:
        where = os.path.basename(e.filename) if e.filename else path.name
        raise TemplateFailure(f"{where}:{e.lineno}: {_one_line(e.message or str(e))}") from None
    except Exception as e:  # noqa: BLE001 - undefined names, errors in filters, ...
        line = _template_line(e, filename)
        msg = _one_line(str(e) or type(e).__name__)
        if not isinstance(e, jinja2.TemplateError):
            msg = f"{type(e).__name__}: {msg}"
        raise TemplateFailure(f"{path.name}:{line if line else '?'}: {msg}") from None


def _template_line(exc: BaseException, filename: str) -> int | None:
    """The template line where `exc` was raised (jinja2 rewrites tracebacks
    so that template frames carry the template's file name and line)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


@dataclass
class BaseSelector:
    """Which vassals are bases: explicit names, else files with `fork-server`."""

    names: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "BaseSelector":
        return cls(frozenset(vassal_name(os.path.basename(n)) for n in names))

    def is_base(self, cfg: VassalConfig) -> bool:
        if self.names:
            return cfg.name in self.names
        return bool(cfg.fork_server)
