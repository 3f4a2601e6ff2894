"""Vassal templates: `NAME.ini.j2`, rendered by Jinja2 before use.

jinja2 is imported on first use: an Emperor without templates never pays
for it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from pathlib import Path


class TemplateFailure(Exception):
    """A template that does not render; str() is `FILE:LINE: message`."""


_envs: dict[Path, object] = {}
_compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
_COMPILED_MAX = 1024


@functools.cache
def _fresh_loader_class():
    import jinja2

    class FreshLoader(jinja2.FileSystemLoader):
        """Included files are read again at every rendering: jinja2's own
        check compares mtimes, which two quick writes may leave equal."""

        def get_source(self, environment, template):
            source, filename, _ = super().get_source(environment, template)
            return source, filename, lambda: False

    return FreshLoader


def _environment(directory: Path):
    import jinja2

    env = _envs.get(directory)
    if env is None:
        env = jinja2.Environment(
            loader=_fresh_loader_class()(str(directory)),  # {% include "common.j2" %}
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        _envs[directory] = env
    return env


def template_context(path: Path, name: str) -> dict[str, object]:
    return {
        "name": name,
        "env": dict(os.environ),
        "vassals_dir": str(path.parent),
        "file": str(path),
    }


def _compiled_template(env, path: Path, source: str):
    """The compiled template of `source`, from the cache when it was
    compiled before (keyed by content, so an edit compiles again)."""
    filename = str(path)
    key = (filename, hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest())
    tmpl = _compiled.get(key)
    if tmpl is None:
        code = env.compile(source, name=path.name, filename=filename)
        tmpl = env.template_class.from_code(env, code, env.make_globals(None))
        _compiled[key] = tmpl
        while len(_compiled) > _COMPILED_MAX:
            _compiled.popitem(last=False)
    else:
        _compiled.move_to_end(key)
    return tmpl


def compile_template(path: Path, source: str):
    """The compiled template (cached by content); TemplateFailure for a
    syntax error. Compiling is bounded by the file's size: it is done in the
    Emperor, so that the cache serves every later rendering."""
    import jinja2

    try:
        return _compiled_template(_environment(path.parent), path, source)
    except jinja2.TemplateSyntaxError as e:
        where = os.path.basename(e.filename) if e.filename else path.name
        raise TemplateFailure(f"{where}:{e.lineno}: {_one_line(e.message or str(e))}") from None
    except Exception as e:  # noqa: BLE001 - e.g. RecursionError on absurd nesting
        raise TemplateFailure(f"{path.name}:?: {type(e).__name__}: "
                              f"{_one_line(str(e) or type(e).__name__)}") from None


def render_compiled(tmpl, path: Path, name: str) -> str:
    """Render a compiled template; TemplateFailure with its line on error.
    Rendering runs the template's code, which may loop: the Emperor does it
    in a child with a deadline (render.py), never in its own loop."""
    import jinja2

    try:
        return tmpl.render(template_context(path, name))  # type: ignore[attr-defined]
    except jinja2.TemplateSyntaxError as e:  # in an included file
        where = os.path.basename(e.filename) if e.filename else path.name
        raise TemplateFailure(f"{where}:{e.lineno}: {_one_line(e.message or str(e))}") from None
    except Exception as e:  # noqa: BLE001 - undefined names, errors in filters, ...
        line = _template_line(e, str(path))
        msg = _one_line(str(e) or type(e).__name__)
        if not isinstance(e, jinja2.TemplateError):
            msg = f"{type(e).__name__}: {msg}"
        raise TemplateFailure(f"{path.name}:{line if line else '?'}: {msg}") from None


def render_template(path: Path, source: str, name: str) -> str:
    """Render a vassal template in this process, without a deadline (tools,
    tests; the Emperor renders through render.Renderer). Compiled templates
    are cached by content, so a rescan of hundreds of templates only renders them."""
    return render_compiled(compile_template(path, source), path, name)


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
