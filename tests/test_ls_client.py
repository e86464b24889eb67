"""LabelStudioClient and labeled_image() against FakeLabelStudio, a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.errors import BadRequest, LivetrainError
from backend.labelstudio.annotations import LabeledImage, box_to_pixels, choose_annotation, labeled_image
from backend.labelstudio.client import (
    LabelStudioAuthError,
    LabelStudioClient,
    LabelStudioError,
    LabelStudioNotFound,
    LabelStudioUnavailable,
)
from backend.labelstudio.label_config import parse_label_config
from backend.settings import Settings
from tests.fake_label_studio import FakeLabelStudio

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Object" background="red"/>
    <Label value="Other" background="blue"/>
  </RectangleLabels>
</View>"""
PNG = b"\x89PNG\r\n\x1a\n fake"
CONTROL = parse_label_config(CONFIG).primary


@pytest.fixture
def fake():
    server = FakeLabelStudio()
    yield server
    server.close()


@pytest.fixture
def client(fake):
    with LabelStudioClient(fake.url, fake.token, timeout=5, page_size=3, summary_page_size=2) as c:
        yield c


def _project(fake, n_tasks=0):
    pid = fake.add_project(CONFIG, title="Boxes")
    return pid, [fake.add_task(pid, PNG, name=f"img{i}.png") for i in range(n_tasks)]


def _api_calls(fake, prefix="/api/tasks/"):
    return [path for method, path in fake.requests if path.startswith(prefix)]


# -- client --------------------------------------------------------------------------------
def test_project_through_sdk_and_patch_model_version(fake, client):
    pid, _ = _project(fake)
    project = client.project(pid)
    assert [project[k] for k in ("id", "title", "label_config", "model_version")] == [pid, "Boxes", CONFIG, ""]
    assert client.set_model_version(pid, "livetrain-3")["model_version"] == "livetrain-3"
    assert client.project(str(pid))["model_version"] == "livetrain-3"
    assert client.project(f"{pid}.1795333704")["id"] == pid  # the `project` string of /setup and /predict
    with pytest.raises(BadRequest):
        client.project("abc")
    assert ("PATCH", f"/api/projects/{pid}/") in fake.requests
    with pytest.raises(LabelStudioNotFound, match="project"):
        client.project(9999)


def test_iter_tasks_pages_and_filters_labeled(fake, client):
    pid, tids = _project(fake, 8)
    other, _ = _project(fake, 2)  # another project's tasks never show up
    for tid in tids[:7]:
        fake.annotate(tid, [fake.rect(10, 20, 30, 40, "Object")])
    fake.annotate(tids[7], [], was_cancelled=True)  # only a skip: not labeled
    fake.requests.clear()
    labeled = list(client.iter_tasks(pid))
    assert [t["id"] for t in labeled] == tids[:7]
    assert len(_api_calls(fake)) == 3  # 3 + 3 + 1 with page_size=3
    first = labeled[0]
    assert first["data"]["image"].startswith(f"/data/upload/{pid}/")
    ann = first["annotations"][0]
    assert {"id", "result", "was_cancelled", "ground_truth", "created_at", "updated_at", "completed_by"} <= set(ann)
    everything = list(client.iter_tasks(pid, only_labeled=False))
    assert [t["id"] for t in everything] == tids
    assert everything[7]["annotations"][0]["was_cancelled"] is True
    # the filter and keyset paging go in `query`, as Label Studio's Data Manager reads it
    query = json.loads(parse_qs(urlsplit(_api_calls(fake)[0]).query)["query"][0])
    labeled_filter = {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}
    assert labeled_filter in query["filters"]["items"]


def test_iter_tasks_survives_deletes_while_paging(fake, client):
    pid, tids = _project(fake, 7)
    seen = []
    for task in client.iter_tasks(pid, only_labeled=False):
        seen.append(task["id"])
        if len(seen) == 1:
            fake.delete_task(tids[1])  # page numbers would now skip a task; keyset paging does not
            fake.delete_task(tids[2])
    assert seen == tids  # 1, 2 came with the first page; page 2 by number would have skipped 3, 4, 5


def test_task_and_deleted_task(fake, client):
    pid, (tid, other) = _project(fake, 2)
    aid = fake.annotate(tid, [fake.rect(1, 2, 3, 4, "Other")])
    for task in (client.task(tid), client.task(tid, project_id=pid)):
        assert task["id"] == tid and task["annotations"][0]["id"] == aid
    assert client.task(other, project_id=pid)["annotations"] == []
    fake.requests.clear()
    batch = client.tasks_by_id(pid, [other, tid, tid, 777])
    assert sorted(batch) == [tid, other] and batch[tid]["annotations"][0]["id"] == aid
    assert len(_api_calls(fake)) == 1
    fake.delete_task(tid)
    assert sorted(client.tasks_by_id(pid, [tid, other])) == [other]
    assert client.tasks_by_id(12345, [other]) == {}
    assert client.task(tid) is None
    assert client.task(tid, project_id=pid) is None
    assert client.task(other, project_id=12345) is None  # a deleted project takes its tasks with it


def test_summaries_follow_annotation_changes(fake, client):
    pid, tids = _project(fake, 3)

    def summaries():
        return {s["id"]: s for s in client.task_summaries(pid)}

    before = summaries()
    assert set(before) == set(tids)
    assert set(before[tids[0]]) == {"id", "updated_at", "total_annotations", "cancelled_annotations"}
    fake.requests.clear()
    aid = fake.annotate(tids[0], [fake.rect(10, 10, 10, 10, "Object")])
    after_create = summaries()
    assert len(_api_calls(fake)) == 2  # 2 + 1 tasks with summary_page_size=2
    assert all("fields=task_only" in path for path in _api_calls(fake))
    assert after_create[tids[0]]["total_annotations"] == 1
    assert after_create[tids[0]]["updated_at"] > before[tids[0]]["updated_at"]
    assert after_create[tids[1]] == before[tids[1]]
    fake.update_annotation(aid, [])
    after_update = summaries()
    assert after_update[tids[0]]["updated_at"] > after_create[tids[0]]["updated_at"]
    fake.annotate(tids[1], [], was_cancelled=True)
    fake.delete_annotation(aid)
    after_delete = summaries()
    assert after_delete[tids[0]]["total_annotations"] == 0
    assert after_delete[tids[0]]["updated_at"] > after_update[tids[0]]["updated_at"]
    assert after_delete[tids[1]]["cancelled_annotations"] == 1
    assert list(client.task_summaries(pid, only_labeled=True)) == []


def test_personal_access_token(fake):
    pid, (tid,) = _project(fake, 1)
    fake.legacy_enabled = False
    with LabelStudioClient(fake.url, fake.pat, timeout=5) as pat_client:
        assert pat_client.project(pid)["id"] == pid  # SDK: exchanges the PAT itself
        assert [t["id"] for t in pat_client.iter_tasks(pid, only_labeled=False)] == [tid]
        assert pat_client.task(tid)["id"] == tid
        refreshes = [p for m, p in fake.requests if p == "/api/token/refresh/"]
        assert len(refreshes) == 2  # one for the SDK, one for our requests session, then cached
        fake._access.clear()  # access tokens revoked early: the next 401 makes the client exchange again
        assert pat_client.task(tid, project_id=pid)["id"] == tid
        assert len([p for m, p in fake.requests if p == "/api/token/refresh/"]) == 3


def test_auth_failures(fake):
    pid, _ = _project(fake)
    with LabelStudioClient(fake.url, "b" * 40, timeout=5) as bad:
        with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY") as info:
            list(bad.iter_tasks(pid))
        assert "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN" in info.value.message and "b" * 40 not in info.value.message
        with pytest.raises(LabelStudioAuthError):
            bad.project(pid)
        assert info.value.status == 502
    revoked = fake._jwt("refresh", time.time() + 3600)  # a well-formed PAT that LS does not know
    with LabelStudioClient(fake.url, revoked, timeout=5) as bad:
        with pytest.raises(LabelStudioAuthError, match="personal access token"):
            bad.task(1)
        with pytest.raises(LabelStudioAuthError):
            bad.project(pid)
    expired = fake._jwt("refresh", time.time() - 10)
    with LabelStudioClient(fake.url, expired, timeout=5) as bad:
        with pytest.raises(LabelStudioAuthError):
            bad.project(pid)  # the SDK refuses an expired PAT before sending anything


def test_unavailable_dead_port_and_5xx(fake):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: connection refused
        with LabelStudioClient(dead, "a" * 40, timeout=5, retries=0) as down:
            start = time.monotonic()
            for call in (lambda: list(down.iter_tasks(1)), lambda: down.task(1), lambda: down.project(1),
                         lambda: list(down.task_summaries(1))):
                with pytest.raises(LabelStudioUnavailable, match=dead) as info:
                    call()
                assert info.value.status == 503 and "LABEL_STUDIO_URL" in info.value.message
            assert time.monotonic() - start < 2.0
        with LabelStudioClient(dead, fake.pat, timeout=5, retries=0) as down:
            with pytest.raises(LabelStudioUnavailable):
                down.task(1)  # the PAT exchange itself cannot reach LS
    pid, _ = _project(fake, 1)
    fake.fail_status = 500
    with LabelStudioClient(fake.url, fake.token, timeout=5, retries=1) as client:
        with pytest.raises(LabelStudioUnavailable, match="HTTP 500"):
            list(client.iter_tasks(pid))
    fake.fail_status = None


def test_not_json_and_missing_project(fake, client):
    with pytest.raises(LabelStudioNotFound):
        list(client.iter_tasks(4242))
    with LabelStudioClient(fake.url + "/data/upload/x", fake.token, timeout=5) as wrong:  # not Label Studio's API
        with pytest.raises(LabelStudioError):
            list(wrong.iter_tasks(1))


def test_from_settings():
    with pytest.raises(BadRequest, match="LABEL_STUDIO_URL"):
        LabelStudioClient.from_settings(Settings(label_studio_api_key="k"))
    with pytest.raises(BadRequest, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient.from_settings(Settings(label_studio_url="http://ls:8080"))
    client = LabelStudioClient.from_settings(Settings(), fallback_url="ls:8080", fallback_key="Token " + "c" * 40)
    assert client.url == "http://ls:8080"
    assert issubclass(LabelStudioUnavailable, LivetrainError) and LabelStudioUnavailable.status == 503


def test_real_sdk_pages_the_fake(fake):
    """The fake is good enough for label-studio-sdk's own pager (page=1,2,... until 404)."""
    from label_studio_sdk import LabelStudio

    pid, tids = _project(fake, 5)
    sdk = LabelStudio(base_url=fake.url, api_key=fake.token)
    assert [t.id for t in sdk.tasks.list(project=pid, page_size=2)] == tids
    assert sdk.projects.get(id=pid).label_config == CONFIG


# -- labeled_image ---------------------------------------------------------------------------
def _ann(aid, regions, updated_at, was_cancelled=False, ground_truth=False):
    return {"id": aid, "result": regions, "was_cancelled": was_cancelled, "ground_truth": ground_truth,
            "created_at": updated_at, "updated_at": updated_at, "completed_by": 1}


def _task(*annotations, data=None):
    data = data if data is not None else {"image": "/data/upload/1/a.png"}
    return {"id": 7, "data": data, "annotations": list(annotations)}


R = FakeLabelStudio.rect


def test_labeled_image_rules(caplog):
    obj, other = R(10, 20, 30, 40, "Object"), R(50.5, 0, 25.25, 10, "Other")
    # newest non-cancelled annotation wins, percent boxes kept as is
    item = labeled_image(_task(_ann(1, [obj], "2026-01-01T10:00:00.000001Z"),
                               _ann(2, [obj, other], "2026-01-01T10:00:00.000002Z"),
                               _ann(3, [], "2026-01-01T11:00:00Z", was_cancelled=True)), CONTROL)
    assert item == LabeledImage(7, "/data/upload/1/a.png", 2, "2026-01-01T10:00:00.000002Z",
                                ((10.0, 20.0, 30.0, 40.0), (50.5, 0.0, 25.25, 10.0)), ("Object", "Other"))
    assert LabeledImage.from_json(json.loads(json.dumps(item.to_json()))) == item
    # ground truth is preferred even when older; same time -> higher id
    assert labeled_image(_task(_ann(4, [obj], "2026-01-01T09:00:00Z", ground_truth=True),
                               _ann(5, [other], "2026-01-02T09:00:00Z")), CONTROL).annotation_id == 4
    assert choose_annotation([_ann(8, [], "2026-01-01T09:00:00Z"), _ann(9, [], "2026-01-01T09:00:00+00:00")])["id"] == 9
    # unknown labels, zero-area boxes, other tags and other types dropped; when that leaves no region of an
    # annotation that marked regions, the image is left out (None): as a negative it would teach "background"
    caplog.set_level(logging.INFO, logger="backend.labelstudio.annotations")
    choice = {"from_name": "label", "type": "choices", "value": {"choices": ["Object"]}}
    junk = [R(1, 1, 5, 5, "Cat"), R(1, 1, 0, 5, "Object"), R(1, 1, 5, 5, "Object", from_name="other"), choice]
    assert labeled_image(_task(_ann(6, junk, "2026-01-01T09:00:00Z")), CONTROL) is None
    assert "Cat" in caplog.text and "not in the label config" in caplog.text and "none usable" in caplog.text
    kept = labeled_image(_task(_ann(6, junk + [obj], "2026-01-01T09:00:00Z")), CONTROL)
    assert kept.boxes == ((10.0, 20.0, 30.0, 40.0),)  # the usable region stays, the junk is dropped
    # no region at all (or only non-spatial fields like Choices): "nothing to find here", a negative
    assert labeled_image(_task(_ann(6, [], "2026-01-01T09:00:00Z")), CONTROL).is_negative
    assert labeled_image(_task(_ann(6, [choice], "2026-01-01T09:00:00Z")), CONTROL).is_negative
    # boxes that leave the image are clipped to it
    clipped = labeled_image(_task(_ann(1, [R(90, -10, 20, 30, "Object")], "t")), CONTROL)
    assert clipped.boxes == ((90.0, 0.0, 10.0, 20.0),)


def test_labeled_image_none_cases():
    assert labeled_image(_task(), CONTROL) is None
    assert labeled_image(_task(_ann(1, [], "2026-01-01T09:00:00Z", was_cancelled=True)), CONTROL) is None
    assert labeled_image(_task(_ann(1, [], "2026-01-01T09:00:00Z"), data={"text": "x"}), CONTROL) is None
    assert labeled_image(_task(_ann(1, [], "2026-01-01T09:00:00Z"), data={"image": ""}), CONTROL) is None


def test_labeled_image_from_fake_tasks(fake, client):
    pid, (tid,) = _project(fake, 1)
    fake.annotate(tid, [fake.rect(10, 20, 30, 40, "Object")])
    newer = fake.annotate(tid, [fake.rect(0, 0, 50, 50, "Other")])
    (task,) = client.iter_tasks(pid)
    item = labeled_image(task, CONTROL)
    assert (item.annotation_id, item.boxes, item.labels) == (newer, ((0.0, 0.0, 50.0, 50.0),), ("Other",))
    assert item.image_url == task["data"]["image"]


def test_box_to_pixels():
    assert box_to_pixels((10, 20, 30, 40), 200, 100) == (20.0, 20.0, 80.0, 60.0)
    assert box_to_pixels((90, -10, 20, 30), 100, 50) == (90.0, 0.0, 100.0, 10.0)
    assert box_to_pixels((0, 0, 100, 100), 64, 48) == (0.0, 0.0, 64.0, 48.0)


def test_prediction_batch_survives_a_task_deleted_since_the_listing(fake, client):
    from backend.jobs.rescoring import _write

    pid, tasks = _project(fake, n_tasks=3)
    fake.delete_task(tasks[1])  # Label Studio rejects a batch naming it (400) ...
    writes = [{"task": t, "result": [], "score": 0.5, "model_version": "Boxes-v1"} for t in tasks]
    with pytest.raises(LabelStudioError):
        client.create_predictions(pid, writes)
    assert _write(client, pid, writes) == 2  # ... so the batch is written again without it
    assert sorted(p["task"] for p in fake.predictions.values()) == [tasks[0], tasks[2]]
