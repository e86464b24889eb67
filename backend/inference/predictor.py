"""Serve pre-labels: fetch each task's image, run the project's detector, return Label Studio results."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from backend.errors import ImageError, LivetrainError
from backend.model_store.detect import paste_in_box, serving_limit
from backend.inference.uncertainty import class_weights, detect_and_score
from backend.labelstudio.convert import box_to_region, image_to_tensor, mask_to_regions, shrink
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import ControlTag, LabelConfig
from backend.model_store.models import for_inference, model_from_version, pick_device, size_kwargs, version_task
from backend.model_store.versions import BASE_VERSION, VersionStore
from backend.model_store.weights import StartingWeights

log = logging.getLogger(__name__)

RAW_SCORE_FLOOR = 0.05  # the detector keeps candidates above this; the uncertainty score looks at all of them
FORWARD_BATCH = 4  # images per forward: batching helps a little on CPU, more on GPU
REFRESH_SECONDS = 1.0  # how often a web process looks for a newly published version
PREDICT_SLOTS = 3  # /predict calls per process working at once: one forwarding, two fetching and decoding


@dataclass
class LoadedModel:
    model: nn.Module
    version: str
    classes: tuple[str, ...]  # index i + 1 of the head -> classes[i]; 0 is background
    weights: tuple[float, ...] | None = None  # per head index, for UNCERTAINTY=class_weighted (uncertainty.py)

    @classmethod
    def from_version(cls, model: nn.Module, name: str, meta: dict) -> "LoadedModel":
        classes = tuple(meta["classes"])
        return cls(model, name, classes, class_weights(meta.get("class_objects"), classes))


@dataclass
class _Entry:
    loaded: LoadedModel | None  # None: nothing to serve yet (cold start)
    marker: float  # VersionStore.marker() when loaded
    control: ControlTag


class ModelPool:
    """The model each project serves, kept in memory (never loaded per request).

    A project serves its ACTIVE version when that version is of the project's kind (boxes or masks: a
    project whose config moved from rectangles to polygons does not get boxes). Before its first version
    it serves the pretrained detector's
    own head if some of its classes map onto the project's labels (COCO names or ``predicted_values``),
    and nothing otherwise: an untrained head's boxes would only be noise to delete. A background thread
    checks each project's ACTIVE marker every REFRESH_SECONDS and swaps in a new version, so requests
    never wait for a reload.

    At most ``capacity`` (MAX_LOADED_MODELS) projects are held, least recently used dropped first (before
    the next one is loaded, so never more are resident); a dropped project is loaded again by its next
    request. The refresh thread only looks at the projects held: it neither keeps nor reloads dropped ones.
    """

    def __init__(self, starting: Callable[[str], StartingWeights], model_dir: Path, device: torch.device | str,
                 min_size: int = 0, capacity: int = 8, store: Callable[[str], VersionStore] | None = None):
        self.starting = starting  # task kind -> the starting weights of that kind
        self.model_dir = Path(model_dir)
        # project -> its VersionStore (backend.model_store.stores.version_store: MODEL_DIR or MODEL_STORE)
        self.store = store or (lambda project: VersionStore(self.model_dir, project))
        self._device = device  # a DEVICE setting (auto/cpu/cuda) is resolved at the first load: see ``device``
        self.min_size = min_size
        self.capacity = capacity
        self.loader = self.load_latest  # (project, control) -> LoadedModel | None; tests may swap it
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def get(self, project: str, control: ControlTag) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get(project)
            if entry is not None and entry.control != control:
                # the label config changed: what maps onto it may too, and so may the kind of model
                if entry.loaded is None or entry.loaded.version == BASE_VERSION or entry.control.task != control.task:
                    entry = None
            if entry is None:
                self._entries.pop(project, None)
                while len(self._entries) >= max(1, self.capacity):  # drop first: never capacity + 1 resident
                    evicted, _ = self._entries.popitem(last=False)
                    log.info("project %s: model dropped from memory (MAX_LOADED_MODELS=%d)", evicted, self.capacity)
                entry = self._load(project, control)
                self._entries[project] = entry
            self._entries.move_to_end(project)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_forever, name="model-refresh", daemon=True)
                self._refresher.start()
            return entry.loaded

    def held(self, project: str) -> LoadedModel | None:
        """The model this process holds for ``project``, if any (no loading, no store access)."""
        with self._lock:
            entry = self._entries.get(project)
            return entry.loaded if entry is not None else None

    def loaded(self) -> list[str]:
        """The projects whose model is in memory, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def device(self) -> torch.device:
        """Where served models run. Resolved lazily, at the first load in the serving process: gunicorn forks
        its workers after the app factory ran (with --preload) and asking CUDA anything before a fork, even
        ``torch.cuda.is_available()`` (it calls cuInit), leaves CUDA unusable in the children."""
        if not isinstance(self._device, torch.device):
            self._device = pick_device(self._device)
        return self._device

    def _load(self, project: str, control: ControlTag) -> _Entry:
        marker = self.store(project).marker()
        loaded = self.loader(project, control)
        if loaded is not None:
            if hasattr(loaded.model, "roi_heads"):
                loaded.model.roi_heads.score_thresh = RAW_SCORE_FLOOR
            for_inference(loaded.model, self.device)
        return _Entry(loaded, marker, control)

    def load_latest(self, project: str, control: ControlTag) -> LoadedModel | None:
        store = self.store(project)
        # the active version; one whose files are damaged (or were deleted) is passed over, with the reason
        # logged and shown in GET /versions, for the newest whole version before it
        found = store.load_active()
        if found is not None:
            name, state, meta = found
            if version_task(meta) == control.task:
                log.info("project %s: serving version %s", project, name)
                return LoadedModel.from_version(model_from_version(state, meta, self.min_size), name, meta)
            log.warning("project %s: version %s predicts %s but the label config asks for %s; not served",
                        project, name, version_task(meta), control.task)
        starting = self.starting(control.task)
        classes = starting.categories[1:]
        if classes and any(control.label_for(c) for c in classes):
            return LoadedModel(starting.build_with_own_head(**size_kwargs(self.min_size)), BASE_VERSION, classes)
        return None

    def refresh(self) -> None:
        """Reload every project whose ACTIVE version changed since it was loaded."""
        with self._lock:  # (project, marker, control) only: holding the entries would keep dropped models alive
            held = [(project, entry.marker, entry.control) for project, entry in self._entries.items()]
        for project, marker, control in held:
            try:
                if self.store(project).marker() == marker:
                    continue
            except OSError as exc:  # the store unreachable (an object store down): keep serving, look again later
                log.warning("project %s: cannot look for a new version: %s", project, exc)
                continue
            with self._lock:
                current = self._entries.get(project)
            if current is None or current.marker != marker:  # dropped (LRU) or reloaded meanwhile: not ours to load
                continue
            del current
            try:
                fresh = self._load(project, control)
            except Exception:  # a version deleted under us, a disk hiccup: keep serving, retry next time
                log.exception("project %s: reloading the active version failed", project)
                continue
            with self._lock:
                current = self._entries.get(project)
                if current is not None and current.marker == marker and current.control == control:
                    self._entries[project] = fresh  # in place: its LRU position stays
            del current, fresh

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            try:
                self.refresh()
            except Exception:  # this thread must outlive any failure, or the process never sees a new version
                log.exception("looking for new versions failed")


def has_annotations(task: dict) -> bool:
    """Whether a task (as Label Studio sends or lists it) has an annotation that is not cancelled/skipped."""
    if any(isinstance(a, dict) and not a.get("was_cancelled") for a in task.get("annotations") or ()):
        return True
    return bool(task.get("total_annotations"))


class Predictor:
    """Turns tasks into Label Studio predictions with one model: used by /predict (the project's active
    version, from the pool) and by the re-scoring / "complete" jobs (the version they were asked for)."""

    def __init__(self, pool: ModelPool | None, fetcher: ImageFetcher, score_threshold: float, max_detections: int,
                 uncertainty: str = "mean_confidence", skip_annotated: bool = False, mask_output: str = "instance",
                 polygon_tolerance: float = 1.5, polygon_max_points: int = 200, mask_min_part: float = 0.1,
                 polygon_total_points: int = 1500):
        self.pool = pool
        self.polygon_total_points = polygon_total_points
        self.mask_min_part = mask_min_part
        self.mask_output = mask_output
        self.polygon_tolerance = polygon_tolerance
        self.polygon_max_points = polygon_max_points
        self.fetcher = fetcher
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self.uncertainty = uncertainty
        self.skip_annotated = skip_annotated
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        # One forward at a time per process: torch already uses every core for one forward. (Handing
        # forwards to one dedicated thread instead measured ~35% slower in gunicorn than running them on
        # the request thread; scripts/bench_predict.py shows the difference.)
        self._forward_lock = threading.Lock()
        # At most this many /predict calls of a process fetch, decode and forward at once; the others wait
        # here, before holding any image. Forwards are serialised anyway, so more would only add memory; and
        # with a few more gunicorn THREADS than this, a burst of predictions leaves threads free for webhooks
        # (Label Studio waits 1 s for an event webhook, and an annotator's submit waits for START_TRAINING).
        self._admission = threading.BoundedSemaphore(PREDICT_SLOTS)

    @classmethod
    def from_settings(cls, pool: ModelPool | None, fetcher: ImageFetcher, settings, skip_annotated: bool | None = None):
        return cls(pool, fetcher, settings.score_threshold, settings.max_detections, settings.uncertainty,
                   settings.predict_skip_annotated if skip_annotated is None else skip_annotated,
                   settings.mask_output, settings.polygon_tolerance, settings.polygon_max_points, settings.mask_min_part,
                   settings.polygon_total_points)

    def version(self, project: str, control: ControlTag | None = None) -> str:
        """The version /predict serves the project: its active one, unless that predicts another kind than
        ``control`` asks for (the config moved between boxes and masks), then the base. With the store
        unreachable, the version this process has in memory (Label Studio calls /setup before predicting)."""
        store = self.pool.store(project)
        try:
            name = store.active()
        except OSError as exc:
            held = self.pool.held(project)
            log.warning("project %s: cannot read the active version (%s); answering %s", project, exc,
                        held.version if held else BASE_VERSION)
            return held.version if held else BASE_VERSION
        if name is None or (control is not None and version_task(store.meta(name)) != control.task):
            return BASE_VERSION
        return name

    def predict(self, tasks: list[dict], config: LabelConfig, project: str) -> list[dict]:
        """One prediction per task, in order. A task whose image fails gets an empty prediction; with
        PREDICT_SKIP_ANNOTATED, so does a task that already has annotations (Label Studio needs one
        result per task, or it drops the whole reply)."""
        control = config.primary
        loaded = self.pool.get(project, control)
        if loaded is None:  # cold start: nothing worth showing yet
            return [{"result": [], "score": None, "model_version": BASE_VERSION} for _ in tasks]
        return self.predict_with(loaded, tasks, control, skip_annotated=self.skip_annotated)

    def predict_with(self, loaded: LoadedModel, tasks: list[dict], control: ControlTag, *,
                     threshold: float | None = None, max_detections: int | None = None,
                     skip_annotated: bool = False) -> list[dict]:
        """One prediction per task with ``loaded``; ``threshold`` / ``max_detections`` override the settings
        (and the tag's ``model_score_threshold``). A task whose image failed, or that was skipped, gets an
        empty result with ``score: None``."""
        with self._admission:
            return self._predict_admitted(loaded, tasks, control, threshold, max_detections, skip_annotated)

    def _predict_admitted(self, loaded: LoadedModel, tasks: list[dict], control: ControlTag,
                          threshold: float | None, max_detections: int | None, skip_annotated: bool) -> list[dict]:
        todo = [i for i, t in enumerate(tasks) if not (skip_annotated and has_annotations(t))]
        images = dict(zip(todo, self._fetch_pool.map(lambda i: self._load_image(tasks[i], control), todo)))
        outputs: dict[int, dict] = {}
        ready = [i for i in todo if not isinstance(images[i], LivetrainError)]
        device = next(loaded.model.parameters(), torch.empty(0)).device
        limit = serving_limit(loaded.model)
        for start in range(0, len(ready), FORWARD_BATCH):
            chunk = ready[start : start + FORWARD_BATCH]
            shrunk = [shrink(images[i], limit) for i in chunk]  # as in training: the size the model works at
            tensors = [image_to_tensor(image).to(device) for image, _ in shrunk]
            with self._forward_lock:
                detections, confidences = detect_and_score(loaded.model, tensors, self.uncertainty, loaded.weights)
            for (_, scale), det in zip(shrunk, detections):
                if scale != 1.0:  # back to the image's own pixels; RoI masks do not depend on the size
                    det["boxes"] = det["boxes"] / scale
            for i, det, confidence in zip(chunk, detections, confidences):
                outputs[i] = self._to_prediction(det, confidence, images[i].size, control, loaded, threshold,
                                                 max_detections)
        results = []
        for i, task in enumerate(tasks):
            output = outputs.get(i)
            if output is None:
                output = {"result": [], "score": None, "model_version": loaded.version}
                if i in images:
                    log.warning("task %s: empty prediction because %s", task.get("id"), images[i].message)
            results.append(output)
        return results

    def _load_image(self, task: dict, control: ControlTag):
        try:
            url = (task.get("data") or {}).get(control.value_key)
            if not isinstance(url, str) or not url:
                raise ImageError(f"task data has no '{control.value_key}' image URL")
            return self.fetcher.fetch(url)
        except LivetrainError as exc:
            return exc

    def _to_prediction(self, det: dict, confidence: float, size: tuple[int, int], control: ControlTag,
                       loaded: LoadedModel, threshold: float | None, max_detections: int | None) -> dict:
        width, height = size
        if threshold is None:
            threshold = control.score_threshold if control.score_threshold is not None else self.score_threshold
        limit = self.max_detections if max_detections is None else max_detections
        kept = []  # (index, Label Studio label, score): detections come sorted by score
        for i, (label, score) in enumerate(zip(det["labels"].tolist(), det["scores"].tolist())):
            name = control.label_for(loaded.classes[label - 1]) if score >= threshold else None
            if name and len(kept) < limit:
                kept.append((i, name, score))
        if control.task == "masks" and "masks" in det:
            regions = self._mask_regions(det, kept, width, height, control)
        else:
            boxes = det["boxes"].tolist()
            regions = [r for i, name, score in kept if (r := box_to_region(boxes[i], name, score, width, height, control))]
        return {"result": regions, "score": confidence, "model_version": loaded.version}

    def _mask_regions(self, det: dict, kept: list, width: int, height: int, control: ControlTag) -> list[dict]:
        """Each kept detection's mask, pasted into its own box only (memory stays bounded whatever the image
        size), as polygon or brush regions: one per object (MASK_OUTPUT=instance), or one per class with the
        union of its objects and the best of their scores (semantic). Each object's specks are dropped first
        (MASK_MIN_PART), so an object is one region unless it really has several parts.

        Polygons of one task hold POLYGON_TOTAL_POINTS points at most: Label Studio's editor takes longer to
        show a task the more points it has (scripts/bench_editor.py), so past the budget every polygon is traced
        again with an equal share of it as its POLYGON_MAX_POINTS."""
        regions = self._regions(det, kept, width, height, control, self.polygon_max_points)
        if control.result_type != "polygonlabels" or not regions:
            return regions
        if sum(len(r["value"]["points"]) for r in regions) <= self.polygon_total_points:
            return regions
        share = max(4, self.polygon_total_points // len(regions))
        return self._regions(det, kept, width, height, control, min(share, self.polygon_max_points))

    def _regions(self, det: dict, kept: list, width: int, height: int, control: ControlTag, max_points: int) -> list[dict]:
        from backend.labelstudio.masks import drop_specks  # OpenCV: loaded by the first mask prediction only

        shape = dict(tolerance=self.polygon_tolerance, max_points=max_points)
        boxes = det["boxes"]

        def pasted(i: int):
            crop, offset = paste_in_box(det["masks"][i], boxes[i], width, height)
            return (drop_specks(crop, self.mask_min_part) if crop.size else crop), offset

        if self.mask_output == "instance":
            regions = []
            for i, name, score in kept:
                crop, offset = pasted(i)
                if crop.size:
                    regions += mask_to_regions(crop, offset, name, score, width, height, control, **shape)
            return regions
        classes: dict[str, tuple[np.ndarray, float]] = {}
        for i, name, score in kept:  # one full-size mask per class present, not per object
            crop, (x0, y0) = pasted(i)
            union, best = classes.get(name) or (np.zeros((height, width), dtype=bool), score)
            union[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] |= crop
            classes[name] = (union, max(best, score))
        regions = []
        for name, (union, best) in classes.items():
            regions += mask_to_regions(union, (0, 0), name, best, width, height, control, **shape)
        return regions
