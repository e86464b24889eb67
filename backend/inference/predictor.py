"""Serve pre-labels: fetch each task's image, run the project's detector, return Label Studio results."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from backend.errors import ImageError, LivetrainError
from backend.inference.uncertainty import least_confidence
from backend.labelstudio.convert import box_to_region, image_to_tensor
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import ControlTag, LabelConfig
from backend.model_store.models import model_from_version, size_kwargs
from backend.model_store.versions import VersionStore
from backend.model_store.weights import StartingWeights

log = logging.getLogger(__name__)

BASE_VERSION = "livetrain-base"  # the starting weights, before the first version is published
RAW_SCORE_FLOOR = 0.05  # the detector keeps candidates above this; the uncertainty score looks at all of them
FORWARD_BATCH = 4  # images per forward: batching helps a little on CPU, more on GPU
REFRESH_SECONDS = 1.0  # how often a web process looks for a newly published version


@dataclass
class LoadedModel:
    model: nn.Module
    version: str
    classes: tuple[str, ...]  # index i + 1 of the head -> classes[i]; 0 is background


@dataclass
class _Entry:
    loaded: LoadedModel | None  # None: nothing to serve yet (cold start)
    marker: float  # VersionStore.marker() when loaded
    control: ControlTag


class ModelPool:
    """The model each project serves, kept in memory (never loaded per request).

    A project serves its ACTIVE version. Before its first version it serves the pretrained detector's
    own head if some of its classes map onto the project's labels (COCO names or ``predicted_values``),
    and nothing otherwise: an untrained head's boxes would only be noise to delete. A background thread
    checks each project's ACTIVE marker every REFRESH_SECONDS and swaps in a new version, so requests
    never wait for a reload.
    """

    def __init__(self, starting: StartingWeights, model_dir: Path, device: torch.device, min_size: int = 0,
                 capacity: int = 8):
        self.starting = starting
        self.model_dir = Path(model_dir)
        self.device = device
        self.min_size = min_size
        self.capacity = capacity
        self.loader = self.load_latest  # (project, control) -> LoadedModel | None; tests may swap it
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def get(self, project: str, control: ControlTag) -> LoadedModel | None:
        with self._lock:
            entry = self._entries.get(project)
            if entry is not None and (entry.loaded is None or entry.loaded.version == BASE_VERSION):
                if entry.control != control:  # the label config changed: what maps onto it may too
                    entry = None
            if entry is None:
                entry = self._load(project, control)
                self._entries[project] = entry
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(project)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_forever, name="model-refresh", daemon=True)
                self._refresher.start()
            return entry.loaded

    def _load(self, project: str, control: ControlTag) -> _Entry:
        marker = VersionStore(self.model_dir, project).marker()
        loaded = self.loader(project, control)
        if loaded is not None:
            if hasattr(loaded.model, "roi_heads"):
                loaded.model.roi_heads.score_thresh = RAW_SCORE_FLOOR
            loaded.model.to(self.device).eval()
        return _Entry(loaded, marker, control)

    def load_latest(self, project: str, control: ControlTag) -> LoadedModel | None:
        store = VersionStore(self.model_dir, project)
        name = store.active()
        if name is not None:
            state, meta = store.load(name)
            log.info("project %s: serving version %s", project, name)
            return LoadedModel(model_from_version(state, meta, self.min_size), name, tuple(meta["classes"]))
        classes = self.starting.categories[1:]
        if classes and any(control.label_for(c) for c in classes):
            return LoadedModel(self.starting.build_with_own_head(**size_kwargs(self.min_size)), BASE_VERSION, classes)
        return None

    def refresh(self) -> None:
        """Reload every project whose ACTIVE version changed since it was loaded."""
        with self._lock:
            entries = list(self._entries.items())
        for project, entry in entries:
            if VersionStore(self.model_dir, project).marker() == entry.marker:
                continue
            try:
                fresh = self._load(project, entry.control)
            except Exception:  # a version deleted under us, a disk hiccup: keep serving, retry next time
                log.exception("project %s: reloading the active version failed", project)
                continue
            with self._lock:
                if project in self._entries:
                    self._entries[project] = fresh

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            self.refresh()


def _forward(model: nn.Module, tensors: list[torch.Tensor]) -> list[dict]:
    with torch.inference_mode():
        return model(tensors)


class Predictor:
    def __init__(self, pool: ModelPool, fetcher: ImageFetcher, score_threshold: float, max_detections: int):
        self.pool = pool
        self.fetcher = fetcher
        self.score_threshold = score_threshold
        self.max_detections = max_detections
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        # One forward at a time per process: torch already uses every core for one forward. (Handing
        # forwards to one dedicated thread instead measured ~35% slower in gunicorn than running them on
        # the request thread; scripts/bench_predict.py shows the difference.)
        self._forward_lock = threading.Lock()

    def version(self, project: str) -> str:
        return VersionStore(self.pool.model_dir, project).active() or BASE_VERSION

    def predict(self, tasks: list[dict], config: LabelConfig, project: str) -> list[dict]:
        """One prediction per task, in order. A task whose image fails gets an empty prediction."""
        control = config.primary
        loaded = self.pool.get(project, control)
        if loaded is None:  # cold start: nothing worth showing yet
            return [{"result": [], "score": None, "model_version": BASE_VERSION} for _ in tasks]
        images = list(self._fetch_pool.map(lambda t: self._load_image(t, control), tasks))
        outputs: list[dict | None] = [None] * len(tasks)
        ready = [i for i, image in enumerate(images) if not isinstance(image, LivetrainError)]
        for start in range(0, len(ready), FORWARD_BATCH):
            chunk = ready[start : start + FORWARD_BATCH]
            tensors = [image_to_tensor(images[i]).to(self.pool.device) for i in chunk]
            with self._forward_lock:
                detections = _forward(loaded.model, tensors)
            for i, det in zip(chunk, detections):
                outputs[i] = self._to_prediction(det, images[i].size, control, loaded)
        results = []
        for task, image, output in zip(tasks, images, outputs):
            if output is None:
                log.warning("task %s: empty prediction because %s", task.get("id"), image.message)
                output = {"result": [], "score": None, "model_version": loaded.version}
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

    def _to_prediction(self, det: dict, size: tuple[int, int], control: ControlTag, loaded: LoadedModel) -> dict:
        width, height = size
        threshold = control.score_threshold if control.score_threshold is not None else self.score_threshold
        scores = det["scores"].tolist()
        regions = []
        for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(), scores):
            if score < threshold or len(regions) >= self.max_detections:
                continue  # detections come sorted by score
            name = control.label_for(loaded.classes[label - 1])
            region = box_to_region(box, name, score, width, height, control) if name else None
            if region:
                regions.append(region)
        return {"result": regions, "score": least_confidence(scores), "model_version": loaded.version}
