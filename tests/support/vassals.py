"""Vassals without processes, for the tests of the state machine and the
plan: a policy, configs and contexts, and vassals brought to a phase."""

from __future__ import annotations

from pathlib import Path

from psgi_forkserver.config import VassalConfig
from psgi_forkserver.emperor.plan import Facts, plan
from psgi_forkserver.emperor.vassal import Adopt, Context, ForkServer, Kind, Phase, Policy, Spawn, Vassal

POLICY = Policy(mercy=5.0, backoff_first=0.1, backoff_max=2.0, stable_after=10.0)


def cfg(name="app1", fp="a", **opts):
    # an http-socket: a vassal whose Emperor owns its socket reloads seamlessly
    opts.setdefault("http-socket", "127.0.0.1:9100")
    return VassalConfig(name, Path(f"/v/{name}.ini"), fp, tuple(opts.items()))


def ctx(now, fs=ForkServer.READY, **kw):
    return Context(now, fs, **kw)


def base_vassal():
    b = Vassal("base", cfg("base", **{"fork-server": "fs.sock"}), is_base=True, policy=POLICY)
    acts = b.step(ctx(0, ForkServer.WAITING))
    assert acts == [Spawn(Kind.BASE)]
    b.spawned(10, 0, seq=acts[0].seq)
    b.on_byte(1, 0.1)
    assert b.base_generation == 1
    return b


def adopted_vassal(now=0.0, pid=100):
    v = Vassal("app1", cfg(), policy=POLICY)
    assert v.step(ctx(now)) == [Adopt()]
    assert v.phase == Phase.ADOPTING
    v.adopted(pid, now + 0.01)
    return v


def seamless_vassal(now=0.0, pid=100):
    v = adopted_vassal(now, pid)
    v.owns_socket = True  # the Emperor owns its http-socket: reloads overlap
    assert v.seamless
    v.on_byte(17, now + 0.1)
    return v


def facts(now, **kw):
    kw.setdefault("fork_server", ForkServer.READY)
    kw.setdefault("base_generation", 1)
    return Facts(now, **kw)


def running(name, gen=1, pid=100, now=0.0, owns_socket=True):
    """An adopted vassal, loyal, on base generation `gen`."""
    v = Vassal(name, cfg(name), policy=POLICY, owns_socket=owns_socket)
    acts = plan([v], facts(now, base_generation=gen)).actions()[name]
    assert acts == [Adopt()]
    v.adopted(pid, now, seq=acts[0].seq)
    v.on_byte(17, now)
    return v
