"""A raw HTTP/1.1 client for the tunnel tests: argv HOST PORT UPGRADE_PATH
NEXT_PATH [plain]. On one connection it sends a WebSocket handshake for UPGRADE_PATH,
reads the answer, then sends `GET NEXT_PATH` as plain HTTP on the same
connection (which, after a real switch, is tunnel bytes to the server) and
reads that answer. Prints JSON: the two status codes and bodies (0 and "" when
nothing came back within 5 s or the connection closed)."""

import base64
import json
import os
import socket
import sys

HOST, PORT, UPGRADE, NEXT = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# `plain` as a fifth argument: the first request asks for no switch at all.
PLAIN = sys.argv[5:] == ["plain"]


def read_response(f):
    status = f.readline()
    if not status:
        return 0, ""
    code = int(status.split()[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    body = f.read(length).decode("latin-1") if length else ""
    return code, body


s = socket.create_connection((HOST, PORT), timeout=5)
f = s.makefile("rb")
host = f"[{HOST}]" if ":" in HOST else HOST
key = base64.b64encode(os.urandom(16)).decode()
switch = (
    ""
    if PLAIN
    else f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
)
s.sendall(f"GET {UPGRADE} HTTP/1.1\r\nHost: {host}:{PORT}\r\n{switch}\r\n".encode())
out = {}
try:
    out["upgrade"], out["upgrade_body"] = read_response(f)
    s.sendall(f"GET {NEXT} HTTP/1.1\r\nHost: {host}:{PORT}\r\n\r\n".encode())
    out["next"], out["next_body"] = read_response(f)
except (OSError, ValueError, IndexError) as e:
    out.setdefault("next", 0)
    out["error"] = str(e)
print(json.dumps(out))
