"""An Emperor written by hand from PROTOCOL.md, sharing no code with ours.

Starts `ForkServer.pm --early-psgi APP --fork-server SOCK`, waits for byte 1,
sends one adoption request built byte by byte with struct, reads the pid
reply, fetches one page from the adopted vassal, stops everything and prints
what it saw as JSON. It is a child subreaper, so it reaps the vassal too.

usage: handmade_emperor.py PROGRAM APP SOCK PORT
"""

import ctypes
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import urllib.request

program, app, sock_path, port = sys.argv[1:5]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def read_byte(s: socket.socket, timeout: float) -> bytes:
    ready, _, _ = select.select([s], [], [], timeout)
    return s.recv(1) if ready else b""


base_pipe, base_end = socket.socketpair()
base = subprocess.Popen(
    ["perl", program, "--early-psgi", app, "--fork-server", sock_path],
    pass_fds=[base_end.fileno()],
    env={**os.environ, "UWSGI_EMPEROR_FD": str(base_end.fileno())},
)
base_end.close()
result: dict = {"base_pid": base.pid, "base_byte": read_byte(base_pipe, 20).hex()}

# The adoption request, PROTOCOL.md section 2, byte for byte.
argv = [program, "--http-socket", f"127.0.0.1:{port}", "--env", "APP_NAME=byhand"]
body = b"".join(struct.pack("<H", len(a.encode())) + a.encode() for a in argv)
packet = struct.pack("<BHB", 35, len(body), 0x01) + body
vassal_pipe, vassal_end = socket.socketpair()
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.settimeout(10)
client.connect(sock_path)
t0 = time.monotonic()
client.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", vassal_end.fileno()))])
vassal_end.close()
reply = b""
while chunk := client.recv(4096):
    reply += chunk
client.close()
result["reply_hex"] = reply.hex()
m1, size, m2 = struct.unpack("<BHB", reply[:4])
klen = struct.unpack("<H", reply[4:6])[0]
key = reply[6 : 6 + klen]
vlen = struct.unpack("<H", reply[6 + klen : 8 + klen])[0]
value = reply[8 + klen : 8 + klen + vlen]
result.update(modifier1=m1, size_ok=size == len(reply) - 4, modifier2=m2, key=key.decode(), pid=int(value))

deadline = time.monotonic() + 20
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as r:
            result["http_status"] = r.status
            result["http_body"] = json.loads(r.read())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.005)
result["first_200_ms"] = (time.monotonic() - t0) * 1000
result["vassal_bytes"] = [read_byte(vassal_pipe, 5).hex() for _ in range(3)]

# Stop: end of file on each pipe, then reap every child: the vassal, the
# base, and the base's warm spares (our children too: fork-server-spares),
# which end with the base.
vassal_pipe.close()
base_pipe.close()
exited = {}
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    exited[pid] = status
result["reaped"] = sorted(exited)
result["socket_left"] = os.path.exists(sock_path)
print(json.dumps(result))
