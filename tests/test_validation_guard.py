"""Held-out validation split (VALIDATION_FRACTION) and the version guard (GUARD, GUARD_MARGIN).

One small box model is trained once for the module (30 steps on 16 generated shape images, 5 of them held
out); every test works on a copy of its MODEL_DIR. The "worse" versions are that model with its two class
rows swapped in the box head: what training on swapped labels converges to, without the training."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import shutil
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch

from backend.errors import LivetrainError
from backend.labelstudio.images import ImageFetcher
from backend.model_store.models import model_from_version
from backend.model_store.versions import VersionStore
from backend.model_store.weights import resolve_starting_weights
from backend.training import guard as guard_module
from backend.training.data import load_example
from backend.training.session import SessionInputs, TrainingSession
from backend.training.validation import in_validation, split_records
from tests.conftest import ImageServer
from tests.test_training import LABELS, records_for, settings_for

FRACTION = 0.3
INPUTS = SessionInputs("1", "shapes", LABELS)


@pytest.fixture(autouse=True)
def small_split_decides(monkeypatch):
    """These tests' splits hold ~5 images: let their mAP decide (the product waits for VALIDATION_MIN_IMAGES)."""
    monkeypatch.setattr(guard_module, "VALIDATION_MIN_IMAGES", 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    server = ImageServer()
    root = tmp_path_factory.mktemp("validation-guard")
    settings = settings_for(root, batch_size=2, learning_rate=0.02, full_after=1000, validation_fraction=FRACTION)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    records = records_for(server, range(16))
    torch.manual_seed(0)
    random.seed(0)  # augmentation
    session = TrainingSession(settings, starting, ImageFetcher(settings), INPUTS, torch.device("cpu"))
    session.update(records)
    session.score_new(records)
    session.train(30)
    v1 = session.publish()
    yield SimpleNamespace(root=root, server=server, settings=settings, starting=starting, records=records, v1=v1)
    server.close()


def copy_of(trained, tmp_path, **changes):
    """Settings on a copy of the module's MODEL_DIR."""
    shutil.copytree(trained.root, tmp_path / "models")
    return dataclasses.replace(trained.settings, model_dir=tmp_path / "models", **changes)


def session_on(trained, settings, records=None):
    session = TrainingSession(settings, trained.starting, ImageFetcher(settings), INPUTS, torch.device("cpu"))
    session.update(records or trained.records)
    return session


def swap_classes(model) -> None:
    """Swap the two classes' rows of the box head: it now calls squares discs and discs squares."""
    head = model.roi_heads.box_predictor
    with torch.no_grad():
        for param in (head.cls_score.weight, head.cls_score.bias):
            param[[1, 2]] = param[[2, 1]].clone()
        for param in (head.bbox_pred.weight, head.bbox_pred.bias):
            param[4:12] = torch.cat([param[8:12], param[4:8]]).clone()


def make_worse(session) -> None:
    """``swap_classes`` on what the session trains and on what it publishes (the EMA of its weights); a
    second call repairs both."""
    swap_classes(session.model)
    if session.ema is not None:
        swap_classes(session.ema.module)


def validation_ids(records) -> set[int]:
    return {r.task_id for r in records if in_validation("1", r.task_id, FRACTION)}


# (a) the split ---------------------------------------------------------------------------------------
def test_split_is_deterministic_and_stable_as_tasks_are_added():
    ids = list(range(1, 401))
    chosen = {t for t in ids if in_validation("7", t, 0.25)}
    assert 60 <= len(chosen) <= 140  # about a quarter
    assert chosen == {t for t in ids if in_validation("7", t, 0.25)}  # deterministic
    first = {t for t in ids[:150] if in_validation("7", t, 0.25)}
    assert first == chosen & set(ids[:150])  # tasks added later change nobody's side
    assert {t for t in ids if in_validation("8", t, 0.25)} != chosen  # per project
    assert not any(in_validation("7", t, 0.0) for t in ids)
    assert chosen < {t for t in ids if in_validation("7", t, 0.5)}  # a larger fraction only adds tasks


def test_validation_tasks_never_reach_training(trained, tmp_path):
    held = validation_ids(trained.records)
    assert len(held) >= 3  # the module's split is scored (validation.MIN_IMAGES)
    meta = VersionStore(trained.root, "1").meta(trained.v1)
    assert not held & {int(t) for t in meta["trained_annotations"]}
    assert meta["images"] == len(trained.records) - len(held)
    assert meta["validation"]["images"] == len(held) and meta["validation"]["objects"] > 0
    # a later session, with more labeled tasks: the old validation tasks stay out, the new ones split alike
    settings = copy_of(trained, tmp_path)
    more = trained.records + records_for(trained.server, range(16, 30))
    session = session_on(trained, settings, more)
    assert set(session.validator.records) == validation_ids(more) and held <= set(session.validator.records)
    assert not set(session.sampler.records) & set(session.validator.records)
    train, validation = split_records(more, "1", FRACTION)
    assert {r.task_id for r in validation} == validation_ids(more) and len(train) + len(validation) == len(more)
    session.step()
    assert not {int(t) for t in session.trained} & validation_ids(more)
    # never trained on, a validation task is not "new" either: a session start does not score it again
    scored = {entry["task"] for entry in session.score_new(more)}
    assert scored and not scored & validation_ids(more)


# (b) validation mAP = pycocotools on the saved version's detections -----------------------------------
def test_validation_map_matches_pycocotools_run_independently(trained):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    store = VersionStore(trained.root, "1")
    state, meta = store.load(trained.v1)
    model = model_from_version(state, meta, min_size=128).eval()
    fetcher = ImageFetcher(trained.settings)
    classes = tuple(meta["classes"])
    gt = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    detections = []
    for record in sorted(trained.records, key=lambda r: r.task_id):
        if record.task_id not in validation_ids(trained.records):
            continue
        image, target = load_example(record, fetcher, classes, "boxes", (128, 256))
        gt["images"].append({"id": record.task_id, "height": image.shape[1], "width": image.shape[2]})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": record.task_id, "category_id": label,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        with torch.inference_mode():
            out = model([image])[0]  # torchvision's own forward, not the backend's
        for (x1, y1, x2, y2), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            detections.append({"image_id": record.task_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": score})
    assert detections, "the module's model should find something"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    box = meta["validation"]["box"]
    assert box["map"] > 0.05  # a useful model: the guard tests below rely on it
    assert abs(box["map"] - evaluator.stats[0]) < 1e-3 and abs(box["map50"] - evaluator.stats[1]) < 1e-3
    precision = evaluator.eval["precision"][:, :, :, 0, 2]
    for k, name in enumerate(LABELS):
        p = precision[:, :, k]
        assert abs(box["per_class"][name]["ap"] - float(np.mean(p[p > -1]))) < 1e-3
        assert abs(box["per_class"][name]["ap50"] - float(np.mean(p[0][p[0] > -1]))) < 1e-3
    assert meta["guard"]["signal"] == "none" and "mask" not in meta["validation"]


# (c) the guard holds a worse version back --------------------------------------------------------------
def test_guard_holds_back_a_worse_version_and_trains_on_from_the_active_weights(trained, tmp_path):
    settings = copy_of(trained, tmp_path)
    assert settings.guard and settings.guard_margin == 0.05  # the defaults
    session = session_on(trained, settings)
    make_worse(session)
    worse = session.publish()
    store = session.store
    meta = store.meta(worse)
    assert store.active() == trained.v1 and session.active_name == trained.v1 and worse in store.names()
    held = meta["held_back"]
    assert held["signal"] == "validation" and held["metric"] == "box map" and held["active"] == trained.v1
    assert held["value"] < held["active_value"] - 0.05 and "below the active" in held["reason"]
    assert held["active_value"] == store.meta(trained.v1)["validation"]["box"]["map"]  # same split: reused
    assert meta["guard"]["verdict"] == "held_back" and meta["validation"]["box"]["map"] == held["value"]
    # the session went back to the active version's weights (fresh optimizer), and the next version is not worse
    active_state, _ = store.load(trained.v1)
    for name, value in session.model.state_dict().items():
        assert torch.equal(value, active_state[name]), name
    # ... and so does the checkpoint: a crash now resumes the active weights, not the rejected ones
    saved = torch.load(session.checkpoint_path, weights_only=True)
    assert saved["base"] == trained.v1
    for name, value in saved["model"].items():
        assert torch.equal(value, active_state[name]), name
    # the average of the weights (what versions publish) restarted at the active version too
    assert session.ema.updates == 0 and saved["ema"]["updates"] == 0
    for name, value in saved["ema"]["model"].items():
        assert torch.equal(value, active_state[name]), name
    same = session.publish()
    assert store.active() == same and "held_back" not in store.meta(same)
    assert store.meta(same)["guard"]["verdict"] == "accepted" and store.meta(same)["parent"] == trained.v1


# (d) GUARD=false lets anything through; the guard activates a better version ----------------------------
def test_guard_off_lets_a_worse_version_through_and_the_guard_activates_a_better_one(trained, tmp_path):
    settings = copy_of(trained, tmp_path, guard=False)
    session = session_on(trained, settings)
    make_worse(session)
    worse = session.publish()
    store = session.store
    meta = store.meta(worse)
    assert store.active() == worse and meta["guard"] == {"enabled": False} and "held_back" not in meta
    assert meta["validation"]["box"]["map"] < store.meta(trained.v1)["validation"]["box"]["map"] - 0.05
    # the guard back on, a session from the worse version: the repaired model is better, and becomes active
    session = session_on(trained, dataclasses.replace(settings, guard=True))
    make_worse(session)
    better = session.publish()
    meta = store.meta(better)
    assert store.active() == better and "held_back" not in meta
    assert meta["guard"]["signal"] == "validation" and meta["guard"]["verdict"] == "accepted"
    assert meta["guard"]["active"] == worse and meta["guard"]["value"] > meta["guard"]["active_value"] + 0.05


# the live signal (no split): paired scores on new images, then a revert -----------------------------------
def test_without_a_split_the_live_signal_reverts_a_worse_version(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(guard_module, "LIVE_WINDOW", 4)
    settings = copy_of(trained, tmp_path, validation_fraction=0.0, score_threshold=0.3, guard_margin=0.02)
    session = session_on(trained, settings)
    make_worse(session)
    provisional = session.publish()  # nothing measured it yet: served, on probation against v1
    store = session.store
    assert store.active() == provisional and store.meta(provisional)["guard"]["verdict"] == "provisional"
    assert store.meta(provisional)["guard"]["baseline"] == trained.v1
    fresh = records_for(trained.server, range(40, 44))
    changed = session.update(trained.records + fresh)
    entries = session.score_new(changed)
    assert [e["version"] for e in entries] == [provisional] * 4
    pairs = store.meta(provisional)["guard"]["live"]["pairs"]
    assert len(pairs) == 4 and [p[0] for p in pairs] == [e["score"] for e in entries]
    served, baseline = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
    assert served < baseline - 0.02, (served, baseline)
    candidate = session.publish()
    meta = store.meta(candidate)
    assert store.active() == trained.v1 and session.active_name == trained.v1
    assert meta["held_back"]["signal"] == "live" and meta["held_back"]["active"] == trained.v1
    assert meta["held_back"]["value"] == pytest.approx(served, abs=1e-3)
    assert store.meta(provisional)["held_back"]["reason"].startswith("reverted: ")
    active_state, _ = store.load(trained.v1)
    for name, value in session.model.state_dict().items():
        assert torch.equal(value, active_state[name]), name


# the job's publish path: the status shows what the guard did -------------------------------------------
def test_publish_path_reports_held_back_versions_in_the_status(trained, tmp_path):
    from backend.jobs.training import _publish

    class State:
        def __init__(self):
            self.fields = {}

        def set_status(self, **fields):
            self.fields.update(fields)

        def status(self):
            return dict(self.fields)

    settings = copy_of(trained, tmp_path, rescore_on_publish=False)
    session = session_on(trained, settings)
    make_worse(session)
    state = State()
    _publish(settings, MagicMock(), state, session)  # a Redis double for the metrics counters
    assert state.fields["active_version"] == trained.v1 and state.fields["held_back"] == 1
    assert state.fields["last_version"]["held_back"]["signal"] == "validation"
    assert state.fields["last_version"]["name"] == session.versions[-1] != trained.v1


# mask projects: segm mAP too -------------------------------------------------------------------------------
def test_a_mask_project_scores_box_and_mask_map_on_its_split(tmp_path, image_server):
    from tests.test_segmentation import mask_records

    settings = settings_for(tmp_path, validation_fraction=0.5, full_after=1000)
    starting = resolve_starting_weights(settings.mask_arch, download=False, task="masks")
    records = mask_records(image_server, range(10))
    held = {r.task_id for r in records if in_validation("2", r.task_id, 0.5)}
    assert len(held) >= 3 and len(held) < len(records)
    session = TrainingSession(settings, starting, ImageFetcher(settings), SessionInputs("2", "m", LABELS, "masks"),
                              torch.device("cpu"))
    session.update(records)
    session.train(2)
    meta = session.store.meta(session.publish())
    validation = meta["validation"]
    assert validation["images"] == len(held) and not held & {int(t) for t in meta["trained_annotations"]}
    for kind in ("box", "mask"):
        assert 0.0 <= validation[kind]["map"] <= validation[kind]["map50"] <= 1.0
        assert set(validation[kind]["per_class"]) <= set(LABELS) and validation[kind]["per_class"]


def test_a_validation_image_that_fails_to_load_does_not_end_the_session(trained, tmp_path, monkeypatch):
    settings = copy_of(trained, tmp_path)
    session = session_on(trained, settings)
    broken = min(session.validator.records)

    def load(record, classes, _real=session.validator.cache.load):
        if record.task_id == broken:
            raise LivetrainError("image gone")
        return _real(record, classes)

    monkeypatch.setattr(session.validator.cache, "load", load)
    meta = session.store.meta(session.publish())
    assert meta["validation"]["images"] == len(session.validator.records) - 1  # scored without it
    assert meta["validation"]["digest"] != session.validator.digest()  # names the images actually scored

    def fail(*args, **kwargs):
        raise RuntimeError("pycocotools exploded")

    monkeypatch.setattr(session.validator, "evaluate", fail)
    name = session.publish()  # published unguarded, the session goes on
    assert session.store.active() == name and "guard failed" in session.store.meta(name)["guard"]["reason"]
