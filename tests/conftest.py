"""Puts tests/support on sys.path, so that the suites under tests/ can import the helpers they share
(`import kora_process`: the kora-sidecar binary as a child process)."""

import sys
from pathlib import Path

SUPPORT = str(Path(__file__).resolve().parent / "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
