#!/usr/bin/env python3
"""A small HTTP/2 server and client on the `h2` package (not weir's code) for
what curl and nginx cannot show: request trailers, response trailers and a
server's RST_STREAM error code.

server: h2_peer.py serve PORT
  /v1/trailers: answers 200 "ok" with trailers x-server-trailer: yes and
                x-echo: <the request trailer x-client-trailer>
  /v1/rst:      resets the stream with HTTP_1_1_REQUIRED (0xd)
  /v1/goaway:   GOAWAY (NO_ERROR) that does not take the stream, then closes
  (and x-trailer-names: the names of the request trailers it got, sorted)
client: h2_peer.py call HOST PORT — one JSON line:
  {"status", "body", "trailers", "rst_code"}
        h2_peer.py call-checked HOST PORT — the same with header x-team: empire
  and trailers x-team and x_team (rebels) beside x-client-trailer
        h2_peer.py goaway HOST PORT — /v1/goaway, then /v1/trailers on the same
  connection: {"goaway_rst_code", "after_status", "after_trailers"}
"""
import json
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events


def serve(port):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("::", port))
    ls.listen(16)
    while True:
        s, _ = ls.accept()
        threading.Thread(target=handle, args=(s,), daemon=True).start()


def handle(s):
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    s.sendall(conn.data_to_send())
    paths, trailers = {}, {}
    closing = False
    while not closing:
        data = s.recv(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                h = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in ev.headers)
                paths[ev.stream_id] = h.get(":path")
                if paths[ev.stream_id] == "/v1/rst":
                    conn.reset_stream(ev.stream_id, error_code=0xD)
                elif paths[ev.stream_id] == "/v1/goaway":
                    conn.close_connection(error_code=0, last_stream_id=max(0, ev.stream_id - 2))
                    closing = True
                    break
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers[ev.stream_id] = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in ev.headers)
            elif isinstance(ev, h2.events.StreamEnded) and paths.get(ev.stream_id) == "/v1/trailers":
                sid = ev.stream_id
                echo = trailers.get(sid, {}).get("x-client-trailer", "none")
                conn.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
                conn.send_data(sid, b"ok")
                names = ",".join(sorted(trailers.get(sid, {}).keys()))
                conn.send_headers(sid, [("x-server-trailer", "yes"), ("x-echo", echo), ("x-trailer-names", names)], end_stream=True)
        s.sendall(conn.data_to_send())
    s.close()


def call(host, port, checked=False):
    s = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = [(":scheme", "http"), (":authority", authority)]
    extra = [("x-team", "empire")] if checked else []
    conn.send_headers(1, [(":method", "GET"), (":path", "/v1/trailers"), *base, ("te", "trailers"), *extra])
    conn.send_data(1, b"body")
    smuggled = [("x-team", "rebels"), ("x_team", "rebels")] if checked else []
    conn.send_headers(1, [("x-client-trailer", "from-client"), *smuggled], end_stream=True)
    conn.send_headers(3, [(":method", "GET"), (":path", "/v1/rst"), *base], end_stream=True)
    s.sendall(conn.data_to_send())
    out = {"status": None, "body": "", "trailers": {}, "rst_code": None}
    done = set()
    while len(done) < 2:
        data = s.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                out["status"] = dict(ev.headers).get(b":status", b"").decode()
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id == 1:
                    out["body"] += ev.data.decode()
            elif isinstance(ev, h2.events.TrailersReceived):
                out["trailers"] = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded):
                done.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                if ev.stream_id == 3:
                    out["rst_code"] = int(ev.error_code)
                done.add(ev.stream_id)
        s.sendall(conn.data_to_send())
    print(json.dumps(out), flush=True)


def goaway(host, port):
    s = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = [(":scheme", "http"), (":authority", authority)]
    conn.send_headers(1, [(":method", "GET"), (":path", "/v1/goaway"), *base], end_stream=True)
    s.sendall(conn.data_to_send())
    out = {"goaway_rst_code": None, "after_status": None, "after_trailers": {}}
    sent_after = False
    while True:
        data = s.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                out["goaway_rst_code"] = int(ev.error_code)
            elif isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 3:
                out["after_status"] = dict(ev.headers).get(b":status", b"").decode()
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and ev.stream_id == 3:
                out["after_trailers"] = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == 3:
                print(json.dumps(out), flush=True)
                return
        if out["goaway_rst_code"] is not None and not sent_after:
            # The same client connection goes on: weir opens a new upstream one.
            sent_after = True
            conn.send_headers(3, [(":method", "GET"), (":path", "/v1/trailers"), *base, ("te", "trailers")])
            conn.send_data(3, b"body")
            conn.send_headers(3, [("x-client-trailer", "again")], end_stream=True)
        s.sendall(conn.data_to_send())
    print(json.dumps(out), flush=True)


if sys.argv[1] == "serve":
    serve(int(sys.argv[2]))
elif sys.argv[1] == "goaway":
    goaway(sys.argv[2], int(sys.argv[3]))
elif sys.argv[1] == "call-checked":
    call(sys.argv[2], int(sys.argv[3]), checked=True)
else:
    call(sys.argv[2], int(sys.argv[3]))
