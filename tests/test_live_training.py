"""Live training end to end with a real Redis, a real RQ worker process and a Label Studio double that
serves the real API shapes: webhooks -> one session per project -> sync -> versions -> /predict. Asserts
on order and content (which session published what), never on wall-clock times."""

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


def versions(e, project=None) -> list[dict]:
    return VersionStore(e.settings.model_dir, project or e.project).list()


def covering(e, task_id, project=None) -> list[dict]:
    """The versions whose meta says they trained on ``task_id``."""
    return [v for v in versions(e, project) if str(task_id) in v["trained_annotations"]]


def test_sessions_publish_versions_served_by_predict_and_rollback(env):
    env.add_labeled(2)
    env.start_worker()
    status = wait_for_idle(env.redis, env.project, timeout=120)
    assert status["labeled_images"] == 2 and "2/3" in status["waiting"]  # cold start: below MIN_ANNOTATIONS
    assert predict(env)["model_version"] == "livetrain-base" and predict(env)["result"] == []

    env.add_labeled(2, start=2)
    status = wait_for_idle(env.redis, env.project, timeout=180)
    first = versions(env)
    assert first and status["active_version"] == first[-1]["name"], env.log()[-3000:]
    assert status["last_session"]["end_reason"] == "idle" and status["last_session"]["versions"] == len(first)
    meta = first[-1]
    assert meta["images"] == 4 and meta["classes"] == ["Square", "Disc"] and meta["final"]
    assert first[0]["parent"] is None and all(v["session"] == meta["session"] for v in first)
    assert all(k in meta for k in ("losses", "duration_s", "published_at", "settings", "annotations", "total_steps"))
    active = meta["name"]
    wait_until(lambda: predict(env)["model_version"] == active, timeout=10, what="/predict on the active version")
    assert predict(env)["score"] is not None  # the image was fetched from Label Studio and run through it
    # each new image was scored (live quality) before the model trained on it: by livetrain-base here
    quality = env.client.get("/status").get_json()["projects"][env.project]["quality"]
    assert quality["images"] == 4 and quality["last"]["version"] == "livetrain-base"

    env.add_labeled(1, start=4)  # the session ended: this submit starts a new one, continuing from the active version
    status = wait_for_idle(env.redis, env.project, timeout=180)
    second = [v for v in versions(env) if v["session"] != meta["session"]]
    assert second and second[0]["parent"] == active and second[0]["total_steps"] > meta["total_steps"]
    assert str(env.task_ids()[-1]) in second[-1]["trained_annotations"] and status["active_version"] == second[-1]["name"]
    quality = env.client.get("/status").get_json()["projects"][env.project]["quality"]
    assert quality["images"] == 5 and quality["last"]["version"] == active  # scored by the version served then
    newest = second[-1]["name"]
    wait_until(lambda: predict(env)["model_version"] == newest, timeout=10, what="/predict on the new session's version")

    reply = env.client.post(f"/projects/{env.project}/rollback", json={"version": active})
    assert reply.status_code == 200
    wait_until(lambda: predict(env)["model_version"] == active, timeout=10, what="rollback served")
    assert env.client.post(f"/projects/{env.project}/rollback", json={"version": "nope-v9"}).status_code == 400
    cli = subprocess.run([sys.executable, "-m", "backend.cli", "rollback", env.project, newest],
                         env=worker_env(env.tmp, env.settings.redis_url, env.fake.url, env.fake.token),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    wait_until(lambda: predict(env)["model_version"] == newest, timeout=10, what="CLI rollback served")


def test_submit_during_a_session_is_trained_by_that_session(env):
    env.start_worker(IDLE_AFTER=600)  # the session keeps training: it never goes idle here
    env.add_labeled(3)
    wait_until(lambda: versions(env), timeout=180, what="the first version")
    session = versions(env)[0]["session"]
    env.add_labeled(1, start=3)
    task = env.task_ids()[-1]
    found = wait_until(lambda: covering(env, task), timeout=120, what="a version trained on the new submit")
    assert found[0]["session"] == session  # the same session took it in: no new job, no reload
    status = ProjectState(env.redis, env.project).status()
    assert status["state"] == "training" and status["session"]["id"] == session
    assert Queue(QUEUE_NAME, connection=env.redis).count == 0  # the webhook queued nothing while it ran


def test_two_projects_share_one_worker(env):
    other = env.fake.add_project(CONFIG, title="Other")
    env.start_worker(IDLE_AFTER=600, SESSION_SLICE=3)  # sessions never end by idleness: only fair share switches

    def submit(project, seed):
        png, objects = shapes_image(seed)
        task = env.fake.add_task(project, png, name=f"o{seed}.png")
        env.fake.annotate(task, regions(env.fake, objects))
        env.client.post("/webhook", json=webhook("ANNOTATION_CREATED", project, task))
        return task

    seed = 0
    for _ in range(3):
        submit(int(env.project), seed)
        submit(other, seed + 100)
        seed += 1
    last = {}
    # both keep submitting; each project's newest submit is soon in one of its versions
    for _ in range(3):
        last[env.project], last[str(other)] = submit(int(env.project), seed), submit(other, seed + 100)
        seed += 1
        for project, task in last.items():
            wait_until(lambda: covering(env, task, project), timeout=240, what=f"project {project} trained on {task}")
    mine, theirs = versions(env), versions(env, str(other))
    sessions = {v["session"] for v in mine} | {v["session"] for v in theirs}
    assert len({v["session"] for v in mine}) >= 2 and len({v["session"] for v in theirs}) >= 2, env.log()[-3000:]
    # they took turns: some version of each project was published after a version of the other
    assert max(v["published_at"] for v in mine) > min(v["published_at"] for v in theirs)
    assert max(v["published_at"] for v in theirs) > min(v["published_at"] for v in mine)
    assert len(sessions) >= 4


def test_killed_worker_loses_no_annotation_and_the_next_session_resumes(env):
    worker = env.start_worker(IDLE_AFTER=600, CHECKPOINT_EVERY=2)
    env.add_labeled(3)
    wait_until(lambda: versions(env), timeout=180, what="the first version")
    env.add_labeled(1, start=3)  # submitted during the session
    task = env.task_ids()[-1]
    store = VersionStore(env.settings.model_dir, env.project)
    dataset = store.root / "dataset.json"
    wait_until(lambda: str(task) in json.loads(dataset.read_text())["records"], timeout=60, what="the submit synced")
    checkpoint = store.root / "checkpoints" / "session.pt"
    wait_until(lambda: checkpoint.exists(), timeout=60, what="a session checkpoint")
    worker.kill()  # SIGKILL the worker and its work horse mid-session

    active = store.active()
    torch.load(store.versions_dir / active / "model.pt", weights_only=True)  # the served version is whole
    assert checkpoint.exists() and str(task) in json.loads(dataset.read_text())["records"]
    env.start_worker()  # on start it queues a catch-up session; the dead worker's lock expires (LOCK_TTL)
    status = wait_for_idle(env.redis, env.project, timeout=300)
    assert "resuming the interrupted session" in env.log(), env.log()[-3000:]
    assert str(task) in store.meta(status["active_version"])["trained_annotations"]
    assert not checkpoint.exists()


def test_deleted_annotation_leaves_the_next_version(env):
    env.add_labeled(4)
    env.start_worker()
    first = wait_for_idle(env.redis, env.project, timeout=180)["active_version"]
    assert first, env.log()[-3000:]
    store = VersionStore(env.settings.model_dir, env.project)
    removed, second = env.task_ids()[1:3]
    assert str(removed) in store.meta(first)["trained_annotations"]

    env.fake.delete_annotation(env.tasks[removed])
    env.client.post("/webhook", json=webhook("ANNOTATIONS_DELETED", env.project, annotations=[env.tasks[removed]]))
    # and an update of another task changes what it teaches
    png, objects = shapes_image(100, count=3)
    env.fake.update_annotation(env.tasks[second], regions(env.fake, objects[:1]))
    env.client.post("/webhook", json=webhook("ANNOTATION_UPDATED", env.project, second))
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] != first
    meta = store.meta(status["active_version"])
    assert meta["images"] == 3 and str(removed) not in meta["trained_annotations"]
    dataset = json.loads((store.root / "dataset.json").read_text())
    assert len(dataset["records"][str(second)]["boxes"]) == 1


def test_lost_webhook_is_picked_up_by_the_next_sync(env):
    env.add_labeled(3)
    env.start_worker()
    first = wait_for_idle(env.redis, env.project, timeout=180)["active_version"]
    assert first, env.log()[-3000:]
    png, objects = shapes_image(7)
    task = env.fake.add_task(int(env.project), png, name="img7.png")
    env.fake.annotate(task, regions(env.fake, objects))  # its webhook never arrives
    # the next session, started by another task's update, still finds it (its first sync compares updated_at)
    first_task = env.task_ids()[0]
    png, objects = shapes_image(1)
    env.fake.update_annotation(env.tasks[first_task], regions(env.fake, objects))
    env.client.post("/webhook", json=webhook("ANNOTATION_UPDATED", env.project, first_task))
    status = wait_for_idle(env.redis, env.project, timeout=180)
    assert status["active_version"] != first
    assert str(task) in VersionStore(env.settings.model_dir, env.project).meta(status["active_version"])["trained_annotations"]


def test_rescoring_progresses_while_a_session_trains(env):
    unlabeled = [env.fake.add_task(int(env.project), shapes_image(200 + i)[0], name=f"u{i}.png") for i in range(4)]
    env.start_worker(IDLE_AFTER=600)  # the session never ends here: re-scoring must not wait for it
    env.add_labeled(3)

    def scored():
        versions_written = {p["model_version"] for t in unlabeled for p in env.fake.task_predictions(t)}
        return versions_written - {"livetrain-base"}

    written = wait_until(scored, timeout=180, what="predictions of a published version on the unlabeled tasks")
    # the job reports a batch done just after writing it (and moving the project's model_version)
    status = wait_until(lambda: (s := ProjectState(env.redis, env.project).status()).get("rescore", {}).get("done")
                        and s, timeout=60, what="re-scoring's progress report")
    assert status["state"] == "training" and status["rescore"]["done"] > 0, status
    assert all(v.startswith("shapes-v") for v in written)  # versions may be pruned meanwhile (KEEP_VERSIONS)
    assert env.fake.projects[int(env.project)]["model_version"].startswith("shapes-v")  # moved to a fresh version
