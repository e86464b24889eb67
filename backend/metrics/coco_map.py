"""COCO mAP with pycocotools (the reference implementation): box mAP for detectors, and mask (segm) mAP for
Mask R-CNN, overall and per class.

``coco_map`` scores detections against ground truth that the caller has already put in one pixel frame
(``GroundTruth`` / ``Detections``: pixel boxes, 1-based labels, optional full-image bool masks; a live
project's validation split is scored through it by ``backend.training.validation``); ``evaluate_map`` is
the benchmarks' entry point (``training.coco.CocoImage`` objects, box mAP only).

Per class: AP (IoU 0.50:0.95) and AP50 of each class that has at least one ground-truth object in the
images; a class without one has no defined AP (pycocotools gives -1) and is left out.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch

IOU_TYPES = {"box": "bbox", "mask": "segm"}


@dataclass
class GroundTruth:
    id: int
    width: int
    height: int
    boxes: list = field(default_factory=list)  # [x1, y1, x2, y2] pixels
    labels: list = field(default_factory=list)  # 1-based class index
    masks: list | None = None  # bool HxW arrays, one per box (mask evaluation only)


@dataclass
class Detections:
    image_id: int
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    masks: list | None = None  # bool HxW arrays, one per box (mask evaluation only)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_inputs(truth: list[GroundTruth], detections: list[Detections], num_classes: int, kind: str = "box"):
    """The COCO ground-truth dataset dict and the detection result list pycocotools takes, for ``kind``
    ``box`` (bbox) or ``mask`` (segm)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, num_classes + 1)]}
    for image in truth:
        gt["images"].append({"id": image.id, "width": image.width, "height": image.height})
        for i, (box, label) in enumerate(zip(image.boxes, image.labels)):
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {"id": len(gt["annotations"]) + 1, "image_id": image.id, "category_id": int(label),
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if kind == "mask":
                ann["segmentation"] = _rle(image.masks[i])
                ann["area"] = float(np.asarray(image.masks[i]).sum())
            gt["annotations"].append(ann)
    results = []
    for det in detections:
        for i, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels)):
            x1, y1, x2, y2 = (float(v) for v in box)
            entry = {"image_id": det.image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "score": float(score)}
            if kind == "mask":
                entry["segmentation"] = _rle(det.masks[i])
            results.append(entry)
    return gt, results


def _run_cocoeval(gt: dict, results: list, iou_type: str):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not results:
            return None
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _mean_valid(p: np.ndarray) -> float | None:
    return float(np.mean(p[p > -1])) if (p > -1).any() else None


def coco_map(truth: list[GroundTruth], detections: list[Detections], class_names: tuple[str, ...],
             kinds: tuple[str, ...] = ("box",)) -> dict:
    """``{kind: {"map", "map50", "per_class": {name: {"ap", "ap50"}}}}`` for each of ``kinds`` (``box``,
    ``mask``). ``class_names[i]`` names label ``i + 1``. No detection at all scores 0."""
    present = sorted({int(label) for image in truth for label in image.labels})
    out = {}
    for kind in kinds:
        gt, results = coco_inputs(truth, detections, len(class_names), kind)
        evaluator = _run_cocoeval(gt, results, IOU_TYPES[kind])
        if evaluator is None:
            out[kind] = {"map": 0.0, "map50": 0.0,
                         "per_class": {class_names[c - 1]: {"ap": 0.0, "ap50": 0.0} for c in present}}
            continue
        precision = evaluator.eval["precision"][:, :, :, 0, 2]  # IoUs x recall x classes, area all, 100 dets
        per_class = {}
        for c in present:
            ap, ap50 = _mean_valid(precision[:, :, c - 1]), _mean_valid(precision[0, :, c - 1])
            per_class[class_names[c - 1]] = {"ap": round(ap or 0.0, 4), "ap50": round(ap50 or 0.0, 4)}
        # stats are -1 when no image has a ground-truth object: nothing to find, nothing found counts as 0 here
        out[kind] = {"map": round(max(float(evaluator.stats[0]), 0.0), 4),
                     "map50": round(max(float(evaluator.stats[1]), 0.0), 4), "per_class": per_class}
    return out


@torch.inference_mode()
def evaluate_map(model: torch.nn.Module, images: list, num_classes: int, device: str = "cpu") -> dict:
    """``{"map50", "map", "ap50_per_class"}`` of ``model`` on ``images`` (classes 1..num_classes).

    ``images`` are ``training.coco.CocoImage`` objects, not imported here: metrics sits below training."""
    model.eval()
    truth, found = [], []
    for image in images:
        truth.append(GroundTruth(image.id, image.width, image.height, list(image.boxes), list(image.labels)))
        out = model([image.load().to(device)])[0]
        found.append(Detections(image.id, out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()))
    gt, results = coco_inputs(truth, found, num_classes, "box")
    evaluator = _run_cocoeval(gt, results, "bbox")
    if evaluator is None:
        return {"map50": 0.0, "map": 0.0, "ap50_per_class": [0.0] * num_classes}
    precision = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all recall, classes, area all, 100 dets
    per_class = [float(np.mean(p[p > -1])) if (p > -1).any() else 0.0 for p in precision.T]
    return {"map50": float(evaluator.stats[1]), "map": float(evaluator.stats[0]), "ap50_per_class": per_class}
