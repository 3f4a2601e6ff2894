"""Deployment's files as written: what the make targets install, the
Dockerfile (hadolint, .dockerignore) and the Kubernetes manifests
(kubernetes-validate, and that they fit the image)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.deployment import K8S, KUBERNETES_VERSION, container, manifests, parse_dockerfile, probe_port

ROOT = Path(__file__).resolve().parent.parent


# -- what the make targets install --------------------------------------------

TEST_ONLY = {"libcatalyst-perl", "libdancer2-perl", "libmojolicious-perl", "uwsgi-core",
             "starman", "wrk", "chromium", "curl"}
RUNTIME = {"python3", "python3-venv", "perl", "libplack-perl", "libsocket-msghdr-perl",
           "libfile-map-perl", "libhttp-parser-xs-perl", "nginx"}


def make_plan(target: str) -> tuple[set[str], list[str]]:
    """The Debian packages `make TARGET` would install from scratch, and its
    pip command lines (make -n -B: printed, nothing run)."""
    # a make of its own, not a part of the make that may be running the tests
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "-n", "-B", target, "PREFIX=/nonexistent/prefix"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pkgs = {p for line in lines if line.startswith("tools/install-debian-packages")
            for p in line.split()[1:]}
    return pkgs, [line for line in lines if "pip install" in line]


@pytest.mark.parametrize("target", ["run", "install"])
def test_run_and_install_set_up_the_runtime_only(target):
    pkgs, pips = make_plan(target)
    assert RUNTIME <= pkgs, RUNTIME - pkgs  # python3 itself too: a bare Debian lacks it
    assert pkgs & TEST_ONLY == set()
    assert pips and not any("[test]" in line for line in pips), pips


def test_test_sets_up_the_runtime_and_the_test_peers():
    pkgs, pips = make_plan("setup")
    assert RUNTIME | TEST_ONLY - {"chromium"} <= pkgs
    assert any("[test]" in line for line in pips), pips


# -- the container image and the Kubernetes manifests ----------------------------

def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    r = subprocess.run([str(hadolint), str(K8S / "Dockerfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".make", "tests", "bench"} <= ignored, ignored


def test_the_manifests_pass_kubernetes_validate():
    tool = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run([str(tool), "--strict", "-k", KUBERNETES_VERSION,
                        *map(str, sorted(K8S.glob("*.yaml")))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(" passed ") == 3, r.stdout  # ConfigMap, Deployment, Service


def test_the_manifests_fit_the_image():
    image = parse_dockerfile(K8S / "Dockerfile")
    m = manifests()
    c = container(m)
    pod = m["Deployment"]["spec"]["template"]["spec"]
    assert image.user.split(":")[0] not in ("root", "0"), image.user
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the front door listens where the container port, EXPOSE and the Service point
    front_port = int(image.option("--http").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == front_port and front_port in image.exposed and front_port >= 1024
    (svc_port,) = m["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] in ("http", front_port) and svc_port["port"] == front_port
    # the probes ask the status server the image starts
    status_port = int(image.option("--status-http").rsplit(":", 1)[1])
    assert probe_port(c["readinessProbe"]) == status_port == probe_port(c["livenessProbe"])
    # the kubelet waits for preStop and the Emperor's whole graceful stop
    mercy = float(image.option("--mercy"))
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + mercy
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    # the vassals directory is where the image's CMD looks
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    assert image.cmd[0] == mounts["vassals"]
    assert mounts["run"] == image.env["PSGI_FORKSERVER_RUN_DIR"]
    # every app is reached through the front door: a domain, no loopback port
    for name, text in m["ConfigMap"]["data"].items():
        if "fork-server" in text:
            continue
        assert re.search(r"^domain = ", text, re.M), name
        assert "http-socket" not in text, name


def runtime_deb_packages() -> set[str]:
    """The Makefile's RUNTIME_DEB_PACKAGES."""
    text = re.sub(r"\\\n", " ", (ROOT / "Makefile").read_text())
    (line,) = re.findall(r"^RUNTIME_DEB_PACKAGES\s*:=(.*)$", text, re.M)
    return set(line.split())


def test_the_image_and_the_guide_install_every_runtime_package():
    # the image runs no virtual environment (its python3-venv is the build stage's)
    want = runtime_deb_packages() - {"python3-venv"}
    image = re.sub(r"\\\n", " ", (K8S / "Dockerfile").read_text())
    installs = {p for line in re.findall(r"apt-get install (.*)", image) for p in line.split()}
    assert want - installs == set(), "missing from the image's apt-get install"
    guide = re.sub(r"\\\n", " ", (ROOT / "docs" / "deployment.md").read_text())
    named = {p for line in re.findall(r"apt-get install -y (.*)", guide) for p in line.split()}
    assert want - named == set(), "missing from docs/deployment.md's apt-get install"


def image_accounts() -> tuple[dict[str, int], dict[str, tuple[int | None, str | None]]]:
    """The groups (name: gid) and users (name: (uid, primary group)) the
    image's last stage creates with groupadd and useradd."""
    text = re.sub(r"\\\n", " ", (K8S / "Dockerfile").read_text())
    last_stage = re.split(r"^FROM ", text, flags=re.M)[-1]
    groups: dict[str, int] = {}
    users: dict[str, tuple[int | None, str | None]] = {}
    for command in re.split(r"&&|;|\n", last_stage):
        words = command.split()
        if not words or words[0] not in ("groupadd", "useradd"):
            continue
        opts = dict(re.findall(r"--(gid|uid|user-group)(?:[ =](\S+))?", command))
        name = words[-1]
        if words[0] == "groupadd":
            groups[name] = int(opts["gid"])
        else:
            gid = opts.get("gid") or (name if "user-group" in opts else None)
            users[name] = (int(opts["uid"]) if "uid" in opts else None, gid)
    return groups, users


def test_the_images_user_has_the_group_the_image_and_the_pod_run_as():
    """USER uid:gid, the pod's runAsUser/runAsGroup and the account the image
    creates agree: the gid a container runs with is the user's own group,
    named, not a bare number beside a group of another id."""
    image = parse_dockerfile(K8S / "Dockerfile")
    uid, gid = (int(n) for n in image.user.split(":"))
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    groups, users = image_accounts()
    (name,) = [n for n, (u, _) in users.items() if u == uid]
    primary = users[name][1]  # a group's name or its number
    primary_gid = int(primary) if primary and primary.isdigit() else groups.get(primary or "")
    assert primary_gid == gid and gid in groups.values(), (name, primary, groups)
