"""The host links: NAME.sock -> the socket of the vassal serving NAME, which
nginx consults for names its configuration does not have yet, so a new
vassal answers by its names at once, without a reload; and whether a
change of the routes can wait for its reload because the links serve it
meanwhile (`served_by_link`, `rerouted`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .route import Route

#: the directory of host links: NAME.sock -> the socket of the vassal
#: serving NAME, for names nginx's configuration does not have yet, each
#: with an empty NAME.known beside it (what nginx tests before connecting)
HOSTS = "hosts"


def host_link_name(domain: str, hosts_dir: Path) -> str | None:
    """The host link of an exact name, or None when nginx cannot reach it
    that way (a wildcard, or a path too long for a UNIX socket address)."""
    if domain.startswith("*"):
        return None
    from ..sockets import MAX_UNIX_PATH

    name = f"{domain}.sock"
    if len(f"{domain}.known") > 255 or len(os.fsencode(str(hosts_dir / name))) > MAX_UNIX_PATH:
        return None
    return name


def _known(hosts_dir: Path, link: str) -> Path:
    return hosts_dir / (link[:-len(".sock")] + ".known")


def served_by_link(r: Route, hosts_dir: Path) -> bool:
    """Whether the host links serve every name of this route (an HTTP
    vassal on a UNIX socket, exact names of a reachable length)."""
    return (r.up and r.protocol == "http" and r.target.startswith("unix:")
            and all(host_link_name(d, hosts_dir) for d in r.domains))


def installed_route(name: str, routes: Iterable[Route]) -> Route | None:
    """The route nginx picks for `name` in a configuration of these routes:
    an exact name first, else the longest wildcard above it."""
    best: tuple[int, Route] | None = None
    for r in routes:
        for d in r.domains:
            if d == name:
                return r
            if d.startswith("*.") and name.endswith(d[1:]) and (best is None or len(d) > best[0]):
                best = (len(d), r)
    return best[1] if best else None


def rerouted(r: Route, installed: Iterable[Route]) -> bool:
    """Whether the running configuration routes one of this route's names
    somewhere else (a name moved from a live vassal, an exact name under
    another vassal's wildcard), or this vassal's dropped names to it: the
    host links cannot help there (nginx consults them only for names it
    does not know), so waiting to reload would let the wrong vassal answer."""
    installed = tuple(installed)
    for d in r.domains:
        now = installed_route(d, installed)
        if now is not None and (now.target != r.target or not now.up):
            return True
    before = next((o for o in installed if o.vassal == r.vassal), None)
    return before is not None and not set(before.domains) <= set(r.domains)


class HostLinks:
    """The FrontDoor's part that keeps its host links (a mixin: the state
    is the FrontDoor's `links`, `links_swept`, `routes`, `refused`)."""

    ng_dir: Path
    routes: tuple[Route, ...] | None
    refused: dict[str, tuple[Route, str]]
    links: dict[str, str]
    links_swept: bool
    log: Callable[[str], None]

    def _sync_links(self) -> None:
        """The host links follow the routes at once (no reload): a new
        vassal answers by its names before nginx's configuration has them."""
        hosts = self.ng_dir / HOSTS
        want: dict[str, str] = {}
        for r in self.routes or ():
            if not served_by_link(r, hosts) or self.refused.get(r.vassal, (None,))[0] == r:
                continue
            for d in r.domains:
                name = host_link_name(d, hosts)
                if name is not None:
                    want.setdefault(name, r.target[len("unix:"):])
        if want == self.links and self.links_swept:
            return
        try:
            hosts.mkdir(parents=True, exist_ok=True)
            if not self.links_swept:  # a killed Emperor's links name vassals gone since
                for old in os.listdir(hosts):
                    os.unlink(hosts / old)
                self.links_swept = True
        except OSError as e:
            self.log(f"cannot create {hosts}: {e.strerror or e}")
            return
        for name in [n for n in self.links if n not in want]:
            try:
                for path in (_known(hosts, name), hosts / name):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
            except OSError as e:
                self.log(f"cannot remove {hosts / name}: {e.strerror or e}")
                continue
            del self.links[name]
        for name, target in want.items():
            if self.links.get(name) == target:
                continue
            tmp = hosts / f".{name}.tmp"
            try:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                os.symlink(target, tmp)
                os.replace(tmp, hosts / name)
                os.close(os.open(_known(hosts, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                 0o644))
            except OSError as e:
                self.log(f"cannot link {hosts / name}: {e.strerror or e}")
                continue
            self.links[name] = target

    def _remove_links(self) -> None:
        """Teardown: the links name sockets about to go."""
        hosts = self.ng_dir / HOSTS
        for name in list(self.links):
            for path in (_known(hosts, name), hosts / name):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self.links.clear()
