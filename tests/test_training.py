"""Training pieces: sessions learn, labels added mid-project keep what was learned, NaN aborts."""

from __future__ import annotations

import pytest
import torch

from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.convert import image_to_tensor
from backend.labelstudio.images import ImageFetcher
from backend.metrics.quality import iou
from backend.model_store.architectures import build_detector
from backend.model_store.models import extend_classes, model_from_version
from backend.model_store.versions import VersionStore
from backend.model_store.weights import resolve_starting_weights
from backend.settings import Settings
from backend.training.engine import NonFiniteLoss
from backend.training.session import SessionInputs
from tests.livetrain_fixtures import shapes_image, train_version

LABELS = ("Square", "Disc")


def records_for(image_server, seeds, width=160, height=120):
    out = []
    for seed in seeds:
        png, objects = shapes_image(seed, width, height)
        url = image_server.add(f"/s{seed}.png", png)
        boxes = tuple((100 * x1 / width, 100 * y1 / height, 100 * (x2 - x1) / width, 100 * (y2 - y1) / height)
                      for x1, y1, x2, y2, _ in objects)
        out.append(LabeledImage(seed + 1, url, seed + 1, f"2026-01-01T00:00:{seed:02d}Z", boxes,
                                tuple(o[4] for o in objects)))
    return out


def settings_for(tmp_path, **kw):
    base = dict(model_dir=tmp_path, download_weights=False, min_size=128, batch_size=2, warmup_steps=2, decay_steps=4,
                checkpoint_every=4, learning_rate=0.01, image_url_allowlist="127.0.0.1")  # the image server on 127.0.0.1 stands for a third-party host
    base.update(kw)
    return Settings(**base)


def test_replay_rounds_learn_to_find_shapes(tmp_path, image_server):
    """A few dozen labeled images arriving in three batches (a session each): objects on fresh images are found."""
    torch.manual_seed(0)
    settings = settings_for(tmp_path, batch_size=4, learning_rate=0.02, full_after=1000)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    records = records_for(image_server, range(36))
    for size in (12, 24, 36):  # more labels arrive between sessions
        meta = train_version(settings, starting, fetcher, SessionInputs("1", "shapes", LABELS), records[:size], 70)
    assert meta["name"] == "shapes-v3" and meta["images"] == 36 and meta["new_images"] == 12
    store = VersionStore(tmp_path, "1")
    model = model_from_version(*store.load("shapes-v3"), min_size=128).eval()
    found = total = 0
    for seed in range(500, 510):  # images it never saw
        png, objects = shapes_image(seed)
        image = fetcher.fetch(image_server.add(f"/fresh{seed}.png", png))
        with torch.inference_mode():
            out = model([image_to_tensor(image)])[0]
        keep = out["scores"] >= 0.5
        predicted = list(zip(out["boxes"][keep].tolist(), out["labels"][keep].tolist()))
        for *box, label in objects:
            total += 1
            found += any(iou(box, p) >= 0.5 and LABELS[l - 1] == label for p, l in predicted)
    recall = found / total
    assert recall >= 0.6, f"recall {recall:.2f} ({found}/{total})"


def test_new_label_extends_head_and_keeps_what_was_learned():
    torch.manual_seed(0)
    model = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3).eval()
    image = [torch.rand(3, 120, 160)]
    head = model.roi_heads.box_predictor
    old_cls, old_box = head.cls_score.weight.clone(), head.bbox_pred.weight.clone()
    extend_classes(model, 3, 4)
    grown = model.roi_heads.box_predictor
    assert grown.cls_score.out_features == 4 and grown.bbox_pred.out_features == 16
    assert torch.equal(grown.cls_score.weight[:3], old_cls) and torch.equal(grown.bbox_pred.weight[:12], old_box)
    with torch.inference_mode():
        out = model(image)[0]  # the model still runs end to end with the grown head
    assert out["labels"].numel() == 0 or int(out["labels"].max()) <= 3


def test_label_added_mid_project_grows_the_next_version(tmp_path, image_server):
    settings = settings_for(tmp_path)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    records = records_for(image_server, range(4))
    train_version(settings, starting, fetcher, SessionInputs("1", "p", LABELS), records, 8)
    meta = train_version(settings, starting, fetcher, SessionInputs("1", "p", LABELS + ("Star",)), records, 8)
    assert meta["classes"] == ["Square", "Disc", "Star"] and meta["parent"] == "p-v1"
    state, _ = VersionStore(tmp_path, "1").load("p-v2")
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4


def test_non_finite_loss_aborts_and_keeps_previous_version(tmp_path, image_server):
    settings = settings_for(tmp_path)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    records = records_for(image_server, range(4))
    train_version(settings, starting, fetcher, SessionInputs("1", "p", LABELS), records, 8)
    exploding = settings_for(tmp_path, learning_rate=1e12)
    with pytest.raises(NonFiniteLoss):
        train_version(exploding, starting, fetcher, SessionInputs("1", "p", LABELS), records, 30)
    store = VersionStore(tmp_path, "1")
    assert store.active() == "p-v1" and store.names() == ["p-v1"]
