#!/usr/bin/env python3
"""A real gRPC client (grpcio) for weir's e2e tests: runs the named calls on
one channel (one HTTP/2 connection) and prints one JSON line per call:
{"call", "code", "details", "result"}.

usage: grpc_echo_client.py TARGET CALL... (unary collect expand chat forbidden
slow slow-long slow-cancel watch-cancel fail malformed)
"""
import json
import sys
import time

import grpc

target, calls = sys.argv[1], sys.argv[2:]
ch = grpc.insecure_channel(target)
m = lambda kind, name: getattr(ch, kind)(f"/echo.Echo/{name}")


def watch_cancel():
    it = m("unary_stream", "Watch")(b"", timeout=30)
    first = next(it)
    it.cancel()
    return first


def slow_cancel():
    # Cancelled before the response head (the server sleeps 5 s).
    f = m("unary_unary", "Slow").future(b"hi", timeout=20)
    time.sleep(0.5)
    f.cancel()
    return "cancelled" if f.cancelled() else "not cancelled"


RUN = {
    "unary": lambda: m("unary_unary", "Unary")(b"hi", timeout=10),
    "collect": lambda: m("stream_unary", "Collect")(iter([b"a", b"b", b"c"]), timeout=10),
    "expand": lambda: list(m("unary_stream", "Expand")(b"x", timeout=10)),
    "chat": lambda: list(m("stream_stream", "Chat")(iter([b"1", b"2"]), timeout=10)),
    "forbidden": lambda: m("unary_unary", "Forbidden")(b"hi", timeout=10),
    "slow": lambda: m("unary_unary", "Slow")(b"hi", timeout=1),
    "slow-long": lambda: m("unary_unary", "Slow")(b"hi", timeout=20),
    "watch-cancel": watch_cancel,
    "slow-cancel": slow_cancel,
    "fail": lambda: m("unary_unary", "Fail")(b"hi", timeout=10),
    # An encoded `/` in the path: refused before policy is consulted.
    "malformed": lambda: m("unary_unary", "%2FUnary")(b"hi", timeout=10),
}

for call in calls:
    out = {"call": call}
    try:
        r = RUN[call]()
        out.update(code="OK", result=repr(r))
    except grpc.RpcError as e:
        out.update(code=e.code().name, details=e.details())
    print(json.dumps(out), flush=True)
