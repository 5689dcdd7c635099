"""A WebSocket client (the `websockets` library) for the tunnel tests:
argv URL MODE. Prints one JSON object.

- `echo N`: sends N messages of growing size, checks each echo.
- `hold`: one echo, prints `ready` on a line of its own, then sends a message
  every 100 ms until the connection closes (at most 20 s) and reports how long
  after `ready` it closed.
- `quiet`: one echo, then silence until the connection closes (at most 20 s;
  no keepalive pings): how long after the echo it closed.
A handshake the server (or weir) declines reports its HTTP status."""

import json
import sys
import time

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

url, mode = sys.argv[1], sys.argv[2]
out = {"url": url}
try:
    # No compression: the tunnel's byte counts are then the messages' sizes.
    with connect(
        url, open_timeout=5, close_timeout=2, compression=None, ping_interval=None
    ) as ws:
        out["status"] = 101
        if mode == "echo":
            n = int(sys.argv[3])
            ok = 0
            for i in range(n):
                msg = f"message {i} " + "x" * (i * 1000)
                ws.send(msg)
                if ws.recv(timeout=5) == msg:
                    ok += 1
            out["echoed"] = ok
        elif mode == "quiet":
            ws.send("first")
            out["first"] = ws.recv(timeout=5)
            echoed = time.monotonic()
            out["closed_after"] = None
            try:
                ws.recv(timeout=20)
            except (ConnectionClosed, TimeoutError, OSError) as e:
                if not isinstance(e, TimeoutError):
                    out["closed_after"] = round(time.monotonic() - echoed, 2)
                out["error"] = type(e).__name__
        else:
            ws.send("first")
            out["first"] = ws.recv(timeout=5)
            print("ready", flush=True)
            ready = time.monotonic()
            out["closed_after"] = None
            while time.monotonic() - ready < 20:
                try:
                    ws.send("ping")
                    ws.recv(timeout=1)
                except (ConnectionClosed, TimeoutError, OSError) as e:
                    out["closed_after"] = round(time.monotonic() - ready, 2)
                    out["error"] = type(e).__name__
                    break
                time.sleep(0.1)
except InvalidStatus as e:
    out["status"] = e.response.status_code
    out["body"] = e.response.body.decode(errors="replace")
print(json.dumps(out), flush=True)
