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
- ``brush``: a BrushLabels config (Mask R-CNN); the ground truth is one brush RLE per object (all its rings
  painted as one region, as a person paints an object), scored with mask IoU as for polygons.

After the last image the simulator waits for the project's training session to end, so that the active
version is the session's final one; ``compare_with_offline`` then scores it against the same network
trained offline (``backend.simulation.offline``).

Writes ``simulation.jsonl`` (one record per image), ``summary.json`` and ``quality.png`` (with a previous
run's rolling mean as a dashed line, given ``compare_with``).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from backend.simulation.ls_api import LabelStudioAPI
from backend.simulation.picks import next_pick, staleness_summary
from backend.simulation.truth import KINDS, MASK_KINDS, ground_truth_result, label_config, score_prediction
from backend.training.coco import load_coco

log = logging.getLogger(__name__)

ROLLING = 10  # images in the rolling quality window


@dataclass
class SimulationConfig:
    data: Path
    images: int = 100
    split: str = "train"
    via: str = "label-studio"  # or "backend"
    kind: str = "boxes"  # or "polygons" or "brush" (see the module doc)
    pace: float | None = 10.0  # seconds per image; None: wait for the triggered round to finish
    title: str = "livetrain simulation"
    wait_timeout: float = 900.0
    session_timeout: float = 900.0  # after the last image: how long the training session may take to end (0: no wait)
    compare_with: Path | None = None  # a previous run's simulation.jsonl, drawn dashed in the plot
    compare_label: str = "before"
    order: str = "sequential"  # or "next": label what Label Studio's /next/ serves (the label stream)
    pool: int = 0  # tasks imported (at least ``images``); 0 = ``images``


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
        size = max(self.config.images, self.config.pool)
        chosen = [im for im in images if not self.config.split or im.split == self.config.split][:size]
        if self.config.order not in ("sequential", "next"):
            raise ValueError(f"order must be sequential or next, got {self.config.order!r}")
        if not chosen:
            raise ValueError(f"no images of split {self.config.split!r} in {self.config.data}")
        if self.config.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.config.kind!r}")
        if self.config.kind in MASK_KINDS and not any(im.has_polygons for im in chosen):
            raise ValueError(f"no polygon segmentations in {self.config.data}: simulate it with kind 'boxes'")
        self.classes = classes
        self.project = self.ls.create_project(self.config.title, label_config(classes, self.config.kind))
        tasks = self.ls.import_images(self.project["id"], [(im.path.name, im.path.read_bytes()) for im in chosen])
        by_name = {}
        for task in tasks:
            by_name[str(task["data"]["image"]).rsplit("/", 1)[-1].split("-", 1)[-1]] = task
        self.pool_tasks = [by_name[im.path.name] for im in chosen]
        self.image_of = {task["id"]: image for image, task in zip(chosen, self.pool_tasks)}
        self.images, self.tasks = [], []  # what was labeled, in order (``run`` fills them)
        auth = {}
        if self.ml.auth:  # Label Studio sends Basic auth on its ML calls when the connection says so
            auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": self.ml.auth[0], "basic_auth_pass": self.ml.auth[1]}
        self.ml_backend = self.ls.connect_ml(self.project["id"], self.ml_url, **auth)
        self.ls.update_project(self.project["id"], start_training_on_annotation_update=True)
        log.info("project %s: %d tasks, ML backend %s connected", self.project["id"], len(self.pool_tasks), self.ml_url)

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

    def wait_for_session_end(self, settle: float = 30.0) -> float | None:
        """Wait until the project's training session has ended (state idle or error); seconds waited, None
        on timeout. Right after a submit the state may still read idle before the webhook queued a
        session: idle counts only once a busy state was seen, or after ``settle`` seconds of idle."""
        began = time.monotonic()
        busy = False
        while time.monotonic() - began < self.config.session_timeout:
            try:
                state = self.project_status().get("state", "idle")
            except requests.RequestException as exc:  # a busy backend may miss one poll
                log.info("GET /status failed (%s); polling on", exc)
                state = "unknown"
            if state not in ("idle", "error", "unknown"):
                busy = True
            elif state != "unknown" and (busy or time.monotonic() - began >= settle):
                return round(time.monotonic() - began, 1)
            time.sleep(1.0)
        log.warning("the training session still runs after %.0f s; going on with the version active now",
                    self.config.session_timeout)
        return None

    def wait_for_round(self) -> None:
        deadline = time.monotonic() + self.config.wait_timeout
        while time.monotonic() < deadline:
            if self.project_status().get("state", "idle") in ("idle", "error"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"round still running after {self.config.wait_timeout} s")

    def run(self) -> dict:
        # read first: a missing file should fail now, not after an hour of labeling
        previous = read_records(self.config.compare_with) if self.config.compare_with else None
        self.setup()
        records, start = [], time.monotonic()
        with open(self.out_dir / "simulation.jsonl", "w") as out:
            for n in range(1, self.config.images + 1):
                began = time.monotonic()
                task, staleness = self.pick(n)
                image = self.image_of[task["id"]]
                self.images.append(image)
                self.tasks.append(task)
                prediction = self.prediction(task)
                latency = time.monotonic() - began
                result = (prediction or {}).get("result") or []
                q = score_prediction(result, image, self.classes, self.config.kind)
                self.ls.annotate(task["id"], ground_truth_result(image, self.classes, self.config.kind), lead_time=1.0)
                record = {"n": n, "task": task["id"], "image": image.path.name,
                          "model_version": (prediction or {}).get("model_version"),
                          "task_score": (prediction or {}).get("score"), "regions": len(result),
                          "quality": round(q.score, 4), "counts": asdict(q), "latency_s": round(latency, 3),
                          "t_s": round(time.monotonic() - start, 2), **staleness, "prediction": result}
                records.append(record)
                out.write(json.dumps(record) + "\n")
                out.flush()
                log.info("image %d/%d: quality %.3f (%d regions, version %s, %.2f s)", n, self.config.images, q.score,
                         len(result), record["model_version"], latency)
                if self.config.pace is None:
                    self.wait_for_round()
                else:
                    time.sleep(max(0.0, began + self.config.pace - time.monotonic()))
        wall_s = time.monotonic() - start
        session_end_s = None
        if self.config.session_timeout > 0:
            log.info("all %d images labeled; waiting for the training session to end", len(records))
            session_end_s = self.wait_for_session_end()
        summary = summarize(records, wall_s)
        summary.update(kind=self.config.kind, via=self.config.via, pace=self.config.pace, images=len(records),
                       project=self.project["id"], session_end_s=session_end_s, order=self.config.order,
                       pool=len(self.pool_tasks), **staleness_summary(records))
        if previous is not None:
            summary["compare_with"] = {"path": str(self.config.compare_with), "label": self.config.compare_label,
                                       **{k: v for k, v in summarize(previous, 0.0).items() if k in COMPARED}}
        self.summary = summary
        self.write_summary()
        overlap = "mask IoU" if self.config.kind in MASK_KINDS else "box IoU"
        plot(records, self.out_dir / "quality.png", title=f"{self.config.title} ({overlap}, via {self.config.via})",
             previous=previous, previous_label=self.config.compare_label)
        return summary

    def pick(self, n: int) -> tuple[dict, dict]:
        """The n-th task to label: the next in dataset order, or (``order="next"``) what Label Studio's /next/
        serves, with how stale the stream's scores were (``backend.simulation.picks``)."""
        if self.config.order == "sequential":
            return self.pool_tasks[n - 1], {}
        return next_pick(self.ls, self.ml, self.ml_url, self.project["id"])

    def write_summary(self) -> None:
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))

    def compare_with_offline(self, model_dir: Path | None, settings, test_split: str = "test", test_images: int = 0,
                             offline: bool = True, torch_home: Path | None = None, seed: int = 0) -> dict:
        """Add ``live_vs_offline`` to the summary (and summary.json): see ``backend.simulation.offline``.
        ``settings``: the backend's; ``model_dir``: its MODEL_DIR (None: skipped, the versions are out of
        reach)."""
        from backend.simulation.offline import live_vs_offline

        if model_dir is None:
            reason = "no model dir: give --model-dir (the MODEL_DIR of the backend at --ml-url)"
            log.warning("live vs offline comparison skipped: %s", reason)
            report = {"skipped": reason}
        else:
            classes, images = load_coco(self.config.data)
            test = [im for im in images if im.split == test_split]
            test = test[:test_images] if test_images > 0 else test
            annotated = {task["id"]: image for image, task in zip(self.images, self.tasks)}
            report = live_vs_offline(model_dir, self.project["id"], settings, annotated, classes, test,
                                     offline=offline, seed=seed, backend_torch_home=torch_home,
                                     per_ring=self.config.kind != "brush")
            if "skipped" not in report:
                report["test_split"] = test_split
        self.summary["live_vs_offline"] = report
        self.write_summary()
        return self.summary


def summarize(records: list[dict], wall_s: float) -> dict:
    qualities = [r["quality"] for r in records]
    rolling = rolling_mean(qualities)

    def first(predicate):
        return next((r["n"] for r, roll in zip(records, rolling) if predicate(r, roll)), None)

    late = qualities[50:100]
    middle = qualities[30:60] if len(qualities) >= 60 else []  # only a whole window compares between runs
    return {
        "first_prediction_at": first(lambda r, _: r["regions"] > 0),
        "rolling_0.5_at": first(lambda r, roll: r["n"] >= ROLLING and roll >= 0.5),
        "rolling_0.7_at": first(lambda r, roll: r["n"] >= ROLLING and roll >= 0.7),
        "quality_31_60": round(statistics.fmean(middle), 4) if middle else None,
        "quality_51_100": round(statistics.fmean(late), 4) if late else None,
        "quality_all": round(statistics.fmean(qualities), 4) if qualities else None,
        "versions_seen": len({r["model_version"] for r in records if r["model_version"]}),
        "median_latency_s": round(statistics.median(r["latency_s"] for r in records), 3) if records else None,
        "wall_s": round(wall_s, 1),
        "wall_s_per_image": round(wall_s / len(records), 2) if records else None,
    }


COMPARED = ("rolling_0.5_at", "rolling_0.7_at", "quality_31_60", "quality_51_100", "quality_all")  # of compare_with


def read_records(path: Path) -> list[dict]:
    """The records of a previous run's simulation.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rolling_mean(qualities: list[float]) -> list[float]:
    return [statistics.fmean(qualities[max(0, i - ROLLING + 1): i + 1]) for i in range(len(qualities))]


def plot(records: list[dict], path: Path, title: str, previous: list[dict] | None = None,
         previous_label: str = "before") -> None:
    """Per-image quality and its rolling mean; ``previous`` (another run's records): its rolling mean over the
    same number of images, dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the JSON log has every number
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    n = [r["n"] for r in records]
    q = [r["quality"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(n, q, ".", alpha=0.4, label="per image")
    ax.plot(n, rolling_mean(q), "-", label=f"rolling mean ({ROLLING} images)")
    previous = [r for r in previous or () if r["n"] <= max(n, default=0)]  # over this run's images only
    if previous:
        ax.plot([r["n"] for r in previous], rolling_mean([r["quality"] for r in previous]), "--", color="gray",
                label=f"{previous_label}: rolling mean")
    ax.set(xlabel="images labeled", ylabel="model quality score", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
