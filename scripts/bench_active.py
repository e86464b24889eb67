"""Active learning on BCCD: labeling in uncertainty order vs random order, same seed, same budget.

For each seed, both strategies start from the same random labeled set of ``budgets[0]`` train images.
At each budget a detector is trained on the labeled set (fresh model, pretrained Lite0 backbone, the same
torch seed and iteration count for both strategies, SGD warm-up + cosine, horizontal flip + jitter) and its
box mAP@0.5 on the test split is measured with pycocotools. To reach the next budget, ``random`` draws
the next images at random; ``uncertainty`` scores the unlabeled pool (at most ``--pool`` images, the same
seeded subset for the whole run) with that model and the UNCERTAINTY measure (as livetrain's re-scoring
does) and labels the lowest-confidence ones, which is what Label Studio's uncertainty sampling serves.

    python scripts/bench_active.py --data ../shared/datasets/bccd [--budgets 20 40 80] [--seeds 0 1 2]
        [--iters 300] [--min-size 320] [--pool 0] [--measure least_confidence] [--out active.json]

Prints the mean (and spread) of both curves and writes every run to JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.inference.predictor import FORWARD_BATCH, RAW_SCORE_FLOOR  # noqa: E402
from backend.inference.uncertainty import MEASURES, detect_and_score  # noqa: E402
from backend.metrics.coco_map import evaluate_map  # noqa: E402
from backend.model_store.architectures import LITE0, build_detector  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.engine import TrainState, sgd, train_steps, warmup_cosine  # noqa: E402
from backend.training.transforms import augment  # noqa: E402

log = logging.getLogger("bench_active")
FIRST: dict = {}  # (seed, labeled ids) -> (model, scores) at the first budget


def batches(images, batch_size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = images[:]
        rng.shuffle(order)
        for start in range(0, max(1, len(order) - batch_size + 1), batch_size):
            pairs = [augment(im.load(), im.target()) for im in order[start:start + batch_size]]
            yield [p[0] for p in pairs], [p[1] for p in pairs]


def train(labeled, num_classes: int, args, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    random.seed(seed)  # augment() draws from the global generator
    model = build_detector(LITE0, num_classes + 1, pretrained_backbone=True, min_size=args.min_size,
                           max_size=2 * args.min_size, box_batch_size_per_image=128)
    optimizer = sgd(model, args.lr)
    state = TrainState(model, optimizer, warmup_cosine(optimizer, args.iters, max(1, min(50, args.iters // 5))),
                       args.iters)
    train_steps(state, batches(labeled, min(2, len(labeled)), seed), torch.device("cpu"))
    return model


@torch.inference_mode()
def confidences(model, images, measure: str) -> list[float]:
    model.eval()
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR
    out = []
    for start in range(0, len(images), FORWARD_BATCH):
        _, scores = detect_and_score(model, [im.load() for im in images[start:start + FORWARD_BATCH]], measure)
        out += scores
    return out


def run_strategy(strategy: str, seed: int, train_pool, test, num_classes: int, args) -> list[dict]:
    rng = random.Random(seed)
    order = train_pool[:]
    rng.shuffle(order)
    labeled = order[:args.budgets[0]]  # the same start for both strategies
    rows = []
    for i, budget in enumerate(args.budgets):
        started = time.perf_counter()
        key = (seed, tuple(sorted(im.id for im in labeled)))
        if key in FIRST:  # both strategies start from the same set and seed: the same model, train it once
            model, scores = FIRST[key]
        else:
            model = train(labeled, num_classes, args, seed)
            scores = evaluate_map(model, test, num_classes)
            if i == 0:
                FIRST[key] = (model, scores)
        rows.append({"strategy": strategy, "seed": seed, "labeled": len(labeled), "map50": scores["map50"],
                     "map": scores["map"], "ap50_per_class": scores["ap50_per_class"],
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if i + 1 == len(args.budgets):
            break
        need = args.budgets[i + 1] - len(labeled)
        taken = {im.id for im in labeled}
        unlabeled = [im for im in order if im.id not in taken]
        if strategy == "random":
            labeled = labeled + rng.sample(unlabeled, need)
            continue
        pool = [im for im in args.scored_pool if im.id not in taken] if args.pool else unlabeled
        conf = confidences(model, pool, args.measure)
        ranked = [im for _, im in sorted(zip(conf, pool), key=lambda pair: (pair[0], pair[1].id))]
        picked = ranked[:need]
        if len(picked) < need:  # the capped pool ran dry: the rest at random
            chosen = {im.id for im in picked}
            picked += rng.sample([im for im in unlabeled if im.id not in chosen], need - len(picked))
        labeled = labeled + picked
    return rows


def summary(rows: list[dict], budgets: list[int]) -> str:
    lines = ["| labeled images | random mAP@0.5 | uncertainty mAP@0.5 | difference |", "|---:|---:|---:|---:|"]
    for budget in budgets:
        means = {}
        for strategy in ("random", "uncertainty"):
            values = [r["map50"] for r in rows if r["strategy"] == strategy and r["labeled"] == budget]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            means[strategy] = (statistics.mean(values), spread, len(values))
        (rm, rs, n), (um, us, _) = means["random"], means["uncertainty"]
        lines.append(f"| {budget} | {rm:.3f} ± {rs:.3f} | {um:.3f} ± {us:.3f} | {um - rm:+.3f} (n={n}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/bccd"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--pool", type=int, default=0, help="score at most this many unlabeled images (0 = all)")
    parser.add_argument("--measure", default="least_confidence", choices=MEASURES)
    parser.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (0 = all; "
                        "for smoke runs only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench_active.json")
    args = parser.parse_args()
    if sorted(args.budgets) != args.budgets or len(set(args.budgets)) != len(args.budgets):
        parser.error("--budgets must be increasing")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    classes, images = load_coco(args.data)
    train_pool = [im for im in images if im.split == "train"]
    test = [im for im in images if im.split == "test"][: args.test_limit or None]
    if args.budgets[-1] > len(train_pool):
        parser.error(f"the largest budget exceeds the {len(train_pool)} train images")
    rows = []
    for seed in args.seeds:
        # the scored pool: a fixed random subset of the train images (labeled ones are left out when scoring)
        args.scored_pool = random.Random(1000 + seed).sample(train_pool, min(args.pool, len(train_pool))) if args.pool else []
        for strategy in ("random", "uncertainty"):
            rows += run_strategy(strategy, seed, train_pool, test, len(classes), args)
    print(f"\nBCCD, {len(test)} test images, seeds {args.seeds}, {args.iters} iterations at batch 2 per budget "
          f"(fresh model each time), min_size {args.min_size}, UNCERTAINTY={args.measure}, "
          f"pool {args.pool or 'all'}\n")
    print(summary(rows, args.budgets))
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "scored_pool"},
                                          "rows": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
