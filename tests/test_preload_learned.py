"""What a base's vassals `require` after the fork, loaded by the base
(`preload-learned`, perl/ForkServer/Base/Learned.pm), end to end: a real
Emperor, the real Perl base, vassals whose app requires a module of its
own on its first request (tests/apps/lazy_require.psgi), real HTTP.

Each vassal has one worker: its next answer comes after the report of
what its previous request loaded (the worker reports before it reads
again)."""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import free_port, wait_for
from support.apps import APPS, base_ini, needs_program

pytestmark = needs_program

LAZY = APPS / "lazy_require.psgi"
NOBODY = pwd.getpwnam("nobody")
USED, TENANT, DIES = "LazyLearned::Used", "LazyLearned::Tenant", "LazyLearned::DiesInBase"


@pytest.fixture(scope="module")
def lazy() -> Iterator[Path]:
    """The app and its modules copied where a vassal of `nobody` may read
    them, wherever the checkout is (a clone in a 0700 directory is not)."""
    top = Path(tempfile.mkdtemp(prefix="pf-lazy-"))
    try:
        shutil.copyfile(LAZY, top / LAZY.name)
        shutil.copytree(APPS / "lib" / "LazyLearned", top / "lib" / "LazyLearned")
        for d, _, files in os.walk(top):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(Path(d) / f, 0o644)
        yield top / LAZY.name
    finally:
        shutil.rmtree(top, ignore_errors=True)


def lazy_base(app: Path, *lines: str) -> str:
    return base_ini(app, "fs.sock", *lines)


def vassal_ini(port: int, *lines: str) -> str:
    return "".join(f"{line}\n" for line in (
        "[uwsgi]", f"http-socket = 127.0.0.1:{port}", "processes = 1", "disable-logging = true", *lines))


def adopt(e, name: str, *lines: str) -> int:
    port = free_port()
    e.write(name, vassal_ini(port, *lines))
    wait_for(lambda: answers(port), 30, f"{name} to answer")
    return port


def answers(port: int) -> bool:
    """A path the app does not require anything for: not its first request's."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        c.request("GET", "/nothing-here")
        return c.getresponse().status == 404
    except OSError:
        return False
    finally:
        c.close()


def first(port: int, path: str = "/") -> dict[str, str]:
    """`path`'s answer, then one more request: by then the worker has sent
    its report."""
    got = get_path(port, path)
    get_path(port, path)
    return got


def get_path(port: int, path: str) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        assert r.status == 200
        body = r.read().decode()
    return dict(kv.split("=", 1) for kv in body.split())


def batches(e) -> list[str]:
    return e.lines("modules its vassals loaded lazily") + e.lines("module its vassals loaded lazily")


def test_a_module_one_vassal_required_is_preloaded_for_the_next(emp, lazy):
    e = emp({"base": lazy_base(lazy, "fork-server-spares = 0")}, base=False)
    wait_for(lambda: e.lines("preload-learned: on"), 30, "the base to listen, learning")
    one = first(adopt(e, "one"))
    assert one[USED] == "0", one  # the base did not have it: the first vassal required it itself
    line = wait_for(lambda: batches(e), 30, "the base to load what the vassal loaded")
    assert len(line) == 1 and line[0].endswith(f"loaded 1 module its vassals loaded lazily: {USED}"), e.text()
    two = first(adopt(e, "two"))
    assert two[USED] == "1" and two["loaded"] == "used", two  # in %INC before its first request
    assert len(batches(e)) == 1, e.text()  # nothing new: no second batch


def test_warm_spares_forked_before_the_load_make_way_for_new_ones(emp, lazy):
    e = emp({"base": lazy_base(lazy, "fork-server-spares = 2")}, base=False)
    wait_for(lambda: e.lines("spares: 2 ready"), 30, "the spares to be warm")
    one = first(adopt(e, "one"))
    assert one[USED] == "0", one
    wait_for(lambda: batches(e), 30, "the base to load what the vassal loaded")
    # the pool renewed: the next spare ready is one forked after the load
    wait_for(lambda: len(e.lines("spares: 2 ready")) >= 2, 30, "the renewed spares to be warm")
    two = first(adopt(e, "two"))
    assert two[USED] == "1", (two, e.text())


def test_a_vassal_of_another_uid_never_makes_the_base_load_code(emp, lazy):
    e = emp({"base": lazy_base(lazy, "fork-server-spares = 0")}, base=False)
    wait_for(lambda: e.lines("preload-learned: on"), 30, "the base to listen, learning")
    tenant = first(adopt(e, "tenant", "uid = nobody", f"gid = {NOBODY.pw_gid}"), "/tenant")
    assert tenant[TENANT] == "0", tenant
    # a vassal of the base's own uid after it: its report is the base's only batch
    own = first(adopt(e, "own"))
    assert own[TENANT] == "0", own
    line = wait_for(lambda: batches(e), 30, "the base to load what its own vassal loaded")
    assert len(line) == 1 and line[0].endswith(f": {USED}"), e.text()
    later = first(adopt(e, "later"))
    assert later[USED] == "1" and later[TENANT] == "0", later
    assert not [x for x in e.lines(TENANT) if "base" in x], e.text()


def test_a_module_that_dies_in_the_base_is_not_retried_and_breaks_nothing(emp, lazy):
    e = emp({"base": lazy_base(lazy, "fork-server-spares = 0")}, base=False)
    wait_for(lambda: e.lines("preload-learned: on"), 30, "the base to listen, learning")
    one = first(adopt(e, "one"), "/dies")
    assert one[DIES] == "0" and one["loaded"] == "dies-in-base", one
    refused = wait_for(lambda: e.lines(f"not preloading {DIES}"), 30, "the base to try the module")
    assert len(refused) == 1 and "not tried again" in refused[0] and "refuses to load in a fork server" in refused[0], \
        e.text()
    # the next vassals: adopted, served, the module loaded by each itself as
    # in a process it was never tried in; the refusal said once
    two_port = adopt(e, "two")
    two = first(two_port, "/dies")
    assert two[DIES] == "0" and two["loaded"] == "dies-in-base", two
    first(two_port, "/")
    line = wait_for(lambda: batches(e), 30, "the base to load what the second vassal loaded")
    assert len(line) == 1 and line[0].endswith(f"loaded 1 module its vassals loaded lazily: {USED}"), e.text()
    three = first(adopt(e, "three"), "/dies")
    assert three[USED] == "1" and three[DIES] == "0" and three["loaded"] == "dies-in-base", three
    assert len(e.lines(f"not preloading {DIES}")) == 1, e.text()
    # nothing of it was compiled in the base: the vassals define its subs once
    assert not e.lines("redefined"), e.text()


def test_preload_learned_false_learns_nothing(emp, lazy):
    e = emp({"base": lazy_base(lazy, "fork-server-spares = 0", "preload-learned = false")}, base=False)
    wait_for(lambda: e.lines("preload-learned: off"), 30, "the base to listen, not learning")
    first(adopt(e, "one"))
    # a second adoption is served after the first vassal's report would have come
    two = first(adopt(e, "two"))
    assert two[USED] == "0", two
    assert not batches(e), e.text()
