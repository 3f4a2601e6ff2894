"""What the front door knows of one vassal (`Route`), and how a vassal
file's facts become one: its limits, its socket address as nginx writes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Route:
    """What the front door needs to know about one vassal."""

    vassal: str
    domains: tuple[str, ...]
    target: str  # "unix:/run/.../app.sock" or "127.0.0.1:9101", as nginx writes them
    up: bool = True  # False: answered with 503 (and Retry-After)
    retry_after: int = 1  # seconds, for a vassal that is down (0: no Retry-After)
    protocol: str = "http"  # "uwsgi": the vassal's `socket` (nginx's uwsgi_pass)
    limit_post: int = 0  # the vassal's `limit-post`: nginx's client_max_body_size (0: none)
    head_size: int = 8192  # the vassal's `buffer-size` (largest request head)


def route_limits(cfg) -> dict[str, int]:
    """The vassal file's limits the front door applies too (Route's
    limit_post, head_size), from its `limit-post` and `buffer-size`."""
    def number(key: str, default: int) -> int:
        value = cfg.get(key)
        return int(value) if value is not None and value.isdigit() else default
    return {"limit_post": number("limit-post", 0), "head_size": number("buffer-size", 8192)}


def nginx_target(addr: str) -> str:
    """A vassal's socket address as an nginx `server` writes it."""
    if "/" in addr:
        return f"unix:{addr}"
    if addr.startswith(":"):
        return f"127.0.0.1{addr}"  # all addresses: loopback reaches it
    return addr
