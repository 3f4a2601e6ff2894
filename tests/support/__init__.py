"""What tests share, in one place: `from support import ...` for helpers,
tests/conftest.py for the fixtures built on them. No test module imports
from another.

- processes: waiting with a deadline, ports, descendants, zombies, reaping;
- apps: the test apps, `base_ini` (the one writer of a base's file),
  `app_ini`, HTTP to an app;
- emperors: `start_emperor`, `Emperors` (a fleet on a fresh directory),
  `Emp` (the handle on a running Emperor), `Load`;
- front: the front door (`--http`), `Front`, `FrontDoors`;
- deploys: code deploys (`deploy_fleet`, `reload_base`, `serve`);
- vassals: the state machine without processes (`POLICY`, `cfg`, `ctx`);
- hostile: `emperor_ok`, what holds after each hostile blow;
- cockpit: `emperor_cli`, `http_get` of a page, `cockpit_fleet`;
- spares: warm spares (`warm_base`, `spares`, `spare_masters`);
- prove: `emperor prove` and `prove` on tests/prove_suite/ (`run`, `verdicts`);
- tenants: a real user for a test (`tenant_user`) and its fleets (`start_fleet`);
- frameworks: the framework apps' requests and replies, Starman, their fleet;
- deployment: the Dockerfile and the Kubernetes manifests, read.
"""

from .apps import (APP, APPS, DAEMON, PROGRAM, TESTS, app_ini, base_ini, daemon_ini, get, http_get,
                   needs_program, refused, spawn_left_behind)
from .emperors import FAST, EMPEROR, Emp, EmperorLog, Emperors, Load, RunningEmperor, start_emperor, stop_emperor
from .processes import (alive, assert_no_zombies, descendants, free_port, kill_all, pid_alive, reap_reparented,
                        set_subreaper, spare_pids, unix_peers, wait_for, zombies_under)

__all__ = [
    "APP", "APPS", "DAEMON", "EMPEROR", "FAST", "PROGRAM", "TESTS", "Emp", "EmperorLog", "Emperors", "Load",
    "RunningEmperor", "alive", "app_ini", "assert_no_zombies", "base_ini", "daemon_ini", "descendants",
    "free_port", "get", "http_get", "kill_all", "needs_program", "pid_alive", "reap_reparented", "refused",
    "set_subreaper", "spare_pids", "spawn_left_behind", "start_emperor", "stop_emperor", "unix_peers",
    "wait_for", "zombies_under",
]
