"""`emperor prove` against `prove` on tests/prove_suite/: the same per-file
verdicts and exit status, with every isolation point checked by a .t file of
the suite (run by real prove, real perl, real forks of a real base)."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from support import EMPEROR, alive, wait_for

ROOT = Path(__file__).resolve().parent.parent
SUITE = "tests/prove_suite"
PRELOADS = ["--preload", "Test::More", "--preload", "FindBin", "-I", f"{SUITE}/lib", "--preload", "SuiteData",
            "--preload", "EnvAtLoad",
            "--preload", f"{SUITE}/preload.pl"]
FILE_LINE = re.compile(r"^(\S+\.t) \.+ ?(.*)$")


def run(argv: list[str], out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROVE_SUITE_OUT": str(out)}
    env.pop("HARNESS_ACTIVE", None)  # pytest may itself run under a harness
    return subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def verdicts(stdout: str) -> dict[str, str]:
    """file -> ok / skipped / FAIL, from prove's per-file lines."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        m = FILE_LINE.match(line)
        if m:
            rest = m.group(2).strip()
            found[m.group(1)] = "ok" if rest == "ok" else "skipped" if rest.startswith("skipped") else "FAIL"
    return found


EXPECTED_FAILURES = {"die.t", "die_errno.t", "exit_3.t", "failing.t"}
SUITE_FILES = 28


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_suite_has_the_same_verdicts_as_prove(tmp_path: Path, jobs: str) -> None:
    (tmp_path / "prove").mkdir()
    (tmp_path / "emperor").mkdir()
    theirs = run(["prove", SUITE], tmp_path / "prove")
    # --no-cold-retry: a file that fails forked must not be hidden by its cold rerun
    ours = run([EMPEROR, "prove", "--no-cold-retry", "-j", jobs, *PRELOADS, SUITE], tmp_path / "emperor")
    want = verdicts(theirs.stdout)
    got = verdicts(ours.stdout)
    assert len(want) == SUITE_FILES, theirs.stdout
    assert got == want, ours.stdout + ours.stderr
    assert {Path(f).name for f, v in got.items() if v == "FAIL"} == EXPECTED_FAILURES
    assert got[f"{SUITE}/skip_all.t"] == "skipped"
    assert (ours.returncode, theirs.returncode) == (1, 1)
    assert ours.stdout.splitlines()[-1] == "Result: FAIL"
    assert re.search(rf"^Files={SUITE_FILES}, Tests=\d+, ", ours.stdout, re.M)
    # exit statuses as prove reports them
    for name, status in (("die.t", 255), ("die_errno.t", 5), ("exit_3.t", 3), ("failing.t", 1)):
        assert f"Dubious, test returned {status} (wstat {status * 256}," in ours.stdout.split(name)[1]
    # END blocks ran, in the forked file too
    assert "# END block of end_done_testing.t ran" in ours.stderr
    # objects in globals and file lexicals were destroyed at exit, as under prove
    for out in ("prove", "emperor"):
        for what in ("package-global", "main-global", "file-lexical"):
            assert (tmp_path / out / f"destroyed-{what}").exists(), (out, what)
    # two forks of one base that drew from rand before forking draw differently
    draws = [(tmp_path / "emperor" / f).read_text() for f in ("srand_a", "srand_b")]
    assert draws[0] != draws[1]
    # the child forks.t left behind ran (it waited for its parent to go) and
    # is gone: reaped by the harness, its subreaper, not left a zombie
    orphan = int(wait_for(lambda: (tmp_path / "emperor" / "orphan").exists()
                          and (tmp_path / "emperor" / "orphan").read_text(), what="the orphan's pid"))
    wait_for(lambda: not alive_pid(orphan), what="the orphan to be gone")


def alive_pid(pid: int) -> bool:
    try:
        return alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def test_bail_out_stops_the_run_as_prove_does(tmp_path: Path) -> None:
    theirs = run(["prove", f"{SUITE}/bail"], tmp_path)
    ours = run([EMPEROR, "prove", *PRELOADS, f"{SUITE}/bail"], tmp_path)
    assert (ours.returncode, theirs.returncode) == (255, 255)
    for run_ in (ours, theirs):
        assert "Bailout called.  Further testing stopped:  stop the run" in run_.stdout
        assert "FAILED--Further testing stopped: stop the run" in run_.stderr
        assert "b_after.t" not in run_.stdout
    assert verdicts(ours.stdout) == verdicts(theirs.stdout)


def test_timeout_kills_a_hanging_test_and_its_child(tmp_path: Path) -> None:
    ours = run([EMPEROR, "prove", "--timeout", "3", *PRELOADS, f"{SUITE}/hang"], tmp_path)
    assert ours.returncode == 1, ours.stdout + ours.stderr
    assert "hang.t: timed out after 3 s: killed" in ours.stderr
    assert re.search(r"hang\.t\s+\(Wstat: 9 ", ours.stdout), ours.stdout
    test_pid, child_pid = map(int, (tmp_path / "hang").read_text().split())
    assert not alive_pid(test_pid)
    assert not alive_pid(child_pid)


def test_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    ours = run([EMPEROR, "prove", *PRELOADS, "--junit", str(report), SUITE], tmp_path)
    assert ours.returncode == 1
    suites = {s.get("name"): s for s in ET.parse(report).getroot()}
    assert len(suites) == SUITE_FILES
    failing = suites[f"{SUITE}/failing.t"]
    assert (failing.get("tests"), failing.get("failures")) == ("3", "1")
    assert [c.get("name") for c in failing if c.find("failure") is not None] == ["2 - fails on purpose"]
    assert suites[f"{SUITE}/exit_3.t"].find("testcase/error") is not None
    assert suites[f"{SUITE}/findbin.t"].get("failures") == "0"


def test_a_preload_that_fails_is_one_error_and_exit_2(tmp_path: Path) -> None:
    ours = run([EMPEROR, "prove", "--preload", "No::Such::Module", SUITE], tmp_path)
    assert ours.returncode == 2
    assert ours.stdout == ""
    lines = ours.stderr.strip().splitlines()
    assert len(lines) == 1 and "the base did not start" in lines[0] and "No/Such/Module.pm" in lines[0]


def test_a_base_does_not_run_test_files_for_the_emperor(tmp_path: Path) -> None:
    """A base vassal not started by `emperor prove` refuses a --test-file
    adoption (one log line; the base keeps serving)."""
    import socket

    from psgi_forkserver import adoption, protocol

    sock = tmp_path / "fork.sock"
    log = tmp_path / "base.log"
    ours, theirs = socket.socketpair()
    env = {**os.environ, "UWSGI_EMPEROR_FD": str(theirs.fileno())}
    with open(log, "wb") as errf:
        # no spares: they would be our children too (clone(CLONE_PARENT)), left to reap
        base = subprocess.Popen(["perl", str(ROOT / "perl/ForkServer.pm"), "--fork-server", str(sock),
                                 "--early-psgi", str(ROOT / "examples/myapp.pl"), "--fork-server-spares", "0"],
                                env=env, pass_fds=[theirs.fileno()], stderr=errf)
    theirs.close()
    try:
        ours.settimeout(60)
        assert ours.recv(1) == b"\x01"
        out_o, out_t = socket.socketpair()
        err_o, err_t = socket.socketpair()
        err_o.sendall(protocol.encode_packet(115, protocol.encode_array(["file=x.t", "cwd=/"])))
        # we started the base: its clone(CLONE_PARENT) makes the child ours
        # (pytest must not become a subreaper: later tests count zombies)
        pid = adoption.adopt(sock, ["x", "--test-file", "x.t"], out_t.fileno(), config_fd=err_t.fileno())
        out_t.close()
        err_t.close()
        try:
            _, status = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(status) == 1
        except ChildProcessError:  # double fork (no clone here): init reaps it
            wait_for(lambda: not alive_pid(pid), 20, "the refused child to exit")
        wait_for(lambda: "this base does not run test files" in log.read_text(), what="the log line")
        assert base.poll() is None
        out_o.close()
        err_o.close()
    finally:
        ours.close()
        base.wait(20)


def test_watch_reruns_changed_files_and_rebuilds_the_base(tmp_path: Path) -> None:
    """--watch: a changed test file is rerun alone; a changed preloaded
    module gives a new base (its new code), then everything reruns."""
    lib, t = tmp_path / "lib", tmp_path / "t"
    lib.mkdir()
    t.mkdir()
    (lib / "Answer.pm").write_text("package Answer;\nsub value { 42 }\n1;\n")
    check = "use strict;\nuse warnings;\nuse Test::More tests => 1;\nis Answer::value(), {want}, 'the value';\n"
    (t / "answer.t").write_text(check.format(want=42))
    (t / "other.t").write_text("print qq{1..1\\nok 1\\n};\n")
    log = tmp_path / "watch.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([EMPEROR, "prove", "--watch", "-I", str(lib), "-M", "Answer", str(t)],
                                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        def results() -> list[str]:
            return re.findall(r"^Result: (\w+)$", log.read_text(), re.M)

        wait_for(lambda: "watching for changes" in log.read_text(), 60, "the first run")
        assert results() == ["PASS"]
        (t / "answer.t").write_text(check.format(want=43))  # now fails: the module says 42
        wait_for(lambda: len(results()) == 2, 60, "the rerun of answer.t")
        assert results()[1] == "FAIL"
        second = log.read_text().split("Result: PASS")[1]
        assert "answer.t changed" in second and "other.t .." not in second
        (lib / "Answer.pm").write_text("package Answer;\nsub value { 43 }\n1;\n")
        wait_for(lambda: len(results()) == 3, 60, "the run on a new base")
        third = log.read_text().split("Result: FAIL")[1]
        assert "Answer.pm changed: new base" in third
        assert results()[2] == "PASS" and "other.t .." in third
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert kids, "the base runs while watching"
    finally:
        proc.send_signal(2)  # SIGINT: Ctrl-C
        rc = proc.wait(30)
    assert rc == 0
    for k in kids:
        assert not alive_pid(k.pid)


def test_prove_exec_through_a_served_base(tmp_path: Path) -> None:
    """prove --exec 'emperor prove --connect SOCK' (people who keep their
    .proverc): the same verdicts as prove alone; the server stops on SIGTERM
    with nothing left behind."""
    control = tmp_path / "prove.sock"
    (tmp_path / "prove").mkdir()
    (tmp_path / "exec").mkdir()
    env = {**os.environ, "PROVE_SUITE_OUT": str(tmp_path / "exec")}
    server = subprocess.Popen([EMPEROR, "prove", "--serve", str(control), *PRELOADS], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(control.exists, 60, "the control socket")
        base = wait_for(lambda: psutil.Process(server.pid).children(), 60, "the base")
        assert len(base) == 1
        ours = run(["prove", "--exec", f"{EMPEROR} prove --connect {control}", SUITE], tmp_path / "exec")
        theirs = run(["prove", SUITE], tmp_path / "prove")
        assert verdicts(ours.stdout) == verdicts(theirs.stdout), ours.stdout + ours.stderr
        assert len(verdicts(ours.stdout)) == SUITE_FILES
        assert (ours.returncode, theirs.returncode) == (1, 1)
        assert " cold" not in ours.stderr
        # forked from the served base: srand_a and srand_b were both forks
        draws = [(tmp_path / "exec" / f).read_text() for f in ("srand_a", "srand_b")]
        assert draws[0] != draws[1]
    finally:
        server.terminate()
        rc = server.wait(30)
    assert rc == 0, server.stderr.read()
    assert not control.exists()
    assert not alive_pid(base[0].pid)


def test_connect_without_a_server_runs_the_file_cold(tmp_path: Path) -> None:
    ours = run([EMPEROR, "prove", "--connect", str(tmp_path / "nothing.sock"), f"{SUITE}/exit_3.t"], tmp_path)
    assert ours.returncode == 3
    assert ours.stdout == "1..1\nok 1\n"
    assert "running tests/prove_suite/exit_3.t cold" in ours.stderr


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
        "use strict;\nuse warnings;\nuse Test::More tests => 1;\nok $ENV{FIX}, 'FIX is set';\n")
    (tmp_path / "t" / "c_stderr.t").write_text(
        "use strict;\nuse warnings;\nprint STDERR qq{stderr-marker\\n};\nprint qq{1..1\\nok 1\\n};\n")
    return tmp_path


def run_in(cwd: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "MARKER_DIR": str(cwd), **env}
    full.pop("HARNESS_ACTIVE", None)
    full.pop("HARNESS_PERL_SWITCHES", None)
    full.pop("PERL5OPT", None)
    return subprocess.run(argv, cwd=cwd, env=full, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)


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
    # (--no-preload: a fork even for one file)
    merged = run_in(project, [EMPEROR, "prove", "--no-preload", "-v", "--merge", "t/c_stderr.t"])
    assert "stderr-marker" in merged.stdout and "stderr-marker" not in merged.stderr
    apart = run_in(project, [EMPEROR, "prove", "--no-preload", "-v", "t/c_stderr.t"])
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
    assert "t/d_base_sensitive.t runs cold: --state" in second.stderr
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


# -- --state: what the last run learned ---------------------------------------------------


def test_state_gives_the_next_run_its_preload_and_its_order(tmp_path: Path) -> None:
    """With --state, a run records what each forked file loaded (.prove's
    emperor_loads); the next run preloads what most files loaded, also
    modules no `use` line names, and with -j2 runs the slowest files
    first, from prove's own times: also from a .prove that prove wrote.
    Verdicts stay prove's."""
    (tmp_path / "lib" / "Proj").mkdir(parents=True)
    (tmp_path / "t").mkdir()
    (tmp_path / "lib" / "Proj.pm").write_text(
        "package Proj;\nsub deep { require Proj::Deep; Proj::Deep::answer() }\n1;\n")
    (tmp_path / "lib" / "Proj" / "Deep.pm").write_text("package Proj::Deep;\nsub answer { 42 }\n1;\n")
    for name in ("a", "b", "c"):
        (tmp_path / "t" / f"{name}.t").write_text(
            "use strict;\nuse warnings;\nuse Test::More tests => 1;\nuse Proj;\n"
            "is Proj::deep(), 42, 'deep';\n")
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
