"""A misbehaving HTTP/1.1 server for the tunnel tests: argv PORT LOG. It logs
every request line it reads (`request LINE`) and keeps reading HTTP on the
connection whatever it answered, so a test can see what reached it after a 101.

  /public/status?code=101  a bare `101 Switching Protocols` (a status echoed
                           from the URL): no Upgrade, no Connection, no Accept
  /public/wrong-accept     101 with Upgrade and Connection but a wrong
                           Sec-WebSocket-Accept
  /public/ws               a valid WebSocket 101 (the right Accept)
  anything else            200 with `ok PATH`
"""

import asyncio
import base64
import hashlib
import sys

PORT = int(sys.argv[1])
LOG = sys.argv[2]
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\n")


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            log(f"request {lines[0]}")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            n = int(headers.get("content-length", "0"))
            if n:
                await reader.readexactly(n)
            path = lines[0].split(" ")[1] if " " in lines[0] else ""
            if path == "/public/status?code=101":
                out = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
            elif path in ("/public/wrong-accept", "/public/ws"):
                key = headers.get("sec-websocket-key", "").encode()
                accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
                if path == "/public/wrong-accept":
                    accept = base64.b64encode(hashlib.sha1(b"not the key").digest())
                out = (
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
            else:
                body = f"ok {path}\n".encode()
                out = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            writer.write(out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve, None, PORT)
    async with server:
        await server.serve_forever()


asyncio.run(main())
