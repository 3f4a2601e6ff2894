"""The Emperor and its parts: the loop (loop.py), the plan, the vassals' state
machines, and the parts the loop owns (docs/ARCHITECTURE.md: Layout)."""

from .loop import Emperor

__all__ = ["Emperor"]
