"""`livetrain export`: a trained version as TorchScript and ONNX gives what /predict gives, the README example
runs, the route serves a zip, bad requests are clear 4xx."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from backend.api import create_app
from backend.inference.export_check import check_export, exported_detections
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.masks import polygon_to_mask
from backend.model_store.export import export_version, load_exported
from backend.model_store.weights import resolve_starting_weights
from backend.settings import Settings
from backend.training.session import SessionInputs
from tests.conftest import ImageServer
from tests.livetrain_fixtures import CONFIG, POLYGON_CONFIG, shapes_image, train_version
from tests.test_segmentation import mask_records
from tests.test_training import records_for

LABELS = ("Square", "Disc")
PROJECT = "7"
BOX_TOL, SCORE_TOL = 2.0, 1e-3
THRESHOLD = 0.2  # low: a version trained a few steps on CPU finds the shapes, with some noise
# (seed, width, height, zoom): the training size, another size, and one zoomed past the model's 128/256 working
# size (shrunk first, as /predict does, back to about the size the shapes were trained at)
IMAGES = [(500, 160, 120, 1), (501, 224, 150, 1), (502, 160, 120, 2.5)]


@pytest.fixture(scope="module")
def server():
    server = ImageServer()
    yield server
    server.close()


def make_settings(model_dir, **kw) -> Settings:
    base = dict(model_dir=model_dir, download_weights=False, label_studio_url="", min_size=128, batch_size=2,
                warmup_steps=2, decay_steps=4, checkpoint_every=100, learning_rate=0.02, score_threshold=THRESHOLD,
                image_url_allowlist="127.0.0.1")  # the image server on 127.0.0.1 stands for a third-party host
    return Settings(**(base | kw))


@pytest.fixture(scope="module")
def boxes(tmp_path_factory, server):
    """A box version trained a little on shapes, the app serving it, and test images: (settings, app, images)."""
    torch.manual_seed(0)
    settings = make_settings(tmp_path_factory.mktemp("boxes"))
    starting = resolve_starting_weights(settings.model_arch, download=False)
    meta = train_version(settings, starting, ImageFetcher(settings), SessionInputs(PROJECT, "shapes", LABELS),
                         records_for(server, range(6)), 12)
    assert meta["name"] == "shapes-v1" and meta["task"] == "boxes"
    images = {}
    for seed, width, height, zoom in IMAGES:
        png, _ = shapes_image(seed, width, height, count=3)
        image = Image.open(io.BytesIO(png)).convert("RGB")
        image = image.resize((round(width * zoom), round(height * zoom)), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images[server.add(f"/x{seed}.png", buf.getvalue())] = image
    return settings, create_app(settings), images


def predict(app, url, config=CONFIG) -> dict:
    payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": f"{PROJECT}.1795333704", "label_config": config}
    reply = app.test_client().post("/predict", json=payload)
    assert reply.status_code == 200, reply.get_json()
    return reply.get_json()["results"][0]


def predicted_boxes(result) -> list[tuple[str, float, list[float]]]:
    """/predict's rectangle regions back in pixels: (label, score, [x1, y1, x2, y2])."""
    out = []
    for r in result["result"]:
        v, w, h = r["value"], r["original_width"], r["original_height"]
        x1, y1 = v["x"] * w / 100, v["y"] * h / 100
        out.append((v["rectanglelabels"][0], r["score"], [x1, y1, x1 + v["width"] * w / 100, y1 + v["height"] * h / 100]))
    return out


def assert_parity(served, config, labels, exported) -> tuple[float, float]:
    """Each /predict region has an exported detection of the same label within the tolerances, and no more."""
    threshold = config["score_threshold"]
    got = [(labels[k], float(s), list(map(float, b))) for b, k, s in
           zip(exported["boxes"], exported["labels"], exported["scores"])]
    box_diff = score_diff = 0.0
    for label, score, box in served:
        same = [g for g in got if g[0] == label]
        assert same or abs(score - threshold) < SCORE_TOL, f"{label} {score} {box} not in the export"
        if same:
            match = min(same, key=lambda g: max(abs(a - b) for a, b in zip(g[2], box)))
            got.remove(match)
            box_diff = max(box_diff, max(abs(a - b) for a, b in zip(match[2], box)))
            score_diff = max(score_diff, abs(match[1] - score))
    assert all(abs(s - threshold) < SCORE_TOL for _, s, _ in got), f"exported only: {got}"
    assert box_diff <= BOX_TOL and score_diff <= SCORE_TOL, (box_diff, score_diff)
    return box_diff, score_diff


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_predict(boxes, tmp_path, fmt):
    settings, app, images = boxes
    out = export_version(settings.model_dir, PROJECT, None, fmt, tmp_path / fmt, min_size=settings.min_size,
                         score_threshold=settings.score_threshold, max_detections=settings.max_detections)
    assert {p.name for p in out.iterdir()} == {"model.torchscript.pt" if fmt == "torchscript" else "model.onnx",
                                               "labels.json", "config.json", "README.md"}
    config, labels, run = load_exported(out)
    assert labels == ["__background__", "Square", "Disc"]
    assert (config["version"], config["task"], config["min_size"], config["max_size"]) == ("shapes-v1", "boxes", 128, 256)
    assert config["score_threshold"] == THRESHOLD and config["version_meta"]["classes"] == list(LABELS)
    counts = []
    for url, image in images.items():
        served = predicted_boxes(predict(app, url))
        counts.append(len(served))
        box_diff, score_diff = assert_parity(served, config, labels, exported_detections(run, config, image))
        print(f"{fmt} {image.size}: {len(served)} regions, max box diff {box_diff:.4f} px, max score diff {score_diff:.2e}")
    assert min(counts) >= 1, "the trained version should find the shapes: nothing to compare"
    report = check_export(out, settings.model_dir, {str(i): im for i, im in enumerate(images.values())}, settings.min_size)
    assert report["ok"], report


def run_readme_example(out, image, monkeypatch) -> list[str]:
    """The README's Python block, executed as written in the export directory with ``image`` as image.jpg."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    image.save(out / "image.jpg", format="PNG")  # lossless: PIL opens it by its content, not its name
    monkeypatch.chdir(out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    return printed.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_readme_example_runs_as_written(boxes, tmp_path, fmt, monkeypatch):
    settings, app, images = boxes
    out = export_version(settings.model_dir, PROJECT, "shapes-v1", fmt, tmp_path, min_size=settings.min_size,
                         score_threshold=settings.score_threshold)
    url, image = list(images.items())[2]  # the large one: the example's shrink runs too
    lines = run_readme_example(out, image, monkeypatch)
    assert lines and all(line.split()[0] in LABELS for line in lines), lines
    served = predicted_boxes(predict(app, url))
    assert sorted(line.split()[0] for line in lines) == sorted(label for label, _, _ in served)
    assert sorted(float(line.split()[1]) for line in lines) == pytest.approx(sorted(s for _, s, _ in served), abs=2e-3)


def test_route_serves_a_zip_and_rejects_bad_requests(boxes):
    settings, app, _ = boxes
    client = app.test_client()
    reply = client.get(f"/projects/{PROJECT}/export?format=onnx&version=shapes-v1")
    assert reply.status_code == 200 and reply.mimetype == "application/zip"
    assert reply.headers["Content-Disposition"] == "attachment; filename=livetrain-7-shapes-v1-onnx.zip"
    archive = zipfile.ZipFile(io.BytesIO(reply.data))
    assert sorted(archive.namelist()) == ["README.md", "config.json", "labels.json", "model.onnx"]
    assert json.loads(archive.read("config.json"))["onnx_opset"] == 17
    reply = client.get(f"/projects/{PROJECT}/export?format=torchscript")  # the active version
    assert reply.status_code == 200 and "model.torchscript.pt" in zipfile.ZipFile(io.BytesIO(reply.data)).namelist()
    # built once per version and format: the second download is the cached file, not a new export
    cached = sorted((settings.model_dir / PROJECT / "exports").glob("*.zip"))
    assert sorted(p.name.split(".")[1] for p in cached) == ["onnx", "torchscript"]
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = client.get(f"/projects/{PROJECT}/export?format=onnx&version=shapes-v1")
    assert again.status_code == 200 and "model.onnx" in zipfile.ZipFile(io.BytesIO(again.data)).namelist()
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    # a page on another site cannot make a browser start an export (nor POST a rollback)
    assert client.get(f"/projects/{PROJECT}/export?format=onnx", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post(f"/projects/{PROJECT}/rollback", json={"version": "shapes-v1"},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get(f"/projects/{PROJECT}/export?format=onnx", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    for query, status, words in [(f"/projects/{PROJECT}/export?format=tflite", 400, "unknown export format"),
                                 (f"/projects/{PROJECT}/export", 400, "torchscript, onnx"),
                                 (f"/projects/{PROJECT}/export?format=onnx&version=shapes-v9", 404, "no version 'shapes-v9'"),
                                 (f"/projects/{PROJECT}/export?format=onnx&version=../../etc", 400, "no version"),
                                 ("/projects/99/export?format=onnx", 404, "no model versions"),
                                 ("/projects/abc/export?format=onnx", 400, "invalid project")]:
        reply = client.get(query)
        assert reply.status_code == status and words in reply.get_json()["error"], (query, reply.get_json())


def test_cli_exports_and_checks(boxes, tmp_path, monkeypatch, capsys):
    from backend.cli import main

    settings, _, images = boxes
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("MIN_SIZE", "128")
    monkeypatch.setenv("SCORE_THRESHOLD", str(THRESHOLD))
    monkeypatch.setenv("DOWNLOAD_WEIGHTS", "false")
    path = tmp_path / "shapes.png"
    list(images.values())[0].save(path)
    assert main(["export", PROJECT, "--format", "torchscript", "--out", str(tmp_path / "ts"), "--check", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "parity with /predict: ok" in printed and "model.torchscript.pt" in printed
    assert main(["export", PROJECT, "--version", "nope-v1", "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    assert "no version 'nope-v1'" in capsys.readouterr().err


def test_mask_version_exports_with_masks(tmp_path, server, monkeypatch):
    """A Mask R-CNN version: TorchScript and ONNX both return masks that match /predict's polygons."""
    torch.manual_seed(0)
    random.seed(0)  # augment() draws from Python's random: the same version in any test order
    settings = make_settings(tmp_path, score_threshold=0.15)
    starting = resolve_starting_weights(settings.mask_arch, download=False, task="masks")
    train_version(settings, starting, ImageFetcher(settings), SessionInputs(PROJECT, "cells", LABELS, "masks"),
                  mask_records(server, range(4)), 6)
    app = create_app(settings)
    png, _ = shapes_image(600, 160, 120, count=3)
    url, image = server.add("/m600.png", png), Image.open(io.BytesIO(png)).convert("RGB")
    regions = predict(app, url, POLYGON_CONFIG)["result"]
    assert regions, "the mask version should find something at score 0.15"
    for fmt in ("torchscript", "onnx"):
        out = export_version(settings.model_dir, PROJECT, None, fmt, tmp_path / fmt, min_size=128, score_threshold=0.15)
        config, labels, run = load_exported(out)
        assert config["task"] == "masks" and config["outputs"][-1] == "masks"
        report = check_export(out, settings.model_dir, {"a": image}, 128)
        print(fmt, report)
        assert report["ok"] and report["images"]["a"]["served"] > 0, report
        exported = exported_detections(run, config, image)
        printed = run_readme_example(out, image, monkeypatch)
        assert printed[-1] == f"mask pixels: {[int(m.sum()) for m in exported['masks']]}"
        assert len(printed) == len(exported["labels"]) + 1
        for label in LABELS:  # the union of each label's polygons vs the union of its exported masks
            served = np.zeros((120, 160), dtype=bool)
            for r in regions:
                if r["value"]["polygonlabels"] == [label]:
                    served |= polygon_to_mask(r["value"]["points"], 160, 120)
            mine = np.zeros((120, 160), dtype=bool)
            for k, mask in zip(exported["labels"], exported["masks"]):
                mine |= mask if labels[k] == label else False
            union = (served | mine).sum()
            assert union == 0 or (served & mine).sum() / union > 0.8, (fmt, label)
