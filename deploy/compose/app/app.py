"""A small service beside kora-sidecar, in Python with the standard library only.

It does the two things an application does with the sidecar:

1. creates verifications through the sidecar's API proxy (no Kora credentials here: the sidecar
   injects the API key, the tenant id and the callback URL);
2. receives the events the sidecar delivers over a Unix socket, checks their Standard Webhooks
   signature, and prints them.

Environment:
  APP_WEBHOOK_SECRET   whsec_... shared with the sidecar's services[].deliver.signingSecret (required)
  APP_SOCKET           Unix socket to listen on       (default /run/kora-sidecar/app.sock)
  APP_EVENTS_PATH      request path of the deliveries (default /kora-events)
  SIDECAR_API_URL      the sidecar's internal listener (default http://127.0.0.1:8081)
  EXTERNAL_IDS         comma-separated sandbox externalIds to create, a random suffix is added
                       (default test-approve-demo,test-review-demo)
"""

import base64
import binascii
import hashlib
import hmac
import http.server
import json
import os
import signal
import socketserver
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

TOLERANCE_SECONDS = 300


def signing_key(secret):
    """The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`, decoded."""
    text = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    return base64.b64decode(text, validate=True)


def verify(secret, headers, body, now=None, tolerance=TOLERANCE_SECONDS):
    """True when `body` (the raw bytes) carries a valid Standard Webhooks signature.

    `headers` is any mapping of header names to values (names compared case-insensitively).
    The signed content is "{webhook-id}.{webhook-timestamp}.{body}"; `webhook-signature` holds
    one or more space-separated "v1,{base64 HMAC-SHA256}" values (several during key rotation).
    """
    lower = {name.lower(): value for name, value in headers.items()}
    msg_id = lower.get("webhook-id")
    timestamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance:
        return False  # a replay of an old delivery, or a badly wrong clock
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    for candidate in signatures.split():
        version, _, encoded = candidate.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, given):
            return True
    return False


def describe(event):
    """One line about a normalized event (SPEC §6)."""
    verification = event.get("verification") or {}
    alert = event.get("fraudAlert") or {}
    parts = [event.get("type", "?"), "id=" + str(event.get("id"))]
    if verification:
        parts += [
            "verification=" + str(verification.get("id")),
            "externalId=" + str(verification.get("externalId")),
            "outcome=" + str(verification.get("outcome")),
        ]
    if alert:
        parts += ["alert=" + str(alert.get("alertType")), "severity=" + str(alert.get("severity"))]
    return " ".join(parts)


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def make_handler(secret, events_path, on_event):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def address_string(self):
            return "unix"  # a Unix socket peer has no address

        def log_message(self, format, *args):
            pass  # the events are the interesting part; keep the output readable

        def answer(self, status):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path != events_path:
                return self.answer(404)
            if not verify(secret, dict(self.headers.items()), body):
                print("rejected a delivery with a bad or missing signature", flush=True)
                return self.answer(401)
            try:
                event = json.loads(body)
            except ValueError:
                return self.answer(400)
            on_event(event, self.headers)
            self.answer(204)

    return Handler


def serve(socket_path, secret, events_path="/kora-events", on_event=None):
    """Listens on `socket_path` (mode 0660, so the sidecar's group may connect) in a thread."""
    if on_event is None:
        on_event = lambda event, headers: print(  # noqa: E731
            "event  " + describe(event) + " attempt=" + str(headers.get("X-Kora-Delivery-Attempt")), flush=True)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # left over from a previous run
    server = UnixHTTPServer(socket_path, make_handler(secret, events_path, on_event))
    os.chmod(socket_path, 0o660)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def create_verification(api_url, external_id):
    """POST /api/v1/idv/verifications through the sidecar; returns Kora's answer."""
    request = urllib.request.Request(
        api_url.rstrip("/") + "/api/v1/idv/verifications",
        data=json.dumps({"externalId": external_id, "tier": "standard"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main():
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # as PID 1, stop promptly on docker stop
    secret = os.environ.get("APP_WEBHOOK_SECRET")
    if not secret:
        sys.exit("APP_WEBHOOK_SECRET is not set: give the whsec_... secret the sidecar signs deliveries with.")
    socket_path = os.environ.get("APP_SOCKET", "/run/kora-sidecar/app.sock")
    api_url = os.environ.get("SIDECAR_API_URL", "http://127.0.0.1:8081")
    serve(socket_path, secret, os.environ.get("APP_EVENTS_PATH", "/kora-events"))
    print("listening on " + socket_path, flush=True)

    for prefix in filter(None, os.environ.get("EXTERNAL_IDS", "test-approve-demo,test-review-demo").split(",")):
        external_id = prefix.strip() + "-" + uuid.uuid4().hex[:8]
        for _ in range(30):
            try:
                verification = create_verification(api_url, external_id)
                print("created " + json.dumps(verification), flush=True)
                break
            except urllib.error.HTTPError as error:
                print("the sidecar answered " + str(error.code) + ": " + error.read().decode(errors="replace"), flush=True)
                if error.code not in (502, 503, 504):  # 5xx from the sidecar: Kora is not up yet
                    break
                time.sleep(2)
            except OSError as error:  # the sidecar is not listening yet
                print("waiting for the sidecar at " + api_url + " (" + str(error) + ")", flush=True)
                time.sleep(2)
        else:
            print("gave up: the sidecar did not answer at " + api_url, flush=True)

    threading.Event().wait()  # keep receiving events until stopped


if __name__ == "__main__":
    main()
