"""Training step time and peak memory of the offline box and mask models against the previous defaults, on the
same images, in heads mode (body frozen) and full mode, in one run.

    python scripts/bench_steps.py [--data ../shared/datasets/building_facades] [--steps 20] [--batch 2]
                                  [--before fasterrcnn_lite0_fpn maskrcnn_lite0_fpn] [--after ARCH ...]

The models use the ImageNet Lite0 backbone, min_size 320 with the same scale jitter as live training. The images
and targets go through the very code live training uses (``training.data.load_example``: shrink to the working
size, rasterise the polygons there), so mask memory is what a round really holds. Steps alternate architecture
and mode on the same weights, so drift in machine speed hits all alike; the first 3 are warm-up. Peak memory is
measured apart: each model trains 6 full steps alone in a child process (``--only``), which reports its peak RSS
(``VmHWM``). Run on a quiet machine; the figures to quote are the ratios within the run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.labelstudio.annotations import LabeledImage  # noqa: E402
from backend.model_store.architectures import LITE0, MASK_LITE0, OFFLINE, build_detector, task_of  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.data import load_example  # noqa: E402
from backend.training.engine import sgd  # noqa: E402
from backend.training.modes import apply_mode, body_trainable, working_limit  # noqa: E402
from backend.training.transforms import augment, scale_jitter  # noqa: E402


BEFORE = (LITE0, MASK_LITE0)  # the defaults before the narrow architectures (issue: twice as fast on the CPU)


class LocalFiles:
    """The ImageFetcher interface over files on disk (the benchmark needs no HTTP)."""

    def fetch(self, url: str):
        from PIL import Image, ImageOps

        return ImageOps.exif_transpose(Image.open(url)).convert("RGB")


def records(data: Path, count: int) -> tuple[list[str], list[LabeledImage]]:
    classes, images = load_coco(data)
    out = []
    for im in [i for i in images if i.split == "train"][:count]:
        boxes = tuple((x1 / im.width * 100, y1 / im.height * 100, (x2 - x1) / im.width * 100, (y2 - y1) / im.height * 100)
                      for x1, y1, x2, y2 in im.boxes)
        # one shape per object: its largest ring (live training makes each Label Studio polygon one instance)
        rings = [max(r, key=len) if r else [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]  # no polygon: its box
                 for r, (x1, y1, x2, y2) in zip(im.polygons, im.boxes)]
        masks = tuple({"points": [[x / im.width * 100, y / im.height * 100] for x, y in ring]} for ring in rings)
        out.append(LabeledImage(im.id, str(im.path), im.id, "", boxes, tuple(classes[l - 1] for l in im.labels), masks))
    return classes, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/building_facades")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--before", nargs=2, default=list(BEFORE), metavar=("BOXES", "MASKS"),
                        help="the architectures to compare against (default: the previous defaults)")
    parser.add_argument("--after", nargs="+", default=[OFFLINE["boxes"], OFFLINE["masks"]], metavar="ARCH",
                        help="the architectures measured, each against --before's of its kind (default: today's "
                             "offline defaults)")
    parser.add_argument("--only", help="ARCH: train this architecture alone (full mode) and print its peak RSS")
    args = parser.parse_args()
    if sorted(task_of(a) for a in args.before) != ["boxes", "masks"]:
        parser.error("--before takes one box and one mask architecture")
    torch.manual_seed(0)
    classes, recs = records(args.data, args.images)
    archs = [args.only] if args.only else list(dict.fromkeys([*args.after, *args.before]))
    models = {arch: build(arch, classes) for arch in archs}
    limit = working_limit(next(iter(models.values()))[0])  # the same for all: same min_size and jitter
    modes = ("full",) if args.only else ("heads", "full")
    times = {(arch, mode): [] for arch in archs for mode in modes}
    fetcher = LocalFiles()
    for step in range(args.steps + 3):
        chosen = [recs[(step * args.batch + i) % len(recs)] for i in range(args.batch)]
        examples = {}
        # one batch per task, shared by its architectures; a box-only child holds no masks (its peak RSS)
        for task in {task_of(arch) for arch in archs}:
            examples[task] = [augment(*load_example(r, fetcher, tuple(classes), task, limit)) for r in chosen]
        # Modes and architectures alternate step by step on the same weights, so drift in machine speed and the
        # proposals a model makes as it learns (NMS work) hit every row alike; step i draws the same scale for all.
        for mode in modes:
            for arch, (model, trainable, optimizer) in models.items():
                apply_mode(model, mode, trainable)
                torch.manual_seed(1000 + step)
                seconds = train_step(model, optimizer, examples[task_of(arch)])
                if step >= 3:
                    times[arch, mode].append(seconds)
    if args.only:
        # VmHWM, not ru_maxrss: a child started from a big parent inherits the parent's ru_maxrss across exec
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(f"peak_rss_mb {int(hwm.split()[1]) / 1024:.0f}")
        return
    peaks = {}
    for arch in archs:
        out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--steps", "3", "--batch",
                              str(args.batch), "--images", str(args.images), "--only", arch],
                             capture_output=True, text=True, check=True).stdout
        peaks[arch] = float(out.split("peak_rss_mb")[-1])
    median = {key: statistics.median(v) for key, v in times.items()}
    objects = statistics.mean(len(r.boxes) for r in recs)
    print(f"data={args.data.name} images={len(recs)} objects/image={objects:.1f} batch={args.batch} "
          f"steps={args.steps} threads={torch.get_num_threads()} working size <= {limit}\n")
    print("| architecture | heads step s | full step s | peak RSS MB (full) | heads x before | full x before |")
    print("|---|---:|---:|---:|---:|---:|")
    before = {task_of(arch): arch for arch in args.before}
    for arch in sorted(archs, key=lambda a: (task_of(a), a != before[task_of(a)])):
        base = before[task_of(arch)]
        ratios = " | ".join(f"{median[arch, m] / median[base, m]:.2f}" for m in modes)
        print(f"| `{arch}` | {median[arch, 'heads']:.3f} | {median[arch, 'full']:.3f} | {peaks[arch]:.0f} | {ratios} |")
    print(f"mask / box full step (before) = {median[before['masks'], 'full'] / median[before['boxes'], 'full']:.2f}")


def build(arch: str, classes: list[str]):
    model = build_detector(arch, len(classes) + 1, pretrained_backbone=True, min_size=320, max_size=640)
    trainable = body_trainable(model)
    scale_jitter(model, 320)
    model.train()
    return model, trainable, sgd(model, 0.01)


def train_step(model, optimizer, examples) -> float:
    start = time.perf_counter()
    losses = model([e[0] for e in examples], [e[1] for e in examples])
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
