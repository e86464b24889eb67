"""Export a published version as a self-contained artifact: TorchScript or ONNX, labels, config, README.

    model.torchscript.pt | model.onnx   the detector, wrapped to take one uint8 H x W x 3 RGB image
    labels.json                         index -> Label Studio label name (index 0 is the background)
    config.json                         arch, task kind, input size, thresholds, version, its meta summary
    README.md                           how to run it, with an example that runs as written

The wrapped model (``ExportedBoxes`` / ``ExportedMasks``) is the whole torchvision detector, its resize and
normalisation included, with the same candidate floor the backend serves with (scores >= 0.05); it returns
plain tensors: ``boxes`` (N x 4, x1 y1 x2 y2 in input pixels), ``labels`` (N, int64, index into labels.json),
``scores`` (N, sorted high to low) and, for a Mask R-CNN, ``masks`` (N x 1 x H x W probabilities). The score
threshold and the detection limit are applied by the caller (config.json holds the backend's values).

TorchScript is ``torch.jit.script`` of the wrapper (any image size). ONNX is ``torch.onnx.export`` with the
TorchScript-based exporter (``dynamo=False``, opset ``ONNX_OPSET``), torchvision's documented path for its
detectors, with dynamic height and width. Only the parts that torch cannot script as trained are swapped for
equivalent ones first (see ``scriptable``); the version's own files are never touched.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from backend import __version__
from backend.errors import BadRequest, LivetrainError, NotFound
from backend.model_store.layers import FrozenBatchNormAct2d
from backend.model_store.lite0 import Lite0FPNBackbone
from backend.model_store.models import model_from_version, version_task
from backend.model_store.stores import version_store
from backend.model_store.versions import VersionStore

FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
ONNX_OPSET = 17
MASK_THRESHOLD = 0.5
SCORE_FLOOR = 0.05  # the candidates the exported model returns: the floor /predict serves with (RAW_SCORE_FLOOR)
OUTPUTS = {"boxes": ["boxes", "labels", "scores"], "masks": ["boxes", "labels", "scores", "masks"]}
META_SUMMARY = ("name", "parent", "arch", "task", "classes", "images", "new_images", "annotations", "mode", "steps",
                "losses", "quality", "duration_s", "published_at")
_LOCK = threading.Lock()  # one export at a time per process: tracing and scripting are heavy and global-ish


class _ScriptableLite0Backbone(nn.Module):
    """``Lite0FPNBackbone`` with a forward TorchScript accepts (same modules, same computation)."""

    def __init__(self, backbone: Lite0FPNBackbone):
        super().__init__()
        self.body, self.fpn, self.out_channels = backbone.body, backbone.fpn, backbone.out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats: List[torch.Tensor] = self.body(x)
        levels: Dict[str, torch.Tensor] = OrderedDict()
        for i, f in enumerate(feats):
            levels[str(i)] = f
        return self.fpn(levels)


def _plain_batchnorm(module: nn.Module) -> None:
    """Replace each ``FrozenBatchNormAct2d`` (whose ``super().forward`` TorchScript rejects) by the same frozen BN
    followed by its dropout and activation, in place."""
    for name, child in module.named_children():
        if isinstance(child, FrozenBatchNormAct2d):
            bn = FrozenBatchNorm2d(child.weight.numel(), eps=child.eps)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, attr).copy_(getattr(child, attr))
            setattr(module, name, nn.Sequential(bn, child.drop, child.act))
        else:
            _plain_batchnorm(child)


def scriptable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) that TorchScript and the ONNX exporter accept, computing the same."""
    model = copy.deepcopy(model).cpu().eval()
    if isinstance(model.backbone, Lite0FPNBackbone):
        model.backbone = _ScriptableLite0Backbone(model.backbone)
    _plain_batchnorm(model)
    return model


class ExportedBoxes(nn.Module):
    """One uint8 H x W x 3 RGB image -> (boxes N x 4 in its pixels, labels N, scores N), scores high to low."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def detect(self, image: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        x = image.permute(2, 0, 1).to(torch.float32) / 255.0
        size = (x.shape[-2], x.shape[-1])
        images, _ = self.detector.transform([x])
        features = self.detector.backbone(images.tensors)
        proposals, _ = self.detector.rpn(images, features)
        detections, _ = self.detector.roi_heads(features, proposals, images.image_sizes)
        return self.detector.transform.postprocess(detections, images.image_sizes, [size])

    def forward(self, image: torch.Tensor):
        det = self.detect(image)[0]
        return det["boxes"], det["labels"], det["scores"]


class ExportedMasks(ExportedBoxes):
    """As ``ExportedBoxes``, plus masks: N x 1 x H x W probabilities over the whole input image."""

    def forward(self, image: torch.Tensor):
        det = self.detect(image)[0]
        return det["boxes"], det["labels"], det["scores"], det["masks"]


def wrap(model: nn.Module, task: str, score_floor: float = SCORE_FLOOR) -> ExportedBoxes:
    detector = scriptable(model)
    detector.roi_heads.score_thresh = score_floor
    return (ExportedMasks if task == "masks" else ExportedBoxes)(detector).eval()


def save_torchscript(wrapper: ExportedBoxes, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 marks TorchScript deprecated; it still works
        torch.jit.script(wrapper).save(str(path))


def save_onnx(wrapper: ExportedBoxes, path: Path, sample: torch.Tensor, task: str) -> None:
    if importlib.util.find_spec("onnx") is None:
        raise LivetrainError("ONNX export needs the onnx package: pip install 'livetrain[onnx]'")
    names = OUTPUTS[task]
    axes = {"image": {0: "height", 1: "width"}, **{n: {0: "detections"} for n in names}}
    if task == "masks":
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values: torchvision handles them for ONNX
        torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=axes)


def sample_image(min_size: int, max_size: int, seed: int = 0) -> torch.Tensor:
    """A uint8 image to trace with: noise with a few flat rectangles, not square (both sides must vary)."""
    g = torch.Generator().manual_seed(seed)
    h, w = min_size, min(max_size, round(min_size * 4 / 3))
    image = torch.randint(60, 200, (h, w, 3), dtype=torch.uint8, generator=g)
    for k in range(3):
        y, x = h * k // 4, w * k // 4
        image[y : y + h // 4, x : x + w // 4] = torch.tensor([220, 40 + 90 * k, 40], dtype=torch.uint8)
    return image


def resolve_version(model_dir, project: str, version: str | None) -> tuple[VersionStore, str]:
    """The store and the version to export (``None``: the active one); clear 404s otherwise. ``model_dir``:
    the Settings (MODEL_STORE or MODEL_DIR) or a MODEL_DIR path, as ``stores.version_store`` takes."""
    if not str(project).isdigit():
        raise BadRequest(f"invalid project {project!r}: expected a Label Studio project id (digits)")
    store = version_store(model_dir, str(project))
    names = store.names()
    if not names:
        raise NotFound(f"project {project} has no model versions")
    name = version or store.active()
    if name is None:
        raise NotFound(f"project {project} has no active version; pass one of: {', '.join(names)}")
    if name not in names:
        raise NotFound(f"no version {name!r} in project {project} (versions: {', '.join(names)})")
    return store, name


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadRequest(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return fmt


def export_version(model_dir: Path, project: str, version: str | None, fmt: str, out_dir: Path, *,
                   min_size: int = 0, score_threshold: float = 0.5, max_detections: int = 100,
                   score_floor: float = SCORE_FLOOR) -> Path:
    """Write the artifact of ``project``'s ``version`` (default: the active one) into ``out_dir``; returns it.

    ``min_size`` is the backend's MIN_SIZE (0: the architecture's default), ``score_threshold`` and
    ``max_detections`` what /predict applies; they go into config.json and the README's example."""
    check_format(fmt)
    store, name = resolve_version(model_dir, project, version)
    state, meta = store.load(name)
    task = version_task(meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        wrapper = wrap(model_from_version(state, meta, min_size), task, score_floor)
        transform = wrapper.detector.transform
        short, long = int(transform.min_size[-1]), int(transform.max_size)
        started = time.perf_counter()
        if fmt == "torchscript":
            save_torchscript(wrapper, out_dir / FORMATS[fmt])
        else:
            save_onnx(wrapper, out_dir / FORMATS[fmt], sample_image(short, long), task)
    labels = ["__background__", *meta["classes"]]
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1))
    config = {
        "format": fmt, "model_file": FORMATS[fmt], "labels_file": "labels.json", "project": str(project),
        "version": name, "arch": meta["arch"], "task": task, "num_classes": len(labels),
        "input": "one RGB image as uint8 height x width x 3 (any size: the model resizes it itself)",
        "outputs": OUTPUTS[task], "min_size": short, "max_size": long,
        "score_threshold": score_threshold, "max_detections": max_detections, "score_floor": score_floor,
        "mask_threshold": MASK_THRESHOLD if task == "masks" else None,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None, "dynamic_size": True,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "export_seconds": round(time.perf_counter() - started, 2),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "livetrain": __version__,
        "version_meta": {k: meta.get(k) for k in META_SUMMARY if k in meta},
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    (out_dir / "README.md").write_text(readme(config))
    return out_dir


def load_exported(export_dir: Path) -> tuple[dict, list[str], Callable[[np.ndarray], list[np.ndarray]]]:
    """(config, labels, run): ``run(uint8 H x W x 3 array)`` gives the model's outputs as numpy arrays."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    labels = json.loads((export_dir / "labels.json").read_text())
    path = export_dir / config["model_file"]
    if config["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return config, labels, lambda image: session.run(None, {"image": np.ascontiguousarray(image, dtype=np.uint8)})
    model = torch.jit.load(str(path), map_location="cpu").eval()

    def run(image: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in model(torch.from_numpy(np.array(image, dtype=np.uint8)))]

    return config, labels, run


def safe_name(text: str) -> str:
    """A download file name part: letters, digits, dot, dash, underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "export"


_LOAD = {
    "torchscript": ["import torch", "", 'model = torch.jit.load("model.torchscript.pt")',
                    "with torch.no_grad():",
                    "    outputs = model(torch.from_numpy(np.array(image, dtype=np.uint8)))"],
    "onnx": ["import onnxruntime", "", 'session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
             'outputs = session.run(None, {"image": np.array(image, dtype=np.uint8)})'],
}


def example_code(config: dict) -> str:
    """The README's example: runs as written in the export directory, next to an ``image.jpg``."""
    lines = ["import json", "", "import numpy as np", "from PIL import Image", *_LOAD[config["format"]][:1], "",
             'config = json.load(open("config.json"))', 'labels = json.load(open("labels.json"))',
             'image = Image.open("image.jpg").convert("RGB")',
             "# shrink a large image as the backend does (antialiased) before the model resizes it",
             'scale = min(1.0, config["min_size"] / min(image.size), config["max_size"] / max(image.size))',
             "if scale < 1.0:",
             "    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)",
             *_LOAD[config["format"]][2:],
             "boxes, classes, scores = outputs[0] / scale, outputs[1], outputs[2]  # boxes in the original pixels",
             "found = [(labels[k], s, b) for b, k, s in zip(boxes.tolist(), classes.tolist(), scores.tolist())",
             '         if s >= config["score_threshold"]][: config["max_detections"]]',
             "for label, score, (x1, y1, x2, y2) in found:",
             '    print(f"{label} {score:.3f} {x1:.0f} {y1:.0f} {x2:.0f} {y2:.0f}")']
    if config["task"] == "masks":
        lines += ['masks = outputs[3][: len(found), 0] >= config["mask_threshold"]  # bool, at the size given to the model',
                  'print("mask pixels:", [int(m.sum()) for m in masks])']
    return "\n".join(lines) + "\n"


def readme(config: dict) -> str:
    fmt, task = config["format"], config["task"]
    outputs = "`boxes` (N x 4 float, x1 y1 x2 y2 in the input image's pixels), `labels` (N int64, index into " \
              "labels.json), `scores` (N float, high to low)"
    if task == "masks":
        outputs += ", `masks` (N x 1 x H x W float probabilities over the input image; a pixel is in the " \
                   f"object at >= {config['mask_threshold']})"
    runtime = ("TorchScript (`torch.jit.load`; needs torch and torchvision installed for its operators, "
               "no livetrain)" if fmt == "torchscript" else
               f"ONNX opset {config['onnx_opset']} (`onnxruntime.InferenceSession`; torchvision's detector ops "
               "exported as plain ONNX, no custom operators)")
    return f"""# {config['project']} / {config['version']} ({config['arch']}, {task})

Exported by livetrain {config['livetrain']} on {config['created_at']} from Label Studio project {config['project']},
model version `{config['version']}`. Format: {runtime}.

* `{config['model_file']}`: the whole detector, resize and normalisation included. Input `image`: one RGB
  image as a uint8 tensor/array of shape height x width x 3, any size (dynamic height and width: the model
  scales it so that the shorter side is {config['min_size']} px, the longer at most {config['max_size']} px).
* Outputs, in this order: {outputs}. Every candidate with a score of at least {config['score_floor']} is
  returned; the backend shows those with a score >= `score_threshold` ({config['score_threshold']}), at most
  `max_detections` ({config['max_detections']}) per image.
* `labels.json`: index -> Label Studio label name (0 is the background, never predicted).
* `config.json`: architecture, sizes, thresholds, and the version's training summary (`version_meta`).

## Example

Run in this directory, with an `image.jpg` next to it (needs numpy and pillow too):

```python
{example_code(config)}```

Label Studio's prediction of the same image (what /predict returns) has the same regions, within a pixel
and a score difference of about 1e-3 (see `livetrain export --check`). The backend first shrinks an image
larger than {config['max_size']} px with an antialiased resize, as the example does; an image passed whole
gives close but not identical results.
"""


def export_zip(model_dir: Path, project: str, version: str | None, fmt: str, **options) -> tuple[Path, str]:
    """The artifact as a .zip (files at its top level) and a safe file name for it. A version never changes
    once published, so the zip is built once per (version, format, options) under
    ``MODEL_DIR/<project>/exports/`` and served from there (an export takes seconds of CPU); zips of pruned
    versions are removed."""
    import hashlib
    import os
    import tempfile
    import zipfile

    store, name = resolve_version(model_dir, project, version)
    cache = store.root / "exports"
    key = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = cache / f"{name}.{fmt}.{key}.zip"
    filename = f"{safe_name(f'livetrain-{project}-{name}-{fmt}')}.zip"
    if path.is_file():
        return path, filename
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="livetrain-export-") as tmp:
        out = export_version(model_dir, project, name, fmt, Path(tmp), **options)
        fd, partial = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".zip")
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as archive:
                for item in sorted(out.iterdir()):
                    archive.write(item, item.name)
            os.replace(partial, path)  # atomic: a concurrent download sees the whole zip or builds its own
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    known = set(store.names())
    for old in cache.glob("*.zip"):
        if old.name.split(".", 1)[0] not in known:
            old.unlink(missing_ok=True)
    return path, filename
