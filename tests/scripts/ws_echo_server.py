"""A WebSocket echo server (the `websockets` library, not weir's) for the tunnel
tests: argv PORT LOG. Every handshake that reaches it is logged (`handshake PATH
from ADDR`) before it answers, so a test can prove a request never got here.
`/refuse` gets a plain 404 (no 101): an upgrade the server declines."""

import asyncio
import http
import sys

from websockets.asyncio.server import serve

PORT = int(sys.argv[1])
LOG = sys.argv[2]


def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\n")


def process_request(connection, request):
    log(f"handshake {request.path} from {connection.remote_address[0]}")
    if request.path == "/refuse":
        return connection.respond(http.HTTPStatus.NOT_FOUND, "no websocket here\n")
    return None


async def echo(ws):
    async for msg in ws:
        await ws.send(msg)
    log(f"closed {ws.request.path}")


async def main():
    async with serve(echo, None, PORT, process_request=process_request):
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
