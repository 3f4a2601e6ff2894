"""Who the status page answers: Host names it is known by, and a token.

A page on 127.0.0.1 is still reachable from any web page a browser on the
same machine opens, through DNS rebinding: `rebind.attacker.example` first
resolves to the attacker, then to 127.0.0.1, and the browser sends the
attacker's script the answers, with `Host: rebind.attacker.example`. So
the page answers only Host names that cannot be rebound: its address
itself (an IP literal), `localhost` when it listens on loopback, and the
names the operator gives (`--status-http-host`, e.g. behind a proxy).

Any local user can still connect to a loopback port; `--status-http-token-file`
makes every path but /healthz ask for a token (HTTP Basic with any user
name, so a browser prompts for it; or `Authorization: Bearer TOKEN`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

#: paths anyone who reaches the page may read, token or not: whether the
#: Emperor's loop is alive says nothing of its apps
OPEN_PATHS = frozenset({"/healthz"})


class AccessConfigError(ValueError):
    pass


def read_token(path: Path) -> bytes:
    """The token in `path` (surrounding whitespace stripped). The file must
    be a regular file that only its owner may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise AccessConfigError(f"--status-http-token-file {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AccessConfigError(f"--status-http-token-file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise AccessConfigError(
                f"--status-http-token-file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets "
                "others read or change it (chmod 600)")
        token = f.read(4097).strip()
    if not token or len(token) > 4096 or b"\n" in token:
        raise AccessConfigError(
            f"--status-http-token-file {path}: expected one line of 1 to 4096 bytes")
    return token


def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` header -> (lowercased name without a final dot, port or None);
    None when it is not a valid host[:port]."""
    value = value.strip().lower()
    port: int | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return host, port
    host, sep, p = value.rpartition(":")
    if not sep:
        host = value
    elif not p.isdigit():
        return None
    else:
        port = int(p)
    if not host or ":" in host:
        return None
    return host.rstrip("."), port


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class Access:
    """The status page's rules for one listening address."""

    port: int
    names: frozenset[str]  # Host names answered (lowercase, no final dot)
    any_ip: bool = False  # listening on 0.0.0.0 / ::: any IP literal is its address
    token: bytes | None = None

    @classmethod
    def for_address(cls, sockaddr: tuple, extra: tuple[str, ...] = (),
                    token: bytes | None = None) -> "Access":
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        names = {str(ip)}
        if ip.is_loopback or ip.is_unspecified:
            names.add("localhost")
        for name in extra:
            parsed = split_host(name)
            if parsed is None or parsed[1] is not None:
                raise AccessConfigError(f"--status-http-host {name!r}: expected a host name "
                                        "(no port)")
            names.add(parsed[0])
        return cls(int(sockaddr[1]), frozenset(names), ip.is_unspecified, token)

    def host_allowed(self, host: str | None) -> bool:
        """A request without Host (HTTP/1.0 by hand) is not a browser's,
        so rebinding cannot send it."""
        if host is None:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if port is not None and port != self.port:
            return False
        if name in self.names:
            return True
        return self.any_ip and _ip(name) is not None

    def authorized(self, path: str, authorization: str | None) -> bool:
        if self.token is None or path in OPEN_PATHS:
            return True
        if not authorization:
            return False
        scheme, _, cred = authorization.strip().partition(" ")
        given: bytes
        if scheme.lower() == "bearer":
            given = cred.strip().encode("utf-8", "surrogateescape")
        elif scheme.lower() == "basic":
            try:
                pair = base64.b64decode(cred.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            given = pair.partition(b":")[2]
        else:
            return False
        return hmac.compare_digest(given, self.token)
