"""``livetrain simulate``'s live vs offline comparison (backend.simulation.offline), the session-end wait,
quality_31_60 and the --compare-with plot. Tiny generated data, the offline Lite0 weights, CPU only.

A detector step costs seconds on a CPU even at 128 px (the RoI head's 512 proposals per image), and scoring
an untrained model as much (1000 proposals): one image per batch, a step or two, one test image."""

import json

import pytest
import torch
from PIL import Image, ImageDraw

from backend.metrics.coco_map import evaluate_map
from backend.model_store.models import model_for_round
from backend.model_store.versions import VersionStore
from backend.model_store.weights import StartingWeightsByTask
from backend.settings import Settings
from backend.simulation import session as S
from backend.simulation.offline import Examples, live_vs_offline, mask_target, train_offline
from backend.training.coco import CocoImage, load_coco

CLASSES = ["square", "disc"]
ENV = {"DOWNLOAD_WEIGHTS": "false", "MODEL_ARCH": "fasterrcnn_lite0_fpn", "MASK_ARCH": "maskrcnn_lite0_fpn",
       "MIN_SIZE": "128", "BATCH_SIZE": "1", "DEVICE": "cpu"}


@pytest.fixture
def dataset(tmp_path):
    """Two 200x150 images (split train), each with a red square and a blue disc, as a COCO folder."""
    images, annotations = [], []
    for i in range(2):
        picture = Image.new("RGB", (200, 150), (230, 230, 230))
        draw = ImageDraw.Draw(picture)
        x = 20 + 30 * i
        draw.rectangle([x, 30, x + 50, 80], fill=(200, 30, 30))
        draw.ellipse([120, 60 + 10 * i, 170, 110 + 10 * i], fill=(30, 30, 200))
        picture.save(tmp_path / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 200, "height": 150, "split": "train"})
        for category, (x0, y0, w, h) in ((1, (x, 30, 50, 50)), (2, (120, 60 + 10 * i, 50, 50))):
            ring = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x0, y0, w, h], "segmentation": [ring], "iscrowd": 0})
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]
    (tmp_path / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    classes, loaded = load_coco(tmp_path)
    assert classes == CLASSES
    return loaded


def test_examples_are_shrunk_with_their_boxes(dataset):
    pil, target = Examples(dataset[:1], (75, 100)).items[0]  # 200x150 -> 100x75: half
    assert pil.size == (100, 75)
    assert target["boxes"].tolist() == [[10.0, 15.0, 35.0, 40.0], [60.0, 30.0, 85.0, 55.0]]
    assert target["labels"].tolist() == [1, 2]


def test_mask_target_is_one_instance_per_ring_with_its_tight_box():
    two_parts = [[[10, 10], [30, 10], [30, 30], [10, 30]], [[50, 10], [70, 10], [70, 30], [50, 30]]]
    image = CocoImage(1, None, 100, 100, "train", boxes=[[10, 10, 70, 30], [0, 0, 5, 5]], labels=[2, 1],
                      polygons=[two_parts, []])
    target = mask_target(image, 50, 50)  # half size; the box-only object has no polygon: not annotated
    assert target["labels"].tolist() == [2, 2]
    assert target["masks"].shape == (2, 50, 50) and target["masks"].dtype == torch.uint8
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 15.0], [25.0, 5.0, 35.0, 15.0]]


def test_mask_target_for_brush_is_one_instance_per_object():
    two_parts = [[[10, 10], [30, 10], [30, 30], [10, 30]], [[50, 10], [70, 10], [70, 30], [50, 30]]]
    image = CocoImage(1, None, 100, 100, "train", boxes=[[10, 10, 70, 30], [0, 0, 5, 5]], labels=[2, 1],
                      polygons=[two_parts, []])
    target = mask_target(image, 50, 50, per_ring=False)
    assert target["labels"].tolist() == [2] and target["masks"].shape == (1, 50, 50)
    assert target["boxes"].tolist() == [[5.0, 5.0, 35.0, 15.0]] and int(target["masks"].sum()) == 200


def test_train_offline_returns_a_model_that_evaluate_map_scores(dataset):
    settings = Settings.from_env(ENV)
    starting = StartingWeightsByTask(settings)("boxes")
    assert starting.source == "imagenet-lite0"
    model = train_offline(settings, starting, dataset, tuple(CLASSES), total_steps=2, device="cpu", seed=0)
    assert not model.training and model.transform.min_size == (128,)
    assert not any(p.requires_grad for p in model.backbone.body.parameters())  # 2 images: heads mode
    scores = evaluate_map(model, dataset[:1], len(CLASSES))
    assert 0.0 <= scores["map50"] <= 1.0 and 0.0 <= scores["map"] <= 1.0


def test_train_offline_masks_does_not_crash(dataset):
    settings = Settings.from_env(ENV)
    starting = StartingWeightsByTask(settings)("masks")
    model = train_offline(settings, starting, dataset, tuple(CLASSES), total_steps=1)
    assert hasattr(model.roi_heads, "mask_predictor")


def publish(tmp_path, dataset, task="boxes", **meta):
    """A live version of a box (or mask) project trained on task 11 (image 1) and 12 (image 2)."""
    settings = Settings.from_env(ENV)
    starting = StartingWeightsByTask(settings)(task)
    model = model_for_round(starting, None, tuple(CLASSES), 128)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    meta = {"arch": starting.arch, "task": task, "classes": CLASSES, "trained_annotations": {"11": "a", "12": "b"},
            "steps": 1, "settings": {"learning_rate": 0.01, "batch_size": 1, "min_size": 128},
            "starting_weights": starting.source, **meta}
    return VersionStore(tmp_path / "models", "7").publish(state, meta, "sim"), settings


def test_live_vs_offline_report(tmp_path, dataset):
    name, settings = publish(tmp_path, dataset, total_steps=1)
    report = live_vs_offline(tmp_path / "models", 7, settings, {11: dataset[0], 12: dataset[1]}, CLASSES, dataset[:1])
    assert report["version"] == name and report["images"] == 2 and report["total_steps"] == 1
    for side in ("live", "offline"):
        assert set(report[side]) == {"map50", "map"}
    assert set(report["ratio"]) == {"map50", "map"} and report["offline_s"] >= 0
    assert report["metric"] == "box mAP" and "steps_note" not in report


def test_live_vs_offline_scores_a_mask_version_with_segm_map_too(tmp_path, dataset):
    name, settings = publish(tmp_path, dataset, task="masks", total_steps=1)
    report = live_vs_offline(tmp_path / "models", 7, settings, {11: dataset[0], 12: dataset[1]}, CLASSES, dataset[:1],
                             per_ring=False)
    assert report["version"] == name and report["metric"] == "box mAP, segm mAP (segm_*)"
    for side in ("live", "offline"):
        assert set(report[side]) == {"map50", "map", "segm_map50", "segm_map"}
        assert all(0.0 <= v <= 1.0 for v in report[side].values())
    assert set(report["ratio"]) == {"map50", "map", "segm_map50", "segm_map"}


def test_live_only_and_steps_fallback_through_the_simulation(tmp_path, dataset):
    publish(tmp_path, dataset)  # no total_steps: an older version
    sim = S.Simulation(S.SimulationConfig(data=dataset[0].path.parent), None, "http://127.0.0.1:1", tmp_path / "out")
    sim.project, sim.images, sim.tasks, sim.summary = {"id": 7}, dataset[:1], [{"id": 11}], {"images": 1}
    summary = sim.compare_with_offline(tmp_path / "models", Settings.from_env(ENV), test_split="train",
                                       test_images=1, offline=False)
    report = summary["live_vs_offline"]
    assert report["total_steps"] == 1 and "steps_note" in report and report["images"] == 1
    assert report["offline"] is None and report["ratio"] is None and set(report["live"]) == {"map50", "map"}
    assert report["test_split"] == "train" and report["test_images"] == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert "skipped" in sim.compare_with_offline(None, Settings.from_env(ENV))["live_vs_offline"]
    assert live_vs_offline(tmp_path / "none", 7, Settings.from_env(ENV), {}, CLASSES, dataset)["skipped"]


def records(qualities):
    return [{"n": i + 1, "quality": q, "regions": 1, "model_version": "v1", "latency_s": 0.1}
            for i, q in enumerate(qualities)]


def test_quality_31_60():
    summary = S.summarize(records([0.0] * 30 + [0.5] * 30), 60.0)
    assert summary["quality_31_60"] == 0.5 and summary["quality_51_100"] == 0.5
    assert S.summarize(records([0.5] * 59), 59.0)["quality_31_60"] is None  # not a whole window


def test_plot_with_a_previous_run(tmp_path):
    pytest.importorskip("matplotlib")
    previous = tmp_path / "before.jsonl"
    previous.write_text("".join(json.dumps(r) + "\n" for r in records([0.2] * 20)) + "\n")
    assert len(S.read_records(previous)) == 20
    S.plot(records([0.6] * 20), tmp_path / "quality.png", "test", previous=S.read_records(previous),
           previous_label="old trainer")
    assert (tmp_path / "quality.png").stat().st_size > 0


def simulation(tmp_path, states, timeout=60.0):
    config = S.SimulationConfig(data=tmp_path, session_timeout=timeout)
    sim = S.Simulation(config, None, "http://127.0.0.1:1", tmp_path)
    sim.project = {"id": 1}
    replies = iter(states)
    sim.project_status = lambda: {"state": next(replies)}
    return sim


def test_session_end_waits_for_the_session_it_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(S.time, "sleep", lambda s: None)
    sim = simulation(tmp_path, ["idle", "queued", "training", "training", "idle"])
    assert sim.wait_for_session_end(settle=30.0) is not None
    with pytest.raises(StopIteration):  # it stopped at the first idle after the busy states
        sim.project_status()
    assert simulation(tmp_path, ["idle"]).wait_for_session_end(settle=0.0) is not None  # nothing was queued
    assert simulation(tmp_path, ["training"] * 5, timeout=0.0).wait_for_session_end() is None
