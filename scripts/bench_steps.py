"""Training step time and peak memory of the box model vs the mask model on the same images, in one run.

    python scripts/bench_steps.py [--data ../shared/datasets/building_facades] [--steps 20] [--batch 2]

Both models are the offline defaults (``fasterrcnn_lite0_fpn`` / ``maskrcnn_lite0_fpn``, ImageNet Lite0
backbone, min_size 320 with the same scale jitter as live training). The images and targets go through the
very code live training uses (``training.data.load_example``: shrink to the working size, rasterise the
polygons there), so mask memory is what a round really holds. Steps alternate box, mask, box, mask... so
drift in machine speed hits both alike; the first 3 of each are warm-up. Peak memory is measured apart:
each model trains 6 steps alone in a child process (``--only``), which reports its peak RSS (``VmHWM``).
Run on a quiet machine.
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
from backend.model_store.architectures import LITE0, MASK_LITE0, build_detector  # noqa: E402
from backend.training.coco import load_coco  # noqa: E402
from backend.training.data import load_example  # noqa: E402
from backend.training.engine import sgd  # noqa: E402
from backend.training.modes import working_limit  # noqa: E402
from backend.training.transforms import augment, scale_jitter  # noqa: E402


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
    parser.add_argument("--only", choices=("boxes", "masks"), help="train this model alone and print its peak RSS")
    args = parser.parse_args()
    torch.manual_seed(0)
    classes, recs = records(args.data, args.images)
    fetcher = LocalFiles()
    kinds = (("boxes", LITE0), ("masks", MASK_LITE0))
    if args.only:
        kinds = tuple(k for k in kinds if k[0] == args.only)
    models, optimizers, times = {}, {}, {"boxes": [], "masks": []}
    for task, arch in kinds:
        model = build_detector(arch, len(classes) + 1, pretrained_backbone=True, min_size=320, max_size=640)
        scale_jitter(model, 320)
        model.train()
        models[task], optimizers[task] = model, sgd(model, 0.01)
    limit = working_limit(next(iter(models.values())))  # the same for both: same min_size and jitter
    for step in range(args.steps + 3):
        for task, _ in kinds:
            batch = [recs[(step * args.batch + i) % len(recs)] for i in range(args.batch)]
            examples = [augment(*load_example(r, fetcher, tuple(classes), task, limit)) for r in batch]
            start = time.perf_counter()
            losses = models[task]([e[0] for e in examples], [e[1] for e in examples])
            loss = sum(losses.values())
            optimizers[task].zero_grad()
            loss.backward()
            optimizers[task].step()
            if step >= 3:
                times[task].append(time.perf_counter() - start)
    if args.only:
        # VmHWM, not ru_maxrss: a child started from a big parent inherits the parent's ru_maxrss across exec
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(f"peak_rss_mb {int(hwm.split()[1]) / 1024:.0f}")
        return
    peaks = {}
    for task, _ in kinds:
        out = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--steps", "3", "--batch",
                              str(args.batch), "--images", str(args.images), "--only", task],
                             capture_output=True, text=True, check=True).stdout
        peaks[task] = float(out.split("peak_rss_mb")[-1])
    objects = statistics.mean(len(r.boxes) for r in recs)
    print(f"data={args.data.name} images={len(recs)} objects/image={objects:.1f} batch={args.batch} "
          f"steps={args.steps} threads={torch.get_num_threads()} working size <= {limit}")
    for task, arch in (("boxes", LITE0), ("masks", MASK_LITE0)):
        print(f"{arch:24s} step median {statistics.median(times[task]):6.3f} s   peak RSS training alone {peaks[task]:6.0f} MB")
    print(f"mask / box step time = {statistics.median(times['masks']) / statistics.median(times['boxes']):.2f}")


if __name__ == "__main__":
    main()
