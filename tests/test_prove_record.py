"""What an `emperor prove` run gives the next one: with --state (.prove)
or without (its own record in $XDG_CACHE_HOME/emperor-prove/), the preload
of what the files loaded, the files to start cold, and with -j2 the
slowest first; also with --no-preload (the order, not a preload)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import yaml

from support import EMPEROR
from support.prove import run_in, verdicts


def record_of(project: Path) -> Path:
    """The record a run without --state keeps of a project (by directory)."""
    return (Path(os.environ["XDG_CACHE_HOME"]) / "emperor-prove"
            / f"{hashlib.md5(str(project.resolve()).encode()).hexdigest()}.yml")


def slowest_recorded(project: Path) -> str:
    """The file the record says was slowest. On a loaded machine a file
    run cold can outlast the one that sleeps 0.5 s: the order is judged by
    what was recorded, not by which file was meant to be slow."""
    times = {name: t["elapsed"] for name, t in yaml.safe_load(record_of(project).read_text())["tests"].items()}
    assert times["t/z_slow.t"] >= 0.5, times
    return max(times, key=times.__getitem__)


def project_with_a_deep_module(root: Path) -> None:
    """lib/Proj.pm, which loads Proj::Deep only when called (no `use` line
    names it), and t/a.t, b.t, c.t, which call it."""
    (root / "lib" / "Proj").mkdir(parents=True)
    (root / "t").mkdir()
    (root / "lib" / "Proj.pm").write_text(
        "package Proj;\nsub deep { require Proj::Deep; Proj::Deep::answer() }\n1;\n")
    (root / "lib" / "Proj" / "Deep.pm").write_text("package Proj::Deep;\nsub answer { 42 }\n1;\n")
    for name in ("a", "b", "c"):
        (root / "t" / f"{name}.t").write_text(
            "use strict;\nuse warnings;\nuse Test::More tests => 1;\nuse Proj;\n"
            "is Proj::deep(), 42, 'deep';\n")


def test_state_gives_the_next_run_its_preload_and_its_order(tmp_path: Path) -> None:
    """With --state, a run records what each forked file loaded (.prove's
    emperor_loads); the next run preloads what most files loaded, also
    modules no `use` line names, and with -j2 runs the slowest files
    first, from prove's own times: also from a .prove that prove wrote.
    Verdicts stay prove's."""
    project_with_a_deep_module(tmp_path)
    (tmp_path / "t" / "z_slow.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "select undef, undef, undef, 0.8;\nok 1, 'slow';\n")
    cmd = [EMPEROR, "prove", "-l", "-j2", "--state=save", "t"]
    want = verdicts(run_in(tmp_path, ["prove", "-l", "t"]).stdout)
    assert want == {f"t/{n}.t": "ok" for n in ("a", "b", "c", "z_slow")}

    # prove's own .prove (times, no records of ours): the order comes from it
    assert run_in(tmp_path, ["prove", "-l", "-j2", "--state=save", "t"]).returncode == 0
    dry = run_in(tmp_path, [EMPEROR, "prove", "-l", "-j2", "--state=save", "-D", "t"])
    assert dry.stdout.split()[0] == "t/z_slow.t", dry.stdout
    dry_j1 = run_in(tmp_path, [EMPEROR, "prove", "-l", "--state=save", "-D", "t"])
    assert dry_j1.stdout.split()[0] == "t/a.t", dry_j1.stdout  # one job: prove's order

    first = run_in(tmp_path, cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "preloaded (what most test files use): Test::More, Proj\n" in first.stderr, first.stderr
    assert verdicts(first.stdout) == want
    state = (tmp_path / ".prove").read_text()
    assert re.search(r"emperor_loads: .*Proj/Deep\.pm", state), state

    second = run_in(tmp_path, cmd)
    assert second.returncode == 0, second.stdout + second.stderr
    line = [x for x in second.stderr.splitlines() if "preloaded" in x]
    assert len(line) == 1 and "(what most test files loaded last time, --state)" in line[0], second.stderr
    assert "Proj::Deep" in line[0] and "Test::More" in line[0], line
    assert verdicts(second.stdout) == want


def test_the_next_run_preloads_what_the_last_one_loaded(tmp_path: Path) -> None:
    """Without --state too: a run keeps, in $XDG_CACHE_HOME/emperor-prove/
    (not in the project), what each forked file loaded and which files had
    to run cold, and their times; the next run in that directory preloads
    what most files loaded, also modules no `use` line names, starts the
    cold ones cold and, with -j2, the slowest first. `--no-learn` neither
    keeps nor uses it. Verdicts stay prove's."""
    project_with_a_deep_module(tmp_path)
    (tmp_path / "t" / "d_base_sensitive.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "ok !defined &ForkServer::Prove::TestFile::serve, 'fails in a fork of the base';\n")
    (tmp_path / "t" / "z_slow.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "select undef, undef, undef, 0.5;\nok 1, 'slow';\n")
    cmd = [EMPEROR, "prove", "-l", "-j2", "t"]
    want = verdicts(run_in(tmp_path, ["prove", "-l", "t"]).stdout)
    assert want == {f"t/{n}.t": "ok" for n in ("a", "b", "c", "d_base_sensitive", "z_slow")}

    first = run_in(tmp_path, cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "preloaded (what most test files use): Test::More, Proj\n" in first.stderr, first.stderr
    assert "t/d_base_sensitive.t failed or skipped forked and passed cold" in first.stderr
    assert verdicts(first.stdout) == want
    assert "Proj/Deep.pm" in record_of(tmp_path).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib", "t"]  # nothing in the project

    second = run_in(tmp_path, cmd)
    assert second.returncode == 0, second.stdout + second.stderr
    line = [x for x in second.stderr.splitlines() if "preloaded" in x]
    assert len(line) == 1 and "(what most test files loaded last time)" in line[0], second.stderr
    assert "Proj::Deep" in line[0] and "Test::More" in line[0], line
    assert "t/d_base_sensitive.t runs forked from a bare base (none of the suite's modules loaded): last run" \
        in second.stderr, second.stderr
    assert verdicts(second.stdout) == want
    # with -j2, the slowest first, by the last run's times; one job: prove's order
    assert run_in(tmp_path, [*cmd, "-D"]).stdout.split()[0] == slowest_recorded(tmp_path)
    assert run_in(tmp_path, [EMPEROR, "prove", "-l", "-D", "t"]).stdout.split()[0] == "t/a.t"

    forgetful = run_in(tmp_path, [*cmd[:2], "--no-learn", *cmd[2:]])
    assert forgetful.returncode == 0, forgetful.stdout + forgetful.stderr
    assert "preloaded (what most test files use): Test::More, Proj\n" in forgetful.stderr, forgetful.stderr
    assert verdicts(forgetful.stdout) == want


def test_no_preload_runs_the_slowest_first_from_the_last_run(tmp_path: Path) -> None:
    """--no-preload preloads nothing, but keeps and uses the record of the
    last run for its order: with -j2 the slowest file first (a long file
    started last is the run's tail, whatever the preload)."""
    project_with_a_deep_module(tmp_path)
    (tmp_path / "t" / "z_slow.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "select undef, undef, undef, 0.5;\nok 1, 'slow';\n")
    cmd = [EMPEROR, "prove", "--no-preload", "-l", "-j2", "t"]
    first = run_in(tmp_path, cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "preloaded" not in first.stderr, first.stderr
    assert run_in(tmp_path, [*cmd, "-D"]).stdout.split()[0] == slowest_recorded(tmp_path)
    second = run_in(tmp_path, cmd)
    assert second.returncode == 0, second.stdout + second.stderr
    assert verdicts(second.stdout) == verdicts(run_in(tmp_path, ["prove", "-l", "t"]).stdout)
    assert run_in(tmp_path, [EMPEROR, "prove", "--no-preload", "-l", "-D", "t"]).stdout.split()[0] == "t/a.t"


def project_with_an_order_sensitive_test_library(root: Path) -> None:
    """DBIx-Class's shape: the files `use` only their own t/lib library,
    which insists on being loaded before the project's module (as
    DBICTest::RunMode does before DBIx::Class); nothing breaks until a
    learned preload puts the project's module in the base."""
    (root / "lib" / "Proj").mkdir(parents=True)
    (root / "t" / "lib" / "ProjTest").mkdir(parents=True)
    (root / "lib" / "Proj.pm").write_text("package Proj;\nuse Proj::Deep;\nsub answer { Proj::Deep::answer() }\n1;\n")
    (root / "lib" / "Proj" / "Deep.pm").write_text("package Proj::Deep;\nsub answer { 42 }\n1;\n")
    (root / "t" / "lib" / "ProjTest.pm").write_text("package ProjTest;\nuse ProjTest::RunMode;\nuse Proj;\n1;\n")
    (root / "t" / "lib" / "ProjTest" / "RunMode.pm").write_text(
        "package ProjTest::RunMode;\n"
        "die \"ProjTest::RunMode must be loaded before Proj\\n\" if $INC{'Proj.pm'};\n1;\n")
    for name in ("a", "b", "c", "d"):
        (root / "t" / f"{name}.t").write_text(
            "use strict;\nuse warnings;\nuse lib 't/lib';\nuse Test::More tests => 1;\nuse ProjTest;\n"
            "is Proj::answer(), 42, 'answer';\n")


def test_a_learned_preload_that_breaks_files_is_not_learned_again(tmp_path: Path) -> None:
    """When what a run newly preloaded makes files fail forked that passed
    forked the run before (they pass cold: prove's verdicts), the failure
    is put down to those modules, not to the files: the next run leaves
    them out of its preload and forks the files again, rather than starting
    every such file cold or from the bare base from then on."""
    project_with_an_order_sensitive_test_library(tmp_path)
    cmd = [EMPEROR, "prove", "-l", "-j2", "t"]
    want = verdicts(run_in(tmp_path, ["prove", "-l", "t"]).stdout)
    assert want == {f"t/{n}.t": "ok" for n in "abcd"}

    first = run_in(tmp_path, cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "failed or skipped forked" not in first.stderr, first.stderr
    second = run_in(tmp_path, cmd)  # learns Proj: every file fails forked, passes cold
    assert second.returncode == 0, second.stdout + second.stderr
    assert verdicts(second.stdout) == want
    learned = [x for x in second.stderr.splitlines() if x.startswith("emperor prove: preloaded (")]
    assert len(learned) == 1 and "Proj" in learned[0], second.stderr
    assert "t/a.t failed forked and passed cold, with Proj, Proj::Deep newly preloaded" in second.stderr, \
        second.stderr

    third = run_in(tmp_path, cmd)
    assert third.returncode == 0, third.stdout + third.stderr
    assert verdicts(third.stdout) == want
    line = [x for x in third.stderr.splitlines() if x.startswith("emperor prove: preloaded (")]
    assert len(line) == 1 and "Proj" not in line[0], third.stderr
    assert "runs cold" not in third.stderr and "bare base" not in third.stderr, third.stderr
    assert "failed or skipped forked" not in third.stderr, third.stderr


def test_a_module_that_breaks_few_of_its_files_stays_preloaded(tmp_path: Path) -> None:
    """When the newly preloaded module broke fewer than a tenth of the
    files that load it, the next run keeps it preloaded and forks the file
    it broke from the bare base (none of the suite's modules loaded)."""
    project_with_an_order_sensitive_test_library(tmp_path)
    for name in "bcd":
        (tmp_path / "t" / f"{name}.t").unlink()
    (tmp_path / "t" / "lib" / "ProjLoader.pm").write_text("package ProjLoader;\nuse Proj;\n1;\n")
    for i in range(11):
        (tmp_path / "t" / f"p{i:02}.t").write_text(
            "use strict;\nuse warnings;\nuse lib 't/lib';\nuse Test::More tests => 1;\nuse ProjLoader;\n"
            "is Proj::answer(), 42, 'answer';\n")
    cmd = [EMPEROR, "prove", "-l", "-j2", "t"]
    for _ in range(2):
        run = run_in(tmp_path, cmd)
        assert run.returncode == 0, run.stdout + run.stderr
    assert "t/a.t failed forked and passed cold, with Proj, Proj::Deep newly preloaded" in run.stderr, run.stderr

    third = run_in(tmp_path, cmd)
    assert third.returncode == 0, third.stdout + third.stderr
    assert len(verdicts(third.stdout)) == 12 and set(verdicts(third.stdout).values()) == {"ok"}
    line = [x for x in third.stderr.splitlines() if x.startswith("emperor prove: preloaded (")]
    assert len(line) == 1 and "Proj" in line[0], third.stderr
    assert ("t/a.t runs forked from a bare base (none of the suite's modules loaded): last run: "
            "it failed or skipped forked and passed cold (Proj, Proj::Deep preloaded)") in third.stderr, third.stderr
    assert "failed or skipped forked" not in third.stderr.replace("last run: it failed or skipped forked", "")


def test_a_module_that_acts_on_every_test_as_it_loads_is_not_preloaded(tmp_path: Path) -> None:
    """A module that installs a $SIG{__WARN__} handler as it loads, and has
    an END block that adds a test (as Test::Warnings does): a base that
    loaded it would give every forked test its END block, also the files
    that do not use it, and its handler to none. The automatic preload
    leaves it out, from the `use` lines and from what the last run loaded,
    and says why; the files are forked with prove's verdicts."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "lib" / "WarnCount.pm").write_text(
        "package WarnCount;\nuse strict;\nuse warnings;\nuse Test::More ();\n"
        "my $seen = 0;\n$SIG{__WARN__} = sub { $seen++ };\n"
        "END { Test::More::is($seen, 1, 'one warning, counted') }\n1;\n")
    for name in ("a_counts", "c_counts"):  # two files: a module one file alone uses is never preloaded
        (tmp_path / "t" / f"{name}.t").write_text(
            "use strict;\nuse warnings;\nuse WarnCount;\nuse Test::More tests => 2;\n"
            "warn qq{a warning\\n};\nok 1, 'warned';\n")
    (tmp_path / "t" / "b_plain.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\nok 1, 'plain';\n")
    want = verdicts(run_in(tmp_path, ["prove", "-l", "t"]).stdout)
    assert want == {"t/a_counts.t": "ok", "t/b_plain.t": "ok", "t/c_counts.t": "ok"}
    # --no-cold-retry: a file that fails forked must not be hidden by its cold rerun
    cmd = [EMPEROR, "prove", "--no-cold-retry", "-l", "t"]
    for run, source in ((1, "use"), (2, "loaded last time")):
        ours = run_in(tmp_path, cmd)
        assert verdicts(ours.stdout) == want, (run, ours.stdout + ours.stderr)
        assert ours.returncode == 0
        assert "emperor prove: not preloading WarnCount: it installs $SIG{__WARN__} as it loads\n" \
            in ours.stderr, (run, ours.stderr)
        line = [x for x in ours.stderr.splitlines() if "preloaded (" in x]
        assert len(line) == 1 and f"(what most test files {source})" in line[0], (run, ours.stderr)
        assert "Test::More" in line[0] and "WarnCount" not in line[0], line
    assert "WarnCount" in record_of(tmp_path).read_text()  # learned, and still left out


# (a test file's lines) each run adds a line to MARKER_DIR/runs: forked
# (ForkServer's code is in the process) or cold
SAYS_HOW_IT_RUNS = ("BEGIN { open my $fh, '>>', \"$ENV{MARKER_DIR}/runs\" or die;\n"
                    "  print $fh (defined &ForkServer::Prove::TestFile::serve ? \"forked\\n\" : \"cold\\n\") }\n")


def test_a_file_that_skips_itself_whole_runs_once_when_nothing_is_preloaded(tmp_path: Path) -> None:
    """With --no-preload (and from the bare base) the base holds none of the
    suite's modules: a file that skips itself (an unset variable, a missing
    optional module) skips as it would under prove, and is not run a second
    time cold; with a preload it still is, since the preload may be what it saw,
    and when it skipped cold too, the next runs start it cold, once."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "lib" / "Proj.pm").write_text("package Proj;\nsub answer { 42 }\n1;\n")
    (tmp_path / "t" / "a.t").write_text("use strict;\nuse warnings;\nuse Test::More tests => 1;\nok 1;\n")
    (tmp_path / "t" / "b_skips.t").write_text(
        f"use strict;\nuse warnings;\nuse Test::More;\n{SAYS_HOW_IT_RUNS}"
        "plan skip_all => 'PROJ_ONLINE is not set' unless $ENV{PROJ_ONLINE};\nok 1;\ndone_testing;\n")
    runs = tmp_path / "runs"
    # with a preload, --state remembers that it skipped cold too: from then
    # on it starts cold, once, as under prove
    for preload, want in ((["--no-preload"], "forked\n"), (["--no-preload"], "forked\n"),
                          (["--preload", "Proj"], "forked\ncold\n"), (["--preload", "Proj"], "cold\n"),
                          (["--preload", "Proj"], "cold\n")):
        runs.unlink(missing_ok=True)
        got = run_in(tmp_path, [EMPEROR, "prove", *preload, "--state=save", "-l", "t"])
        assert got.returncode == 0, got.stdout + got.stderr
        assert verdicts(got.stdout) == {"t/a.t": "ok", "t/b_skips.t": "skipped"}, got.stdout
        assert runs.read_text() == want, (preload, got.stderr)


def test_a_file_that_failed_forked_and_cold_starts_cold_until_it_passes(tmp_path: Path) -> None:
    """A file that fails forked is run again cold (the fork may be what it
    failed on); when it fails cold too, the record keeps it, and the next
    run starts it cold at once, as prove would (not twice), until it passes."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.t").write_text("use strict;\nuse warnings;\nuse Test::More tests => 1;\nok 1;\n")
    (tmp_path / "t" / "b_fails.t").write_text(
        f"use strict;\nuse warnings;\nuse Test::More tests => 1;\n{SAYS_HOW_IT_RUNS}ok $ENV{{FIX}}, 'FIX is set';\n")
    runs = tmp_path / "runs"
    for fix, want, status in (("", "forked\ncold\n", 1), ("", "cold\n", 1), ("1", "cold\n", 0), ("1", "forked\n", 0)):
        runs.unlink(missing_ok=True)
        got = run_in(tmp_path, [EMPEROR, "prove", "--no-preload", "-l", "t"], FIX=fix)
        assert got.returncode == status, got.stdout + got.stderr
        assert runs.read_text() == want, (fix, want, got.stderr)


def test_a_module_one_file_alone_loads_is_not_preloaded(tmp_path: Path) -> None:
    """In a suite of a few files, a tenth of them is one file: what that one
    file alone loads (a prerequisites report loading hundreds of modules)
    would be preloaded for all of them, paid before any file runs. Two
    files at least must load a module, in the first run (their `use`
    lines) and in the next (what they loaded)."""
    (tmp_path / "lib" / "Proj").mkdir(parents=True)
    (tmp_path / "t").mkdir()
    (tmp_path / "lib" / "Proj" / "Report.pm").write_text("package Proj::Report;\nsub n { 7 }\n1;\n")
    for name in ("a", "b", "c"):
        (tmp_path / "t" / f"{name}.t").write_text("use strict;\nuse Test::More tests => 1;\nok 1;\n")
    (tmp_path / "t" / "report.t").write_text(
        "use strict;\nuse Test::More tests => 1;\nuse Proj::Report;\nis Proj::Report::n(), 7;\n")
    cmd = [EMPEROR, "prove", "-l", "-j2", "t"]
    for run in ("first", "learned"):
        r = run_in(tmp_path, cmd)
        assert r.returncode == 0, r.stdout + r.stderr
        line = [x for x in r.stderr.splitlines() if "preloaded" in x]
        assert len(line) == 1 and "Test::More" in line[0], (run, r.stderr)
        assert "Proj::Report" not in line[0], (run, line)
