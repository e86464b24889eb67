"""Mask levers on building_facades, one at a time: segm mAP and step time of the offline recipe per setting.

    python scripts/bench_mask_levers.py [--data ../shared/datasets/building_facades] [--images 30] [--steps 300]
        [--test-images 40] [--variants base min_size=480 min_size=480,steps=150] [--out docs/bench-mask-levers.json]

Each variant trains the default mask architecture from the offline ImageNet Lite0 weights on the same first
``--images`` train images with the live recipe (``backend.simulation.offline.train_offline``: SGD, warm-up +
cosine, augmentation, the mode live training would pick, same seed), then scores box and segm mAP on the first
``--test-images`` test images at the image size. A variant is ``base`` or comma-separated overrides of the base:
``min_size=N`` (the working size: the shorter side, MIN_SIZE) or ``steps=N`` (its own step budget: with a larger
working size, the steps that fit in the base's wall time say whether the lever pays for itself live). Seconds per
step are measured in the same run, so their ratio to the base is the cost; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model_store.weights import StartingWeightsByTask  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.offline import split_map, train_offline  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402


def parse_variant(text: str, base: dict) -> dict:
    out = dict(base)
    if text == "base":
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("min_size", "steps"):
            raise SystemExit(f"unknown lever {key!r} in {text!r} (min_size, steps)")
        out[key] = int(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/building_facades"))
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["base", "min_size=480", "min_size=480,steps=150"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes, images = load_coco(args.data)
    train = [im for im in images if im.split == "train" and im.has_polygons][: args.images]
    test = [im for im in images if im.split == "test"][: args.test_images]
    settings = Settings.from_env({"DOWNLOAD_WEIGHTS": "false"})
    starting = StartingWeightsByTask(settings)("masks")
    base = {"min_size": settings.min_size, "steps": args.steps}
    rows = []
    for text in args.variants:
        variant = parse_variant(text, base)
        run_settings = dataclasses.replace(settings, min_size=variant["min_size"])
        began = time.perf_counter()
        model = train_offline(run_settings, starting, train, tuple(classes), variant["steps"], "cpu", args.seed)
        seconds = time.perf_counter() - began
        scores = split_map(model, test, tuple(classes), "cpu", "masks")
        rows.append({"variant": text, **variant, "working_size": model.transform.min_size[0],
                     "s_per_step": round(seconds / variant["steps"], 3), **scores})
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    print(f"\n{args.images} train images, {len(test)} test images, {starting.arch}, {args.threads} threads, seed {args.seed}:")
    print(f"{'variant':<28} {'size':>5} {'steps':>5} {'s/step':>7} {'x base':>6} {'segm50':>7} {'segm':>7} {'box50':>7} {'box':>7}")
    for row in rows:
        print(f"{row['variant']:<28} {row['working_size']:>5} {row['steps']:>5} {row['s_per_step']:>7.3f} "
              f"{row['s_per_step'] / first['s_per_step']:>6.2f} {row['segm_map50']:>7.4f} {row['segm_map']:>7.4f} "
              f"{row['map50']:>7.4f} {row['map']:>7.4f}")
    if args.out:
        args.out.write_text(json.dumps({"images": args.images, "test_images": len(test), "arch": starting.arch,
                                        "threads": args.threads, "seed": args.seed, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
