"""`emperor prove` against `prove` on tests/prove_suite/: the same per-file
verdicts and exit status, with every isolation point checked by a .t file of
the suite (run by real prove, real perl, real forks of a real base); bail
out, timeouts, JUnit, watch, served bases."""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from support import EMPEROR, alive, wait_for
from support.prove import PRELOADS, ROOT, SUITE, run, verdicts


EXPECTED_FAILURES = {"die.t", "die_errno.t", "exit_3.t", "failing.t"}
SUITE_FILES = 40


@dataclass(frozen=True)
class ProveRun:
    """prove's own run of the suite: its output and the files its tests wrote."""

    result: subprocess.CompletedProcess
    out: Path


@pytest.fixture(scope="module")
def prove_alone(tmp_path_factory: pytest.TempPathFactory) -> ProveRun:
    """`prove SUITE` once for the module: every run of ours is compared with
    the same verdicts (the suite's files give the same ones each run)."""
    out = tmp_path_factory.mktemp("prove")
    return ProveRun(run(["prove", SUITE], out), out)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_suite_has_the_same_verdicts_as_prove(tmp_path: Path, jobs: str, prove_alone: ProveRun) -> None:
    (tmp_path / "emperor").mkdir()
    theirs = prove_alone.result
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
    # the files the preloads would change (tests/prove_suite/*_before_use.t,
    # inc_not_loaded_yet.t) are forked from the bare base, which has none of
    # them; one whose %ENV change cannot reach a preloaded module's compile
    # is forked from the full base; one that looks at a module the bare
    # base's own code loaded runs cold
    for name, why in (("env_before_use.t", "it sets $ENV{ENV_AT_LOAD_MODE}"),
                      ("core_global_before_use.t", "it sets CORE::GLOBAL"),
                      ("inc_not_loaded_yet.t", "it looks at $INC{'SuiteData.pm'}"),
                      ("stash_not_loaded_yet.t", "it looks at the symbol table %SuiteData::"),
                      # read in a block of the module's top level, not in a sub
                      ("env_in_block_before_use.t", "it sets $ENV{ENV_AT_LOAD_BLOCK}"),
                      ("inc_set_before_use.t", "it sets %INC"),
                      ("inc_as_a_whole.t", "it looks at %INC"),
                      # what a helper module it uses does as it loads, and a file it runs by `do`
                      ("core_global_in_helper.t", "it sets CORE::GLOBAL"),
                      ("do_file_before_use.t", "it sets $ENV{ENV_AT_LOAD_MODE}"),
                      ("env_before_use_ok.t", "it sets $ENV{ENV_AT_LOAD_MODE}"),
                      # before `use` of a helper module that uses the preloaded one
                      ("env_before_helper_use.t", "it sets $ENV{ENV_AT_LOAD_MODE}")):
        assert f"{SUITE}/{name} runs forked from a bare base (none of the suite's modules loaded): {why}" \
            in ours.stderr, ours.stderr
    assert "env_not_read_at_load.t runs" not in ours.stderr, ours.stderr
    assert f"{SUITE}/inc_of_the_harness_code.t runs cold: it looks at $INC{{'IO/Socket/UNIX.pm'}}" \
        in ours.stderr, ours.stderr
    # a comment on the #! line is no switch: the file is forked
    assert "-*-" not in ours.stderr, ours.stderr
    # END blocks ran, in the forked file too
    assert "# END block of end_done_testing.t ran" in ours.stderr
    # objects in globals and file lexicals were destroyed at exit, as under prove
    for out in (prove_alone.out, tmp_path / "emperor"):
        for what in ("package-global", "main-global", "file-lexical"):
            assert (out / f"destroyed-{what}").exists(), (out, what)
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


def test_prove_exec_through_a_served_base(tmp_path: Path, prove_alone: ProveRun) -> None:
    """prove --exec 'emperor prove --connect SOCK' (people who keep their
    .proverc): the same verdicts as prove alone; the server stops on SIGTERM
    with nothing left behind."""
    control = tmp_path / "prove.sock"
    (tmp_path / "exec").mkdir()
    env = {**os.environ, "PROVE_SUITE_OUT": str(tmp_path / "exec")}
    server = subprocess.Popen([EMPEROR, "prove", "--serve", str(control), *PRELOADS], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(control.exists, 60, "the control socket")
        base = wait_for(lambda: psutil.Process(server.pid).children(), 60, "the base")
        assert len(base) == 1
        # -j2: a Python start per file (seconds each on a loaded machine) two at a time
        ours = run(["prove", "-j2", "--exec", f"{EMPEROR} prove --connect {control}", SUITE], tmp_path / "exec")
        theirs = prove_alone.result
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


def test_a_forked_file_with_two_plans_is_a_failure_and_runs_again_cold(tmp_path: Path) -> None:
    """A preloaded module's END block runs in every fork: Template::Test's
    prints a second plan after Test::More's. prove calls that output a
    failure ("More than one plan"), so the file is run again cold."""
    end = f"{SUITE}/end_block"
    args = ["-I", f"{end}/lib", f"{end}/no_plan_module.t"]
    theirs = run(["prove", *args], tmp_path)
    ours = run([EMPEROR, "prove", "--preload", "Test::More", "--preload", "PlanAtEnd", *args], tmp_path)
    assert verdicts(theirs.stdout) == {f"{end}/no_plan_module.t": "ok"}, theirs.stdout
    assert verdicts(ours.stdout) == verdicts(theirs.stdout), ours.stdout + ours.stderr
    assert (ours.returncode, theirs.returncode) == (0, 0)
    assert "no_plan_module.t failed or skipped forked and passed cold" in ours.stderr


def test_the_watch_modes_cold_rules() -> None:
    """--watch/--serve decide cold files on the Python side: the same rule."""
    from psgi_forkserver.prove.testfiles import cold_reason

    file = str(ROOT / SUITE / "stash_not_loaded_yet.t")
    assert cold_reason(file, {"SuiteData.pm"})[0] == "looks at the symbol table %SuiteData:: (preloaded)"
    assert cold_reason(file, {"Test/More.pm"})[0] is None
    # a comment on the #! line is no switch
    assert cold_reason(str(ROOT / SUITE / "shebang_comment.t"), {"Test/More.pm"}) == (None, ["-w"])
