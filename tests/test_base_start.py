"""A base's start under the Emperor: it is started before the Emperor reads
the fleet's other files; started with malloc's heap in 2 MB pages
(glibc.malloc.hugetlb=1 in the Emperor's environment: an operator's
opt-in), it loads its codebase so, with next to nothing left to collapse
before it serves, and its vassals allocate in 4 KB pages (transparent huge
pages off) and never see the tunable in their %ENV."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import app_ini, free_port, get
from support.emperors import Emperors

HEAP_APP = Path(__file__).resolve().parent / "apps" / "heap.psgi"


@pytest.fixture
def heap_emp(xprocess):
    emperors = Emperors(xprocess, "pfs-heap-", app=HEAP_APP)
    yield emperors
    emperors.stop()


def test_the_base_loads_in_huge_pages_and_its_vassals_allocate_in_small_ones(heap_emp):
    port, plain = free_port(), free_port()
    e = heap_emp({"a": app_ini("a", port, processes=1)},
                 env={"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1"}, wait=[port])
    base = e.vpid("base")
    assert e.lines("heap huge from the start, none for vassals"), e.text()
    r = get(port)
    # the worker, forked by the vassal's master: neither sees the tunable
    # (the caller's own are kept) nor gets huge pages for what it allocates
    assert r["tunables"] == "glibc.malloc.check=0", r
    assert r["thp"] == "0", r
    assert int(r["pid"]) != base

    # by default (no tunable of the operator's) the heap is collapsed after
    # the load, and vassals keep transparent huge pages
    e2 = heap_emp({"b": app_ini("b", plain, processes=1)}, wait=[plain])
    r = get(plain)
    assert e2.lines("fork server listening") and not e2.lines("heap huge from the start"), e2.text()
    assert r["tunables"] == "-" and r["thp"] == "1", r


def test_the_emperor_starts_the_base_before_it_reads_the_other_files(emp):
    """A base's codebase loads while the Emperor reads the fleet's other
    files: with a thousand of them, a quarter to a third of a second that
    no longer comes before the base's start."""
    port = free_port()
    # named to be read before the base's file, were they read in order
    e = emp({"a-broken": "[uwsgi]\nhttp-socket = 127.0.0.1:1\nno-such-key = 1\n",
             "b": app_ini("b", port, processes=1)}, wait=[port])
    text = e.text()
    started = text.index("started base vassal")
    assert started < text.index("a-broken.ini:3: unknown option 'no-such-key'"), text
    # the other files are read all the same, at once: b serves
    assert get(port)["name"] == "b"
