"""End to end against a real Label Studio 1.23.2 (marker ``e2e``).

Label Studio is installed once into its own venv (``LS_VENV``, else ~/.cache/livetrain/label-studio-1.23.2)
and started on 127.0.0.1 with a throwaway data dir (backend/simulation/ls_server.py). livetrain runs as a
user runs it: ``livetrain serve`` (gunicorn + RQ worker + embedded Redis), with Basic auth on, talking to
Label Studio with a personal access token. The tests then do what a person does in Label Studio, through
its REST API, and run in file order (each builds on the project the previous ones left).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import pytest
import requests

from backend.simulation.ls_api import LabelStudioAPI, LabelStudioError
from backend.simulation.ls_server import LabelStudioServer
from backend.simulation.processes import LivetrainServer, alive
from tests.livetrain_fixtures import BRUSH_CONFIG, CONFIG, POLYGON_CONFIG, shapes_image, shapes_with_masks, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("ml-user", "ml-secret-pass")
WEBHOOK_SECRET = "e2e-webhook-secret"
IMAGES = 8
ROUND_TIMEOUT = 420


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    try:
        credentials = server.start()
        yield server, credentials
    finally:
        server.stop()
        assert server.proc is None or not alive(server.proc.pid), "Label Studio still running"


@pytest.fixture(scope="module")
def livetrain(label_studio, tmp_path_factory):
    _, credentials = label_studio
    env = {"LABEL_STUDIO_URL": credentials.url, "LABEL_STUDIO_API_KEY": credentials.pat,
           "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1], "MIN_ANNOTATIONS": 2, "MIN_SIZE": 128,
           "BATCH_SIZE": 2, "CHECKPOINT_EVERY": 3, "PUBLISH_INTERVAL": 2, "IDLE_AFTER": 1, "MIN_PASSES": 5,
           "DECAY_STEPS": 6, "WARMUP_STEPS": 2, "WEBHOOK_SECRET": WEBHOOK_SECRET}  # a few steps per session: enough for the mask heads to find shapes
    server = LivetrainServer(tmp_path_factory.mktemp("models"), env=env, cwd=ROOT)
    try:
        server.wait_ready(timeout=240)
        yield server
    finally:
        server.stop()
        assert len(server.stopped_pids) >= 3  # serve, its RQ worker, redis-server (and any work horse)
        wait_until(lambda: not any(alive(pid) for pid in server.stopped_pids), timeout=30,
                   what=f"livetrain's processes {server.stopped_pids} to exit")


@pytest.fixture(scope="module")
def ls(label_studio) -> LabelStudioAPI:
    return LabelStudioAPI(label_studio[1].url, token=label_studio[1].token)


@pytest.fixture(scope="module")
def project(ls, livetrain):
    """A RectangleLabels project with generated images, livetrain connected with Basic auth, and "Start
    model training on annotation submission" on."""
    created = ls.create_project("e2e shapes", CONFIG)
    shots = [shapes_image(seed, count=2) for seed in range(IMAGES)]
    tasks = ls.import_images(created["id"], [(f"shape{i}.png", png) for i, (png, _) in enumerate(shots)])
    assert len(tasks) == IMAGES
    by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
    tasks = [by_name[f"shape{i}.png"] for i in range(IMAGES)]
    ml = ls.connect_ml(created["id"], livetrain.url, auth_method="BASIC_AUTH", basic_auth_user=AUTH[0],
                       basic_auth_pass=AUTH[1])
    send_webhook_secret(ls, created["id"])
    ls.update_project(created["id"], start_training_on_annotation_update=True)
    return {"id": created["id"], "ml": ml, "tasks": tasks, "objects": [objects for _, objects in shots],
            "annotations": {}}


def send_webhook_secret(ls, project_id: int) -> None:
    """Add the secret header to the webhook Label Studio created for the connection (Settings > Webhooks > Headers
    in the UI): with WEBHOOK_SECRET set, event webhooks without it are refused."""
    hooks = [h for h in ls.request("GET", f"/api/webhooks/?project={project_id}") if h["url"].rstrip("/").endswith("/webhook")]
    assert hooks
    for hook in hooks:
        ls.request("PATCH", f"/api/webhooks/{hook['id']}/", json={"url": hook["url"], "headers": {"X-Livetrain-Secret": WEBHOOK_SECRET}})


def rectangles(objects, width=160, height=120) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": width,
             "original_height": height, "image_rotation": 0,
             "value": {"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                       "height": 100 * (y2 - y1) / height, "rotation": 0, "rectanglelabels": [label]}}
            for x1, y1, x2, y2, label in objects]


def status(livetrain, project) -> dict:
    reply = requests.get(livetrain.url + "/status", auth=AUTH, timeout=10)
    reply.raise_for_status()
    return reply.json()["projects"].get(str(project["id"]), {})


def active_version(livetrain, project) -> dict | None:
    reply = requests.get(livetrain.url + "/versions", params={"project": project["id"]}, auth=AUTH, timeout=10)
    reply.raise_for_status()
    return next((v for v in reply.json()["details"][str(project["id"])] if v["active"]), None)


def idle_with(livetrain, project, predicate):
    """The active version once no session is queued or running and ``predicate(version)`` holds."""
    s = status(livetrain, project)
    assert s.get("state") != "error", s.get("last_error")
    if s.get("state") != "idle":
        return None
    version = active_version(livetrain, project)
    return version if version and predicate(version) else None


def test_connect_with_basic_auth(ls, livetrain, project):
    ml = ls.ml(project["ml"]["id"])
    assert ml["state"] == "CO", ml  # connected: GET /health and POST /setup answered with Basic auth
    assert ml["model_version"] == "livetrain-base"  # what our /setup returned before any version
    # without the credentials Label Studio cannot connect: our /health and /setup answer 401
    with pytest.raises(LabelStudioError):
        ls.connect_ml(project["id"], livetrain.url, title="no auth")
    # event webhooks cannot carry Basic auth, so LS auto-created one to our /webhook without it
    hooks = ls.request("GET", f"/api/webhooks/?project={project['id']}")
    assert any(h["url"].rstrip("/").endswith("/webhook") for h in hooks)


def test_cold_start_prediction_is_stored(ls, livetrain, project):
    """Before any version a task carries the label stream's typical-first prediction: no regions (no pretrained
    head for these labels), a score and a cluster."""
    wait_until(lambda: (status(livetrain, project).get("stream_job") or {}).get("state") == "done",
               timeout=ROUND_TIMEOUT, interval=1.0, what="the label stream job after connecting")
    task = ls.open_task(project["tasks"][-1]["id"])  # the labeling UI opening a task
    ours = [p for p in task["predictions"] if p["model_version"] == "livetrain-typical"]
    assert len(ours) == 1, task["predictions"]
    assert ours[0]["result"] == [] and isinstance(ours[0]["cluster"], int) and isinstance(ours[0]["score"], float)


def test_submits_train_a_version_that_serves_predictions(ls, livetrain, project):
    for i in range(4):
        annotation = ls.annotate(project["tasks"][i]["id"], rectangles(project["objects"][i]), lead_time=2.0)
        project["annotations"][i] = annotation["id"]
    version = wait_until(lambda: idle_with(livetrain, project, lambda v: v["images"] == 4), timeout=ROUND_TIMEOUT,
                         interval=1.0, what="a version trained on the 4 submitted images")
    project["v1"] = version
    assert set(version["trained_annotations"]) == {str(t["id"]) for t in project["tasks"][:4]}
    assert version["name"] in ls.ml_versions(project["ml"]["id"])["versions"]  # LS -> GET /versions
    # a task opened gets a prediction of the new version (re-scoring writes it, or /predict when it has none),
    # with a score, stored in Label Studio
    def fresh(task_id):
        task = ls.open_task(task_id)
        return [p for p in task["predictions"] if p["model_version"] == version["name"]]

    ours = wait_until(lambda: fresh(project["tasks"][5]["id"]), timeout=ROUND_TIMEOUT, interval=1.0,
                      what="a prediction of the final version on an unlabeled task")
    assert isinstance(ours[0]["score"], float) and 0.0 <= ours[0]["score"] <= 1.0
    for region in ours[0]["result"]:
        assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"][0] in ("Square", "Disc")


def test_images_fetched_with_legacy_token_and_pat(label_studio, project):
    from backend.labelstudio.images import ImageFetcher
    from backend.settings import Settings

    credentials = label_studio[1]
    url = project["tasks"][0]["data"]["image"]
    assert url.startswith("/data/upload/")
    for key in (credentials.token, credentials.pat):
        settings = dataclasses.replace(Settings.from_env(), label_studio_url=credentials.url, label_studio_api_key=key,
                                       model_dir=Path(label_studio[0].run_dir) / f"cache-{len(key)}")
        assert ImageFetcher(settings).fetch(url).size == (160, 120)
    anonymous = requests.get(credentials.url + url, timeout=10)
    assert anonymous.status_code in (401, 403)  # so the fetches above really authenticated


def test_update_and_delete_reach_the_next_version(ls, livetrain, project):
    v1 = project["v1"]
    updated, deleted = project["tasks"][1]["id"], project["tasks"][2]["id"]
    refused_before = webhooks_refused(livetrain)
    ls.update_annotation(project["annotations"][1], result=rectangles(project["objects"][1][:1]))
    ls.delete_annotation(project["annotations"][2])
    version = wait_until(lambda: idle_with(livetrain, project, lambda v: str(deleted) not in v["trained_annotations"]
                                           and v["trained_annotations"].get(str(updated))
                                           != v1["trained_annotations"][str(updated)]),
                         timeout=ROUND_TIMEOUT, interval=1.0, what="a version with the update and the deletion")
    assert version["name"] != v1["name"] and version["images"] == 3
    assert ls.ml(project["ml"]["id"])["state"] == "CO"  # no webhook or training call put the connection in error
    # Label Studio's event webhooks carried WEBHOOK_SECRET in their header: counted, none refused
    metrics = requests.get(livetrain.url + "/metrics", auth=AUTH, timeout=10).text
    assert re.search(r'livetrain_webhook_events_total\{action="ANNOTATIONS_DELETED"\} [1-9]', metrics), metrics[-2000:]
    assert webhooks_refused(livetrain) == refused_before


def webhooks_refused(livetrain) -> float:
    """How many /webhook calls got a 401 so far (GET /metrics)."""
    metrics = requests.get(livetrain.url + "/metrics", auth=AUTH, timeout=10).text
    found = re.search(r'livetrain_http_requests_total\{[^}]*route="/webhook"[^}]*status="401"[^}]*\} (\S+)', metrics)
    return float(found[1]) if found else 0.0



def test_unlabeled_tasks_rescored_and_served_lowest_score_first(ls, livetrain, project):
    """After a session, livetrain writes a prediction of the new version with a score for every unlabeled task
    and moves the project's model_version to it, so Label Studio's uncertainty sampling has scores to use."""
    version = wait_until(lambda: idle_with(livetrain, project, lambda v: True), timeout=ROUND_TIMEOUT, interval=1.0,
                         what="no session pending")["name"]

    def rescored():
        s = status(livetrain, project).get("rescore") or {}
        assert s.get("state") != "error", s
        return s.get("state") == "done" and s.get("version") == version and ls.project(project["id"])["model_version"] == version
    wait_until(rescored, timeout=ROUND_TIMEOUT, interval=1.0, what=f"re-scoring with {version}")
    unlabeled = [t for t in ls.tasks(project["id"]) if not t["total_annotations"]]
    assert len(unlabeled) == IMAGES - 3  # 4 annotated, one of them deleted again
    for task in unlabeled:
        ours = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(ours) == 1 and isinstance(ours[0]["score"], float), task["predictions"]
        assert task["predictions_score"] == pytest.approx(ours[0]["score"])
        assert not [p for p in task["predictions"] if p["model_version"] != version]  # older versions cleaned up
    allowed, keys = expected_next(ls, project["id"], version)  # least-covered cluster, then lowest score
    served = ls.next_task(project["id"])
    assert served["id"] in allowed, (served["id"], allowed, keys)

@pytest.mark.parametrize("via,order", [("label-studio", "sequential"), ("backend", "sequential"),
                                       ("label-studio", "next")])
def test_simulator_replays_a_coco_dataset(ls, livetrain, tmp_path, via, order):
    import json

    from backend.simulation.session import Simulation, SimulationConfig

    images, annotations = [], []
    (tmp_path / "images").mkdir()
    pool = 5 if order == "next" else 3  # next: Label Studio's /next/ picks 3 of 5
    for i in range(pool):
        png, objects = shapes_image(100 + i, count=2)
        (tmp_path / "images" / f"s{i}.png").write_bytes(png)
        images.append({"id": i + 1, "file_name": f"images/s{i}.png", "width": 160, "height": 120, "split": "train"})
        annotations += [{"id": len(annotations) + k + 1, "image_id": i + 1, "category_id": 1 if label == "Square" else 2,
                         "bbox": [x1, y1, x2 - x1, y2 - y1]} for k, (x1, y1, x2, y2, label) in enumerate(objects)]
    categories = [{"id": 1, "name": "Square"}, {"id": 2, "name": "Disc"}]
    (tmp_path / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                           "categories": categories}))
    config = SimulationConfig(data=tmp_path, images=3, via=via, pace=0.0, title=f"simulation via {via}",
                              session_timeout=0, order=order, pool=pool)  # the end-of-session wait is unit-tested
    summary = Simulation(config, ls, livetrain.url, tmp_path / "out", ml_auth=AUTH).run()
    records = [json.loads(line) for line in (tmp_path / "out" / "simulation.jsonl").read_text().splitlines()]
    assert [r["n"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["quality"] <= 1.0 and r["model_version"] for r in records)
    assert summary["images"] == 3 and summary["pool"] == pool and (tmp_path / "out" / "quality.png").stat().st_size > 0
    assert len({r["task"] for r in records}) == 3
    if order == "next":  # each pick says which version's scores ordered it and how stale they were
        assert all("versions_behind" in r and "stream_version" in r for r in records)
        assert "picks_by_stream" in summary
    # the ground truth went into Label Studio as annotations: the picked tasks, no others
    tasks = ls.tasks(summary["project"])
    assert sorted(t["id"] for t in tasks if t["total_annotations"] == 1) == sorted(r["task"] for r in records)
    assert sum(t["total_annotations"] for t in tasks) == 3


# -- Mask R-CNN projects: PolygonLabels and BrushLabels ---------------------------------------------------
# One pipeline for both kinds: each test is parametrized by ``kind`` and runs for the polygon project, then
# the brush project, so the brush project's round trains while the polygon project's is being checked.

MASK_IMAGES = 6
MASK_ANNOTATED = 3  # MIN_ANNOTATIONS is 2: the first version is trained on these
MASK_KINDS = {"polygon": (POLYGON_CONFIG, "polygonlabels"), "brush": (BRUSH_CONFIG, "brushlabels")}
MASK_LABELS = ("Square", "Disc")
W, H = 160, 120


@pytest.fixture(scope="module")
def mask_projects(ls, livetrain):
    """A PolygonLabels and a BrushLabels project with generated images, livetrain connected with Basic
    auth, and "Start model training on annotation submission" on."""
    out = {}
    for kind, (config, result_type) in MASK_KINDS.items():
        created = ls.create_project(f"e2e {kind} masks", config)
        shots = [shapes_with_masks(200 + seed, W, H, count=2) for seed in range(MASK_IMAGES)]
        tasks = ls.import_images(created["id"], [(f"{kind}{i}.png", png) for i, (png, _) in enumerate(shots)])
        assert len(tasks) == MASK_IMAGES
        by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
        ml = ls.connect_ml(created["id"], livetrain.url, auth_method="BASIC_AUTH", basic_auth_user=AUTH[0],
                           basic_auth_pass=AUTH[1])
        send_webhook_secret(ls, created["id"])
        ls.update_project(created["id"], start_training_on_annotation_update=True)
        out[kind] = {"id": created["id"], "ml": ml, "kind": kind, "type": result_type,
                     "tasks": [by_name[f"{kind}{i}.png"] for i in range(MASK_IMAGES)],
                     "objects": [objects for _, objects in shots], "annotated": set()}
    return out


@pytest.fixture(params=list(MASK_KINDS))
def mask_project(request, mask_projects):
    return mask_projects[request.param]


def mask_results(kind: str, objects, width: int = W, height: int = H) -> list[dict]:
    """What the labeling editor submits for ground-truth masks: one polygon per part, closed, in percent of
    the image; or one 0/255 brush RLE of the full frame per object. Every result has its own id."""
    from backend.labelstudio.masks import mask_to_polygons, mask_to_rle

    results = []
    for mask, label in objects:
        if kind == "polygon":
            values = [{"points": points, "closed": True, "polygonlabels": [label]}
                      for points in mask_to_polygons(mask, width, height)]
        else:
            values = [{"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}]
        results += [{"id": uuid.uuid4().hex[:10], "from_name": "label", "to_name": "image", "type": f"{kind}labels",
                     "origin": "manual", "original_width": width, "original_height": height, "image_rotation": 0,
                     "value": value} for value in values]
    return results


def check_mask_regions(result: list[dict], result_type: str) -> None:
    """Every region of a stored prediction is one Label Studio can draw: the project's tag and labels, a
    closed polygon of >= 3 points inside 0..100, or an RLE of exactly the image's size."""
    from backend.labelstudio.masks import rle_to_mask

    ids = [region.get("id") for region in result]
    assert all(ids) and len(set(ids)) == len(ids), ids
    for region in result:
        assert region["type"] == result_type and region["from_name"] == "label" and region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == (W, H)
        assert isinstance(region["score"], float) and 0.0 <= region["score"] <= 1.0
        value = region["value"]
        assert len(value[result_type]) == 1 and value[result_type][0] in MASK_LABELS, value[result_type]
        if result_type == "polygonlabels":
            points = value["points"]
            assert value["closed"] is True and len(points) >= 3
            assert all(len(p) == 2 and 0.0 <= p[0] <= 100.0 and 0.0 <= p[1] <= 100.0 for p in points), points
        else:
            assert value["format"] == "rle"
            mask = rle_to_mask(value["rle"], W, H)  # ValueError unless it decodes to exactly 160x120
            assert mask.shape == (H, W) and mask.any()


def test_mask_annotations_submitted_as_the_editor_does(ls, mask_project):
    from backend.labelstudio.masks import mask_iou, polygon_to_mask, rle_to_mask

    ml = ls.ml(mask_project["ml"]["id"])
    assert ml["state"] == "CO", ml  # GET /health and POST /setup answered the mask project's label config
    for i in range(MASK_ANNOTATED):
        objects = mask_project["objects"][i]
        annotation = ls.annotate(mask_project["tasks"][i]["id"], mask_results(mask_project["kind"], objects),
                                 lead_time=2.0)
        mask_project["annotated"].add(i)
        # Label Studio stores the shapes as sent: they decode back to the ground truth
        stored = ls.request("GET", f"/api/annotations/{annotation['id']}/")["result"]
        assert len(stored) >= len(objects)
        if mask_project["kind"] == "brush":
            for region, (mask, label) in zip(stored, objects):
                assert region["value"]["brushlabels"] == [label]
                assert (rle_to_mask(region["value"]["rle"], W, H) == mask).all()
        else:
            for mask, _ in objects:
                drawn = [polygon_to_mask(r["value"]["points"], W, H) for r in stored]
                assert max(mask_iou(d, mask) for d in drawn) > 0.9


def test_mask_project_trains_a_version_that_serves_predictions(ls, livetrain, mask_project):
    annotated = {str(mask_project["tasks"][i]["id"]) for i in mask_project["annotated"]}
    version = wait_until(lambda: idle_with(livetrain, mask_project,
                                           lambda v: set(v["trained_annotations"]) == annotated),
                         timeout=ROUND_TIMEOUT, interval=1.0,
                         what=f"a {mask_project['kind']} version trained on the {len(annotated)} submitted images")
    mask_project["version"] = version["name"]
    assert set(version["classes"]) == set(MASK_LABELS)  # the config's labels (both occur in the 3 images)
    assert version["name"] in ls.ml_versions(mask_project["ml"]["id"])["versions"]  # LS -> GET /versions
    # a task opened now gets a prediction of the new version (unless re-scoring wrote it first), stored in LS
    def fresh():  # re-scoring writes the final version's prediction (or /predict does, for a task with none)
        task = ls.open_task(mask_project["tasks"][-1]["id"])
        return [p for p in task["predictions"] if p["model_version"] == version["name"]]

    ours = wait_until(fresh, timeout=ROUND_TIMEOUT, interval=1.0, what="a prediction of the final mask version")
    assert len(ours) == 1, ours
    assert isinstance(ours[0]["score"], float) and 0.0 <= ours[0]["score"] <= 1.0
    check_mask_regions(ours[0]["result"], mask_project["type"])


def test_mask_predictions_rescored_and_served_lowest_score_first(ls, livetrain, mask_project):
    """As for boxes: after the round, every unlabeled task has one prediction of the new version (polygons or
    brush masks Label Studio can draw) and /next/ serves a lowest-score one."""
    version = mask_project["version"]

    def rescored():
        s = status(livetrain, mask_project).get("rescore") or {}
        assert s.get("state") != "error", s
        return (s.get("state") == "done" and s.get("version") == version
                and ls.project(mask_project["id"])["model_version"] == version)
    wait_until(rescored, timeout=ROUND_TIMEOUT, interval=1.0, what=f"re-scoring with {version}")
    unlabeled = [t for t in ls.tasks(mask_project["id"]) if not t["total_annotations"]]
    assert len(unlabeled) == MASK_IMAGES - len(mask_project["annotated"])
    regions, scores = 0, []
    for task in unlabeled:
        ours = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(ours) == 1 and isinstance(ours[0]["score"], float), task["predictions"]
        assert task["predictions_score"] == pytest.approx(ours[0]["score"])
        assert not [p for p in task["predictions"] if p["model_version"] != version]  # older versions cleaned up
        check_mask_regions(ours[0]["result"], mask_project["type"])
        regions += len(ours[0]["result"])
        scores += [r["score"] for r in ours[0]["result"]]
    print(f"{mask_project['kind']}: {regions} regions over {len(unlabeled)} unlabeled tasks with {version}",
          sorted(round(s, 3) for s in scores))
    assert regions >= 1, f"{version} predicted no {mask_project['type']} region on any unlabeled task"
    allowed, keys = expected_next(ls, mask_project["id"], version)  # least-covered cluster, then lowest score
    served = ls.next_task(mask_project["id"])
    assert served["id"] in allowed, (served["id"], allowed, keys)


def inside(point, polygon) -> bool:
    """Ray casting: is ``point`` inside ``polygon`` (both in percent)?"""
    x, y, found = point[0], point[1], False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            found = not found
    return found


def free_vertex(polygons: list, box) -> tuple[int, int, tuple[float, float]]:
    """(polygon index, vertex index, drag in screen pixels): a vertex away from the image's edges whose start, path
    and end lie in no other polygon (predictions of a young model overlap), the farthest from the edges first."""
    candidates = []
    for index, points in enumerate(polygons):
        others = [p for j, p in enumerate(polygons) if j != index]
        for vertex, (x, y) in enumerate(points):
            by = (20.0 if x < 50 else -20.0, 20.0 if y < 50 else -20.0)
            path = [(x + f * 100 * by[0] / box[2], y + f * 100 * by[1] / box[3]) for f in (0.0, 0.5, 1.0)]
            if not any(inside(p, other) for p in path for other in others):
                candidates.append((min(x, 100 - x, y, 100 - y), index, vertex, by))
    assert candidates, f"every vertex of the {len(polygons)} predicted polygons lies in another one"
    _, index, vertex, by = max(candidates)
    return index, vertex, by


def same_points(a: list, b: list, tolerance: float) -> bool:
    return len(a) == len(b) and all(abs(p - q) <= tolerance for u, v in zip(a, b) for p, q in zip(u, v))


def test_the_editor_shows_the_prediction_and_trains_on_what_the_annotator_submits(ls, livetrain, label_studio,
                                                                                   mask_project, browser):
    """Label Studio's labeling page in a real browser, as an annotator opens a task: the editor's draft holds
    every region of livetrain's prediction with its label and shape; in the polygon project the annotator drags
    one vertex, in the brush project accepts the masks as they are; Submit stores that, and the next version is
    trained on exactly that annotation."""
    from backend.labelstudio.masks import rle_to_mask
    from backend.simulation.editor import LISTED, LabelingPage
    from backend.simulation.ls_server import PASSWORD, USER

    version, kind, result_type = mask_project["version"], mask_project["kind"], mask_project["type"]
    unlabeled = [t for t in ls.tasks(mask_project["id"]) if not t["total_annotations"]]
    predicted = {t["id"]: p for t in unlabeled for p in t["predictions"] if p["model_version"] == version}
    task_id = max(predicted, key=lambda t: (len(predicted[t]["result"]), -t))  # the task with the most regions
    regions = predicted[task_id]["result"]
    assert regions and ls.project(mask_project["id"])["model_version"] == version
    page = LabelingPage(browser, label_studio[1].url, USER, PASSWORD)
    try:
        shown = page.open(mask_project["id"], task_id, len(regions))
        labels = sorted(r["value"][result_type][0] for r in regions)
        assert sorted(r["value"][result_type][0] for r in shown.draft) == labels
        if len(regions) <= LISTED:  # what the annotator sees listed: one item per region (a virtual list past that)
            assert sorted(shown.outliner) == labels
        assert shown.outliner and set(shown.outliner) <= set(labels)
        assert {r["id"] for r in shown.draft} == {r["id"] for r in regions}
        by_id = {r["id"]: r for r in regions}
        for drawn in shown.draft:
            mine = by_id[drawn["id"]]["value"]
            if kind == "polygon":
                assert same_points(drawn["value"]["points"], mine["points"], 1e-3)
            else:
                assert (rle_to_mask(drawn["value"]["rle"], W, H) == rle_to_mask(mine["rle"], W, H)).all()
        moved = None
        if kind == "polygon":  # drag a vertex 20 px towards the image's centre, where no other region lies
            box = page.image_box()
            index, vertex, by = free_vertex([r["value"]["points"] for r in shown.draft], box)
            page.drag_point(index, shown.draft[index]["value"]["points"][vertex], by)
            moved = (shown.draft[index]["id"], vertex, (100 * by[0] / box[2], 100 * by[1] / box[3]))
        page.submit()
        assert not page.problems, page.problems
    finally:
        page.close()
    annotation, = ls.request("GET", f"/api/tasks/{task_id}/annotations/")
    stored = {r["id"]: r for r in annotation["result"]}
    assert set(stored) == set(by_id)
    for region_id, region in stored.items():
        mine = by_id[region_id]["value"]
        assert region["value"][result_type] == mine[result_type]
        if kind == "brush":
            assert (rle_to_mask(region["value"]["rle"], W, H) == rle_to_mask(mine["rle"], W, H)).all()
            continue
        expected = [list(p) for p in mine["points"]]
        if moved and region_id == moved[0]:  # exactly the dragged vertex moved, by the drag
            i, (dx, dy) = moved[1], moved[2]
            expected[i] = [expected[i][0] + dx, expected[i][1] + dy]
        assert same_points(region["value"]["points"], expected, 0.3), (region_id, moved, region["value"]["points"])
    assert moved is None or stored[moved[0]]["value"]["points"][moved[1]] != by_id[moved[0]]["value"]["points"][moved[1]]
    mask_project["annotated"].add(next(i for i, t in enumerate(mask_project["tasks"]) if t["id"] == task_id))
    wait_until(lambda: idle_with(livetrain, mask_project,
                                 lambda v: v["trained_annotations"].get(str(task_id)) == annotation["updated_at"]),
               timeout=ROUND_TIMEOUT, interval=1.0, what=f"a {kind} version trained on the annotation the editor submitted")


# -- the label stream ------------------------------------------------------------------------------------------
# A project created with Label Studio's default "Sequential sampling": connecting livetrain switches it to
# uncertainty sampling, /next/ serves typical tasks of uncovered clusters before any version, and after versions
# the lowest-score task of the least-covered cluster. Images come in three tints, 18 tasks: three clusters.

STREAM_GROUPS = ((230, 50, 50), (50, 70, 230), (60, 200, 60))
STREAM_SIZES = (7, 6, 5)


def tinted_shapes(seed: int, tint) -> tuple[bytes, list]:
    import io

    import numpy as np
    from PIL import Image

    png, objects = shapes_image(seed, count=2)
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    out = Image.fromarray((0.45 * array + 0.55 * np.asarray(tint, np.float32)).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), objects


def expected_next(ls, project_id: int, model_version: str) -> tuple[set[int], dict]:
    """The tasks Label Studio 1.23.2's uncertainty sampling may serve next (next_task.py, one annotator): among
    unlabeled tasks with a prediction of the project's model_version, the least-covered cluster (a labeled task
    counts for the largest cluster among its predictions), then the lowest score. Returns (ids, by id)."""
    from collections import Counter

    tasks = ls.tasks(project_id)
    covered = Counter(max((p["cluster"] for p in t["predictions"] if p["cluster"] is not None), default=None)
                      for t in tasks if t["total_annotations"])
    keys = {}
    for t in tasks:
        if t["total_annotations"]:
            continue
        for p in t["predictions"]:
            if p["model_version"] == model_version:
                keys[t["id"]] = (covered.get(p["cluster"], 0), p["score"], p["cluster"])
    best = min(k[:2] for k in keys.values())
    return {t for t, k in keys.items() if k[:2] == best}, keys


@pytest.fixture(scope="module")
def stream_project(ls, livetrain):
    created = ls.create_project("e2e stream", CONFIG, sampling="Sequential sampling")
    shots, seed = [], 500
    for tint, size in zip(STREAM_GROUPS, STREAM_SIZES):
        for _ in range(size):
            shots.append(tinted_shapes(seed, tint))
            seed += 1
    tasks = ls.import_images(created["id"], [(f"stream{i}.png", png) for i, (png, _) in enumerate(shots)])
    by_name = {t["data"]["image"].rsplit("-", 1)[-1]: t for t in tasks}
    assert ls.project(created["id"])["sampling"] == "Sequential sampling"
    ml = ls.connect_ml(created["id"], livetrain.url, auth_method="BASIC_AUTH", basic_auth_user=AUTH[0],
                       basic_auth_pass=AUTH[1])
    send_webhook_secret(ls, created["id"])
    ids = [by_name[f"stream{i}.png"]["id"] for i in range(len(shots))]
    return {"id": created["id"], "ml": ml, "tasks": ids, "objects": {t: o for t, (_, o) in zip(ids, shots)}}


def test_connecting_switches_sequential_to_uncertainty_and_serves_typical_tasks_of_uncovered_clusters(
        ls, livetrain, stream_project):
    from collections import Counter

    from backend.model_store.versions import TYPICAL_VERSION

    pid = stream_project["id"]
    wait_until(lambda: (status(livetrain, stream_project).get("stream_job") or {}).get("state") == "done"
               and ls.project(pid)["model_version"] == TYPICAL_VERSION, timeout=ROUND_TIMEOUT, interval=1.0,
               what="the label stream job after connecting")
    assert ls.project(pid)["sampling"] == "Uncertainty sampling"
    tasks = ls.tasks(pid)
    clusters = {}
    for t in tasks:
        (ours,) = [p for p in t["predictions"] if p["model_version"] == TYPICAL_VERSION]
        assert ours["result"] == [] and isinstance(ours["cluster"], int) and 0 <= ours["score"] < 1
        clusters[t["id"]] = ours["cluster"]
    k = len(set(clusters.values()))
    assert k == 3  # 18 tasks: round(sqrt(18 / 2)) clusters
    sizes = Counter(clusters.values())
    served_clusters = []
    for _ in range(k):
        if ls.project(pid)["model_version"] != TYPICAL_VERSION:
            break  # a first version took over (MIN_ANNOTATIONS labels): its own order is tested below
        allowed, keys = expected_next(ls, pid, TYPICAL_VERSION)
        served = ls.next_task(pid)
        assert served["id"] in allowed, (served["id"], allowed, keys)
        served_clusters.append(clusters[served["id"]])
        ls.annotate(served["id"], rectangles(stream_project["objects"][served["id"]]), lead_time=1.0)
    assert len(served_clusters) >= 2 and len(set(served_clusters)) == len(served_clusters), served_clusters
    # the first served task is the most typical image of a largest cluster
    assert sizes[served_clusters[0]] == max(sizes.values()), (served_clusters, sizes)


def test_after_versions_next_serves_the_lowest_score_of_the_least_covered_cluster(ls, livetrain, stream_project):
    pid = stream_project["id"]
    labeled = [t["id"] for t in ls.tasks(pid) if t["total_annotations"]]
    for tid in [t for t in stream_project["tasks"] if t not in labeled][:3 - len(labeled)]:
        ls.annotate(tid, rectangles(stream_project["objects"][tid]), lead_time=1.0)
    version = wait_until(lambda: idle_with(livetrain, stream_project, lambda v: v["images"] >= 3),
                         timeout=ROUND_TIMEOUT, interval=1.0, what="a version of the stream project")["name"]

    def rescored():
        s = status(livetrain, stream_project).get("rescore") or {}
        assert s.get("state") != "error", s
        return s.get("state") == "done" and s.get("version") == version and ls.project(pid)["model_version"] == version
    wait_until(rescored, timeout=ROUND_TIMEOUT, interval=1.0, what=f"re-scoring with {version}")
    unlabeled = [t for t in ls.tasks(pid) if not t["total_annotations"]]
    assert all(isinstance(p["cluster"], int) for t in unlabeled for p in t["predictions"])
    for _ in range(2):  # label what is served, and the next pick follows the new coverage
        allowed, keys = expected_next(ls, pid, version)
        served = ls.next_task(pid)
        assert served["id"] in allowed, (served["id"], allowed, keys)
        ls.annotate(served["id"], rectangles(stream_project["objects"][served["id"]]), lead_time=1.0)
        if ls.project(pid)["model_version"] != version:
            break
    stream = status(livetrain, stream_project)["stream"]
    assert stream["sampling"] == "Uncertainty sampling" and stream["clusters"] == 3
    assert stream["next"] and stream["behind"]["versions"] >= 0


def test_label_stream_keep_leaves_the_sampling_alone(ls, label_studio, tmp_path_factory):
    _, credentials = label_studio
    env = {"LABEL_STUDIO_URL": credentials.url, "LABEL_STUDIO_API_KEY": credentials.pat, "LABEL_STREAM": "keep",
           "MIN_SIZE": 128}
    server = LivetrainServer(tmp_path_factory.mktemp("models-keep"), env=env, cwd=ROOT)
    try:
        server.wait_ready(timeout=240)
        created = ls.create_project("e2e keep", CONFIG, sampling="Sequential sampling")
        ls.import_images(created["id"], [(f"keep{i}.png", shapes_image(700 + i)[0]) for i in range(4)])
        ls.connect_ml(created["id"], server.url)

        def done():
            reply = requests.get(server.url + "/status", timeout=10).json()["projects"].get(str(created["id"]), {})
            return (reply.get("stream_job") or {}).get("state") == "done" and reply
        report = wait_until(done, timeout=ROUND_TIMEOUT, interval=1.0, what="the label stream job (keep)")
        assert ls.project(created["id"])["sampling"] == "Sequential sampling"
        assert report["stream"]["label_stream"] == "keep" and report["stream"]["sampling"] == "Sequential sampling"
    finally:
        server.stop()
