"""Each Emperor option is declared once (options.py): the parser, the
vassals' Policy and docs/options.md's table come from that declaration."""

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

from psgi_forkserver import cli
from psgi_forkserver.options import DEFAULTS, Options, readme_table, run_options
from psgi_forkserver.emperor.vassal import Policy

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_DOC = ROOT / "docs" / "options.md"


def test_options_doc_tables_are_the_declarations():
    """Both tables of docs/options.md are what the declarations print."""
    text = OPTIONS_DOC.read_text()
    keys = subprocess.run([sys.executable, str(ROOT / "tools" / "options-table")],
                          capture_output=True, text=True, check=True).stdout
    assert keys in text, "docs/options.md's key table differs: paste tools/options-table's output"
    lines = text.splitlines()
    start = lines.index("| option | default | meaning |")
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    assert "\n".join(rows) + "\n" == readme_table(), \
        "docs/options.md's `emperor run` table differs from options.py: paste readme_table()"


def test_parser_defaults_are_the_declared_ones():
    args = cli.build_parser().parse_args(["run", "/tmp/x"])
    for f in run_options():
        want = [] if f.default == () else (None if f.default is dataclasses.MISSING else f.default)
        assert getattr(args, f.name) == want, f.name
    args = cli.build_parser().parse_args(
        ["run", "/tmp/x", "--mercy", "2.5", "--adopt-parallel", "3", "--no-emperor-sockets",
         "--emperor-use-fork-server", "/tmp/fs.sock", "--vassal-fork-base", "a",
         "--vassal-fork-base", "b"])
    assert (args.mercy, args.adopt_parallel, args.own_sockets) == (2.5, 3, False)
    assert args.use_fork_server == Path("/tmp/fs.sock") and args.fork_bases == ["a", "b"]


def test_policy_defaults_and_values_come_from_the_options():
    assert Policy() == Policy(**{f.name: DEFAULTS[f.name] for f in dataclasses.fields(Policy)})
    opts = Options(Path("/tmp/x"), "prog", mercy=3.0, backoff_max=7.0)
    assert (Policy.of(opts).mercy, Policy.of(opts).backoff_max) == (3.0, 7.0)


def test_options_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(
        ["run", "vassals", "--deploy-parallel", "0", "--pidfile", "p.pid",
         "--vassal-binary", "bin/prog"])
    opts = Options.from_args(args)
    assert opts.vassals_dir == tmp_path / "vassals" and opts.pidfile == tmp_path / "p.pid"
    assert opts.program == str(tmp_path / "bin/prog") and opts.deploy_parallel == 1
    assert opts.mercy == DEFAULTS["mercy"] and opts.fork_bases == ()
    default = Options.from_args(cli.build_parser().parse_args(["run", "v"]))
    assert default.program.endswith("ForkServer.pm") and default.use_fork_server is None
