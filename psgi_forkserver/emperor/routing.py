"""The Emperor's side of the front door (frontdoor/): `domain` names and routes.

A vassal's `domain` names are claimed when its file is read
(`DomainClaims.claim`, used by files.py: a name another vassal serves is
that file's config error); every turn the routes (name -> socket, up or
not) go to the front door, which applies them batched (`Routes.turn`).
Whatever goes wrong in the front door stays the front door's
(`Routes.safely`): the vassals serve on their sockets without it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import selectors
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from .. import config as cfgmod
from .. import sockets
from ..frontdoor import FrontDoor, Route, nginx_target, route_limits
from ..options import Options
from .vassal import Phase, Vassal


class DomainClaims:
    """Which vassal serves each `domain` name; who waits for one."""

    def __init__(self, vassals: dict[str, Vassal]) -> None:
        self.vassals = vassals  # the fleet, read only
        # a vassal refused for a name another one serves -> that other one
        # (its file is read again when the other lets go)
        self.refused: dict[str, str] = {}

    def claim(self, name: str, cfg: cfgmod.VassalConfig) -> cfgmod.VassalConfig:
        """`cfg`, or a config error naming the vassal that already serves one
        of its `domain` names (exact names: a wildcard and a name under it
        may live side by side, the exact one wins)."""
        mine = set(cfg.domains())
        if not mine:
            self.refused.pop(name, None)
            return cfg
        for other in sorted(self.vassals):
            oc = self.vassals[other].config
            if other == name or oc is None or oc.error:
                continue
            both = mine & set(oc.domains())
            if both:
                d = min(both)
                line = next((n for n, k, val in cfgmod.parse_ini_lines(cfg.text)[0]
                             if k == "domain" and cfgmod.routed_name(val) == d), 0)
                where = f"{cfg.path.name} (rendered)" if cfg.rendered else cfg.path.name
                self.refused[name] = other
                return dataclasses.replace(
                    cfg, options=(), fingerprint=cfg.fingerprint + ":domain",
                    error=f"{where}:{line}: domain {d} is already served by vassal "
                          f"{other} ({oc.path.name})")
        self.refused.pop(name, None)
        return cfg

    def released(self, name: str) -> list[str]:
        """The files to read again: vassals refused for a name `name` served
        may have it now."""
        out = []
        for other, blocker in list(self.refused.items()):
            if blocker == name and other != name:
                ov = self.vassals.get(other)
                if ov is not None and ov.config is not None:
                    out.append(ov.config.path.name)
        return out


def socket_dir_of(opts: Options) -> Path | None:
    """Where the sockets of vassals with `domain` and no http-socket are made."""
    return opts.run_dir / "sockets" if opts.run_dir else None


class Routes:
    """The routes of the vassals with a `domain`, and the front door that serves them.

    A turn recomputes the routes of the vassals it names (those the plan
    stepped: a vassal's route changes only with a fact recorded on it or
    its own step), and all of them `EVERY` seconds after anything happened
    (the Emperor's count of what it handled, `Facts.events`, grew), so a
    change made any other way is seen that late, never lost, and an idle
    fleet's timer turns recompute none; the front door hears of the routes
    only when one changed."""

    EVERY = 1.0  # s: after anything happened, every route is recomputed this soon

    def __init__(self, opts: Options, vassals: dict[str, Vassal], listeners: sockets.Listeners,
                 socket_dir: Path | None, own_sockets: bool, log: Callable[..., None],
                 sel: selectors.BaseSelector, relay, on_refused: Callable[[str, str], None],
                 spawning: Callable[[], object]) -> None:
        self.vassals = vassals  # the fleet, read only
        self.listeners = listeners
        self.socket_dir = socket_dir
        self.own_sockets = own_sockets
        self.log = log
        self.sel = sel
        self.front: FrontDoor | None = None
        if opts.front is not None:
            self.front = FrontDoor(opts.front, lambda m: self.log(m, "front"),
                                   watch=lambda fd, cb: self.sel.register(
                                       fd, selectors.EVENT_READ,
                                       lambda t, cb=cb: self.safely(cb, t)),
                                   unwatch=self._unwatch,
                                   relay=lambda out, pid: relay.watch(out, "front", pid, formatted=True),
                                   on_refused=on_refused, spawning=spawning)
        self.known: dict[str, Route] = {}  # vassal name -> its route, as last computed
        self.next_full = float("-inf")
        self.events: int | None = None  # the Emperor's count at the last full recompute
        self.told = False  # the front door has had the routes once

    def routes(self) -> list[Route]:
        """The routing facts of every vassal with a `domain`: its socket.
        Whether it answers now does not change the routing (nginx would
        reload at each crash or stop): a socket nobody accepts on is
        answered 503 by the Emperor (ondemand.VassalSockets.closed_sign), one that is
        not bound refuses nginx's connection (503 too). Only a vassal
        without any address is routed to a 503 of the front door's own."""
        return [r for r in map(self.route_of, self.vassals.values()) if r is not None]

    def route_of(self, v: Vassal | None) -> Route | None:
        """One vassal's route (`routes`), None without a `domain`."""
        if v is None or v.is_base:
            return None
        cfg = v.config if v.config is not None and not v.config.error else v.running
        if cfg is None:
            return None
        domains = tuple(sorted(set(cfg.domains())))
        if not domains:
            return None
        lst = self.listeners.by_name.get(v.name)
        addr = lst.addr if lst is not None else None
        if addr is None:
            want = sockets.wanted_address(cfg, self.socket_dir)
            addr = want[0] if want is not None and (self.own_sockets or v.has_process) \
                else None
        down = addr is None
        # a retry helps after a crash loop's backoff, not while stopped;
        # only the front door's own 503 says it: a route with an address
        # keeps 1, or each crash, stop and start would change the routes
        retry = 1 if not down else math.ceil(v.backoff) if v.phase == Phase.THROTTLED \
            else 0 if v.phase == Phase.STOPPED else 1
        return Route(v.name, domains, nginx_target(addr) if addr else "",
                     up=not down, retry_after=retry,
                     protocol="uwsgi" if cfg.get("socket") else "http",
                     **route_limits(cfg))

    def turn(self, now: float, shutting_down: bool, changed: Iterable[str] | None = None,
             events: int = 0) -> None:
        """Routing changed? (applied batched); nginx's own life. `changed`:
        the vassals whose route may have changed (None: any); `events`:
        what the Emperor has handled so far."""
        if self.front is not None:
            self.safely(lambda t: self._turn(t, shutting_down, changed, events), now)

    def _turn(self, now: float, shutting_down: bool, changed: Iterable[str] | None,
              events: int) -> None:
        assert self.front is not None
        if not shutting_down and (self._refresh(now, changed, events) or not self.told):
            self.told = True
            self.front.update(self.known.values(), now)
        self.front.poll(now)

    def _refresh(self, now: float, changed: Iterable[str] | None, events: int = 0) -> bool:
        """The known routes brought up to date; True if one changed."""
        if changed is None or (now >= self.next_full and events != self.events):
            self.next_full = now + self.EVERY
            self.events = events
            fresh = {r.vassal: r for r in self.routes()}
            moved = fresh != self.known
            self.known = fresh
            return moved
        moved = False
        for name in changed:
            r = self.route_of(self.vassals.get(name))
            if r == self.known.get(name):
                continue
            moved = True
            if r is None:
                del self.known[name]
            else:
                self.known[name] = r
        return moved

    def safely(self, fn, now: float) -> None:
        """The front door's boundary: what goes wrong there is logged, and
        the vassals go on (they serve on their sockets without it)."""
        try:
            fn(now)
        except Exception as e:  # noqa: BLE001 - the boundary
            frame = traceback.extract_tb(e.__traceback__)[-1]
            self.log(f"error: {type(e).__name__}: {e} (at {os.path.basename(frame.filename)}:"
                     f"{frame.lineno})", "front")

    def _unwatch(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def close(self) -> None:
        if self.front is not None:
            self.front.close()

    def pids(self) -> dict[int, object]:
        return self.front.pids() if self.front is not None else {}

    def next_wakeup(self) -> float | None:
        return self.front.next_wakeup() if self.front is not None else None


def make_socket_dir(socket_dir: Path | None, front, log: Callable[[str], None]) -> None:
    """The directory of the vassals' own sockets, in a private run directory
    (0700, or group-readable by nginx's workers) whoever makes it first."""
    if socket_dir is None:
        return
    try:
        from ..rundir import make_private_dir, run_dir_mode

        include = front.include if front is not None else None
        gid = front.worker_gid if front is not None and front.listen else None
        make_private_dir(socket_dir.parent, tighten=False, group=gid,
                         mode=run_dir_mode(include, gid))
        socket_dir.mkdir(exist_ok=True, mode=0o755)
    except OSError as e:
        log(f"cannot create {socket_dir}: {e.strerror or e}")
