"""The vassals' listening sockets, seen from the loop: passed at start, on demand, closed.

The Emperor binds every vassal's `http-socket` itself (sockets.py) and
passes it to each of its processes. Between processes the socket stays
bound: an on-demand vassal's is watched until a connection waits
(`watch_on_demand`), and a vassal nobody will accept for a while (stopped,
or waiting out a crash-loop backoff) has its queued connections answered
503 by the Emperor (`closed_sign`), instead of left in the backlog.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..sockets import Listener, Listeners, answer_unavailable
from .vassal import Phase, Vassal


@dataclass(frozen=True)
class ForVassal:
    """A selector callback about one vassal (its pipe, its adoption, its
    on-demand socket): whatever goes wrong in it is that vassal's failure."""

    name: str
    seq: int | None
    fn: Callable[[float], None]


class VassalSockets:
    """The Emperor's part for its vassals' sockets (sockets.Listeners)."""

    def __init__(self, listeners: Listeners, vassals: dict[str, Vassal], own_sockets: bool,
                 socket_dir: Path | None, log: Callable[..., None]) -> None:
        self.listeners = listeners
        self.vassals = vassals  # the fleet, read only
        self.own_sockets = own_sockets
        self.socket_dir = socket_dir
        self.log = log

    def for_start(self, v: Vassal) -> tuple[bool, Listener | None]:
        """(ok, the socket to pass) for starting a process of v."""
        if not self.own_sockets or v.is_base or v.config is None:
            return True, None
        err, lst = self.listeners.get(v.name, v.config, self.socket_dir)
        if err is not None:
            v.note_error(err)
            return False, None
        return True, lst

    def closed_sign(self, v: Vassal, now: float) -> None:
        """A vassal whose socket nobody will accept on for a while (stopped,
        or waiting out a crash-loop backoff, no process left): the Emperor
        answers its queued connections itself, 503 (with Retry-After when a
        retry can help), instead of leaving them in the backlog."""
        lst = self.listeners.by_name.get(v.name)
        closed = (lst is not None and not v.has_process and self.own_sockets
                  and v.phase in (Phase.STOPPED, Phase.THROTTLED))
        if not closed:
            self.listeners.unanswer(v.name)
            return
        assert lst is not None
        if v.name in self.listeners.answering:
            return
        self.listeners.unwatch(v.name)  # not waiting for a connection to wake it
        self.listeners.answer(v.name, lst, ForVassal(
            v.name, None, lambda t, n=v.name: self._answer_closed(n, t)))

    def _answer_closed(self, name: str, now: float) -> None:
        v = self.vassals.get(name)
        lst = self.listeners.by_name.get(name)
        if v is None or lst is None:
            self.listeners.unanswer(name)
            return
        if v.phase == Phase.THROTTLED:
            retry = max(1, math.ceil(v.not_before - now))
            answer_unavailable(lst, f"{name} is restarting, retry in {retry} s", retry)
        else:
            answer_unavailable(lst, f"{name} is stopped", None)

    def watch_on_demand(self, v: Vassal, now: float) -> None:
        """An on-demand vassal without process: its socket in the selector."""
        if v.phase != Phase.ON_DEMAND:
            self.listeners.unwatch(v.name)
            return
        if v.name in self.listeners.watched:
            return
        if not self.own_sockets or v.is_base or v.config is None:
            return
        err, lst = self.listeners.get(v.name, v.config, self.socket_dir)
        if err is not None:  # port in use: throttle, like a failed start
            v.cannot_bind(now, err)
            return
        if lst is None:
            return
        self.listeners.watch(v.name, lst, ForVassal(v.name, None,
                                                    lambda t, n=v.name: self._on_listener(n, t)))
        self.log(f"on demand: waiting for a connection on {lst.addr}", v.name)

    def _on_listener(self, name: str, now: float) -> None:
        v = self.vassals.get(name)
        if v is not None and not v.woken:
            v.on_connection(now)
            self.log("connection waiting: starting on demand", name)
        self.listeners.unwatch(name)
