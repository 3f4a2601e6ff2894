"""The report: the table of figures against targets, and the Markdown page."""

from __future__ import annotations

import floor_rows
import front as frontbench
import health as healthbench
import uss as ussbench
from adoptions import BOUND
from settings import MB, TARGETS, fmt


def verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def table(r: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    ad = r.get("adoption", {})
    cold = r.get("cold", {})
    for app in ("heavy", "heavy, spares", "heavy /hello", "heavy /hello, spares", "heavy, base with early-warmup /",
                "heavy, base with early-warmup /, spares", BOUND + ", fork path", BOUND + ", spares", "hello"):
        a = ad.get(app)
        if a:
            p50 = a["first_200_ms"]["p50"]
            served = f" ({a['by_spare']} of {len(a['samples_first_200_ms'])} by a spare)" if a.get("spares") else ""
            # the targets: a spare with early-warmup = /, in 1 ms to the pid, 2 to the page
            target_200 = (TARGETS["adoption_p50_ms"] if app == "heavy" else
                          TARGETS["spare_first_200_ms"] if app == "heavy, base with early-warmup /, spares" else None)
            target_pid = TARGETS["spare_pid_reply_ms"] if app == "heavy, base with early-warmup /, spares" else None
            pid50 = a["pid_reply_ms"]["p50"]
            rows.append((f"adoption -> first 200, {app}: p50 / p99{served}",
                         f"{p50:.2f} / {a['first_200_ms']['p99']:.2f} ms",
                         f"p50 <= {target_200:g} ms" if target_200 else "",
                         verdict(p50 <= target_200) if target_200 else ""))
            rows.append((f"adoption -> pid reply, {app}: p50 / p99",
                         f"{pid50:.2f} / {a['pid_reply_ms']['p99']:.2f} ms",
                         f"p50 <= {target_pid:g} ms" if target_pid else "",
                         verdict(pid50 <= target_pid) if target_pid else ""))
    u = r.get("uwsgi21")
    if u is not None:
        if "skipped" in u:
            rows.append(("uWSGI 2.1 side by side (adoption -> first 200, heavy /)", f"skipped: {u['skipped']}", "", ""))
        else:
            w = u["uwsgi21"]["first_200_ms"]
            load = " / ".join(" ".join(f"{x:.2f}" for x in u[k]) for k in ("loadavg_before", "loadavg_after"))
            rows.append((f"adoption -> first 200, heavy /, uWSGI 2.1 fork server (Emperor-hosted base), "
                         f"{u['n']} interleaved rounds: p50 / p99 (load average before / after: {load})",
                         f"{w['p50']:.2f} / {w['p99']:.2f} ms", "", ""))
            for key, target in (("fork path", TARGETS["fork_path_over_uwsgi21"]),
                                ("fork path, preload-learned = false", TARGETS["fork_path_over_uwsgi21"]),
                                ("spares", TARGETS["spares_over_uwsgi21"]),
                                ("spares, base with early-warmup /", TARGETS["spares_over_uwsgi21"]),
                                ("spares, base with early-warmup /, socket bound by the requester",
                                 TARGETS["spares_over_uwsgi21"])):
                x = u.get(key)
                if x:
                    f = x["first_200_ms"]
                    served = f", {x['by_spare']} of {f['n']} by a spare" if not key.startswith("fork path") else ""
                    first = x.get("first_adoption_first_200_ms")
                    first = f"; the base's first adoption {first:.2f} ms" if first is not None else ""
                    rows.append((f"adoption -> first 200, heavy /, ours, {key}: p50 / p99 (ours / uWSGI 2.1{served})",
                                 f"{f['p50']:.2f} / {f['p99']:.2f} ms ({x['ratio']:.2f}x{first})", f"<= {target:g}x",
                                 verdict(x["ratio"] <= target)))
    for app in ("heavy", "hello"):
        a = ad.get(app)
        c = cold.get(app)
        if c:
            for server in ("ours", "starman", "uwsgi"):
                s = c.get(server)
                if not s:
                    continue
                ratio = s["p50"] / a["first_200_ms"]["p50"] if a else None
                is_target = app == "heavy"
                rows.append((f"cold start -> first 200, {app}, {server}: p50 (cold / adoption)",
                             f"{s['p50']:.0f} ms ({fmt(ratio, '.0f', 'x')})",
                             f">= {TARGETS['cold_over_adoption']:g}x" if is_target else "",
                             verdict(ratio >= TARGETS["cold_over_adoption"] if ratio else None) if is_target else ""))
    for key, b in (r.get("burst") or {}).items():
        rows.append((f"burst of {b['n']} adoptions at once, heavy, early-warmup /, {key}: first 200 p50 / p99 / max",
                     f"{b['first_200_ms']['p50']:.1f} / {b['first_200_ms']['p99']:.1f} / {b['first_200_ms']['max']:.1f} ms"
                     + (f" ({b['by_spare']} by a spare; pool back to {b['spares']} in {b['refill_s']:.2f} s)"
                        if b["spares"] else ""), "", ""))
        rows.append((f"burst, {key}: pid reply p50 / max",
                     f"{b['pid_reply_ms']['p50']:.1f} / {b['pid_reply_ms']['max']:.1f} ms", "", ""))
    sm = r.get("spare_memory") or {}
    if sm.get("0"):
        for k, m in sm.items():
            if k == "0":
                continue
            per = (m["pss_bytes"] - sm["0"]["pss_bytes"]) / int(k)
            rows.append((f"memory of K = {k} warm spares (heavy, early-warmup /): PSS of the base and its spares; "
                         "per spare: PSS added, USS (master and worker)",
                         f"{sm['0']['pss_bytes'] / MB:.1f} MB with none, {m['pss_bytes'] / MB:.1f} MB with {k}; "
                         f"{per / MB:.2f} MB, {m['spares_uss_bytes'] / int(k) / MB:.2f} MB", "", ""))
    for key, x in (r.get("reaction") or {}).items():
        rows.append((f"emperor: new vassal file -> first 200, heavy, early-warmup /, {key}: p50 / max",
                     f"{x['reaction_ms']['p50']:.1f} / {x['reaction_ms']['max']:.1f} ms",
                     "p50 <= 5 ms" if key == "spares" else "",
                     verdict(x["reaction_ms"]["p50"] <= 5) if key == "spares" else ""))
    fl = r.get("fleet")
    if fl and "reaction_ms" in fl:
        rows.append(("emperor: new vassal file -> first 200: p50 / max",
                     f"{fl['reaction_ms']['p50']:.1f} / {fl['reaction_ms']['max']:.1f} ms", "", ""))
    cp = r.get("cold_pss")
    if fl and "memory" in fl:
        for m in fl["memory"]:
            last = m is fl["memory"][-1]
            for k, label in (("idle", "idle (served nothing)"), ("served", "after one request each")):
                x = m[k]
                rows.append((f"PSS under emperor / N, {label}, N={m['n']} ({x['processes_under']} processes)",
                             f"{x['pss_under_bytes'] / m['n'] / MB:.2f} MB", "", ""))
                inc = x.get("increment_per_vassal_bytes")
                if inc is None:
                    continue
                is_target = k == "idle" and last and m["n"] >= 200
                rows.append((f"PSS increment per added vassal, {label}, N={m['n']}",
                             f"{inc / MB:.2f} MB",
                             f"<= {TARGETS['marginal_pss_mb']:g} MB at N=200 (idle)" if k == "idle" and last else "",
                             verdict(inc / MB <= TARGETS["marginal_pss_mb"]) if is_target else
                             ("n/a (N<200)" if k == "idle" and last else "")))
        if cp:
            rows.append(("PSS of one cold app (ours, master + 1 worker, one request served)",
                         f"{cp['pss_bytes'] / MB:.1f} MB", "", ""))
            inc = fl["memory"][-1]["idle"].get("increment_per_vassal_bytes")
            if inc:
                rows.append(("cold app PSS / increment per idle adopted vassal",
                             f"{cp['pss_bytes'] / inc:.0f}x", "", ""))
    ms = r.get("mass")
    if ms and "all_200_s" in ms:
        is_target = ms["n"] >= 200
        rows.append((f"mass start: `emperor run` -> all {ms['n']} answering 200 (GET /hello)",
                     f"{ms['all_200_s']:.2f} s (base listening at {ms['base_listening_s']:.2f} s)",
                     f"200 within {TARGETS['mass_start_s']:g} s",
                     verdict(ms["all_200_s"] <= TARGETS["mass_start_s"]) if is_target else "n/a (N<200)"))
    if ms and "idle" in ms:
        is_target = ms["n"] >= 200
        rows.append((f"idle emperor, {ms['n']} vassals: CPU over {ms['idle']['seconds']:.0f} s",
                     f"{ms['idle']['cpu_pct']:.2f} %", f"< {TARGETS['emperor_cpu_pct']:g} % at 200",
                     verdict(ms["idle"]["cpu_pct"] < TARGETS["emperor_cpu_pct"]) if is_target else "n/a (N<200)"))
        rows.append((f"idle emperor, {ms['n']} vassals: RSS / PSS",
                     f"{ms['idle']['emperor_rss_bytes'] / MB:.1f} / {ms['idle']['emperor_pss_bytes'] / MB:.1f} MB",
                     "", ""))
    for app, th in (r.get("thousand") or {}).items():
        app = app.replace(",", " app,", 1) if "," in app else f"{app} app"  # "heavy app, master = false"
        if "all_200_s" in th:
            is_target = th["n"] >= 1000
            rows.append((f"fleet, {app}: `emperor run` (soft RLIMIT_NOFILE 1024) -> all {th['n']} "
                         "answering 200 (GET /hello)",
                         f"{th['all_200_s']:.2f} s (base listening at {th['base_listening_s']:.2f} s)",
                         f"1000 within {TARGETS['thousand_start_s']:g} s",
                         verdict(th["all_200_s"] <= TARGETS["thousand_start_s"]) if is_target else "n/a (N<1000)"))
        if "burst_cpu" in th:  # the profile: who used the cores after the base listened
            cpu = th["burst_cpu"]
            rows.append((f"  CPU from the base listening to all answering ({app})", "; ".join(
                f"{k} {c:.2f} s" + (f" ({1000 * c / m:.2f} ms each)" if m > 1 else "")
                for k, (m, c) in cpu.items()), "", ""))
        if "idle" in th:
            rows.append((f"idle emperor, {th['n']} vassals ({app}): CPU over {th['idle']['seconds']:.0f} s; "
                         "RSS / PSS",
                         f"{th['idle']['cpu_pct']:.2f} %; {th['idle']['emperor_rss_bytes'] / MB:.1f} / "
                         f"{th['idle']['emperor_pss_bytes'] / MB:.1f} MB", "", ""))
    dp = r.get("deploy")
    if dp and "requests_ok" in dp:
        rows.append((f"code deploy of {dp['n']} vassals under load: failed requests",
                     f"{dp['requests_failed']} of {dp['requests_ok'] + dp['requests_failed']}"
                     + (f" (deploy took {dp['deploy_s']:.2f} s)" if "deploy_s" in dp else " (deploy unfinished)"),
                     "0", verdict(dp["requests_failed"] == 0 and "deploy_s" in dp)))
        if "ready_to_first_move_s" in dp:
            rec = dp.get("emperor_record") or {}
            exact = rec.get("first_move_after_ready_s")
            rows.append((f"code deploy of {dp['n']} vassals: new base ready -> first vassal moved",
                         f"{dp['ready_to_first_move_s']:.2f} s (log, 0.05 s polls)"
                         + (f"; {exact * 1000:.1f} ms (Emperor's record)" if exact is not None else ""),
                         "", ""))
    pv = r.get("prove")
    if pv:
        rows.append((f"{pv['files']} heavy test files, -j2: prove / yath test / emperor prove",
                     f"{pv['prove']['wall_s']:.2f} / {pv['yath']['wall_s']:.2f} / {pv['emperor prove']['wall_s']:.2f} s",
                     "", ""))
        rows.append(("  prove / emperor prove; yath / emperor prove",
                     f"{pv['prove_over_emperor']:.1f}x; {pv['yath_over_emperor']:.1f}x",
                     f">= {TARGETS['prove_over_emperor']:g}x; >= {TARGETS['yath_over_emperor']:g}x",
                     verdict(pv["prove_over_emperor"] >= TARGETS["prove_over_emperor"]
                             and pv["yath_over_emperor"] >= TARGETS["yath_over_emperor"])))
    pl = r.get("plack")
    if pl:
        rows.append((f"Plack's t/ ({pl['prove']['files']} files), -j2: prove / yath test / emperor prove",
                     f"{pl['prove']['wall_s']:.2f} / {pl['yath']['wall_s']:.2f} / {pl['emperor prove']['wall_s']:.2f} s",
                     "", ""))
        rows.append(("  per-file verdicts: emperor prove = prove; yath = prove",
                     f"{'yes' if pl['same_verdicts_as_prove'] else 'NO ' + ', '.join(pl['differ_from_prove'])}; "
                     f"{'yes' if not pl['yath_differ_from_prove'] else 'no: ' + ', '.join(pl['yath_differ_from_prove'])}",
                     "emperor prove = prove", verdict(pl["same_verdicts_as_prove"])))
    sv = r.get("serving", {})
    for app in ("hello", "heavy"):
        s = sv.get(app)
        if s:
            a, st, ratio = s["adopted"]["rps"], s["starman"]["rps"], s["ratio"]
            rows.append((f"wrk -t2 -c16, {app}: adopted (2 workers) / starman --workers 2",
                         f"{fmt(a, '.0f')} / {fmt(st, '.0f')} req/s ({fmt(ratio, '.2f')})",
                         f">= {TARGETS['serving_ratio']:.2f} of Starman",
                         verdict(ratio >= TARGETS["serving_ratio"] if ratio else None)))
        lg = s.get("logging") if s else None
        if lg:
            rows.append((f"wrk -t2 -c16, {app}, access log on: relayed by the Emperor's reader / "
                         "written to a file by the vassal / access log off",
                         " / ".join(f"{fmt(lg[m]['rps'], '.0f')}" for m in ("relayed", "file", "off"))
                         + f" req/s (reader: {lg['relayed'].get('relay_cpu_us_per_line')} us CPU a line)",
                         "", ""))
        rp = s.get("request_path") if s else None
        if rp and rp.get("no_log"):
            rows.append((f"request path in process (bench/request_path.pl, {rp['n']} GETs), {app}: "
                         "CPU per request, access log off / on",
                         f"{rp['no_log']:.2f} / {fmt(rp['log'], '.2f')} us", "", ""))
        for who, label in (("adopted", "adopted (2 workers)"), ("starman", "starman --workers 2")):
            f = s.get(f"fair_{who}") if s else None
            sp = s.get(f"spread_{who}") if s else None
            if f and f.get("p50_ms"):
                is_target = who == "adopted"
                rows.append((f"wrk -t1 -c16 --latency, {app}, {label}: p50 / p99",
                             f"{f['p50_ms']:.2f} / {f['p99_ms']:.2f} ms ({fmt(f['rps'], '.0f')} req/s)",
                             "p99 <= 3x p50" if is_target else "",
                             verdict(f["p99_ms"] <= 3 * f["p50_ms"]) if is_target else ""))
            ng = s.get(f"nginx_{who}") if s else None
            if ng and ng.get("p50_ms"):
                is_target = who == "adopted"
                rows.append((f"wrk -t1 -c16 --latency through nginx (upstream keepalive 16), {app}, {label}: p50 / p99",
                             f"{ng['p50_ms']:.2f} / {ng['p99_ms']:.2f} ms ({fmt(ng['rps'], '.0f')} req/s)",
                             "p99 <= 3x p50" if is_target else "",
                             verdict(ng["p99_ms"] <= 3 * ng["p50_ms"]) if is_target else ""))
            if sp:
                rows.append((f"16 keep-alive connections, {app}, {label}: responses per connection in "
                             f"{sp['seconds']:g} s, min / max", f"{sp['min']} / {sp['max']}", "", ""))
    tp = r.get("templates")
    if tp:
        rows.append((f"vassal templates, N={tp['n']}: ms per template in-process (old, no deadline) "
                     "/ in a child with a deadline: wall, Emperor loop / plain .ini load",
                     f"{tp['inproc_ms_per_template']} / {tp['child_wall_ms_per_template']}, "
                     f"{tp['child_loop_ms_per_template']} / {tp['plain_ms_per_template']} ms "
                     f"({tp['forks']} children)", "", ""))
    rows += floor_rows.rows(r)
    rows += ussbench.rows(r)
    rows += frontbench.rows(r.get("front") or {})
    rows += healthbench.rows(r.get("health") or {})
    return rows


def render_table(rows) -> str:
    head = ("figure", "measured", "target", "")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def markdown(r: dict, rows) -> str:
    m = r["machine"]
    v = m["versions"]
    out = [
        f"# psgi-forkserver benchmark, {r['mode']} run, {r['started']}",
        "",
        f"Command: `{r['command']}` (took {r.get('duration_s', 0):.0f} s)",
        "",
        "## Machine",
        "",
        f"- `{m['uname']}`",
        f"- CPU: {m['cpu_model']}, {m['cores']} cores; memory {m['memory_bytes'] / 1024**3:.1f} GiB; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
        f"- perl {v['perl']}, Plack {v['plack']}, Starman {v['starman']}, uWSGI {v['uwsgi']}, "
        f"python {v['python']}, psutil {v['psutil']}, {v['wrk']}",
        "",
        "## Results",
        "",
        render_table(rows),
        "",
    ]
    if r.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in r["errors"]] + [""]
    out += [
        "## Notes",
        "",
        "- Adoption: the bench process is the subreaper and talks to a base vassal directly "
        "(`psgi_forkserver.adoption.adopt`), timing from before the request to the first HTTP 200 "
        "on the adopted vassal's port (connect/GET retried every 0.2 ms). Every sample is counted, "
        "the first one included.",
        "- Cold starts: fork+exec to first HTTP 200; the exact commands are in the JSON.",
        "- Memory: PSS (psutil `memory_full_info`) summed over every process under the Emperor "
        "(base vassal, adopted vassals, their workers), each vassal having served one request.",
        "- Serving: the adopted vassal runs with `--disable-logging` because `starman` "
        "(environment `deployment`) writes no access log; both get a wrk warm-up first (Starman "
        "compiles the app in each worker on its first request).",
        "",
    ]
    return "\n".join(out)
