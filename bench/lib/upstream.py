#!/usr/bin/env python3
"""A minimal HTTP/1.1 receiver on a Unix socket: 200 to every request, keep-alive.

Why not nginx: kora-sidecar's Unix-socket deliveries carry no Host header, and nginx (like Go's
net/http) refuses an HTTP/1.1 request without Host with 400. Until the sidecar sends one, the
sidecar scenarios deliver here (BENCH_UPSTREAM=nginx switches back to nginx's socket).
Usage: upstream.py SOCKET_PATH
"""
import asyncio
import os
import sys

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


class Receiver(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        buf = self.buffer + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) >= 0 else None].strip())
            total = end + 4 + length
            if len(buf) < total:
                break
            buf = buf[total:]
            out.append(RESPONSE)
        self.buffer = buf
        if out:
            self.transport.write(b"".join(out))


async def main(path):
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(Receiver, path, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
