"""Deployment: a runtime install from the built wheel, and the examples an
operator copies (container image, Kubernetes manifests, systemd unit) work
as written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from support import free_port, wait_for

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


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv of its own with the package installed from a wheel built from
    the checkout's tracked files: what `pip install psgi_forkserver-*.whl`
    gives an operator. Its dependencies (psutil, jinja2, ...) come from the
    test venv's site-packages by a .pth line, so that no network is needed;
    the package itself only from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(src)], check=True, timeout=120, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("psgi_forkserver-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.rmtree(src)
    return venv


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
    (vassals / "base.ini").write_text(f"[uwsgi]\nearly-psgi = {HELLO}\n"
                                      f"fork-server = {tmp_path}/fork.sock\nfork-server-spares = 0\n")
    (vassals / "app.ini").write_text(f"[uwsgi]\nhttp-socket = 127.0.0.1:{port}\nenv = APP_NAME=app\n")
    proc = subprocess.Popen([str(wheel_venv / "bin" / "emperor"), "run", str(vassals),
                             "--stats", str(tmp_path / "stats")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        status, body = wait_for(lambda: http_get(f"http://127.0.0.1:{port}/"), 30,
                                "the adopted vassal to answer")
        assert status == 200 and body.startswith("name=app "), body
    finally:
        stop(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()
