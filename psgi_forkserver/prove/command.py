"""`emperor prove`'s command line: ours taken out, the rest is prove's
(App::Prove parses it in ForkServer::Prove). Imported without the rest of
the Emperor, so that a run starts quickly."""

from __future__ import annotations

import os
import sys

LONG_RUNNING_PROVE = {"--watch", "--serve", "--connect", "--help-long-running"}

# `emperor prove`'s own options; every other argument is prove's (App::Prove
# parses them, with .proverc): name -> takes a value
PROVE_OURS = {"--preload": True, "--no-preload": False, "--shard": True, "--shard-times": True,
              "--junit": True, "--destruct": False, "--no-cold-retry": False,
              "--no-learn": False, "--timeout": True, "--perl": True}

PROVE_HELP = """emperor prove [OPTIONS] [prove's options] [FILES|DIRECTORIES]

prove's options are prove's (below), with prove's meaning; .proverc and
~/.proverc are read as prove reads them. Perl tests are forked from a base
that has preloaded the modules most test files use. emperor prove's own:

  --preload MODULE|FILE  preload this (repeatable) instead of the automatic choice
  --no-preload           preload nothing (tests still forked, from a bare base)
  --shard I/N            run the I-th of N balanced parts of the files
  --shard-times FILE     balance by a JUnit file's times (else --state's, else sizes)
  --junit FILE           also write a JUnit XML report
  --timeout SECONDS      kill a forked test file that runs longer
  --destruct             forked tests end with perl's full global destruction
  --no-cold-retry        a forked file that fails is not run again cold
  --no-learn             do not keep (nor use) what the files loaded last time
  --perl PATH            the perl to run prove and the base with
  --watch, --serve SOCK, --connect SOCK: see `emperor prove --help-long-running`

example:
  emperor prove -lr -j2 t    (what you would type after `prove`; docs/prove.md)

"""


def prove_run(argv: list[str]) -> int:
    """prove's command line, run by prove itself, with ours taken out."""

    shim: list[str] = []
    prove_args: list[str] = []
    timeout: float | None = None
    perl = "perl"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("::", "--"):
            prove_args += argv[i:]
            break
        name, eq, value = arg.partition("=")
        if name in PROVE_OURS:
            if PROVE_OURS[name] and not eq:
                if i + 1 >= len(argv):
                    print(f"emperor prove: {name} needs a value", file=sys.stderr)
                    return 2
                i += 1
                value = argv[i]
            if name == "--timeout":
                try:
                    timeout = float(value)
                except ValueError:
                    print(f"emperor prove: --timeout {value}: not a number of seconds", file=sys.stderr)
                    return 2
                shim += [name, value]  # prove's side forks every file then
            elif name == "--perl":
                perl = value
            else:
                shim += [name, value] if PROVE_OURS[name] else [name]
        else:
            if arg in ("-h", "--help", "-?"):
                sys.stdout.write(PROVE_HELP)
                sys.stdout.flush()
            prove_args.append(arg)
        i += 1
    from .started import base_env, few_files, program, prove_program, spawn_env, start_prove

    # No more files than jobs, the preload left to us: a base cannot pay
    # off, and prove itself runs the files sooner than prove under us would
    # (it loads less): this process becomes prove.
    few = few_files(prove_args, shim)
    if few:
        prove = prove_program(perl)
        if prove is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execve(program(perl), [perl, prove, *prove_args], spawn_env())
            except OSError:
                pass  # run as below
    try:
        started = start_prove(perl, shim, prove_args)
    except OSError as e:
        print(f"emperor prove: {e}", file=sys.stderr)
        return 2
    try:  # the base loads its code while prove loads and reads its command line
        if not few:
            started.start_base(perl, base_env())
    except OSError as e:
        print(f"emperor prove: the base: {e}", file=sys.stderr)
    started.no_base()  # (when none was started: prove's config for it goes nowhere)
    # the rest is imported while prove loads
    from . import hosting
    from .testfiles import ProveOptions

    session = hosting.Session(ProveOptions(paths=[], perl=perl, timeout=timeout), tmp=started.tmp)
    status = hosting.run(session, shim, prove_args, started)
    # everything is reaped and removed: the interpreter's own clean-up
    # (~15 ms) would only delay the end of a test run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
