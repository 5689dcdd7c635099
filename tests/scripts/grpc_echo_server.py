#!/usr/bin/env python3
"""A real gRPC server (grpcio, generic handlers: no protoc step) for weir's e2e
tests. Service `echo.Echo`, messages are raw bytes. Every call that reaches it
is logged (method and peer) to LOG, so a test can prove a denied call never
arrived; a cancelled `Watch` logs `Watch cancelled`.

usage: grpc_echo_server.py PORT LOG
"""
import sys
import threading
import time
from concurrent import futures

import grpc

PORT, LOG = sys.argv[1], sys.argv[2]
_lock = threading.Lock()


def log(line):
    with _lock, open(LOG, "a") as f:
        f.write(line + "\n")


def unary(req, ctx):
    log(f"Unary {ctx.peer()}")
    return b"echo:" + req


def collect(reqs, ctx):
    log(f"Collect {ctx.peer()}")
    return b",".join(reqs)


def expand(req, ctx):
    log(f"Expand {ctx.peer()}")
    for i in range(3):
        yield b"%s-%d" % (req, i)


def chat(reqs, ctx):
    log(f"Chat {ctx.peer()}")
    for m in reqs:
        yield b"re:" + m


def slow(req, ctx):
    log(f"Slow {ctx.peer()}")
    time.sleep(5)
    return b"late"


def forbidden(req, ctx):
    log(f"Forbidden {ctx.peer()}")
    return b"should never get here"


def watch(req, ctx):
    log(f"Watch {ctx.peer()}")
    # Never ends by itself: its end is always a cancellation.
    ctx.add_callback(lambda: log("Watch cancelled"))
    while True:
        yield b"tick"
        time.sleep(0.05)


def fail(req, ctx):
    log(f"Fail {ctx.peer()}")
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such ship")


handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Collect": grpc.stream_unary_rpc_method_handler(collect),
    "Expand": grpc.unary_stream_rpc_method_handler(expand),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
    "Forbidden": grpc.unary_unary_rpc_method_handler(forbidden),
    "Watch": grpc.unary_stream_rpc_method_handler(watch),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
server.add_insecure_port(f"[::]:{PORT}")
server.start()
server.wait_for_termination()
