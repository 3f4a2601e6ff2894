"""`emperor prove`'s command line, whole: prove's options with prove's
meaning, .proverc, --state, archives, shards, yath's timeout markers; the
fixed cost of a run. (What a run gives the next: test_prove_record.py.)"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from support import EMPEROR
from support.prove import PRELOADS, ROOT, SUITE, run_in


# -- prove's command line, whole --------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small distribution: lib/ (needs -l), t/ with a passing, a failing
    (unless FIX=1) and a stderr-writing file, and a module prove's -M loads
    into prove itself (it writes a marker file when loaded)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "lib" / "Proj.pm").write_text("package Proj;\nsub answer { 42 }\n1;\n")
    (tmp_path / "prove_lib").mkdir()  # in prove's own @INC (PERL5LIB), as -M needs
    (tmp_path / "prove_lib" / "LoadedIntoProve.pm").write_text(
        "package LoadedIntoProve;\nopen my $fh, '>', $ENV{MARKER_DIR} . \"/loaded-$$\" or die;\n1;\n")
    (tmp_path / "t" / "a_uses_lib.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 2;\nuse Proj;\n"
        "is Proj::answer(), 42, 'lib/ is in @INC';\n"
        "ok !$INC{'LoadedIntoProve.pm'}, \"prove's -M is not loaded into tests\";\n")
    (tmp_path / "t" / "b_flaky.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\nuse Proj;\nok $ENV{FIX}, 'FIX is set';\n")
    (tmp_path / "t" / "c_stderr.t").write_text(
        "use strict;\nuse warnings;\nprint STDERR qq{stderr-marker\\n};\nprint qq{1..1\\nok 1\\n};\n")
    return tmp_path


def test_prove_options_have_proves_meaning(project: Path) -> None:
    """-l, -M (into prove, not the tests), --merge, --timer, --formatter,
    -s, -w, -q, -Q, -f, -o, --ext, -D: accepted, prove's meaning."""
    ours = run_in(project, [EMPEROR, "prove", "-l", "-MLoadedIntoProve", "t/a_uses_lib.t"],
                  PERL5LIB=str(project / "prove_lib"))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "All tests successful." in ours.stdout
    assert list(project.glob("loaded-*")), "-M loads the module into prove"
    refused = run_in(project, [EMPEROR, "prove", "t/a_uses_lib.t"])  # no -l: as prove, it fails
    assert refused.returncode == 1 and "Can't locate Proj.pm" in refused.stderr
    # --merge: the test's stderr is in its TAP stream (stdout), else on stderr
    # (--preload: a fork even for one file)
    merged = run_in(project, [EMPEROR, "prove", "--preload", "Test::More", "-v", "--merge", "t/c_stderr.t"])
    assert "stderr-marker" in merged.stdout and "stderr-marker" not in merged.stderr
    apart = run_in(project, [EMPEROR, "prove", "--preload", "Test::More", "-v", "t/c_stderr.t"])
    assert "stderr-marker" in apart.stderr and "stderr-marker" not in apart.stdout
    timed = run_in(project, [EMPEROR, "prove", "-l", "--timer", "-s", "-w", "-f", "-o", "--ext", ".t",
                             "--formatter", "TAP::Formatter::File", "t"], FIX="1")
    assert timed.returncode == 0, timed.stdout + timed.stderr
    assert re.search(r"^\[\d\d:\d\d:\d\d\] t/a_uses_lib\.t \.+ ok +\d+ ms", timed.stdout, re.M), timed.stdout
    quiet = run_in(project, [EMPEROR, "prove", "-l", "-Q", "t"], FIX="1")
    assert "a_uses_lib" not in quiet.stdout and "Result: PASS" in quiet.stdout
    dry = run_in(project, [EMPEROR, "prove", "-D", "t"])
    assert dry.stdout.split() == ["t/a_uses_lib.t", "t/b_flaky.t", "t/c_stderr.t"]


def test_proverc_and_norc(project: Path) -> None:
    (project / ".proverc").write_text("-l\n")
    ours = run_in(project, [EMPEROR, "prove", "t/a_uses_lib.t"])
    assert ours.returncode == 0, ours.stdout + ours.stderr
    norc = run_in(project, [EMPEROR, "prove", "--norc", "t/a_uses_lib.t"])
    assert norc.returncode == 1 and "Can't locate Proj.pm" in norc.stderr


def test_state_save_and_failed(project: Path) -> None:
    first = run_in(project, [EMPEROR, "prove", "-l", "--state=save", "t"])
    assert first.returncode == 1
    assert (project / ".prove").exists()
    again = run_in(project, [EMPEROR, "prove", "-l", "--state=failed,save"], FIX="1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.findall(r"^(t/\S+) \.+", again.stdout, re.M) == ["t/b_flaky.t"]


def test_archive(project: Path) -> None:
    import tarfile

    ours = run_in(project, [EMPEROR, "prove", "-l", "-a", "run.tgz", "t"], FIX="1")
    assert ours.returncode == 0, ours.stdout + ours.stderr
    with tarfile.open(project / "run.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("a_uses_lib.t") for n in names), names


def test_harness_perl_switches_and_perl5opt_apply_to_tests() -> None:
    """HARNESS_PERL_SWITCHES=-MModule and PERL5OPT=-w reach the test, as
    under prove (a switch a fork cannot take makes the file run cold)."""
    env = {"HARNESS_PERL_SWITCHES": "-MSwitchProbe", "PERL5OPT": "-w",
           "PERL5LIB": str(ROOT / SUITE / "lib")}
    for argv in (["prove"], [EMPEROR, "prove", *PRELOADS]):
        full = {**os.environ, **env}
        full.pop("HARNESS_ACTIVE", None)
        got = subprocess.run([*argv, f"{SUITE}/switches"], cwd=ROOT, env=full, capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert got.returncode == 0, (argv, got.stdout, got.stderr)
        assert "All tests successful." in got.stdout


def test_a_file_that_fails_forked_and_passes_cold(project: Path) -> None:
    """Its verdict is the cold run's, stderr says so, and --state remembers
    it: the next run starts it cold."""
    (project / "t" / "d_base_sensitive.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "ok !defined &ForkServer::Prove::TestFile::serve, 'fails in a fork of the base';\n")
    # (--preload: a fork even for one file)
    first = run_in(project, [EMPEROR, "prove", "-l", "--preload", "Test::More", "--state=save",
                             "t/d_base_sensitive.t"])
    assert first.returncode == 0, first.stdout + first.stderr
    assert "t/d_base_sensitive.t failed or skipped forked and passed cold" in first.stderr
    assert "emperor_cold" in (project / ".prove").read_text()
    second = run_in(project, [EMPEROR, "prove", "-l", "--preload", "Test::More", "--state=save",
                              "t/d_base_sensitive.t"])
    assert second.returncode == 0
    # then from the bare base (none of the suite's modules loaded), where it
    # fails too: from the third run on, cold directly
    assert "t/d_base_sensitive.t runs forked from a bare base (none of the suite's modules loaded): --state" \
        in second.stderr, second.stderr
    assert "t/d_base_sensitive.t failed or skipped forked from a bare base and passed cold" in second.stderr
    third = run_in(project, [EMPEROR, "prove", "-l", "--preload", "Test::More", "--state=save",
                             "t/d_base_sensitive.t"])
    assert third.returncode == 0
    assert "t/d_base_sensitive.t runs cold: --state: it failed or skipped forked from a bare base" \
        in third.stderr, third.stderr
    strict = run_in(project, [EMPEROR, "prove", "-l", "--preload", "Test::More", "--no-cold-retry",
                              "t/d_base_sensitive.t"])
    assert strict.returncode == 1
    # a file that skips itself when it sees a module already loaded: prove
    # runs it, so it is run cold too
    (project / "t" / "e_skips_if_loaded.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More;\n"
        "BEGIN { plan skip_all => 'Proj is already loaded' if defined &Proj::answer }\n"
        "use Proj;\nplan tests => 1;\nok 1, 'ran';\n")
    skip = run_in(project, [EMPEROR, "prove", "-l", "--preload", "Proj", "t/e_skips_if_loaded.t"])
    assert re.search(r"^t/e_skips_if_loaded\.t \.+ ok$", skip.stdout, re.M), skip.stdout + skip.stderr
    assert "t/e_skips_if_loaded.t failed or skipped forked and passed cold" in skip.stderr


def test_automatic_preload_is_named_and_skipped_when_no_file_would_wait(project: Path) -> None:
    """With the preload left to emperor prove: stderr names the modules
    preloaded, in one line; a run of no more files than jobs runs them as
    prove does (a base would only load what they load)."""
    (project / "t" / "d_base_sensitive.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "ok !defined &ForkServer::Prove::TestFile::serve, 'not in a fork of the base';\n")
    whole = run_in(project, [EMPEROR, "prove", "-l", "t"], FIX="1")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    lines = [line for line in whole.stderr.splitlines() if "preloaded" in line]
    assert lines == ["emperor prove: preloaded (what most test files use): Test::More, Proj"], whole.stderr
    assert "d_base_sensitive.t failed or skipped forked" in whole.stderr  # the 4 files were forked
    for argv in (["t/d_base_sensitive.t"], ["-j2", "t/d_base_sensitive.t", "t/b_flaky.t"]):
        alone = run_in(project, [EMPEROR, "prove", "-l", *argv], FIX="1")
        assert alone.returncode == 0, alone.stdout + alone.stderr
        assert alone.stderr == "", alone.stderr  # no base, no preload, no cold retry
    quiet = run_in(project, [EMPEROR, "prove", "-l", "-q", "t"], FIX="1")
    assert "preloaded" not in quiet.stderr


def test_shard_splits_into_disjoint_balanced_parts(tmp_path: Path) -> None:
    t = tmp_path / "t"
    t.mkdir()
    for i, size in enumerate([9000, 7000, 5000, 3000, 2000, 1000, 500]):
        (t / f"f{i}.t").write_text("print qq{1..1\\nok 1\\n};\n" + "#" * size + "\n")
    parts = [run_in(tmp_path, [EMPEROR, "prove", "--shard", f"{i}/3", "-D", "t"]).stdout.split()
             for i in (1, 2, 3)]
    every = sorted(f for p in parts for f in p)
    assert every == sorted(f"t/f{i}.t" for i in range(7))  # each file in exactly one part
    assert all(parts)
    # by sizes: the three biggest go to different parts
    assert {tuple(sorted(p))[0] for p in parts} == {"t/f0.t", "t/f1.t", "t/f2.t"}
    # by a JUnit file's times: f6 took longest, it is alone in its part
    junit = tmp_path / "junit.xml"
    junit.write_text("<testsuites>" + "".join(
        f'<testsuite name="t/f{i}.t" time="{100 if i == 6 else 1}"/>' for i in range(7)) + "</testsuites>")
    timed = [run_in(tmp_path, [EMPEROR, "prove", "--shard", f"{i}/2", "--shard-times", str(junit),
                               "-D", "t"]).stdout.split() for i in (1, 2)]
    assert ["t/f6.t"] in timed
    bad = run_in(tmp_path, [EMPEROR, "prove", "--shard", "4/3", "t"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "emperor prove: --shard 4/3: I must be from 1 to N"]


def test_yath_timeout_markers(tmp_path: Path) -> None:
    """# HARNESS-NO-TIMEOUT lifts --timeout for its file;
    # HARNESS-TIMEOUT-EVENT N gives it N seconds more."""
    t = tmp_path / "t"
    t.mkdir()
    slow = "use strict;\nselect undef, undef, undef, 1.5;\nprint qq{1..1\\nok 1\\n};\n"
    (t / "a_plain.t").write_text(slow)
    (t / "b_no_timeout.t").write_text("# HARNESS-NO-TIMEOUT\n" + slow)
    (t / "c_more_time.t").write_text("# HARNESS-TIMEOUT-EVENT 30\n" + slow)
    ours = run_in(tmp_path, [EMPEROR, "prove", "-j3", "--timeout", "0.5", "t"])
    assert "t/a_plain.t: timed out after 0.5 s: killed" in ours.stderr
    assert re.search(r"^t/b_no_timeout\.t \.+ ok$", ours.stdout, re.M), ours.stdout
    assert re.search(r"^t/c_more_time\.t \.+ ok$", ours.stdout, re.M), ours.stdout
    assert ours.returncode == 1


def test_a_base_that_dies_mid_run_leaves_the_run_to_prove(tmp_path: Path) -> None:
    """The base killed while the run goes on (here by the first test file):
    `emperor prove` keeps prove's output and verdicts (the files after it
    run cold), no traceback, prove's exit status."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a_kill_base.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More;\n"
        "# the base this file was forked from: a child of its parent (the host)\n"
        "my $host = getppid;\nmy @base;\n"
        "for my $dir (glob '/proc/[0-9]*') {\n"
        "    open my $fh, '<', \"$dir/stat\" or next;\n    my $stat = <$fh> // next;\n"
        "    my ($ppid) = $stat =~ /\\) \\S+ (\\d+)/;\n    next unless $ppid && $ppid == $host;\n"
        "    open my $c, '<', \"$dir/cmdline\" or next;\n    local $/;\n    my $cmd = <$c> // '';\n"
        "    push @base, $dir =~ m{(\\d+)\\z} if $cmd =~ /\\(fork server\\)/;\n}\n"
        "is scalar(@base), 1, 'the base found';\nkill 'KILL', @base;\ndone_testing;\n")
    for name in ("b", "c", "d"):
        (tmp_path / "t" / f"{name}.t").write_text("use strict;\nuse warnings;\nuse Test::More tests => 1;\nok 1;\n")
    ours = run_in(tmp_path, [EMPEROR, "prove", "--no-preload", "t"])
    assert "Traceback" not in ours.stderr, ours.stderr
    assert ours.returncode == 0, ours.stdout + ours.stderr
    for name in ("a_kill_base", "b", "c", "d"):
        assert re.search(rf"^t/{name}\.t \.+ ok$", ours.stdout, re.M), ours.stdout
    assert "All tests successful." in ours.stdout, ours.stdout


def test_a_run_with_no_test_file_ends_quietly_while_the_base_loads(tmp_path: Path) -> None:
    """prove reads the base's answer only when a first file is to run: a
    run with none ends before it (prove's NOTESTS), and the host, answering
    no one, says nothing."""
    (tmp_path / "t").mkdir()
    ours = run_in(tmp_path, [EMPEROR, "prove", "--no-preload", "t"])
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "Result: NOTESTS" in ours.stdout, ours.stdout
    assert ours.stderr == "", ours.stderr


# -- the fixed cost of a run --------------------------------------------------------------


def test_a_run_of_no_more_files_than_jobs_is_prove_itself(tmp_path: Path) -> None:
    """No base could pay off: `emperor prove` becomes prove (the test's
    parent is `perl .../prove`, not prove's code under ours), with prove's
    output and exit status."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "parent.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "open my $fh, '<', '/proc/' . getppid() . '/cmdline' or die $!;\n"
        "my @argv = split /\\0/, do { local $/; <$fh> };\n"
        "diag 'parent: ', join ' ', @argv;\n"
        "is $argv[1] =~ m{(?:^|/)prove\\z} ? 1 : 0, 1, 'run by the prove script';\n")
    for argv in (["t/parent.t"], ["-j2", "-v", "t"]):
        ours = run_in(tmp_path, [EMPEROR, "prove", *argv])
        assert ours.returncode == 0, ours.stdout + ours.stderr
        assert "ForkServer" not in ours.stderr, ours.stderr
        assert "All tests successful." in ours.stdout, ours.stdout
    # files whose #! line asks for taint mode run cold whoever runs them:
    # they leave parent.t the only file a base could fork
    for name in ("t1", "t2", "t3"):
        (tmp_path / "t" / f"{name}.t").write_text(
            "#!perl -T\nuse strict;\nuse Test::More tests => 1;\nok ${^TAINT}, 'taint mode';\n")
    # (--no-preload too: prove itself preloads nothing)
    for ours_too in ([], ["--no-preload"]):
        ours = run_in(tmp_path, [EMPEROR, "prove", *ours_too, "-j2", "-v", "t"])
        assert ours.returncode == 0, ours.stdout + ours.stderr
        assert "ForkServer" not in ours.stderr, ours.stderr
        assert "emperor prove:" not in ours.stderr, ours.stderr
        assert "ok 1 - run by the prove script" in ours.stdout, ours.stdout
        assert re.search(r"^Files=4, Tests=4, ", ours.stdout, re.M), ours.stdout


def test_the_base_for_tests_loads_no_web_server(tmp_path: Path) -> None:
    """The base tests are forked from loads only what forking tests needs
    (the web vassal's HTTP server, spares and warm-up are the web base's):
    a third less start-up before the first test can be forked."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "inc.t").write_text(
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\n"
        "my @web = grep { m{^ForkServer/(?:HTTPServer|Spares|Vassal|Base/Warmup)\\.pm$} } keys %INC;\n"
        "is \"@web\", '', 'no web vassal module inherited';\n")
    ours = run_in(tmp_path, [EMPEROR, "prove", "-v", "--preload", "Test::More", "--no-cold-retry", "t"])
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert re.search(r"^ok 1 - no web vassal module inherited$", ours.stdout, re.M), ours.stdout


def test_the_host_of_a_run_imports_only_what_it_uses(tmp_path: Path) -> None:
    """The Python side of a forked run (the host) imports no dataclasses
    (inspect, ast, dis, tokenize), tempfile, shutil (zlib, bz2, lzma) or
    anything of the Emperor's run side: a large part of its CPU before."""
    (tmp_path / "t").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "t" / f"{name}.t").write_text("use Test::More tests => 1;\nok 1;\n")
    python = Path(EMPEROR).parent / "python"
    ours = run_in(tmp_path, [str(python), "-X", "importtime", EMPEROR, "prove", "-j2", "t"])
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "All tests successful." in ours.stdout, ours.stdout
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", ours.stderr, re.M))
    assert "psgi_forkserver.prove.hosting" in imported, "the run forked its files"
    heavy = {"dataclasses", "inspect", "tempfile", "shutil", "zlib", "bz2", "lzma", "psutil",
             "psgi_forkserver.launch", "psgi_forkserver.cli", "psgi_forkserver.config",
             "psgi_forkserver.emperor"}
    assert not heavy & imported, sorted(heavy & imported)


def test_a_bare_base_only_when_a_file_may_need_one(tmp_path: Path) -> None:
    """The bare base (for files the preloads would change) is made only
    when some file's text could call for it: else its start is saved."""
    (tmp_path / "t").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "t" / f"{name}.t").write_text("use Test::More tests => 1;\nok 1;\n")
    trace = tmp_path / "trace"

    def bare_base_made() -> bool:
        trace.unlink(missing_ok=True)
        ours = run_in(tmp_path, [EMPEROR, "prove", "--preload", "Test::More", "--no-learn", "-j2", "t"],
                      EMPEROR_PROVE_TRACE=str(trace))
        assert ours.returncode == 0, ours.stdout + ours.stderr
        return "\tbare base\t" in trace.read_text()

    assert not bare_base_made()
    (tmp_path / "t" / "d.t").write_text(
        "use Test::More tests => 1;\nok $INC{'Test/More.pm'}, 'Test::More is loaded';\n")
    assert bare_base_made()


# -- --state: what the last run learned ---------------------------------------------------


def test_few_files_counts_the_files_prove_would_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a run names no more files than jobs: *.t files in t/, and
    below it with -r (a 1-file run is prove itself; a larger one forks)."""
    from psgi_forkserver.prove.started import few_files

    (tmp_path / "t" / "sub" / "deeper").mkdir(parents=True)
    for name in ("t/a.t", "t/README", "t/sub/b.t", "t/sub/deeper/c.t"):
        (tmp_path / name).write_text("print qq{1..0\\n};\n")
    monkeypatch.chdir(tmp_path)
    assert few_files(["-j2", "t"], [])  # t/a.t alone
    assert not few_files(["-j2", "-r", "t"], [])  # three files
    assert few_files(["-j3", "-lr", "t"], [])
    assert not few_files(["t", "t/sub/b.t"], [])
    # ours that prove itself honours as well (it preloads nothing), and ours that need a base
    assert few_files(["-j2", "t"], ["--no-preload", "--no-learn", "--no-cold-retry", "--destruct"])
    assert not few_files(["-j2", "t"], ["--preload", "Test::More"])
    assert not few_files(["-j2", "t"], ["--junit", "out.xml"])
    # a file whose #! line has a perl switch other than -w runs cold: it
    # does not count; one with -w alone does
    for name, shebang in (("t/sub/t1.t", "#!/usr/bin/perl -Tw"), ("t/sub/t2.t", "#! /usr/bin/perl -T"),
                          ("t/sub/deeper/t3.t", "#!perl -w -t")):
        (tmp_path / name).write_text(f"{shebang}\nprint qq{{1..0\n}};\n")
    (tmp_path / "t/sub/deeper/c.t").unlink()
    assert few_files(["-j2", "-r", "t"], [])  # a.t, b.t and three cold files
    (tmp_path / "t/sub/deeper/w.t").write_text("#!perl -w\nprint qq{1..0\n};\n")
    assert not few_files(["-j2", "-r", "t"], [])
