"""Replay a COCO dataset as an annotation session (``livetrain simulate``).

For each image, in dataset order: fetch the pre-label the annotator would be shown, score it against the
ground truth with the model quality score (``backend.metrics.quality``), then submit the ground truth as
the annotation, and go on at a fixed pace or once the round it triggered has finished. Annotations always
go into Label Studio (the source of truth the worker trains from); the pre-label comes either

- ``via="label-studio"``: as the labeling UI gets it: the task is opened (``GET /api/tasks/<id>/``), Label
  Studio calls ``/predict`` if the task has no prediction of the project's model version and stores it,
  and the newest stored prediction is what the person sees; or
- ``via="backend"``: straight from our ``POST /predict``, with the payload Label Studio would send.

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
from backend.labelstudio.convert import box_to_region
from backend.labelstudio.label_config import parse_label_config
from backend.metrics.quality import quality
from backend.simulation.ls_api import LabelStudioAPI
from backend.training.coco import CocoImage, load_coco

log = logging.getLogger(__name__)

ROLLING = 10  # images in the rolling quality window


@dataclass
class SimulationConfig:
    data: Path
    images: int = 100
    split: str = "train"
    via: str = "label-studio"  # or "backend"
    pace: float | None = 10.0  # seconds per image; None: wait for the triggered round to finish
    title: str = "livetrain simulation"
    wait_timeout: float = 900.0


def label_config(classes: list[str]) -> str:
    labels = "\n".join(f'    <Label value="{c}"/>' for c in classes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <RectangleLabels name="label" toName="image">\n'
            f'{labels}\n  </RectangleLabels>\n</View>')


@lru_cache(maxsize=8)
def _control(classes: tuple[str, ...]):
    return parse_label_config(label_config(list(classes))).primary


def ground_truth_result(image: CocoImage, classes: list[str]) -> list[dict]:
    """The image's boxes as Label Studio rectangle results (percent of the image), as a person draws them."""
    control = _control(tuple(classes))
    out = []
    for box, label in zip(image.boxes, image.labels):
        region = box_to_region(box, classes[label - 1], 1.0, image.width, image.height, control)
        if region:
            region.pop("score")  # an annotation, not a prediction
            out.append(region)
    return out


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
        self.classes, self.images = classes, chosen
        self.project = self.ls.create_project(self.config.title, label_config(classes))
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
                truth = [(tuple(b), self.classes[label - 1]) for b, label in zip(image.boxes, image.labels)]
                q = quality(predicted_boxes(result, image.width, image.height), truth)
                self.ls.annotate(task["id"], ground_truth_result(image, self.classes), lead_time=1.0)
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
        summary.update(via=self.config.via, pace=self.config.pace, images=len(records), project=self.project["id"])
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(records, self.out_dir / "quality.png", title=f"{self.config.title} (via {self.config.via})")
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
