import os
from pathlib import Path

import pytest

from psgi_forkserver import config as c


@pytest.mark.parametrize("name,ok", [
    ("app.ini", True), (".app.ini", False), ("app.ini~", False), (".app.ini.swp", False),
    ("app.ini.swp", False), ("app.yaml", False), (".ini", False), ("a.b.ini", True),
])
def test_is_vassal_file(name, ok):
    assert c.is_vassal_file(name) is ok


def test_discover(tmp_path: Path):
    for n in ["a.ini", "b.ini", ".c.ini", "d.ini~", ".e.ini.swp", "f.txt"]:
        (tmp_path / n).write_text("[uwsgi]\n")
    (tmp_path / "dir.ini").mkdir()
    (tmp_path / "gone.ini").symlink_to(tmp_path / "nowhere")
    # named like vassal files: found, so that load() reports them (not ignored silently)
    assert c.discover(tmp_path) == {
        "a": tmp_path / "a.ini", "b": tmp_path / "b.ini",
        "dir": tmp_path / "dir.ini", "gone": tmp_path / "gone.ini",
    }
    assert c.discover(tmp_path / "missing") == {}


def test_load_reports_what_is_not_a_readable_file(tmp_path: Path):
    (tmp_path / "dir.ini").mkdir()
    (tmp_path / "gone.ini").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop.ini").symlink_to(tmp_path / "loop.ini")
    os.mkfifo(tmp_path / "fifo.ini")  # must not block the Emperor
    (tmp_path / "zero.ini").symlink_to("/dev/zero")  # must not be read forever
    with open(tmp_path / "huge.ini", "wb") as f:
        f.truncate(c.MAX_FILE + 1)
    for name, why in [("dir", "a directory"), ("gone", "dangling symlink"),
                      ("loop", "unreadable"), ("fifo", "not a regular file"),
                      ("zero", "not a regular file"), ("huge", "larger than")]:
        cfg = c.load(tmp_path / f"{name}.ini")
        assert cfg is not None and cfg.error and why in cfg.error, (name, cfg)
        assert f"{name}.ini" in cfg.error and not cfg.transient
    assert c.load(tmp_path / "absent.ini") is None


def test_parse_ini_keeps_repeated_keys_and_order():
    text = """; comment
[other]
env = NO=1
[uwsgi]
# another comment
http-socket = 127.0.0.1:9101
env = A=1
env = B=x=y
master
  processes =  2
[uwsgi]
env = C=3
"""
    pairs = c.parse_ini(text)
    assert pairs == [("http-socket", "127.0.0.1:9101"), ("env", "A=1"), ("env", "B=x=y"),
                     ("master", "true"), ("processes", "2"), ("env", "C=3")]


def test_parse_ini_errors():
    with pytest.raises(c.ConfigError):
        c.parse_ini("[uwsgi\nx=1\n")
    with pytest.raises(c.ConfigError):
        c.parse_ini("[uwsgi]\n= 1\n")


def test_load_and_base_detection(tmp_path: Path):
    (tmp_path / "base.ini").write_text("[uwsgi]\nearly-psgi = app.psgi\nfork-server = fs.sock\n")
    (tmp_path / "app1.ini").write_text("[uwsgi]\nenv = A=1\nenv = B=2\n")
    base = c.load(tmp_path / "base.ini")
    app = c.load(tmp_path / "app1.ini")
    assert base.name == "base" and base.fork_server == "fs.sock"
    assert base.fork_server_path() == (tmp_path / "fs.sock").resolve()
    assert app.get_all("env") == ["A=1", "B=2"] and app.get("env") == "B=2"
    sel = c.BaseSelector()
    assert sel.is_base(base) and not sel.is_base(app)
    named = c.BaseSelector.from_names(["app1.ini"])
    assert named.is_base(app) and not named.is_base(base)
    assert c.load(tmp_path / "gone.ini") is None


def test_fingerprint_follows_content(tmp_path: Path):
    f = tmp_path / "a.ini"
    f.write_text("[uwsgi]\nenv = A=1\n")
    one = c.load(f).fingerprint
    f.touch()
    assert c.load(f).fingerprint == one
    f.write_text("[uwsgi]\nenv = A=2\n")
    assert c.load(f).fingerprint != one


def test_bad_file_has_error(tmp_path: Path):
    f = tmp_path / "a.ini"
    f.write_text("[uwsgi\n")
    assert c.load(f).error

