"""The table rows of `--only floor` (bench/fleet_floor.py's results):
the floor, what it copies, the mass start against it, and where its CPU
went; the same again for `master = false` vassals when they were run."""

from __future__ import annotations

from anatomy import anatomy_line
from fleet_floor import floor_for


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Table rows of `--only floor`."""
    x = r.get("floor_profile")
    if not x:
        return []
    out = _rows(x, x.get("floor"), x.get("burst"))
    if x.get("floor_solo") or x.get("burst_solo"):
        out += [("master = false: " + row[0], *row[1:])
                for row in _rows(x, x.get("floor_solo"), x.get("burst_solo"))]
    return out


def _rows(x: dict, fl: dict | None, b: dict | None) -> list[tuple[str, str, str, str]]:
    out = []
    if fl:
        c = fl["mean_cpu_ms"]
        out.append(("floor: one heavy adoption at a time (no spares, socket bound by the requester), CPU: "
                    "base's clone + vassal master (start-up, worker fork) + worker, to its first 200 on /hello",
                    f"{c['base_cpu_ms']:.2f} + {c['master_cpu_ms']:.2f} + {c['worker_cpu_ms']:.2f} = "
                    f"{fl['cpu_per_vassal_ms']:.2f} ms; faults {fl['base_faults']['p50']:.0f} + "
                    f"{fl['master_faults']['p50']:.0f} + {fl['worker_faults']['p50']:.0f}; "
                    f"wall p50 {fl['wall_ms']['p50']:.2f} ms", "", ""))
        if fl.get("anatomy"):
            out.append(("  what the floor copies: the base's memory in 2 MB pages (one page-table entry each), "
                        "and the pages the last vassal's master and worker own as it answers (copied on write)",
                        anatomy_line(fl["anatomy"]), "", ""))
        out.append(("floor of 1,000 heavy vassals answering: base start-up + 1,000 x that CPU / "
                    f"{fl['cores']} cores", f"{floor_for(fl, 1000):.2f} s "
                    f"(base ready at {fl['base_ready_s']:.2f} s)", "5 s", ""))
    if b and "all_200_s" in b:
        load = x.get("load_average_at_start", [0])[0]
        out.append((f"`emperor run`, {b['n']} heavy vassals -> all answering /hello (load average {load:.1f} "
                    "at start)", f"{b['all_200_s']:.2f} s (base listening {b['base_listening_s']:.2f} s)"
                    + (f"; floor {b['floor_s']:.2f} s" if "floor_s" in b else ""),
                    "5 s at 1,000", ""))
        roles = b["by_role"]
        out.append((f"  where the CPU went ({b['n']} vassals; machine busy "
                    f"{100 * b['machine_busy_fraction']:.0f} % of the burst"
                    + (f", {b['machine_cpu_s']:.1f} CPU-s in all, ours {b['cpu_total_s']:.1f}" if "machine_cpu_s" in b
                       else "") + ")",
                    "; ".join(f"{k} {v['cpu_s']:.2f} s" + (f" ({1000 * v['cpu_s'] / b['n']:.1f} ms each)"
                                                            if k in ("masters", "workers") else "")
                              for k, v in roles.items()), "", ""))
        rq = b.get("run_queue")
        if rq:
            out.append(("  the serial steps after the base listened: time on a core / runnable but waiting for one",
                        "; ".join(f"{k} {v['ran_s']:.2f} / {v['waited_s']:.2f} s of {v['over_s']:.2f} s"
                                  for k, v in rq.items()), "", ""))
        ew = b.get("elsewhere")
        if ew:
            out.append(("  the rest of the machine's busy time over the burst",
                        f"kernel threads {ew['kernel_threads_cpu_s']:.2f} s, the bench client "
                        f"{ew['bench_client_cpu_s']:.2f} s, other processes {ew['other_processes_cpu_s']:.2f} s ("
                        + ", ".join(f"{c} {s:g}" for c, s in ew["other_processes_top"]) + ")", "", ""))
        if b.get("emperor_hot"):
            out.append(("  the Emperor's hottest functions (py-spy, share of samples)",
                        ", ".join(f"{fn} {pct:g} %" for fn, pct in b["emperor_hot"][3:9]), "", ""))
    return out
