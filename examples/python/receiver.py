"""Receives kora-sidecar's deliveries: checks the Standard Webhooks signature with the standardwebhooks package.

WEBHOOK_SECRET=whsec_... PORT=3000 python3 receiver.py   (PORT=0 picks a free port; SOCKET=/path listens on a Unix socket)
"""
import errno
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

webhook = Webhook(os.environ["WEBHOOK_SECRET"])
seen, lock = set(), threading.Lock()  # Delivery is at least once. Production code keeps these ids in its database.


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))  # the raw bytes the signature covers
        try:  # checks the signature(s) and that webhook-timestamp is within 5 minutes
            event = webhook.verify(body, dict(self.headers))
        except (WebhookVerificationError, ValueError):
            return self.answer(401)
        msg_id = self.headers["webhook-id"]
        with lock:
            duplicate = msg_id in seen
            seen.add(msg_id)
        if duplicate:
            print(f"duplicate {msg_id}", flush=True)
        else:
            print(f"verified {msg_id} {event['type']} {(event.get('verification') or {}).get('outcome', '-')}", flush=True)
        self.answer(204)  # answer fast: hand slow work to a queue rather than doing it here

    def answer(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def unix_server(path):
    # A socket file left by a killed run (a pod's emptyDir outlives a restart) would make the bind fail:
    # remove it, unless a live receiver still answers on it.
    if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(path) == errno.ECONNREFUSED:
                os.unlink(path)
    server = UnixServer(path, Receiver)
    os.chmod(path, 0o660)  # the sidecar runs as another user in this group: it must be able to write
    return server


if os.environ.get("SOCKET"):
    server = unix_server(os.environ["SOCKET"])
    print(f"listening unix:{os.environ['SOCKET']}", flush=True)
else:
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "3000"))), Receiver)
    print(f"listening 127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
