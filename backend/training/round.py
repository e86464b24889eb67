"""One training round: continue from the active version, train on every labeled image with the newest
emphasised, publish a new version. Checkpoints during the round let a killed worker resume it."""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.errors import LivetrainError
from backend.model_store.detect import forward, paste_in_box, serving_limit
from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.metrics.quality import MaskCrop, iou, mask_iou, quality
from backend.model_store.models import model_for_round, model_from_version, version_task
from backend.model_store.versions import VersionStore
from backend.model_store.weights import StartingWeights
from backend.settings import Settings
from backend.training.data import load_example, replay_batches
from backend.training.engine import CallbackHook, Hook, TrainState, sgd, train_steps, warmup_cosine
from backend.training.transforms import scale_jitter

log = logging.getLogger(__name__)

QUALITY_IMAGES = 8  # new images the parent version is scored on before it trains on them


@dataclass
class RoundInputs:
    project: str
    title: str  # version names are "<slug of title>-v<N>"
    labels: tuple[str, ...]  # the label config's labels, in order
    records: list[LabeledImage]
    task: str = "boxes"  # the primary control's kind: boxes (Faster R-CNN) or masks (Mask R-CNN)


def choose_mode(settings: Settings, images: int) -> str:
    if settings.train_mode != "auto":
        return settings.train_mode
    return "full" if images >= settings.full_after else "heads"


def apply_mode(model: torch.nn.Module, mode: str) -> None:
    """``heads``: the backbone body is frozen; FPN, RPN and box head train. ``full``: the body trains too,
    except the layers its architecture keeps frozen (BatchNorm always; Lite0's stem and first stages)."""
    if mode == "heads":
        for param in model.backbone.body.parameters():
            param.requires_grad_(False)


class RoundCheckpoint:
    """The in-progress round, saved every few steps (written atomically, loaded with weights_only)."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, state: TrainState, key: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key": key, "step": state.step, "images_seen": state.images_seen, "loss_sum": state.loss_sum,
                    "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict()}, tmp)
        os.replace(tmp, self.path)

    def resume(self, state: TrainState, key: dict) -> bool:
        """Continue ``state`` from the checkpoint if it belongs to this very round (same parent, classes...)."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return False
        except Exception as exc:  # a checkpoint from a crash may be unreadable: start the round afresh
            log.warning("ignoring unreadable round checkpoint %s: %s", self.path, exc)
            return False
        if saved.get("key") != key:
            return False
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.step, state.images_seen, state.loss_sum = saved["step"], saved["images_seen"], saved["loss_sum"]
        return True

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def working_limit(model: torch.nn.Module) -> tuple[int, int]:
    """The largest (shorter, longer) image side ``model`` uses, over all its training scales."""
    return max(model.transform.min_size), model.transform.max_size


def score_on_new_images(model, classes: tuple[str, ...], records: list[LabeledImage], fetcher: ImageFetcher,
                        threshold: float, device: torch.device, task: str = "boxes",
                        all_classes: tuple[str, ...] | None = None) -> float | None:
    """Mean model quality score of ``model`` (whose head knows ``classes``) on images it never trained on:
    an honest, prequential measure of how good its pre-labels were. Mask projects compare masks (mask IoU).
    ``all_classes`` (a superset of ``classes``) must hold every label the records use."""
    scores = []
    model.eval()
    names = all_classes or classes
    for record in records[:QUALITY_IMAGES]:
        try:
            image, target = load_example(record, fetcher, names, task, serving_limit(model))
        except LivetrainError as exc:
            log.info("task %s not scored: %s", record.task_id, exc.message)
            continue
        with torch.inference_mode():
            out = forward(model, [image.to(device)])[0]
        keep = [i for i, s in enumerate(out["scores"].tolist()) if s >= threshold]
        labels, scores_ = out["labels"].tolist(), out["scores"].tolist()
        annotated_names = [names[l - 1] for l in target["labels"].tolist()]
        if task == "masks" and "masks" in out:
            height, width = image.shape[-2:]
            predicted = []
            for i in keep:
                crop, (x0, y0) = paste_in_box(out["masks"][i], out["boxes"][i], width, height)
                predicted.append((MaskCrop(crop, x0, y0), classes[labels[i] - 1], scores_[i]))
            annotated = [(MaskCrop.from_full(m.numpy().astype(bool)), n) for m, n in zip(target["masks"], annotated_names)]
            scores.append(quality(predicted, annotated, overlap=mask_iou).score)
        else:
            boxes = out["boxes"].tolist()
            predicted = [(boxes[i], classes[labels[i] - 1], scores_[i]) for i in keep]
            annotated = list(zip(target["boxes"].tolist(), annotated_names))
            scores.append(quality(predicted, annotated, overlap=iou).score)
    return statistics.mean(scores) if scores else None


def run_round(settings: Settings, starting: StartingWeights, fetcher: ImageFetcher, inputs: RoundInputs,
              device: torch.device, hooks: list[Hook] = ()) -> dict:
    """Train one round and publish it; returns the new version's meta (with its ``name``)."""
    started = time.time()
    store = VersionStore(settings.model_dir, inputs.project)
    parent_name = store.active()
    parent = store.load(parent_name) if parent_name else None
    if parent is not None and version_task(parent[1]) != inputs.task:
        # the label config moved between boxes and masks: a Faster R-CNN cannot grow a mask head, start afresh
        log.warning("project %s: active version %s predicts %s, the project now labels %s; starting a new model",
                    inputs.project, parent_name, version_task(parent[1]), inputs.task)
        parent = None
    parent_meta = parent[1] if parent else {}
    classes = tuple(parent_meta.get("classes", ()))
    classes += tuple(label for label in inputs.labels if label not in classes)  # labels added mid-project
    records = inputs.records
    trained = parent_meta.get("trained_annotations", {})
    new_ids = {r.task_id for r in records if trained.get(str(r.task_id)) != r.updated_at}

    if parent is not None and new_ids:
        previous = model_from_version(*parent, min_size=settings.min_size).to(device)
        new_records = [r for r in records if r.task_id in new_ids]
        score = score_on_new_images(previous, tuple(parent_meta["classes"]), new_records, fetcher,
                                    settings.score_threshold, device, inputs.task, classes)
        if score is not None:
            store.update_meta(parent_name, quality=score, quality_images=min(len(new_records), QUALITY_IMAGES))

    if parent is None and starting.task != inputs.task:
        raise LivetrainError(f"starting weights {starting.arch} are for {starting.task}, the project labels {inputs.task}")
    model = model_for_round(starting, parent, classes, settings.min_size).to(device)
    mode = choose_mode(settings, len(records))
    apply_mode(model, mode)
    base_size = model.transform.min_size[0]
    scale_jitter(model, base_size)
    limit = working_limit(model)
    steps = settings.train_steps
    optimizer = sgd(model, settings.learning_rate)
    state = TrainState(model, optimizer, warmup_cosine(optimizer, steps, max(1, min(10, steps // 5))), steps)
    checkpoint = RoundCheckpoint(store.root / "checkpoints" / "round.pt")
    key = {"parent": parent_meta.get("name"), "task": inputs.task, "classes": list(classes), "mode": mode, "steps": steps}
    if checkpoint.resume(state, key):
        log.info("project %s: resuming the interrupted round at step %d/%d", inputs.project, state.step, steps)
    save = CallbackHook(lambda s: checkpoint.save(s, key), every=settings.checkpoint_every)
    batches = replay_batches(records, new_ids, fetcher, classes, settings.batch_size, settings.new_fraction,
                             seed=len(store.names()), task=inputs.task, limit=limit)
    train_steps(state, batches, device, [save, *hooks])
    model.transform.min_size = (base_size,)

    meta = {
        "parent": parent_name if parent is not None else None,
        "arch": parent_meta.get("arch", starting.arch),
        "task": inputs.task,
        "classes": list(classes),
        "images": len(records),
        "new_images": len(new_ids),
        "negatives": sum(1 for r in records if not r.boxes),
        "annotations": sum(len(r.boxes) for r in records),
        "trained_annotations": {str(r.task_id): r.updated_at for r in records},
        "mode": mode,
        "steps": steps,
        "losses": {k: round(v, 5) for k, v in state.mean_losses().items()},
        "last_losses": {k: round(v, 5) for k, v in state.last_losses.items()},
        "duration_s": round(time.time() - started, 2),
        "settings": {"learning_rate": settings.learning_rate, "batch_size": settings.batch_size,
                     "train_mode": settings.train_mode, "new_fraction": settings.new_fraction, "min_size": base_size},
        "starting_weights": starting.source if parent is None else parent_meta.get("starting_weights"),
    }
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    name = store.publish(state_dict, meta, inputs.title, keep=settings.keep_versions)
    checkpoint.clear()
    log.info("project %s: published %s (%d images, %d new, %s mode, loss %.3f, %.1f s)", inputs.project, name,
             len(records), len(new_ids), mode, meta["losses"].get("loss", float("nan")), meta["duration_s"])
    return store.meta(name)
