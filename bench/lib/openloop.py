#!/usr/bin/env python3
"""A fixed-rate, open-loop HTTP/1.1 load generator for bench/run (standard library only).

wrk is closed loop: each connection sends its next request when the previous answer arrives, so a
slow answer delays the requests behind it and they are never measured as late ("coordinated
omission"), and it cannot hold a rate. wrk2 is not packaged in Debian. This sends request i at its
intended time start + i / rate whatever happened before, on a fixed pool of keep-alive connections,
and measures each latency from that intended time: a request that waits for a free connection, or
for a generator that woke up late, is counted as late.

    openloop.py URL --rate 1000 --duration 10 --warmup 2 --connections 16 --out result.json
                [--requests FILE --path /webhooks/koraidv]    # pre-signed webhooks (bench.py gen-requests)
                [--header 'Authorization: Bearer …']           # otherwise GET URL's path

Prints one JSON object (and writes it to --out): the intended and achieved rate over the measured
window (after the warm-up), latency p50/p90/p99/p99.9/max in ms from the intended send time, the
service time (from the actual write) for comparison, the send lag (how late the generator wrote),
errors, and the generator's own CPU use, so a run shows whether the generator kept up.

The event loop sleeps on epoll, which rounds time-outs up to whole milliseconds, so requests go out
up to about 1 ms after their intended time; the send lag reports it. It is the same for every row at
the same rate, so read the sidecar rows as differences from nginx in the same run.
"""
import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def webhook_requests(path, request_file, host):
    """Raw POSTs, one per line of a bench.py gen-requests file (`ts \\t sig \\t id \\t body`), with
    the same headers as lib/webhook.lua."""
    out = []
    with open(request_file) as f:
        for line in f:
            ts, sig, event_id, body = line.rstrip("\n").split("\t", 3)
            b = body.encode()
            out.append((
                "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                "X-Signature: %s\r\nX-Timestamp: %s\r\nX-Signature-Algorithm: sha256\r\n"
                "X-Webhook-ID: %s\r\nX-Event-Type: verification.completed\r\nContent-Length: %d\r\n\r\n"
                % (path, host, sig, ts, event_id, len(b))).encode() + b)
    return out


def get_request(path, host, headers):
    extra = "".join(h.strip() + "\r\n" for h in headers)
    return ("GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path, host, extra)).encode()


async def read_response(reader):
    """Reads one response; returns (status, keep_alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = 0, False, lines[0].startswith("HTTP/1.0")
    for h in lines[1:]:
        name, _, value = h.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection":
            close = value == "close" or (close and value != "keep-alive")
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, not close


class Run:
    def __init__(self, args):
        u = urlsplit(args.url)
        self.host, self.port = u.hostname, u.port or 80
        host_header = "%s:%d" % (self.host, self.port)
        if args.requests:
            self.requests = webhook_requests(args.path or u.path or "/", args.requests, host_header)
        else:
            self.requests = [get_request(u.path or "/", host_header, args.header)]
        self.rate = args.rate
        self.warmup = args.warmup
        self.duration = args.duration
        self.connections = args.connections
        self.queue = asyncio.Queue()
        # per request in the measured window: (latency from intended, service time, send lag, ok)
        self.samples = []
        self.errors = {"non_2xx": 0, "socket": 0, "reconnects": 0}
        self.measured_total = 0
        self.completed = 0

    async def connect(self):
        return await asyncio.open_connection(self.host, self.port)

    async def worker(self, conn):
        reader, writer = conn or (None, None)
        while True:
            item = await self.queue.get()
            if item is None:
                break
            intended, req, measured = item
            for attempt in (1, 2):
                try:
                    if writer is None:
                        reader, writer = await self.connect()
                    sent = time.monotonic()
                    writer.write(req)
                    status, keep = await read_response(reader)
                    done = time.monotonic()
                    if measured:
                        self.samples.append((done - intended, done - sent, sent - intended, 200 <= status < 300))
                        if not 200 <= status < 300:
                            self.errors["non_2xx"] += 1
                    if not keep:
                        writer.close()
                        reader = writer = None
                        self.errors["reconnects"] += measured
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    if attempt == 2 or not measured:
                        if measured:
                            self.errors["socket"] += 1
                        break
                    self.errors["reconnects"] += 1
            self.completed += 1
        if writer is not None:
            writer.close()

    async def schedule(self, start):
        total = int(round(self.rate * (self.warmup + self.duration)))
        first_measured = int(round(self.rate * self.warmup))
        n = len(self.requests)
        loop_time = time.monotonic
        i = 0
        while i < total:
            now = loop_time()
            # everything due by now goes out together; then sleep until the next intended time
            while i < total and start + i / self.rate <= now:
                self.queue.put_nowait((start + i / self.rate, self.requests[i % n], i >= first_measured))
                i += 1
            if i < total:
                await asyncio.sleep(start + i / self.rate - loop_time())
        self.measured_total = total - first_measured

    async def main(self):
        # Open the connections first, so the first requests do not pay for the handshakes.
        conns = await asyncio.gather(*(self.connect() for _ in range(self.connections)), return_exceptions=True)
        workers = [asyncio.ensure_future(self.worker(c if isinstance(c, tuple) else None)) for c in conns]
        start = time.monotonic() + 0.05
        sched = asyncio.ensure_future(self.schedule(start))
        t_measure = start + self.warmup
        await asyncio.sleep(max(0.0, t_measure - time.monotonic()))
        r_measure = resource.getrusage(resource.RUSAGE_SELF)
        t_measure = time.monotonic()
        await sched
        for _ in workers:
            self.queue.put_nowait(None)
        _, pending = await asyncio.wait(workers, timeout=10)
        for w in pending:
            w.cancel()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return r_measure, r1, time.monotonic() - t_measure


def summarise(run, r_measure, r1, elapsed):
    lat = sorted(s[0] * 1000 for s in run.samples)
    svc = sorted(s[1] * 1000 for s in run.samples)
    lag = sorted(s[2] * 1000 for s in run.samples)
    cpu = (r1.ru_utime + r1.ru_stime) - (r_measure.ru_utime + r_measure.ru_stime)
    answered = len(run.samples)
    lost = run.measured_total - answered - run.errors["socket"]
    r3 = lambda v: None if v is None else round(v, 3)
    return {
        "rate_target": run.rate,
        "duration_s": run.duration,
        "warmup_s": run.warmup,
        "connections": run.connections,
        "requests": run.measured_total,
        "answered": answered,
        "rate_achieved": round(answered / run.duration, 1) if run.duration else None,
        "p50_ms": r3(percentile(lat, 50)), "p90_ms": r3(percentile(lat, 90)),
        "p99_ms": r3(percentile(lat, 99)), "p999_ms": r3(percentile(lat, 99.9)),
        "max_ms": r3(lat[-1] if lat else None),
        "service_p50_ms": r3(percentile(svc, 50)), "service_p99_ms": r3(percentile(svc, 99)),
        "send_lag_p50_ms": r3(percentile(lag, 50)), "send_lag_p99_ms": r3(percentile(lag, 99)),
        "send_lag_max_ms": r3(lag[-1] if lag else None),
        "non_2xx": run.errors["non_2xx"], "socket_errors": run.errors["socket"],
        "unanswered": max(0, lost), "reconnects": run.errors["reconnects"],
        "errors": run.errors["non_2xx"] + run.errors["socket"] + max(0, lost),
        # the generator's own CPU over the measured window and the drain after it
        "generator_cpu_s": round(cpu, 3),
        "generator_cpu_pct_of_core": round(100 * cpu / elapsed, 1) if elapsed > 0 else None,
        "generator_cpu_us_per_request": round(cpu * 1e6 / answered, 1) if answered else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--requests", help="a bench.py gen-requests file: POST these, one per request")
    ap.add_argument("--path", help="the path to POST --requests to (default: the URL's)")
    ap.add_argument("--header", action="append", default=[], help="an extra header for GETs")
    ap.add_argument("--out")
    args = ap.parse_args()
    run = Run(args)
    loop = asyncio.new_event_loop()
    r_measure, r1, elapsed = loop.run_until_complete(run.main())
    loop.close()
    result = summarise(run, r_measure, r1, elapsed)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
