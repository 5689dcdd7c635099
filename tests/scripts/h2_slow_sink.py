#!/usr/bin/env python3
"""A slow-reading HTTP/2 server on the `h2` package (not weir's code): takes each
request body at most about RATE bytes a second (it reads the socket in small
pieces and sleeps between them, and returns flow-control credit only for what
it has read), then answers 200 with "<sha256> <bytes>" and logs the same line.

usage: h2_slow_sink.py PORT LOG RATE
"""
import hashlib
import socket
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events

PORT, LOG, RATE = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
PIECE = 16384


def handle(s):
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    sums, counts = {}, {}
    while True:
        data = s.recv(PIECE)
        if not data:
            return
        time.sleep(len(data) / RATE)
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                sums[ev.stream_id] = hashlib.sha256()
                counts[ev.stream_id] = 0
            elif isinstance(ev, h2.events.DataReceived):
                sums[ev.stream_id].update(ev.data)
                counts[ev.stream_id] += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                sid = ev.stream_id
                line = f"{sums[sid].hexdigest()} {counts[sid]}"
                with open(LOG, "a") as f:
                    f.write(line + "\n")
                conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
                conn.send_data(sid, (line + "\n").encode(), end_stream=True)
        s.sendall(conn.data_to_send())


ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("::", PORT))
ls.listen(16)
while True:
    c, _ = ls.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
