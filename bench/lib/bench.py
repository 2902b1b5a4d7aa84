#!/usr/bin/env python3
"""Helpers for bench/run: free ports, signed request sets, readiness, RSS, wrk parsing, the report.

Only the standard library: it runs before anything is installed.
"""
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request

SCENARIO_TITLES = {
    "nginx": "1 nginx reverse proxy (baseline)",
    "direct": "2 sidecar direct → unix upstream",
    "queued": "3 sidecar queued (SQLite) + delivery *",
    "nginx-get": "4' nginx GET proxy to Kora stand-in",
    "proxy": "4 sidecar API proxy GET → Kora stand-in",
    "floor": "5 sidecar GET /healthz (HTTP floor)",
    "flask": "6 guide's Flask handler, gunicorn",
    "rate-nginx": "1 nginx reverse proxy (baseline)",
    "rate-direct": "2 sidecar direct",
    "rate-queued": "3 sidecar queued (SQLite) + delivery",
    "rate-nginx-get": "4' nginx GET proxy (reference for 4)",
    "rate-proxy": "4 sidecar API proxy GET",
}
CLOSED_LOOP = ("nginx", "direct", "queued", "nginx-get", "proxy", "floor", "flask")
OPEN_LOOP = ("rate-nginx", "rate-direct", "rate-queued", "rate-nginx-get", "rate-proxy")
# the open-loop rows and the nginx row each is read against
RATE_REFERENCE = {"rate-direct": "rate-nginx", "rate-queued": "rate-nginx", "rate-proxy": "rate-nginx-get"}
SIDECAR_ROWS = ("direct", "queued", "proxy", "floor", "rate-direct", "rate-queued", "rate-proxy", "startup")
# The SQLite-only build (--disable-default-traits) has one row of its own, with no load: its idle RSS
# and start-ups; the standard build's footprint is taken from SIDECAR_ROWS.
SQLITE_ROW = "footprint-sqlite"

# Targets: CPU per request as a multiple of the HTTP floor measured in the same run, added latency
# over nginx at a fixed rate, and the footprint of one sidecar.
TARGET_CPU_X_FLOOR = {"direct": 2.0, "queued": 3.0, "proxy": 2.0}
TARGET_ADDED_P50_MS, TARGET_ADDED_P99_MS = 0.5, 2.0
TARGET_IDLE_RSS_MB, TARGET_STRIPPED_MB, TARGET_STARTUP_S = 20.0, 60.0, 0.3


def free_ports(n):
    """Asks the OS for n distinct free loopback ports (bound together, then released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def body_for(event_id):
    """A ~300-byte Kora event, compact JSON, distinct by id; each about a verification of its own, as
    Kora sends them (one to three events a verification), so that delivery in order per verification
    does not serialise the whole load behind one verification."""
    verification = "ver_" + event_id[6:]  # as long as ver_b3nch0000001: every body keeps its size
    return json.dumps({
        "id": event_id, "eventType": "verification.completed", "resourceId": verification, "tenantId": "tenant-bench-0001", "timestamp": "2025-01-15T10:35:00Z",
        "data": {"verificationId": verification, "externalId": "user-123", "status": "verified",
                 "decision": "auto_approve", "decisionReason": "All checks passed", "overallScore": 96.3},
    }, separators=(",", ":"))


def event_id_for(prefix, i):
    """Fixed width, so every scenario sends bodies of the same size."""
    return "evt_%s%08d" % (hashlib.sha1(prefix.encode()).hexdigest()[:6], i)


def gen_requests(prefix_path, secret, count, prefix, threads, scheme="kora"):
    """Writes `count` requests split over `threads` files prefix_path.0 … (one per wrk thread, so no
    two threads send the same event), one line each: `timestamp \t signature \t id \t body`, every
    body with its own event id, signed as Kora's timestamped scheme: lowercase hex
    HMAC-SHA256(secret as UTF-8, "{timestamp}.{body}"). With scheme "guide", the signature is the
    integration guide's instead, HMAC-SHA256 of the body alone (for the Flask row, which webhook.lua
    then sends as X-Kora-Signature). Prints the body size in bytes."""
    ts = str(int(time.time()))
    key = secret.encode()
    files = [open("%s.%d" % (prefix_path, t), "w") for t in range(threads)]
    try:
        for i in range(count):
            event_id = event_id_for(prefix, i)
            body = body_for(event_id)
            signed = body if scheme == "guide" else ts + "." + body
            sig = hmac.new(key, signed.encode(), hashlib.sha256).hexdigest()
            files[i % threads].write(ts + "\t" + sig + "\t" + event_id + "\t" + body + "\n")
    finally:
        for f in files:
            f.close()
    return len(body_for(event_id_for(prefix, 0)).encode())


def ready_probe(url):
    """A function that sends one GET to url over a raw socket (no urllib: cheap enough to poll every
    2 ms) and tells whether it was answered 200."""
    u = urllib.parse.urlsplit(url)
    probe = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (u.path, u.hostname, u.port)).encode()

    def ready():
        try:
            with socket.create_connection((u.hostname, u.port), timeout=1) as s:
                s.sendall(probe)
                return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
    return ready


def poll_ready(url, timeout, started_file):
    """For start-up times: creates started_file once it is polling (bench/run then starts the sidecar
    and notes the time), then polls url over a raw socket every 2 ms and prints the wall-clock time
    (epoch seconds) of the first 200. This keeps the poller's own start-up (the interpreter, imports)
    out of the figure (an earlier version started polling after the sidecar and counted it)."""
    ready = ready_probe(url)
    open(started_file, "w").close()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            print("%.6f" % time.time())
            return 0
        time.sleep(0.002)
    print("not ready after %ss: %s" % (timeout, url), file=sys.stderr)
    return 1


def wait_http(url, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return 0
        except urllib.error.HTTPError:
            return 0  # it answers: good enough
        except Exception:
            time.sleep(0.02)
    print("no answer after %ss: %s" % (timeout, url), file=sys.stderr)
    return 1


def proc_status_kb(pid, field):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def storage_write_bytes(pid):
    """Bytes process `pid` caused to be written to storage so far (`write_bytes` in /proc/PID/io:
    counted when it dirties a file's pages, whether or not they were written back yet)."""
    try:
        with open("/proc/%s/io" % pid) as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:  # a kernel without per-task I/O accounting
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU time of process `pid` (all its threads) and of its direct children (nginx
    workers), in seconds."""
    def times(path):
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[1], int(fields[11]) + int(fields[12])  # ppid, utime + stime (ticks)
    total = times("/proc/%s/stat" % pid)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(pid):
            try:
                ppid, ticks = times("/proc/%s/stat" % entry)
            except (OSError, IndexError):
                continue
            if ppid == str(pid):
                total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def to_ms(value):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", value)
    if not m:
        return None
    n, unit = float(m.group(1)), m.group(2)
    return n * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(path):
    """requests/s, latency percentiles, request count, errors from wrk --latency output."""
    text = open(path).read()
    out = {"requests": None, "rps": None, "p50_ms": None, "p75_ms": None, "p90_ms": None, "p99_ms": None,
           "avg_ms": None, "non_2xx": 0, "socket_errors": 0, "socket_errors_detail": None}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"^\s+Latency\s+(\S+)", text, re.M)
    if m:
        out["avg_ms"] = to_ms(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(r"^\s+%s(?:\.000)?%%\s+(\S+)" % pct, text, re.M)
        if m:
            out["p%s_ms" % pct] = to_ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        c, r, w, t = map(int, m.groups())
        out["socket_errors"] = c + r + w + t
        out["socket_errors_detail"] = {"connect": c, "read": r, "write": w, "timeout": t}
    out["errors"] = out["non_2xx"] + out["socket_errors"]
    return out


def metrics(url):
    """The sidecar's webhook counters by result, from /metrics."""
    counts = {}
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            for line in r.read().decode().splitlines():
                m = re.match(r'kora_sidecar_webhooks_total\{result="([^"]+)"\}\s+([\d.e+]+)', line)
                if m:
                    counts[m.group(1)] = int(float(m.group(2)))
    except Exception as e:
        counts["_error"] = str(e)
    return counts


def store_counts(path):
    """Deliveries by status in a (stopped) sidecar's SQLite store."""
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        rows = con.execute("SELECT status, count(*) FROM deliveries GROUP BY status").fetchall()
        events = con.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        con.close()
    d = {s: n for s, n in rows}
    d["events"] = events
    return d


def pending_count(path):
    con = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=5)
    try:
        return con.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
    finally:
        con.close()


def fmt(v, spec):
    return "-" if v is None or isinstance(v, str) else format(v, spec)


def mb(kb):
    return None if not kb else kb / 1024


def derive(sc, meta):
    """The figures computed from one run's records: ratios to nginx and to the HTTP floor measured
    in the same run, CPU per request, added latency over nginx at the fixed rate."""
    base, base_get, floor = sc.get("nginx", {}), sc.get("nginx-get", {}), sc.get("floor", {})
    load = re.search(r"-d(\d+)s", meta.get("wrk_args", ""))
    for name, r in sc.items():
        if name in OPEN_LOOP or name == "startup":
            continue
        if base.get("rps") and r.get("rps") is not None:
            r["ratio_rps_vs_baseline"] = round(r["rps"] / base["rps"], 3)
        if base.get("p99_ms") is not None and r.get("p99_ms") is not None:
            r["p99_delta_ms_vs_baseline"] = round(r["p99_ms"] - base["p99_ms"], 3)
        if r.get("cpu_s") is not None and r.get("requests"):
            r["cpu_us_per_request"] = round(r["cpu_s"] * 1e6 / r["requests"], 1)
        if name == "proxy" and base_get.get("rps") and r.get("rps") is not None:
            r["ratio_rps_vs_nginx_get"] = round(r["rps"] / base_get["rps"], 3)
        # Queued req/s counts only the answers; delivery finishes after the load, so the pipeline's
        # throughput is acknowledged / (load + drain), and its CPU per event counts both.
        if name == "queued" and r.get("acknowledged"):
            if load and isinstance(r.get("drain_s"), (int, float)):
                r["end_to_end_per_s"] = round(r["acknowledged"] / (int(load.group(1)) + r["drain_s"]))
            if r.get("cpu_with_drain_s") is not None:
                r["cpu_us_per_event_delivered"] = round(r["cpu_with_drain_s"] * 1e6 / r["acknowledged"], 1)
            if r.get("storage_write_bytes") is not None:
                r["storage_kb_per_event"] = round(r["storage_write_bytes"] / 1024 / r["acknowledged"], 1)
    floor_us = floor.get("cpu_us_per_request")
    for name, r in sc.items():
        per = r.get("cpu_us_per_event_delivered") if name == "queued" else r.get("cpu_us_per_request")
        if floor_us and per is not None:
            r["cpu_x_floor"] = round(per / floor_us, 2)
    for name, ref in RATE_REFERENCE.items():
        r, b = sc.get(name), sc.get(ref)
        if r and b:
            for q in ("p50", "p99", "max"):
                if r.get(q + "_ms") is not None and b.get(q + "_ms") is not None:
                    r["added_%s_ms" % q] = round(r[q + "_ms"] - b[q + "_ms"], 3)
    d, f = sc.get("direct", {}), sc.get("flask", {})
    if d.get("rps") and f.get("rps"):
        f["direct_rps_x_flask"] = round(d["rps"] / f["rps"], 2)
    if d.get("cpu_us_per_request") and f.get("cpu_us_per_request"):
        f["direct_cpu_x_flask"] = round(d["cpu_us_per_request"] / f["cpu_us_per_request"], 2)
    for r in sc.values():  # startup, and footprint-sqlite's start-ups
        if r.get("startup_samples_s"):
            r["startup_median_s"] = round(statistics.median(r["startup_samples_s"]), 4)


def aggregate(runs):
    """One record per scenario over the runs: the median of every number, all() of every boolean,
    the start-up samples pooled, anything else from the last run that has it."""
    out = {}
    names = []
    for run in runs:
        names += [n for n in run if n not in names]
    for name in names:
        recs = [run[name] for run in runs if name in run]
        agg = {}
        keys = []
        for r in recs:
            keys += [k for k in r if k not in keys]
        for k in keys:
            vals = [r[k] for r in recs if k in r]
            if k == "startup_samples_s":
                agg[k] = [x for v in vals for x in v]
            elif all(isinstance(v, bool) for v in vals):
                agg[k] = all(vals)
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                m = statistics.median(vals)
                if all(isinstance(v, int) for v in vals) and m == int(m):
                    m = int(m)
                agg[k] = round(m, 4) if isinstance(m, float) else m
            else:
                agg[k] = vals[-1]
        if agg.get("startup_samples_s"):
            agg["startup_median_s"] = round(statistics.median(agg["startup_samples_s"]), 4)
        agg["runs"] = len(recs)
        out[name] = agg
    return out


def table(cols, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(cols))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def report(results_path, out_json):
    """Reads the collected records, derives the figures per run, takes the medians over the runs,
    prints the tables and the targets, writes the JSON."""
    data = json.load(open(results_path))
    runs = data.get("runs") or [{}]
    for run in runs:
        derive(run, data["meta"])
    sc = aggregate(runs)
    data["scenarios"] = sc
    n = len(runs)
    meta = data["meta"]
    how = "median of %d alternated runs" % n if n > 1 else "one run"

    print()
    print("kora-sidecar benchmark — %s, %s, %s cores, %s, body %s bytes, commit %s" % (
        meta["started_at"], meta["host"], meta.get("cpus"), how, meta["body_bytes"], meta.get("git_commit")))
    rows = []
    for name in CLOSED_LOOP:
        r = sc.get(name)
        if not r:
            continue
        cpu = r.get("cpu_us_per_event_delivered") if name == "queued" else r.get("cpu_us_per_request")
        rows.append([
            SCENARIO_TITLES[name], fmt(r.get("rps"), ".0f"), fmt(r.get("ratio_rps_vs_baseline"), ".2f"),
            fmt(r.get("p50_ms"), ".2f"), fmt(r.get("p99_ms"), ".2f"), fmt(r.get("p99_delta_ms_vs_baseline"), "+.2f"),
            fmt(r.get("errors"), "g"), fmt(cpu, ".0f"), fmt(r.get("cpu_x_floor"), ".2f"),
            fmt(mb(r.get("peak_rss_kb")), ".1f"), fmt(r.get("startup_s"), ".3f"),
            fmt(mb(r.get("idle_rss_kb")), ".1f"), fmt(mb(r.get("rss_after_load_kb")), ".1f"),
        ])
    if rows:
        print()
        print("Closed loop: wrk %s after a 2 s warm-up (each connection sends when the last answer came)" % meta["wrk_args"])
        table(["scenario", "req/s", "× nginx", "p50 ms", "p99 ms", "Δp99 ms", "errors", "CPU µs/req", "× floor",
               "peak RSS MB", "start s", "idle RSS MB", "RSS after MB"], rows)
        print("CPU: the sidecar's (nginx's, gunicorn's for the baselines) user + system time over the measured run, per request;")
        print("  * queued: per event acknowledged and delivered, load and drain counted. × floor: to row 5 in the same run.")
        for name in ("direct", "queued"):
            r = sc.get(name) or {}
            if r.get("webhook_results"):
                print("%-7s webhook results from /metrics (warm-up included): %s" % (name, r["webhook_results"]))
        q = sc.get("queued") or {}
        if q.get("store"):
            print("queued  store after stop: %s; acknowledged 2xx = %s; all durable: %s; backlog drained in %s s" % (
                q["store"], q.get("acknowledged"), q.get("all_acknowledged_durable"), q.get("drain_s")))
            if q.get("end_to_end_per_s") is not None:
                print("queued  end to end: %d events/s acknowledged and delivered (acknowledged / (load + drain)); "
                      "CPU %s µs/event (answers only: %s µs)" % (q["end_to_end_per_s"], fmt(q.get("cpu_us_per_event_delivered"), ".0f"),
                                                                fmt(q.get("cpu_us_per_request"), ".0f")))
            if q.get("storage_kb_per_event") is not None:
                print("queued  storage writes: %.1f KB per event acknowledged (write_bytes over the load and the drain)"
                      % q["storage_kb_per_event"])
        if (sc.get("proxy") or {}).get("ratio_rps_vs_nginx_get") is not None:
            print("proxy   ratio to nginx proxying the same GET: %.2f" % sc["proxy"]["ratio_rps_vs_nginx_get"])
        f = sc.get("flask") or {}
        if f:
            print("flask   %s; %s" % (meta.get("gunicorn", "gunicorn"), "the guide's body-only HMAC check and a 200, nothing else"))
            if f.get("direct_rps_x_flask") is not None:
                print("flask   sidecar direct (row 2) against it: %.2f× its requests/s and %s× its CPU per request, while the sidecar"
                      % (f["direct_rps_x_flask"], fmt(f.get("direct_cpu_x_flask"), ".2f")))
                print("        also checks the timestamp, de-duplicates, normalises, signs and delivers each event")

    rows = []
    for name in OPEN_LOOP:
        r = sc.get(name)
        if not r:
            continue
        rows.append([
            SCENARIO_TITLES[name], fmt(r.get("rate_target"), ".0f"), fmt(r.get("rate_achieved"), ".0f"),
            fmt(r.get("p50_ms"), ".2f"), fmt(r.get("p99_ms"), ".2f"), fmt(r.get("max_ms"), ".1f"),
            fmt(r.get("errors"), "g"), fmt(r.get("added_p50_ms"), "+.2f"), fmt(r.get("added_p99_ms"), "+.2f"),
            fmt(r.get("send_lag_p99_ms"), ".2f"), fmt(r.get("generator_cpu_pct_of_core"), ".0f"),
        ])
    if rows:
        ref = sc.get("rate-nginx") or next(iter(sc[x] for x in OPEN_LOOP if x in sc))
        print()
        print("Fixed rate, open loop: bench/lib/openloop.py, %s req/s for %s s after %s s at the rate, %s keep-alive connections;"
              % (fmt(ref.get("rate_target"), ".0f"), fmt(ref.get("duration_s"), "g"), fmt(ref.get("warmup_s"), "g"), ref.get("connections")))
        print("latency from each request's intended send time (no coordinated omission); added = this row − its nginx row")
        table(["scenario", "rate/s", "achieved/s", "p50 ms", "p99 ms", "max ms", "errors", "added p50", "added p99",
               "send lag p99", "gen CPU %"], rows)
        print("send lag: how late the generator wrote (its 1 ms timer tick; the same in every row). gen CPU: the generator's own")
        print("  use of one core. A row whose achieved rate is below its rate, or whose nginx row lags, measured the generator.")
        g = sc.get("rate-nginx") or {}
        if g.get("rate_achieved") is not None and g.get("generator_cpu_pct_of_core") is not None:
            kept = g["rate_achieved"] >= 0.98 * g["rate_target"] and g["generator_cpu_pct_of_core"] < 50 and not g.get("errors")
            print("generator against nginx: %.0f of %.0f req/s, %.0f %% of one core (%s µs/request), send lag p50 %s / p99 %s ms: %s" % (
                g["rate_achieved"], g["rate_target"], g["generator_cpu_pct_of_core"], fmt(g.get("generator_cpu_us_per_request"), ".0f"),
                fmt(g.get("send_lag_p50_ms"), ".2f"), fmt(g.get("send_lag_p99_ms"), ".2f"),
                "it kept up" if kept else "it did NOT keep up: lower BENCH_RATE, these rows measured the generator"))
            data["generator_kept_up"] = kept
        for name in OPEN_LOOP:
            r = sc.get(name) or {}
            if r.get("rate_target") and r.get("rate_achieved") is not None and r["rate_achieved"] < 0.98 * r["rate_target"]:
                print("WARNING %s: achieved %.0f of %.0f req/s: the generator or the server fell behind" % (
                    name, r["rate_achieved"], r["rate_target"]))

    fp = dict(data.get("footprint") or {})
    side = [sc[n] for n in SIDECAR_ROWS if n in sc]
    idles = [r["idle_rss_kb"] for r in side if r.get("idle_rss_kb")]
    anons = [r["idle_anon_kb"] for r in side if r.get("idle_anon_kb")]
    afters = [r["rss_after_load_kb"] for r in side if r.get("rss_after_load_kb")]
    peaks = [r["peak_rss_kb"] for r in side if r.get("peak_rss_kb")]
    st = sc.get("startup") or {}
    starts = st.get("startup_samples_s") or []
    if idles:
        fp["idle_rss_kb_max"] = max(idles)
    if afters:
        fp["rss_after_load_kb_max"] = max(afters)
    if peaks:
        fp["peak_rss_kb_max"] = max(peaks)
    if starts:
        fp["startup_median_s"] = round(statistics.median(starts), 4)
        fp["startup_samples"] = len(starts)
    sq = sc.get(SQLITE_ROW) or {}
    sq_starts = sq.get("startup_samples_s") or []
    if anons:
        fp["idle_anon_kb_max"] = max(anons)
    if sq.get("idle_rss_kb"):
        fp["sqlite_idle_rss_kb"] = sq["idle_rss_kb"]
    if sq.get("idle_anon_kb"):
        fp["sqlite_idle_anon_kb"] = sq["idle_anon_kb"]
    if sq_starts:
        fp["sqlite_startup_median_s"] = round(statistics.median(sq_starts), 4)
        fp["sqlite_startup_samples"] = len(sq_starts)
    data["footprint"] = fp
    lines = []
    if fp:
        # One column per build: the standard build, and the SQLite-only build when it was measured.
        builds = [("", "standard build")]
        both = any(k.startswith("sqlite_") for k in fp)
        if both:
            builds.append(("sqlite_", "SQLite-only build"))
        icu = {True: "linked", False: "not linked", None: "unknown"}
        samples = {"": starts, "sqlite_": sq_starts}
        lines = [  # label, {prefix: cell or None}, note
            ("binary, as built", {p: fp.get(p + "binary_bytes") and "%.1f MB" % (fp[p + "binary_bytes"] / 1e6) for p, _ in builds}, ""),
            ("binary, stripped", {p: fp.get(p + "stripped_bytes") and "%.1f MB" % (fp[p + "stripped_bytes"] / 1e6) for p, _ in builds},
             "target ≤ %.0f MB (the Dockerfile's install --strip)" % TARGET_STRIPPED_MB),
            ("ICU data", {p: icu[fp[p + "icu_data_linked"]] + (" (%.1f MB)" % (fp[p + "icu_data_bytes"] / 1e6) if fp.get(p + "icu_data_bytes") else "")
                          if p + "icu_data_linked" in fp else None for p, _ in builds},
             "nm on the binary as built: full Foundation brings ICU's data, scripts/icu-subset 5 of its 34 MB"),
            ("idle RSS", {"": idles and "%.1f MB" % (max(idles) / 1024),
                          "sqlite_": fp.get("sqlite_idle_rss_kb") and "%.1f MB" % (fp["sqlite_idle_rss_kb"] / 1024)},
             "target ≤ %.0f MB (1 s after /readyz; %s)" % (TARGET_IDLE_RSS_MB, "standard: largest of the sidecar rows, "
                                                          "SQLite-only: the direct row's config" if both else "largest of the sidecar rows")),
            ("idle RSS, anonymous", {"": anons and "%.1f MB" % (max(anons) / 1024),
                                     "sqlite_": fp.get("sqlite_idle_anon_kb") and "%.1f MB" % (fp["sqlite_idle_anon_kb"] / 1024)},
             "(RssAnon: heap, stacks, written data; the rest of the RSS is the binary and libraries mapped from the page cache)"),
            ("RSS after load", {"": afters and "%.1f MB" % (max(afters) / 1024)},
             "(1 s after the load, or the drain; largest%s)" % ("; the SQLite-only build gets no load" if both else "")),
            ("peak RSS", {"": peaks and "%.1f MB" % (max(peaks) / 1024)}, "(VmHWM at the end of the load; largest)"),
            ("start-up", {p: samples[p] and "%.3f s" % statistics.median(samples[p]) for p, _ in builds},
             "target ≤ %.1f s (to a 200 on /readyz, median of %s starts, fresh store each)"
             % (TARGET_STARTUP_S, " / ".join(str(len(samples[p])) for p, _ in builds if samples[p]))),
            ("start-up, range", {p: samples[p] and "%.3f–%.3f s" % (min(samples[p]), max(samples[p])) for p, _ in builds}, ""),
        ]
        lines = [(label, [cells.get(p) or "-" for p, _ in builds], note) for label, cells, note in lines
                 if any(cells.get(p) for p, _ in builds)]
    if lines:
        w0 = max(len(x[0]) for x in lines)
        widths = [max([len(title)] + [len(x[1][i]) for x in lines]) for i, (_, title) in enumerate(builds)]
        print()
        print("Footprint of one sidecar:")
        print("  " + "".ljust(w0) + "".join("  " + t.rjust(w) for (_, t), w in zip(builds, widths)))
        for label, cells, note in lines:
            print(("  " + label.ljust(w0) + "".join("  " + c.rjust(w) for c, w in zip(cells, widths)) + "  " + note).rstrip())
        print("  " + "; ".join("%s: %s" % (title, fp[p + "binary"]) for p, title in builds if fp.get(p + "binary")))

    t = []
    def chk(label, value, ok):
        t.append({"target": label, "value": value, "met": ok})
    for name, limit in TARGET_CPU_X_FLOOR.items():
        r = sc.get(name) or {}
        what = {"direct": "direct webhook, CPU per request", "queued": "queued, CPU per event acknowledged and delivered",
                "proxy": "API proxy GET, CPU per request"}[name]
        if r.get("cpu_x_floor") is not None:
            chk("%s ≤ %g × the floor" % (what, limit), "%.2f ×" % r["cpu_x_floor"], r["cpu_x_floor"] <= limit)
    for name in ("rate-direct", "rate-queued", "rate-proxy"):
        r = sc.get(name) or {}
        if r.get("added_p50_ms") is not None and r.get("added_p99_ms") is not None:
            chk("%s at a fixed rate: added p50 ≤ %g ms and p99 ≤ %g ms over nginx" % (name[5:], TARGET_ADDED_P50_MS, TARGET_ADDED_P99_MS),
                "%+.2f / %+.2f ms" % (r["added_p50_ms"], r["added_p99_ms"]),
                r["added_p50_ms"] <= TARGET_ADDED_P50_MS and r["added_p99_ms"] <= TARGET_ADDED_P99_MS and not r.get("errors"))
    idle_kb = {"": max(idles) if idles else None, "sqlite_": fp.get("sqlite_idle_rss_kb")}
    for p, title in (("", "standard build"), ("sqlite_", "SQLite-only build")):
        if idle_kb[p]:
            chk("idle RSS ≤ %g MB (%s)" % (TARGET_IDLE_RSS_MB, title), "%.1f MB" % (idle_kb[p] / 1024), idle_kb[p] <= TARGET_IDLE_RSS_MB * 1024)
        if fp.get(p + "stripped_bytes"):
            chk("stripped binary ≤ %g MB (%s)" % (TARGET_STRIPPED_MB, title), "%.1f MB" % (fp[p + "stripped_bytes"] / 1e6),
                fp[p + "stripped_bytes"] <= TARGET_STRIPPED_MB * 1e6)
    if starts:
        chk("start-up to /readyz ≤ %g s (standard build)" % TARGET_STARTUP_S, "%.3f s" % fp["startup_median_s"], fp["startup_median_s"] <= TARGET_STARTUP_S)
    q = sc.get("queued") or {}
    if "all_acknowledged_durable" in q:
        chk("queued: every acknowledged event durable", str(q["all_acknowledged_durable"]).lower(), bool(q["all_acknowledged_durable"]))
    data["targets"] = t
    if t:
        print()
        print("Targets (%s):" % how)
        w = max(len(x["target"]) for x in t)
        for x in t:
            print("  %-9s %s  %s" % ("[met]" if x["met"] else "[NOT met]", x["target"].ljust(w), x["value"]))
    print()
    print("Absolute figures on a shared 2-core machine are noisy; compare ratios within one run (BENCH_RUNS=3 for medians).")
    with open(out_json, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote %s" % out_json)


def run_index():
    return int(os.environ.get("BENCH_RUN", "0"))


def load(results_path):
    data = json.load(open(results_path))
    runs = data.setdefault("runs", [])
    while len(runs) <= run_index():
        runs.append({})
    return data


def save(results_path, data):
    with open(results_path, "w") as f:
        json.dump(data, f, indent=2)


def record(results_path, name, **kv):
    """Adds figures to scenario `name` of run $BENCH_RUN (0 by default)."""
    data = load(results_path)
    data["runs"][run_index()].setdefault(name, {}).update(kv)
    save(results_path, data)


def startup_times(binary, config, url, count, store_dir, log_path):
    """Starts `binary serve --config config` `count` times, each with an empty store_dir, and returns
    the seconds from the spawn to a 200 on url (polled every 2 ms over a raw socket), stopping each
    with SIGTERM."""
    ready = ready_probe(url)
    times = []
    with open(log_path, "ab") as log:
        for _ in range(count):
            shutil.rmtree(store_dir, ignore_errors=True)
            t0 = time.monotonic()
            proc = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=log)
            try:
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError("the sidecar exited with %s during start-up (see %s)" % (proc.returncode, log_path))
                    if time.monotonic() - t0 > 15:
                        raise RuntimeError("not ready after 15 s: %s" % url)
                    if ready():
                        times.append(round(time.monotonic() - t0, 4))
                        break
                    time.sleep(0.002)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return times


def main(argv):
    cmd = argv[1]
    if cmd == "free-ports":
        print(" ".join(map(str, free_ports(int(argv[2])))))
    elif cmd == "gen-requests":
        print(gen_requests(argv[2], argv[3], int(argv[4]), argv[5], int(argv[6]), *argv[7:8]))
    elif cmd == "poll-ready":  # poll-ready URL TIMEOUT STARTED_FILE -> epoch seconds of the first 200
        return poll_ready(argv[2], float(argv[3]), argv[4])
    elif cmd == "wait-http":
        return wait_http(argv[2], float(argv[3]))
    elif cmd == "rss":  # rss PID FIELD -> kB, or null when the kernel does not give FIELD
        print(json.dumps(proc_status_kb(argv[2], argv[3])))
    elif cmd == "written":  # written PID [SINCE] -> bytes caused to be written to storage (since SINCE), or null
        now, since = storage_write_bytes(argv[2]), (json.loads(argv[3]) if len(argv) > 3 else 0)
        print(json.dumps(None if now is None or since is None else now - since))
    elif cmd == "cpu":  # cpu PID [SINCE] -> CPU seconds used (since the SINCE figure)
        print("%.2f" % (cpu_seconds(argv[2]) - (float(argv[3]) if len(argv) > 3 else 0)))
    elif cmd == "init":  # init RESULTS META_JSON
        with open(argv[2], "w") as f:
            json.dump({"meta": json.loads(argv[3]), "runs": [], "footprint": {}}, f, indent=2)
    elif cmd == "record-footprint":  # record-footprint RESULTS KEY JSON_VALUE (once per invocation, not per run)
        data = load(argv[2])
        data.setdefault("footprint", {})[argv[3]] = json.loads(argv[4])
        save(argv[2], data)
    elif cmd == "record-file":  # record-file RESULTS NAME JSON_FILE: merge a JSON object (openloop.py's)
        record(argv[2], argv[3], **json.load(open(argv[4])))
    elif cmd == "startup":  # startup RESULTS NAME BIN CONFIG URL COUNT STORE_DIR LOG
        times = startup_times(argv[4], argv[5], argv[6], int(argv[7]), argv[8], argv[9])
        record(argv[2], argv[3], startup_samples_s=times)
        print(" ".join("%.3f" % x for x in times))
    elif cmd == "seconds":  # seconds 10s|2m|1.5 -> seconds as a number
        m = re.match(r"^([\d.]+)(ms|s|m|h)?$", argv[2])
        if not m:
            print("not a duration: " + argv[2], file=sys.stderr)
            return 2
        print("%g" % (float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]))
    elif cmd == "record-wrk":  # record-wrk RESULTS NAME WRK_OUT
        record(argv[2], argv[3], **parse_wrk(argv[4]))
    elif cmd == "record":  # record RESULTS NAME KEY JSON_VALUE
        record(argv[2], argv[3], **{argv[4]: json.loads(argv[5])})
    elif cmd == "record-metrics":  # record-metrics RESULTS NAME URL
        record(argv[2], argv[3], webhook_results=metrics(argv[4]))
    elif cmd == "wait-drained":  # wait-drained SQLITE TIMEOUT -> seconds or "timeout(N pending)"
        t0 = time.time()
        deadline = t0 + float(argv[3])
        n = None
        while time.time() < deadline:
            try:
                n = pending_count(argv[2])
                if n == 0:
                    print("%.2f" % (time.time() - t0))
                    return 0
            except sqlite3.Error:
                pass
            time.sleep(0.25)
        print('"timeout (%s pending)"' % n)
    elif cmd == "record-store":  # record-store RESULTS NAME SQLITE
        data = load(argv[2])
        r = data["runs"][run_index()][argv[3]]
        counts = store_counts(argv[4])
        results = r.get("webhook_results") or {}
        ack = (r.get("requests") or 0) - (r.get("non_2xx") or 0)
        # Each accepted (non-duplicate) event must have its event row and delivery row committed.
        durable = counts.get("events", 0) >= results.get("accepted", ack) and \
            sum(v for k, v in counts.items() if k != "events") >= counts.get("events", 0)
        record(argv[2], argv[3], store=counts, acknowledged=ack, all_acknowledged_durable=durable)
    elif cmd == "report":
        report(argv[2], argv[3])
    else:
        print("unknown command " + cmd, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv) or 0)
