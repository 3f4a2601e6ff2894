"""Every Emperor a test starts opens its default stats socket in a run
directory of this session's own (removed at the end), never in the
machine's /run/psgi-forkserver."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from psgi_forkserver.status import RUN_DIR_ENV


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
