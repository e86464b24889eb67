"""The label stream with a real Redis, a real RQ worker and the Label Studio double: connecting switches the
project to uncertainty sampling once, typical-first predictions with clusters come before any version, and each
version's predictions carry the same clusters."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from backend.inference.clusters import target_clusters
from backend.jobs.stream_state import StreamState, next_tasks
from backend.model_store.versions import TYPICAL_VERSION
from tests.livetrain_fixtures import CONFIG, wait_until, worker_env
from tests.test_rescoring import env, session_version, wait_rescored  # noqa: F401  (env is a fixture)


def stream_job(e) -> dict:
    return e.client.get("/status").get_json()["projects"].get(e.project, {}).get("stream_job") or {}


def wait_stream_done(e, previous_job=None) -> dict:
    return wait_until(lambda: (j := stream_job(e)).get("state") == "done" and j.get("job") != previous_job and j,
                      timeout=120, what=f"the label stream job\n{e.log()}")


def setup(e):
    reply = e.client.post("/setup", json={"project": f"{e.project}.1700000000", "schema": CONFIG})
    assert reply.status_code == 200, reply.get_json()


def tasks_created(e, ids):
    reply = e.client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": int(e.project)},
                                            "tasks": [{"id": t} for t in ids]})
    assert reply.status_code == 200 and reply.get_json()["status"] == "ok", reply.get_json()


def served_order(e, model_version: str) -> list[int]:
    """What Label Studio's uncertainty sampling serves, read from the double's stored predictions."""
    candidates = [{"task": t, "score": p["score"], "cluster": p["cluster"]} for t in e.unlabeled
                  for p in e.fake.task_predictions(t) if p["model_version"] == model_version]
    return [n["task"] for n in next_tasks(candidates, Counter(), limit=len(candidates))]


def test_connecting_switches_the_stream_on_once_typical_first_then_versions_keep_the_clusters(env):
    env.add(unlabeled=8)
    env.start_worker()
    project = env.fake.projects[int(env.project)]
    assert project["sampling"] == "Sequential sampling"
    setup(env)
    first = wait_stream_done(env)
    assert first["embedded"] == 8 and first["clusters"] == target_clusters(8) and first["typical_written"] == 8
    assert project["sampling"] == "Uncertainty sampling" and project["model_version"] == TYPICAL_VERSION
    clusters = StreamState(env.redis, env.project).clusters()
    for tid in env.unlabeled:
        (prediction,) = env.fake.task_predictions(tid)
        assert prediction["model_version"] == TYPICAL_VERSION and prediction["result"] == []
        assert prediction["cluster"] == clusters[tid] and 0 <= prediction["score"] < 1
    # the first tasks served cover every cluster before any cluster gets a second one
    order = served_order(env, TYPICAL_VERSION)
    k = len(set(clusters.values()))
    assert len({clusters[t] for t in order[:k]}) == k
    status = env.client.get("/status").get_json()["projects"][env.project]["stream"]
    assert status["sampling"] == "Uncertainty sampling" and status["label_stream"] == "uncertainty"
    assert [n["task"] for n in status["next"]] == order[:5]
    assert status["behind"]["versions"] == 0

    # switched back by a person: livetrain never switches it again; imported tasks join the stream
    project["sampling"] = "Sequential sampling"
    env.add(unlabeled=2)
    tasks_created(env, env.unlabeled[-2:])
    second = wait_stream_done(env, previous_job=first["job"])
    assert second["embedded"] == 10 and project["sampling"] == "Sequential sampling"
    for tid in env.unlabeled[:-2]:
        assert [p["model_version"] for p in env.fake.task_predictions(tid)] == [TYPICAL_VERSION]  # no duplicates
    # sequential now: no typical-first predictions for the new tasks (they would only keep Label Studio from
    # asking /predict for a pre-label), but they are clustered
    assert all(env.fake.task_predictions(t) == [] for t in env.unlabeled[-2:]) and second["typical_written"] == 0
    assert set(env.unlabeled) <= set(StreamState(env.redis, env.project).clusters())

    # a version: re-scoring's predictions carry the same clusters, the typical ones are replaced
    env.add(labeled=3)
    tasks_created(env, env.labeled)  # Label Studio sends it at the import; the labels come later (here: at once)
    version = session_version(env)
    wait_rescored(env, version)
    clusters = StreamState(env.redis, env.project).clusters()
    for tid in env.unlabeled:
        (prediction,) = env.fake.task_predictions(tid)
        assert prediction["model_version"] == version and prediction["cluster"] == clusters[tid]
    assert project["model_version"] == version
    status = wait_until(lambda: (s := env.client.get("/status").get_json()["projects"][env.project]["stream"])
                        .get("model_version") == version and s, timeout=30, what="the stream status")
    assert status["behind"]["versions"] == 0 and status["next"]
    assert sum(c["labeled"] for c in status["per_cluster"]) == 3


def test_keep_leaves_the_projects_sampling_alone(env):
    env.add(unlabeled=4)
    env.start_worker(LABEL_STREAM="keep")
    setup(env)
    report = wait_stream_done(env)
    project = env.fake.projects[int(env.project)]
    assert project["sampling"] == "Sequential sampling"
    assert report["embedded"] == 4 and report["typical_written"] == 0  # clustered; no typical-first predictions
    assert all(env.fake.task_predictions(t) == [] for t in env.unlabeled)  # Label Studio asks /predict as before
    assert "sampling switched" not in env.log()


def test_stream_command_sets_the_sampling_by_hand(env):
    run = lambda mode: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "backend.cli", "stream", env.project, mode],
        env=worker_env(env.tmp, env.settings.redis_url, env.fake.url, env.fake.token),
        capture_output=True, text=True, timeout=120)
    result = run("random")
    assert result.returncode == 0, result.stderr
    assert env.fake.projects[int(env.project)]["sampling"] == "Uniform sampling"
    assert "'Sequential sampling' -> 'Uniform sampling'" in result.stdout
    assert StreamState(env.redis, env.project).switched()["by"] == "livetrain stream"
    assert run("uncertainty").returncode == 0
    assert env.fake.projects[int(env.project)]["sampling"] == "Uncertainty sampling"
    bad = run("sideways")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
