"""What `emperor prove` is asked to run: the options, the test files, which
of them must run cold, and the spec a forked test reads."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .. import protocol

NO_PRELOAD_MARK = "# emperor-prove: no-preload"
YATH_NO_PRELOAD_MARK = "# HARNESS-NO-PRELOAD"

# Patterns, compiled (and cached by re) when first used: only the long-
# running modes use them, and compiling them at import was a few ms of
# every `emperor prove` run's start.
INC_LOOKUP = r"""\$INC\s*\{\s*(['"])([\w/]+\.pm)\1\s*\}"""
# `exists ${Test::Builder::}{new}`, `%Foo::`: a package's symbol table
STASH_LOOKUP = r"""(?:\$\{\s*|%\{?\s*|\$)((?:[A-Za-z_]\w*::)+)(?![\w:])"""
USE_LINE = r"(?m)^\s*use\s+([A-Z][\w:]*)"
# %ENV or CORE::GLOBAL changed (ForkServer::Prove::Source has the same rule)
CHANGES = [("%ENV", r"\$ENV\s*\{[^}]*\}\s*(?:\|\||//|\.)?=(?!=)|%ENV\s*=(?!=)"
                    r"|local\s+\$ENV\s*\{|delete\s+\$ENV\s*\{"),
           ("CORE::GLOBAL", r"CORE::GLOBAL::"),
           # a module pretended loaded or forgotten, an @INC hook
           ("%INC", r"\$INC\s*\{[^}]*\}\s*(?:\|\||//)?=(?!=)|delete\s+\$INC\s*\{"
                    r"|(?:unshift|push)\s*\(?\s*@INC\s*,\s*(?:sub\b|\\&|bless\b)")]
# what a `use` adds to %INC (as Module-Runtime's t/dependency.t checks)
INC_WHOLE = r"(?<![$@\w])%INC\b(?!\s*\{)"
# another file the test runs (`do './t/quotify.t'`): judged with it
DONE_FILE = r"""\b(?:do|require)\s*\(?\s*(['"])([^'"$@\s]+\.(?:t|pl|pm))\1"""
USE_LIB = r"""(?m)^\s*use\s+lib\s+(['"])([^'"]+)\1"""


class ProveOptions:
    """The options of the long-running modes (and, of a plain run, the perl
    and --timeout). A plain class: dataclasses imports inspect, ~15 ms of
    CPU of every `emperor prove` run's start."""

    def __init__(self, paths: list[str], jobs: int = 1, includes: Sequence[str] = (),
                 modules: Sequence[str] = (), preloads: Sequence[str] = (), recurse: bool = False,
                 verbose: bool = False, timeout: float | None = None, junit: Path | None = None,
                 perl: str = "perl", destruct: bool = False,
                 required_modules: Sequence[str] = (),  # require'd, not imported
                 optional_modules: Sequence[str] = ()) -> None:  # left out when they do not load
        self.paths, self.jobs, self.recurse, self.verbose = paths, jobs, recurse, verbose
        self.includes, self.modules, self.preloads = list(includes), list(modules), list(preloads)
        self.timeout, self.junit, self.perl, self.destruct = timeout, junit, perl, destruct
        self.required_modules, self.optional_modules = list(required_modules), list(optional_modules)


def find_tests(args: list[str], recurse: bool) -> list[str]:
    """prove's choice: the files named, and the *.t files of the directories
    named (with -r, of their subdirectories too); `t` when nothing is named."""
    found: list[str] = []
    for arg in args or ["t"]:
        p = Path(arg)
        if p.is_dir():
            pattern = "**/*.t" if recurse else "*.t"
            found += sorted(str(f) for f in p.glob(pattern) if f.is_file())
        else:
            found.append(arg)
    return found


def changes_before_preloaded_use(text: str, preloaded: set[str] | None, file: str = "") -> str | None:
    """What the file changes (%ENV, CORE::GLOBAL) before its last `use` of
    a module the base loaded (`preloaded`: %INC keys; None: any module):
    that module was compiled before the change."""
    text = re.split(r"^__(?:END|DATA)__\b", text, maxsplit=1, flags=re.M)[0]
    last = -1
    for m in re.finditer(USE_LINE + r"""|\buse_ok\s*\(?\s*['"]([A-Z][\w:]*)""", text):
        key = (m.group(1) or m.group(2)).replace("::", "/") + ".pm"
        if preloaded is None or key in preloaded:
            last = m.start()
    if last < 0:
        return None
    before = re.sub(r"^\s*#.*$", "", text[:last], flags=re.M)
    # what a helper module of the suite's (under the file's `use lib`, t/lib) does
    # as it loads, above the last preloaded `use` (File-Slurp's tests'
    # FileSlurpTestOverride sets CORE::GLOBAL::)
    dirs = [m.group(2) for m in re.finditer(USE_LIB, text)] + ["t/lib", str(Path(file).parent / "lib")]
    for m in re.finditer(USE_LINE, text[:last]):
        for d in dirs:
            helper = Path(d) / (m.group(1).replace("::", "/") + ".pm")
            if helper.is_file():
                before += "\n" + re.sub(r"^\s*#.*$", "", helper.read_text(errors="replace"), flags=re.M)
                break
    for what, pattern in CHANGES:
        if re.search(pattern, before):
            return what
    return None


def cold_reason(file: str, preloaded: set[str] | None = None) -> tuple[str | None, list[str]]:
    """(why this file must run in a fresh perl, or None; its shebang switches)."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(65536).decode("utf-8", "replace")
    except OSError as e:
        return f"cannot read: {e.strerror}", []
    for m in re.finditer(DONE_FILE, head):
        try:
            head += "\n" + Path(m.group(2)).read_text(errors="replace")
        except OSError:
            pass
    lines = head.splitlines()
    switches: list[str] = []
    if lines and lines[0].startswith("#!") and "perl" in lines[0]:
        # the words after the first `perl` that are switches: perl stops at
        # the first that is not (`#!/usr/bin/perl -w  # -*- perl -*-`)
        words = lines[0].split()
        after = next(i for i, w in enumerate(words) if "perl" in w) + 1
        for word in words[after:]:
            if not word.startswith("-"):
                break
            switches.append(word)
    if any(line.strip() in (NO_PRELOAD_MARK, YATH_NO_PRELOAD_MARK) for line in lines):
        return "no-preload", switches
    others = [s for s in switches if s != "-w"]
    if others:
        return f"shebang switches {' '.join(others)}", switches
    changed = changes_before_preloaded_use(head, preloaded, file)
    if changed:
        return f"sets {changed} before using a preloaded module", switches
    # `ok !$INC{'Foo.pm'}`: whether a module is loaded yet; forked, it is
    for m in re.finditer(INC_LOOKUP, head):
        if preloaded is None or m.group(2) in preloaded:
            return f"looks at $INC{{'{m.group(2)}'}} (preloaded)", switches
    code = re.sub(r"^\s*#.*$", "", head, flags=re.M)
    if re.search(INC_WHOLE, code):
        for m in re.finditer(USE_LINE, code):
            key = m.group(1).replace("::", "/") + ".pm"
            if preloaded is None or key in preloaded:
                return f"looks at %INC, with {m.group(1)} preloaded", switches
    for m in re.finditer(STASH_LOOKUP, head):
        inc = m.group(1)[:-2].replace("::", "/") + ".pm"
        if m.group(1) != "main::" and (preloaded is None or inc in preloaded):
            return f"looks at the symbol table %{m.group(1)} (preloaded)", switches
    return None, switches


def taint_switches(switches: list[str]) -> list[str]:
    """The shebang's -T/-t: perl refuses to run a tainted file without them
    on its command line (and then ignores PERL5LIB: the caller adds -I)."""
    return [s for s in switches if s.lstrip("-")[:1] in ("T", "t")]


def build_spec(file: str, switches: list[str], cwd: str, env: dict[str, str], inc: list[str],
               args: Sequence[str] = (), destruct: bool = False) -> bytes:
    """The config-pipe packet ForkServer::Prove::TestFile reads: what `perl FILE`
    would have."""
    items = [f"file={file}", f"cwd={cwd}", *(f"arg={a}" for a in args),
             *(f"inc={d}" for d in inc), *(f"env={k}={v}" for k, v in env.items())]
    if "-w" in switches:
        items.append("warnings=1")
    if destruct:
        items.append("destruct=1")
    return protocol.encode_packet(protocol.MODIFIER1_CONFIG, protocol.encode_array(items))


def test_env(opts: ProveOptions) -> dict[str, str]:
    """prove's environment for a test: HARNESS_ACTIVE, HARNESS_VERSION, and
    its -I directories in PERL5LIB (TAP::Parser::SourceHandler::Perl)."""
    from .started import base_env

    env = base_env()
    if opts.verbose:
        env["HARNESS_IS_VERBOSE"] = "1"
    if opts.includes:
        env["PERL5LIB"] = os.pathsep.join(
            [*opts.includes, *([env["PERL5LIB"]] if env.get("PERL5LIB") else [])])
    return env


def file_timeout(file: str, default: float | None) -> float | None:
    """yath's per-file timeout markers: `# HARNESS-NO-TIMEOUT` lifts
    --timeout; `# HARNESS-TIMEOUT-EVENT N` and `# HARNESS-TIMEOUT-POSTEXIT N`
    give the file N seconds more than --timeout (we time whole files)."""
    if default is None:
        return None
    extra = 0.0
    try:
        with open(file, "rb") as fh:
            head = fh.read(65536).decode("utf-8", "replace")
    except OSError:
        return default
    for line in head.splitlines():
        words = line.strip().lstrip("#").split()
        if not words or not words[0].startswith("HARNESS-"):
            continue
        if words[0] == "HARNESS-NO-TIMEOUT":
            return None
        if words[0] in ("HARNESS-TIMEOUT-EVENT", "HARNESS-TIMEOUT-POSTEXIT") and len(words) > 1:
            try:
                extra = max(extra, float(words[1]))
            except ValueError:
                pass
    return default + extra
