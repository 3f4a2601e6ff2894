"""The Emperor and its parts: the loop (loop.py), the plan, the vassals' state
machines, and the parts the loop owns (docs/ARCHITECTURE.md: Layout)."""

from __future__ import annotations

from ..lazy import exports

# imported when first used: the commands that only talk to a running
# Emperor (emperor.locks for a pidfile) do not load the whole Emperor
_EXPORTS = {"Emperor": ".loop"}

__all__ = ["Emperor"]
__getattr__ = exports(globals(), _EXPORTS)
