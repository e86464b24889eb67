"""Where the detector's time goes, and what each architecture lever saves, in one run (CPU).

    python scripts/bench_arch.py [--boxes ../shared/datasets/bccd] [--masks ../shared/datasets/building_facades]
                                 [--steps 8] [--runs 20] [--skip-profile] [--skip-levers]

**Profile** (today's offline defaults, ``fasterrcnn_lite0_fpn`` and ``maskrcnn_lite0_fpn``): per module, the wall
time of an inference forward at the served size (min_size 320; a 640x480 BCCD photo, a facade photo for the mask
model) and of a training step's forward (batch 2, full mode, live training's scale jitter 256-384), timed with
forward hooks on the modules, and the GFLOP of one training forward at 320
(``torch.utils.flop_counter``; it counts convolutions and matrix products, not
torchvision's RoIAlign and NMS). The backward is reported as one figure (the step minus its forward): its split by
module is not measurable on a CPU without distorting it, and the flop counter's backward attribution is not
trustworthy (it put 7x the forward's FLOPs there); for the convolutions and linear layers a backward costs about
twice their forward.

**Levers**: variants of the Lite0 detector, one change at a time and then combined, measured side by side in
rounds (variant A, B, C..., A, B, C...) so drift in machine speed hits all alike: the inference forward's median,
and the median training step (batch 2) in heads mode (body frozen) and full mode. The images and targets go
through live training's own code (``training.data.load_example``, ``augment``, scale jitter); step i of every
variant draws the same scale and samples (seeded). Inference runs with no score threshold, so every variant
post-processes (and for masks runs its mask head on) the same number of detections, whatever its untrained head
scores: the mask figures are for a full 100 detections. Serving levers are timed on inference only, with their
conversion time (the deep copy excluded).

Run on a quiet machine; the figures to quote are the ratios to "today" within the run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model_store.lite0 import build_lite0_fasterrcnn, build_lite0_maskrcnn  # noqa: E402
from backend.training.data import load_example  # noqa: E402
from backend.training.engine import sgd  # noqa: E402
from backend.training.modes import apply_mode, body_trainable, working_limit  # noqa: E402
from backend.training.transforms import augment, scale_jitter  # noqa: E402
from scripts.bench_predict import bench_image  # noqa: E402
from scripts.bench_steps import LocalFiles, records, train_step  # noqa: E402

MODULES = ("transform", "backbone.body", "backbone.fpn", "rpn.head", "rpn", "roi_heads.box_roi_pool",
           "roi_heads.box_head", "roi_heads.box_predictor", "roi_heads.mask_roi_pool", "roi_heads.mask_head",
           "roi_heads.mask_predictor", "roi_heads")
TOP = ("transform", "backbone.body", "backbone.fpn", "rpn", "roi_heads")  # the forward's parts, in order, no overlap

BOX_VARIANTS = {
    "today": {},
    "fpn 128": {"fpn_channels": 128},
    "box head 512": {"box_head_dim": 512},
    "test proposals 150": {"rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150},
    "fpn 128 + box head 512": {"fpn_channels": 128, "box_head_dim": 512},
    "fpn 128 + box head 512, body trains 3 stages": {"fpn_channels": 128, "box_head_dim": 512, "trainable_stages": 3},
    "fpn 96 + box head 256": {"fpn_channels": 96, "box_head_dim": 256},
    "fpn 64 + box head 256": {"fpn_channels": 64, "box_head_dim": 256},
}
def int8_linear(model):
    """Serving only: int8 dynamic quantization of the Linear layers (the box head); conversion timed."""
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def channels_last(model):
    return model.to(memory_format=torch.channels_last)


SERVING = {"today, channels_last (serving)": ("today", channels_last),
           "fpn 128 + box head 512, int8 Linear (serving)": ("fpn 128 + box head 512", int8_linear),
           "fpn 128 + box head 512, channels_last (serving)": ("fpn 128 + box head 512", channels_last)}
MASK_VARIANTS = {
    "today": {},
    "fpn 128 + box head 512": {"fpn_channels": 128, "box_head_dim": 512},
    "fpn 128 + box head 512 + mask head 64": {"fpn_channels": 128, "box_head_dim": 512, "mask_head_channels": 64},
    "fpn 96 + box head 256 + mask head 64": {"fpn_channels": 96, "box_head_dim": 256, "mask_head_channels": 64},
}


def for_serving(model):
    """Eval at the served size (training's scale jitter ends at 384: /predict runs at 320, as a session publishes
    it) and with no score threshold, so that every variant post-processes (and, for masks, runs the mask head on)
    the same number of detections whatever its untrained head scores."""
    model.transform.min_size = (320,)
    model.roi_heads.score_thresh = 0.0
    return model.eval()


def for_training(model, fixed: bool = False):
    """Training's scales (320 jittered as live training does), or 320 alone (``fixed``: the flop count)."""
    if fixed:
        model.transform.min_size = (320,)
    else:
        scale_jitter(model, 320)
    return model.train()


def build(task: str, classes: list[str], kwargs: dict):
    torch.manual_seed(0)
    builder = build_lite0_maskrcnn if task == "masks" else build_lite0_fasterrcnn
    model = builder(len(classes) + 1, pretrained_backbone=True, min_size=320, max_size=640, **kwargs)
    trainable = body_trainable(model)
    return for_training(model), trainable  # jittered first: working_limit() then sizes the examples as live training


def photo(task: str) -> torch.Tensor:
    """``bench_predict.py``'s 640x480 photo: a BCCD one, or a facade for the mask model."""
    from io import BytesIO

    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    return to_tensor(Image.open(BytesIO(bench_image(None, masks=task == "masks"))).convert("RGB"))


class ModuleTimer:
    """Wall seconds spent inside named submodules (forward hooks); nested modules are counted in both."""

    def __init__(self, model: torch.nn.Module):
        self.seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        modules = dict(model.named_modules())
        for name in MODULES:
            if name in modules:
                self.handles.append(modules[name].register_forward_pre_hook(self._start(name)))
                self.handles.append(modules[name].register_forward_hook(self._stop(name)))
        self.started: dict[str, float] = {}

    def _start(self, name):
        def hook(module, args):
            self.started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self.started.pop(name)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def batches(recs, classes, task, limit, batch: int, count: int):
    fetcher = LocalFiles()
    for step in range(count):
        chosen = [recs[(step * batch + i) % len(recs)] for i in range(batch)]
        torch.manual_seed(step)  # the same augmentation for every variant
        yield [augment(*load_example(r, fetcher, tuple(classes), task, limit)) for r in chosen]


def profile(task: str, data: Path, image: torch.Tensor, runs: int, steps: int) -> str:
    classes, recs = records(data, 20)
    model, trainable = build(task, classes, {})
    apply_mode(model, "full", trainable)
    optimizer = sgd(model, 0.01)
    examples = list(batches(recs, classes, task, working_limit(model), 2, steps + 2))
    for_serving(model)
    with torch.inference_mode():
        for _ in range(3):
            model([image])
        timer = ModuleTimer(model)
        for _ in range(runs):
            model([image])
    infer = {k: v / runs for k, v in timer.seconds.items()}
    timer.close()
    for_training(model)
    for i, batch in enumerate(examples[:2]):
        torch.manual_seed(1000 + i)
        train_step(model, optimizer, batch)
    timer = ModuleTimer(model)
    total = []
    for i, batch in enumerate(examples[2:]):
        torch.manual_seed(1002 + i)  # the scale jitter's draw and the RPN/RoI samplers
        total.append(train_step(model, optimizer, batch))
    fwd = {k: v / steps for k, v in timer.seconds.items()}
    timer.close()
    for_training(model, fixed=True)
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as forward_only:
        model([e[0] for e in examples[0]], [e[1] for e in examples[0]])

    def gflop(counter, name):
        counts = counter.get_flop_counts()
        key = next((k for k in counts if k.endswith("." + name) or k == name), None)
        return sum(counts[key].values()) / 1e9 if key else 0.0

    top = type(model).__name__
    step = statistics.median(total)
    lines = [f"{top} ({task}): inference forward {sum(infer.get(k, 0) for k in TOP) * 1e3:.0f} ms "
             f"(modules), training step median {step:.3f} s (batch 2, full mode)", "",
             "| module | inference forward ms | training forward ms | training forward GFLOP |",
             "|---|---:|---:|---:|"]
    for name in MODULES:
        if name not in infer and name not in fwd:
            continue
        lines.append(f"| {name} | {infer.get(name, 0) * 1e3:.1f} | {fwd.get(name, 0) * 1e3:.1f} | "
                     f"{gflop(forward_only, name):.2f} |")
    lines.append(f"| whole model | | | {gflop(forward_only, 'Global'):.2f} |")
    lines.append(f"\nbackward + optimizer: {step - sum(fwd.get(k, 0) for k in TOP):.3f} s of the step")
    return "\n".join(lines)


def levers(task: str, data: Path, image: torch.Tensor, variants: dict, runs: int, steps: int) -> str:
    classes, recs = records(data, 20)
    built = {}
    for name, kwargs in variants.items():
        model, trainable = build(task, classes, kwargs)
        built[name] = (model, trainable, sgd(model, 0.01))
    limit = working_limit(next(iter(built.values()))[0])
    examples = list(batches(recs, classes, task, limit, 2, steps + 2))
    for model, _, _ in built.values():
        for_serving(model)
    serving, convert = {}, {}
    for name, (source, transform) in SERVING.items():
        if source in built:
            duplicate = copy.deepcopy(built[source][0])
            start = time.perf_counter()
            serving[name] = transform(duplicate)
            convert[name] = time.perf_counter() - start
    times = {name: {"infer": [], "heads": [], "full": []} for name in [*variants, *serving]}
    for _ in range(2):  # warm-up
        for name, (model, _, _) in built.items():
            with torch.inference_mode():
                model([image])
    forwards = {**{name: m for name, (m, _, _) in built.items()}, **serving}
    for model in serving.values():
        with torch.inference_mode():
            model([image])
    for _ in range(runs):
        for name, model in forwards.items():
            with torch.inference_mode():
                start = time.perf_counter()
                model([image])
                times[name]["infer"].append(time.perf_counter() - start)
    for mode in ("heads", "full"):
        for name, (model, trainable, optimizer) in built.items():
            apply_mode(model, mode, trainable)
            for_training(model)
        for i, batch in enumerate(examples):
            for name, (model, _, optimizer) in built.items():
                torch.manual_seed(1000 + i)  # the same scale draw and sampling for every variant at step i
                seconds = train_step(model, optimizer, batch)
                if i >= 2:
                    times[name][mode].append(seconds)
    base = {k: statistics.median(v) for k, v in times["today"].items()}
    lines = [f"{task}: {runs} forwards, {steps} steps per mode after warm-up", "",
             "| variant | parameters (M) | inference forward ms | x today | heads step s | x today "
             "| full step s | x today |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (model, _, _) in built.items():
        m = {k: statistics.median(v) for k, v in times[name].items()}
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(f"| {name} | {params:.1f} | {m['infer'] * 1e3:.0f} | {m['infer'] / base['infer']:.2f} | "
                     f"{m['heads']:.3f} | {m['heads'] / base['heads']:.2f} | "
                     f"{m['full']:.3f} | {m['full'] / base['full']:.2f} |")
    for name in serving:
        infer = statistics.median(times[name]["infer"])
        lines.append(f"| {name} (conversion {convert[name] * 1e3:.0f} ms) | | {infer * 1e3:.0f} | "
                     f"{infer / base['infer']:.2f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=Path, default=ROOT.parent / "shared/datasets/bccd")
    parser.add_argument("--masks", type=Path, default=ROOT.parent / "shared/datasets/building_facades")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--only", choices=("boxes", "masks"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for task, data, variants in (("boxes", args.boxes, BOX_VARIANTS), ("masks", args.masks, MASK_VARIANTS)):
        if args.only and task != args.only:
            continue
        image = photo(task)
        if not args.skip_profile:
            print("\n" + profile(task, data, image, args.runs, args.steps), flush=True)
        if not args.skip_levers:
            print("\n" + levers(task, data, image, variants, args.runs, args.steps), flush=True)


if __name__ == "__main__":
    main()
