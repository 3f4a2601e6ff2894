"""Deployment in tests: the container image's Dockerfile and the Kubernetes
manifests, read as an operator's runtime would read them."""

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
