"""One vassal file, read once: `load` finds it, renders it when it is a
template, parses and (for our own vassal program) judges it."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .discovery import (TRANSIENT_ERRNOS, candidates, fingerprint, is_template,
                        read_vassal_file, vassal_name)
from .ini import ConfigError, parse_ini_lines
from .magic import as_ini
from .magic import expand as expand_magic
from .options import declared_options, judge_options, parse_domain
from .templates import TemplateFailure, render_template


@functools.cache
def _spellings(key: str) -> frozenset[str]:
    """`key` and the keys options.json declares as its other names."""
    return frozenset({key} | {k for k, o in declared_options().items() if o.alias == key})


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
    pending: bool = False  # a template still rendering (render.Renderer): no config yet
    expanded: bool = False  # uWSGI's magic variables expanded: pass `text` on the config pipe
    # what it says may change while its own file does not: a template
    # (includes, the files it reads) or an @(FILE)
    reads_other_files: bool = False

    @property
    def file_alone(self) -> bool:
        """Read well, and from its own file alone: the same bytes in the
        file mean the same config."""
        return not (self.error or self.transient or self.pending or self.rendered
                    or self.reads_other_files)

    def get(self, key: str, default: str | None = None) -> str | None:
        names = _spellings(key)  # `uwsgi-socket` is `socket`, as the vassal reads it
        for k, v in reversed(self.options):
            if k in names:
                return v
        return default

    def get_all(self, key: str) -> list[str]:
        return [v for k, v in self.options if k == key]

    def domains(self) -> list[str]:
        """The `domain` names as the front door routes them (`routed_name`)."""
        return [routed_name(d) for d in self.get_all("domain")]

    @property
    def solo(self) -> bool:
        """`master = false`: the vassal's one process serves, no worker
        forked (docs/CONTRACT.md, "master = false")."""
        value = self.get("master")
        return value is not None and value.strip().lower() in ("0", "false", "no", "off")

    @property
    def fork_server(self) -> str | None:
        return self.get("fork-server")

    def fork_server_path(self) -> Path | None:
        """The fork-server socket path, relative ones against the vassals dir."""
        return self._fork_server_path

    @functools.cached_property
    def _fork_server_path(self) -> Path | None:
        # resolved once per config read (a few lstat calls: the loop asks
        # for it every turn and every adoption)
        fs = self.fork_server
        if not fs:
            return None
        return (self.path.parent / fs).resolve() if not os.path.isabs(fs) else Path(fs)


Render = Callable[[Path, str, str], "str | None"]


def load(path: Path, judge: bool = False, render: Render | None = None,
         magic: bool | None = None) -> VassalConfig | None:
    """Read the vassal that `path` declares; None when it has no file any more.

    With `judge` (the vassal program is ours), the options are checked
    against the declaration (`judge_options`): a file the vassal would
    refuse is a config error here, with its line, rather than a vassal that
    fails the same way at every restart. A template is judged as rendered.
    `render(path, source, name)` renders a template (default: in this
    process, no deadline); when it returns None the render is under way and
    the config is `pending`. With `magic` (default: `judge`; the vassal
    program is ours), uWSGI's magic variables are expanded (config/magic.py).

    The vassal is known by name: for `app.ini` or `app.ini.j2` whichever of
    the two exists is read (so removing one of two, or replacing `app.ini`
    by `app.ini.j2`, never looks like a removal); both existing is an error.
    """
    path = Path(path)
    name = vassal_name(path.name)
    plain, template = candidates(path.parent, name)
    try:
        datas = {p: read_vassal_file(p) for p in (plain, template)}
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
    data = datas[present[0]]
    assert data is not None
    return _from_text(name, present[0], data, judge, render,
                      judge if magic is None else magic)


def _from_text(name: str, path: Path, data: bytes, judge: bool,
               render: Render | None = None, magic: bool = False) -> VassalConfig:
    """The VassalConfig of the one file `path` that holds `data`."""
    text = data.decode("utf-8", "replace")
    rendered = is_template(path.name)
    where = path.name
    # the file as it is, bytes that are not UTF-8 kept: what a vassal sent
    # its text on the config pipe gets (a Latin-1 value reaches the app as
    # it would from the file), and what tells one version from the next;
    # options are judged on the text with those bytes replaced
    sent = text if rendered else data.decode("utf-8", "surrogateescape")
    if rendered:
        try:
            out = (render or render_template)(path, text, name)
        except TemplateFailure as e:
            return VassalConfig(name, path, fingerprint(data), error=str(e), rendered=True)
        if out is None:
            return VassalConfig(name, path, fingerprint(data), rendered=True, pending=True)
        text = sent = out
        where = f"{path.name} (rendered)"
    fp = fingerprint(sent.encode("utf-8", "surrogateescape"))
    expanded = False
    try:
        entries, has_section = parse_ini_lines(text)
        raw = entries
        if magic:
            entries, expanded = expand_magic(entries, path, path.parent)
        if judge:
            judge_options(entries, has_section, base_dir=path.parent)
    except ConfigError as e:
        msg = str(e)
        m = re.match(r"line (\d+): (.*)", msg)
        error = f"{where}:{m.group(1)}: {m.group(2)}" if m else f"{where}: {msg}"
        return VassalConfig(name, path, fp, error=error, text=sent, rendered=rendered)
    options = tuple((k, v) for _, k, v in entries)
    reads_others = magic and any("@(" in v for _, _, v in raw)
    if expanded:
        # what it expands to is its content: an @(file) or $(ENV) that
        # changed is a changed vassal
        sent = as_ini(entries)
        fp = fingerprint(sent.encode("utf-8", "surrogateescape"))
    return VassalConfig(name, path, fp, options, text=sent, rendered=rendered,
                        expanded=expanded, reads_other_files=reads_others)


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

    def may_be_base(self, name: str, path: str) -> bool:
        """Whether a file may say base, before it is read as a vassal file:
        by its name, or the bytes `fork-server` (`fork_server`) anywhere in
        it. One that says base through an include does not look so."""
        if self.names:
            return name in self.names
        try:
            data = read_vassal_file(Path(path)) or b""
        except OSError:  # said when the file is read as a vassal file
            return False
        return b"fork-server" in data or b"fork_server" in data


def routed_name(domain: str) -> str:
    """A `domain` value as the front door routes it: lower-cased, an
    internationalized name in its ASCII form (`parse_domain`)."""
    try:
        return parse_domain(domain)
    except ValueError:  # a file nobody judged (another vassal program)
        return domain.lower()
