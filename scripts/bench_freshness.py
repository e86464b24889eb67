"""Model freshness while people annotate: the time from submitting the Nth annotation in Label Studio
until `/predict` serves a model version that was trained on it, on CPU, with the default model
(MODEL_ARCH=auto, which offline is Faster R-CNN Lite0 with the ImageNet backbone).

Setup: a Label Studio double (tests/fake_label_studio.py, LS 1.23.2's API shapes, on 127.0.0.1) with
one project using BCCD's RectangleLabels config (WBC, RBC, Platelets), the first --images (K, default
12) train-split BCCD images as tasks, plus one test-split image as an unlabeled "probe" task. Then
`livetrain serve` (gunicorn + RQ worker + embedded Redis, temporary MODEL_DIR, DOWNLOAD_WEIGHTS=false)
is started against it with LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY and otherwise default settings
(TRAIN_STEPS=60, MIN_SIZE=0 -> 320, MIN_ANNOTATIONS=3, ...) unless flags override them.

The script then acts as an annotator: for n = 1..K, one submit every --pace seconds (default 20): the
ground-truth boxes of image n become an annotation on task n (BCCD pixels -> LS percent regions), and
the two webhooks Label Studio sends on submit are POSTed (START_TRAINING, then ANNOTATION_CREATED with
the task), using the captured LS payloads with ids rewritten. t_submit is taken just before the
annotation is stored. Rounds coalesce, so one version may cover several submits.

A watcher polls `GET /status` and `GET /versions?project=ID` every --poll seconds (cheap), and
`POST /predict` for the probe task whenever the active version differs from what /predict last served
(each /predict is a forward pass, which would steal CPU from training if sent all the time). A
version covers submit n when its meta's trained annotations (the version's meta.json in MODEL_DIR;
`images` from /versions as a cross-check) include task n; freshness(n) = the time /predict first
served a covering version - t_submit(n). Submits before MIN_ANNOTATIONS wait for the first round by
design ("cold start") and are left out of the summary's freshness figures (they stay in the table).

    python scripts/bench_freshness.py [--images 12] [--pace 20] [--train-steps N] [--min-size N] \
        [--poll 0.5] [--timeout 840] [--out freshness.json] [--server-log serve.log]

Prints a per-submit table (freshness, the serving version, its round duration_s, how many versions
were published between the submit and the serving one) and a summary: median/max freshness, median
round time, versions published and training jobs run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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
    from the one /predict last served. Records when each version was first served."""

    def __init__(self, url: str, project: int, probe: dict, config: str, model_dir: Path, poll: float, t0: float):
        super().__init__(daemon=True, name="watcher")
        self.url, self.project, self.probe, self.config = url, project, probe, config
        self.model_dir, self.poll, self.t0 = model_dir, poll, t0
        self.session = requests.Session()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.served_at: dict[str, float] = {}  # version -> wall time /predict first answered with it
        self.meta: dict[str, dict] = {}  # version -> meta (from /versions) + "tasks" (trained task ids, from disk)
        self.served = None
        self.predict_ms: list[float] = []
        self.errors = 0
        self._last_state = None
        self.trainings: list[dict] = []  # per round seen training: {"t_start", "progress": [(t, step)]}

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.tick()
            except (requests.RequestException, ValueError) as exc:
                self.errors += 1
                log.warning("watcher: %s", exc)
            self.stop_event.wait(self.poll)

    def tick(self) -> None:
        status = self.session.get(self.url + "/status", timeout=10).json()["projects"].get(str(self.project), {})
        self._log_state(status)
        versions = self.session.get(self.url + "/versions", params={"project": self.project}, timeout=10).json()
        active = None
        for v in versions["details"].get(str(self.project), []):
            if v["name"] not in self.meta:
                self._record_meta(v)
            if v["active"]:
                active = v["name"]
        if self.served is None or (active is not None and active != self.served):
            self.predict()

    def predict(self) -> None:
        body = {"tasks": [self.probe], "project": f"{self.project}.{int(self.t0)}", "label_config": self.config}
        start = time.perf_counter()
        reply = self.session.post(self.url + "/predict", json=body, timeout=120)
        now = time.time()
        reply.raise_for_status()
        version = reply.json()["results"][0]["model_version"]
        with self.lock:
            if version not in self.served_at:
                self.served_at[version] = now
                log.info("+%6.1f s  /predict serves %s", now - self.t0, version)
            self.served = version
            if version != "livetrain-base":
                self.predict_ms.append(1000 * (time.perf_counter() - start))

    def _record_meta(self, v: dict) -> None:
        meta = dict(v)
        try:  # which tasks it trained on: the version's own meta.json (the API reports only counts)
            disk = json.loads((self.model_dir / str(self.project) / "versions" / v["name"] / "meta.json").read_text())
            meta["tasks"] = sorted(int(t) for t in disk.get("trained_annotations", {}))
            meta["trained_min_size"] = (disk.get("settings") or {}).get("min_size")
        except (OSError, ValueError):
            meta["tasks"] = None
        with self.lock:
            self.meta[v["name"]] = meta
        log.info("+%6.1f s  published %s: %s images (%s new), round %.1f s", (v.get("published_at") or 0) - self.t0,
                 v["name"], v.get("images"), v.get("new_images"), v.get("duration_s") or float("nan"))

    def _log_state(self, status: dict) -> None:
        state = status.get("state")
        now = time.time()
        if state == "training":
            if self._last_state != "training":
                self.trainings.append({"t_start": now, "progress": []})
            step = (status.get("progress") or {}).get("step")
            samples = self.trainings[-1]["progress"]
            if step and (not samples or samples[-1][1] != step):
                samples.append((now, step))
        if state != self._last_state:
            log.info("+%6.1f s  project state %s%s", time.time() - self.t0, state,
                     f" ({status['waiting']})" if status.get("waiting") else "")
            self._last_state = state

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=150)
        self.session.close()


def covers(meta: dict, task_id: int, n: int) -> bool:
    if meta.get("tasks") is not None:
        return task_id in meta["tasks"]
    return (meta.get("images") or 0) >= n  # fallback: submits are the only labeled tasks, in order


def rq_jobs(server: LivetrainServer) -> list[dict]:
    """Every training job the worker ran (finished or failed), oldest first."""
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    def ts(value):
        if value is None:
            return None
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()

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
            jobs.append({"id": job.id, "status": job.get_status(refresh=False).value if job.get_status(refresh=False) else None,
                         "enqueued_at": ts(job.enqueued_at), "started_at": ts(job.started_at),
                         "ended_at": ts(job.ended_at), "result": result})
    finally:
        conn.close()
    return sorted(jobs, key=lambda j: j["started_at"] or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="BCCD in COCO format (annotations.json, images/)")
    parser.add_argument("--images", "-k", type=int, default=12, help="K: annotations to submit (train-split images)")
    parser.add_argument("--pace", type=float, default=20.0, help="seconds between submits")
    parser.add_argument("--train-steps", type=int, help="TRAIN_STEPS (default: livetrain's)")
    parser.add_argument("--min-size", type=int, help="MIN_SIZE (default: livetrain's)")
    parser.add_argument("--min-annotations", type=int, help="MIN_ANNOTATIONS (default: livetrain's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="any other livetrain setting for the server, e.g. --env TRAIN_MODE=heads (repeatable)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between /status + /versions polls")
    parser.add_argument("--timeout", type=float, default=840.0,
                        help="stop waiting for versions this many seconds after the start, whatever is left")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", help="copy livetrain serve's log (web + worker) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    env_extra = {}
    for name, value in (("TRAIN_STEPS", args.train_steps), ("MIN_SIZE", args.min_size),
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
    try:
        health = server.wait_ready(timeout=240)
        log.info("livetrain serve up at %s: model %s, weights %s; LS double at %s, project %d, %d tasks + probe task %d",
                 server.url, health["model_class"], health["weights_source"], fake.url, project, len(tasks), probe_id)
        session = requests.Session()
        t0 = time.time()
        watcher = Watcher(server.url, project, probe, config, model_dir, args.poll, t0)
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
                session.post(server.url + "/webhook", json=body, timeout=10).raise_for_status()
                hook_ms.append(1000 * (time.perf_counter() - start))
            submits.append({"n": n, "task": task_id, "image": image.path.name, "boxes": len(image.boxes),
                            "t_submit": t_submit, "webhook_ms": hook_ms})
            log.info("+%6.1f s  submit %d: task %d (%s, %d boxes), webhooks %s ms", t_submit - t0, n, task_id,
                     image.path.name, len(image.boxes), "/".join(f"{m:.0f}" for m in hook_ms))
        session.close()

        def all_served() -> bool:
            with watcher.lock:
                served = [(v, watcher.meta.get(v)) for v in watcher.served_at]
            return all(any(m and covers(m, s["task"], s["n"]) for _, m in served) for s in submits)

        while not all_served() and time.time() < deadline and server.proc.poll() is None:
            time.sleep(0.5)
        if not all_served():
            log.warning("not every submit was served before the timeout (%.0f s)", args.timeout)
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

    # -- results ---------------------------------------------------------------------------------
    published = sorted(watcher.meta.values(), key=lambda m: m.get("published_at") or 0)
    for s in submits:
        s.update(version=None, t_served=None, freshness_s=None, round_s=None, rounds_waited=None, images=None)
        for version, t_served in sorted(watcher.served_at.items(), key=lambda kv: kv[1]):
            meta = watcher.meta.get(version)
            if meta and covers(meta, s["task"], s["n"]) and t_served >= s["t_submit"]:
                s.update(version=version, t_served=t_served, freshness_s=t_served - s["t_submit"],
                         round_s=meta.get("duration_s"), images=meta.get("images"),
                         publish_to_served_s=t_served - (meta.get("published_at") or t_served),
                         rounds_waited=sum(1 for m in published
                                           if s["t_submit"] < (m.get("published_at") or 0) <= meta.get("published_at", 0)))
                break
        s["cold_start"] = s["n"] < min_annotations

    print()
    print("rounds = versions published after the submit, up to and including the one that first served it")
    print(f"{'n':>3} {'task':>5} {'boxes':>5} {'submit_s':>8} {'served by':<24} {'images':>6} {'rounds':>6} "
          f"{'round_s':>7} {'freshness_s':>11}")
    for s in submits:
        fresh = f"{s['freshness_s']:.1f}" if s["freshness_s"] is not None else "not served"
        print(f"{s['n']:>3} {s['task']:>5} {s['boxes']:>5} {s['t_submit'] - t0:>8.1f} {s['version'] or '-':<24} "
              f"{s['images'] if s['images'] is not None else '-':>6} {s['rounds_waited'] if s['rounds_waited'] is not None else '-':>6} "
              f"{s['round_s'] if s['round_s'] is not None else '-':>7} {fresh:>11}{'  (cold start)' if s['cold_start'] else ''}")

    warm = [s["freshness_s"] for s in submits if not s["cold_start"] and s["freshness_s"] is not None]
    cold = [s["freshness_s"] for s in submits if s["cold_start"] and s["freshness_s"] is not None]
    unserved = [s["n"] for s in submits if s["freshness_s"] is None]
    rounds = [m["duration_s"] for m in published if m.get("duration_s") is not None]
    lags = [s["publish_to_served_s"] for s in submits if s.get("publish_to_served_s") is not None]
    trained_jobs = [j for j in jobs if isinstance(j["result"], dict) and j["result"].get("published")]
    step_s, setup_s = [], []  # from /status progress samples (every 5 steps), per round seen training
    for r in watcher.trainings:
        p = r["progress"]
        if len(p) >= 2 and p[-1][1] > p[0][1]:
            per_step = (p[-1][0] - p[0][0]) / (p[-1][1] - p[0][1])
            step_s.append(per_step)
            setup_s.append(max(0.0, p[0][0] - r["t_start"] - per_step * p[0][1]))
    def fmt(xs, f, digits=1):
        return f"{f(xs):.{digits}f}" if xs else "n/a"

    sizes = sorted({m["trained_min_size"] for m in published if m.get("trained_min_size")})
    summary = {
        "trained_min_size": sizes,
        "submits": len(submits), "pace_s": args.pace, "min_annotations": min_annotations,
        "train_steps": settings.train_steps, "min_size": settings.min_size, "model": health["model_class"],
        "weights": health["weights_source"], "cpus": os.cpu_count(),
        "freshness_median_s": statistics.median(warm) if warm else None, "freshness_max_s": max(warm) if warm else None,
        "freshness_cold_start_s": cold, "not_served": unserved,
        "round_median_s": statistics.median(rounds) if rounds else None, "versions_published": len(published),
        "jobs_run": len(jobs), "jobs_that_trained": len(trained_jobs),
        "publish_to_served_median_s": statistics.median(lags) if lags else None,
        "probe_predict_ms_median": statistics.median(watcher.predict_ms) if watcher.predict_ms else None,
        "step_median_s": statistics.median(step_s) if step_s else None,
        "round_setup_median_s": statistics.median(setup_s) if setup_s else None,
        "total_s": t_end - t0,
    }
    print()
    print(f"model {summary['model']} ({summary['weights']}), TRAIN_STEPS={summary['train_steps']}, "
          f"MIN_SIZE={summary['min_size']} (trained at {'/'.join(map(str, sizes)) or '?'}), MIN_ANNOTATIONS={min_annotations}, {len(submits)} submits every "
          f"{args.pace:g} s, {summary['cpus']} CPUs")
    print(f"freshness (submit -> /predict serves a version trained on it), n >= {min_annotations}: "
          f"median {fmt(warm, statistics.median)} s, max {fmt(warm, max)} s over {len(warm)} submits"
          + (f"; cold start (n < {min_annotations}): {', '.join(f'{c:.1f}' for c in cold)} s" if cold else "")
          + (f"; NOT served: n = {unserved}" if unserved else ""))
    print(f"rounds: median duration {fmt(rounds, statistics.median)} s, versions published {len(published)}, "
          f"training jobs run {len(jobs)} ({len(trained_jobs)} trained, the rest below MIN_ANNOTATIONS or unchanged)")
    print(f"training steps (from /status progress): median {fmt(step_s, statistics.median, 2)} s/step at batch "
          f"{settings.batch_size}; time in 'training' before the first step (quality check, model build): median "
          f"{fmt(setup_s, statistics.median)} s")
    print(f"publish -> served by /predict: median {fmt(lags, statistics.median)} s; probe /predict median "
          f"{fmt(watcher.predict_ms, statistics.median)} ms; total run {t_end - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "submits": submits, "versions": published,
                                              "served_at": watcher.served_at, "jobs": jobs,
                                              "trainings": watcher.trainings, "t0": t0}, indent=1))
    return 0 if not unserved else 1


if __name__ == "__main__":
    sys.exit(main())
