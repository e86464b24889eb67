"""Mask projects (PolygonLabels / BrushLabels): annotations -> training masks -> Mask R-CNN rounds -> polygon and
brush predictions, through the same pipeline as boxes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import LabelConfigError
from backend.model_store.detect import forward, full_mask, paste_in_box
from backend.inference.predictor import LoadedModel, Predictor
from backend.labelstudio.annotations import labeled_image
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.masks import mask_iou, mask_to_polygons, mask_to_rle, polygon_to_mask, rle_to_mask
from backend.metrics.quality import MaskCrop, mask_iou as crop_iou, quality
from backend.model_store.architectures import build_detector
from backend.model_store.models import extend_classes, model_from_version
from backend.model_store.versions import VersionStore
from backend.model_store.weights import resolve_starting_weights
from backend.settings import Settings
from backend.training.data import load_example
from backend.training.session import SessionInputs
from backend.training.transforms import hflip
from tests.livetrain_fixtures import BRUSH_CONFIG, CONFIG, POLYGON_CONFIG, shapes_image, shapes_with_masks, train_version

LABELS = ("Square", "Disc")
POLY = parse_label_config(POLYGON_CONFIG).primary
BRUSH = parse_label_config(BRUSH_CONFIG).primary


def polygon_results(objects, width=160, height=120, control=POLY):
    """What the editor submits for these objects: one polygonlabels result per part, unique ids."""
    out = []
    for k, (mask, label) in enumerate(objects):
        for points in mask_to_polygons(mask, width, height):
            out.append({"id": f"p{k}-{len(out)}", "from_name": control.from_name, "to_name": control.to_name,
                        "type": "polygonlabels", "original_width": width, "original_height": height,
                        "image_rotation": 0, "value": {"points": points, "closed": True, "polygonlabels": [label]}})
    return out


def brush_results(objects, width=160, height=120, control=BRUSH):
    return [{"id": f"b{k}", "from_name": control.from_name, "to_name": control.to_name, "type": "brushlabels",
             "original_width": width, "original_height": height, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}
            for k, (mask, label) in enumerate(objects)]


def task_with(task_id, url, result):
    return {"id": task_id, "data": {"image": url},
            "annotations": [{"id": task_id, "result": result, "updated_at": f"2026-01-01T00:00:{task_id % 60:02d}Z"}]}


def mask_records(image_server, seeds, kind="polygons", count=None):
    control = POLY if kind == "polygons" else BRUSH
    make = polygon_results if kind == "polygons" else brush_results
    out = []
    for seed in seeds:
        png, objects = shapes_with_masks(seed, count=count)
        url = image_server.add(f"/m{seed}.png", png)
        out.append(labeled_image(task_with(seed + 1, url, make(objects)), control))
    return out


def settings_for(tmp_path, **kw):
    base = dict(model_dir=tmp_path, download_weights=False, min_size=128, batch_size=2, warmup_steps=2, decay_steps=4,
                checkpoint_every=4, learning_rate=0.01, image_url_allowlist="127.0.0.1")  # the image server on 127.0.0.1 stands for a third-party host
    return Settings(**(base | kw))


# -- label config: one primary control per project ------------------------------------------------------
def test_primary_control_is_the_first_supported_tag_unless_it_opts_out():
    both = CONFIG.replace("</View>", '<PolygonLabels name="poly" toName="image"><Label value="Roof"/></PolygonLabels></View>')
    assert parse_label_config(both).primary.tag_type == "RectangleLabels"
    skipped = both.replace('<RectangleLabels name="label"', '<RectangleLabels name="label" model_skip="true"')
    primary = parse_label_config(skipped).primary
    assert (primary.tag_type, primary.from_name, primary.task, primary.labels) == ("PolygonLabels", "poly", "masks", ("Roof",))
    all_skipped = skipped.replace('<PolygonLabels name="poly"', '<PolygonLabels name="poly" model_skip="true"')
    with pytest.raises(LabelConfigError, match="model_skip"):
        parse_label_config(all_skipped)


# -- annotations -> training examples ---------------------------------------------------------------------
def test_polygon_and_brush_annotations_become_separate_instances_with_boxes_from_masks():
    png, objects = shapes_with_masks(3, count=3)
    objects = [(m, "Disc") for m, _ in objects]  # one label, three objects: still three instances
    bad = [{"id": "x", "from_name": "label", "to_name": "image", "type": "polygonlabels",
            "value": {"points": [[1, 1], [5, 5]], "polygonlabels": ["Disc"]}},
           {"id": "y", "from_name": "label", "to_name": "image", "type": "polygonlabels",
            "value": {"points": [[1, 1], [5, 5], [1, 9]], "polygonlabels": ["Cat"]}}]
    record = labeled_image(task_with(1, "http://x/a.png", polygon_results(objects) + bad), POLY)
    assert record.labels == ("Disc",) * 3 and len(record.masks) == 3 and all("points" in m for m in record.masks)
    for (mask, _), box in zip(objects, record.boxes):
        ys, xs = np.nonzero(mask)
        assert box == pytest.approx((100 * xs.min() / 160, 100 * ys.min() / 120,
                                     100 * (xs.max() + 1 - xs.min()) / 160, 100 * (ys.max() + 1 - ys.min()) / 120), abs=1e-3)
    wrong_size = dict(brush_results(objects[:1])[0], original_width=80)
    record = labeled_image(task_with(2, "http://x/a.png", brush_results(objects) + [wrong_size]), BRUSH)
    assert len(record.masks) == 3 and record.masks[0]["width"] == 160
    assert labeled_image(task_with(3, "http://x/a.png", []), BRUSH).is_negative


@pytest.mark.parametrize("kind", ["polygons", "brush"])
def test_training_masks_align_with_the_image_at_the_working_size(image_server, tmp_path, kind):
    """A 640x480 image loaded for a 128-pixel model is shrunk before its masks are made; they still cover
    their objects' pixels, and a flip moves image, boxes and masks together."""
    png, objects = shapes_with_masks(7, 640, 480, count=3)
    url = image_server.add("/big.png", png)
    make = polygon_results if kind == "polygons" else brush_results
    record = labeled_image(task_with(1, url, make(objects, 640, 480)), POLY if kind == "polygons" else BRUSH)
    image, target = load_example(record, ImageFetcher(settings_for(tmp_path)), LABELS, "masks", limit=(160, 256))
    assert tuple(image.shape[-2:]) == (160, 213) and target["masks"].shape == (3, 160, 213)
    small = [np.asarray(Image.fromarray(m).resize((213, 160), Image.NEAREST)) for m, _ in objects]
    for got, want in zip(target["masks"].numpy().astype(bool), small):
        assert mask_iou(got, want) > 0.9
    for flipped_image, flipped in [hflip(image, target)]:
        for m, box in zip(flipped["masks"], flipped["boxes"]):
            ys, xs = np.nonzero(m.numpy())
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1)
        assert torch.equal(flipped_image, image.flip(-1))


# -- model pieces ----------------------------------------------------------------------------------------
def test_new_label_grows_the_mask_head_too():
    torch.manual_seed(0)
    model = build_detector("maskrcnn_lite0_fpn", 3, min_size=96, max_size=128).eval()
    old = model.roi_heads.mask_predictor.mask_fcn_logits.weight.clone()
    extend_classes(model, 3, 4)
    grown = model.roi_heads.mask_predictor.mask_fcn_logits
    assert grown.out_channels == 4 and torch.equal(grown.weight[:3], old)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4


def test_lazy_paste_equals_torchvision_paste():
    """paste_in_box crops exactly what torchvision's full-image paste gives, without the full-image array."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    torch.manual_seed(0)
    masks = torch.rand(3, 1, 28, 28)
    boxes = torch.tensor([[10.0, 12.0, 70.5, 50.0], [-5.0, 30.0, 40.0, 130.0], [150.0, 2.0, 170.0, 20.0]])
    reference = paste_masks_in_image(masks, boxes, (120, 160))[:, 0] >= 0.5
    for i in range(3):
        crop, offset = paste_in_box(masks[i], boxes[i], 160, 120)
        assert np.array_equal(full_mask(crop, offset, 160, 120), reference[i].numpy())


def test_mask_quality_uses_mask_iou():
    disc = np.zeros((60, 80), bool)
    disc[10:40, 10:40] = polygon_to_mask([[0, 0], [100, 0], [100, 100], [0, 100]], 30, 30)
    half = disc.copy()
    half[:, 20:] = False  # a third of it: IoU 0.33
    gt = [(MaskCrop.from_full(disc), "Disc")]
    assert quality([(MaskCrop.from_full(disc), "Disc", 0.9)], gt, overlap=crop_iou).correct == 1
    assert quality([(MaskCrop.from_full(half), "Disc", 0.9)], gt, overlap=crop_iou).imprecise == 1
    assert quality([(MaskCrop.from_full(disc), "Square", 0.9)], gt, overlap=crop_iou).wrong_class == 1


# -- predictions -----------------------------------------------------------------------------------------
class MasksAt(torch.nn.Module):
    """A stand-in with Mask R-CNN's serving interface: two detections whose 28x28 masks are known."""

    def __init__(self):
        super().__init__()
        ring = torch.zeros(1, 28, 28)
        ring[0, 4:24, 4:24] = 1.0
        ring[0, 10:18, 10:18] = 0.0  # a hole: polygons fill it, brush keeps it
        two_parts = torch.zeros(1, 28, 28)
        two_parts[0, 2:10, 2:10] = two_parts[0, 18:26, 18:26] = 1.0
        self.masks = torch.stack([ring, two_parts])

    def forward(self, images):
        return [{"boxes": torch.tensor([[20.0, 10.0, 80.0, 70.0], [50.0, 90.0, 110.0, 150.0]]),
                 "labels": torch.tensor([2, 2]), "scores": torch.tensor([0.9, 0.8]), "masks": self.masks}
                for _ in images]


def exif_rotated_png(width=160, height=120) -> bytes:
    """A JPEG stored landscape with EXIF orientation 6: Label Studio shows it portrait (height x width)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_polygon_brush_and_semantic_predictions(tmp_path, image_server):
    url = image_server.add("/rot.jpg", exif_rotated_png())
    fetcher = ImageFetcher(settings_for(tmp_path))
    loaded = LoadedModel(MasksAt().eval(), "m-v1", LABELS)
    tasks = [{"id": 1, "data": {"image": url}}]

    polygons = Predictor(None, fetcher, 0.5, 100).predict_with(loaded, tasks, POLY)[0]
    regions = polygons["result"]
    assert polygons["model_version"] == "m-v1" and isinstance(polygons["score"], float)
    assert len(regions) == 3  # the ring (hole filled) and one region per part of the two-part object
    assert len({r["id"] for r in regions}) == 3
    for r in regions:
        assert r["type"] == "polygonlabels" and r["value"]["closed"] is True and r["value"]["polygonlabels"] == ["Disc"]
        assert (r["original_width"], r["original_height"]) == (120, 160)  # EXIF applied, as Label Studio shows it
        assert 3 <= len(r["value"]["points"]) <= 200 and all(0 <= v <= 100 for p in r["value"]["points"] for v in p)
    assert sorted(round(r["score"], 2) for r in regions) == [0.8, 0.8, 0.9]

    brush = Predictor(None, fetcher, 0.5, 100).predict_with(loaded, tasks, BRUSH)[0]["result"]
    assert [r["type"] for r in brush] == ["brushlabels"] * 2
    ring = rle_to_mask(brush[0]["value"]["rle"], 120, 160)  # decodes to the displayed size
    crop, offset = paste_in_box(MasksAt().masks[0], torch.tensor([20.0, 10.0, 80.0, 70.0]), 120, 160)
    assert np.array_equal(ring, full_mask(crop, offset, 120, 160)) and not ring[40, 50]  # hole kept

    semantic = Predictor(None, fetcher, 0.5, 100, mask_output="semantic").predict_with(loaded, tasks, BRUSH)[0]["result"]
    assert len(semantic) == 1 and semantic[0]["score"] == pytest.approx(0.9)
    union = rle_to_mask(semantic[0]["value"]["rle"], 120, 160)
    assert union.sum() == ring.sum() + rle_to_mask(brush[1]["value"]["rle"], 120, 160).sum()


class SpeckledMask(torch.nn.Module):
    """One detection whose 28x28 mask is a main block with two specks beside it, as a half-trained head leaves."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 28, 28)
        mask[0, 4:20, 4:20] = 1.0
        mask[0, 24:26, 24:26] = mask[0, 1:3, 24:26] = 1.0
        self.masks = mask[None]

    def forward(self, images):
        return [{"boxes": torch.tensor([[10.0, 10.0, 70.0, 70.0]]), "labels": torch.tensor([2]),
                 "scores": torch.tensor([0.9]), "masks": self.masks} for _ in images]


def test_a_speckled_object_is_one_region_in_polygons_and_brush(tmp_path, image_server):
    """MASK_MIN_PART: the specks a mask leaves around its object are dropped, in polygon and brush output;
    0 keeps them (three polygons: the object and two specks)."""
    url = image_server.add("/plain.png", exif_rotated_png())
    fetcher = ImageFetcher(settings_for(tmp_path))
    loaded = LoadedModel(SpeckledMask().eval(), "m-v1", LABELS)
    tasks = [{"id": 1, "data": {"image": url}}]
    assert len(Predictor(None, fetcher, 0.5, 100).predict_with(loaded, tasks, POLY)[0]["result"]) == 1
    every_part = Predictor(None, fetcher, 0.5, 100, mask_min_part=0.0).predict_with(loaded, tasks, POLY)[0]["result"]
    assert len(every_part) == 3
    brush = Predictor(None, fetcher, 0.5, 100).predict_with(loaded, tasks, BRUSH)[0]["result"]
    raw = Predictor(None, fetcher, 0.5, 100, mask_min_part=0.0).predict_with(loaded, tasks, BRUSH)[0]["result"]
    kept, speckled = (rle_to_mask(r[0]["value"]["rle"], 120, 160) for r in (brush, raw))
    import cv2

    assert cv2.connectedComponents(kept.astype(np.uint8))[0] - 1 == 1
    assert cv2.connectedComponents(speckled.astype(np.uint8))[0] - 1 == 3
    assert kept.sum() > 0.9 * speckled.sum() and not (kept & ~speckled).any()
    semantic = Predictor(None, fetcher, 0.5, 100, mask_output="semantic").predict_with(loaded, tasks, BRUSH)[0]["result"]
    assert np.array_equal(rle_to_mask(semantic[0]["value"]["rle"], 120, 160), kept)  # per object, before the union


# -- live training ---------------------------------------------------------------------------------------
def mask_ap50(model, fetcher, image_server, seeds) -> float:
    """pycocotools' segm AP@0.5 of ``model`` on fresh generated images."""
    import contextlib

    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    encode = lambda m: coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))  # noqa: E731
    gt = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 2}]}
    detections = []
    model.eval()
    for seed in seeds:
        png, objects = shapes_with_masks(seed)
        gt["images"].append({"id": seed, "width": 160, "height": 120})
        for mask, label in objects:
            rle = encode(mask)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": seed, "iscrowd": 0,
                                      "category_id": LABELS.index(label) + 1, "segmentation": rle,
                                      "area": float(mask.sum()), "bbox": list(coco_mask.toBbox(rle))})
        image = fetcher.fetch(image_server.add(f"/fresh{seed}.png", png))
        from backend.labelstudio.convert import image_to_tensor

        with torch.inference_mode():
            out = forward(model, [image_to_tensor(image)])[0]
        for box, label, score, m in zip(out["boxes"], out["labels"].tolist(), out["scores"].tolist(), out["masks"]):
            crop, offset = paste_in_box(m, box, 160, 120)
            detections.append({"image_id": seed, "category_id": label, "score": score,
                               "segmentation": encode(full_mask(crop, offset, 160, 120))})
    if not detections:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


MASK_AP50_BAR = 0.6


def ragged_detections(count: int, seed: int = 0) -> dict:
    """``count`` Mask R-CNN detections on a 400x300 image: noisy 28 x 28 probability maps (ragged outlines,
    many polygon points each) in boxes on a grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    radius = np.hypot(yy - 13.5, xx - 13.5)
    boxes, masks = [], []
    for i in range(count):
        noise = rng.uniform(-3.0, 3.0, (28, 28))
        masks.append(torch.from_numpy((radius + noise < 11).astype(np.float32))[None])
        x, y = 40 * (i % 10), 40 * (i // 10)
        boxes.append([x + 2, y + 2, x + 38, y + 38])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "masks": torch.stack(masks)}


def test_one_tasks_polygons_keep_within_polygon_total_points():
    """Label Studio's editor slows down with the points a task holds (scripts/bench_editor.py): past
    POLYGON_TOTAL_POINTS every polygon is traced again with an equal share; the objects stay the same."""
    det = ragged_detections(30)
    kept = [(i, "Square", 0.9) for i in range(30)]
    free = Predictor(None, None, 0.5, 100, polygon_total_points=10**6)._mask_regions(det, kept, 400, 300, POLY)
    total = sum(len(r["value"]["points"]) for r in free)
    assert total > 900  # ragged: far more than the budget below
    budget = 600
    bounded = Predictor(None, None, 0.5, 100, polygon_total_points=budget)._mask_regions(det, kept, 400, 300, POLY)
    assert len(bounded) == len(free) and sum(len(r["value"]["points"]) for r in bounded) <= budget
    for coarse, fine in zip(bounded, free):  # each polygon still outlines its object
        a, b = polygon_to_mask(coarse["value"]["points"], 400, 300), polygon_to_mask(fine["value"]["points"], 400, 300)
        assert mask_iou(a, b) > 0.75  # 20 points for a very ragged outline: its shape, not its noise
    # under the budget nothing changes; brush regions have no points to count
    exact = Predictor(None, None, 0.5, 100, polygon_total_points=total)._mask_regions(det, kept, 400, 300, POLY)
    assert [r["value"] for r in exact] == [r["value"] for r in free]  # (each region has an id of its own)
    brush = Predictor(None, None, 0.5, 100, polygon_total_points=4)._mask_regions(det, kept, 400, 300, BRUSH)
    assert len(brush) == 30


def test_mask_rounds_learn_shapes_mask_ap(tmp_path, image_server):
    """Polygon annotations, three rounds as labels arrive: mask AP@0.5 on fresh images clears the bar."""
    torch.manual_seed(0)
    settings = settings_for(tmp_path, batch_size=4, learning_rate=0.02, full_after=1000)
    starting = resolve_starting_weights(settings.mask_arch, download=False, task="masks")
    assert (starting.arch, starting.source) == ("maskrcnn_lite0_slim", "imagenet-lite0")
    fetcher = ImageFetcher(settings)
    records = mask_records(image_server, range(24))
    for size in (12, 24):
        meta = train_version(settings, starting, fetcher, SessionInputs("1", "shapes", LABELS, "masks"), records[:size], 30)
    assert meta["name"] == "shapes-v2" and meta["task"] == "masks" and meta["arch"] == "maskrcnn_lite0_slim"
    store = VersionStore(tmp_path, "1")
    assert isinstance(store.meta("shapes-v1").get("quality"), float)  # scored with mask IoU on new images
    model = model_from_version(*store.load("shapes-v2"), min_size=128)
    ap50 = mask_ap50(model, fetcher, image_server, range(500, 512))
    print(f"mask AP@0.5 on 12 fresh images: {ap50:.3f} (quality of v1 on its new images: {store.meta('shapes-v1')['quality']:.3f})")
    assert ap50 >= MASK_AP50_BAR, f"mask AP@0.5 {ap50:.3f} < {MASK_AP50_BAR}"


def test_brush_round_then_box_config_starts_a_new_model(tmp_path, image_server):
    """Brush annotations train a Mask R-CNN version; when the project's config turns to rectangles, the
    next round starts a Faster R-CNN instead of growing the mask model."""
    settings = settings_for(tmp_path)
    fetcher = ImageFetcher(settings)
    masks = resolve_starting_weights(settings.mask_arch, download=False, task="masks")
    meta = train_version(settings, masks, fetcher, SessionInputs("1", "p", LABELS, "masks"),
                         mask_records(image_server, range(3), "brush"), 8)
    state, _ = VersionStore(tmp_path, "1").load(meta["name"])
    assert meta["task"] == "masks" and "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
    boxes = resolve_starting_weights(settings.model_arch, download=False)
    png, objects = shapes_image(1)
    from tests.test_training import records_for

    meta = train_version(settings, boxes, fetcher, SessionInputs("1", "p", LABELS, "boxes"),
                         records_for(image_server, range(3)), 8)
    assert meta["task"] == "boxes" and meta["parent"] is None and meta["arch"] == "fasterrcnn_lite0_fpn128"


def test_predict_route_serves_a_published_mask_version_and_health_names_the_mask_model(tmp_path, image_server):
    """Through the Flask app and the real model pool: a PolygonLabels project serves its Mask R-CNN version;
    the same project with a RectangleLabels config is not served that version (wrong kind)."""
    from backend.api import create_app

    app = create_app(Settings(model_dir=tmp_path, download_weights=False, label_studio_url="", min_size=128,
                              score_threshold=0.0, image_url_allowlist="127.0.0.1"))
    client = app.test_client()
    mask_model = client.get("/health").get_json()["mask_model"]
    assert (mask_model["model_class"], mask_model["weights_source"]) == ("maskrcnn_lite0_slim", "imagenet-lite0")
    torch.manual_seed(0)
    starting = app.extensions["livetrain"].starting_for("masks")
    VersionStore(tmp_path, "7").publish(starting.build(3).state_dict(),
                                        {"arch": starting.arch, "task": "masks", "classes": list(LABELS)}, "cells")
    png, _ = shapes_with_masks(1)
    url = image_server.add("/p.png", png)
    payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": "7.1795333704", "label_config": POLYGON_CONFIG}
    result = client.post("/predict", json=payload).get_json()["results"][0]
    assert result["model_version"] == "cells-v1" and isinstance(result["score"], float)
    assert result["result"] and {r["type"] for r in result["result"]} == {"polygonlabels"}
    boxes = client.post("/predict", json=dict(payload, label_config=CONFIG)).get_json()["results"][0]
    assert boxes == {"result": [], "score": None, "model_version": "livetrain-base"}
    setup = {"project": "7.1795333704", "schema": POLYGON_CONFIG, "hostname": "", "access_token": ""}
    assert client.post("/setup", json=setup).get_json()["model_version"] == "cells-v1"
    assert client.post("/setup", json=dict(setup, schema=CONFIG)).get_json()["model_version"] == "livetrain-base"


@pytest.mark.parametrize("measure", ["least_confidence", "mean_confidence", "entropy", "flip_stability"])
def test_every_uncertainty_measure_runs_on_a_mask_model(measure):
    from backend.inference.uncertainty import detect_and_score

    torch.manual_seed(0)
    model = build_detector("maskrcnn_lite0_fpn", 3, min_size=96, max_size=128).eval()
    model.roi_heads.score_thresh = 0.05
    detections, scores = detect_and_score(model, [torch.rand(3, 96, 128), torch.rand(3, 80, 100)], measure)
    assert len(detections) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    assert all(d["masks"].shape[-2:] == (28, 28) for d in detections)  # never pasted at image size


def test_config_switch_from_rectangles_to_polygons_through_the_training_job(tmp_path):
    """The real job path (Label Studio double, embedded Redis, sync, round): a project that labels rectangles
    and polygons trains boxes (first supported tag); once the RectangleLabels tag says model_skip, the next
    job re-syncs, leaves out the image that only has rectangles (not a negative), trains a new Mask R-CNN
    even though no annotation changed, and refuses a rollback to the box version."""
    from backend.errors import BadRequest
    from backend.jobs.state import ProjectState
    from backend.jobs.training import _train_locked, rollback_to
    from backend.training.dataset import TrainingSet
    from tests.livetrain_fixtures import live_env, regions

    fake, project, settings, app = live_env(tmp_path)
    both = CONFIG.replace("</View>", '<PolygonLabels name="poly" toName="image"><Label value="Square"/>'
                                     '<Label value="Disc"/></PolygonLabels></View>')
    fake.projects[project]["label_config"] = both
    poly = parse_label_config(both.replace('<RectangleLabels name="label"', '<RectangleLabels name="label" model_skip="true"')).primary
    for seed in range(4):
        png, objects = shapes_with_masks(seed)
        boxes = [(*np.argwhere(m.T).min(0), *(np.argwhere(m.T).max(0) + 1), label) for m, label in objects]
        result = regions(fake, boxes, 160, 120) + (polygon_results(objects, control=poly) if seed < 3 else [])
        fake.annotate(fake.add_task(project, png, name=f"m{seed}.png"), result)
    connection = app.extensions["livetrain"].redis
    state = ProjectState(connection, str(project))
    try:
        first = _train_locked(settings, connection, state, str(project))
        store = VersionStore(settings.model_dir, str(project))
        assert first["published"] and store.meta(first["published"])["task"] == "boxes"
        assert store.meta(first["published"])["images"] == 4

        fake.projects[project]["label_config"] = both.replace('<RectangleLabels name="label"',
                                                              '<RectangleLabels name="label" model_skip="true"')
        second = _train_locked(settings, connection, state, str(project))
        meta = store.meta(second["published"])
        assert (meta["task"], meta["arch"], meta["images"]) == ("masks", "maskrcnn_lite0_slim", 3)
        assert store.meta(second["versions"][0])["parent"] is None  # the session's first mask version: a new model
        assert TrainingSet(settings.model_dir, str(project)).task == "masks"
        with pytest.raises(BadRequest, match="predicts boxes"):
            rollback_to(settings, str(project), first["published"])
        assert store.active() == second["published"]
    finally:
        fake.close()
