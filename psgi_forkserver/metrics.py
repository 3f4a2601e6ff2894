"""`GET /metrics` on the status address: Prometheus' text format.

Two sources:

- `EmperorMetrics`: what only the Emperor sees as it happens (adoptions and
  their latency, code deploys by outcome), counted in the loop;
- the status document (status.Collection): the vassals' state, restarts,
  memory and requests, turned into metric families when scraped.

Both go through prometheus_client, so names, labels and escaping follow
its rules; the tests read the page back with its parser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.registry import Collector

from .proc import Phase

#: adoption latency (request sent to pid received): fork servers answer in
#: about a millisecond when idle, seconds when loaded or starving
ADOPTION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: every state a vassal can show (proc.Phase): each gets a 0/1 sample, so
#: a dashboard can sum by state without knowing which ones exist
STATES = tuple(p.value for p in Phase)
#: states in which the vassal's address serves (on-demand: its socket is
#: bound, the first connection starts it)
UP = ("running", "loyal", "reloading", "on-demand")
#: how a code deploy can finish (emperor.deploys.DeployState, whose module
#: this one may not import; tests/test_status_hostile.py keeps them equal)
DEPLOY_OUTCOMES = ("done", "partial", "failed", "interrupted")


class EmperorMetrics:
    """Counters the Emperor's loop feeds; registered in no global registry
    (tests run several Emperors' code in one process)."""

    def __init__(self) -> None:
        self.adoptions = Counter("psgi_forkserver_adoptions", "Adoptions answered by a fork server",
                                 registry=None)
        self.adoption_failures = Counter("psgi_forkserver_adoption_failures",
                                         "Adoption requests that failed", registry=None)
        self.adoption_seconds = Histogram(
            "psgi_forkserver_adoption_seconds",
            "Time from an adoption request to the adopted vassal's pid",
            buckets=ADOPTION_BUCKETS, registry=None)
        self.deploys = Counter("psgi_forkserver_deploys", "Code deploys finished, by outcome",
                               ["outcome"], registry=None)
        # every outcome from 0: a series born at its first increment hides
        # that increment from rate() and increase() (the first failed deploy)
        for outcome in DEPLOY_OUTCOMES:
            self.deploys.labels(outcome=outcome)
        self._deploy_seen: tuple[int, float] | None = None  # the finish last counted

    def adopted(self, seconds: float) -> None:
        self.adoptions.inc()
        self.adoption_seconds.observe(max(0.0, seconds))

    def adoption_failed(self) -> None:
        self.adoption_failures.inc()

    def observe_deploy(self, last: Any) -> None:
        """Once per loop turn with DeployTracker.last: count each finished deploy once."""
        if last is None or not last.state.finished:
            return
        key = (id(last), last.finished_at)  # a failed deploy retried finishes again
        if key != self._deploy_seen:
            self._deploy_seen = key
            self.deploys.labels(outcome=last.state.value).inc()

    def collectors(self) -> list[Collector]:
        return [self.adoptions, self.adoption_failures, self.adoption_seconds, self.deploys]


class DocumentCollector(Collector):
    """The status document's numbers as metric families."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        vassals: dict[str, dict[str, Any]] = self.doc.get("vassals", {})
        state = GaugeMetricFamily("psgi_forkserver_vassal_state",
                                  "1 for the state the vassal is in, 0 for the others",
                                  labels=["vassal", "state"])
        up = GaugeMetricFamily("psgi_forkserver_vassal_up",
                               "1 when the vassal's address serves (running, loyal, reloading, "
                               "or on-demand: started by its first connection)",
                               labels=["vassal"])
        restarts = CounterMetricFamily("psgi_forkserver_vassal_restarts",
                                       "Processes started again after an unexpected death or a kill",
                                       labels=["vassal"])
        pss = GaugeMetricFamily("psgi_forkserver_vassal_pss_bytes",
                                "Proportional set size of the vassal's processes", labels=["vassal"])
        uss = GaugeMetricFamily("psgi_forkserver_vassal_uss_bytes",
                                "Unique set size of the vassal's processes", labels=["vassal"])
        procs = GaugeMetricFamily("psgi_forkserver_vassal_processes",
                                  "Processes of the vassal (master, workers, successor)",
                                  labels=["vassal"])
        uptime = GaugeMetricFamily("psgi_forkserver_vassal_uptime_seconds",
                                   "Age of the vassal's current process", labels=["vassal"])
        requests = CounterMetricFamily("psgi_forkserver_vassal_requests",
                                       "Requests served, as the vassal reports them",
                                       labels=["vassal"])
        duration = SummaryMetricFamily(
            "psgi_forkserver_vassal_request_duration_seconds",
            "Time spent serving requests (sum) and requests served (count), as the vassal's "
            "current process reports them (from 0 at each restart, as counters do)",
            labels=["vassal"])
        for name, v in sorted(vassals.items()):
            s = v.get("state")
            for st in STATES:
                state.add_metric([name, st], 1.0 if s == st else 0.0)
            up.add_metric([name], 1.0 if s in UP else 0.0)
            restarts.add_metric([name], float(v.get("restarts") or 0))
            pss.add_metric([name], float(v.get("pss") or 0))
            uss.add_metric([name], float(v.get("uss") or 0))
            procs.add_metric([name], float(v.get("processes") or 0))
            uptime.add_metric([name], float(v.get("uptime") or 0))
            if v.get("requests") is not None:
                requests.add_metric([name], float(v["requests"]))
            if v.get("requests") is not None and v.get("request_seconds") is not None:
                duration.add_metric([name], float(v["requests"]), float(v["request_seconds"]))
        yield from (state, up, restarts, pss, uss, procs, uptime, requests, duration)
        e = self.doc.get("emperor", {})
        deploy = e.get("deploy") or {}
        gen = GaugeMetricFamily("psgi_forkserver_base_generation",
                                "Base generation serving adoptions")
        gen.add_metric([], float(deploy.get("serving_generation") or 0))
        yield gen
        last = deploy.get("last") or {}
        active = GaugeMetricFamily("psgi_forkserver_deploy_in_progress",
                                   "1 while a code deploy runs")
        active.add_metric([], 1.0 if last and not last.get("finished") else 0.0)
        yield active
        front = e.get("front")
        if front:
            fgen = GaugeMetricFamily("psgi_forkserver_front_generation",
                                     "The front door's configuration generation installed")
            fgen.add_metric([], float(front.get("generation") or 0))
            fserv = GaugeMetricFamily("psgi_forkserver_front_serving_generation",
                                      "The configuration generation nginx runs")
            fserv.add_metric([], float(front.get("serving_generation") or 0))
            fup = GaugeMetricFamily("psgi_forkserver_front_up",
                                    "1 while nginx runs the generation installed")
            fup.add_metric([], 1.0 if front.get("pid") and not front.get("last_error") and
                           front.get("generation") == front.get("serving_generation") else 0.0)
            freloads = CounterMetricFamily("psgi_forkserver_front_reloads",
                                           "nginx reloads the front door made")
            freloads.add_metric([], float(front.get("reloads") or 0))
            frestarts = CounterMetricFamily("psgi_forkserver_front_restarts",
                                            "nginx deaths the front door restarted it after")
            frestarts.add_metric([], float(front.get("restarts") or 0))
            frefused = GaugeMetricFamily("psgi_forkserver_front_refused_vassals",
                                         "Vassals whose route nginx refused")
            frefused.add_metric([], float(len(front.get("refused") or {})))
            yield from (fgen, fserv, fup, freloads, frestarts, frefused)
        rss = GaugeMetricFamily("psgi_forkserver_emperor_rss_bytes", "The Emperor's own RSS")
        rss.add_metric([], float(e.get("rss") or 0))
        yield rss


def render(doc: dict[str, Any], emperor_metrics: EmperorMetrics | None) -> bytes:
    """The /metrics page for one status document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DocumentCollector(doc))
    if emperor_metrics is not None:
        for c in emperor_metrics.collectors():
            registry.register(c)
    return generate_latest(registry)
