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

from .check import Bisect, Check, nginx_message
from .config import (
    BACKEND, DEFAULT_KEEPALIVE, DOWN, RETRY, SHUTDOWN_TIMEOUT, UWSGI_PARAMS, hash_sizes,
    listen_directive, render_locations, render_nginx_conf, render_routing, upstream_name,
)
from .door import FrontDoor
from .links import HOSTS, host_link_name, installed_route, served_by_link
from .nginx import (
    check_listen, default_run_dir, find_nginx, nginx_worker_user, unreachable_by,
    write_if_changed,
)
from .options import FrontDoorOptions
from .route import Route, nginx_target, route_limits

__all__ = [
    "BACKEND", "Bisect", "Check", "DEFAULT_KEEPALIVE", "DOWN", "FrontDoor", "FrontDoorOptions",
    "HOSTS", "RETRY", "Route", "SHUTDOWN_TIMEOUT", "UWSGI_PARAMS", "check_listen",
    "default_run_dir", "find_nginx", "hash_sizes", "host_link_name", "installed_route",
    "listen_directive", "nginx_message", "nginx_target", "nginx_worker_user",
    "render_locations", "render_nginx_conf", "render_routing", "route_limits",
    "served_by_link", "unreachable_by", "upstream_name", "write_if_changed",
]
