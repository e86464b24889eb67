"""Re-scoring and "Complete" with a real Redis, a real RQ worker process and the Label Studio double:
after each version every unlabeled task carries one scored prediction of it and the project points at it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.errors import BadRequest
from backend.jobs.jobs import wait_for_job
from backend.jobs.rescoring import complete_options, enqueue_rescore, is_livetrain_version, plan_rescore
from backend.jobs.state import ProjectState
from backend.jobs.training import wait_for_idle
from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import WorkerProcess, live_env, regions, shapes_image, wait_until, worker_env


# -- choosing what to score -----------------------------------------------------------------------
def task(tid, *predictions):
    return {"id": tid, "predictions": [{"id": 100 * tid + i, "model_version": v, "score": s}
                                       for i, (v, s) in enumerate(predictions)]}


def test_plan_scores_the_next_in_line_then_never_scored_then_stalest_then_lowest_previous_score_and_caps(monkeypatch):
    tasks = [task(1, ("p-v1", 0.9)), task(2, ("p-v1", 0.2)), task(3), task(4, ("p-v1", 0.4), ("p-v2", 0.7)),
             task(5, ("p-v3", 0.1)), task(6, ("other", None))]
    monkeypatch.setattr("backend.jobs.rescoring.NEXT_IN_LINE", 0)
    # 2 and 1 carry p-v1 predictions, 4 a newer p-v2 one: stalest first, then the lowest score
    assert [t["id"] for t in plan_rescore(tasks, "p-v3", 0)] == [3, 6, 2, 1, 4]
    assert [t["id"] for t in plan_rescore(tasks, "p-v3", 3)] == [3, 6]  # task 5 already carries p-v3
    assert plan_rescore(tasks, "p-v3", 1) == []
    # the lowest ids still to score come first (what an annotator going down the list opens next), in usefulness order
    monkeypatch.setattr("backend.jobs.rescoring.NEXT_IN_LINE", 2)
    assert [t["id"] for t in plan_rescore(tasks, "p-v3", 0)] == [2, 1, 3, 6, 4]


def test_only_livetrain_versions_count_as_older_versions():
    assert is_livetrain_version("shapes-v3", "shapes") and is_livetrain_version("livetrain-base", "shapes")
    assert not is_livetrain_version("shapes-v3-manual", "shapes") and not is_livetrain_version("yolo-v3", "shapes")
    assert not is_livetrain_version(None, "shapes")


def test_complete_options_are_validated():
    assert complete_options({}) == {"tasks": None, "min_score": None, "max_detections": None,
                                    "remove_existing": False, "skip_annotated": False}
    assert complete_options({"tasks": [3, 4], "min_score": 0.2, "remove_existing": True})["tasks"] == [3, 4]
    for bad in ({"tasks": []}, {"tasks": ["3"]}, {"min_score": 2}, {"max_detections": -1},
                {"remove_existing": "yes"}, {"colour": 1}):
        with pytest.raises(BadRequest):
            complete_options(bad)


# -- end to end with a worker ---------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    fake, project, settings, app = live_env(tmp_path)
    fake.projects[project]["model_version"] = "livetrain"  # what connecting a backend sets: its title
    workers = []

    class Env:
        pass

    e = Env()
    e.fake, e.project, e.settings, e.client, e.tmp = fake, str(project), settings, app.test_client(), tmp_path
    e.redis = app.extensions["livetrain"].redis
    e.labeled, e.unlabeled = [], []
    e.seed = 0

    def add(labeled: int = 0, unlabeled: int = 0):
        for i in range(labeled + unlabeled):
            png, objects = shapes_image(e.seed)
            tid = fake.add_task(project, png, name=f"img{e.seed}.png")
            e.seed += 1
            if i >= labeled:
                e.unlabeled.append(tid)
                continue
            fake.annotate(tid, regions(fake, objects))
            e.labeled.append(tid)
            e.client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": project},
                                            "task": {"id": tid}})
    e.add = add

    def start_worker(**extra):
        worker = WorkerProcess(worker_env(tmp_path, settings.redis_url, fake.url, fake.token, **extra),
                               tmp_path / "worker.log")
        workers.append(worker)
        return worker
    e.start_worker = start_worker
    e.log = lambda: (tmp_path / "worker.log").read_text(errors="replace")[-4000:] if (tmp_path / "worker.log").exists() else ""
    e.rescore = lambda: ProjectState(e.redis, e.project).status().get("rescore") or {}
    yield e
    for worker in workers:
        worker.stop()
    fake.close()


def wait_rescored(e, version, timeout=120):
    return wait_until(lambda: e.rescore().get("version") == version and e.rescore().get("state") == "done"
                      and e.rescore(), timeout=timeout, what=f"re-scoring with {version}\n{e.log()}")


def session_version(e, previous=None) -> str:
    """The active version once training is idle: a session may publish several, the last one counts."""
    version = wait_for_idle(e.redis, e.project, timeout=180)["active_version"]
    assert version and version.startswith("shapes-v") and version != previous, e.log()
    return version


def test_each_version_rescores_every_unlabeled_task_and_moves_the_project(env):
    env.add(unlabeled=4)
    env.add(labeled=3)
    env.start_worker()
    v1 = session_version(env)
    report = wait_rescored(env, v1)
    assert report["total"] == 4 and report["written"] == 4 and report["failed"] == 0
    assert env.fake.projects[int(env.project)]["model_version"] == v1
    for tid in env.unlabeled:
        (prediction,) = env.fake.task_predictions(tid)
        assert prediction["model_version"] == v1 and isinstance(prediction["score"], float)
        assert 0.0 <= prediction["score"] <= 1.0
        assert env.fake.predictions_score(tid) == prediction["score"]  # what Label Studio's sampling reads
    assert all(env.fake.task_predictions(t) == [] for t in env.labeled)
    status = env.client.get("/status").get_json()["projects"][env.project]
    assert status["rescore"]["state"] == "done" and status["rescore"]["version"] == v1

    # a foreign prediction stays; livetrain's older version is replaced
    env.fake.add_prediction(env.unlabeled[0], [], 0.3, "manual-import")
    env.add(labeled=1)
    v2 = session_version(env, previous=v1)
    report = wait_rescored(env, v2)
    assert report["written"] == 4 and report["deleted"] == 4  # each task had one older livetrain prediction
    assert env.fake.projects[int(env.project)]["model_version"] == v2
    for tid in env.unlabeled:
        versions = sorted(p["model_version"] for p in env.fake.task_predictions(tid))
        assert versions == (["manual-import", v2] if tid == env.unlabeled[0] else [v2])


def test_limit_scores_the_most_useful_tasks_first(env):
    env.add(unlabeled=4)
    env.add(labeled=3)
    a, b, c, d = env.unlabeled
    env.fake.add_prediction(a, [], 0.9, "imported")
    env.fake.add_prediction(b, [], 0.1, "imported")
    # on demand, once the session is over: its versions would each score a few tasks and change the order
    env.start_worker(RESCORE_LIMIT=3, RESCORE_OLD_PREDICTIONS="keep", RESCORE_ON_PUBLISH="false")
    version = session_version(env)
    reply = env.client.post(f"/projects/{env.project}/rescore")
    assert reply.status_code == 200 and reply.get_json()["queued"]
    report = wait_for_job(env.redis, reply.get_json()["job"], timeout=60)["result"]
    assert report["version"] == version and report["written"] == 3, report
    scored = {t for t in env.unlabeled if any(p["model_version"] == version for p in env.fake.task_predictions(t))}
    assert scored == {c, d, b}  # never scored, then the lowest previous score; a (0.9) waits
    # again, nothing more is written: the limit counts the tasks already carrying the version
    reply = env.client.post(f"/projects/{env.project}/rescore")
    assert reply.status_code == 200 and reply.get_json()["queued"]
    job = wait_for_job(env.redis, reply.get_json()["job"], timeout=60)
    assert job["status"] == "finished" and job["result"]["total"] == 0, job


def test_a_newer_version_supersedes_a_running_rescore(env):
    env.add(unlabeled=8)
    env.add(labeled=3)
    env.fake.delay = 0.15  # a slow Label Studio: the job is still busy when v2 arrives
    env.start_worker(RESCORE_BATCH=1)
    version = session_version(env)
    wait_until(lambda: env.rescore().get("version") == version and env.rescore().get("done", 0) >= 1,
               timeout=60, what="re-scoring under way")
    first_job = env.rescore()["job"]
    store = VersionStore(env.settings.model_dir, env.project)
    state, meta = store.load(version)
    newer = store.publish(state, {k: v for k, v in meta.items() if k not in ("name", "published_at")}, "Shapes")
    enqueue_rescore(env.redis, env.project)
    old = wait_for_job(env.redis, first_job, timeout=60)
    assert old["result"]["state"] == "superseded" and old["result"]["written"] < 8, old
    env.fake.delay = 0
    wait_rescored(env, newer)
    for tid in env.unlabeled:
        assert [p["model_version"] for p in env.fake.task_predictions(tid)] == [newer]
    assert env.fake.projects[int(env.project)]["model_version"] == newer


def test_complete_route_and_cli(env):
    env.add(unlabeled=3)
    env.add(labeled=3)
    env.start_worker(RESCORE_ON_PUBLISH="false")
    assert env.client.post(f"/projects/{env.project}/complete", json={}).status_code == 400  # no version yet
    version = session_version(env)
    u1, u2, u3 = env.unlabeled
    old = env.fake.add_prediction(u1, [], 0.5, "imported")
    assert env.client.post(f"/projects/{env.project}/complete", json={"tasks": "some"}).status_code == 400

    body = {"tasks": [env.labeled[0], u1, u2], "min_score": 0.0, "max_detections": 1, "remove_existing": True,
            "skip_annotated": True}
    reply = env.client.post(f"/projects/{env.project}/complete", json=body)
    assert reply.status_code == 202, reply.get_json()
    job_id = reply.get_json()["job"]
    report = wait_until(lambda: (r := env.client.get(f"/jobs/{job_id}").get_json())["status"] in ("finished", "failed")
                        and r, timeout=120, what="complete job")
    assert report["status"] == "finished", (report, env.log())
    assert report["result"]["skipped"] == [env.labeled[0]] and report["result"]["written"] == 2
    assert report["progress"]["done"] == 2 and report["progress"]["total"] == 2
    assert env.fake.task_predictions(env.labeled[0]) == []
    for tid in (u1, u2):
        (prediction,) = env.fake.task_predictions(tid)  # u1's imported prediction was removed
        assert prediction["model_version"] == version and len(prediction["result"]) <= 1
    assert old not in env.fake.predictions and env.fake.task_predictions(u3) == []
    assert env.fake.projects[int(env.project)]["model_version"] == version
    assert env.client.get("/status").get_json()["projects"][env.project]["complete"]["state"] == "done"
    assert env.client.get("/jobs/nope").status_code == 404

    cli = subprocess.run([sys.executable, "-m", "backend.cli", "complete", env.project, "--tasks", str(u2), str(u3),
                          "--min-score", "0.0", "--wait", "120"],
                         env=worker_env(env.tmp, env.settings.redis_url, env.fake.url, env.fake.token),
                         capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    result = json.loads(cli.stdout.splitlines()[-1])["result"]
    assert result["skipped"] == [u2] and result["written"] == 1  # u2 already has this version's: no duplicate
    assert [p["model_version"] for p in env.fake.task_predictions(u3)] == [version]
