"""Model freshness while people annotate: the time from submitting the Nth annotation in Label Studio
until `/predict` serves a model version trained on it, on CPU, with the default model (MODEL_ARCH=auto,
which offline is Faster R-CNN Lite0 with the ImageNet backbone).

Setup: a Label Studio double (tests/fake_label_studio.py, LS 1.23.2's API shapes) with one project using
BCCD's RectangleLabels config, the first --images (K, default 12) train-split BCCD images as tasks plus
one test-split image as an unlabeled "probe" task; `livetrain serve` (gunicorn + RQ worker + embedded
Redis, temporary MODEL_DIR, DOWNLOAD_WEIGHTS=false) runs against it with default settings
(PUBLISH_INTERVAL=10, MIN_SIZE=0 -> 320, MIN_ANNOTATIONS=3, ...) unless flags override them. The script
acts as an annotator: one submit every --pace seconds (default 20): image n's ground-truth boxes become
an annotation on task n and the two webhooks LS sends on submit (START_TRAINING, ANNOTATION_CREATED;
captured payloads, ids rewritten) are POSTed. t_submit is taken just before the annotation is stored.

Training runs as a per-project session: one RQ job keeps the model in memory, picks up each submit
within seconds, publishes a version every PUBLISH_INTERVAL seconds while it trained on something new,
and ends (decay tail, final version) once the project is idle. A watcher polls `GET /status` (state; the
running or last session's steps, mode, phase, step_s per mode) and `GET /versions?project=ID` every
--poll seconds, and sends `POST /predict` for the probe task whenever the active version changes. A
version covers submit n when its meta's trained_annotations (its meta.json in MODEL_DIR) include task n;
freshness(n) = the time /predict first served a covering version - t_submit(n). Submits before
MIN_ANNOTATIONS wait for the first version by design ("cold start"): they are left out of the summary's
freshness figures. /predict latency: every --latency-every seconds (0: never) the watcher also sends
/predict for the probe task, tagged with the project state at that moment; these samples are forwards
that take CPU from training (what an annotator opening tasks costs). After the last submit is served,
the script waits for the session to end (state idle, nothing pending) and takes IDLE_SAMPLES more.

    python scripts/bench_freshness.py [--images 12] [--pace 20] [--publish-interval S] [--min-size N] \
        [--latency-every 3] [--poll 0.5] [--timeout 840] [--out freshness.json] [--server-log serve.log]

Prints a per-submit table and a summary with pass/fail against the targets (freshness median <= 20 s and
max <= 40 s for n >= MIN_ANNOTATIONS; first version served <= 20 s after submit MIN_ANNOTATIONS), versions
published, training jobs and sessions, step time per mode (full needs K >= FULL_AFTER or --env
TRAIN_MODE=full) and /predict latency (median, p90; trained versions only) while training vs idle.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import timezone
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.jobs.queue import QUEUE_NAME  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.processes import LivetrainServer  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from tests.fake_label_studio import FakeLabelStudio  # noqa: E402

CAPTURED = ROOT.parent / "shared" / "label-studio" / "captured"
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "bccd"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
{labels}
  </RectangleLabels>
</View>"""
COLORS = ("red", "blue", "green", "orange", "purple")
BASE_VERSION = "livetrain-base"  # what /predict reports before the first version
IDLE_SAMPLES = 10  # /predict latency samples taken after the session ended
log = logging.getLogger("bench_freshness")


def label_config(classes: list[str]) -> str:
    labels = "\n".join(f'    <Label value="{c}" background="{COLORS[i % len(COLORS)]}"/>' for i, c in enumerate(classes))
    return CONFIG.format(labels=labels)


def regions_for(image, classes: list[str]) -> list[dict]:
    """BCCD pixel boxes -> Label Studio rectanglelabels regions in percent of the image."""
    w, h = image.width, image.height
    return [FakeLabelStudio.rect(100 * x1 / w, 100 * y1 / h, 100 * (x2 - x1) / w, 100 * (y2 - y1) / h,
                                 classes[label - 1], ow=w, oh=h)
            for (x1, y1, x2, y2), label in zip(image.boxes, image.labels)]


class Webhooks:
    """The two webhooks Label Studio 1.23.2 sends when an annotation is submitted, from captured payloads."""

    def __init__(self):
        def load(action: str) -> dict:
            return json.loads((CAPTURED / f"POST_webhook_{action}.json").read_text())["json"]

        self.start_training, self.created = load("START_TRAINING"), load("ANNOTATION_CREATED")

    def on_submit(self, project: int, task: dict, annotation: dict) -> list[dict]:
        st = copy.deepcopy(self.start_training)
        st["project"]["id"] = project
        ac = copy.deepcopy(self.created)
        ac["project"]["id"] = project
        ac["annotation"].update(id=annotation["id"], task=task["id"], project=project, result=annotation["result"],
                                created_at=annotation["created_at"], updated_at=annotation["updated_at"])
        ac["annotation"].pop("prediction", None)
        ac["task"].update(id=task["id"], project=project, data=task["data"], is_labeled=True, total_annotations=1)
        return [st, ac]


class Watcher(threading.Thread):
    """Polls /status and /versions; calls /predict on the probe task whenever the active version differs
    from the one /predict last served, and every ``latency_every`` seconds as a latency sample tagged
    with the project state. Records when each version was first served and each session's last status."""

    def __init__(self, url: str, project: int, probe: dict, config: str, model_dir: Path, poll: float,
                 latency_every: float, t0: float):
        super().__init__(daemon=True, name="watcher")
        self.url, self.project, self.probe, self.config = url, project, probe, config
        self.model_dir, self.poll, self.latency_every, self.t0 = model_dir, poll, latency_every, t0
        self.http = requests.Session()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.served_at: dict[str, float] = {}  # version -> wall time /predict first answered with it
        self.meta: dict[str, dict] = {}  # version -> meta (from /versions) + "tasks" (trained task ids)
        self.served = None
        self.status: dict = {}  # the project's last /status
        self.sessions: dict[str, dict] = {}  # session id -> its last seen status (step_s: last non-null per mode)
        self.predicts: list[dict] = []  # every /predict: {"t", "ms", "version", "state", "why"}
        self.errors = 0
        self._last_sample, self._shown = 0.0, None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.tick()
            except (requests.RequestException, ValueError) as exc:
                self.errors += 1
                log.warning("watcher: %s", exc)
            self.stop_event.wait(self.poll)

    def tick(self) -> None:
        status = self.http.get(self.url + "/status", timeout=10).json()["projects"].get(str(self.project), {})
        self._record_status(status)
        versions = self.http.get(self.url + "/versions", params={"project": self.project}, timeout=10).json()
        active = None
        for v in versions["details"].get(str(self.project), []):
            if v["name"] not in self.meta:
                self._record_meta(v)
            if v["active"]:
                active = v["name"]
        state = status.get("state")
        if self.served is None or (active is not None and active != self.served):
            self.predict(state, "new version")
        elif self.latency_every > 0 and time.time() - self._last_sample >= self.latency_every:
            self._last_sample = time.time()
            self.predict(state, "sample")

    def predict(self, state: str | None, why: str) -> None:
        body = {"tasks": [self.probe], "project": f"{self.project}.{int(self.t0)}", "label_config": self.config}
        start = time.perf_counter()
        reply = self.http.post(self.url + "/predict", json=body, timeout=120)
        now, ms = time.time(), 1000 * (time.perf_counter() - start)
        reply.raise_for_status()
        version = reply.json()["results"][0]["model_version"]
        with self.lock:
            if version not in self.served_at:
                self.served_at[version] = now
                log.info("+%6.1f s  /predict serves %s (%.0f ms)", now - self.t0, version, ms)
            self.served = version
            self.predicts.append({"t": now, "ms": ms, "version": version, "state": state, "why": why})

    def _record_meta(self, v: dict) -> None:
        meta = {k: val for k, val in v.items() if k != "trained_annotations"}
        try:  # which tasks it trained on, and at what size: the version's own meta.json
            disk = json.loads((self.model_dir / str(self.project) / "versions" / v["name"] / "meta.json").read_text())
            meta["tasks"] = sorted(int(t) for t in disk.get("trained_annotations", {}))
            meta["trained_min_size"] = (disk.get("settings") or {}).get("min_size")
        except (OSError, ValueError):
            trained = v.get("trained_annotations")
            meta["tasks"] = sorted(int(t) for t in trained) if isinstance(trained, dict) else None
        with self.lock:
            self.meta[v["name"]] = meta
        log.info("+%6.1f s  published %s: %s images (%s new), %s, %s steps", (v.get("published_at") or 0) - self.t0,
                 v["name"], v.get("images"), v.get("new_images"), v.get("mode"), v.get("steps"))

    def _record_status(self, status: dict) -> None:
        for s in (status.get("session"), status.get("last_session")):
            if not isinstance(s, dict) or s.get("id") is None:
                continue
            with self.lock:
                known = self.sessions.get(str(s["id"]), {})
                step_s = {**(known.get("step_s") or {}), **{m: x for m, x in (s.get("step_s") or {}).items() if x is not None}}
                self.sessions[str(s["id"])] = {**s, "step_s": step_s}
            if s.get("ended_at") and not known.get("ended_at"):
                log.info("+%6.1f s  session %s ended (%s): %s steps, %s versions, step_s %s", time.time() - self.t0,
                         s["id"], s.get("end_reason"), s.get("steps"), s.get("versions"), step_s)
        session = status.get("session") or {}
        shown = (status.get("state"), session.get("id"), session.get("mode"), session.get("phase"), status.get("waiting"))
        if shown != self._shown and status:
            log.info("+%6.1f s  project state %s%s%s", time.time() - self.t0, shown[0],
                     f" (session {shown[1]}: {shown[2]}, {shown[3]})" if session else "", f" ({shown[4]})" if shown[4] else "")
            self._shown = shown
        with self.lock:
            self.status = status

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=150)
        self.http.close()


def covers(meta: dict, task_id: int, n: int) -> bool:
    if meta.get("tasks") is not None:
        return task_id in meta["tasks"]
    return (meta.get("images") or 0) >= n  # fallback: submits are the only labeled tasks, in order


def rq_jobs(server: LivetrainServer) -> list[dict]:
    """Every training job the worker ran (finished or failed), oldest first."""
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    def ts(value):  # RQ's naive datetimes are UTC
        return None if value is None else (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()

    conn = server.redis()
    try:
        ids = []
        for registry in (FinishedJobRegistry, FailedJobRegistry, StartedJobRegistry):
            ids += registry(QUEUE_NAME, connection=conn).get_job_ids()
        jobs = []
        for job in Job.fetch_many(ids, connection=conn):
            if job is None:
                continue
            try:
                result = job.return_value()
            except Exception:  # noqa: BLE001 - best effort
                result = None
            status = job.get_status(refresh=False)
            jobs.append({"id": job.id, "status": status.value if status else None,
                         "enqueued_at": ts(job.enqueued_at), "started_at": ts(job.started_at),
                         "ended_at": ts(job.ended_at), "result": result})
    finally:
        conn.close()
    return sorted(jobs, key=lambda j: j["started_at"] or 0)


def p90(xs: list[float]) -> float | None:
    """Nearest-rank 90th percentile."""
    return sorted(xs)[max(0, math.ceil(0.9 * len(xs)) - 1)] if xs else None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 1, missing: str = "n/a") -> str:
    return missing if x is None else f"{x:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="BCCD in COCO format (annotations.json, images/)")
    parser.add_argument("--images", "-k", type=int, default=12, help="K: annotations to submit (train-split images)")
    parser.add_argument("--pace", type=float, default=20.0, help="seconds between submits")
    parser.add_argument("--publish-interval", type=float, help="PUBLISH_INTERVAL in seconds (default: livetrain's)")
    parser.add_argument("--min-size", type=int, help="MIN_SIZE (default: livetrain's)")
    parser.add_argument("--min-annotations", type=int, help="MIN_ANNOTATIONS (default: livetrain's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="any other livetrain setting for the server, e.g. --env TRAIN_MODE=full (repeatable)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between /status + /versions polls")
    parser.add_argument("--latency-every", type=float, default=3.0,
                        help="seconds between /predict latency samples on the probe task (0: none)")
    parser.add_argument("--timeout", type=float, default=840.0,
                        help="stop waiting (for versions, the session's end, idle samples) this many seconds after the start")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", help="copy livetrain serve's log (web + worker) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    env_extra = {}
    for name, value in (("PUBLISH_INTERVAL", args.publish_interval), ("MIN_SIZE", args.min_size),
                        ("MIN_ANNOTATIONS", args.min_annotations)):
        if value is not None:
            env_extra[name] = str(value)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
        env_extra[name] = value
    settings = Settings.from_env({**os.environ, **env_extra})  # what the server will run with
    min_annotations = settings.min_annotations

    classes, images = load_coco(args.data)
    train = [im for im in images if im.split == "train"][: args.images]
    probe_image = next(im for im in images if im.split == "test")
    if len(train) < args.images:
        parser.error(f"only {len(train)} train-split images in {args.data}")
    config = label_config(classes)

    fake = FakeLabelStudio()
    project = fake.add_project(config, title="BCCD freshness")
    tasks = [fake.add_task(project, im.path.read_bytes(), name=im.path.name) for im in train]
    probe_id = fake.add_task(project, probe_image.path.read_bytes(), name=probe_image.path.name)
    probe = {"id": probe_id, "data": dict(fake.tasks[probe_id]["data"])}
    hooks = Webhooks()

    tmp = Path(tempfile.mkdtemp(prefix="bench_freshness-"))
    model_dir = tmp / "models"
    server = LivetrainServer(model_dir, env={"LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": fake.token, **env_extra},
                             log_path=tmp / "serve.log", cwd=ROOT)
    watcher = None
    submits = []
    t_session_over = None
    try:
        health = server.wait_ready(timeout=240)
        log.info("livetrain serve up at %s: model %s, weights %s; LS double at %s, project %d, %d tasks + probe task %d",
                 server.url, health["model_class"], health["weights_source"], fake.url, project, len(tasks), probe_id)
        http = requests.Session()
        t0 = time.time()
        watcher = Watcher(server.url, project, probe, config, model_dir, args.poll, args.latency_every, t0)
        watcher.start()
        deadline = t0 + args.timeout
        for n, (task_id, image) in enumerate(zip(tasks, train), start=1):
            due = t0 + (n - 1) * args.pace
            time.sleep(max(0.0, min(due, deadline) - time.time()))
            if time.time() >= deadline:
                log.warning("timeout before submit %d", n)
                break
            t_submit = time.time()
            annotation_id = fake.annotate(task_id, regions_for(image, classes))
            hook_ms = []
            for body in hooks.on_submit(project, fake.tasks[task_id], fake.annotations[annotation_id]):
                start = time.perf_counter()
                http.post(server.url + "/webhook", json=body, timeout=10).raise_for_status()
                hook_ms.append(1000 * (time.perf_counter() - start))
            submits.append({"n": n, "task": task_id, "image": image.path.name, "boxes": len(image.boxes),
                            "t_submit": t_submit, "webhook_ms": hook_ms})
            log.info("+%6.1f s  submit %d: task %d (%s, %d boxes), webhooks %s ms", t_submit - t0, n, task_id,
                     image.path.name, len(image.boxes), "/".join(f"{m:.0f}" for m in hook_ms))
        http.close()

        def all_served() -> bool:
            with watcher.lock:
                served = [(v, watcher.meta.get(v)) for v in watcher.served_at]
            return all(any(m and covers(m, s["task"], s["n"]) for _, m in served) for s in submits)

        def session_over() -> bool:  # "idle" also means nothing pending (pending reads "queued")
            with watcher.lock:
                return watcher.status.get("state") in ("idle", "error") and bool(watcher.sessions)

        def idle_samples() -> int:
            with watcher.lock:
                return sum(1 for p in watcher.predicts if p["why"] == "sample" and p["t"] >= t_session_over
                           and p["state"] == "idle" and p["version"] != BASE_VERSION)

        def wait(done, what: str) -> bool:
            while not done() and time.time() < deadline and server.proc.poll() is None:
                time.sleep(0.5)
            if not done():
                log.warning("gave up waiting for %s (timeout %.0f s after the start)", what, args.timeout)
            return done()

        wait(all_served, "every submit to be served")
        if wait(session_over, "the training session to end"):
            t_session_over = time.time()
            log.info("+%6.1f s  session over (state %s)", t_session_over - t0, watcher.status.get("state"))
            if args.latency_every > 0:
                wait(lambda: idle_samples() >= IDLE_SAMPLES, f"{IDLE_SAMPLES} idle /predict samples")
        watcher.stop()
        jobs = rq_jobs(server)
    except BaseException:
        print((tmp / "serve.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        if watcher is not None and watcher.is_alive():
            watcher.stop()
        server.stop()
        fake.close()
        if args.server_log:
            shutil.copyfile(tmp / "serve.log", args.server_log)
        shutil.rmtree(tmp, ignore_errors=True)
    t_end = time.time()

    # -- per submit ------------------------------------------------------------------------------
    published = sorted(watcher.meta.values(), key=lambda m: m.get("published_at") or 0)
    for s in submits:
        s.update(version=None, t_served=None, freshness_s=None, versions_waited=None, images=None,
                 publish_s=None, publish_to_served_s=None)
        for version, t_served in sorted(watcher.served_at.items(), key=lambda kv: kv[1]):
            meta = watcher.meta.get(version)
            if meta and covers(meta, s["task"], s["n"]) and t_served >= s["t_submit"]:
                t_pub = meta.get("published_at") or t_served
                s.update(version=version, t_served=t_served, freshness_s=t_served - s["t_submit"],
                         images=meta.get("images"), publish_s=t_pub - s["t_submit"], publish_to_served_s=t_served - t_pub,
                         versions_waited=sum(1 for m in published if s["t_submit"] < (m.get("published_at") or 0) <= t_pub))
                break
        s["cold_start"] = s["n"] < min_annotations

    print()
    print("versions: published after the submit, up to the one that first served it; published_s: submit -> it was published")
    print(f"{'n':>3} {'task':>5} {'boxes':>5} {'submit_s':>8} {'served by':<24} {'images':>6} {'versions':>8} "
          f"{'published_s':>11} {'freshness_s':>11}")
    for s in submits:
        print(f"{s['n']:>3} {s['task']:>5} {s['boxes']:>5} {s['t_submit'] - t0:>8.1f} {s['version'] or '-':<24} "
              f"{fmt(s['images'], 0, '-'):>6} {fmt(s['versions_waited'], 0, '-'):>8} {fmt(s['publish_s'], 1, '-'):>11} "
              f"{fmt(s['freshness_s'], 1, 'not served'):>11}{'  (cold start)' if s['cold_start'] else ''}")

    # -- summary ---------------------------------------------------------------------------------
    warm = [s["freshness_s"] for s in submits if not s["cold_start"] and s["freshness_s"] is not None]
    cold = [s["freshness_s"] for s in submits if s["cold_start"] and s["freshness_s"] is not None]
    unserved = [s["n"] for s in submits if s["freshness_s"] is None]
    trained_jobs = [j for j in jobs if isinstance(j["result"], dict) and j["result"].get("steps")]
    lags = [s["publish_to_served_s"] for s in submits if s["publish_to_served_s"] is not None]
    trained_served = [t for v, t in watcher.served_at.items() if v != BASE_VERSION]
    first_after = (min(trained_served) - submits[min_annotations - 1]["t_submit"]
                   if trained_served and len(submits) >= min_annotations else None)

    sessions = sorted(watcher.sessions.values(), key=lambda s: s.get("started_at") or 0)  # last seen status of each
    step_s = {}
    for mode in ("heads", "full"):  # steps-weighted mean over the sessions (weight: the session's steps, all modes)
        rows = [(s["step_s"][mode], max(s.get("steps") or 0, 1)) for s in sessions if s["step_s"].get(mode) is not None]
        step_s[mode] = sum(x * w for x, w in rows) / sum(w for _, w in rows) if rows else None

    samples = [p for p in watcher.predicts if p["why"] == "sample" and p["version"] != BASE_VERSION]
    busy = [p["ms"] for p in samples if p["state"] == "training"]
    idle = [p["ms"] for p in samples if p["state"] == "idle"]
    ratio = median(busy) / median(idle) if busy and idle else None

    targets = {"freshness_median_le_20s": bool(warm) and median(warm) <= 20.0,
               "freshness_max_le_40s": bool(warm) and max(warm) <= 40.0,
               "first_version_le_20s_after_third_submit": first_after is not None and first_after <= 20.0}
    sizes = sorted({m["trained_min_size"] for m in published if m.get("trained_min_size")})
    summary = {
        "model": health["model_class"], "weights": health["weights_source"], "cpus": os.cpu_count(),
        "submits": len(submits), "pace_s": args.pace, "min_annotations": min_annotations,
        "publish_interval_s": settings.publish_interval, "idle_after_s": settings.idle_after,
        "train_mode": settings.train_mode, "full_after": settings.full_after, "batch_size": settings.batch_size,
        "min_size": settings.min_size, "trained_min_size": sizes,
        "freshness_median_s": median(warm), "freshness_max_s": max(warm) if warm else None,
        "freshness_cold_start_s": cold, "not_served": unserved,
        "first_version_after_third_submit_s": first_after,
        "publish_to_served_median_s": median(lags),
        "versions_published": len(published),
        "jobs_run": len(jobs), "jobs_that_trained": len(trained_jobs), "sessions": sessions,
        "step_s_heads": step_s["heads"], "step_s_full": step_s["full"],
        "predict_ms_training_median": median(busy), "predict_ms_training_p90": p90(busy), "predict_samples_training": len(busy),
        "predict_ms_idle_median": median(idle), "predict_ms_idle_p90": p90(idle), "predict_samples_idle": len(idle),
        "predict_training_idle_ratio": ratio,
        "targets": targets, "passed": all(targets.values()) and not unserved,
        "watcher_errors": watcher.errors, "total_s": t_end - t0,
    }
    print()
    print(f"model {summary['model']} ({summary['weights']}), PUBLISH_INTERVAL={settings.publish_interval:g} s, "
          f"MIN_SIZE={settings.min_size} (trained at {'/'.join(map(str, sizes)) or '?'}), MIN_ANNOTATIONS={min_annotations}, "
          f"TRAIN_MODE={settings.train_mode}, {len(submits)} submits every {args.pace:g} s, {summary['cpus']} CPUs")
    print(f"freshness (submit -> /predict serves a version trained on it), n >= {min_annotations}: "
          f"median {fmt(median(warm))} s, max {fmt(summary['freshness_max_s'])} s over {len(warm)} submits"
          + (f"; cold start (n < {min_annotations}): {', '.join(f'{c:.1f}' for c in cold)} s" if cold else "")
          + (f"; NOT served: n = {unserved}" if unserved else ""))
    print(f"first version served {fmt(first_after)} s after submit {min_annotations}; publish -> served by /predict: "
          f"median {fmt(median(lags))} s")
    running = sum(1 for j in jobs if j["status"] == "started")
    print(f"versions published {len(published)}, training jobs run {len(jobs)} ({len(trained_jobs)} trained, {running} still "
          f"running, the rest below MIN_ANNOTATIONS or unchanged), sessions {len(sessions)}:")
    for s in sessions:
        span = (s.get("ended_at") or t_end) - (s.get("started_at") or t0)
        print(f"  session {s.get('id')}: {s.get('steps')} steps in {span:.0f} s, {s.get('images')} images, "
              f"{s.get('versions')} versions, step_s heads {fmt(s['step_s'].get('heads'), 2)} / full "
              f"{fmt(s['step_s'].get('full'), 2)}, ended: {s.get('end_reason') or 'no'}")
    print(f"step time in s (steps-weighted over sessions, batch {settings.batch_size}): heads {fmt(step_s['heads'], 2)}, "
          f"full {fmt(step_s['full'], 2)}")
    print(f"/predict on the probe task: while training median {fmt(median(busy), 0)} ms, p90 {fmt(p90(busy), 0)} ms "
          f"({len(busy)} samples); idle median {fmt(median(idle), 0)} ms, p90 {fmt(p90(idle), 0)} ms ({len(idle)}); "
          f"ratio {fmt(ratio, 2)}")
    print("targets: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in targets.items())
          + f"; total run {t_end - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "submits": submits, "versions": published,
                                              "served_at": watcher.served_at, "jobs": jobs, "predicts": watcher.predicts,
                                              "t0": t0}, indent=1, default=str))
    return 0 if not unserved else 1


if __name__ == "__main__":
    sys.exit(main())
