"""Mask levers on building_facades, one at a time: segm mAP, step time and forward time per setting, in one run.

    python scripts/bench_mask_levers.py [--data ../shared/datasets/building_facades] [--images 30] [--steps 200]
        [--test-images 30] [--variants base min_size=480 rois=256 arch=maskrcnn_lite0_slim mask_res=28 ...]
        [--out docs/bench-mask-levers.json]

Each variant trains a Mask R-CNN from the offline ImageNet Lite0 weights on the same first ``--images`` train
images with the live recipe (``backend.simulation.offline.train_offline``: SGD, warm-up + cosine, augmentation,
the mode live training would pick, the same seed, so the same batches), then scores box and segm mAP on the first
``--test-images`` test images and times the forward on ``--forward-images`` of them (median, after a warm-up).
A variant is ``base`` (``--base-arch``, maskrcnn_lite0_fpn, the mask default when this was first run; 320 px, 128
RoIs per image, 14 px mask RoIs) or comma-separated overrides of it:

- ``min_size=N``: the working size (MIN_SIZE), for the small windows of 640 px facades;
- ``rois=N``: RoIs sampled per image for the box and mask losses (a quarter of them may be objects: with 128
  and ~35 objects per facade, not every object teaches the mask head in a step);
- ``mask_res=N``: the mask head's RoI size (torchvision's 14; its masks are twice that);
- ``arch=NAME``: another mask architecture (e.g. maskrcnn_lite0_slim: narrower FPN, box and mask heads);
- ``steps=N``: its own step budget (a slower lever, given about the steps that fit in the base's wall time,
  says whether it pays for itself live).

Afterwards the base model's masks on the test images are turned into polygons with several POLYGON_TOLERANCE /
POLYGON_MAX_POINTS pairs: points per object against the IoU of the polygon with the mask it came from.
Seconds per step and forward milliseconds are measured in the same run, so their ratios to the base are the cost;
run it on a quiet machine. One seed: differences of a few hundredths of mAP are inside seed noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import MultiScaleRoIAlign

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.labelstudio.masks import drop_specks, mask_iou, mask_to_polygons, polygon_to_mask  # noqa: E402
from backend.model_store.weights import StartingWeightsByTask  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.offline import split_map, train_offline  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402

LEVERS = ("min_size", "steps", "rois", "mask_res", "arch")
POLYGON_SETTINGS = ((0.75, 200), (1.5, 200), (3.0, 200), (1.5, 50), (1.5, 20))


def parse_variant(text: str, base: dict) -> dict:
    out = dict(base)
    if text == "base":
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in LEVERS:
            raise SystemExit(f"unknown lever {key!r} in {text!r} ({', '.join(LEVERS)})")
        out[key] = value if key == "arch" else int(value)
    return out


def adjuster(variant: dict):
    def adjust(model) -> None:
        heads = model.roi_heads
        heads.fg_bg_sampler.batch_size_per_image = variant["rois"]
        if variant["mask_res"] != heads.mask_roi_pool.output_size[0]:
            heads.mask_roi_pool = MultiScaleRoIAlign(heads.mask_roi_pool.featmap_names, variant["mask_res"], 2)
    return adjust


def forward_ms(model, images, repeats: int = 1) -> float:
    tensors = [im.load() for im in images]
    times = []
    with torch.inference_mode():
        model([tensors[0]])  # warm-up
        for _ in range(repeats):
            for tensor in tensors:
                began = time.perf_counter()
                model([tensor])
                times.append(time.perf_counter() - began)
    return round(1000 * statistics.median(times), 1)


def polygon_trade(model, images, threshold: float = 0.5) -> list[dict]:
    """Points per object and polygon-vs-mask IoU for each (tolerance, max_points), on ``model``'s masks."""
    masks = []
    with torch.inference_mode():
        for im in images:
            out = model([im.load()])[0]
            for score, mask in zip(out["scores"], out["masks"]):
                if score >= threshold:
                    kept = drop_specks(mask[0].numpy() > 0.5, 0.1)
                    if kept.any():
                        masks.append((kept, im.width, im.height))
    rows = []
    for tolerance, max_points in POLYGON_SETTINGS:
        points, ious = [], []
        for mask, width, height in masks:
            polygons = mask_to_polygons(mask, width, height, tolerance=tolerance, max_points=max_points)
            drawn = np.zeros_like(mask)
            for ring in polygons:
                drawn |= polygon_to_mask(ring, width, height)
            points.append(sum(len(ring) for ring in polygons))
            ious.append(mask_iou(drawn, mask))
        rows.append({"tolerance": tolerance, "max_points": max_points, "objects": len(masks),
                     "points_per_object": round(float(np.mean(points)), 1) if masks else 0.0,
                     "mean_iou": round(float(np.mean(ious)), 4) if masks else 0.0,
                     "iou_p10": round(float(np.percentile(ious, 10)), 4) if masks else 0.0})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/building_facades"))
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=30)
    parser.add_argument("--forward-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-arch", default="maskrcnn_lite0_fpn", help="the base variant's mask architecture")
    parser.add_argument("--variants", nargs="+",
                        default=["base", "min_size=480", "rois=256", "mask_res=28", "arch=maskrcnn_lite0_slim"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes, images = load_coco(args.data)
    train = [im for im in images if im.split == "train" and im.has_polygons][: args.images]
    test = [im for im in images if im.split == "test"][: args.test_images]
    settings = Settings.from_env({"DOWNLOAD_WEIGHTS": "false"})
    base = {"min_size": 320, "steps": args.steps, "rois": 128, "mask_res": 14, "arch": args.base_arch}
    rows, trade = [], []
    for text in args.variants:
        variant = parse_variant(text, base)
        run_settings = dataclasses.replace(settings, min_size=variant["min_size"], mask_arch=variant["arch"])
        starting = StartingWeightsByTask(run_settings)("masks")
        began = time.perf_counter()
        model = train_offline(run_settings, starting, train, tuple(classes), variant["steps"], "cpu", args.seed,
                              adjust=adjuster(variant))
        seconds = time.perf_counter() - began
        scores = split_map(model, test, tuple(classes), "cpu", "masks")
        rows.append({"variant": text, **variant, "s_per_step": round(seconds / variant["steps"], 3),
                     "forward_ms": forward_ms(model, test[: args.forward_images]), **scores})
        print(json.dumps(rows[-1]), flush=True)
        if text == "base":
            trade = polygon_trade(model, test[: args.forward_images])
    first = rows[0]
    print(f"\n{args.images} train images, {len(test)} test images, {args.threads} threads, seed {args.seed}; "
          f"ratios to {first['variant']!r}:")
    print(f"{'variant':<30} {'steps':>5} {'s/step':>7} {'x':>5} {'fwd ms':>7} {'x':>5} "
          f"{'segm50':>7} {'segm':>7} {'box50':>7} {'box':>7}")
    for row in rows:
        print(f"{row['variant']:<30} {row['steps']:>5} {row['s_per_step']:>7.3f} "
              f"{row['s_per_step'] / first['s_per_step']:>5.2f} {row['forward_ms']:>7.1f} "
              f"{row['forward_ms'] / first['forward_ms']:>5.2f} {row['segm_map50']:>7.4f} {row['segm_map']:>7.4f} "
              f"{row['map50']:>7.4f} {row['map']:>7.4f}")
    if trade:
        print(f"\npolygons from the base model's masks ({trade[0]['objects']} objects at score >= 0.5):")
        print(f"{'tolerance':>9} {'max pts':>7} {'pts/object':>10} {'IoU mean':>8} {'IoU p10':>8}")
        for row in trade:
            print(f"{row['tolerance']:>9} {row['max_points']:>7} {row['points_per_object']:>10} "
                  f"{row['mean_iou']:>8.4f} {row['iou_p10']:>8.4f}")
    if args.out:
        args.out.write_text(json.dumps({"images": args.images, "test_images": len(test), "threads": args.threads,
                                        "seed": args.seed, "rows": rows, "polygons": trade}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
