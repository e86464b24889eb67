"""A training session: one project's model and optimizer kept in memory, trained continuously while
annotations arrive, publishing versions as it goes.

The job around it (``backend.jobs.training``) feeds it the training set after each sync (``update``),
calls ``step`` in a loop, ``publish`` every PUBLISH_INTERVAL while it trained on something new, and
``finish`` (the decay tail and the final version) when the project is idle. ``checkpoint`` / ``resume``
let a killed worker lose only the steps since the last checkpoint.

Learning-rate schedule of an open-ended session (``lr_factor``): a linear warm-up over WARMUP_STEPS
(from 10%), then the constant LEARNING_RATE for as long as annotations keep coming (a cosine would decay
towards zero long before the project is done, and the newest images would be learned with a tiny rate),
then a cosine tail to 1% over max(DECAY_STEPS, a fifth of the session's steps) before the final version:
the consolidation that makes the boxes as tight as an offline run's. When the backbone joins at
FULL_AFTER images the optimizer is rebuilt with it and the warm-up runs again (the new parameters start
without momentum, and a full LEARNING_RATE step on a cold backbone would undo its pretraining).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from backend.errors import LivetrainError
from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.metrics.quality import Quality
from backend.model_store.models import for_inference, model_for_round, model_from_version, version_task
from backend.model_store.stores import version_store
from backend.model_store.versions import BASE_VERSION
from backend.model_store.weights import StartingWeights
from backend.settings import Settings
from backend.training.data import ExampleCache, class_objects
from backend.training.ema import ModelEma
from backend.training.engine import amp_scaler, sgd, train_step
from backend.training.guard import Guard, Verdict
from backend.training.modes import apply_mode, body_trainable, choose_mode, set_rois_per_image, working_limit
from backend.training.sampler import LiveSampler
from backend.training.scoring import score_image
from backend.training.transforms import augment, scale_jitter
from backend.training.validation import ValidationSplit

log = logging.getLogger(__name__)

WARMUP_START = 0.1  # the warm-up starts at this fraction of LEARNING_RATE
DECAY_FLOOR = 0.01  # the decay tail ends at this fraction
DECAY_SHARE = 0.2  # the tail is at least this share of the session's steps


@dataclass
class SessionInputs:
    project: str
    title: str  # version names are "<slug of title>-v<N>"
    labels: tuple[str, ...]  # the label config's labels, in order
    task: str = "boxes"  # the primary control's kind: boxes (Faster R-CNN) or masks (Mask R-CNN)


def lr_factor(step: int, warmup: int, decay_at: int | None = None, decay_steps: int = 0) -> float:
    """The learning-rate multiplier ``step`` steps after the (last) warm-up began; ``decay_at``: the step the
    tail began (None while training at the constant rate)."""
    if decay_at is not None and decay_steps:
        progress = min(1.0, (step - decay_at) / decay_steps)
        return DECAY_FLOOR + (1.0 - DECAY_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < warmup:
        return WARMUP_START + (1.0 - WARMUP_START) * step / warmup
    return 1.0


class TrainingSession:
    def __init__(self, settings: Settings, starting: StartingWeights, fetcher: ImageFetcher, inputs: SessionInputs,
                 device: torch.device, seed: int = 0):
        self.settings, self.inputs, self.device = settings, inputs, device
        self.store = version_store(settings, inputs.project)
        self.started = time.time()
        self.id = uuid.uuid4().hex[:12]  # versions name the session that published them
        # the active version (or, when its files are damaged or gone, the newest whole one before it: VersionStore)
        found = self.store.load_active()
        self.parent = found[0] if found else None
        parent = found[1:] if found else None
        if parent is not None and version_task(parent[1]) != inputs.task:
            # the label config moved between boxes and masks: a Faster R-CNN cannot grow a mask head, start afresh
            log.warning("project %s: active version %s predicts %s, the project now labels %s; starting a new model",
                        inputs.project, self.parent, version_task(parent[1]), inputs.task)
            parent, self.parent = None, None
        if parent is None and starting.task != inputs.task:
            raise LivetrainError(f"starting weights {starting.arch} are for {starting.task}, the project labels {inputs.task}")
        meta = parent[1] if parent else {}
        self.parent_meta = meta
        self.classes = tuple(meta.get("classes", ()))
        self.classes += tuple(label for label in inputs.labels if label not in self.classes)  # labels added mid-project
        self.arch = meta.get("arch", starting.arch)
        self.starting_source = meta.get("starting_weights") if parent else starting.source
        self.model = model_for_round(starting, parent, self.classes, settings.min_size).to(device)
        self.base_size = self.model.transform.min_size[0]
        self.trainable = body_trainable(self.model)
        # what /predict serves now, for the live quality score of each new image (before training on it)
        self.served = self._eval_copy(model_from_version(*parent, settings.min_size)) if parent else None
        self.served_classes = tuple(meta.get("classes", ()))
        self.active_name = self.parent  # the version served (and trained on from): the guard may hold new ones back
        scale_jitter(self.model, self.base_size)
        set_rois_per_image(self.model, settings.rois_per_image)
        # what versions publish: the average of the recent steps' weights (training.ema); None with EMA_DECAY=0
        self.ema = ModelEma(self.model, settings.ema_decay) if settings.ema_decay else None
        if self.ema is not None:
            self.ema.module.transform.min_size = (self.base_size,)
        self.examples = ExampleCache(fetcher, inputs.task, working_limit(self.model))
        self.validator = ValidationSplit(inputs.project, settings.validation_fraction, fetcher, inputs.task,
                                         (self.base_size, self.model.transform.max_size))
        self.fetcher = fetcher
        self.sampler = LiveSampler(settings.new_fraction, settings.min_passes, seed=seed)
        # task id (str) -> the annotation's updated_at the model has trained on; a version lists these
        self.trained: dict[str, str] = dict(meta.get("trained_annotations", {}))
        self.published_trained = dict(self.trained)
        self.total_steps = int(meta.get("total_steps", meta.get("steps", 0)) or 0)
        self.steps = 0  # in this session
        self.warm_from = 0  # step the last warm-up began
        self.decay_at: int | None = None
        self.decay_len = 0
        self.mode: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = amp_scaler(device, settings.amp)  # mixed precision: CUDA with AMP only
        self.versions: list[str] = []
        self.loss_sum: dict[str, float] = {}
        self.loss_steps = 0
        self.step_time = {"heads": [0.0, 0], "full": [0.0, 0]}  # mode -> [seconds, steps]
        self.last_losses: dict[str, float] = {}
        self._point = [0.0, 0]  # loss sum and steps since the last loss_point()
        self.guard = Guard(self)
        self.last_verdict = None  # the guard's verdict on the last version published

    # -- data ------------------------------------------------------------------------------------
    def update(self, records: list[LabeledImage]) -> list[LabeledImage]:
        """Take the labeled set as synced now (the validation split is kept apart: ``training.validation``);
        returns the training records that are new or changed (in the next batch)."""
        records = self.validator.split(records)
        by_id = {r.task_id: r for r in records}
        changed = self.sampler.update(by_id)
        for task_id in list(self.trained):
            if int(task_id) not in by_id:  # deleted, or no usable annotation any more: not trained on any longer
                del self.trained[task_id]
        self._set_mode(choose_mode(self.settings, len(records)))
        return [by_id[t] for t in changed]

    def is_new(self, record: LabeledImage) -> bool:
        """Whether the model never trained on this task (a first annotation, not a correction)."""
        return str(record.task_id) not in self.trained

    def score(self, record: LabeledImage) -> tuple[str, Quality]:
        """(version, quality) of the pre-label the served version gives ``record`` (raises LivetrainError when
        its image cannot be loaded). Before the first version: the empty pre-label of ``livetrain-base``."""
        version = self.active_name or BASE_VERSION
        quality = score_image(self.served, self.served_classes, record, self.fetcher, self.settings.score_threshold,
                              self.device, self.inputs.task, self.classes, limit=(self.base_size, 2 * self.base_size),
                              min_part=self.settings.mask_min_part)
        return version, quality

    def score_new(self, records: list[LabeledImage]) -> list[dict]:
        """Score each record the model never trained on (``score``) and add it to its version's mean quality
        (``meta["quality"]``, which picks the best version); returns one entry per scored image (task, time,
        version, score, category counts) for the project's live quality series."""
        entries = []
        for record in records:
            # a validation task is never trained on, so it would count as new in every session: its pre-label
            # quality shows in the versions' validation mAP instead
            if not self.is_new(record) or record.task_id in self.validator.records:
                continue
            try:
                version, quality = self.score(record)
            except LivetrainError as exc:
                log.info("task %s not scored: %s", record.task_id, exc.message)
                continue
            entries.append({"task": record.task_id, "time": round(time.time(), 3), "version": version,
                            "score": round(quality.score, 4), "counts": asdict(quality)})
            try:
                self.guard.pair(self, record, version, quality.score)  # the live signal's paired score
            except LivetrainError as exc:  # the image failed on its second load: no pair, the session goes on
                log.info("task %s not paired for the guard: %s", record.task_id, exc.message)
            if version != BASE_VERSION and version in self.store.names():
                try:
                    meta = self.store.meta(version)
                    n = meta.get("quality_images", 0)
                    mean = (meta.get("quality", 0.0) * n + quality.score) / (n + 1)
                    self.store.update_meta(version, quality=round(mean, 4), quality_images=n + 1)
                except (OSError, ValueError) as exc:  # a full disk, a damaged meta.json: the score is still in the series
                    log.warning("version %s: quality not recorded in its meta: %s", version, exc)
        return entries

    # -- training --------------------------------------------------------------------------------
    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


    def _set_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        apply_mode(self.model, mode, self.trainable)
        self.optimizer = sgd(self.model, self.settings.learning_rate)
        if self.mode is not None:
            log.info("project %s: %s mode from now on (%d images)", self.inputs.project, mode, len(self.sampler.records))
            self.sampler.reset_passes()
        self.mode, self.warm_from = mode, self.steps

    def lr(self) -> float:
        return self.settings.learning_rate * lr_factor(self.steps - self.warm_from, self.settings.warmup_steps,
                                                       None if self.decay_at is None else self.decay_at - self.warm_from,
                                                       self.decay_len)

    def step(self) -> dict:
        """One SGD step on the next batch; returns its losses."""
        started = time.perf_counter()
        images, targets, drawn = [], [], []
        while not images:
            ids = self.sampler.draw(self.settings.batch_size)
            if not ids:
                raise LivetrainError("no training image could be loaded (see the worker log for each reason)")
            for task_id in ids:
                record = self.sampler.records[task_id]
                try:
                    image, target = self.examples.load(record, self.classes)
                except LivetrainError as exc:
                    log.warning("task %s left out of training: %s", task_id, exc.message)
                    self.sampler.drop(task_id)
                    continue
                image, target = augment(image, target)
                images.append(image)
                targets.append(target)
                drawn.append(record)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()
        self.model.train()
        losses = train_step(self.model, self.optimizer, images, targets, self.device, scaler=self.scaler)
        if self.ema is not None:
            self.ema.update(self.model)
        self.steps += 1
        self.total_steps += 1
        for record in drawn:
            self.trained[str(record.task_id)] = record.updated_at
        self.last_losses = losses
        for k, v in losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v
        self.loss_steps += 1
        self._point[0] += losses.get("loss", 0.0)
        self._point[1] += 1
        timing = self.step_time[self.mode]
        timing[0] += time.perf_counter() - started
        timing[1] += 1
        return losses

    def loss_point(self) -> dict | None:
        """One point of the loss curve: the mean loss of the steps since the last point (None if no step)."""
        total, n = self._point
        if not n:
            return None
        self._point = [0.0, 0]
        return {"time": round(time.time(), 3), "total_steps": self.total_steps, "steps": n,
                "loss": round(total / n, 5), "mode": self.mode, "lr": round(self.lr(), 6)}

    def has_new(self) -> bool:
        """Whether the model trained on an annotation the last version did not have."""
        return self.trained != self.published_trained

    def settled(self) -> bool:
        return self.sampler.settled()

    def start_decay(self) -> int:
        """Begin the learning-rate tail; returns how many steps it lasts."""
        self.decay_at = self.steps
        self.decay_len = max(self.settings.decay_steps, int(DECAY_SHARE * self.steps))
        return self.decay_len

    def decay_done(self) -> bool:
        return self.decay_at is not None and self.steps - self.decay_at >= self.decay_len

    # -- versions --------------------------------------------------------------------------------
    def published_model(self) -> torch.nn.Module:
        """The weights a version publishes now: the moving average (EMA_DECAY), else the model as trained."""
        return self.ema.module if self.ema is not None else self.model

    def publish(self) -> str:
        """Publish ``published_model()`` as it is now (atomically; as the active version unless the guard holds
        it back, ``training.guard``); returns the version's name."""
        records = self.sampler.records
        trained = dict(self.trained)
        previous = self.active_name
        previous_trained = self.published_trained
        model = self.published_model()
        model.eval()
        state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        meta = {
            "parent": previous,
            "session": self.id,
            "arch": self.arch,
            "task": self.inputs.task,
            "classes": list(self.classes),
            "images": len(trained),
            "new_images": sum(1 for k, v in trained.items() if previous_trained.get(k) != v),
            "negatives": sum(1 for r in records.values() if not r.boxes and str(r.task_id) in trained),
            "annotations": sum(len(r.boxes) for r in records.values() if str(r.task_id) in trained),
            "class_objects": class_objects(records, trained, self.classes),
            "trained_annotations": trained,
            "mode": self.mode,
            "steps": self.loss_steps,
            "total_steps": self.total_steps,
            "session_steps": self.steps,
            "final": self.decay_at is not None,
            "losses": {k: round(v / max(self.loss_steps, 1), 5) for k, v in self.loss_sum.items()},
            "last_losses": {k: round(v, 5) for k, v in self.last_losses.items()},
            "duration_s": round(time.time() - (self._last_publish_time or self.started), 2),
            "settings": {"learning_rate": self.settings.learning_rate, "batch_size": self.settings.batch_size,
                         "train_mode": self.settings.train_mode, "new_fraction": self.settings.new_fraction,
                         "min_size": self.base_size, "full_after": self.settings.full_after,
                         "warmup_steps": self.settings.warmup_steps, "decay_steps": self.settings.decay_steps,
                         "ema_decay": self.settings.ema_decay, "rois_per_image": self.settings.rois_per_image},
            "starting_weights": self.starting_source,
        }
        try:
            validation = self.validator.evaluate(model, self.classes, self.base_size, self.device)
            verdict = self.guard.decide(self, validation)
        except Exception as exc:  # an evaluation failure must not end the session or lose the version
            log.exception("project %s: validation / guard failed; publishing unguarded", self.inputs.project)
            validation, verdict = None, Verdict(True, {"signal": "none", "verdict": "accepted",
                                                       "reason": f"guard failed: {type(exc).__name__}: {exc}"})
        meta.update(guard=verdict.info, **({"validation": validation} if validation else {}),
                    **({"held_back": verdict.held_back} if verdict.held_back else {}))
        name = self.store.publish(state_dict, meta, self.inputs.title, keep=self.settings.keep_versions,
                                  activate=verdict.accept,
                                  protect=self.guard.protected() | {n for n in (self.active_name,) if n})
        self._last_publish_time = time.time()
        self.versions.append(name)
        self.published_trained = dict(trained)
        self.loss_sum, self.loss_steps = {}, 0
        self.guard.settle(self, name, verdict, validation)  # held back: back to the active version's weights
        self.last_verdict = verdict
        if verdict.accept:
            self.active_name = name
            self.served = self._eval_copy(copy.deepcopy(model))
            self.served_classes = self.classes
            self.guard.adopt_first(self)  # a project's first version: the baseline of the live signal
        else:  # the checkpoint holds the weights the guard rejected: a crash now would resume them
            self.checkpoint()
        log.info("project %s: published %s (%d images, %d new, %s mode, %d steps, loss %.3f)", self.inputs.project,
                 name, meta["images"], meta["new_images"], self.mode, meta["steps"], meta["losses"].get("loss", float("nan")))
        return name

    _last_publish_time: float | None = None

    def _eval_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        model.transform.min_size = (self.base_size,)  # eval uses min_size[-1]: not a training jitter scale
        for param in model.parameters():
            param.requires_grad_(False)
        return for_inference(model, self.device)

    def status(self) -> dict:
        """What /status shows of the session."""
        return {"id": self.id, "started_at": self.started, "steps": self.steps, "total_steps": self.total_steps, "mode": self.mode,
                "phase": "decay" if self.decay_at is not None else "warmup" if self.steps - self.warm_from < self.settings.warmup_steps else "constant",
                "images": len(self.sampler.records), "validation_images": len(self.validator.records),
                "versions": len(self.versions), "lr": round(self.lr(), 6),
                "loss": round(self.last_losses.get("loss", 0.0), 4),
                "step_s": {mode: round(s / n, 3) if n else None for mode, (s, n) in self.step_time.items()},
                "mode_steps": {mode: n for mode, (_, n) in self.step_time.items()}}

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.store.root / "checkpoints" / "session.pt"

    def _key(self) -> dict:
        return {"task": self.inputs.task, "classes": list(self.classes), "arch": self.arch}

    def checkpoint(self) -> None:
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"key": self._key(), "session": self.id, "base": self.active_name,
                    "mode": self.mode, "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "trained": self.trained,
                    "passes": {str(k): v for k, v in self.sampler.passes.items()},
                    "total_steps": self.total_steps, "steps": self.steps, "warm_from": self.warm_from,
                    "decay_at": self.decay_at, "decay_len": self.decay_len,
                    "ema": self.ema.state_dict() if self.ema is not None else None}, tmp)
        os.replace(tmp, path)

    def resume(self) -> bool:
        """Continue from the checkpoint a killed (or fair-share paused) session left, if it continues the active
        version with the same classes. Call after the first ``update``."""
        try:
            saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return False
        except Exception as exc:  # a checkpoint written during a crash may be unreadable: start from the version
            log.warning("ignoring unreadable session checkpoint %s: %s", self.checkpoint_path, exc)
            return False
        # It continues the active version if it trained on from there, or if its own session published the
        # active version after the checkpoint; not after a rollback (which deletes it), a new label or a kind switch.
        continues = saved.get("base") == self.parent or (
            self.parent is not None and self.parent_meta.get("session") == saved.get("session"))
        if saved.get("key") != self._key() or not continues:
            return False
        if saved["mode"] != self.mode:
            apply_mode(self.model, saved["mode"], self.trainable)
            self.optimizer, self.mode = sgd(self.model, self.settings.learning_rate), saved["mode"]
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.ema is not None and saved.get("ema"):  # the average the killed session had built
            self.ema.load_state_dict(saved["ema"])
        elif self.ema is not None:  # a checkpoint from before EMA_DECAY (or written with it off): start at its weights
            self.ema.reset(self.model)
        self.trained = {k: v for k, v in saved["trained"].items() if int(k) in self.sampler.records}
        self.total_steps = saved["total_steps"]
        self.steps, self.warm_from = saved["steps"], saved["warm_from"]
        for task_id, passes in saved["passes"].items():
            record = self.sampler.records.get(int(task_id))
            if record is not None and self.trained.get(task_id) == record.updated_at:
                self.sampler.passes[int(task_id)] = passes
        # what the checkpoint trained on needs no front-of-queue draw; changed images still get one
        self.sampler.fresh = [t for t in self.sampler.fresh if self.trained.get(str(t)) != self.sampler.records[t].updated_at]
        # A decay tail that fair share paused goes on where it was, unless new work came meanwhile. Started afresh
        # it would need IDLE_AFTER and its whole tail (a fifth of all steps) again in every slice: with more
        # projects than workers an idle project would be paused before it ends, again and again, for ever.
        if saved.get("decay_at") is not None and not self.sampler.fresh:
            self.decay_at, self.decay_len = saved["decay_at"], saved["decay_len"]
        return True

    def clear_checkpoint(self) -> None:
        self.checkpoint_path.unlink(missing_ok=True)
