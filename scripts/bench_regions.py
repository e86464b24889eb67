"""Regions per predicted object in polygon and brush output, with and without dropping specks (MASK_MIN_PART).

    python scripts/bench_regions.py [--data ../shared/datasets/building_facades] [--images 30] [--steps 200]
                                    [--test 20] [--min-part 0.1]

Trains the default Mask R-CNN offline on ``--images`` train images for ``--steps`` steps, as a live session would
(``backend.simulation.offline.train_offline``: a half-trained model, like a project's early versions), then runs
the server's own post-processing (``Predictor``) on ``--test`` test images at SCORE_THRESHOLD 0.5 and counts,
for polygons, the regions each returned object became, and for brush, the connected parts of each object's mask:
once keeping every part (MASK_MIN_PART=0, livetrain before the fix) and once with ``--min-part``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.inference.predictor import RAW_SCORE_FLOOR, LoadedModel, Predictor  # noqa: E402
from backend.labelstudio.convert import image_to_tensor  # noqa: E402
from backend.labelstudio.label_config import parse_label_config  # noqa: E402
from backend.labelstudio.masks import rle_to_mask  # noqa: E402
from backend.model_store.detect import forward  # noqa: E402
from backend.model_store.weights import resolve_starting_weights  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.offline import train_offline  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402


def config(tag: str, classes) -> str:
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    return f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'


def count(model, images, classes, min_part: float) -> dict:
    """Objects returned, polygon regions, and brush parts (8-connected) over ``images``."""
    controls = {tag: parse_label_config(config(tag, classes)).primary for tag in ("PolygonLabels", "BrushLabels")}
    loaded = LoadedModel(model, "bench", tuple(classes))
    post = Predictor(None, None, 0.5, 100, mask_min_part=min_part)
    objects = polygons = brush_parts = 0
    per_object = []
    for image in images:
        pil = Image.open(image.path).convert("RGB")
        det = forward(model, [image_to_tensor(pil)])[0]
        poly = post._to_prediction(det, 1.0, pil.size, controls["PolygonLabels"], loaded, None, None)["result"]
        brush = post._to_prediction(det, 1.0, pil.size, controls["BrushLabels"], loaded, None, None)["result"]
        objects += len(brush)
        polygons += len(poly)
        for region in brush:
            mask = rle_to_mask(region["value"]["rle"], pil.size[0], pil.size[1]).astype(np.uint8)
            parts = cv2.connectedComponents(mask, connectivity=8)[0] - 1
            brush_parts += parts
            per_object.append(parts)
    return {"objects": objects, "polygons": polygons, "brush_parts": brush_parts,
            "polygons_per_object": polygons / max(objects, 1), "brush_parts_per_object": brush_parts / max(objects, 1),
            "objects_in_one_part": sum(p == 1 for p in per_object) / max(len(per_object), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/building_facades")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test", type=int, default=20)
    parser.add_argument("--min-part", type=float, default=Settings.from_env({}).mask_min_part)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    classes, images = load_coco(args.data)
    train = [im for im in images if im.split == "train" and im.has_polygons][: args.images]
    test = [im for im in images if im.split != "train" and im.has_polygons][: args.test]
    settings = Settings.from_env({})
    starting = resolve_starting_weights(settings.mask_arch, download=False, task="masks")
    model = train_offline(settings, starting, train, tuple(classes), args.steps)
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR
    with torch.inference_mode():
        rows = {"every part (MASK_MIN_PART=0)": count(model, test, classes, 0.0),
                f"MASK_MIN_PART={args.min_part}": count(model, test, classes, args.min_part)}
    print(f"{args.data.name}: {starting.arch} trained {args.steps} steps on {len(train)} images; {len(test)} test "
          f"images, SCORE_THRESHOLD 0.5\n")
    print("| output | objects | polygon regions | per object | brush parts per object | objects in one part |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['objects']} | {r['polygons']} | {r['polygons_per_object']:.2f} | "
              f"{r['brush_parts_per_object']:.2f} | {r['objects_in_one_part']:.0%} |")


if __name__ == "__main__":
    main()
