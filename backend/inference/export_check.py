"""Parity of an exported model (``backend.model_store.export``) with what /predict serves for the same image.

The served side is /predict's own path: the version loaded as the model pool loads it (same MIN_SIZE, the
same candidate floor), the image shrunk to the model's working size, ``detect.forward``, boxes scaled back,
the score threshold and the detection limit. The exported side is the artifact's README example: the same
shrink, the exported model, the same threshold. Detections are matched per label; boxes must agree within
``box_tol`` pixels and scores within ``score_tol`` (a detection whose score lies within ``score_tol`` of the
threshold may be on one side only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.inference.predictor import RAW_SCORE_FLOOR
from backend.labelstudio.convert import image_to_tensor, shrink, working_scale
from backend.model_store.detect import MASK_THRESHOLD, forward, full_mask, paste_in_box, serving_limit
from backend.model_store.export import load_exported, resolve_version, sample_image
from backend.model_store.models import model_from_version

BOX_TOL = 2.0  # pixels
SCORE_TOL = 1e-3


def served_model(model_dir: Path, project: str, version: str | None, min_size: int = 0) -> torch.nn.Module:
    """The version as ``ModelPool`` serves it."""
    store, name = resolve_version(model_dir, project, version)
    model = model_from_version(*store.load(name), min_size)
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR
    return model.eval()


def _kept(boxes, labels, scores, threshold: float, limit: int) -> np.ndarray:
    return np.flatnonzero(np.asarray(scores) >= threshold)[:limit]


def served_detections(model: torch.nn.Module, image: Image.Image, threshold: float, limit: int) -> dict:
    """What /predict finds in ``image``: boxes in its pixels, labels (head index), scores, and for a Mask R-CNN
    bool masks at the working size (the size the model is given)."""
    small, scale = shrink(image, serving_limit(model))
    with torch.inference_mode():
        det = forward(model, [image_to_tensor(small)])[0]
    keep = _kept(det["boxes"], det["labels"], det["scores"], threshold, limit)
    out = {"boxes": det["boxes"].numpy()[keep] / scale, "labels": det["labels"].numpy()[keep],
           "scores": det["scores"].numpy()[keep]}
    if "masks" in det:
        out["masks"] = [full_mask(*paste_in_box(det["masks"][i], det["boxes"][i], small.width, small.height),
                                  small.width, small.height) for i in keep]
    return out


def exported_detections(run, config: dict, image: Image.Image) -> dict:
    """The exported model on ``image``, as its README example runs it."""
    scale = working_scale(image.width, image.height, (config["min_size"], config["max_size"]))
    if scale < 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    outputs = run(np.asarray(image, dtype=np.uint8))
    keep = _kept(*outputs[:3], config["score_threshold"], config["max_detections"])
    out = {"boxes": outputs[0][keep] / scale, "labels": outputs[1][keep], "scores": outputs[2][keep]}
    if config["task"] == "masks":
        out["masks"] = [outputs[3][i, 0] >= MASK_THRESHOLD for i in keep]
    return out


def compare(served: dict, exported: dict, threshold: float, box_tol: float = BOX_TOL, score_tol: float = SCORE_TOL) -> dict:
    """Match each served detection to the closest exported one of the same label; report the differences."""
    used: set[int] = set()
    box_diff = score_diff = 0.0
    mask_ious, missing = [], 0
    for i, (box, label, score) in enumerate(zip(served["boxes"], served["labels"], served["scores"])):
        candidates = [j for j in range(len(exported["labels"])) if j not in used and exported["labels"][j] == label]
        if not candidates:
            missing += abs(score - threshold) > score_tol
            continue
        j = min(candidates, key=lambda j: float(np.abs(exported["boxes"][j] - box).max()))
        used.add(j)
        box_diff = max(box_diff, float(np.abs(exported["boxes"][j] - box).max()))
        score_diff = max(score_diff, abs(float(exported["scores"][j]) - float(score)))
        if "masks" in served:
            a, b = served["masks"][i], exported["masks"][j]
            union = np.logical_or(a, b).sum()
            mask_ious.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
    extra = sum(abs(float(exported["scores"][j]) - threshold) > score_tol
                for j in range(len(exported["labels"])) if j not in used)
    report = {"served": len(served["labels"]), "exported": len(exported["labels"]), "missing": missing,
              "extra": int(extra), "max_box_diff_px": round(box_diff, 4), "max_score_diff": round(score_diff, 6)}
    if "masks" in served:
        report["min_mask_iou"] = round(min(mask_ious, default=1.0), 4)
    report["ok"] = (missing == 0 and extra == 0 and box_diff <= box_tol and score_diff <= score_tol
                    and report.get("min_mask_iou", 1.0) >= 0.9)
    return report


def check_export(export_dir: Path, model_dir: Path, images: dict[str, Image.Image], min_size: int = 0,
                 box_tol: float = BOX_TOL, score_tol: float = SCORE_TOL) -> dict:
    """Compare the artifact in ``export_dir`` with the served version on ``images`` (name -> RGB image).
    Returns ``{"ok": bool, "images": {name: report}}``."""
    config, _, run = load_exported(export_dir)
    model = served_model(model_dir, config["project"], config["version"], min_size)
    threshold, limit = config["score_threshold"], config["max_detections"]
    reports = {name: compare(served_detections(model, image, threshold, limit), exported_detections(run, config, image),
                             threshold, box_tol, score_tol) for name, image in images.items()}
    return {"ok": all(r["ok"] for r in reports.values()), "images": reports}


def sample_images(cache_dir: Path, count: int = 2, min_size: int = 320) -> dict[str, Image.Image]:
    """A few images to check on when none are given: the newest ones in the image cache (the project's own
    kind of pictures, though maybe another project's), else generated ones."""
    found: dict[str, Image.Image] = {}
    files = sorted((p for p in Path(cache_dir).glob("*") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files[:50]:
        try:
            with Image.open(path) as image:
                found[f"cache/{path.name[:12]}"] = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(found) == count:
            return found
    for seed in range(count - len(found)):
        found[f"generated-{seed}"] = Image.fromarray(sample_image(min_size, 2 * min_size, seed).numpy())
    return found


def format_report(report: dict) -> str:
    lines = []
    for name, r in report["images"].items():
        masks = f" min mask IoU {r['min_mask_iou']:.3f}" if "min_mask_iou" in r else ""
        lines.append(f"  {name}: served {r['served']} exported {r['exported']} missing {r['missing']} extra {r['extra']} "
                     f"max box diff {r['max_box_diff_px']:.3f} px max score diff {r['max_score_diff']:.2e}{masks} "
                     f"{'ok' if r['ok'] else 'MISMATCH'}")
    return "\n".join([f"parity with /predict: {'ok' if report['ok'] else 'MISMATCH'}", *lines])
