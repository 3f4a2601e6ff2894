"""Test harnesses: prove, yath and `emperor prove` on a heavy synthetic
suite and on Plack's own t/ (scenarios `prove` and `plack`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path

from benchlib import BenchError, Procs
from settings import Bench, EMPEROR, HERE, say


PROVE_TEST = """use strict;
use warnings;
use Test::More;
use HeavyStack;
my $dt = DateTime->new(year => 2026, month => 11, day => {day}, time_zone => 'Europe/Paris');
is $dt->day, {day}, 'DateTime';
is_deeply(JSON::XS->new->decode('{{"n":{n}}}'), {{n => {n}}}, 'JSON::XS');
ok(Moose::Meta::Class->create_anon_class, 'Moose');
done_testing;
"""

PROVE_VERDICT = re.compile(r"^(\S+\.t) \.+ (ok|skipped.*)$", re.M)


def prove_runners(procs: Procs, tmp: Path, n: int) -> dict:
    """N test files that each load the heavy stack, run by prove -j2, yath
    test -j2 and emperor prove -j2, the last two preloading the same modules
    (Test::More and the stack)."""
    say(f"test harnesses: {n} test files loading the heavy stack, -j2: prove, yath, emperor prove")
    suite = tmp / "prove-suite"
    (suite / "t").mkdir(parents=True)
    for i in range(n):
        (suite / "t" / f"heavy{i:02d}.t").write_text(PROVE_TEST.format(day=1 + i % 28, n=i))
    lib = str(HERE / "prove")
    runners = {
        "prove": ["prove", "-j2", "-I", lib, "t"],
        "yath": ["yath", "test", "-j2", "-I", lib, "-PTest::More", "-PHeavyStack", "t"],
        "emperor prove": [EMPEROR, "prove", "-j2", "-I", lib, "--preload", "Test::More", "--preload", "HeavyStack", "t"],
    }
    res: dict = {"files": n}
    for name, argv in runners.items():
        log = tmp / f"harness-{name.replace(' ', '-')}.log"
        t0 = time.perf_counter()
        p = procs.spawn(argv, log=log.stem, cwd=suite)
        procs.wait(p.pid, 900)
        wall = time.perf_counter() - t0
        status = procs.status.get(p.pid)
        out = log.read_text(errors="replace")
        passed = len(PROVE_VERDICT.findall(out)) if name != "yath" else n * ("Result: PASSED" in out)
        res[name] = {"wall_s": wall, "exit": None if status is None else os.waitstatus_to_exitcode(status),
                     "files_passed": passed, "command": shlex.join(argv)}
        say(f"  {name}: {wall:.2f} s, exit {res[name]['exit']}, {passed}/{n} files passed")
        if res[name]["exit"] != 0:
            raise BenchError(f"{name} failed (exit {res[name]['exit']}), see {log}")
    res["prove_over_emperor"] = res["prove"]["wall_s"] / res["emperor prove"]["wall_s"]
    res["yath_over_emperor"] = res["yath"]["wall_s"] / res["emperor prove"]["wall_s"]
    return res


PLACK_SRC = HERE / "plack-src"
DEB_SRC = Path("/etc/apt/sources.list.d/psgi-forkserver-deb-src.sources")
YATH_VERDICT = re.compile(r"^\( *(PASSED|FAILED|SKIPPED) *\)\s+job\s+\d+\s+(\S+\.t)", re.M)


def plack_source() -> Path:
    """Plack's source at the version Debian ships (`apt-get source
    libplack-perl`, once, into bench/plack-src/; a deb-src line for the
    system's own Debian suites is added if there is none)."""
    found = sorted(PLACK_SRC.glob("libplack-perl-*/t"))
    if found:
        return found[-1].parent
    has_src = any("deb-src" in f.read_text(errors="replace")
                  for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
                  if f.is_file())
    if not has_src:
        main = Path("/etc/apt/sources.list.d/debian.sources").read_text()
        stanza = next(s for s in main.split("\n\n") if "debian-security" not in s)
        DEB_SRC.write_text(stanza.replace("Types: deb", "Types: deb-src").strip() + "\n")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
    PLACK_SRC.mkdir(exist_ok=True)
    subprocess.run(["apt-get", "source", "-qq", "libplack-perl"], cwd=PLACK_SRC, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    return sorted(PLACK_SRC.glob("libplack-perl-*/t"))[-1].parent


def plack_suite(procs: Procs, tmp: Path) -> dict:
    """Plack's own t/ (150 files, written by Plack's authors) by prove -j2,
    yath test -j2 and emperor prove -j2, the last two preloading what the
    suite loads; per-file verdicts compared with prove's."""
    src = plack_source()
    say(f"Plack's t/ ({src.name}): prove, yath, emperor prove, -j2")
    preload = HERE / "prove" / "plack-preload.pl"
    modules = [m for m in re.findall(r"^use ([\w:]+) \(\);", preload.read_text(), re.M)
               if m not in ("strict", "warnings")]
    runners = {
        "prove": ["prove", "-j2", "-I", "lib", "-r", "t"],
        "yath": ["yath", "test", "-j2", "-I", "lib", *(f"-P{m}" for m in modules), "t"],
        "emperor prove": [EMPEROR, "prove", "-j2", "-I", "lib", "--preload", str(preload), "-r", "t"],
    }
    res: dict = {"source": src.name}
    for name, argv in runners.items():
        log = tmp / f"plack-{name.replace(' ', '-')}.log"
        t0 = time.perf_counter()
        p = procs.spawn(argv, log=log.stem, cwd=src)
        procs.wait(p.pid, 900)
        wall = time.perf_counter() - t0
        out = log.read_text(errors="replace")
        if name == "yath":
            verdicts = {f: v.lower().replace("passed", "ok") for v, f in YATH_VERDICT.findall(out)}
        else:
            verdicts = {m.group(1): ("ok" if m.group(2) == "ok" else "skipped" if m.group(2).startswith("skipped")
                                     else "FAIL")
                        for m in re.finditer(r"^(\S+\.t) \.+ ?(.*)$", out, re.M)}
        status = procs.status.get(p.pid)
        res[name] = {"wall_s": wall, "exit": None if status is None else os.waitstatus_to_exitcode(status),
                     "files": len(verdicts), "failed": sorted(f for f, v in verdicts.items() if v.upper() == "FAIL"
                                                              or v == "failed"),
                     "verdicts": verdicts, "command": shlex.join(argv)}
        say(f"  {name}: {wall:.2f} s, exit {res[name]['exit']}, {len(verdicts)} files, failed: {res[name]['failed']}")
    p_v, e_v = res["prove"]["verdicts"], res["emperor prove"]["verdicts"]
    res["same_verdicts_as_prove"] = p_v == e_v
    res["differ_from_prove"] = sorted(f for f in set(p_v) | set(e_v) if p_v.get(f) != e_v.get(f))
    res["yath_differ_from_prove"] = sorted(
        f for f in p_v if ("ok" if p_v[f] == "ok" else "skipped" if p_v[f] == "skipped" else "failed")
        != res["yath"]["verdicts"].get(f))
    return res


def run_prove(b: Bench) -> None:
    """Scenario `prove`."""
    b.results["prove"] = b.step("prove", lambda: prove_runners(b.procs, b.tmp, b.sizes.prove_files))


def run_plack(b: Bench) -> None:
    """Scenario `plack`."""
    b.results["plack"] = b.step("plack", lambda: plack_suite(b.procs, b.tmp))
