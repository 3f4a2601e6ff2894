"""The fixtures every test module may use (helpers: tests/support/).

Every Emperor a test starts opens its default stats socket in a run
directory of the test run's own (removed at the end), never in the
machine's /run/psgi-forkserver. Every fleet fixture starts its Emperors
through `support.Emperors`: a fresh directory each, the base from
`support.base_ini`, everything stopped and removed after the test."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from psgi_forkserver.status import RUN_DIR_ENV

from support import Emperors

# Speed is measured in benchmarks, never asserted in tests: Hypothesis's
# per-example deadline (200 ms) fails a property on a loaded machine.
settings.register_profile("project", deadline=None)
settings.load_profile("project")


FILE_TIMES = Path(__file__).parent / "file_times.json"


def pytest_collection_modifyitems(config, items) -> None:
    """The slowest files first (tests/file_times.json, from the last
    measured run; a file not in it yet goes first of all, as a new file may
    be a long one), each file's tests in their own order. Under `--dist
    loadfile --no-loadscope-reorder` the workers take files in this order:
    the long ones start at once and the run does not end with one worker
    alone on a long file."""
    try:
        seconds = json.loads(FILE_TIMES.read_text())
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: -seconds.get(item.path.name, math.inf))  # stable: a file's own order kept


@pytest.fixture(autouse=True, scope="session")
def _private_run_dir():
    old = os.environ.get(RUN_DIR_ENV)
    d = tempfile.mkdtemp(prefix="pf-run-")
    os.environ[RUN_DIR_ENV] = d
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir():
    """`emperor prove` keeps what test files loaded in $XDG_CACHE_HOME:
    the test run's own, so no run learns from an earlier one (or leaves
    anything in the home directory)."""
    old = os.environ.get("XDG_CACHE_HOME")
    d = tempfile.mkdtemp(prefix="pf-cache-")
    os.environ["XDG_CACHE_HOME"] = d
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def emp(xprocess):
    """start(files, *extra, base=, wait=, env=, prepare=, nofile=, vdir=) -> Emp,
    with a --stats socket (`e.status()`)."""
    emperors = Emperors(xprocess, "pfs-rb-")
    yield emperors
    emperors.stop()


@pytest.fixture
def hostile(xprocess):
    """As `emp`, for the hostile scenarios."""
    emperors = Emperors(xprocess, "pfs-hostile-")
    yield emperors
    emperors.stop()


@pytest.fixture
def emperor(xprocess):
    """As `emp`, with a --pidfile (`e.pidfile`, for `emperor reload-base`)
    and no --stats; each pidfile must be gone once its Emperor stopped."""
    emperors = Emperors(xprocess, "pfs-fl-", stats=False, pidfile=True)
    yield emperors
    left: list[Path] = []
    emperors.stop(after=lambda e: left.extend(p for p in [e.pidfile] if p and p.exists()))
    assert not left, f"pidfile left behind: {left}"


@pytest.fixture
def ctl_emperor(xprocess):
    """As `emp`, with both --stats and --pidfile, and the default reload grace."""
    emperors = Emperors(xprocess, "pfs-ctl-", pidfile=True, args=[
        "--mercy", "5", "--rescan-interval", "2", "--backoff-first", "0.2", "--backoff-max", "1"])
    yield emperors
    emperors.stop()


@pytest.fixture
def front(xprocess):
    """start(files, *extra) -> Front: an Emperor with its front door (nginx)."""
    from support.front import FrontDoors

    emperors = FrontDoors(xprocess)
    yield emperors
    emperors.stop()


@pytest.fixture
def deploy_tmp():
    """A directory for sockets that live outside the vassals directory."""
    d = Path(tempfile.mkdtemp(prefix="pfs-hd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
