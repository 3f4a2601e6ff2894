"""The front door's access log: nginx writes it in the Emperor's own
format (--log-format text or json, UTC timestamps with milliseconds,
`[front]`); the Emperor copies it into its log."""

from __future__ import annotations

import datetime
import json
import os
import re

import psutil
import pytest

from support import PROGRAM, wait_for
from support.front import answers, ini, needs_nginx

needs_perl = pytest.mark.skipif(not PROGRAM.is_file(), reason="no vassal program")


@needs_nginx
@needs_perl
def test_nginx_user_option_and_the_access_log_in_json(front):
    """--nginx-user USER:GROUP: the workers' user, and the group the
    sockets are given to; the access log follows --log-format json like
    every other line."""
    f = front({"app1": ini("app1", "domain = app1.localhost")},
              "--nginx-user", "nobody:nogroup", "--log-format", "json")
    wait_for(lambda: answers(f.port, "app1.localhost", "app1"), 30, "app1")
    if os.geteuid() == 0:
        pid = int(f.lines('"message": "nginx pid ')[-1].split("nginx pid ")[1].split()[0])
        ng = psutil.Process(pid)
        assert {w.username() for w in ng.children()} == {"nobody"}
        assert (f.run / "sockets" / "app1.sock").stat().st_gid == 65534
    # the 503s of app1's start may be relayed first: wait for the 200's line
    answered = wait_for(lambda: [line for line in map(json.loads, (
        x for x in f.lines("app1.localhost 127.0.0.1") if x.startswith("{")))
        if '"GET / HTTP/1.1" 200 ' in line["message"]], 20, "a JSON access line of a 200")
    line = answered[-1]
    assert line["vassal"] == "front" and line["time"].endswith("Z")
    assert line["message"].startswith('app1.localhost 127.0.0.1 "GET / HTTP/1.1" 200 ')


@needs_nginx
@needs_perl
def test_the_access_log_in_text_has_the_emperors_utc_timestamps(front):
    """nginx writes its access lines in the Emperor's own text format
    (the Emperor copies them into its log): a UTC timestamp with
    milliseconds, whatever the Emperor's TZ, `[front]`, the message."""
    f = front({"app1": ini("app1", "domain = app1.localhost")}, env={"TZ": "XXX-9"})
    wait_for(lambda: answers(f.port, "app1.localhost", "app1"), 30, "app1")
    line = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \[front\] app1\.localhost '
                      r'127\.0\.0\.1 "GET / HTTP/1\.1" 200 \d+ \d+\.\d{3}$')
    found = wait_for(lambda: [m for m in map(line.match, f.lines("[front] app1.localhost")) if m], 20,
                     "a text access line of a 200")
    stamp = datetime.datetime.fromisoformat(found[-1].group(1)).replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 120
