"""Image embeddings for the label stream's clusters: the pretrained EfficientNet-Lite0 body, pooled.

Why the *pretrained* body and not the project's trained one: Label Studio counts, per prediction ``cluster``, how
many tasks an annotator has labeled (``cluster_num_solved``), so a task's cluster must mean the same thing for the
whole project. The trained body moves with every version (in ``full`` mode), so clusters made from it would drift
from version to version. The ImageNet body never changes: a task is embedded once, by the same forward that gives
its typical-first score (``backend.jobs.stream``), and keeps that embedding; trained versions' re-scoring forwards
only look its cluster up.

An embedding is the global average of the stride-16 (112 channels) and stride-32 (320 channels) feature maps,
each L2-normalised, concatenated and L2-normalised again: 432 numbers, stored as float16 (864 bytes a task).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from backend.model_store.lite0 import IMAGE_MEAN, IMAGE_STD, build_lite0_backbone

EMBED_SIDE = 320  # shorter image side the embedding is computed at (the CPU models' working size)
EMBED_DIM = 112 + 320
MAX_SIDE = 1333  # longer side cap (torchvision's detectors use the same)


class Embedder:
    """Embeds RGB images (PIL) with the ImageNet Lite0 body; built once per process, on first use."""

    def __init__(self, side: int = EMBED_SIDE):
        self.side = side
        self._body = None
        self._lock = threading.Lock()

    def _model(self):
        with self._lock:
            if self._body is None:
                body = build_lite0_backbone(pretrained=True).body.eval()
                for param in body.parameters():
                    param.requires_grad_(False)
                self._body = body
            return self._body

    def tensor(self, image) -> torch.Tensor:
        """1x3xHxW, shorter side ``side`` (the longer at most MAX_SIDE: a 20 x 20000 strip must not become
        320 x 320000), normalised as Lite0 was trained (inputs in [-1, 1])."""
        scale = min(self.side / min(image.width, image.height), MAX_SIDE / max(image.width, image.height))
        size = (max(32, round(image.width * scale)), max(32, round(image.height * scale)))
        array = np.asarray(image.convert("RGB").resize(size), dtype=np.float32) / 255.0
        x = torch.from_numpy(array).permute(2, 0, 1)[None]
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def embed(self, images: list) -> np.ndarray:
        """N x EMBED_DIM float32, each row of unit length; images of any size (one forward each)."""
        body = self._model()
        rows = []
        for image in images:
            feats = body(self.tensor(image))
            pooled = [F.normalize(f.mean(dim=(2, 3)), dim=1) for f in feats[-2:]]
            rows.append(F.normalize(torch.cat(pooled, dim=1), dim=1)[0].numpy())
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, EMBED_DIM), np.float32)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float16).tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
