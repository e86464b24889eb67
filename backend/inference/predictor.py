"""Serve pre-labels: fetch each task's image, run the project's detector, return Label Studio results."""

from __future__ import annotations

import logging
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from backend.errors import ImageError, LivetrainError
from backend.inference.uncertainty import least_confidence
from backend.labelstudio.convert import box_to_region
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import ControlTag, LabelConfig
from backend.model_store.weights import StartingWeights

log = logging.getLogger(__name__)

BASE_VERSION = "livetrain-base"  # the starting weights with an untrained head, before any round
RAW_SCORE_FLOOR = 0.05  # the detector keeps candidates above this; the uncertainty score looks at all of them
FORWARD_BATCH = 4  # images per forward: batching helps a little on CPU, more on GPU


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def image_to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float tensor CxHxW in [0, 1] (what torchvision detectors take)."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses to share read-only memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


@dataclass
class LoadedModel:
    model: nn.Module
    version: str
    classes: tuple[str, ...]  # index i + 1 of the head -> classes[i]; 0 is background


class ModelPool:
    """Project models kept in memory (never loaded per request), least recently used evicted."""

    def __init__(self, starting: StartingWeights, device: torch.device, capacity: int = 4):
        self.starting = starting
        self.build = starting.build  # num_classes -> detector; tests may swap in a different network
        self.device = device
        self.capacity = capacity
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, project: str, classes: tuple[str, ...]) -> LoadedModel:
        key = (project, classes)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            # A new head is random: seed it from the label set so every web process (and every restart)
            # serves the same predictions for the same model_version.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32("\n".join(classes).encode()))
                model = self.build(len(classes) + 1)
            if hasattr(model, "roi_heads"):
                model.roi_heads.score_thresh = RAW_SCORE_FLOOR
            loaded = LoadedModel(model.to(self.device).eval(), BASE_VERSION, classes)
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded


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
        return BASE_VERSION

    def predict(self, tasks: list[dict], config: LabelConfig, project: str) -> list[dict]:
        """One prediction per task, in order. A task whose image fails gets an empty prediction."""
        control = config.primary
        loaded = self.pool.get(project, control.labels)
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
