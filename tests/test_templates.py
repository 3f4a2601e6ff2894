"""Vassal files as Jinja2 templates: NAME.ini.j2."""

import os
import re
from pathlib import Path

import pytest

from psgi_forkserver import config as c


# -- templates -----------------------------------------------------------------


@pytest.mark.parametrize("name,ok", [
    ("app.ini.j2", True), (".app.ini.j2", False), ("app.ini.j2~", False),
    (".app.ini.j2.swp", False), ("app.ini.j2.swx", False), (".ini.j2", False),
    ("app.j2", False), ("4913", False), ("#app.ini#", False), (".#app.ini", False),
    ("app.ini.tmp", False),
])
def test_is_vassal_file_templates_and_droppings(name, ok):
    assert c.is_vassal_file(name) is ok


def test_vassal_name_of_a_template():
    assert c.vassal_name("app.ini.j2") == "app"
    assert c.vassal_name("app.ini") == "app"
    assert c.vassal_name("a.b.ini.j2") == "a.b"


def test_template_is_rendered(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PFS_TEST_PORT_BASE", "9100")
    (tmp_path / "common.inc").write_text("processes = 2\n")
    f = tmp_path / "app7.ini.j2"
    f.write_text(
        "[uwsgi]\n"
        "http-socket = 127.0.0.1:{{ env.PFS_TEST_PORT_BASE | int + name[3:] | int }}\n"
        "env = APP_NAME={{ name }}\n"
        "chdir = {{ vassals_dir }}\n"
        '{% include "common.inc" %}'
    )
    cfg = c.load(f)
    assert cfg.error is None and cfg.rendered and cfg.name == "app7"
    assert cfg.get("http-socket") == "127.0.0.1:9107"
    assert cfg.get("env") == "APP_NAME=app7"
    assert cfg.get("chdir") == str(tmp_path)
    assert cfg.get("processes") == "2"
    assert cfg.text.startswith("[uwsgi]\nhttp-socket = 127.0.0.1:9107\n")
    assert c.discover(tmp_path) == {"app7": f}


def test_plain_file_text_and_not_rendered(tmp_path: Path):
    f = tmp_path / "a.ini"
    f.write_text("[uwsgi]\nenv = X={{ name }}\n")
    cfg = c.load(f)
    assert not cfg.rendered and cfg.text == "[uwsgi]\nenv = X={{ name }}\n"


def test_template_fingerprint_covers_the_rendered_text(tmp_path: Path, monkeypatch):
    f = tmp_path / "a.ini.j2"
    f.write_text("[uwsgi]\nenv = V={{ env.PFS_TEST_V }}\n")
    monkeypatch.setenv("PFS_TEST_V", "1")
    one = c.load(f)
    assert one.fingerprint == c.load(f).fingerprint  # stable (and cached)
    monkeypatch.setenv("PFS_TEST_V", "2")
    two = c.load(f)
    assert two.fingerprint != one.fingerprint and two.get("env") == "V=2"
    # an included file changes the rendering, hence the fingerprint
    inc = tmp_path / "inc"
    inc.write_text("A")
    f.write_text('[uwsgi]\nenv = V={% include "inc" %}\n')
    a = c.load(f)
    st = inc.stat()
    inc.write_text("B")
    os.utime(inc, ns=(st.st_atime_ns, st.st_mtime_ns))  # two writes in one clock tick
    b = c.load(f)
    assert b.get("env") == "V=B" and a.fingerprint != b.fingerprint


@pytest.mark.parametrize("text,line,words", [
    ("[uwsgi]\nenv = A=1\nhttp-socket = :{{ port }}\n", 3, "'port' is undefined"),
    ("[uwsgi]\n{% if name %}\nenv = A=1\n", None, "endif"),  # jinja2 picks the line
    ("[uwsgi]\nenv = {{ name | nosuchfilter }}\n", 2, "nosuchfilter"),
    ("[uwsgi]\nenv = {{ env.NO_SUCH_VARIABLE_PFS }}\n", 2, "NO_SUCH_VARIABLE_PFS"),
    ("[uwsgi]\n\n{{ 1 // 0 }}\n", 3, "ZeroDivisionError"),
])
def test_template_errors_say_file_and_line(tmp_path: Path, text, line, words):
    f = tmp_path / "bad.ini.j2"
    f.write_text(text)
    cfg = c.load(f)
    assert cfg is not None and cfg.name == "bad" and cfg.rendered
    assert re.match(rf"bad\.ini\.j2:{line or '[0-9]+'}: ", cfg.error), cfg.error
    assert words in cfg.error and "\n" not in cfg.error
    assert cfg.options == ()


def test_rendered_text_that_is_not_ini(tmp_path: Path):
    f = tmp_path / "r.ini.j2"
    f.write_text("[uwsgi]\n{{ '[broken' }}\n")
    assert c.load(f).error == "r.ini.j2 (rendered):2: unterminated section header"


def test_both_ini_and_template_is_an_error(tmp_path: Path):
    plain, tmpl = tmp_path / "app.ini", tmp_path / "app.ini.j2"
    plain.write_text("[uwsgi]\nenv = A=1\n")
    tmpl.write_text("[uwsgi]\nenv = A={{ name }}\n")
    assert list(c.discover(tmp_path)) == ["app"]
    for f in (plain, tmpl):
        cfg = c.load(f)
        assert cfg.name == "app" and "both app.ini and app.ini.j2 exist" in cfg.error
    # removing either one leaves the other, never "removed"
    plain.unlink()
    cfg = c.load(plain)
    assert cfg is not None and cfg.error is None and cfg.rendered and cfg.path == tmpl
    plain.write_text("[uwsgi]\n")
    tmpl.unlink()
    cfg = c.load(tmpl)
    assert cfg is not None and cfg.path == plain and not cfg.rendered
    plain.unlink()
    assert c.load(tmpl) is None and c.load(plain) is None


# -- rendering with a deadline (config/render.py) ---------------------------------

LOOPS = "[uwsgi]\nx = 1\n{% for i in range(10**10) %}{% endfor %}\n"


def test_render_with_deadline_gives_the_text_or_the_error(tmp_path: Path):
    from psgi_forkserver.config.render import render_with_deadline

    good = tmp_path / "app.ini.j2"
    src = "[uwsgi]\nname = {{ name }}\n"
    good.write_text(src)
    assert render_with_deadline(good, src, "app", 30) == c.render_template(good, src, "app")
    bad = "[uwsgi]\n\nx = {{ nope }}\n"
    with pytest.raises(c.TemplateFailure, match=r"^app\.ini\.j2:3: .*nope"):
        render_with_deadline(good, bad, "app", 30)


def test_render_with_deadline_stops_a_template_that_loops(tmp_path: Path):
    from psgi_forkserver.config.render import render_with_deadline

    path = tmp_path / "slow.ini.j2"
    path.write_text(LOOPS)
    with pytest.raises(c.TemplateFailure, match=r"^slow\.ini\.j2: rendering took more than 0\.5 s"):
        render_with_deadline(path, LOOPS, "slow", 0.5)


def test_renderer_result_once_the_child_ended(tmp_path: Path):
    """The Emperor's renderer: None while a child renders, then the result.
    One child renders a batch in turn; a template past its deadline is
    killed with its child, stays failed until its file changes, and the
    rest of its batch is rendered by a new child."""
    import selectors
    import time

    from psgi_forkserver.config.render import Renderer

    from support import wait_for

    done: list[Path] = []
    with selectors.DefaultSelector() as sel:
        r = Renderer(sel, done.append, timeout=1, parallel=1)

        def turn():
            for key, _ in sel.select(0.1):
                key.data(0.0)
            r.expire(time.monotonic())
            for pid in list(r.pids):  # the Emperor's _reap, for this test
                if os.waitpid(pid, os.WNOHANG)[0]:
                    r.reaped(pid)

        a, slow, b = (tmp_path / f"{n}.ini.j2" for n in ("a", "slow", "b"))
        for p in (a, b):
            p.write_text("[uwsgi]\nname = {{ name }}\n")
        slow.write_text(LOOPS)
        assert r.render(a, a.read_text(), "a") is None
        assert r.render(slow, LOOPS, "slow") is None
        assert r.render(b, b.read_text(), "b") is None
        r.start()
        assert r.forks == 1  # one batch
        wait_for(lambda: (turn(), len(done) == 3)[1], 30, "the three renders to end")
        assert done == [a, slow, b]
        assert r.render(a, a.read_text(), "a") == "[uwsgi]\nname = a\n"
        assert r.render(b, b.read_text(), "b") == "[uwsgi]\nname = b\n"
        for _ in range(2):  # not rendered again: the same failure at once
            with pytest.raises(c.TemplateFailure, match="slow.ini.j2: rendering took more than 1 s"):
                r.render(slow, LOOPS, "slow")
        assert r.forks == 2  # b's, after slow's child was killed
        wait_for(lambda: (turn(), not r.pids)[1], 30, "the children reaped")
