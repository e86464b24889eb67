"""MAX_LOADED_MODELS: a web process holds at most that many project models, least recently used dropped; a
dropped project is loaded again by its next request and answers exactly as before."""

from __future__ import annotations

import gc
import weakref

import torch

from backend.api import create_app
from backend.model_store.versions import VersionStore
from backend.settings import Settings
from tests.livetrain_fixtures import CONFIG, shapes_image

PROJECTS = ("1", "2", "3")


def payload(project: str, urls: list[str]) -> dict:
    tasks = [{"id": i + 1, "data": {"image": url}} for i, url in enumerate(urls)]
    return {"tasks": tasks, "project": f"{project}.1795333704", "label_config": CONFIG}


def make_app(tmp_path, **overrides):
    settings = Settings(model_dir=tmp_path, download_weights=False, label_studio_url="", min_size=128,
                        score_threshold=0.0, max_loaded_models=2, image_url_allowlist="127.0.0.1", **overrides)
    app = create_app(settings)
    starting = app.extensions["livetrain"].starting
    for i, project in enumerate(PROJECTS):  # each project its own weights (its own random head)
        torch.manual_seed(100 + i)
        VersionStore(tmp_path, project).publish(starting.build(3).state_dict(),
                                                {"arch": starting.arch, "classes": ["Square", "Disc"]}, f"proj{project}")
    return app


def test_three_projects_with_two_slots_stay_correct_and_evicted_models_are_freed(tmp_path, image_server):
    app = make_app(tmp_path)
    pool = app.extensions["livetrain"].predictor.pool
    assert pool.capacity == 2
    client = app.test_client()
    urls = [image_server.add("/s.png", shapes_image(1)[0])]

    def ask(project: str) -> list[dict]:
        reply = client.post("/predict", json=payload(project, urls))
        assert reply.status_code == 200
        assert len(pool.loaded()) <= 2 and len(pool._entries) <= 2
        # region ids are random per answer; everything else (boxes, labels, scores, version) must match
        return [dict(r, result=[{k: v for k, v in region.items() if k != "id"} for region in r["result"]])
                for r in reply.get_json()["results"]]

    fresh = {}  # each project's answer when its model was just loaded (first request)
    models = {}  # project -> weakref to the module it was first served with
    for project in PROJECTS:
        fresh[project] = ask(project)
        models[project] = weakref.ref(pool._entries[project].loaded.model)
        assert {r["model_version"] for r in fresh[project]} == {f"proj{project}-v1"}
        assert any(r["result"] for r in fresh[project])  # real detections (threshold 0): a meaningful comparison
    assert fresh["1"] != fresh["2"] != fresh["3"] != fresh["1"]  # different weights, different answers
    assert pool.loaded() == ["2", "3"]  # 1 was the least recently used
    gc.collect()
    assert models["1"]() is None  # dropped, and nothing (refresh thread, request) keeps it alive
    assert models["2"]() is not None and models["3"]() is not None

    # every order of requests: each project's answer is its own, as when freshly loaded
    for project in ("1", "1", "3", "2", "1"):
        assert ask(project) == fresh[project], project
        assert pool.loaded()[-1] == project
    assert pool.loaded() == ["2", "1"]
    gc.collect()
    assert models["3"]() is None


def test_refresh_swaps_held_projects_and_never_reloads_dropped_ones(tmp_path, image_server):
    app = make_app(tmp_path)
    pool = app.extensions["livetrain"].predictor.pool
    client = app.test_client()
    url = image_server.add("/a.png", shapes_image(0)[0])
    loads = []
    real_loader = pool.loader
    pool.loader = lambda project, control: loads.append(project) or real_loader(project, control)
    for project in PROJECTS:
        client.post("/predict", json=payload(project, [url]))
    assert loads == ["1", "2", "3"] and pool.loaded() == ["2", "3"]

    # new versions for a dropped project (1) and a held one (3)
    starting = app.extensions["livetrain"].starting
    for project in ("1", "3"):
        torch.manual_seed(7)
        VersionStore(tmp_path, project).publish(starting.build(3).state_dict(),
                                                {"arch": starting.arch, "classes": ["Square", "Disc"]}, f"proj{project}")
    pool.refresh()
    assert "1" not in loads[3:]  # the dropped project is not loaded behind the scenes
    assert pool.loaded() == ["2", "3"]  # still two, order kept (a swap is not a use)
    assert pool._entries["3"].loaded.version == "proj3-v2"
    assert client.post("/predict", json=payload("1", [url])).get_json()["results"][0]["model_version"] == "proj1-v2"
    assert pool.loaded() == ["3", "1"]


def test_max_loaded_models_setting():
    assert Settings.from_env({"MAX_LOADED_MODELS": "3"}).max_loaded_models == 3
    assert Settings().max_loaded_models == 8
    try:
        Settings.from_env({"MAX_LOADED_MODELS": "0"})
    except ValueError as exc:
        assert "MAX_LOADED_MODELS" in str(exc)
    else:
        raise AssertionError("MAX_LOADED_MODELS=0 accepted")


def test_served_models_use_the_channels_last_layout_on_a_cpu_and_answer_as_the_plain_model(tmp_path, image_server):
    """/predict runs the version in channels-last memory (faster convolutions on a CPU) with the same weights:
    its detections match the same version run in the default layout."""
    from backend.inference.predictor import RAW_SCORE_FLOOR
    from backend.labelstudio.convert import image_to_tensor
    from backend.model_store.models import model_from_version

    app = make_app(tmp_path, predict_device="cpu")
    pool = app.extensions["livetrain"].predictor.pool
    import io

    from PIL import Image

    png = shapes_image(1)[0]
    url = image_server.add("/s.png", png)
    assert app.test_client().post("/predict", json=payload("1", [url])).status_code == 200
    served = pool._entries["1"].loaded.model
    conv = next(m for m in served.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    state, meta = VersionStore(tmp_path, "1").load("proj1-v1")
    plain = model_from_version(state, meta, 128).eval()
    plain.roi_heads.score_thresh = RAW_SCORE_FLOOR
    tensor = image_to_tensor(Image.open(io.BytesIO(png)).convert("RGB"))
    with torch.inference_mode():
        want, got = plain([tensor])[0], served([tensor])[0]
    # the same detections; near-ties among an untrained head's scores may swap places, so compare the ten best
    assert len(want["boxes"]) > 10 and abs(len(got["boxes"]) - len(want["boxes"])) <= 2
    torch.testing.assert_close(got["scores"][:10], want["scores"][:10], atol=1e-4, rtol=0)
    for box in want["boxes"][:10]:
        assert (got["boxes"] - box).abs().max(dim=1).values.min() < 0.05
