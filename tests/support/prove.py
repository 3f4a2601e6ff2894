"""`emperor prove` and `prove` run on tests/prove_suite/ from the project's
root, and the per-file verdicts read from their output."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the project's root
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


def run_in(cwd: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """argv in `cwd`, outside any harness of the caller's (no HARNESS_ACTIVE,
    HARNESS_PERL_SWITCHES or PERL5OPT), MARKER_DIR set to `cwd`."""
    full = {**os.environ, "MARKER_DIR": str(cwd), **env}
    full.pop("HARNESS_ACTIVE", None)
    full.pop("HARNESS_PERL_SWITCHES", None)
    full.pop("PERL5OPT", None)
    return subprocess.run(argv, cwd=cwd, env=full, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
