"""Deployment in tests: the container image's Dockerfile and the Kubernetes
manifests, read as an operator's runtime would read them; the systemd
unit's read-only directories, made by hand."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the project's root
K8S = ROOT / "examples" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"  # the manifests are validated against this release


@dataclass
class Image:
    """The runtime stage of the Dockerfile, as far as running it goes."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str
    exposed: list[int]

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.cmd

    def option(self, name: str) -> str:
        return self.argv[self.argv.index(name) + 1]


def parse_dockerfile(path: Path) -> Image:
    """ENTRYPOINT, CMD, ENV, USER and EXPOSE of the last stage (JSON forms only:
    the shell form would put a shell between the Emperor and SIGTERM)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stage: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stage = []
        stage.append((word.upper(), rest.strip()))
    found: dict[str, Any] = {"ENTRYPOINT": [], "CMD": [], "ENV": {}, "USER": "root",
                             "EXPOSE": []}
    for word, rest in stage:
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
        elif word == "ENV":
            found["ENV"].update(kv.split("=", 1) for kv in shlex.split(rest))
        elif word == "USER":
            found["USER"] = rest
        elif word == "EXPOSE":
            found["EXPOSE"] += [int(p.split("/")[0]) for p in rest.split()]
    return Image(found["ENTRYPOINT"], found["CMD"], found["ENV"], found["USER"], found["EXPOSE"])


def manifests() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def container(m: dict[str, dict]) -> dict:
    (c,) = m["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def probe_port(probe: dict) -> int:
    (url,) = re.findall(r"http://127\.0\.0\.1:(\d+)/(?:healthz|readyz)", " ".join(probe["exec"]["command"]))
    return int(url)


def root_is_a_mount_point() -> bool:
    """False in a chroot into a directory (tools/bare-debian-check's), where
    unshare cannot make "/" private and so no mount may be made safely."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == "/" for line in f)


def read_only_in_a_mount_namespace(paths: list[Path], argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own where `paths` are read-only
    bind mounts of themselves (the rest as it is): what the unit's
    ProtectSystem=strict makes of its vassals directory and codebase.
    unshare and sh exec, so that the process started is the program itself.
    Where "/" is not a mount point (a chroot), argv as it is."""
    if not root_is_a_mount_point():
        return argv
    script = ('n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$1"; '
              'mount -o remount,bind,ro "$1"; shift; n=$((n - 1)); done; exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh",
            str(len(paths)), *map(str, paths), *argv]
