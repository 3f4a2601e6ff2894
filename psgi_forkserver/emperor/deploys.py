"""Code deploys: the record of each, from the request to its outcome.

`Deploy` is one code deploy: base generation N is started beside the old
one, and every adopted vassal moves onto it (at most `deploy_parallel` at a
time, plan.py). `DeployTracker` is fed once per loop turn (`observe`, from
the vassals' states) and by two facts it cannot see in them: a vassal's
move failed, or the new base died before it was ready. A deploy ends with
one summary line in the log, and is what `emperor reload-base --wait` reads
from the stats document (`emperor.deploy`, see `Deploy.as_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..proc import Kind, Phase
from .vassal import Vassal


# a vassal with no process that stays so until something outside the
# deploy happens (`emperor start`, a connection, a fixed file, room)
AT_REST = frozenset({Phase.STOPPED, Phase.ON_DEMAND, Phase.CONFIG_ERROR, Phase.REFUSED,
                     Phase.GONE})


class DeployState(StrEnum):
    STARTING = "starting"  # the new base is starting
    MOVING = "moving"  # the new base serves; vassals move onto it
    DONE = "done"  # every adopted vassal runs on the new generation
    PARTIAL = "partial"  # done, but some vassals could not move
    FAILED = "failed"  # the new base could not start: the old one keeps serving
    INTERRUPTED = "interrupted"  # the Emperor is shutting down

    @property
    def finished(self) -> bool:
        return self not in (DeployState.STARTING, DeployState.MOVING)


@dataclass
class Deploy:
    """One code deploy: base generation `generation` and the vassals moved onto it."""

    generation: int
    started: float  # monotonic
    from_generation: int
    state: DeployState = DeployState.STARTING
    ready_at: float | None = None  # the new base serves
    first_moved_at: float | None = None
    finished_at: float | None = None
    # adopted vassals on an older generation when the new base became ready
    to_move: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why its move failed
    reason: str | None = None  # FAILED: why the new base could not start; INTERRUPTED: why
    # FAILED: the fingerprint of the base file the new base failed with
    failed_with: str | None = None
    request: int = 0  # DeployTracker.requests when this deploy was (last) asked for
    next_progress: float = 0.0  # when the next `deploy: N/M moved` line is due

    @property
    def pending(self) -> set[str]:
        return self.to_move - self.moved - set(self.failed)

    def duration(self, now: float) -> float:
        return (self.finished_at if self.finished_at is not None else now) - self.started

    def summary(self, now: float) -> str:
        """The one line that ends a deploy in the log."""
        counts = (f"{len(self.moved)} moved, {len(self.failed)} failed, "
                  f"{self.duration(now):.2f} s")
        if self.state == DeployState.FAILED:
            return (f"code deploy to generation {self.generation} failed: {self.reason}; "
                    f"generation {self.from_generation} keeps serving ({counts})")
        if self.state == DeployState.INTERRUPTED:
            return f"code deploy to generation {self.generation} {self.reason} ({counts})"
        what = "done" if self.state == DeployState.DONE else "done with failures"
        extra = "".join(f"; {n}: {why}" for n, why in sorted(self.failed.items()))
        return f"code deploy to generation {self.generation} {what}: {counts}{extra}"

    def as_dict(self, now: float) -> dict[str, Any]:
        """The deploy in the stats document (`emperor.deploy.last`)."""
        return {
            "request": self.request,
            "generation": self.generation,
            "from_generation": self.from_generation,
            "state": self.state.value,
            "finished": self.state.finished,
            "moved": len(self.moved),
            "failed": dict(sorted(self.failed.items())),
            "pending": sorted(self.pending),
            "reason": self.reason,
            "duration_s": round(self.duration(now), 3),
            "ready_after_s": (round(self.ready_at - self.started, 3)
                              if self.ready_at is not None else None),
            "first_move_after_ready_s": (
                round(self.first_moved_at - self.ready_at, 3)
                if self.first_moved_at is not None and self.ready_at is not None else None),
        }


@dataclass
class DeployTracker:
    """The deploys of one Emperor: the one in progress and the last one."""

    log: Callable[[str, str | None], None]
    last: Deploy | None = None
    requests: int = 0  # `reload-base` (SIGUSR1) requests so far

    def requested(self, now: float, base: Vassal) -> None:
        """SIGUSR1, after base.request_deploy(). A request for the generation
        that is still starting, or that failed, waits for that generation."""
        self.requests += 1
        d = self.last
        if d is not None and d.generation == base.want_base_generation and d.state in (
                DeployState.STARTING, DeployState.FAILED):
            d.request = self.requests
            if d.state == DeployState.FAILED:
                d.state, d.reason, d.finished_at, d.started = DeployState.STARTING, None, None, now

    def refused(self, now: float, why: str) -> None:
        """SIGUSR1 with nothing to deploy: a deploy that failed at once."""
        self.requests += 1
        self.last = Deploy(0, now, 0, DeployState.FAILED, finished_at=now, reason=why,
                           request=self.requests)

    @property
    def active(self) -> Deploy | None:
        d = self.last
        return d if d is not None and not d.state.finished else None

    def observe(self, now: float, base: Vassal | None, others: Iterable[Vassal],
                shutting_down: bool) -> None:
        """Once per loop turn, after the vassals stepped."""
        if base is None:
            return
        want = base.want_base_generation
        serving = base.serving_generation
        d = self.last
        if want > serving and serving > 0 and (d is None or d.generation < want):
            if d is not None and not d.state.finished:
                d.reason = f"superseded by generation {want}"
                self._finish(d, now, DeployState.INTERRUPTED, base.name)
            self.last = d = Deploy(want, now, serving, request=self.requests)
        if d is None:
            return
        if d.state == DeployState.FAILED and d.generation > 0 and serving == d.generation:
            # the base was retried (backoff) and came up after all: move on.
            # Not a refused request (generation 0): with no base serving,
            # `serving` is 0 too, and that refusal used to turn into "done".
            d.state, d.reason, d.finished_at = DeployState.STARTING, None, None
        elif (d.state == DeployState.FAILED and d.generation == want and d.failed_with is not None
              and base.config is not None and base.config.fingerprint != d.failed_with):
            # the base file changed since: its generation starts again with
            # it (Vassal.request_deploy), and that is still this deploy
            d.state, d.reason, d.finished_at, d.failed_with = (
                DeployState.STARTING, None, None, None)
            self.log(f"code deploy to generation {d.generation}: the base file changed, "
                     "starting it again", base.name)
        if d.state.finished:
            return
        if shutting_down:
            d.reason = "interrupted by shutdown"
            self._finish(d, now, DeployState.INTERRUPTED, base.name)
            return
        others = list(others)
        if d.state == DeployState.STARTING:
            if serving < d.generation:
                return
            d.state, d.ready_at = DeployState.MOVING, now
            d.to_move = {v.name for v in others if v.current is not None
                         and v.current.kind == Kind.ADOPTED
                         and v.current.base_generation < d.generation}
        by_name = {v.name: v for v in others}
        for name in list(d.pending):
            v = by_name.get(name)
            if v is None or v.config is None or (v.current is None and v.phase in AT_REST):
                # removed, or stopped and staying so (the operator's stop,
                # an on-demand vassal gone idle, a file refused) since the
                # move was planned: nothing to move; it starts on the
                # serving generation whenever it starts again
                d.to_move.discard(name)
                continue
            cur = v.current
            if cur is not None and v.successor is None and v.config.error is not None \
                    and cur.base_generation < d.generation:
                # its file cannot be used: it keeps its process (and the
                # old code) until the file is fixed; the deploy ends
                d.failed[name] = f"its file is unusable ({v.config.error}): it keeps " \
                                 f"running on generation {cur.base_generation}"
                continue
            if cur is not None and cur.kind == Kind.ADOPTED and cur.base_generation >= d.generation:
                d.moved.add(name)
                d.failed.pop(name, None)
                if d.first_moved_at is None:
                    d.first_moved_at = now
        if not d.pending:
            self._finish(d, now, DeployState.PARTIAL if d.failed else DeployState.DONE, base.name)
        elif now >= d.next_progress:  # one progress line a second while vassals move
            if d.next_progress:
                self.log(f"deploy: {len(d.moved)}/{len(d.to_move)} moved, "
                         f"{len(d.failed)} failed", base.name)
            d.next_progress = now + 1.0

    def move_failed(self, name: str, why: str) -> None:
        """A vassal's code-deploy successor failed (adoption, or died before taking over)."""
        d = self.active
        if d is not None and name in d.to_move and name not in d.moved:
            d.failed[name] = why

    def base_failed(self, now: float, base_name: str, generation: int, why: str,
                    fingerprint: str | None = None) -> None:
        """The new base died (or could not be started) before it was ready;
        `fingerprint`: its base file's, which a fix must change."""
        d = self.active
        if d is not None and d.generation == generation and d.state == DeployState.STARTING:
            d.reason, d.failed_with = why, fingerprint
            self._finish(d, now, DeployState.FAILED, base_name)

    def _finish(self, d: Deploy, now: float, state: DeployState, base_name: str) -> None:
        d.state, d.finished_at = state, now
        self.log(d.summary(now), base_name)

    def as_dict(self, now: float, base: Vassal | None) -> dict[str, Any]:
        """`emperor.deploy` in the stats document: what `reload-base --wait` polls."""
        return {
            "requests": self.requests,
            "serving_generation": base.serving_generation if base is not None else None,
            "requested_generation": base.want_base_generation if base is not None else None,
            "last": self.last.as_dict(now) if self.last is not None else None,
        }
