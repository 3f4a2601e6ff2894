"""`fact`: the mark of a vassal's method that records a fact (vassal.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def fact(method: F) -> F:
    """A method that records a fact: afterwards (even if it raised) the
    vassal's name is added to the set the plan gave it (`report_facts_to`,
    the plan's `Settled.dirty`), so a vassal the plan left out as settled is
    stepped again. A new method that records a fact must be one too
    (tests/test_plan.py checks)."""

    @functools.wraps(method)
    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self._fact_recorded()

    recorded.records_a_fact = True  # type: ignore[attr-defined]
    return recorded  # type: ignore[return-value]
