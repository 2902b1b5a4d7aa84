#!/usr/bin/env python3
"""Helpers for bench/run: free ports, signed request sets, readiness, RSS, wrk parsing, the report.

Only the standard library: it runs before anything is installed.
"""
import hashlib
import hmac
import json
import os
import re
import socket
import sqlite3
import sys
import time
import urllib.request

SCENARIO_TITLES = {
    "nginx": "1 nginx reverse proxy (baseline)",
    "direct": "2 sidecar direct → unix upstream",
    "queued": "3 sidecar queued (SQLite) + delivery",
    "nginx-get": "4' nginx GET proxy to Kora stand-in",
    "proxy": "4 sidecar API proxy GET → Kora stand-in",
    "floor": "5 sidecar GET /healthz (HTTP floor)",
}


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
    """A ~300-byte Kora event (KORA.md §3), compact JSON, distinct by id."""
    return json.dumps({
        "id": event_id, "eventType": "verification.completed", "resourceId": "ver_b3nch0000001", "tenantId": "tenant-bench-0001", "timestamp": "2025-01-15T10:35:00Z",
        "data": {"verificationId": "ver_b3nch0000001", "externalId": "user-123", "status": "verified",
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


def wait_ready(url, start_ns, timeout):
    """Polls url until it answers 200; prints the seconds since start_ns (a `date +%s%N` value)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    print("%.4f" % ((time.time_ns() - start_ns) / 1e9))
                    return 0
        except Exception:
            pass
        time.sleep(0.005)
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
    return "-" if v is None else format(v, spec)


def report(results_path, out_json):
    """Reads the collected scenario records, adds ratios, prints the table, writes the JSON."""
    data = json.load(open(results_path))
    sc = data["scenarios"]
    base = sc.get("nginx", {})
    base_get = sc.get("nginx-get", {})
    for name, r in sc.items():
        if base.get("rps") and r.get("rps") is not None:
            r["ratio_rps_vs_baseline"] = round(r["rps"] / base["rps"], 3)
        if base.get("p99_ms") is not None and r.get("p99_ms") is not None:
            r["p99_delta_ms_vs_baseline"] = round(r["p99_ms"] - base["p99_ms"], 3)
        if r.get("cpu_s") is not None and r.get("requests"):
            r["cpu_us_per_request"] = round(r["cpu_s"] * 1e6 / r["requests"], 1)
        if name == "proxy" and base_get.get("rps") and r.get("rps") is not None:
            r["ratio_rps_vs_nginx_get"] = round(r["rps"] / base_get["rps"], 3)
        # Queued req/s counts only the answers; delivery competes for the same CPU during the load
        # and finishes after it, so the pipeline's throughput is acknowledged / (load + drain).
        load = re.search(r"-d(\d+)s", data["meta"]["wrk_args"])
        if name == "queued" and load and r.get("acknowledged") and isinstance(r.get("drain_s"), (int, float)):
            r["end_to_end_per_s"] = round(r["acknowledged"] / (int(load.group(1)) + r["drain_s"]))

    cols = ["scenario", "req/s", "ratio", "p50 ms", "p99 ms", "Δp99 ms", "errors", "CPU µs/req", "peak RSS MB", "start s",
            "idle RSS MB"]
    rows = []
    for name in ("nginx", "direct", "queued", "nginx-get", "proxy", "floor"):
        r = sc.get(name)
        if not r:
            continue
        rows.append([
            SCENARIO_TITLES[name], fmt(r.get("rps"), ".0f"), fmt(r.get("ratio_rps_vs_baseline"), ".2f"),
            fmt(r.get("p50_ms"), ".2f"), fmt(r.get("p99_ms"), ".2f"), fmt(r.get("p99_delta_ms_vs_baseline"), "+.2f"),
            fmt(r.get("errors"), "d"), fmt(r.get("cpu_us_per_request"), ".0f"),
            fmt(r["peak_rss_kb"] / 1024 if r.get("peak_rss_kb") else None, ".1f"),
            fmt(r.get("startup_s"), ".3f"),
            fmt(r["idle_rss_kb"] / 1024 if r.get("idle_rss_kb") else None, ".1f"),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print("kora-sidecar benchmark — %s, %s, wrk %s, body %s bytes" % (
        data["meta"]["started_at"], data["meta"]["host"], data["meta"]["wrk_args"], data["meta"]["body_bytes"]))
    print(line(cols))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    for name in ("direct", "queued"):
        r = sc.get(name) or {}
        if r.get("webhook_results"):
            print("%-7s webhook results from /metrics: %s" % (name, r["webhook_results"]))
    q = sc.get("queued") or {}
    if q.get("store"):
        print("queued  store after stop: %s; acknowledged 2xx = %s; all durable: %s; backlog drained in %s s" % (
            q["store"], q.get("acknowledged"), q.get("all_acknowledged_durable"), q.get("drain_s")))
        if q.get("end_to_end_per_s") is not None:
            print("queued  end to end: %d events/s acknowledged and delivered (acknowledged / (load + drain))" % q["end_to_end_per_s"])
    if (sc.get("proxy") or {}).get("ratio_rps_vs_nginx_get") is not None:
        print("proxy   ratio to nginx proxying the same GET: %.2f" % sc["proxy"]["ratio_rps_vs_nginx_get"])

    # Issue 6 targets.
    t = []
    d, q, p = sc.get("direct") or {}, sc.get("queued") or {}, sc.get("proxy") or {}
    def chk(label, ok):
        t.append({"target": label, "met": ok})
    if d:
        chk("direct rps >= 0.6 x nginx", (d.get("ratio_rps_vs_baseline") or 0) >= 0.6)
        chk("direct p99 <= nginx p99 + 2 ms", d.get("p99_delta_ms_vs_baseline") is not None and d["p99_delta_ms_vs_baseline"] <= 2.0)
    if q:
        chk("queued rps >= 0.35 x nginx", (q.get("ratio_rps_vs_baseline") or 0) >= 0.35)
        chk("queued: every acknowledged event durable", bool(q.get("all_acknowledged_durable")))
    if p:
        chk("proxy rps >= 0.6 x nginx", (p.get("ratio_rps_vs_baseline") or 0) >= 0.6)
    side = [r for n, r in sc.items() if n in ("direct", "queued", "proxy")]
    if side:
        peaks = [r["peak_rss_kb"] for r in side if r.get("peak_rss_kb")]
        idles = [r["idle_rss_kb"] for r in side if r.get("idle_rss_kb")]
        starts = [r["startup_s"] for r in side if r.get("startup_s") is not None]
        chk("peak RSS under load < 80 MB (max %.1f)" % (max(peaks) / 1024), bool(peaks) and max(peaks) < 80 * 1024)
        chk("idle RSS < 30 MB (max %.1f)" % (max(idles) / 1024), bool(idles) and max(idles) < 30 * 1024)
        chk("ready < 0.5 s (max %.3f)" % max(starts), bool(starts) and max(starts) < 0.5)
    data["targets"] = t
    print()
    print("issue 6 targets:")
    for x in t:
        print("  [%s] %s" % ("met" if x["met"] else "NOT met", x["target"]))
    print()
    print("Absolute figures on a shared 2-core machine are noisy; compare ratios within one run.")
    with open(out_json, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote %s" % out_json)


def record(results_path, name, **kv):
    data = json.load(open(results_path))
    data["scenarios"].setdefault(name, {}).update(kv)
    with open(results_path, "w") as f:
        json.dump(data, f, indent=2)


def main(argv):
    cmd = argv[1]
    if cmd == "free-ports":
        print(" ".join(map(str, free_ports(int(argv[2])))))
    elif cmd == "gen-requests":
        print(gen_requests(argv[2], argv[3], int(argv[4]), argv[5], int(argv[6]), *argv[7:8]))
    elif cmd == "wait-ready":
        return wait_ready(argv[2], int(argv[3]), float(argv[4]))
    elif cmd == "wait-http":
        return wait_http(argv[2], float(argv[3]))
    elif cmd == "rss":  # rss PID FIELD -> kB
        print(proc_status_kb(argv[2], argv[3]))
    elif cmd == "cpu":  # cpu PID [SINCE] -> CPU seconds used (since the SINCE figure)
        print("%.2f" % (cpu_seconds(argv[2]) - (float(argv[3]) if len(argv) > 3 else 0)))
    elif cmd == "init":  # init RESULTS META_JSON
        with open(argv[2], "w") as f:
            json.dump({"meta": json.loads(argv[3]), "scenarios": {}}, f, indent=2)
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
        data = json.load(open(argv[2]))
        r = data["scenarios"][argv[3]]
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
