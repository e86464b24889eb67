"""Where a training step's time goes, and what each speed lever saves, in one run (Lite0 Faster R-CNN, CPU).

    python scripts/bench_levers.py [--data ../shared/datasets/bccd] [--steps 12] [--images 20]

One step is split into its parts, timed with the very modules live training runs: loading the examples
(fetch + decode + shrink + targets, ``training.data.load_example``), the transform (normalise, resize,
batch), the backbone body (EfficientNet-Lite0), the FPN, the RPN, the RoI heads, backward and the
optimizer. Then each lever is measured against the baseline on the same batches, one lever at a time,
in heads mode (body frozen, the first FULL_AFTER images) and full mode:

- ``image cache``: examples decoded once per session (``training.data.ExampleCache``) instead of per draw;
- ``rpn 600/300``: RPN proposals kept in training before/after NMS (torchvision's default 2000/2000);
- ``RoIs 64``: RoIs sampled per image for the box head's loss (Lite0's default 128; torchvision's 512);
- ``feature cache``: not built; its upper bound is the body forward's share of a heads-mode step (the
  body is frozen there, so its features per image and flip could be cached; colour jitter and the five
  jitter scales would have to go or multiply the cache);
- ``min_size 256``: a smaller input for the first versions;
- ``threads 1``: one torch thread instead of one per core.

Batches are drawn in the same order for every variant; the first 3 steps of each are warm-up. Run on a
quiet machine: the figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model_store.architectures import LITE0, build_detector  # noqa: E402
from backend.training.data import load_example  # noqa: E402
from backend.training.engine import sgd  # noqa: E402
from backend.training.modes import apply_mode, body_trainable, working_limit  # noqa: E402
from backend.training.transforms import augment, scale_jitter  # noqa: E402
from scripts.bench_steps import LocalFiles, records  # noqa: E402

PARTS = ("load", "transform", "body", "fpn", "rpn", "roi_heads", "backward", "optimizer")


def build(classes, mode: str, min_size: int, rpn: tuple[int, int] | None, rois: int | None = None):
    torch.manual_seed(0)
    kwargs = {"rpn_pre_nms_top_n_train": rpn[0], "rpn_post_nms_top_n_train": rpn[1]} if rpn else {}
    if rois:
        kwargs["box_batch_size_per_image"] = rois
    model = build_detector(LITE0, len(classes) + 1, pretrained_backbone=True, min_size=min_size,
                           max_size=2 * min_size, **kwargs)
    apply_mode(model, mode, body_trainable(model))
    scale_jitter(model, min_size)
    model.train()
    return model, sgd(model, 0.01)


def timed_step(model, optimizer, batch, classes, fetcher, cache: dict | None) -> dict:
    """One step with each part timed; returns seconds per part."""
    t = {}
    start = time.perf_counter()
    examples = []
    limit = working_limit(model)
    for record in batch:
        key = record.task_id
        if cache is not None and key in cache:
            image, target = cache[key]
            image = image.float().div(255.0)
        else:
            image, target = load_example(record, fetcher, tuple(classes), "boxes", limit)
            if cache is not None:
                cache[key] = (image.mul(255).round().to(torch.uint8), target)
        examples.append(augment(image, target))
    t["load"] = time.perf_counter() - start
    mark = time.perf_counter()
    images, targets = model.transform([e[0] for e in examples], [e[1] for e in examples])
    t["transform"] = time.perf_counter() - mark
    mark = time.perf_counter()
    feats = model.backbone.body(images.tensors)
    t["body"] = time.perf_counter() - mark
    mark = time.perf_counter()
    from collections import OrderedDict

    features = model.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
    t["fpn"] = time.perf_counter() - mark
    mark = time.perf_counter()
    proposals, rpn_losses = model.rpn(images, features, targets)
    t["rpn"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _, roi_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
    t["roi_heads"] = time.perf_counter() - mark
    loss = sum(rpn_losses.values()) + sum(roi_losses.values())
    mark = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t["backward"] = time.perf_counter() - mark
    mark = time.perf_counter()
    optimizer.step()
    t["optimizer"] = time.perf_counter() - mark
    t["step"] = time.perf_counter() - start
    return t


def run(classes, recs, fetcher, mode: str, steps: int, batch_size: int, min_size=320, rpn=None, cache=False,
        threads=None, rois=None) -> dict:
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    model, optimizer = build(classes, mode, min_size, rpn, rois)
    store = {} if cache else None
    if store is not None:  # a session's cache is warm after the first pass: fill it before timing
        for record in recs:
            timed_step(model, optimizer, [record], classes, fetcher, store)
    samples = []
    for step in range(steps + 3):
        batch = [recs[(step * batch_size + i) % len(recs)] for i in range(batch_size)]
        t = timed_step(model, optimizer, batch, classes, fetcher, store)
        if step >= 3:
            samples.append(t)
    torch.set_num_threads(old_threads)
    return {part: statistics.median(s[part] for s in samples) for part in (*PARTS, "step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/bccd")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    classes, recs = records(args.data, args.images)
    fetcher = LocalFiles()
    print(f"data={args.data.name} images={len(recs)} batch={args.batch} steps={args.steps} "
          f"threads={torch.get_num_threads()} model={LITE0}")
    for mode in ("heads", "full"):
        base = run(classes, recs, fetcher, mode, args.steps, args.batch)
        print(f"\n{mode} mode, baseline step {base['step']:.3f} s; parts (median s, share):")
        print("  " + "  ".join(f"{p} {base[p]:.3f} ({base[p] / base['step']:.0%})" for p in PARTS))
        levers = {
            "image cache": dict(cache=True),
            "rpn 600/300": dict(rpn=(600, 300)),
            "image cache + rpn 600/300": dict(cache=True, rpn=(600, 300)),
            "RoIs 64 per image": dict(rois=64),
            "image cache + rpn 600/300 + RoIs 64": dict(cache=True, rpn=(600, 300), rois=64),
            "min_size 256": dict(min_size=256),
            "threads 1": dict(threads=1),
        }
        for name, kwargs in levers.items():
            out = run(classes, recs, fetcher, mode, args.steps, args.batch, **kwargs)
            print(f"  {name:28s} step {out['step']:.3f} s  = {out['step'] / base['step']:.2f}x baseline")
        if mode == "heads":
            print(f"  {'feature cache (upper bound)':28s} step >= {base['step'] - base['body']:.3f} s = "
                  f"{(base['step'] - base['body']) / base['step']:.2f}x baseline (body forward saved, nothing else)")


if __name__ == "__main__":
    main()
