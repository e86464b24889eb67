"""GET /metrics: the series, their labels, and that they move; summed across gunicorn workers. Asserts on
content (counts, labels), never on times."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from backend.api import create_app
from backend.errors import ImageError
from backend.jobs import counters
from backend.jobs.state import ProjectState, version_number
from backend.jobs.training import wait_for_idle
from backend.model_store.versions import VersionStore
from backend.simulation.processes import free_port
from tests.livetrain_fixtures import CONFIG, WorkerProcess, live_env, regions, shapes_image, wait_until, worker_env
from tests.test_serve import wait_for


def parse(text: str) -> dict:
    """{(sample name, frozenset of label items): value}"""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value, 0 when absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, items), v in samples.items() if n == name and set(labels.items()) <= items)


def scrape(client) -> dict:
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.content_type.startswith("text/plain")
    return parse(reply.get_data(as_text=True))


def webhook(action, project, task=None):
    body = {"action": action, "project": {"id": int(project)}}
    if task is not None:
        body["task"] = {"id": task}
    return body


@pytest.fixture
def env(tmp_path):
    fake, project, settings, app = live_env(tmp_path)
    yield fake, str(project), settings, app
    fake.close()


def test_failure_reasons_are_a_fixed_vocabulary():
    assert counters.failure_reason("image http://h/a.png returned HTTP 404") == "http_404"
    assert counters.failure_reason("image http://h/a.png timed out after 10 s") == "timeout"
    assert counters.failure_reason("image host h:1 is unreachable (fetching http://h:1/a.png): ConnectionError") == "unreachable"
    assert counters.failure_reason("image http://h/a.png is 9 bytes, over MAX_IMAGE_BYTES=1") == "too_large"
    assert counters.failure_reason("could not decode image http://h/a.png: bad") == "decode"
    assert counters.failure_reason("task data has no 'image' image URL") == "bad_url"
    assert counters.failure_reason("something else entirely") == "other"


def test_web_series_move_after_predict_and_webhook(env, image_server):
    fake, project, settings, app = env
    client = app.test_client()
    before = scrape(client)
    assert value(before, "livetrain_redis_up") == 1
    assert value(before, "livetrain_queue_depth", queue="training") == 0
    for _ in range(3):
        assert client.post("/webhook", json=webhook("ANNOTATION_CREATED", project, 1)).status_code == 200
    assert client.post("/webhook", json=webhook("MADE_UP_ACTION", project)).get_json()["status"] == "ignored"
    url = image_server.add("/a.png", shapes_image(0)[0])
    tasks = [{"id": i, "data": {"image": url}} for i in (1, 2)]
    reply = client.post("/predict", json={"tasks": tasks, "project": f"{project}.123", "label_config": CONFIG})
    assert reply.status_code == 200
    assert client.post(f"/projects/{project}/train").status_code == 200
    assert client.get("/nowhere").status_code == 404
    after = scrape(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("livetrain_webhook_events_total", action="ANNOTATION_CREATED") == 3
    assert moved("livetrain_webhook_events_total", action="other") == 1  # bounded: no series per made-up action
    assert moved("livetrain_predictions_total", project=project) == 2
    assert moved("livetrain_http_requests_total", route="/webhook", method="POST", status="200") == 4
    assert moved("livetrain_http_requests_total", route="/predict", method="POST", status="200") == 1
    # the url rule, not the path
    assert moved("livetrain_http_requests_total", route="/projects/<project>/train", method="POST", status="200") == 1
    assert moved("livetrain_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert moved("livetrain_http_request_duration_seconds_count", route="/predict", method="POST", status="200") == 1
    # the webhooks queued one training job (no worker runs here)
    assert value(after, "livetrain_queue_depth", queue="training") == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert fake.token not in text


def test_worker_series_and_live_state_after_a_real_session(env, image_server, tmp_path):
    """A real worker process trains and publishes; /metrics shows its steps, versions, session, the active
    version, quality and re-scoring; /predict on it counts predictions and image failures."""
    fake, project, settings, app = env
    client = app.test_client()
    for seed in range(3):
        png, objects = shapes_image(seed, width=96, height=72)
        task = fake.add_task(int(project), png, name=f"img{seed}.png")
        fake.annotate(task, regions(fake, objects, width=96, height=72))
        client.post("/webhook", json=webhook("ANNOTATION_CREATED", project, task))
    fake.add_task(int(project), shapes_image(9, width=96, height=72)[0], name="unlabeled.png")  # for re-scoring
    worker = WorkerProcess(worker_env(tmp_path, settings.redis_url, fake.url, fake.token), tmp_path / "worker.log")
    try:
        status = wait_for_idle(app.extensions["livetrain"].redis, project, timeout=240)
        store = VersionStore(settings.model_dir, project)
        active = store.active()
        assert active is not None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        # the re-scoring job of the last version finishes too (its progress is a gauge)
        redis = app.extensions["livetrain"].redis
        wait_until(lambda: (ProjectState(redis, project).status().get("rescore") or {}).get("state") == "done",
                   timeout=120, what="re-scoring done")
    finally:
        worker.stop()
    samples = scrape(client)
    assert value(samples, "livetrain_versions_published_total", project=project) >= 1
    assert value(samples, "livetrain_versions_published_total", project=project) >= len(store.names())
    assert value(samples, "livetrain_training_steps_total", project=project) >= status["last_session"]["steps"] > 0
    assert value(samples, "livetrain_session_duration_seconds_count", project=project) == 1
    assert value(samples, "livetrain_session_duration_seconds_bucket", project=project, le="+Inf") == 1
    assert value(samples, "livetrain_active_version", project=project) == version_number(active) >= 1
    assert value(samples, "livetrain_active_version_info", project=project, version=active) == 1
    status = ProjectState(redis, project).status()
    assert value(samples, "livetrain_quality_rolling_mean", project=project) == status["quality"]["rolling_mean"]
    rescore = status["rescore"]
    assert value(samples, "livetrain_rescore_done_tasks", project=project) == rescore["done"]
    assert value(samples, "livetrain_rescore_planned_tasks", project=project) == rescore["total"]
    assert total(samples, "livetrain_validation_map", project=project) == 0  # no validation split here

    # validation meta (VALIDATION_FRACTION) is read when present; entries that are not numbers are skipped
    store.update_meta(active, validation={"map": 0.25, "map50": 0.5, "per_class": {"Square": 0.1}, "images": 2})
    # the counters of a version published another way (another worker) add up too
    counters.version_published(redis, project)
    counters.fetch_failure_hook(redis, "training")(ImageError("image http://h/x.png returned HTTP 403"))
    # /predict on the trained version: one image served, one that fails
    good = image_server.add("/good.png", shapes_image(7, width=96, height=72)[0])
    tasks = [{"id": 1, "data": {"image": good}}, {"id": 2, "data": {"image": image_server.url + "/missing.png"}}]
    wait_until(lambda: client.post("/predict", json={"tasks": tasks[:1], "project": f"{project}.1", "label_config": CONFIG})
               .get_json()["results"][0]["model_version"] == active, timeout=20, what="/predict on the new version")
    before = scrape(client)
    reply = client.post("/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": CONFIG})
    assert reply.status_code == 200 and [r["score"] is None for r in reply.get_json()["results"]] == [False, True]
    reply = client.get("/metrics")
    after = parse(reply.get_data(as_text=True))
    assert value(after, "livetrain_predictions_total", project=project) - value(before, "livetrain_predictions_total", project=project) == 2
    assert value(after, "livetrain_image_fetch_failures_total", reason="http_404", where="predict") == \
        value(before, "livetrain_image_fetch_failures_total", reason="http_404", where="predict") + 1
    assert value(after, "livetrain_image_fetch_failures_total", reason="http_403", where="training") == 1
    assert value(after, "livetrain_versions_published_total", project=project) == \
        value(samples, "livetrain_versions_published_total", project=project) + 1
    assert value(after, "livetrain_validation_map", project=project, kind="box", metric="map") == 0.25
    assert value(after, "livetrain_validation_map", project=project, kind="box", metric="map50") == 0.5
    assert total(after, "livetrain_validation_map", project=project) == 0.75
    # as the validation split writes it: per kind (box, and mask for mask projects), with per-class entries
    store.update_meta(active, validation={"images": 4, "digest": "x", "box": {"map": 0.3, "map50": 0.6, "per_class": {}},
                                          "mask": {"map": 0.2, "map50": "n/a"}})
    samples = scrape(client)
    assert value(samples, "livetrain_validation_map", project=project, kind="box", metric="map50") == 0.6
    assert value(samples, "livetrain_validation_map", project=project, kind="mask", metric="map") == 0.2
    assert total(samples, "livetrain_validation_map", project=project) == pytest.approx(1.1)
    # web and worker failures are one family: the text format allows each name's TYPE once
    assert reply.get_data(as_text=True).count("# TYPE livetrain_image_fetch_failures_total counter") == 1


def test_metrics_needs_basic_auth_when_set(env):
    fake, project, settings, _ = env
    app = create_app(dataclasses.replace(settings, basic_auth_user="ann", basic_auth_pass="s3cret"))
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    reply = client.get("/metrics", auth=("ann", "s3cret"))
    assert reply.status_code == 200
    text = reply.get_data(as_text=True)
    assert "s3cret" not in text and fake.token not in text
    # the refused scrape was counted, under its route
    assert value(parse(text), "livetrain_http_requests_total", route="/metrics", method="GET", status="401") >= 1


def test_metrics_answers_without_redis(tmp_path):
    from backend.settings import Settings

    settings = Settings.from_env(dict(os.environ, MODEL_DIR=str(tmp_path), DOWNLOAD_WEIGHTS="false",
                                      REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", TORCH_HOME=str(tmp_path / "torch")))
    client = create_app(settings).test_client()
    assert client.get("/health").status_code == 200
    reply = client.get("/metrics")
    assert reply.status_code == 200
    samples = parse(reply.get_data(as_text=True))
    assert value(samples, "livetrain_redis_up") == 0
    assert value(samples, "livetrain_http_requests_total", route="/health", method="GET", status="200") >= 1


def test_gunicorn_workers_are_summed(tmp_path):
    """`livetrain serve` with WORKERS=2: each worker counts in its own files, any one of them answers
    /metrics with the sum."""
    port = free_port()
    env = dict(os.environ, MODEL_DIR=str(tmp_path), DOWNLOAD_WEIGHTS="false", TORCH_HOME=str(tmp_path / "torch"),
               WORKERS="2", THREADS="2")
    env.pop("REDIS_URL", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    stale = tmp_path / ".prometheus" / "counter_999999.db"  # a previous run's file is wiped at start
    stale.parent.mkdir()
    stale.write_bytes(b"junk")
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--no-worker"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(f"{base}/health", seconds=120).status_code == 200

        def pids() -> set[str]:  # the processes that have counted something
            return {m[1] for p in (tmp_path / ".prometheus").glob("*.db") if (m := re.match(r"\w+_(\d+)\.db$", p.name))}

        sent, deadline = 0, time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:
            # one connection per request: gunicorn hands them to whichever worker accepts first (a gthread
            # worker accepts greedily: on a busy machine one may take every connection of a burst, so pause)
            while len(pids()) < 2 and time.monotonic() < deadline:
                replies = list(pool.map(lambda _: requests.get(f"{base}/versions", timeout=30), range(20)))
                assert all(r.status_code == 200 for r in replies)
                sent += len(replies)
                time.sleep(0.2)
        assert len(pids()) == 2 and "999999" not in pids(), pids()
        for _ in range(3):  # whichever worker answers the scrape, the total is every worker's
            samples = parse(requests.get(f"{base}/metrics", timeout=30).text)
            assert value(samples, "livetrain_http_requests_total", route="/versions", method="GET", status="200") == sent
            assert value(samples, "livetrain_redis_up") == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
