"""The Emperor's side of the front door (frontdoor/): `domain` names and routes.

A vassal's `domain` names are claimed when its file is read (`_claim_domains`:
a name another vassal serves is that file's config error); every turn the
routes (name -> socket, up or not) go to the front door, which applies
them batched (`_front_turn`). Whatever goes wrong in the front door stays
the front door's (`_front_safely`): the vassals serve on their sockets
without it. A mixin of `emperor.Emperor`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import selectors
import time
import traceback

from . import config as cfgmod
from . import sockets
from .frontdoor import FrontDoor, Route, nginx_target, route_limits
from .vassal import Phase


class Routing:
    """Domain names and the front door (a mixin of Emperor)."""

    def _init_routing(self) -> None:
        # sockets of vassals with `domain` and no http-socket (run_dir/sockets)
        self.socket_dir = self.opts.run_dir / "sockets" if self.opts.run_dir else None
        # `domain` names: a vassal refused for a name another one serves ->
        # that other one (its file is read again when the other lets go)
        self.domain_refused: dict[str, str] = {}
        self.front: FrontDoor | None = None
        if self.opts.front is not None:
            # the vassals' sockets are given to nginx's workers' group
            self.listeners.front_gid = self.opts.front.worker_gid
            self.front = FrontDoor(self.opts.front, lambda m: self.log(m, "front"),
                                   watch=lambda fd, cb: self.sel.register(
                                       fd, selectors.EVENT_READ,
                                       lambda t, cb=cb: self._front_safely(cb, t)),
                                   unwatch=self._unwatch,
                                   relay=lambda out, pid: self.relay.watch(out, "front", pid),
                                   on_refused=self._front_refused,
                                   spawning=lambda: self._cg_spawning(None, 0))

    def _claim_domains(self, name: str, cfg: cfgmod.VassalConfig) -> cfgmod.VassalConfig:
        """`cfg`, or a config error naming the vassal that already serves one
        of its `domain` names (exact names: a wildcard and a name under it
        may live side by side, the exact one wins)."""
        mine = {d.lower() for d in cfg.get_all("domain")}
        if not mine:
            self.domain_refused.pop(name, None)
            return cfg
        for other in sorted(self.vassals):
            oc = self.vassals[other].config
            if other == name or oc is None or oc.error:
                continue
            both = mine & {d.lower() for d in oc.get_all("domain")}
            if both:
                d = min(both)
                line = next((n for n, k, val in cfgmod.parse_ini_lines(cfg.text)[0]
                             if k == "domain" and val.lower() == d), 0)
                where = f"{cfg.path.name} (rendered)" if cfg.rendered else cfg.path.name
                self.domain_refused[name] = other
                return dataclasses.replace(
                    cfg, options=(), fingerprint=cfg.fingerprint + ":domain",
                    error=f"{where}:{line}: domain {d} is already served by vassal "
                          f"{other} ({oc.path.name})")
        self.domain_refused.pop(name, None)
        return cfg

    def _domains_released(self, name: str) -> None:
        """A vassal refused for a name `name` served may have it now: read again."""
        for other, blocker in list(self.domain_refused.items()):
            if blocker == name and other != name:
                ov = self.vassals.get(other)
                if ov is not None and ov.config is not None:
                    self.due[ov.config.path.name] = time.monotonic()

    def routes(self) -> list[Route]:
        """The routing facts of every vassal with a `domain`: its socket.
        Whether it answers now does not change the routing (nginx would
        reload at each crash or stop): a socket nobody accepts on is
        answered 503 by the Emperor (Processes._closed_sign), one that is
        not bound refuses nginx's connection (503 too). Only a vassal
        without any address is routed to a 503 of the front door's own."""
        out = []
        for v in self.vassals.values():
            if v.is_base:
                continue
            cfg = v.config if v.config is not None and not v.config.error else v.running
            if cfg is None:
                continue
            domains = tuple(sorted({d.lower() for d in cfg.get_all("domain")}))
            if not domains:
                continue
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
            out.append(Route(v.name, domains, nginx_target(addr) if addr else "",
                             up=not down, retry_after=retry,
                             protocol="uwsgi" if cfg.get("socket") else "http",
                             **route_limits(cfg)))
        return out

    def _front_refused(self, name: str, why: str) -> None:
        """nginx cannot take this vassal's route: config-error, with
        nginx's own words, until its file changes; everyone else is
        served from the configuration without it."""
        v = self.vassals.get(name)
        if v is None or v.config is None:
            return
        msg = f"the front door cannot route it: {why}"
        self.failed[name] = (v.config.fingerprint, msg)
        v.config_failed(msg)
        self.log(f"bad config {v.config.path}: {msg}", name)

    def _front_turn(self, now: float) -> None:
        assert self.front is not None
        if not self.shutting_down:
            self.front.update(self.routes(), now)
        self.front.poll(now)

    def _front_safely(self, fn, now: float) -> None:
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
