#!/usr/bin/env python3
"""An HTTP/2 client on the `h2` package (not weir's code) that keeps its
connection open: one GET, prints "status <code>", then on the stdin line "wait"
watches the connection for up to 10 s and prints "closed <seconds> goaway=<bool>"
when the server closes it (or "open" if it does not).

usage: h2_hold.py HOST PORT PATH
"""
import socket
import sys
import time

import h2.connection
import h2.events
import h2.exceptions

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=10)
conn = h2.connection.H2Connection()
conn.initiate_connection()
authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", authority)], end_stream=True)
s.sendall(conn.data_to_send())
status, done = None, False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for ev in conn.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            status = dict(ev.headers).get(b":status", b"?").decode()
        elif isinstance(ev, h2.events.StreamEnded):
            done = True
    s.sendall(conn.data_to_send())
print(f"status {status}", flush=True)
if sys.stdin.readline().strip() != "wait":
    sys.exit(0)
start, goaway = time.monotonic(), False
s.settimeout(0.2)
while time.monotonic() - start < 10:
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    except OSError:
        data = b""
    if not data:
        print(f"closed {time.monotonic() - start:.2f} goaway={goaway}", flush=True)
        sys.exit(0)
    try:
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                goaway = True
    except h2.exceptions.ProtocolError:
        # Frames after the GOAWAY in the same read (the server's PING): h2
        # has closed the connection state, which only a GOAWAY does here.
        goaway = goaway or conn.state_machine.state == h2.connection.ConnectionState.CLOSED
    try:
        s.sendall(conn.data_to_send())
    except OSError:
        pass
print("open", flush=True)
