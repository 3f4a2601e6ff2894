"""PROTOCOL.md by hand: a request built with struct, not with our codec."""

import json
import subprocess
import sys
from pathlib import Path

from support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_adoption_request_sent_by_hand_gets_pid_and_serving_vassal(tmp_path: Path) -> None:
    sock = tmp_path / "fork.sock"
    port = free_port()
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/tools/handmade_emperor.py"),
         str(ROOT / "perl/ForkServer.pm"), str(ROOT / "examples/myapp.pl"), str(sock), str(port)],
        capture_output=True, text=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["base_byte"] == "01"
    assert (seen["modifier1"], seen["modifier2"], seen["key"]) == (35, 0, "pid")
    assert seen["size_ok"]
    assert seen["pid"] > 0
    assert seen["http_status"] == 200
    assert seen["http_body"] == {"app": "byhand", "pid": seen["http_body"]["pid"]}
    assert seen["vassal_bytes"] == ["01", "05", "11"]
    # both the base and the adopted vassal exited on end of file and were reaped
    assert {seen["base_pid"], seen["pid"]} <= set(seen["reaped"])
    assert not seen["socket_left"]
