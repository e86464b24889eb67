"""Security: the webhook secret, /setup cannot move Label Studio traffic, path-safe version names, and no token,
password or secret in the logs, /status, /metrics, the page or the files a session writes. Image-URL (SSRF)
checks are in tests/test_ssrf.py, fuzzing in tests/test_fuzz.py."""

from __future__ import annotations

import base64
import logging
import uuid

import pytest
import torch

from backend.api import create_app
from backend.errors import LivetrainError
from backend.jobs.state import LS_FALLBACK, ls_credentials
from backend.model_store.versions import VersionStore
from backend.settings import Settings
from tests.conftest import BOX_CONFIG
from tests.livetrain_fixtures import CONFIG, WorkerProcess, regions, shapes_image, wait_until, worker_env


def make_app(tmp_path, **overrides):
    base = dict(model_dir=tmp_path, download_weights=False, label_studio_url="", max_image_pixels=4_000_000)
    return create_app(Settings(**(base | overrides)))


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


EVENT = {"action": "ANNOTATION_CREATED", "project": {"id": 7}, "task": {"id": 1}}


def test_webhook_secret_is_required_on_event_webhooks(tmp_path):
    client = make_app(tmp_path, webhook_secret="s3cret-hook", train_on="start_training").test_client()
    refused = client.post("/webhook", json=EVENT)
    assert refused.status_code == 401 and "X-Livetrain-Secret" in refused.get_json()["error"]
    assert "s3cret-hook" not in refused.get_data(as_text=True)
    assert client.post("/webhook", json=EVENT, headers={"X-Livetrain-Secret": "wrong"}).status_code == 401
    # an Authorization header is no way around the secret when Basic auth is off
    assert client.post("/webhook", json=EVENT, headers=basic("any", "thing")).status_code == 401
    assert client.post("/webhook", json=EVENT, headers={"X-Livetrain-Secret": "s3cret-hook"}).status_code == 200
    assert client.get("/health").status_code == 200  # the secret guards webhooks only


def test_webhook_secret_with_basic_auth(tmp_path):
    client = make_app(tmp_path, webhook_secret="s3cret-hook", basic_auth_user="ls", basic_auth_pass="pw",
                      train_on="start_training").test_client()
    assert client.post("/webhook", json=EVENT).status_code == 401
    # Label Studio's ML module (START_TRAINING) sends Basic auth: that is enough
    assert client.post("/webhook", json=EVENT, headers=basic("ls", "pw")).status_code == 200
    # wrong Basic credentials are refused even with the right secret
    wrong = basic("ls", "nope") | {"X-Livetrain-Secret": "s3cret-hook"}
    assert client.post("/webhook", json=EVENT, headers=wrong).status_code == 401
    assert client.post("/webhook", json=EVENT, headers={"X-Livetrain-Secret": "s3cret-hook"}).status_code == 200
    assert client.get("/status").status_code == 401 and client.get("/status", headers=basic("ls", "pw")).status_code == 200


def test_without_a_secret_webhooks_stay_open_notifications(tmp_path):
    client = make_app(tmp_path, train_on="start_training").test_client()
    assert client.post("/webhook", json=EVENT).status_code == 200


def test_setup_cannot_redirect_label_studio_traffic(tmp_path, image_server):
    """With LABEL_STUDIO_URL set, /setup's hostname is never used: images and the worker's API calls go to
    LABEL_STUDIO_URL. Without it, LABEL_STUDIO_API_KEY is never sent to a host /setup named."""
    label_studio, elsewhere = image_server, type(image_server)()
    try:
        from tests.conftest import png_bytes
        label_studio.add("/data/upload/1/a.png", png_bytes())
        elsewhere.add("/data/upload/1/a.png", png_bytes())
        app = make_app(tmp_path, label_studio_url=label_studio.url, label_studio_api_key="the-real-key-0123456789")
        client = app.test_client()
        reply = client.post("/setup", json={"project": "1.1", "schema": BOX_CONFIG, "hostname": elsewhere.url,
                                             "access_token": "forged-token"})
        assert reply.status_code == 200
        app.extensions["livetrain"].fetcher.fetch("/data/upload/1/a.png")  # what /predict and re-scoring call
        assert elsewhere.requests == []
        assert [headers.get("Authorization") for _, headers in label_studio.requests] == ["Token the-real-key-0123456789"]
        settings, connection = app.extensions["livetrain"].settings, app.extensions["livetrain"].redis
        assert ls_credentials(settings, connection) == (label_studio.url, "the-real-key-0123456789")

        # no LABEL_STUDIO_URL: /setup's pair is used as a pair; the configured key never goes to its host
        keyed = Settings(model_dir=tmp_path, download_weights=False, label_studio_api_key="the-real-key-0123456789")
        assert ls_credentials(keyed, connection) == (elsewhere.url, "forged-token")
        connection.delete(LS_FALLBACK)
        with pytest.raises(LivetrainError, match="LABEL_STUDIO_URL"):
            ls_credentials(keyed, connection)
    finally:
        elsewhere.close()


def test_setup_hostname_is_trusted_only_behind_basic_auth(tmp_path, image_server):
    """Without LABEL_STUDIO_URL, /setup's hostname would be "Label Studio": exempt from the address check. Anyone
    who reaches an unauthenticated backend could name the cloud metadata service so; only with Basic auth (Label
    Studio sent it) is it trusted. Its token is the one /setup sent, never LABEL_STUDIO_API_KEY."""
    from backend.errors import ImageError
    from tests.conftest import png_bytes

    image_server.add("/data/upload/1/a.png", png_bytes())
    setup = {"project": "1.1", "schema": BOX_CONFIG, "hostname": image_server.url, "access_token": "setup-token"}
    open_app = make_app(tmp_path / "open", label_studio_api_key="the-real-key-0123456789")
    assert open_app.test_client().post("/setup", json=setup).status_code == 200
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        open_app.extensions["livetrain"].fetcher.fetch("/data/upload/1/a.png")
    assert image_server.requests == []

    guarded = make_app(tmp_path / "guarded", label_studio_api_key="the-real-key-0123456789",
                       basic_auth_user="ls", basic_auth_pass="pw")
    assert guarded.test_client().post("/setup", json=setup, headers=basic("ls", "pw")).status_code == 200
    guarded.extensions["livetrain"].fetcher.fetch("/data/upload/1/a.png")
    assert [headers.get("Authorization") for _, headers in image_server.requests] == ["Token setup-token"]


@pytest.mark.parametrize("name", ["../../2/versions/shapes-v1", "/tmp/shapes-v1", "..-v1", "shapes-v1/../../2/versions/shapes-v1",
                                  "shapes-v1\x00", ".tmp-x-v1"])
def test_version_names_cannot_leave_the_project(tmp_path, name):
    for project in ("1", "2"):
        VersionStore(tmp_path, project).publish({"w": torch.zeros(1)}, {"classes": ["Square"]}, "shapes")
    client = make_app(tmp_path).test_client()
    reply = client.post("/projects/1/rollback", json={"version": name})
    assert reply.status_code in (400, 404) and reply.get_json()["error"]
    assert VersionStore(tmp_path, "1").active() == "shapes-v1"
    assert (tmp_path / "1" / "ACTIVE").read_text() == "shapes-v1"
    export = client.get("/projects/1/export", query_string={"format": "torchscript", "version": name})
    assert export.status_code in (400, 404)


def test_no_secret_in_logs_status_metrics_or_files(tmp_path, caplog):
    """A session through a real worker, with Label Studio refusing the token for a while (errors in the log,
    /status and the page) and an image that is missing: the API key, the Basic password and the webhook secret
    appear nowhere a person or a scraper reads."""
    from tests.fake_label_studio import FakeLabelStudio

    caplog.set_level(logging.DEBUG)
    token = "ltkey" + uuid.uuid4().hex  # legacy-token shaped and unique, so a hit is a leak
    password, secret = "pw" + uuid.uuid4().hex, "hook" + uuid.uuid4().hex
    fake = FakeLabelStudio(token=token)
    project = fake.add_project(CONFIG, title="Shapes")
    extra = dict(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=password, WEBHOOK_SECRET=secret)
    from backend.jobs.connection import redis_url_for

    settings = Settings.from_env(worker_env(tmp_path, "", fake.url, token, **extra))
    env = worker_env(tmp_path, redis_url_for(settings), fake.url, token, **extra)
    app = create_app(Settings.from_env(env))
    client, auth = app.test_client(), basic("ls", password)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        tasks = []
        for seed in range(3):
            png, objects = shapes_image(seed)
            task = fake.add_task(project, png, name=f"img{seed}.png")
            fake.annotate(task, regions(fake, objects))
            tasks.append(task)
            assert client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": project},
                                                 "task": {"id": task}}, headers={"X-Livetrain-Secret": secret}).status_code == 200
        wait_until(lambda: VersionStore(tmp_path, str(project)).active(), timeout=180, what="a version")
        # Label Studio refuses the token: the predict error and the worker's sync error are reported
        fake.legacy_enabled = False
        body = {"tasks": [{"id": tasks[0], "data": dict(fake.tasks[tasks[0]]["data"])},
                          {"id": 999, "data": {"image": "/data/upload/1/missing.png"}}],
                "project": f"{project}.1", "label_config": CONFIG}
        client.get("/", headers=auth)  # nothing cached from before
        assert client.post("/predict", json=body, headers=auth).status_code == 200
        assert client.post(f"/projects/{project}/train", headers=auth).status_code == 200
        wait_until(lambda: "refused" in str(client.get("/status", headers=auth).get_json()), timeout=120,
                   what="the refused token in /status")
        fake.legacy_enabled = True
        readable = [caplog.text, (tmp_path / "worker.log").read_text(errors="replace")]
        for path in ("/status", "/metrics", "/dashboard", "/health", "/versions", f"/versions?project={project}"):
            readable.append(client.get(path, headers=auth).get_data(as_text=True))
        readable.append(client.get("/", headers=auth | {"Accept": "text/html"}).get_data(as_text=True))
        # every file a session wrote (versions, meta, dataset, checkpoints, caches), but Redis's own files, which
        # hold the token /setup sent on purpose (the worker needs it)
        for path in tmp_path.rglob("*"):
            if path.is_file() and "redis" not in path.parts and path.name != "worker.log":
                readable.append(path.read_bytes().decode("latin-1"))
        for text in readable:
            for value in (token, password, secret):
                assert value not in text
        assert any("refused" in text for text in readable)  # the errors were there to be read
    finally:
        worker.stop()
        fake.close()
