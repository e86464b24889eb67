"""Starting-weights policy: local file (sha256-checked), torchvision cache (sha256-checked), random."""

import hashlib

import pytest
import torch

from backend.errors import WeightsError
from backend.model_store.architectures import build_detector
from backend.model_store.weights import resolve_starting_weights

ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def coco_shaped_file(tmp_path_factory):
    """A detector state dict with torchvision's COCO head shape (91 classes), as a file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "detector.pth"
    torch.save(build_detector(ARCH, 91).state_dict(), path)
    return path


def test_local_file_with_hash(coco_shaped_file):
    sha = hashlib.sha256(coco_shaped_file.read_bytes()).hexdigest()
    weights = resolve_starting_weights(ARCH, str(coco_shaped_file), sha)
    assert weights.source == "file" and weights.pretrained and weights.categories[1] == "person"
    model = weights.build(num_classes=3)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    # the backbone really carries the file's weights
    expected = torch.load(coco_shaped_file, weights_only=True)["backbone.fpn.layer_blocks.0.0.weight"]
    assert torch.equal(model.state_dict()["backbone.fpn.layer_blocks.0.0.weight"], expected)


def test_local_file_with_wrong_hash_is_refused(coco_shaped_file):
    with pytest.raises(WeightsError, match="sha256"):
        resolve_starting_weights(ARCH, str(coco_shaped_file), "0" * 64)


def test_local_file_for_another_architecture_is_refused(coco_shaped_file):
    with pytest.raises(WeightsError, match="do not fit"):
        resolve_starting_weights("fasterrcnn_resnet50_fpn_v2", str(coco_shaped_file))


def test_missing_or_garbage_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_starting_weights(ARCH, str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not read"):
        resolve_starting_weights(ARCH, str(junk))


def test_cached_torchvision_file_with_wrong_hash_falls_back_to_random(tmp_path, monkeypatch, coco_shaped_file):
    # torchvision itself would load any file with the right name from its cache; we check the full sha256
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth").write_bytes(coco_shaped_file.read_bytes())
    weights = resolve_starting_weights(ARCH, download=False)
    assert weights.source == "random" and not weights.pretrained
    assert "sha256" in weights.detail and "random init" in weights.warnings[0]


def test_no_weights_anywhere_is_random_with_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = resolve_starting_weights(ARCH, download=False)
    assert weights.source == "random" and "DOWNLOAD_WEIGHTS is off" in weights.detail
    assert weights.build(num_classes=4).roi_heads.box_predictor.cls_score.out_features == 4


def test_mask_projects_get_their_own_starting_weights(tmp_path):
    """MASK_ARCH=auto: the offline Lite0 Mask R-CNN. A Mask R-CNN WEIGHTS_PATH starts mask projects and is
    passed over (the log says why) for box projects; a COCO ResNet-50 Mask R-CNN with no file falls back to
    random init with a hint."""
    masks = resolve_starting_weights("auto", download=False, task="masks")
    assert (masks.arch, masks.source, masks.task) == ("maskrcnn_lite0_slim", "imagenet-lite0", "masks")
    path = tmp_path / "my-mask-model.pth"
    torch.save(build_detector("maskrcnn_lite0_fpn", 4).state_dict(), path)
    from_file = resolve_starting_weights("maskrcnn_lite0_fpn", str(path), download=False, task="masks")
    assert from_file.source == "file" and len(from_file.categories) == 4
    assert from_file.build(3).roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    boxes = resolve_starting_weights("auto", str(path), download=False, task="boxes")
    assert (boxes.arch, boxes.source) == ("fasterrcnn_lite0_fpn128", "imagenet-lite0")  # the file was passed over
    coco = resolve_starting_weights("maskrcnn_resnet50_fpn_v2", download=False, task="masks")
    assert coco.source == "random" and "maskrcnn_lite0_slim" in coco.warnings[0]
    with pytest.raises(ValueError, match="boxes architecture"):
        resolve_starting_weights("fasterrcnn_lite0_fpn", task="masks")


@pytest.mark.parametrize("arch,task", [("fasterrcnn_lite0_slim", "boxes"), ("maskrcnn_lite0_slim", "masks"),
                                       ("maskrcnn_lite0_fpn128", "masks")])
def test_slim_lite0_starts_from_the_offline_imagenet_body(arch, task):
    weights = resolve_starting_weights(arch, download=False, task=task)
    assert (weights.arch, weights.source) == (arch, "imagenet-lite0") and not weights.warnings
