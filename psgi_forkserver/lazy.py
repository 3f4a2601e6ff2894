"""A package's public names, imported from their modules when first used.

A package whose `__init__` imported every module would make each command
pay for all of them: `emperor status` needs the stats socket's client, not
the status server, psutil or Jinja2. A package lists where each of its
names lives instead, and `exports` gives it the module `__getattr__`
(PEP 562) that imports the one module a name needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of the package whose `globals()` is `namespace`:
    each of `names` (name -> the module, relative to the package, that
    defines it) from its module, once; any other name an AttributeError,
    as for a module without it."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # the next use is a plain attribute
        return value

    return __getattr__


def grouped(modules: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """name -> module, from module -> the names it defines."""
    return {name: module for module, names in modules.items() for name in names}
