#!/usr/bin/env python3
"""What one `GET /metrics` costs the sidecar when its SQLite store keeps many deliveries.

Starts BINARY once to create its store, stops it, adds ROWS settled deliveries with the sqlite3 CLI
(a thousandth of them dead, the rest delivered, over three services, as a store keeping weeks of
events holds them), starts BINARY again and scrapes `/metrics` 20 times, one after the other.
Prints the time to `/readyz` (which includes a migration, if the store was made by an older
binary: pass SEED to start from a copy of such a store instead), and the sidecar's CPU and the
wall time per scrape.

    python3 bench/lib/scrape_cost.py BINARY [ROWS] [SEED]     # ROWS defaults to 2 000 000

Needs sqlite3. Not part of bench/run: a figure for the store's size, not for the request path.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

binary = os.path.abspath(sys.argv[1])
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000
seed = sys.argv[3] if len(sys.argv) > 3 else None
work = tempfile.mkdtemp(prefix="kora-scrape.")
store = os.path.join(work, "store.sqlite")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
config = os.path.join(work, "config.json")
with open(config, "w") as f:
    json.dump({
        "webhooks": {"listen": {"host": "127.0.0.1", "port": 0}, "secrets": ["whsec_scrape_cost_0123456789"]},
        "internal": {"listen": {"host": "127.0.0.1", "port": port}},
        "storage": {"sqlitePath": store},
        "services": [{"name": name, "token": "tok_%s_0123456789abcdef" % name, "deliver": {"url": "http://127.0.0.1:9/events"}}
                     for name in ("app", "crm", "audit")],
    }, f)


def start():
    process = subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % port, timeout=1):
                return process, time.monotonic() - started
        except OSError:
            if time.monotonic() - started > 60:
                raise RuntimeError("not ready after 60 s")
            time.sleep(0.02)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


try:
    if seed:
        shutil.copy(seed, store)
    else:
        process, _ = start()
        process.terminate()
        process.wait()
        # Created pending and then settled, as the sidecar does: the store counts them as they change.
        now = int(time.time() * 1000) - 3_600_000
        subprocess.run(["sqlite3", store, """
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < %d)
            INSERT INTO deliveries(event_row, service, status, attempts, next_attempt_at, created_at, updated_at)
            SELECT i, CASE i %% 3 WHEN 0 THEN 'app' WHEN 1 THEN 'crm' ELSE 'audit' END, 'pending', 1, %d, %d, %d FROM n;
            UPDATE deliveries SET status = CASE WHEN id %% 1000 = 0 THEN 'dead' ELSE 'delivered' END;
            """ % (rows, now, now, now)], check=True)
    process, ready = start()
    time.sleep(1)
    before, started = cpu_seconds(process.pid), time.monotonic()
    for _ in range(20):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as answer:
            text = answer.read().decode()
    cpu, wall = (cpu_seconds(process.pid) - before) / 20, (time.monotonic() - started) / 20
    process.terminate()
    process.wait()
    gauges = sorted(line for line in text.splitlines() if line.startswith("kora_sidecar_outbox_depth{") and not line.endswith(" 0.0"))
    print("%s: ready after %.2f s; per scrape %.1f ms of CPU, %.1f ms wall" % (binary, ready, cpu * 1000, wall * 1000))
    print("  " + "\n  ".join(gauges))
finally:
    shutil.rmtree(work, ignore_errors=True)
