"""Replay a COCO dataset as an annotation session (``livetrain simulate``).

For each image, in dataset order: fetch the pre-label the annotator would be shown, score it against the
ground truth with the model quality score (``backend.metrics.quality``), then submit the ground truth as
the annotation, and go on at a fixed pace or once the round it triggered has finished. Annotations always
go into Label Studio (the source of truth the worker trains from); the pre-label comes either

- ``via="label-studio"``: as the labeling UI gets it: the task is opened (``GET /api/tasks/<id>/``), Label
  Studio calls ``/predict`` if the task has no prediction of the project's model version and stores it,
  and the newest stored prediction is what the person sees; or
- ``via="backend"``: straight from our ``POST /predict``, with the payload Label Studio would send.

Two kinds of project (``kind``, ``livetrain simulate --kind``):

- ``boxes``: a RectangleLabels config; the ground truth is one rectangle per COCO ``bbox``, and the
  pre-label is scored with box IoU.
- ``polygons``: a PolygonLabels config (Mask R-CNN); the ground truth is one closed polygon result per ring
  of each COCO polygon ``segmentation`` (a multi-part object is several results, as Label Studio needs),
  and the pre-label is scored with **mask IoU**: each predicted result is one region, each ground-truth
  object is the union of its rings, both rasterised at the image size (``MASK_MAX_SIDE`` at most).
  Objects without a polygon (RLE / iscrowd) are neither annotated nor scored.

Writes ``simulation.jsonl`` (one record per image), ``summary.json`` and ``quality.png``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import requests

from backend.labelstudio.annotations import box_to_pixels
from backend.labelstudio.convert import box_to_region, region_id
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.masks import polygon_to_mask
from backend.metrics.quality import MaskCrop, Quality, mask_iou, quality
from backend.simulation.ls_api import LabelStudioAPI
from backend.training.coco import CocoImage, load_coco, ring_to_percent

log = logging.getLogger(__name__)

ROLLING = 10  # images in the rolling quality window
KINDS = {"boxes": "RectangleLabels", "polygons": "PolygonLabels"}  # --kind -> the label config's control tag
MASK_MAX_SIDE = 1024  # polygons kind: masks are compared at the image size, scaled down to at most this


@dataclass
class SimulationConfig:
    data: Path
    images: int = 100
    split: str = "train"
    via: str = "label-studio"  # or "backend"
    kind: str = "boxes"  # or "polygons" (see the module doc)
    pace: float | None = 10.0  # seconds per image; None: wait for the triggered round to finish
    title: str = "livetrain simulation"
    wait_timeout: float = 900.0


def label_config(classes: list[str], kind: str = "boxes") -> str:
    tag = KINDS[kind]
    labels = "\n".join(f'    <Label value="{c}"/>' for c in classes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <{tag} name="label" toName="image">\n'
            f'{labels}\n  </{tag}>\n</View>')


@lru_cache(maxsize=8)
def _control(classes: tuple[str, ...], kind: str = "boxes"):
    return parse_label_config(label_config(list(classes), kind)).primary


def ground_truth_result(image: CocoImage, classes: list[str], kind: str = "boxes") -> list[dict]:
    """The image's objects as Label Studio results (percent of the image), as a person draws them:
    rectangles, or for ``kind="polygons"`` one closed polygon per ring of each object's segmentation."""
    control = _control(tuple(classes), kind)
    if kind == "polygons":
        return _polygon_results(image, classes, control)
    out = []
    for box, label in zip(image.boxes, image.labels):
        region = box_to_region(box, classes[label - 1], 1.0, image.width, image.height, control)
        if region:
            region.pop("score")  # an annotation, not a prediction
            out.append(region)
    return out


def _polygon_results(image: CocoImage, classes: list[str], control) -> list[dict]:
    out = []
    for rings, label in zip(image.polygons, image.labels):
        for ring in rings:
            points = [[round(x, 4), round(y, 4)] for x, y in ring_to_percent(ring, image.width, image.height)]
            xs, ys = [x for x, _ in points], [y for _, y in points]
            if max(xs) <= min(xs) or max(ys) <= min(ys):
                continue  # no area: nobody draws that (and livetrain would drop it)
            out.append({"id": region_id(), "from_name": control.from_name, "to_name": control.to_name,
                        "type": "polygonlabels", "original_width": int(image.width),
                        "original_height": int(image.height), "image_rotation": 0,
                        "value": {"points": points, "closed": True, "polygonlabels": [classes[label - 1]]}})
    return out


def mask_size(width: int, height: int) -> tuple[int, int]:
    """The size masks are compared at: the image's, scaled down so that its longer side is MASK_MAX_SIDE at most."""
    scale = min(1.0, MASK_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def truth_masks(image: CocoImage, classes: list[str]) -> list[tuple]:
    """(MaskCrop, label) of each object with a polygon (all its rings together), at ``mask_size``; objects
    whose polygons cover no pixel centre are left out (nothing could ever match them)."""
    w, h = mask_size(image.width, image.height)
    out = []
    for i, label in enumerate(image.labels):
        if i < len(image.polygons) and image.polygons[i]:
            crop = MaskCrop.from_full(image.mask(i, w, h))
            if crop.area:
                out.append((crop, classes[label - 1]))
    return out


def predicted_masks(result: list[dict], width: int, height: int) -> list[tuple]:
    """(MaskCrop at ``mask_size``, label, score) for each polygon of a Label Studio prediction result: each
    result is one region (the parts of a multi-part prediction count separately, as a person edits them)."""
    w, h = mask_size(width, height)
    out = []
    for region in result or []:
        value = region.get("value") or {}
        labels = value.get("polygonlabels") or []
        if not labels:
            continue
        try:
            crop = MaskCrop.from_full(polygon_to_mask(value.get("points"), w, h))
        except ValueError:  # fewer than 3 usable points: not a shape
            continue
        out.append((crop, labels[0], float(region.get("score", 0.0) or 0.0)))
    return out


def score_prediction(result: list[dict], image: CocoImage, classes: list[str], kind: str = "boxes") -> Quality:
    """The model quality score of a pre-label against the image's ground truth: box IoU, or mask IoU for
    ``kind="polygons"``."""
    if kind == "polygons":
        return quality(predicted_masks(result, image.width, image.height), truth_masks(image, classes),
                       overlap=mask_iou)
    truth = [(tuple(b), classes[label - 1]) for b, label in zip(image.boxes, image.labels)]
    return quality(predicted_boxes(result, image.width, image.height), truth)


def predicted_boxes(result: list[dict], width: int, height: int) -> list[tuple]:
    """(box in pixels, label, score) for each rectangle of a Label Studio prediction result."""
    out = []
    for region in result or []:
        value = region.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if not labels:
            continue
        box = box_to_pixels((value["x"], value["y"], value["width"], value["height"]), width, height)
        out.append((box, labels[0], float(region.get("score", 0.0) or 0.0)))
    return out


class Simulation:
    def __init__(self, config: SimulationConfig, ls: LabelStudioAPI, ml_url: str, out_dir: Path,
                 ml_auth: tuple[str, str] | None = None):
        self.config, self.ls, self.ml_url, self.out_dir = config, ls, ml_url.rstrip("/"), Path(out_dir)
        self.ml = requests.Session()
        if ml_auth:
            self.ml.auth = ml_auth
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def setup(self) -> None:
        classes, images = load_coco(self.config.data)
        chosen = [im for im in images if not self.config.split or im.split == self.config.split][: self.config.images]
        if not chosen:
            raise ValueError(f"no images of split {self.config.split!r} in {self.config.data}")
        if self.config.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.config.kind!r}")
        if self.config.kind == "polygons" and not any(im.has_polygons for im in chosen):
            raise ValueError(f"no polygon segmentations in {self.config.data}: simulate it with kind 'boxes'")
        self.classes, self.images = classes, chosen
        self.project = self.ls.create_project(self.config.title, label_config(classes, self.config.kind))
        tasks = self.ls.import_images(self.project["id"], [(im.path.name, im.path.read_bytes()) for im in chosen])
        by_name = {}
        for task in tasks:
            by_name[str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[-1]] = task
        self.tasks = [by_name[im.path.name] for im in chosen]
        auth = {}
        if self.ml.auth:  # Label Studio sends Basic auth on its ML calls when the connection says so
            auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": self.ml.auth[0], "basic_auth_pass": self.ml.auth[1]}
        self.ml_backend = self.ls.connect_ml(self.project["id"], self.ml_url, **auth)
        self.ls.update_project(self.project["id"], start_training_on_annotation_update=True)
        log.info("project %s: %d tasks, ML backend %s connected", self.project["id"], len(self.tasks), self.ml_url)

    def prediction(self, task: dict) -> dict | None:
        if self.config.via == "backend":
            body = {"tasks": [task], "project": f"{self.project['id']}.{int(time.time())}",
                    "label_config": self.project["label_config"], "params": {"context": None}}
            reply = self.ml.post(self.ml_url + "/predict", json=body, timeout=120)
            reply.raise_for_status()
            results = reply.json().get("results") or []
            return results[0] if results else None
        predictions = self.ls.open_task(task["id"]).get("predictions") or []
        return max(predictions, key=lambda p: p.get("id", 0)) if predictions else None

    def project_status(self) -> dict:
        reply = self.ml.get(self.ml_url + "/status", timeout=10)
        reply.raise_for_status()
        return reply.json()["projects"].get(str(self.project["id"]), {})

    def wait_for_round(self) -> None:
        deadline = time.monotonic() + self.config.wait_timeout
        while time.monotonic() < deadline:
            if self.project_status().get("state", "idle") in ("idle", "error"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"round still running after {self.config.wait_timeout} s")

    def run(self) -> dict:
        self.setup()
        records, start = [], time.monotonic()
        with open(self.out_dir / "simulation.jsonl", "w") as out:
            for n, (image, task) in enumerate(zip(self.images, self.tasks), 1):
                began = time.monotonic()
                prediction = self.prediction(task)
                latency = time.monotonic() - began
                result = (prediction or {}).get("result") or []
                q = score_prediction(result, image, self.classes, self.config.kind)
                self.ls.annotate(task["id"], ground_truth_result(image, self.classes, self.config.kind), lead_time=1.0)
                record = {"n": n, "task": task["id"], "image": image.path.name,
                          "model_version": (prediction or {}).get("model_version"),
                          "task_score": (prediction or {}).get("score"), "regions": len(result),
                          "quality": round(q.score, 4), "counts": asdict(q), "latency_s": round(latency, 3),
                          "t_s": round(time.monotonic() - start, 2), "prediction": result}
                records.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
                log.info("image %d/%d: quality %.3f (%d regions, version %s, %.2f s)", n, len(self.images), q.score,
                         len(result), record["model_version"], latency)
                if self.config.pace is None:
                    self.wait_for_round()
                else:
                    time.sleep(max(0.0, began + self.config.pace - time.monotonic()))
        summary = summarize(records, time.monotonic() - start)
        summary.update(kind=self.config.kind, via=self.config.via, pace=self.config.pace, images=len(records),
                       project=self.project["id"])
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        overlap = "mask IoU" if self.config.kind == "polygons" else "box IoU"
        plot(records, self.out_dir / "quality.png", title=f"{self.config.title} ({overlap}, via {self.config.via})")
        return summary


def summarize(records: list[dict], wall_s: float) -> dict:
    qualities = [r["quality"] for r in records]
    rolling = [statistics.fmean(qualities[max(0, i - ROLLING + 1): i + 1]) for i in range(len(qualities))]

    def first(predicate):
        return next((r["n"] for r, roll in zip(records, rolling) if predicate(r, roll)), None)

    late = qualities[50:100]
    return {
        "first_prediction_at": first(lambda r, _: r["regions"] > 0),
        "rolling_0.5_at": first(lambda r, roll: r["n"] >= ROLLING and roll >= 0.5),
        "rolling_0.7_at": first(lambda r, roll: r["n"] >= ROLLING and roll >= 0.7),
        "quality_51_100": round(statistics.fmean(late), 4) if late else None,
        "quality_all": round(statistics.fmean(qualities), 4) if qualities else None,
        "versions_seen": len({r["model_version"] for r in records if r["model_version"]}),
        "median_latency_s": round(statistics.median(r["latency_s"] for r in records), 3) if records else None,
        "wall_s": round(wall_s, 1),
        "wall_s_per_image": round(wall_s / len(records), 2) if records else None,
    }


def plot(records: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the JSON log has every number
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    n = [r["n"] for r in records]
    q = [r["quality"] for r in records]
    rolling = [statistics.fmean(q[max(0, i - ROLLING + 1): i + 1]) for i in range(len(q))]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(n, q, ".", alpha=0.4, label="per image")
    ax.plot(n, rolling, "-", label=f"rolling mean ({ROLLING} images)")
    ax.set(xlabel="images labeled", ylabel="model quality score", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
