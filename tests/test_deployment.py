"""Deployment: a runtime install from the built wheel (built once for the
module), and what runs from it as an operator copies it: the container
image's command, the Prometheus rules, the systemd unit."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from importlib import metadata
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from support import base_ini, descendants, free_port, wait_for
from support.deployment import (K8S, container, manifests, parse_dockerfile, probe_port,
                                read_only_in_a_mount_namespace, root_is_a_mount_point)

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "tests" / "apps" / "hello.psgi"


def http_get(url: str, host: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process we started, SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- a runtime install from the wheel --------------------------------------------


# Debian's python3 (what `make install` and the image use); the test venv's
# own python lives under /root, which other users cannot reach.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def copy_runtime_dependencies(site: Path) -> None:
    """The installed files of the package's runtime requirements, and of
    theirs, from the test venv into `site` (no extras, as pip would)."""
    from packaging.requirements import Requirement

    todo = [r for r in metadata.distribution("psgi-forkserver").requires or []]
    seen: set[str] = set()
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = metadata.distribution(req.name)
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        base = Path(dist.locate_file("")).resolve()
        for f in dist.files or []:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file() and path.is_relative_to(base):  # not its scripts in bin/
                (site / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, site / f)
        todo += dist.requires or []
    assert {"psutil", "jinja2", "markupsafe"} <= seen, seen


@pytest.fixture(scope="module")
def wheel_venv() -> Path:
    """A venv of its own with the package installed from a wheel built from
    the checkout's tracked files: what `pip install psgi_forkserver-*.whl`
    gives an operator. Its dependencies (psutil, jinja2, ...) are copied
    from the test venv, so that no network is needed; the package itself
    comes only from the wheel. World-readable, so that the container test's
    unprivileged user can run it (the checkout may be in root's home)."""
    tmp = Path(tempfile.mkdtemp(prefix="pf-wheel-"))
    tmp.chmod(0o755)
    try:
        src = tmp / "src"
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "dist"), str(src)], check=True, timeout=120, cwd=tmp)
        (wheel,) = (tmp / "dist").glob("psgi_forkserver-*.whl")
        venv = tmp / "venv"
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=60)
        subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                        "--no-index", str(wheel)], check=True, timeout=120)
        site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        copy_runtime_dependencies(site)
        shutil.rmtree(src)
        yield venv
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_wheel_gives_emperor_and_the_perl_side(wheel_venv):
    emperor = wheel_venv / "bin" / "emperor"
    r = subprocess.run([str(emperor), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "emperor run" in r.stdout, r.stderr
    lib = Path(subprocess.run([str(emperor), "perl-lib"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip())
    # the installed copy, not the checkout's perl/
    assert lib.is_relative_to(wheel_venv), lib
    for pm in ("ForkServer.pm", "ForkServer/HTTPServer/Worker.pm", "Plack/Handler/ForkServer.pm",
               "ForkServer/options.json", "ForkServer/protocol.json"):
        assert (lib / pm).is_file(), pm


def test_plackup_finds_the_handler_through_perl_lib(wheel_venv, tmp_path):
    lib = subprocess.run([str(wheel_venv / "bin" / "emperor"), "perl-lib"], capture_output=True,
                         text=True, timeout=30, check=True).stdout.strip()
    port = free_port()
    env = {**os.environ, "PERL5LIB": lib, "APP_NAME": "plackup"}
    proc = subprocess.Popen(["plackup", "-s", "ForkServer", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", str(HELLO)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        status, body = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/"), 20,
                                "plackup -s ForkServer to answer")
        assert status == 200 and body.startswith("name=plackup "), body
    finally:
        stop(proc)
    err = proc.stderr.read().decode()
    assert "Can't locate" not in err, err


def test_the_wheels_emperor_runs_a_base_and_an_adopted_vassal(wheel_venv, tmp_path):
    """The installed Emperor finds its installed vassal program (the wheel's
    package has no checkout beside it to fall back on)."""
    vassals = tmp_path / "vassals"
    vassals.mkdir()
    port = free_port()
    (vassals / "base.ini").write_text(base_ini(HELLO, f"{tmp_path}/fork.sock", "fork-server-spares = 0"))
    (vassals / "app.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nenv = APP_NAME=app\n")
    log = tmp_path / "emperor.log"
    with log.open("wb") as out:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([str(wheel_venv / "bin" / "emperor"), "run", str(vassals),
                                 "--stats", str(tmp_path / "stats")],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        status, body = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/"), 30,
                                "the adopted vassal to answer")
        assert status == 200 and body.startswith("name=app "), body
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")


RULES = ROOT / "examples" / "prometheus" / "psgi-forkserver-rules.yml"


def assert_rules_name_real_metrics(metrics: str) -> None:
    """Every psgi_forkserver_* series the recording rules and alerts use is
    one a running Emperor exports (a renamed metric would leave a rule empty)."""
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    families = {family(n) for n in re.findall(r"^# TYPE (\S+) ", metrics, re.M)}
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert rules and all(("record" in r) != ("alert" in r) and r["expr"] for r in rules)
    used = {n for r in rules for n in re.findall(r"\bpsgi_forkserver_\w+", r["expr"])}
    assert used, "no metric used"
    unknown = {n for n in used if family(n) not in families}
    assert unknown == set(), unknown


@pytest.fixture(scope="module")
def unprivileged_user():
    """A user of this module's own (removed at the end), as the image's USER."""
    if os.geteuid() != 0:
        pytest.skip("making a user and running as it needs root")
    name = f"pfdeploy{os.getpid()}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", name], check=True, timeout=60)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], timeout=60)


@pytest.fixture
def readable_dir():
    """A temporary directory other users can enter (pytest's own are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="pf-image-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_the_images_command_serves_the_configmap_apps(wheel_venv, unprivileged_user, tmp_path,
                                                      readable_dir):
    """The image's ENTRYPOINT and CMD, run on this machine as an unprivileged
    user from the wheel's install, with the ConfigMap's files: each app
    answers 200 by name through the front door's port, and the probes pass.
    Image paths become temporary ones; the ports of the CMD (8080, 9100) become
    free loopback ports (the container's 0.0.0.0 too: tests stay on loopback)."""
    image = parse_dockerfile(K8S / "Dockerfile")
    m = manifests()
    c = container(m)
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    user = unprivileged_user
    work = readable_dir
    vassals, run = work / "vassals", work / "run"
    front, status = free_port(), free_port()
    # the codebase the image copies in, where the user can read it
    (work / "app").mkdir()
    shutil.copy2(ROOT / "examples" / "myapp.pl", work / "app" / "myapp.pl")
    paths = {mounts["vassals"]: str(vassals), mounts["run"]: str(run),
             "/opt/psgi-forkserver/app/myapp.pl": str(work / "app" / "myapp.pl")}

    def host(text: str) -> str:
        for image_path, host_path in paths.items():
            text = text.replace(image_path, host_path)
        return text

    front_addr, status_addr = image.option("--http"), image.option("--status-http")
    argv = [host(a) for a in image.argv]
    argv[argv.index(front_addr)] = f"127.0.0.1:{front}"
    argv[argv.index(status_addr)] = f"127.0.0.1:{status}"
    assert argv[0] == "emperor"
    argv[0] = str(wheel_venv / "bin" / "emperor")
    vassals.mkdir()
    run.mkdir(mode=0o700)
    os.chown(run, user.pw_uid, user.pw_gid)
    for name, text in m["ConfigMap"]["data"].items():
        (vassals / name).write_text(host(text))
    env = {"PATH": f"{wheel_venv / 'bin'}:/usr/bin:/bin", "LANG": "C.UTF-8",
           **{k: host(v) for k, v in image.env.items() if k != "PATH"}}
    log = tmp_path / "emperor.log"
    with log.open("wb") as out:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(argv, env=env, cwd=work, user=user.pw_uid, group=user.pw_gid,
                                extra_groups=[], stdout=out, stderr=subprocess.STDOUT)
    try:
        apps = {name.removesuffix(".ini"): re.findall(r"^domain = (\S+)", text, re.M)
                for name, text in m["ConfigMap"]["data"].items() if "fork-server" not in text}
        assert len(apps) >= 2
        for app, (domain, *_) in apps.items():
            status_code, body = wait_for(
                lambda: (r := http_get(f"http://127.0.0.1:{front}/", host=domain))[0] == 200 and r,
                60, f"{app} through the front door as {domain}")
            assert body.startswith(f"hello from {app} "), body
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = [a.replace(f":{probe_port(c[probe])}/", f":{status}/")
                   for a in c[probe]["exec"]["command"]]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, (probe, r.stderr)
        who = {p.username() for p in [psutil.Process(proc.pid), *descendants(proc.pid)]}
        assert who == {user.pw_name}, who
        assert_rules_name_real_metrics(http_get(f"http://127.0.0.1:{status}/metrics")[1])
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")


# -- the systemd unit ----------------------------------------------------------

UNIT = ROOT / "examples" / "systemd" / "psgi-forkserver.service"
HARDENING = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "NoNewPrivileges": "yes", "Delegate": "yes"}


def unit_settings(text: str) -> dict[str, str]:
    text = re.sub(r"\\\n\s*", " ", text)
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith(("#", ";")))


def test_the_systemd_unit_runs_from_a_runtime_install_hardened():
    settings = unit_settings(UNIT.read_text())
    for key, value in HARDENING.items():
        assert settings.get(key) == value, key
    for key in ("ExecStart", "ExecReload"):
        program = settings[key].split()[0]
        assert program == "/opt/psgi-forkserver/bin/emperor", (key, program)
    # systemd's stop timeout outlasts the Emperor's own graceful stop
    mercy = float(settings["ExecStart"].split("--mercy")[1].split()[0])
    assert float(settings["TimeoutStopSec"]) > mercy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian's systemd package)")
def test_the_systemd_unit_passes_systemd_analyze_verify(wheel_venv, tmp_path):
    """Verified as installed: its /opt/psgi-forkserver is the wheel's venv here
    (systemd-analyze checks that the programs it names exist)."""
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/psgi-forkserver", str(wheel_venv)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stdout + r.stderr


SYSTEMD_VASSALS = ROOT / "examples" / "systemd" / "vassals"


@pytest.mark.skipif(os.geteuid() != 0, reason="the unit runs the Emperor as root")
def test_the_systemd_units_command_serves_its_vassals_by_name_as_root(wheel_venv, tmp_path,
                                                                      readable_dir):
    """The unit's ExecStart, run as systemd would: as root, with its
    Environment, in a run directory made with its RuntimeDirectoryMode,
    with the vassal files its header says to install (examples/systemd/vassals)
    in a read-only vassals directory and a read-only codebase, as
    ProtectSystem=strict makes /etc and /srv. Each app answers 200 by name
    through the front door, /readyz answers 200, the unit's ExecReload (a code
    deploy) exits 0, SIGTERM ends it with 0. (With RuntimeDirectoryMode=0700
    the Emperor refused to start: nginx's workers, www-data, could not reach
    the sockets under it. With examples/vassals' base.ini, whose fork-server
    socket is in the vassals directory, it refused to start: `fork-server
    socket .../base.sock: Read-only file system`.)"""
    settings = unit_settings(UNIT.read_text())
    vassals, run, app = readable_dir / "vassals", readable_dir / "run", readable_dir / "app"
    front, status = free_port(), free_port()
    paths = {"/etc/psgi-forkserver/vassals": str(vassals), "/run/psgi-forkserver": str(run),
             "/srv/app": str(app), "/opt/psgi-forkserver": str(wheel_venv),
             "127.0.0.1:8080": f"127.0.0.1:{front}", "127.0.0.1:9100": f"127.0.0.1:{status}"}

    def host(text: str) -> str:
        for unit_path, host_path in paths.items():
            text = text.replace(unit_path, host_path)
        return text

    vassals.mkdir()
    app.mkdir()
    shutil.copy2(ROOT / "examples" / "myapp.pl", app / "myapp.pl")
    files = {f.name: f.read_text() for f in sorted(SYSTEMD_VASSALS.glob("*.ini"))}
    for name, text in files.items():
        (vassals / name).write_text(host(text))
    old = os.umask(0)
    try:  # systemd makes it with exactly this mode
        run.mkdir(mode=int(settings.get("RuntimeDirectoryMode", "0755"), 8))
    finally:
        os.umask(old)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
           **dict(kv.split("=", 1) for kv in host(settings.get("Environment", "")).split())}
    log = tmp_path / "emperor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(read_only_in_a_mount_namespace([vassals, app],
                                                               host(settings["ExecStart"]).split()),
                                env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT)
    try:
        apps = {name.removesuffix(".ini"): re.findall(r"^domain = (\S+)", text, re.M)
                for name, text in files.items() if "fork-server" not in text}
        assert len(apps) >= 2, files
        for name, (domain, *_) in apps.items():
            assert wait_for(lambda: proc.poll() is not None or http_get(
                f"http://127.0.0.1:{front}/", host=domain)[0] == 200, 60, f"{name} as {domain}") is True
            assert proc.poll() is None, log.read_text(errors="replace")
            assert http_get(f"http://127.0.0.1:{front}/", host=domain)[1].startswith(f"hello from {name} ")
        wait_for(lambda: http_get(f"http://127.0.0.1:{status}/readyz")[0] == 200, 30, "/readyz")
        if root_is_a_mount_point():  # the vassals directory is read-only for the Emperor
            r = subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "touch", str(vassals / "x")],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
        reload = subprocess.run(host(settings["ExecReload"]).split(), env=env, cwd="/",
                                capture_output=True, text=True, timeout=120)
        assert reload.returncode == 0, reload.stdout + reload.stderr + log.read_text(errors="replace")
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")
