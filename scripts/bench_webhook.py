"""Webhook latency under a burst: how fast `POST /webhook` answers while many annotators submit at once,
and whether the burst leaves exactly one queued training job per project (coalescing).

It starts the real server (`livetrain serve --no-worker`: gunicorn, embedded Redis, a temporary
MODEL_DIR, DOWNLOAD_WEIGHTS=false) on a free 127.0.0.1 port, then sends --requests webhooks from
--concurrency concurrent clients, each on its own keep-alive connection. Payloads are Label
Studio 1.23.2's own (the "json" field of shared/label-studio/captured/POST_webhook_*.json) with the
project and task ids rewritten: each simulated submit is START_TRAINING followed by
ANNOTATION_CREATED, as Label Studio sends them, spread over --projects project ids.

It prints p50/p95/p99/max latency (ms, measured client side around each request), the count of 2xx
and non-2xx answers, throughput, and the number of jobs in the RQ queue `livetrain` per project (read
from the same embedded Redis; no worker runs, so nothing drains it). PASS needs p99 < --target-ms
(default 50), every answer 2xx and exactly one job per project.

    python scripts/bench_webhook.py [--requests 1000] [--concurrency 50] [--projects 4] \
        [--workers 1] [--threads 8] [--client asyncio|threads] [--rate 0] [--out result.json]

--workers/--threads are passed to gunicorn through WORKERS/THREADS (the defaults are livetrain's).
By default the load is closed loop (each client sends its next webhook as soon as the last is answered),
i.e. a saturation burst: by Little's law mean latency ~ concurrency / throughput, so the printed "mean
requests in flight" says whether the clients really kept --concurrency requests outstanding. The default
asyncio client costs little CPU per request and keeps ~all of them in flight; with --client threads
(requests.Session per thread) on 2 cores the GIL let anywhere from 5 to 46 of 50 be in flight, so its
latencies swing from run to run with the client, not the server.
--rate R makes it open loop instead: request i is due at i/R s and its latency counts from then.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from rq import Queue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.jobs.queue import QUEUE_NAME  # noqa: E402
from backend.simulation.processes import LivetrainServer  # noqa: E402

CAPTURED = ROOT.parent / "shared" / "label-studio" / "captured"
log = logging.getLogger("bench_webhook")


def captured(action: str) -> dict:
    path = CAPTURED / f"POST_webhook_{action}.json"
    return json.loads(path.read_text())["json"]


def build_payloads(count: int, projects: list[int]) -> list[tuple[str, int, bytes]]:
    """(action, project, body) for ``count`` requests: submit i = START_TRAINING + ANNOTATION_CREATED."""
    start_training, created = captured("START_TRAINING"), captured("ANNOTATION_CREATED")
    out = []
    submit = 0
    while len(out) < count:
        project = projects[submit % len(projects)]
        task = 1000 * project + submit  # a different task per submit
        st = copy.deepcopy(start_training)
        st["project"]["id"] = project
        ac = copy.deepcopy(created)
        ac["project"]["id"] = project
        ac["annotation"].update(id=submit + 1, task=task, project=project)
        if isinstance(ac["annotation"].get("prediction"), dict):
            ac["annotation"]["prediction"].update(task=task, project=project)
        ac["task"].update(id=task, project=project)
        out.append(("START_TRAINING", project, json.dumps(st).encode()))
        out.append(("ANNOTATION_CREATED", project, json.dumps(ac).encode()))
        submit += 1
    return out[:count]


def run_burst(url: str, payloads: list[tuple[str, int, bytes]], concurrency: int, timeout: float, rate: float = 0.0):
    """Send every payload once from ``concurrency`` threads; returns (results, wall seconds). With ``rate``,
    request i is due at i / rate seconds and its latency counts from then (open loop)."""
    results: list[tuple[str, int, int, float, bool | None]] = []  # action, project, status, seconds, queued
    lock = threading.Lock()
    cursor = iter(range(len(payloads)))
    ready = threading.Barrier(concurrency + 1)
    deadline, t0 = [0.0], [0.0]
    headers = {"Content-Type": "application/json", "User-Agent": "heartex/1.23.2 (bench_webhook)"}

    def client():
        session = requests.Session()
        try:
            session.get(url + "/health", timeout=10)  # open the keep-alive connection before timing
        except requests.RequestException:
            pass
        ready.wait(timeout=60)
        while time.monotonic() < deadline[0]:
            with lock:
                i = next(cursor, None)
            if i is None:
                break
            action, project, body = payloads[i]
            start = time.perf_counter()
            if rate:
                start = t0[0] + i / rate
                time.sleep(max(0.0, start - time.perf_counter()))
            queued = None
            try:
                reply = session.post(url + "/webhook", data=body, headers=headers, timeout=10)
                status = reply.status_code
                if reply.ok:
                    queued = reply.json().get("queued")
            except requests.RequestException as exc:
                log.warning("request failed: %s", exc)
                status = 0
            elapsed = time.perf_counter() - start
            with lock:
                results.append((action, project, status, elapsed, queued))
        session.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait(timeout=60)
    deadline[0] = time.monotonic() + timeout
    started = t0[0] = time.perf_counter()
    for t in threads:
        t.join(timeout=max(0.0, deadline[0] - time.monotonic()) + 15)
    wall = time.perf_counter() - started
    with lock:
        return list(results), wall


def run_burst_asyncio(url: str, payloads: list[tuple[str, int, bytes]], concurrency: int, timeout: float,
                      rate: float = 0.0):
    """The same burst from one asyncio loop: ``concurrency`` keep-alive connections speaking plain HTTP/1.1.
    Far less client CPU per request than requests + threads, so on a small machine the clients really keep
    ``concurrency`` webhooks in flight instead of queueing on the GIL."""
    import asyncio

    host, port = url.removeprefix("http://").split(":")
    results: list[tuple[str, int, int, float, bool | None]] = []
    cursor = iter(range(len(payloads)))
    t0 = [0.0]

    async def exchange(reader, writer, body: bytes) -> tuple[int, bytes]:
        writer.write(b"POST /webhook HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                     b"User-Agent: heartex/1.23.2 (bench_webhook)\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n" % (host.encode(), port.encode(), len(body)) + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next((int(l.split(":", 1)[1]) for l in lines[1:] if l.lower().startswith("content-length:")), 0)
        return status, await reader.readexactly(length)

    async def client(deadline: float, start_gate: asyncio.Event):
        try:  # connect before timing starts, as the threads client does
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            reader = writer = None
        await start_gate.wait()
        while time.monotonic() < deadline:
            i = next(cursor, None)
            if i is None:
                break
            action, project, body = payloads[i]
            start = time.perf_counter()
            if rate:
                start = t0[0] + i / rate
                await asyncio.sleep(max(0.0, start - time.perf_counter()))
            status, queued = 0, None
            try:
                if writer is None:  # (re)connect; the connect time counts, as it would for a client
                    reader, writer = await asyncio.open_connection(host, int(port))
                status, raw = await asyncio.wait_for(exchange(reader, writer, body), 10)
                if 200 <= status < 300:
                    queued = json.loads(raw).get("queued")
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("request failed: %r", exc)
                if writer is not None:
                    writer.close()
                reader = writer = None
            results.append((action, project, status, time.perf_counter() - start, queued))
        if writer is not None:
            writer.close()

    async def burst():
        gate = asyncio.Event()
        deadline = time.monotonic() + timeout
        tasks = [asyncio.create_task(client(deadline, gate)) for _ in range(concurrency)]
        await asyncio.sleep(0.5)  # let every client connect
        started = t0[0] = time.perf_counter()
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout + 30)
        return time.perf_counter() - started

    wall = asyncio.run(burst())
    return results, wall


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="webhooks to send in all")
    parser.add_argument("--concurrency", type=int, default=50, help="client threads, each with its own session")
    parser.add_argument("--projects", type=int, default=4, help="distinct project ids the webhooks name")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes (env WORKERS)")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker (env THREADS)")
    parser.add_argument("--client", choices=("asyncio", "threads"), default="asyncio",
                        help="asyncio (default): plain HTTP/1.1 keep-alive connections in one event loop, cheap "
                             "enough to really keep every client in flight; threads: one requests.Session per "
                             "client thread (on 2 cores the GIL lets only 5-40 of 50 be in flight, run to run)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="open loop: start request i at i/RATE s (latency counted from then); 0 = closed loop, "
                             "each client sends its next request as soon as the last one is answered")
    parser.add_argument("--target-ms", type=float, default=50.0, help="p99 latency target")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up sending after this many seconds")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.requests < 1 or args.concurrency < 1 or args.projects < 1:
        parser.error("--requests, --concurrency and --projects must be at least 1")

    projects = list(range(1, args.projects + 1))
    payloads = build_payloads(args.requests, projects)
    with tempfile.TemporaryDirectory(prefix="bench_webhook-") as tmp:
        tmp = Path(tmp)
        server = LivetrainServer(tmp / "models", env={"WORKERS": args.workers, "THREADS": args.threads, "LOG_LEVEL": "WARNING"},
                                 log_path=tmp / "serve.log", worker=False, cwd=ROOT)
        try:
            server.wait_ready(timeout=180)
            log.info("livetrain serve up at %s (workers=%d threads=%d); sending %d webhooks from %d clients",
                     server.url, args.workers, args.threads, len(payloads), args.concurrency)
            burst = run_burst if args.client == "threads" else run_burst_asyncio
            results, wall = burst(server.url, payloads, args.concurrency, args.timeout, args.rate)
            conn = server.redis()
            try:
                queue = Queue(QUEUE_NAME, connection=conn)
                jobs = [queue.fetch_job(job_id) for job_id in queue.get_job_ids()]
                per_project = Counter(str(job.args[0]) for job in jobs if job is not None)
            finally:
                conn.close()
        except BaseException:
            server_log = (tmp / "serve.log").read_text(errors="replace")[-3000:]
            server.stop()
            print(server_log, file=sys.stderr)
            raise
        server.stop()

    latencies = sorted(1000 * r[3] for r in results)
    ok = sum(1 for r in results if 200 <= r[2] < 300)
    bad = len(results) - ok
    unsent = len(payloads) - len(results)
    queued_replies = Counter(str(r[1]) for r in results if r[4])
    p50, p95, p99 = (percentile(latencies, q) for q in (50, 95, 99))
    jobs_ok = all(per_project.get(str(p), 0) == 1 for p in projects) and sum(per_project.values()) == len(projects)
    latency_ok = p99 < args.target_ms
    passed = latency_ok and jobs_ok and bad == 0 and unsent == 0

    in_flight = sum(r[3] for r in results) / wall  # Little's law: mean requests in flight during the burst
    mode = f"open loop at {args.rate:g} req/s" if args.rate else "closed loop"
    print(f"webhooks={len(results)} concurrency={args.concurrency} ({args.client} client, {mode}) projects={args.projects} "
          f"gunicorn workers={args.workers} threads={args.threads} cpus={os.cpu_count()}")
    print(f"latency ms: p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  max {latencies[-1]:.1f}  "
          f"mean {statistics.fmean(latencies):.1f}")
    print(f"responses: 2xx {ok}  non-2xx {bad}" + (f"  not sent (timeout) {unsent}" if unsent else ""))
    print(f"throughput: {len(results) / wall:.0f} req/s ({len(results)} in {wall:.2f} s); "
          f"mean requests in flight {in_flight:.1f} of {args.concurrency}")
    print(f"RQ jobs in queue '{QUEUE_NAME}': {sum(per_project.values())} "
          f"(per project: {dict(sorted(per_project.items()))}; replies with queued=true: {dict(sorted(queued_replies.items()))})"
          f" -> {'exactly one per project' if jobs_ok else 'NOT one per project'}")
    print(f"{'PASS' if passed else 'FAIL'}: p99 {p99:.1f} ms {'<' if latency_ok else '>='} {args.target_ms:g} ms target"
          f", {'all' if bad == 0 and unsent == 0 else 'not all'} 2xx, "
          f"{'one job per project' if jobs_ok else 'wrong job count'}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "requests": len(results), "concurrency": args.concurrency, "projects": args.projects,
            "workers": args.workers, "threads": args.threads, "client": args.client, "rate": args.rate, "mean_in_flight": in_flight,
            "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "max": latencies[-1], "mean": statistics.fmean(latencies)},
            "ok_2xx": ok, "non_2xx": bad, "unsent": unsent, "throughput_rps": len(results) / wall, "wall_s": wall,
            "jobs_per_project": dict(per_project), "queued_replies": dict(queued_replies),
            "target_ms": args.target_ms, "passed": passed,
        }, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
