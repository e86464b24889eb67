"""``GET /metrics``: Prometheus text format.

Two sources, merged into one exposition:

* What happens in the web processes (HTTP requests and latency, predictions served, webhook events, image
  failures during /predict) is counted with prometheus_client. Under ``livetrain serve`` with several
  gunicorn workers every worker counts in files under PROMETHEUS_MULTIPROC_DIR (set by ``serve`` before any
  worker starts) and a scrape sums the files of all of them, whichever worker answers. Without that variable
  (one process, tests) the metrics live in this process.
* What the workers do (training steps, versions, sessions, their image failures; ``backend/jobs/counters.py``)
  is counted in Redis, because workers may run on other machines; ``LivetrainCollector`` reads those counters
  and the live state (queue depths, active versions, quality, validation mAP, re-scoring progress) from Redis
  and MODEL_DIR at scrape time. Redis down: the web metrics still answer, with ``livetrain_redis_up 0``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from backend.jobs import counters
from backend.jobs.connection import redis_url_for
from backend.jobs.queue import job_queue, rescore_queue
from backend.jobs.state import ProjectState, known_projects, version_number
from backend.model_store.stores import list_projects, version_store
from backend.settings import Settings

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# /predict on a CPU takes seconds for a batch: the default buckets stop at 10 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
# Webhooks may come without credentials (auth.py), so their action is bounded to known names: a forged
# payload must not create a series per made-up action.
WEBHOOK_ACTIONS = {"START_TRAINING", "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                   "ANNOTATIONS_DELETED", "TASKS_DELETED", "PROJECT_UPDATED", "PROJECT_CREATED", "PROJECT_DELETED",
                   "TASKS_CREATED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED"}


class WebMetrics:
    """The prometheus_client metrics of the web processes. Created once per process, on first use, with no
    registry: /metrics collects them itself (or, in multiprocess mode, their files)."""

    def __init__(self):
        # No *_created series: multiprocess mode has none, and both modes should export the same names.
        disable_created_metrics()
        self.requests = Counter("livetrain_http_requests", "HTTP requests answered, by Flask route, method and status.",
                                ("route", "method", "status"), registry=None)
        self.latency = Histogram("livetrain_http_request_duration_seconds", "Time to answer an HTTP request.",
                                 ("route", "method", "status"), buckets=LATENCY_BUCKETS, registry=None)
        self.predictions = Counter("livetrain_predictions", "Predictions served by /predict (one per task).",
                                   ("project",), registry=None)
        self.webhooks = Counter("livetrain_webhook_events", "Webhook events received, by action (unknown ones: other).",
                                ("action",), registry=None)
        self.fetch_failures = Counter("livetrain_image_fetch_failures",
                                      "Images that could not be fetched or decoded, by reason and where.",
                                      ("reason", "where"), registry=None)

    def all(self):
        return (self.requests, self.latency, self.predictions, self.webhooks, self.fetch_failures)


_web: WebMetrics | None = None
_web_lock = threading.Lock()


def web() -> WebMetrics:
    global _web
    with _web_lock:
        if _web is None:
            _web = WebMetrics()
        return _web


# -- called by the routes --------------------------------------------------------------------------
def count_predictions(project: str, results: list) -> None:
    web().predictions.labels(project=str(project)).inc(len(results))


def count_webhook(action: str) -> None:
    web().webhooks.labels(action=action if action in WEBHOOK_ACTIONS else "other").inc()


def _count_fetch_failure(exc) -> None:
    web().fetch_failures.labels(reason=counters.failure_reason(getattr(exc, "message", exc)), where="predict").inc()


# -- wiring ------------------------------------------------------------------------------------------
def init_app(app: Flask) -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:  # a missing directory would make every counted request fail
        os.makedirs(directory, exist_ok=True)
    web()
    app.extensions["livetrain"].fetcher.on_failure = _count_fetch_failure
    # First, before auth: a refused request (401) is timed and counted too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_count_request)
    app.register_blueprint(bp)


def _start_timer():
    g.metrics_started = time.perf_counter()


def _count_request(response):
    try:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in METHODS else "other"
        labels = dict(route=route, method=method, status=str(response.status_code))
        metrics = web()
        metrics.requests.labels(**labels).inc()
        started = g.get("metrics_started")
        if started is not None:
            metrics.latency.labels(**labels).observe(time.perf_counter() - started)
    except Exception:  # metrics must never change an answer
        log.exception("could not count the request")
    return response


@bp.get("/metrics")
def metrics():
    state = current_app.extensions["livetrain"]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([_web_families(), LivetrainCollector(state.settings, _scrape_redis()).collect()]))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _scrape_redis() -> redis.Redis:
    """A client of its own for scrapes: short timeouts and no retries, so a scrape with Redis down answers
    at once instead of after redis-py's reconnect attempts."""
    extensions = current_app.extensions
    if "livetrain_metrics_redis" not in extensions:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        url = redis_url_for(extensions["livetrain"].settings)
        extensions["livetrain_metrics_redis"] = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    return extensions["livetrain_metrics_redis"]


def _web_families():
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:  # every worker's files, summed
        yield from MultiProcessCollector(None, path=directory).collect()
    else:
        for metric in web().all():
            yield from metric.collect()


class _Merged:
    """One collector over metric families from several sources; families of the same name (the image
    failures of /predict and of the workers) become one, as the text format allows each name once."""

    def __init__(self, sources):
        self.sources = sources

    def collect(self):
        merged = {}
        for source in self.sources:
            for family in source:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        return list(merged.values())


class LivetrainCollector:
    """Worker counters and live state from Redis and MODEL_DIR, read at scrape time."""

    def __init__(self, settings: Settings, connection: redis.Redis):
        self.settings, self.r = settings, connection

    def describe(self):
        return []  # nothing is read when a registry registers it

    def collect(self):
        up = GaugeMetricFamily("livetrain_redis_up", "1 when this scrape could read Redis, else 0.")
        try:
            families = list(self._from_redis())
            up.add_metric([], 1)
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: Redis is unavailable (%s); exporting the web metrics only", exc)
            families = []
            up.add_metric([], 0)
        yield up
        yield from families
        yield from self._from_model_dir()  # no Redis needed: the versions are files

    def _from_redis(self):
        queue = GaugeMetricFamily("livetrain_queue_depth", "Jobs waiting in a queue.", labels=["queue"])
        queue.add_metric(["training"], job_queue(self.r).count)
        queue.add_metric(["rescore"], rescore_queue(self.r).count)
        yield queue
        counts = counters.read(self.r)
        steps = CounterMetricFamily("livetrain_training_steps", "Training steps, by project.", labels=["project"])
        for project, value in sorted(counts["steps"].items()):
            steps.add_metric([project], value)
        yield steps
        published = CounterMetricFamily("livetrain_versions_published", "Model versions published, by project.",
                                        labels=["project"])
        for project, value in sorted(counts["versions"].items()):
            published.add_metric([project], value)
        yield published
        sessions = HistogramMetricFamily("livetrain_session_duration_seconds", "Training session durations.",
                                         labels=["project"])
        for project, entry in sorted(counts["sessions"].items()):
            buckets = [(str(b), entry["buckets"].get(str(b), 0)) for b in (*counters.SESSION_BUCKETS, "+Inf")]
            sessions.add_metric([project], buckets, entry["sum"])
        yield sessions
        failures = CounterMetricFamily("livetrain_image_fetch_failures",
                                       "Images that could not be fetched or decoded, by reason and where.",
                                       labels=["reason", "where"])
        for (where, reason), value in sorted(counts["fetch_failures"].items()):
            failures.add_metric([reason, where], value)
        yield failures
        quality = GaugeMetricFamily("livetrain_quality_rolling_mean",
                                    "Rolling mean of the live quality score of newly labeled images.", labels=["project"])
        done = GaugeMetricFamily("livetrain_rescore_done_tasks", "Tasks the last re-scoring job has scored.",
                                 labels=["project"])
        planned = GaugeMetricFamily("livetrain_rescore_planned_tasks", "Tasks the last re-scoring job set out to score.",
                                    labels=["project"])
        for project in known_projects(self.r):
            status = ProjectState(self.r, project).status()
            mean = (status.get("quality") or {}).get("rolling_mean")
            if _number(mean):
                quality.add_metric([project], mean)
            rescore = status.get("rescore") or {}
            if isinstance(rescore, dict) and _number(rescore.get("done")) and _number(rescore.get("total")):
                done.add_metric([project], rescore["done"])
                planned.add_metric([project], rescore["total"])
        yield quality
        yield done
        yield planned

    def _from_model_dir(self):
        active = GaugeMetricFamily("livetrain_active_version", "N of the active version <prefix>-vN, by project.",
                                   labels=["project"])
        info = GaugeMetricFamily("livetrain_active_version_info", "The active version's name, by project (always 1).",
                                 labels=["project", "version"])
        validation = GaugeMetricFamily("livetrain_validation_map",
                                       "The active version's mAP on the validation split (kind: box, mask; metric: "
                                       "map, map50).", labels=["project", "kind", "metric"])
        try:
            projects = list_projects(self.settings)
        except OSError as exc:  # the object store unreachable: the next scrape retries
            log.warning("metrics: cannot list the projects in the version store: %s", exc)
            projects = []
        for project in projects:
            try:
                store = version_store(self.settings, project)
                name = store.active()
                if name is None:
                    continue
                meta = store.meta(name)
            except (OSError, ValueError) as exc:  # a version pruned or written under us: the next scrape sees it
                log.debug("metrics: could not read project %s's active version: %s", project, exc)
                continue
            active.add_metric([project], version_number(name))
            info.add_metric([project, name], 1)
            for kind, metric, value in _validation_scores(meta):
                validation.add_metric([project, kind, metric], value)
        yield active
        yield info
        yield validation


def _validation_scores(meta) -> list[tuple[str, str, float]]:
    """(kind, metric, value) from a version's ``validation`` meta (VALIDATION_FRACTION): ``{"box": {"map",
    "map50", ...}, "mask": {...}}``, or flat ``{"map", "map50"}`` (read as box). Absent in older versions and
    only counts while the split is small: whatever is not a number is skipped."""
    scores = meta.get("validation") if isinstance(meta, dict) else None
    if not isinstance(scores, dict):
        return []
    nested = [(kind, scores[kind]) for kind in ("box", "mask") if isinstance(scores.get(kind), dict)]
    out = []
    for kind, entry in nested or [("box", scores)]:
        out += [(kind, metric, entry[metric]) for metric in ("map", "map50") if _number(entry.get(metric))]
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
