"""The front door: one nginx in front of every vassal, routing by Host name.

Its parts:

- route.py: `Route`, what the front door knows of one vassal;
- config.py: the configuration, a pure function of the routes (the
  http-level `render_routing`, the embedded nginx's `render_nginx_conf`);
- links.py: the host links, which serve a new vassal's names before nginx's
  configuration has them;
- check.py: a candidate configuration through `nginx -t`, the bisection of
  a refused one to the routes that broke it, installing an accepted one;
- nginx.py: nginx on this host (its binary, its port, its workers' user,
  its spawn);
- options.py: `FrontDoorOptions`, how the front door is run;
- door.py: `FrontDoor`, which owns nginx's process and ties them together.

The names other modules use are here.
"""

from __future__ import annotations

from ..lazy import exports, grouped

# imported when first used: `emperor run`'s parser needs a default from
# config.py, not nginx's spawn and checks
_EXPORTS = grouped({
    ".check": ("Bisect", "Check", "nginx_message"),
    ".config": ("BACKEND", "DEFAULT_KEEPALIVE", "DOWN", "RETRY", "SHUTDOWN_TIMEOUT",
                "UWSGI_PARAMS", "hash_sizes", "listen_directive", "render_locations",
                "render_nginx_conf", "render_routing", "upstream_name"),
    ".door": ("FrontDoor",),
    ".links": ("HOSTS", "host_link_name", "installed_route", "served_by_link"),
    ".nginx": ("check_listen", "default_run_dir", "find_nginx", "nginx_worker_user",
               "unreachable_by", "write_if_changed"),
    ".options": ("FrontDoorOptions",),
    ".route": ("Route", "nginx_target", "route_limits"),
})

__all__ = sorted(_EXPORTS)
__getattr__ = exports(globals(), _EXPORTS)
