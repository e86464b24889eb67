"""Live training end to end with a real Redis, a real RQ worker process and a Label Studio double that
serves the real API shapes: webhooks -> coalesced job -> sync -> round -> version -> /predict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rq import Queue

from backend.jobs.queue import QUEUE_NAME
from backend.jobs.state import ProjectState
from backend.jobs.training import wait_for_idle
from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import CONFIG, WorkerProcess, live_env, regions, shapes_image, wait_until, worker_env


@pytest.fixture
def env(tmp_path):
    fake, project, settings, app = live_env(tmp_path)
    workers = []

    class Env:
        pass

    e = Env()
    e.fake, e.project, e.settings, e.app, e.client, e.tmp = fake, str(project), settings, app, app.test_client(), tmp_path
    e.redis = app.extensions["livetrain"].redis
    e.tasks = {}  # task id -> annotation id, in creation order
    e.task_ids = lambda: list(e.tasks)

    def add_labeled(n, start=0):
        for seed in range(start, start + n):
            png, objects = shapes_image(seed)
            task = fake.add_task(project, png, name=f"img{seed}.png")
            e.tasks[task] = fake.annotate(task, regions(fake, objects))
            e.client.post("/webhook", json=webhook("ANNOTATION_CREATED", project, task))
    e.add_labeled = add_labeled

    def start_worker(**extra):
        worker = WorkerProcess(worker_env(tmp_path, settings.redis_url, fake.url, fake.token, **extra), tmp_path / "worker.log")
        workers.append(worker)
        return worker
    e.start_worker = start_worker
    e.log = lambda: (tmp_path / "worker.log").read_text(errors="replace") if (tmp_path / "worker.log").exists() else ""
    yield e
    for worker in workers:
        worker.stop()
    fake.close()


def webhook(action, project, task=None, annotations=None):
    body = {"action": action, "project": {"id": int(project)}}
    if task is not None:
        body["task"] = {"id": task}
        body["annotation"] = {"id": 1, "task": task, "project": int(project)}
    if annotations is not None:
        body["annotations"] = [{"id": a} for a in annotations]
    return body


def predict(e, task_id=None):
    task_id = task_id or e.task_ids()[0]
    task = {"id": task_id, "data": dict(e.fake.tasks[task_id]["data"])}
    reply = e.client.post("/predict", json={"tasks": [task], "project": f"{e.project}.123", "label_config": CONFIG})
    assert reply.status_code == 200
    return reply.get_json()["results"][0]


def test_webhook_burst_queues_one_job(env):
    # no worker yet: fifty submits (START_TRAINING + ANNOTATION_CREATED each) leave exactly one pending job
    env.add_labeled(3)
    for _ in range(50):
        assert env.client.post("/webhook", json=webhook("START_TRAINING", env.project)).status_code == 200
        assert env.client.post("/webhook", json=webhook("ANNOTATION_CREATED", env.project, env.task_ids()[0])).status_code == 200
    assert Queue(QUEUE_NAME, connection=env.redis).count == 1
    assert env.client.get("/status").get_json()["projects"][env.project]["state"] == "queued"
    # events that do not change annotations queue nothing
    assert env.client.post("/webhook", json=webhook("PROJECT_UPDATED", env.project)).get_json()["status"] == "ignored"


def test_rounds_publish_versions_served_by_predict_and_rollback(env):
    env.add_labeled(2)
    env.start_worker()
    status = wait_for_idle(env.redis, env.project, timeout=120)
    assert status["labeled_images"] == 2 and "2/3" in status["waiting"]  # cold start: below MIN_ANNOTATIONS
    assert predict(env)["model_version"] == "livetrain-base" and predict(env)["result"] == []

    env.add_labeled(2, start=2)
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] == "shapes-v1", env.log()[-3000:]
    meta = VersionStore(env.settings.model_dir, env.project).meta("shapes-v1")
    assert meta["images"] == 4 and meta["classes"] == ["Square", "Disc"] and meta["parent"] is None
    assert all(k in meta for k in ("losses", "duration_s", "published_at", "settings", "annotations"))
    wait_until(lambda: predict(env)["model_version"] == "shapes-v1", timeout=10, what="/predict on v1")
    assert predict(env)["score"] is not None  # the image was fetched from Label Studio and run through v1

    env.add_labeled(1, start=4)
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] == "shapes-v2" and status["last_round"]["parent"] == "shapes-v1"
    assert status["last_round"]["new_images"] == 1
    wait_until(lambda: predict(env)["model_version"] == "shapes-v2", timeout=10, what="/predict on v2")
    versions = env.client.get(f"/versions?project={env.project}").get_json()
    assert versions["versions"][-2:] == ["shapes-v1", "shapes-v2"]
    # v1's pre-labels were scored on the image it had not seen yet (prequential quality)
    assert isinstance(VersionStore(env.settings.model_dir, env.project).meta("shapes-v1").get("quality"), float)

    reply = env.client.post(f"/projects/{env.project}/rollback", json={"version": "shapes-v1"})
    assert reply.status_code == 200
    wait_until(lambda: predict(env)["model_version"] == "shapes-v1", timeout=10, what="rollback served")
    assert env.client.post(f"/projects/{env.project}/rollback", json={"version": "nope-v9"}).status_code == 400
    cli = subprocess.run([sys.executable, "-m", "backend.cli", "rollback", env.project, "shapes-v2"],
                         env=worker_env(env.tmp, env.settings.redis_url, env.fake.url, env.fake.token),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    wait_until(lambda: predict(env)["model_version"] == "shapes-v2", timeout=10, what="CLI rollback served")


def test_killed_worker_leaves_active_version_intact_and_next_round_resumes(env):
    env.add_labeled(3)
    worker = env.start_worker()
    assert wait_for_idle(env.redis, env.project, timeout=180)["active_version"] == "shapes-v1", env.log()[-3000:]
    store = VersionStore(env.settings.model_dir, env.project)
    v1_bytes = (store.versions_dir / "shapes-v1" / "model.pt").read_bytes()
    worker.stop()

    slow = dict(TRAIN_STEPS=40, CHECKPOINT_EVERY=2)
    worker = env.start_worker(**slow)
    env.add_labeled(1, start=3)
    state = ProjectState(env.redis, env.project)
    wait_until(lambda: (state.status().get("progress") or {}).get("step", 0) >= 4, timeout=180, what="round under way")
    worker.kill()  # SIGKILL the worker and its work horse mid-round

    assert store.active() == "shapes-v1" and store.names() == ["shapes-v1"]
    assert (store.versions_dir / "shapes-v1" / "model.pt").read_bytes() == v1_bytes
    torch.load(store.versions_dir / "shapes-v1" / "model.pt", weights_only=True)  # not corrupt
    assert (store.root / "checkpoints" / "round.pt").exists()

    env.start_worker(**slow)  # on start it queues a catch-up round; the dead worker's lock expires (LOCK_TTL)
    status = wait_for_idle(env.redis, env.project, timeout=300)
    assert status["active_version"] == "shapes-v2", env.log()[-3000:]
    assert "resuming the interrupted round" in env.log()
    assert not (store.root / "checkpoints" / "round.pt").exists()


def test_deleted_annotation_leaves_next_round(env):
    env.add_labeled(4)
    env.start_worker()
    assert wait_for_idle(env.redis, env.project, timeout=180)["active_version"] == "shapes-v1", env.log()[-3000:]
    store = VersionStore(env.settings.model_dir, env.project)
    first, second = env.task_ids()[1:3]
    assert str(first) in store.meta("shapes-v1")["trained_annotations"]

    env.fake.delete_annotation(env.tasks[first])
    env.client.post("/webhook", json=webhook("ANNOTATIONS_DELETED", env.project, annotations=[env.tasks[first]]))
    # and an update of another task changes what it teaches
    png, objects = shapes_image(100, count=3)
    env.fake.update_annotation(env.tasks[second], regions(env.fake, objects[:1]))
    env.client.post("/webhook", json=webhook("ANNOTATION_UPDATED", env.project, second))
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] == "shapes-v2"
    meta = store.meta("shapes-v2")
    assert meta["images"] == 3 and str(first) not in meta["trained_annotations"]
    dataset = json.loads((store.root / "dataset.json").read_text())
    assert len(dataset["records"][str(second)]["boxes"]) == 1


def test_lost_webhook_is_picked_up_by_the_next_sync(env):
    env.add_labeled(3)
    env.start_worker()
    assert wait_for_idle(env.redis, env.project, timeout=180)["active_version"] == "shapes-v1", env.log()[-3000:]
    png, objects = shapes_image(7)
    task = env.fake.add_task(int(env.project), png, name="img7.png")
    env.fake.annotate(task, regions(env.fake, objects))  # its webhook never arrives
    # the next (incremental) round, triggered by another task's update, still finds it
    first = env.task_ids()[0]
    png, objects = shapes_image(1)
    env.fake.update_annotation(env.tasks[first], regions(env.fake, objects))
    env.client.post("/webhook", json=webhook("ANNOTATION_UPDATED", env.project, first))
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] == "shapes-v2"
    assert str(task) in VersionStore(env.settings.model_dir, env.project).meta("shapes-v2")["trained_annotations"]
