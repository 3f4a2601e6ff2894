"""The [uwsgi] INI reader, as uWSGI reads a vassal file."""

from __future__ import annotations

SECTION = "uwsgi"


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
    if text.startswith("\ufeff"):
        # neither uWSGI nor our vassal program skip it: the section header
        # behind it is not one, and "no [uwsgi] section" would puzzle
        raise ConfigError("line 1: starts with a byte order mark (U+FEFF): save it without one")
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
