"""How well each UNCERTAINTY measure spreads the task scores of an unlabeled pool (the label stream's order).

A model is trained as ``bench_active.py`` trains its first budget (``--labeled`` images of a seeded pool,
``--steps-per-label`` steps each); then every measure scores the rest of the pool, and the script prints per
measure the interquartile range of the scores, their 10th / 50th / 90th percentiles, how many distinct values
(3 decimals) they take, and the share within 0.49-0.51 (where ``least_confidence`` piles up on images with many
objects). Scores are deterministic given the seed: a loaded machine only makes the run slower.

    python scripts/bench_scores.py --data ../shared/datasets/building_facades --labeled 20 --out scores-facades.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_active import Learner, confidences, labeled_weights  # noqa: E402

from backend.inference.uncertainty import MEASURES  # noqa: E402
from backend.model_store.models import model_for_round  # noqa: E402
from backend.model_store.weights import resolve_starting_weights  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.offline import Examples  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.modes import working_limit  # noqa: E402


def spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    return {"iqr": round(float(p75 - p25), 4), "p10": round(float(p10), 4), "p50": round(float(p50), 4),
            "p90": round(float(p90), 4), "distinct_3dp": int(len(np.unique(np.round(v, 3)))),
            "share_0.49_0.51": round(float(np.mean((v >= 0.49) & (v <= 0.51))), 3), "n": int(len(v))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labeled", type=int, default=20)
    parser.add_argument("--pool", type=int, default=150)
    parser.add_argument("--steps-per-label", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=0)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench_scores.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classes, images = load_coco(args.data)
    task = "masks" if any(im.has_polygons for im in images) else "boxes"
    settings = Settings.from_env({}, min_size=args.min_size)
    starting = resolve_starting_weights(settings.arch_for(task) if task == "masks" else "fasterrcnn_lite0_fpn",
                                        download=False, task=task)
    train = [im for im in images if im.split == "train"]
    pool = random.Random(args.seed).sample(train, min(args.pool, len(train)))
    limit = working_limit(model_for_round(starting, None, tuple(classes), settings.min_size))
    examples = Examples(pool, limit, task).items
    learner = Learner(starting, classes, settings, task, args.seed)
    labeled = examples[: args.labeled]
    learner.train(labeled, labeled, args.steps_per_label * len(labeled))
    rest = examples[args.labeled:]
    objects = [len(target["labels"]) for _, target in rest]
    report = {"data": args.data, "task": task, "labeled": args.labeled, "scored": len(rest), "seed": args.seed,
              "objects_per_image": {"median": float(np.median(objects)), "max": int(max(objects))}, "measures": {}}
    print(f"{Path(args.data).name} ({task}): model trained on {args.labeled} images, {len(rest)} pool images scored "
          f"(objects per image: median {np.median(objects):.0f}, max {max(objects)})\n")
    print("| UNCERTAINTY | IQR | p10 / p50 / p90 | distinct values (3 dp) | share in 0.49-0.51 |")
    print("|---|---:|---:|---:|---:|")
    for measure in args.measures:
        s = spread(confidences(learner.model, rest, measure, labeled_weights(labeled, classes)))
        report["measures"][measure] = s
        print(f"| {measure} | {s['iqr']:.3f} | {s['p10']:.3f} / {s['p50']:.3f} / {s['p90']:.3f} | "
              f"{s['distinct_3dp']} of {s['n']} | {s['share_0.49_0.51']:.0%} |", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
