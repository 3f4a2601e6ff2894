"""The log limits' bucket and the pipe it holds back, with a real pipe, a
real selector and the Emperor's relay (no Emperor process: the flood is
written before the relay reads it)."""

from __future__ import annotations

import os
import selectors
import time

from psgi_forkserver import logs


def test_a_flood_of_long_lines_over_the_byte_limit_waits_on_its_pipe(tmp_path):
    """Lines of 16,000 bytes with `log-bytes-per-second = 100000`: once its
    burst is spent (12 lines), what is left in the bucket is less than a
    line, not nothing; that vassal is over its limit all the same, and its
    pipe waits (its writers too) rather than being read on at once, every
    line split and decoded to be dropped."""
    log = logs.Log(path=tmp_path / "emperor.log")
    log.set_limit("long", 0, 100000)
    sel = selectors.DefaultSelector()
    relay = logs.Relay(log, sel)
    out = logs.OutputPipe()
    writer = os.dup(out.wfd)
    try:
        line = b"y" * 15999 + b"\n"
        os.write(writer, line * 40)  # 640 kB: the pipe (1 MiB) holds them
        relay.watch(out, "long", lambda: None)
        for _ in range(40):
            ready = sel.select(0)
            if not ready:
                break
            for key, _ in ready:
                key.data(time.monotonic())
        assert out.rfd in relay.paused, "the vassal over its byte limit is read on"
        relayed = (tmp_path / "emperor.log").read_bytes().count(b"y" * 15999)
        assert relayed == 12, relayed
    finally:
        os.close(writer)
        relay.close()
        log.close()
        sel.close()
