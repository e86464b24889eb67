"""MODEL_STORE=s3://...: model versions in an S3-compatible object store (moto's server on 127.0.0.1).

A publisher in this process, a web process on its own MODEL_DIR (another machine, as far as it can tell):
the web process serves what was published within seconds, rollback switches it, and a half-uploaded version
is never listed or served."""

from __future__ import annotations

import logging
import dataclasses
import os
import time

import pytest
import requests
import torch

from backend.errors import BadRequest
from backend.inference.predictor import BASE_VERSION
from backend.model_store import object_store
from backend.model_store.stores import list_projects, version_store
from backend.model_store.weights import resolve_starting_weights
from backend.settings import Settings
from backend.simulation.processes import LivetrainServer
from tests.conftest import BOX_CONFIG, png_bytes
from tests.livetrain_fixtures import wait_until

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "livetrain-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port with one bucket; yields its endpoint URL."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def settings_for(model_dir, endpoint, prefix) -> Settings:
    return Settings(model_dir=model_dir, model_store=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=endpoint,
                    download_weights=False, min_size=128)


def upload_half(endpoint, prefix, project, name) -> None:
    """What a publisher killed between its two uploads leaves: model.pt without meta.json."""
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket=BUCKET, Key=f"{prefix}/{project}/versions/{name}/model.pt", Body=b"half a model")


def put_active(endpoint, prefix, project, name) -> None:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=BUCKET, Key=f"{prefix}/{project}/ACTIVE", Body=name.encode())


def test_versions_in_the_bucket(tmp_path, s3, monkeypatch):
    settings = settings_for(tmp_path / "worker", s3, "unit")
    store = version_store(settings, "3")
    assert isinstance(store, object_store.ObjectVersionStore) and store.names() == [] and store.active() is None
    assert store.marker() == 0
    v1 = store.publish({"w": torch.ones(2)}, {"classes": ["a"]}, "My Cells")
    v2 = store.publish({"w": torch.full((2,), 2.0)}, {"classes": ["a"]}, "My Cells")
    assert (v1, v2) == ("my-cells-v1", "my-cells-v2") and store.names() == [v1, v2] and store.active() == v2
    assert list_projects(settings) == ["3"]
    # a machine with an empty MODEL_DIR reads the same versions (and caches the weights it downloads)
    other = version_store(settings_for(tmp_path / "web", s3, "unit"), "3")
    state, meta = other.load(v2)
    assert torch.equal(state["w"], torch.full((2,), 2.0)) and meta["name"] == v2
    assert len(list((tmp_path / "web" / ".cache" / "versions" / "3").glob(f"{v2}.*.pt"))) == 1
    # rollback: ACTIVE's marker changes, and both machines see it
    marker = other.marker()
    store.set_active(v1)
    assert other.active() == v1 and other.marker() != marker
    store.update_meta(v1, quality=0.5)
    assert other.meta(v1)["quality"] == 0.5 and [m["active"] for m in other.list()] == [True, False]
    # a half upload is invisible: not listed, not activatable, not loadable; its name is never reused
    upload_half(s3, "unit", "3", "my-cells-v3")
    assert store.names() == [v1, v2]
    with pytest.raises(BadRequest):
        store.set_active("my-cells-v3")
    with pytest.raises(FileNotFoundError):
        other.load("my-cells-v3")
    put_active(s3, "unit", "3", "my-cells-v3")  # even if ACTIVE names it
    assert other.active() is None
    store.set_active(v1)
    assert store.publish({"w": torch.zeros(2)}, {"classes": ["a"]}, "My Cells", keep=1) == "my-cells-v4"
    # prune keeps the newest, the active and the best (v1: the only one rated); the stale half upload goes
    # once it is an hour old
    assert store.names() == [v1, "my-cells-v4"] and store.active() == "my-cells-v4"
    assert "my-cells-v3" in store._versions()
    real_time = time.time
    monkeypatch.setattr(object_store.time, "time", lambda: real_time() + 7200)
    store.prune(keep=1)
    assert "my-cells-v3" not in store._versions() and store.names() == [v1, "my-cells-v4"]
    # S3 unreachable: an OSError to callers, while a web process's refresh keeps the marker it last saw
    marker = store.marker()
    unreachable = object_store.ObjectVersionStore(settings.model_store, tmp_path / "web", "3", "http://127.0.0.1:1")
    assert unreachable.marker() == marker
    with pytest.raises(OSError):
        unreachable.active()


def test_invalid_store_settings():
    for bad in ("http://bucket/x", "s3://", "s3://Not_A_Bucket/x", "s3://user:secret@bucket/x"):
        with pytest.raises(ValueError, match="MODEL_STORE"):
            Settings(model_store=bad).validate()


def predicted_version(server: LivetrainServer, url: str) -> str:
    payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": "7.1700000000", "label_config": BOX_CONFIG}
    reply = requests.post(server.url + "/predict", json=payload, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["results"][0]["model_version"]


def test_web_process_on_another_machine_follows_the_bucket(tmp_path, s3, image_server):
    prefix = "e2e"
    settings = settings_for(tmp_path / "worker", s3, prefix)
    store = version_store(settings, "7")
    starting = resolve_starting_weights(settings.model_arch, download=False)
    torch.manual_seed(0)
    state = starting.build(3).state_dict()
    meta = {"arch": starting.arch, "classes": ["Square", "Disc"]}
    env = {"MODEL_STORE": settings.model_store, "S3_ENDPOINT_URL": s3, "MIN_SIZE": "128", "WORKERS": "1",
           "THREADS": "4", "RESCORE_ON_PUBLISH": "false", "IMAGE_URL_ALLOWLIST": "127.0.0.1", **CREDENTIALS}
    web = LivetrainServer(tmp_path / "web", env=env, worker=False)
    try:
        web.wait_ready(timeout=180)
        url = image_server.add("/a.png", png_bytes(160, 120))
        assert predicted_version(web, url) == BASE_VERSION  # nothing published yet
        v1 = store.publish(state, meta, "shapes")
        wait_until(lambda: predicted_version(web, url) == v1, timeout=30, interval=0.5, what=f"the web process to serve {v1}")
        v2 = store.publish(state, meta, "shapes")
        wait_until(lambda: predicted_version(web, url) == v2, timeout=30, interval=0.5, what=f"the web process to serve {v2}")
        health = requests.get(web.url + "/health", timeout=10).json()
        assert health["active_versions"] == {"7": v2}
        listed = requests.get(web.url + "/versions", params={"project": "7"}, timeout=10).json()
        assert [v["name"] for v in listed["details"]["7"]] == [v1, v2]

        # rollback through the web process: it writes ACTIVE in the bucket, the publisher's store sees it
        reply = requests.post(f"{web.url}/projects/7/rollback", json={"version": v1}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert store.active() == v1
        wait_until(lambda: predicted_version(web, url) == v1, timeout=30, interval=0.5, what="the rollback to be served")

        # a half-uploaded version: never listed, never served, not even with ACTIVE naming it
        upload_half(s3, prefix, "7", "shapes-v3")
        assert requests.post(f"{web.url}/projects/7/rollback", json={"version": "shapes-v3"}, timeout=30).status_code == 400
        put_active(s3, prefix, "7", "shapes-v3")
        seen = {predicted_version(web, url) for _ in range(8) if time.sleep(0.5) is None}
        assert "shapes-v3" not in seen and seen <= {v1, BASE_VERSION}, seen
        listed = requests.get(web.url + "/versions", timeout=10).json()
        assert "shapes-v3" not in listed["versions"] and v1 in listed["versions"]
        assert "7" not in requests.get(web.url + "/health", timeout=10).json()["active_versions"]

        # the next publish skips the half version's name and is served
        v4 = store.publish(state, meta, "shapes")
        assert v4 == "shapes-v4"
        wait_until(lambda: predicted_version(web, url) == v4, timeout=30, interval=0.5, what=f"the web process to serve {v4}")
    finally:
        web.stop()
    log = web.log_path.read_text(errors="replace")
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in log


def test_store_unreachable_routes_answer_503_and_loaded_models_keep_serving(tmp_path, s3, image_server):
    """An object store down: what needs it answers 503 with the reason (never a 500), /setup still answers
    (Label Studio calls it before predicting), and a model already in memory keeps serving predictions."""
    from backend.api import create_app
    from tests.livetrain_fixtures import CONFIG, shapes_image

    settings = dataclasses.replace(settings_for(tmp_path, s3, "down"), image_url_allowlist="127.0.0.1")
    app = create_app(settings)
    client, held = app.test_client(), app.extensions["livetrain"]
    name = version_store(settings, "5").publish(held.starting.build(3).state_dict(),
                                                {"arch": held.starting.arch, "classes": ["Square", "Disc"]}, "cells")
    task = {"id": 1, "data": {"image": image_server.add("/a.png", shapes_image(0)[0])}}
    body = {"tasks": [task], "project": "5.1", "label_config": CONFIG}
    assert client.post("/predict", json=body).get_json()["results"][0]["model_version"] == name

    pool = held.predictor.pool
    pool.store = lambda project: object_store.ObjectVersionStore(settings.model_store, tmp_path / "x", project,
                                                                 "http://127.0.0.1:1")
    reply = client.post("/predict", json=body)
    assert reply.status_code == 200 and reply.get_json()["results"][0]["model_version"] == name
    pool.refresh()  # looking for a new version fails quietly: the refresh thread lives on
    setup = client.post("/setup", json={"project": "5.1", "schema": CONFIG})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == name

    # a web process that finds the store down (nothing in memory yet)
    client = create_app(dataclasses.replace(settings, s3_endpoint_url="http://127.0.0.1:1",
                                            model_dir=tmp_path / "down")).test_client()
    setup = client.post("/setup", json={"project": "5.1", "schema": CONFIG})
    assert setup.status_code == 200 and setup.get_json()["model_version"] == BASE_VERSION
    for method, path, payload in [("get", "/versions?project=5", None), ("post", "/projects/5/rollback", {"version": name}),
                                  ("get", "/projects/5/export?format=torchscript", None),
                                  ("post", "/predict", dict(body, project="6.1"))]:
        reply = getattr(client, method)(path, json=payload)
        assert reply.status_code == 503 and "MODEL_STORE" in reply.get_json()["error"], (path, reply.get_json())
    for path in ("/health", "/status", "/dashboard", "/metrics"):
        assert client.get(path).status_code == 200, path
