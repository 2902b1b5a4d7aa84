"""The real kora-sidecar binary as a child process, shared by the suites that run it (tests/console,
tests/examples): finding the binary, free ports, starting `serve` until it is ready, sending a test
event, stopping a child, polling, and skipping (failing under CI=true) when something is missing.

tests/conftest.py puts this folder on sys.path; a suite imports it as `kora_process`.
"""

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
DEADLINE_SECONDS = 30


def unavailable(reason):
    """Skips the test for want of `reason`; under CI=true a missing prerequisite fails it instead."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the run)")
    pytest.skip(reason)


def sidecar_binary():
    """The kora-sidecar binary: $KORA_SIDECAR_BINARY, default .build/debug/kora-sidecar; `unavailable` if absent."""
    path = Path(os.environ.get("KORA_SIDECAR_BINARY", ROOT / ".build/debug/kora-sidecar"))
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"the kora-sidecar binary is absent at {path} (build it, or set KORA_SIDECAR_BINARY)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process):
    """Terminates a child, waits for it with a time-out, then kills it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_for(condition, what, timeout=DEADLINE_SECONDS, every=0.1):
    """Polls `condition` until it returns something true; fails naming `what` (or what it returns, if
    a function: asked only then) after `timeout` s."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        if result := condition():
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        event.wait(every)


def run_send_test_event(binary, webhook_port, kora_secret, *arguments):
    """`kora-sidecar send-test-event` to the webhook listener on `webhook_port`, signed with Kora's secret."""
    return subprocess.run(
        [str(binary), "send-test-event", "--to", f"http://127.0.0.1:{webhook_port}/webhooks/koraidv",
         "--secret", kora_secret, *arguments],
        capture_output=True, text=True, timeout=60)


class SidecarProcess:
    """`kora-sidecar serve`, ready (GET /readyz answered 200) on return.

    Listens on two free ports of 127.0.0.1 (`webhook_port`, `internal_port`; `base` is the internal
    listener's URL), keeps its configuration, SQLite store and log in `folder` (its working folder,
    made if absent), and sees only PATH and `environment`. `webhooks` and `internal` add to those
    sections of the configuration; `sections` ("services", "delivery", …) complete it.
    """

    def __init__(self, binary, folder, environment=None, webhooks=None, internal=None, **sections):
        folder.mkdir(parents=True, exist_ok=True)
        self.binary = binary
        self.webhook_port, self.internal_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.internal_port}"
        config = {
            "webhooks": {"listen": {"host": "127.0.0.1", "port": self.webhook_port}, **(webhooks or {})},
            "internal": {"listen": {"host": "127.0.0.1", "port": self.internal_port}, **(internal or {})},
            **sections,
            "storage": {"sqlitePath": str(folder / "kora-sidecar.sqlite")},
            "logging": {"level": "info", "format": "text"},
        }
        (folder / "config.json").write_text(json.dumps(config))
        self.log_path = folder / "sidecar.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(binary), "serve", "--config", str(folder / "config.json")],
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(environment or {})}, cwd=folder,
                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, lambda: f"GET /readyz to answer 200; the sidecar's log:\n{self.log()}")
        except BaseException:
            stop(self.process)
            raise

    def log(self):
        return self.log_path.read_text(errors="replace")

    def _ready(self):
        if self.process.poll() is not None:
            pytest.fail(f"kora-sidecar serve exited with {self.process.returncode} before it was ready:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.base}/readyz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
