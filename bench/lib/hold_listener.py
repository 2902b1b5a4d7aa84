#!/usr/bin/env python3
"""Holds a listener the cheap way, then times a newcomer.

Opens up to N connections to 127.0.0.1:PORT, sends one `GET /healthz` on each and keeps it open
(kept alive), then opens one more and times its `GET /healthz`. A listener that makes room for
newcomers answers it within about a second; one that does not, only when the held connections'
idle time-out (`idleTimeoutSeconds`) frees one.

    python3 bench/lib/hold_listener.py PORT [N]     # N defaults to 1024, the default maxConnections
"""
import resource
import socket
import sys
import time

port = int(sys.argv[1])
count = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 64)), hard))
request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
held = []
for _ in range(count):
    connection = socket.create_connection(("127.0.0.1", port))
    connection.settimeout(5)
    held.append(connection)
    try:
        connection.sendall(request)
        connection.recv(4096)
    except OSError:
        break  # the listener is full: this one waits in the backlog
print(f"held {len(held)} connections, a request answered on each")
started = time.monotonic()
newcomer = socket.create_connection(("127.0.0.1", port))
newcomer.settimeout(120)
newcomer.sendall(request)
try:
    status = newcomer.recv(4096).split(b"\r\n")[0].decode()
    print(f"newcomer answered ({status}) after {time.monotonic() - started:.2f} s")
except OSError as error:
    print(f"newcomer not answered after {time.monotonic() - started:.2f} s: {error}")
