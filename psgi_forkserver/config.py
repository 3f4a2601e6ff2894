"""Vassal files: discovery, the [uwsgi] INI reader, base detection, fingerprints."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SUFFIX = ".ini"
SECTION = "uwsgi"


def is_vassal_file(name: str) -> bool:
    """`*.ini`, not a dotfile, not an editor's backup or swap file."""
    return (
        name.endswith(SUFFIX)
        and not name.startswith(".")
        and not name.endswith("~")
        and not name.endswith(".swp")
        and len(name) > len(SUFFIX)
    )


def vassal_name(filename: str) -> str:
    return filename[: -len(SUFFIX)] if filename.endswith(SUFFIX) else filename


def discover(directory: Path) -> dict[str, Path]:
    """Vassal name -> file path, for every vassal file in `directory`."""
    found: dict[str, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        if is_vassal_file(entry.name):
            try:
                if not entry.is_file():  # follows symlinks
                    continue
            except OSError:
                continue
            found[vassal_name(entry.name)] = Path(directory) / entry.name
    return found


class ConfigError(ValueError):
    pass


def parse_ini(text: str, section: str = SECTION) -> list[tuple[str, str]]:
    """The `key = value` pairs of `[section]`, in order, repeated keys kept.

    `;` and `#` start comment lines; a line without `=` is a flag (value
    "true"), as uWSGI reads it. Several [section] blocks are concatenated.
    """
    pairs: list[tuple[str, str]] = []
    current: str | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"line {lineno}: unterminated section header")
            current = line[1:-1].strip()
            continue
        if current != section:
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"line {lineno}: empty key")
        pairs.append((key, value.strip() if sep else "true"))
    return pairs


@dataclass(frozen=True)
class VassalConfig:
    """What a vassal file says, read once."""

    name: str
    path: Path
    fingerprint: str
    options: tuple[tuple[str, str], ...] = ()
    error: str | None = None  # unreadable / malformed: the vassal will not start

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


def load(path: Path) -> VassalConfig | None:
    """Read a vassal file; None when it vanished in the meantime."""
    name = vassal_name(path.name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return VassalConfig(name, path, fingerprint(b""), error=f"unreadable: {e.strerror}")
    fp = fingerprint(data)
    try:
        options = parse_ini(data.decode("utf-8", "replace"))
    except ConfigError as e:
        return VassalConfig(name, path, fp, error=str(e))
    return VassalConfig(name, path, fp, tuple(options))


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
