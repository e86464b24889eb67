"""Box mAP with pycocotools (the reference implementation), for benchmarks."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch


@torch.inference_mode()
def evaluate_map(model: torch.nn.Module, images: list, num_classes: int, device: str = "cpu") -> dict:
    """``{"map50", "map", "ap50_per_class"}`` of ``model`` on ``images`` (classes 1..num_classes).

    ``images`` are ``training.coco.CocoImage`` objects, not imported here: metrics sits below training."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in range(1, num_classes + 1)]}
    detections = []
    for image in images:
        gt["images"].append({"id": image.id, "width": image.width, "height": image.height})
        for box, label in zip(image.boxes, image.labels):
            x1, y1, x2, y2 = box
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image.id, "category_id": label,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        out = model([image.load().to(device)])[0]
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            x1, y1, x2, y2 = box
            detections.append({"image_id": image.id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not detections:
            return {"map50": 0.0, "map": 0.0, "ap50_per_class": [0.0] * num_classes}
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all recall, classes, area all, 100 dets
    per_class = [float(np.mean(p[p > -1])) if (p > -1).any() else 0.0 for p in precision.T]
    return {"map50": float(evaluator.stats[1]), "map": float(evaluator.stats[0]), "ap50_per_class": per_class}
