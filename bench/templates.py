"""The cost of rendering vassal templates (scenario `templates`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from settings import Bench


TEMPLATE = """[uwsgi]
http-socket = 127.0.0.1:{{ 20000 + (name[1:] | int) }}
processes = {{ 2 if name.endswith("0") else 1 }}
{% for k in ["APP_NAME", "APP_ROLE", "APP_REGION"] %}env = {{ k }}={{ name }}-{{ loop.index }}
{% endfor %}
"""


def template_renders(tmp: Path, n: int) -> dict:
    """The cost of rendering templates with a deadline (config/render.py):
    N vassal templates, rendered (a) in-process as before (compiled cache
    warm), (b) in forked children through the Emperor's Renderer, 2 at
    once: children render batches (wall time, the time spent in the
    caller's thread, which is what the Emperor's loop pays, and the forks); (c) N plain .ini files read by
    config.load (the fast path, no child). Three rounds, best of each."""
    import selectors
    from psgi_forkserver import config as cfg
    from psgi_forkserver.config.render import Renderer

    vdir = tmp / "templates"
    vdir.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        p = vdir / f"v{i:03d}.ini.j2"
        p.write_text(TEMPLATE)
        (vdir / f"p{i:03d}.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{20000 + i}\n")
        paths.append(p)
    out: dict = {"n": n}
    for p in paths:  # compile once: both paths use the compiled cache
        cfg.render_template(p, TEMPLATE, p.name[:4])
    best = {"inproc": 1e9, "child_wall": 1e9, "child_loop": 1e9, "plain": 1e9}
    for _ in range(3):
        t0 = time.perf_counter()
        for p in paths:
            cfg.render_template(p, TEMPLATE, p.name[:4])
        best["inproc"] = min(best["inproc"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            cfg.load(vdir / f"p{i:03d}.ini", judge=True)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
        with selectors.DefaultSelector() as sel:
            done: list[Path] = []
            r = Renderer(sel, done.append, timeout=30)
            t0 = time.perf_counter()
            in_loop = 0.0
            c0 = time.perf_counter()
            for p in paths:
                r.render(p, TEMPLATE, p.name[:4])
            r.start()  # the Emperor's next loop turn
            in_loop += time.perf_counter() - c0
            while len(done) < n:
                events = sel.select(5)
                c0 = time.perf_counter()
                for key, _ in events:
                    key.data(0.0)
                while r.pids:  # as the Emperor's _reap does
                    pid = os.waitpid(-1, os.WNOHANG)[0]
                    if not pid:
                        break
                    r.reaped(pid)
                in_loop += time.perf_counter() - c0
            c0 = time.perf_counter()
            texts = [r.render(p, TEMPLATE, p.name[:4]) for p in paths]
            in_loop += time.perf_counter() - c0
            best["child_wall"] = min(best["child_wall"], time.perf_counter() - t0)
            best["child_loop"] = min(best["child_loop"], in_loop)
            assert all(isinstance(t, str) for t in texts)
            for pid in list(r.pids):
                os.waitpid(pid, 0)
            out["forks"] = r.forks
    for k, v in best.items():
        out[f"{k}_ms_per_template"] = round(v * 1000 / n, 3)
    return out


def run(b: Bench) -> None:
    """Scenario `templates`."""
    b.results["templates"] = b.step("templates", lambda: template_renders(b.tmp, 200))
