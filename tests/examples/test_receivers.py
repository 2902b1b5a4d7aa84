"""The receivers in examples/ against the real kora-sidecar: send-test-event -> sidecar -> receiver.

Each receiver runs as its users would run it (a child process, the secret in WEBHOOK_SECRET, on a free
TCP port or a Unix socket) and must print `verified <webhook-id> <type> <outcome>` for the sidecar's
delivery, `duplicate <webhook-id>` for a second delivery of the same event, and answer 401 to anything
not signed with its secret. On a Unix socket it must start again over the socket file a killed run left,
and leave the socket group-writable (the sidecar runs as another user in the socket's group).

Needs: pytest; node (Debian's `nodejs`); the `standardwebhooks` package; the kora-sidecar binary
($KORA_SIDECAR_BINARY, default .build/debug/kora-sidecar). Under CI=true a missing one is a failure.

Run: python3 -m pytest tests/examples -q
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from kora_process import DEADLINE_SECONDS, ROOT, SidecarProcess, run_send_test_event, sidecar_binary, stop, unavailable

EXAMPLES = ROOT / "examples"
KORA_SECRET = "kora-webhook-secret-for-the-examples"  # Kora's secret, used as UTF-8 bytes


# ---------------------------------------------------------------------------------------------
# helpers (the ones shared with tests/console are in tests/support/kora_process.py)


@pytest.fixture(scope="session")
def binary():
    return sidecar_binary()


def receiver_command(language):
    if language == "node":
        node = shutil.which("node") or shutil.which("nodejs")
        if not node:
            unavailable("node is not installed (apt-get install -y nodejs)")
        return [node, str(EXAMPLES / "node/receiver.js")]
    try:
        import standardwebhooks  # noqa: F401  (the receiver imports it)
    except ImportError:
        unavailable("the standardwebhooks package is not installed (pip install standardwebhooks)")
    return [sys.executable, str(EXAMPLES / "python/receiver.py")]


def new_signing_secret():
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """An example receiver as a child process; a thread collects its output lines."""

    def __init__(self, language, secret, tmp_path, transport):
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WEBHOOK_SECRET": secret}
        if transport == "unix":
            environment["SOCKET"] = str(tmp_path / "receiver.sock")
        else:
            environment["PORT"] = "0"
        self.lines, self.changed = [], threading.Condition()
        self.process = subprocess.Popen(  # the usual umask 022: a socket it leaves alone is not group-writable
            receiver_command(language), env=environment, cwd=tmp_path, umask=0o022,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._collect, daemon=True).start()
        try:
            listening = self.wait_for(r"listening (unix:(?P<socket>\S+)|127\.0\.0\.1:(?P<port>\d+))")
        except BaseException:
            stop(self.process)
            raise
        self.socket, self.port = listening["socket"], listening["port"] and int(listening["port"])

    def _collect(self):
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern, timeout=DEADLINE_SECONDS):
        """The first output line matching `pattern`, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if match := re.fullmatch(pattern, line):
                        return match
                left = deadline - time.monotonic()
                assert left > 0 and self.process.poll() is None, \
                    f"the receiver never printed {pattern!r}; its output:\n" + "\n".join(self.lines)
                self.changed.wait(min(left, 0.5))

    def output(self):
        with self.changed:
            return list(self.lines)

    def post(self, body, headers):
        """POSTs straight to the receiver, as the sidecar does; returns the status."""
        if self.socket:
            connection = UnixHTTPConnection(self.socket)
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_SECONDS)
        try:
            connection.request("POST", "/kora-events", body, {"Content-Type": "application/json", **headers})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=DEADLINE_SECONDS)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE_SECONDS)
        self.sock.connect(self.socket_path)


def standard_webhooks_headers(secret, msg_id, body, timestamp=None, extra_signatures=()):
    """The headers the sidecar sends, computed here from the Standard Webhooks definition."""
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    signatures = [*extra_signatures, "v1," + base64.b64encode(digest).decode()]
    return {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": " ".join(signatures),
            "X-Kora-Event-Type": "verification.completed", "X-Kora-Delivery-Attempt": "2"}


def normalized_event(msg_id, outcome="approved"):
    return json.dumps({
        "id": msg_id, "type": "verification.completed", "occurredAt": "2026-01-15T10:35:00Z",
        "receivedAt": "2026-01-15T10:35:00.123Z", "tenantId": "tenant-demo",
        "verification": {"id": "ver_1", "externalId": "user-123", "status": "verified", "decision": "auto_approve",
                         "outcome": outcome, "reason": "All checks passed", "score": 96.3},
        "fraudAlert": None, "data": {}}).encode()


class Sidecar(SidecarProcess):
    """`kora-sidecar serve` delivering to `receiver`, ready (GET /readyz answered 200) on return."""

    def __init__(self, binary, tmp_path, receiver, signing_secret):
        if receiver.socket:
            deliver = {"unixSocket": receiver.socket, "path": "/kora-events"}
        else:
            deliver = {"url": f"http://127.0.0.1:{receiver.port}/kora-events"}
        deliver["signingSecret"] = {"env": "APP_WEBHOOK_SECRET"}
        super().__init__(
            binary, tmp_path,
            environment={"KORAIDV_WEBHOOK_SECRET": KORA_SECRET, "APP_WEBHOOK_SECRET": signing_secret},
            webhooks={"secrets": [{"env": "KORAIDV_WEBHOOK_SECRET"}]},
            services=[{"name": "app", "deliver": deliver}])

    def send_test_event(self, binary):
        """`kora-sidecar send-test-event`, exactly as the README tells users to run it."""
        return run_send_test_event(binary, self.webhook_port, KORA_SECRET)


@pytest.fixture
def receivers():
    started = []
    yield lambda *arguments: started.append(Receiver(*arguments)) or started[-1]
    for receiver in started:
        stop(receiver.process)


@pytest.fixture
def sidecars():
    started = []
    yield lambda *arguments: started.append(Sidecar(*arguments)) or started[-1]
    for sidecar in started:
        stop(sidecar.process)


# ---------------------------------------------------------------------------------------------
# the tests

LANGUAGES = ["node", "python"]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("language", LANGUAGES)
def test_an_event_sent_through_the_sidecar_is_verified_once(binary, receivers, sidecars, tmp_path, language, transport):
    signing_secret = new_signing_secret()
    receiver = receivers(language, signing_secret, tmp_path, transport)
    sidecar = sidecars(binary, tmp_path, receiver, signing_secret)

    sent = sidecar.send_test_event(binary)
    assert sent.returncode == 0 and sent.stdout.startswith("200"), sent.stdout + sent.stderr
    verified = receiver.wait_for(r"verified (?P<id>evt_\S+) verification\.completed approved")
    event_id = verified["id"]

    # A second delivery of the same event (delivery is at least once: a retry after a lost answer
    # carries the same webhook-id, a new timestamp and a new signature). The sidecar itself drops
    # Kora's duplicates, so the second copy is posted straight to the receiver.
    again = standard_webhooks_headers(signing_secret, event_id, normalized_event(event_id))
    assert receiver.post(normalized_event(event_id), again) in (200, 204)
    receiver.wait_for(rf"duplicate {re.escape(event_id)}")
    assert [line for line in receiver.output() if line.startswith("verified")] == [verified.group(0)]


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_receiver_killed_on_a_socket_starts_again_and_the_sidecar_may_write_to_it(
        binary, receivers, sidecars, tmp_path, language):
    """In a pod the socket's emptyDir outlives a container restart: the killed receiver's socket file is
    still there when it starts again. And the sidecar runs as another user in the socket's group."""
    signing_secret = new_signing_secret()
    first = receivers(language, signing_secret, tmp_path, "unix")
    first.process.kill()
    first.process.wait(timeout=DEADLINE_SECONDS)
    assert stat.S_ISSOCK(os.lstat(first.socket).st_mode), "the killed receiver removed its socket file"

    receiver = receivers(language, signing_secret, tmp_path, "unix")
    assert receiver.socket == first.socket
    mode = stat.S_IMODE(os.stat(receiver.socket).st_mode)
    assert mode & 0o660 == 0o660, f"socket mode {mode:04o}: the sidecar's group cannot connect"
    sidecar = sidecars(binary, tmp_path, receiver, signing_secret)
    sent = sidecar.send_test_event(binary)
    assert sent.returncode == 0 and sent.stdout.startswith("200"), sent.stdout + sent.stderr
    receiver.wait_for(r"verified evt_\S+ verification\.completed approved")

    # A socket on which a live receiver answers is not taken from it: a second receiver does not start.
    second = subprocess.run(receiver_command(language), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                            "WEBHOOK_SECRET": signing_secret, "SOCKET": receiver.socket},
                            capture_output=True, text=True, timeout=DEADLINE_SECONDS)
    assert second.returncode != 0 and "listening" not in second.stdout, second.stdout + second.stderr
    assert receiver.post(normalized_event("evt_after"), standard_webhooks_headers(signing_secret, "evt_after",
                         normalized_event("evt_after"))) in (200, 204)
    receiver.wait_for(r"verified evt_after verification\.completed approved")


@pytest.mark.parametrize("language", LANGUAGES)
def test_what_is_not_signed_with_the_secret_is_refused(receivers, tmp_path, language):
    secret = new_signing_secret()
    receiver = receivers(language, secret, tmp_path, "tcp")
    body = normalized_event("evt_forged")

    forged = standard_webhooks_headers(new_signing_secret(), "evt_forged", body)
    assert receiver.post(body, forged) == 401
    genuine = standard_webhooks_headers(secret, "evt_forged", body)
    assert receiver.post(body.replace(b"approved", b"rejected"), genuine) == 401, "a changed body passed"
    assert receiver.post(body, {**genuine, "webhook-id": "evt_other"}) == 401, "a changed webhook-id passed"
    stale = standard_webhooks_headers(secret, "evt_forged", body, timestamp=int(time.time()) - 301)
    assert receiver.post(body, stale) == 401, "a signature older than 5 minutes passed"
    # Well past the tolerance: the receiver reads its clock later, and a second that turned meanwhile
    # brought +301 back to +300, which passed.
    future = standard_webhooks_headers(secret, "evt_forged", body, timestamp=int(time.time()) + 330)
    assert receiver.post(body, future) == 401, "a signature 5 minutes in the future passed"
    assert receiver.post(body, {"webhook-id": "evt_forged"}) == 401, "an unsigned request passed"
    assert receiver.post(body, {**genuine, "webhook-signature": "v2," + genuine["webhook-signature"][3:]}) == 401

    # The same request, signed with the receiver's secret, beside an old signature (a rotation): accepted.
    rotated = standard_webhooks_headers(secret, "evt_forged", body, extra_signatures=["v1," + base64.b64encode(b"x" * 32).decode()])
    assert receiver.post(body, rotated) in (200, 204)
    receiver.wait_for(r"verified evt_forged verification\.completed approved")
    assert len(receiver.output()) == 2, receiver.output()  # `listening …` and the one verified event


def test_no_compiled_python_is_tracked():
    """Importing a Python file (a test importing a receiver or app.py) writes __pycache__/*.pyc beside
    it: git must neither hold nor offer such files."""
    git = shutil.which("git")
    if not git or not (ROOT / ".git").exists():
        pytest.skip("not a git work tree")
    tracked = subprocess.run([git, "ls-files", "--cached", "--", "*.pyc", "*__pycache__/*"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert not tracked, f"compiled Python in git: {tracked}"
    compiled = ["examples/python/__pycache__/receiver.cpython-311.pyc", "tests/examples/stray.pyc"]
    ignored = subprocess.run([git, "check-ignore", "--no-index", *compiled], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert ignored == compiled, f".gitignore does not ignore {sorted(set(compiled) - set(ignored))}"
