"""The yardstick of ``livetrain simulate``: the live model against the same network trained offline.

Live training sees the images as they arrive: its first steps train on a handful of images, the backbone
joins at FULL_AFTER, and the learning rate follows the sessions. The offline run here has every image the
final live version was trained on from its first step, and the same architecture, starting weights and
number of optimizer steps: "live ends as good as offline" when the two test mAPs are close (ratio near 1).

Both are scored with box mAP (``backend.metrics.coco_map``) on a held-out split; a Mask R-CNN (``--kind
polygons`` or ``brush``) also with segm (mask) mAP against the test objects as the simulator annotates them:
one instance per polygon ring for polygons, one per object for brush (``mask_target``), at the image size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from backend.labelstudio.convert import image_to_tensor, shrink
from backend.metrics.coco_map import evaluate_map
from backend.model_store.models import model_for_round, model_from_version, pick_device, version_task
from backend.model_store.stores import version_store
from backend.model_store.weights import StartingWeights, StartingWeightsByTask
from backend.settings import Settings
from backend.training.coco import CocoImage, ring_to_percent
from backend.training.engine import CallbackHook, TrainState, amp_scaler, sgd, train_steps, warmup_cosine
from backend.training.modes import apply_mode, body_trainable, choose_mode, set_rois_per_image, working_limit
from backend.training.transforms import augment, drop_degenerate, scale_jitter
from backend.training.validation import evaluate_model

log = logging.getLogger(__name__)

LOG_EVERY = 100  # steps between progress lines of the offline run


# --- training examples, as live training builds them from the Label Studio annotations ----------------

def box_target(image: CocoImage, width: int, height: int) -> dict:
    """The image's boxes at the working size ``width`` x ``height``: clipped to the image as Label Studio
    stores a rectangle, then scaled per axis as live training converts percent to pixels."""
    sx, sy = width / image.width, height / image.height
    boxes = []
    for x1, y1, x2, y2 in image.boxes:
        x1, x2 = min(max(x1, 0.0), image.width), min(max(x2, 0.0), image.width)
        y1, y2 = min(max(y1, 0.0), image.height), min(max(y2, 0.0), image.height)
        boxes.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
    return drop_degenerate({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(image.labels, dtype=torch.int64)})


def mask_target(image: CocoImage, width: int, height: int, per_ring: bool = True) -> dict:
    """One instance per polygon ring, as the simulator annotates a polygons project (Label Studio polygons
    are single rings) and live training reads it, or with ``per_ring=False`` one per object (a brush project:
    one RLE per object): the mask at the working size and its tight box. Objects without a polygon are not
    annotated, so not trained on either."""
    from backend.labelstudio.masks import mask_box, polygon_to_mask

    masks, boxes, labels = [], [], []
    for index, (rings, label) in enumerate(zip(image.polygons, image.labels)):
        if not per_ring and rings:
            shapes = [image.mask(index, width, height)]
        else:
            shapes = [polygon_to_mask(ring_to_percent(ring, image.width, image.height), width, height)
                      for ring in rings]
        for mask in shapes:
            box = mask_box(mask)
            if box is None:  # a sliver that vanished at the working size (live training drops it too)
                continue
            masks.append(torch.from_numpy(mask.astype("uint8")))
            boxes.append(box)
            labels.append(label)
    stacked = torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "masks": stacked}


class Examples:
    """The training images shrunk to the model's working limit once (kept as 8-bit PIL images, a fraction
    of a float tensor's memory), with their targets at that size."""

    def __init__(self, images: list[CocoImage], limit: tuple[int, int], task: str = "boxes", per_ring: bool = True):
        self.items = []
        for image in images:
            with Image.open(image.path) as opened:
                pil, _ = shrink(opened.convert("RGB"), limit)
            width, height = pil.size
            target = (mask_target(image, width, height, per_ring) if task == "masks"
                      else box_target(image, width, height))
            self.items.append((pil, target))

    def batches(self, batch_size: int, rng: random.Random) -> Iterator[tuple[list, list]]:
        """Endless augmented batches, every image equally likely (offline, nothing is newer than the rest)."""
        while True:
            images, targets = [], []
            for pil, target in rng.choices(self.items, k=batch_size):
                image, augmented = augment(image_to_tensor(pil), target)
                images.append(image)
                targets.append(augmented)
            yield images, targets


# --- the offline run ------------------------------------------------------------------------------

def train_offline(settings: Settings, starting: StartingWeights, images: list[CocoImage], classes: tuple[str, ...],
                  total_steps: int, device: torch.device | str = "cpu", seed: int = 0,
                  per_ring: bool = True, adjust=None) -> torch.nn.Module:
    """``total_steps`` optimizer steps on ``images`` (labels index ``classes``, 1-based) from ``starting``
    with a fresh head, as a live session trains: SGD with warm-up and cosine decay, the mode
    ``choose_mode`` picks for this many images, flips / colour / scale jitter, images at the working size.
    ``settings`` gives learning_rate, batch_size, min_size, rois_per_image, train_mode and full_after. Seeds
    Python's and torch's global generators (the augmentation and the head's initialisation use them). ``per_ring``: see
    ``mask_target``. ``adjust(model)``, if given, changes the built model before training (a benchmark's lever)."""
    random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device(device)
    model = model_for_round(starting, None, tuple(classes), settings.min_size).to(device)
    if adjust is not None:
        adjust(model)
    mode = choose_mode(settings, len(images))
    apply_mode(model, mode, body_trainable(model))  # body_trainable first: apply_mode changes what it reads
    base_size = model.transform.min_size[0]
    scale_jitter(model, base_size)
    set_rois_per_image(model, settings.rois_per_image)
    examples = Examples(images, working_limit(model), starting.task, per_ring)
    optimizer = sgd(model, settings.learning_rate)
    warmup = min(10, total_steps // 5)
    state = TrainState(model, optimizer, warmup_cosine(optimizer, total_steps, warmup), total_steps)
    began = time.monotonic()

    def progress(s: TrainState) -> None:
        log.info("offline step %d/%d: loss %.3f (%.0f s)", s.step, s.total_steps,
                 s.loss_sum.get("loss", 0.0) / max(1, s.step), time.monotonic() - began)

    log.info("offline training: %d images, %d steps, %s mode, batch %d, lr %g, %d px, %s",
             len(images), total_steps, mode, settings.batch_size, settings.learning_rate, base_size, starting.arch)
    batches = examples.batches(settings.batch_size, random.Random(seed))
    train_steps(state, batches, device, [CallbackHook(progress, every=LOG_EVERY)],
                scaler=amp_scaler(device, settings.amp))  # as a live session: mixed precision on CUDA
    model.transform.min_size = (base_size,)  # as a published version: one scale at prediction time
    model.eval()
    return model


@contextmanager
def torch_home(path: str | Path | None):
    """TORCH_HOME set to the backend's for a while: torchvision's COCO weights are looked up in (and
    downloaded to) its cache, and the simulator's own backend has one of its own under MODEL_DIR."""
    if not path:
        yield
        return
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def split_map(model: torch.nn.Module, images: list[CocoImage], classes: tuple[str, ...], device, task: str = "boxes",
              per_ring: bool = True) -> dict:
    """Box mAP (``map50``, ``map``) against the COCO boxes; for a Mask R-CNN also segm mAP (``segm_map50``,
    ``segm_map``) against the objects with polygons as the simulator annotates them (``mask_target``)."""
    scores = evaluate_map(model.to(device), images, len(classes), str(device))
    out = {"map50": round(scores["map50"], 4), "map": round(scores["map"], 4)}
    if task == "masks" and model.roi_heads.has_mask():
        examples = ((im.id, im.load(), mask_target(im, im.width, im.height, per_ring)) for im in images)  # one at a time
        segm = evaluate_model(model, examples, tuple(classes), True, device)["mask"]
        out.update(segm_map50=round(segm["map50"], 4), segm_map=round(segm["map"], 4))
    return out


def sized_version(state: dict, meta: dict) -> tuple[torch.nn.Module, int]:
    """The version's model at the size it trained at, and the ``min_size`` setting that gives that size:
    0 (the architecture's own, with its own max_size) when it is the default, as MIN_SIZE=0 does live."""
    model = model_from_version(state, meta, 0)
    default = model.transform.min_size[0]
    base = int((meta.get("settings") or {}).get("min_size") or default)
    if base == default:
        return model, 0
    return model_from_version(state, meta, base), base


def live_vs_offline(model_dir: Path, project: str | int, settings: Settings, annotated: dict[int, CocoImage],
                    classes: list[str], test_images: list[CocoImage], offline: bool = True, seed: int = 0,
                    backend_torch_home: str | Path | None = None, per_ring: bool = True) -> dict:
    """Box mAP (and segm mAP for a Mask R-CNN) of the project's active version and of the same network
    trained offline (see the module doc) on ``test_images``. ``annotated``: task id -> the image annotated in
    it. ``settings``: the backend's (its starting weights). ``per_ring``: polygons (True) or brush (False)
    annotations (``mask_target``). Returns the report; ``{"skipped": reason}`` when it cannot compare."""
    store = version_store(settings if settings.model_store else model_dir, str(project))  # MODEL_STORE, else the directory
    name = store.active()
    if name is None:
        return _skip(f"project {project} has no active version in {model_dir}")
    if not test_images:
        return _skip("no test images")
    state, meta = store.load(name)
    if list(meta["classes"]) != list(classes):
        return _skip(f"version {name} has classes {meta['classes']}, the dataset {classes}")
    task = version_task(meta)
    device = pick_device(settings.device)
    torch.set_num_threads(os.cpu_count() or 1)  # the backend is stopped or idle: every core is ours
    live, min_size = sized_version(state, meta)
    trained = [annotated[int(t)] for t in meta.get("trained_annotations", {}) if int(t) in annotated]
    report = {"metric": "box mAP" + (", segm mAP (segm_*)" if task == "masks" else ""),
              "version": name, "final": meta.get("final"), "arch": meta["arch"], "images": len(trained),
              "test_images": len(test_images)}
    if "total_steps" in meta:
        report["total_steps"] = int(meta["total_steps"])
    else:  # a version from before total_steps was recorded: only its own session's steps are known
        report["total_steps"], report["steps_note"] = int(meta["steps"]), "meta has no total_steps: used steps"
        log.warning("version %s has no total_steps; the offline run gets its steps (%d)", name, meta["steps"])
    began = time.monotonic()
    report["live"] = split_map(live, test_images, tuple(classes), device, task, per_ring)
    log.info("live %s: %s (%.0f s)", name, report["live"], time.monotonic() - began)
    del live
    if len(trained) < len(annotated):
        log.warning("version %s trained on %d of the %d annotated images", name, len(trained), len(annotated))
    if not offline:
        return report | {"offline": None, "ratio": None, "offline_s": None, "skipped_offline": "--no-offline"}
    if not trained:
        return report | _skip(f"version {name} trained on none of the tasks this run annotated")
    with torch_home(backend_torch_home):
        starting = StartingWeightsByTask(settings)(task)
    if starting.arch != meta["arch"]:
        return report | _skip(f"the backend's settings give {starting.arch} here, version {name} is a "
                              f"{meta['arch']}: pass the backend's settings with --backend-env")
    if meta.get("starting_weights") and starting.source != meta["starting_weights"]:
        report["warning"] = f"starting weights {starting.source} here, {meta['starting_weights']} live"
        log.warning("%s", report["warning"])
    # the version's own settings win over the backend's as the simulator reads them (a backend at --ml-url
    # may run with settings this process does not know)
    live_settings = meta.get("settings") or {}
    offline_settings = dataclasses.replace(
        settings, min_size=min_size,
        learning_rate=float(live_settings.get("learning_rate", settings.learning_rate)),
        batch_size=int(live_settings.get("batch_size", settings.batch_size)),
        train_mode=live_settings.get("train_mode", settings.train_mode),
        full_after=int(live_settings.get("full_after", settings.full_after)),
        rois_per_image=int(live_settings.get("rois_per_image", settings.rois_per_image)))
    began = time.monotonic()
    report["mode"] = choose_mode(offline_settings, len(trained))
    model = train_offline(offline_settings, starting, trained, tuple(classes), report["total_steps"], device, seed,
                          per_ring)
    report["offline_s"] = round(time.monotonic() - began, 1)
    report["offline"] = split_map(model, test_images, tuple(classes), device, task, per_ring)
    report["ratio"] = {k: round(report["live"][k] / report["offline"][k], 3) if report["offline"][k] else None
                       for k in report["offline"]}
    log.info("offline: %s (trained in %.0f s); live/offline %s", report["offline"], report["offline_s"],
             report["ratio"])
    return report


def _skip(reason: str) -> dict:
    log.warning("live vs offline comparison skipped: %s", reason)
    return {"skipped": reason}
