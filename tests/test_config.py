import os
from pathlib import Path

import pytest

from psgi_forkserver import config as c

from support import base_ini


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


def test_a_file_saved_with_a_byte_order_mark_is_told_so(tmp_path: Path):
    """An editor's UTF-8 byte order mark before `[uwsgi]` (CRLF line ends
    too): the vassal program would see no section; the error says why
    rather than 'no [uwsgi] section' in a file that shows one."""
    f = tmp_path / "bom.ini"
    f.write_bytes(b"\xef\xbb\xbf[uwsgi]\r\nhttp-socket = 127.0.0.1:9999\r\n")
    got = c.load(f, judge=True)
    assert got.error == "bom.ini:1: starts with a byte order mark (U+FEFF): save it without one", got.error
    f.write_bytes(b"[uwsgi]\r\nhttp-socket = 127.0.0.1:9999\r\n")
    assert c.load(f, judge=True).error is None


def test_load_and_base_detection(tmp_path: Path):
    (tmp_path / "base.ini").write_text(base_ini("app.psgi"))
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
    # bytes that are not UTF-8 are content too: one Latin-1 letter for another
    f.write_bytes(b"[uwsgi]\nenv = A=caf\xe9\n")
    latin1 = c.load(f).fingerprint
    f.write_bytes(b"[uwsgi]\nenv = A=caf\xe8\n")
    assert c.load(f).fingerprint != latin1


def test_bad_file_has_error(tmp_path: Path):
    f = tmp_path / "a.ini"
    f.write_text("[uwsgi\n")
    assert c.load(f).error


# -- judging a vassal file against the declaration (perl/ForkServer/options.json) --


@pytest.mark.parametrize("text,where", [
    ("[uwsgi]\nhttp-socket = 127.0.0.1:1\nno-such-key = 1\n", "a.ini:3: unknown option 'no-such-key'"),
    ("[uwsgi]\ndisable-logging = maybe\n", "a.ini:2: bad value 'maybe' for option 'disable-logging': "
                                           "expected a boolean"),
    ("[uwsgi]\nhttp-socket = 127.0.0.1:99999\n", "a.ini:2: bad value '127.0.0.1:99999' for option "
                                                 "'http-socket': port out of range"),
    ("[uwsgi]\nidle = 30\n", "a.ini:2: idle without on-demand"),
    ("[uwsgi]\nidle = 30\non-demand = false\n", "a.ini:2: idle without on-demand"),
    ("[uwsgi]\nhttp-socket = 127.0.0.1:1\nlimit-nproc = 12\n", "a.ini:3: limit-nproc = 12 without uid"),
    ("[uwsgi]\nhttp-socket = 127.0.0.1:1\nprocesses = 2\nhttp-socket = 127.0.0.1:2\n",
     "a.ini:4: 'http-socket' given again (first on line 2)"),
    ("[uwsgi]\nprocesses = 2\nworkers = 3\n", "a.ini:3: 'workers' given again (first on line 2)"),
    ("[other]\nhttp-socket = 127.0.0.1:1\n", "a.ini: no [uwsgi] section"),
    ("", "a.ini: no [uwsgi] section"),
    ("[uwsgi]\nprocesses = 0\n", "a.ini:2: bad value '0' for option 'processes': expected an integer >= 1"),
    ("[uwsgi]\nfork-server = /nonexistent/run/fs.sock\n", "a.ini:2: fork-server /nonexistent/run/fs.sock: "
                                                        "directory /nonexistent/run does not exist"),
    ("[uwsgi]\nfork-server = no/such/dir/fs.sock\n", "a.ini:2: fork-server no/such/dir/fs.sock: directory"),
    ("[uwsgi]\nuid = no-such-user-here\n", "a.ini:2: bad value 'no-such-user-here' for option 'uid': "
                                          "no such user"),
])
def test_judged_file_is_a_config_error_with_its_line(tmp_path: Path, text, where):
    f = tmp_path / "a.ini"
    f.write_text(text)
    cfg = c.load(f, judge=True)
    assert cfg.error is not None and cfg.error.startswith(where), cfg.error


def test_good_files_pass_the_judge(tmp_path: Path):
    f = tmp_path / "a.ini"
    f.write_text("[other]\nx = 1\n[uwsgi]\nhttp-socket = [::1]:9101\nenv = A=1\nenv = B=2\n"
                 "on-demand = true\nidle = 30\ndisable-logging\nfork-server-allow-uid = 0\n"
                 "fork-server-allow-uid = root\nearly-warmup = /\nearly-warmup = /x?y=1\n")
    assert c.load(f, judge=True).error is None
    # the vassal files (the example base's fork-server socket is there too while it runs)
    for path in (Path(__file__).resolve().parent.parent / "examples" / "vassals").glob("*.ini"):
        cfg = c.load(path, judge=True)
        assert cfg.error is None, (path.name, cfg.error)


def test_another_users_uid_is_refused_without_root():
    entries = [(2, "uid", "root")]
    c.judge_options(entries, True, euid=0)  # root may switch
    with pytest.raises(c.ConfigError, match=r"line 2: uid = root: the Emperor runs as uid 1000"):
        c.judge_options(entries, True, euid=1000)
    c.judge_options([(2, "uid", "1000")], True, euid=1000)  # its own uid is fine
    with pytest.raises(c.ConfigError, match="not in that group"):
        c.judge_options([(3, "gid", "0")], True, euid=1000, groups=[1000])


def test_template_is_judged_as_rendered(tmp_path: Path):
    f = tmp_path / "t.ini.j2"
    f.write_text("[uwsgi]\n{% for i in range(2) %}http-socket = 127.0.0.1:{{ 9000 + i }}\n{% endfor %}")
    cfg = c.load(f, judge=True)
    assert cfg.error is not None and cfg.error.startswith("t.ini.j2 (rendered):3: 'http-socket' given again")


def _doc_keys(text: str, header: str) -> list[str]:
    """The first word of the first cell of each row of the table whose header row is `header`."""
    lines = text.splitlines()
    i = lines.index(header) + 2
    keys = []
    while i < len(lines) and lines[i].startswith("|"):
        keys.append(lines[i].split("|")[1].strip().split()[0].strip("`"))
        i += 1
    return keys


def test_docs_list_exactly_the_declared_keys():
    """docs/options.md's and docs/CONTRACT.md's key tables cannot drift from the declaration."""
    root = Path(__file__).resolve().parent.parent
    declared = list(c.declared_options())
    readme = _doc_keys((root / "docs" / "options.md").read_text(), "| key | type | default | meaning |")
    contract = _doc_keys((root / "docs" / "CONTRACT.md").read_text(), "| option | meaning |")
    assert sorted(readme) == sorted(declared), set(readme) ^ set(declared)
    assert sorted(contract) == sorted(declared), set(contract) ^ set(declared)
    assert len(readme) == len(set(readme)) and len(contract) == len(set(contract))


def test_declaration_rows_are_complete():
    for key, o in c.declared_options().items():
        assert o.type in c.CHECKERS, key
        assert o.doc, key
        if o.default is not None:
            c.CHECKERS[o.type](o.default)  # a default the checker itself accepts
        if o.alias is not None:
            assert o.alias in c.declared_options(), key


def test_perl_and_python_give_the_same_verdict_on_every_declared_option():
    """The vassal (ForkServer::Config) and the Emperor (CHECKERS) judge
    values of each declared type alike: a file the Emperor accepts is one
    the vassal accepts, and the reverse."""
    import json
    import subprocess

    samples = ["", "0", "1", "7", "true", "Off", "maybe", "0600", "0999", "-1", "1.5",
               "127.0.0.1:80", ":9101", "[::1]:9101", "127.0.0.1:99999", "nowhere", "A=1",
               "=1", "/", "/x?y=1", "x y", "/a b", "root", "no-such-user-here"]
    keys = [k for k, o in c.declared_options().items() if not o.emperor and o.type != "include"]
    script = r'''
        use strict; use warnings; use JSON::PP; use ForkServer::Config;
        my ($keys, $samples) = @{ decode_json(do { local $/; <STDIN> }) };
        my %out;
        for my $k (@$keys) { for my $v (@$samples) {
            $out{"$k\0$v"} = eval { ForkServer::Config->new->set($k, $v, 'test'); 1 } ? 1 : 0;
        } }
        print encode_json(\%out);
    '''
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["perl", "-I", str(root / "perl"), "-e", script],
                       input=json.dumps([keys, samples]), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    perl = json.loads(r.stdout)
    differ = []
    for k in keys:
        for v in samples:
            try:
                c.CHECKERS[c.declared_options()[k].type](v)
                py = 1
            except ValueError:
                py = 0
            if perl[f"{k}\0{v}"] != py:
                differ.append((k, v, {"perl": perl[f"{k}\0{v}"], "python": py}))
    assert differ == []
    assert len(perl) == len(keys) * len(samples) > 300


# -- uWSGI's magic variables -----------------------------------------------------------

MAGIC_KEYS = {
    "n": "%n", "s": "%s", "e": "%e", "p": "%p", "d": "%d", "c": "%c", "x": "%x", "v": "%v",
    "upper": "%N|%S|%E|%P|%D|%C|%X", "pct": "100%% of %n", "sock": "/run/uwsgi/%n.sock",
    "mykey": "hello", "ref": "%(mykey)-%(nokey)", "env": "$(PFS_MAGIC_SET)|$(PFS_MAGIC_UNSET)",
    "inc": "@(included.txt)", "mixed": "%d%n.sock $(PFS_MAGIC_SET) @(included.txt) %%",
}


def magic_dir(tmp_path: Path) -> Path:
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    (vdir / "included.txt").write_text("from a file\n")
    (vdir / "app.ini").write_text("[uwsgi]\n" + "".join(f"{k} = {v}\n" for k, v in MAGIC_KEYS.items()))
    return vdir


def test_magic_variables_expand_as_the_uwsgi_binary_expands_them(tmp_path, monkeypatch):
    """Each value as uWSGI 2.0 itself expands it (`uwsgi --ini FILE --get
    KEY`, run where an Emperor runs its vassals: in the vassals directory)."""
    import shutil
    import subprocess

    uwsgi = shutil.which("uwsgi")
    if uwsgi is None:
        pytest.skip("no uwsgi binary")
    vdir = magic_dir(tmp_path)
    monkeypatch.setenv("PFS_MAGIC_SET", "set!")
    monkeypatch.delenv("PFS_MAGIC_UNSET", raising=False)
    monkeypatch.chdir(vdir)
    cfg = c.load(vdir / "app.ini", magic=True)
    assert cfg is not None and cfg.error is None and cfg.expanded, cfg
    for key in MAGIC_KEYS:
        out = subprocess.run([uwsgi, "--ini", str(vdir / "app.ini"), "--get", key], cwd=vdir,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        theirs = out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout
        assert cfg.get(key) == theirs, (key, cfg.get(key), theirs)
    assert cfg.get("sock") == "/run/uwsgi/app.sock"
    # what the vassal is sent: the expanded values
    assert "sock = /run/uwsgi/app.sock\n" in cfg.text and "%n" not in cfg.text


@pytest.mark.parametrize("value, why", [
    ("%h.sock", "app.ini:3: uWSGI's magic variable %h (the hostname) is not supported here"),
    ("%3", "app.ini:3: uWSGI's magic variable %3 (a component of the file's directory)"),
    ("@(exec://date)", "app.ini:3: uWSGI's @(exec://date) is not supported here"),
    ("%q", "app.ini:3: %q is not a magic variable (write %% for a %)"),
    ("50%", "app.ini:3: a lone % ends the value"),
    ("@(missing.txt)", "app.ini:3: @(missing.txt): No such file or directory"),
])
def test_magic_variables_without_a_meaning_here_are_refused_by_name(tmp_path, value, why):
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    (vdir / "app.ini").write_text(f"[uwsgi]\nprocesses = 1\nprocname = {value}\n")
    cfg = c.load(vdir / "app.ini", judge=True)
    assert cfg is not None and cfg.error is not None and cfg.error.startswith(why), cfg.error


def test_a_file_without_magic_is_read_by_the_vassal_itself(tmp_path):
    vdir = tmp_path / "vassals"
    vdir.mkdir()
    (vdir / "app.ini").write_text("[uwsgi]\nprocesses = 1\nprocname = me@host $HOME\n")
    cfg = c.load(vdir / "app.ini", judge=True)
    assert cfg is not None and cfg.error is None and not cfg.expanded
    assert cfg.get("procname") == "me@host $HOME"
