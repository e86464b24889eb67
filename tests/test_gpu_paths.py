"""The CUDA paths, exercised on a CPU-only machine: device choice, mixed precision (AMP) in a training step,
no CUDA call before a fork, files written on a GPU worker served by a CPU web process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from backend.inference.predictor import ModelPool
from backend.model_store.models import pick_device
from backend.model_store.versions import VersionStore
from backend.settings import Settings
from backend.training.engine import amp_scaler, train_step

ROOT = Path(__file__).resolve().parents[1]


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda") == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_device_settings():
    assert Settings().amp is True and Settings.from_env({"AMP": "false"}).amp is False
    assert Settings(device="cuda").serving_device == "cuda"  # PREDICT_DEVICE empty: the web follows DEVICE
    assert Settings(device="cuda", predict_device="cpu").serving_device == "cpu"
    with pytest.raises(ValueError, match="PREDICT_DEVICE"):
        Settings.from_env({"PREDICT_DEVICE": "gpu"})


def test_the_web_pool_decides_its_device_at_the_first_load_not_in_the_app_factory(tmp_path, monkeypatch):
    from backend.api import create_app

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or False)
    app = create_app(Settings(model_dir=tmp_path, download_weights=False, label_studio_url="", device="auto"))
    pool = app.extensions["livetrain"].predictor.pool
    assert asked == [] and pool.capacity == 8
    assert pool.device == torch.device("cpu") and asked == [1]  # resolved once, when first needed
    assert pool.device == torch.device("cpu") and asked == [1]
    # DEVICE=cuda for the workers, PREDICT_DEVICE=cpu for the web: the web never asks CUDA anything
    pool = ModelPool(lambda task: None, tmp_path, Settings(device="cuda", predict_device="cpu").serving_device)
    assert pool.device == torch.device("cpu") and asked == [1]


class Toy(nn.Module):
    """torchvision's detection training interface (images, targets -> loss dict) on a two-layer net."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, images, targets):
        x = torch.stack([image.mean(dim=(1, 2)) for image in images])
        y = torch.stack([t["value"] for t in targets])
        return {"loss_a": ((self.net(x).squeeze(1) - y) ** 2).mean(), "loss_b": self.net[0].weight.abs().mean()}


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 8, 8, generator=g) for _ in range(2)], [{"value": torch.rand((), generator=g)} for _ in range(2)]


def steps(scaler, n: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(n):
        losses = train_step(model, optimizer, *batch(i), torch.device("cpu"), clip_grad=0.5, scaler=scaler)
        assert set(losses) == {"loss_a", "loss_b", "loss"} and all(isinstance(v, float) for v in losses.values())
    return model


def test_amp_is_only_enabled_on_cuda_and_off_means_plain_float32():
    assert not amp_scaler(torch.device("cpu"), True).is_enabled()  # AMP on, CPU: plain float32
    assert not amp_scaler(torch.device("cuda"), False).is_enabled()  # AMP=false on a GPU
    plain, disabled = steps(None), steps(amp_scaler(torch.device("cpu"), True))
    for a, b in zip(plain.parameters(), disabled.parameters()):
        assert torch.equal(a, b)


def test_the_scaled_step_autocasts_unscales_before_clipping_and_steps(monkeypatch):
    """The GradScaler branch of train_step, run with a CPU GradScaler (a CUDA one needs a GPU): the forward
    enters float16 autocast for CUDA, and since the gradients are unscaled before clipping, the parameters
    end where plain float32 steps put them (the scale is a power of two: exact)."""
    entered = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kw):
        entered.append((device_type, dtype, enabled))
        return real_autocast("cpu", enabled=False)  # no float16 on this CPU; the flags are what is checked

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = steps(scaler)
    assert entered == [("cuda", torch.float16, True)] * 3 and scaler.get_scale() == 2.0**16  # no overflow: kept
    entered.clear()
    plain = steps(None)
    assert entered == [("cuda", torch.float16, False)] * 3
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b)


def test_a_version_saved_on_a_gpu_worker_is_served_on_cpu(tmp_path, monkeypatch, image_server):
    """Files written by a CUDA worker carry cuda storage tags; web processes (maybe CPU only) load them with
    map_location='cpu'. Simulated by tagging every storage 'cuda:0' while saving."""
    from backend.api import create_app
    from tests.livetrain_fixtures import CONFIG, shapes_image

    app = create_app(Settings(model_dir=tmp_path, download_weights=False, label_studio_url="", min_size=128,
                              predict_device="cpu", score_threshold=0.0, image_url_allowlist="127.0.0.1"))
    starting = app.extensions["livetrain"].starting
    torch.manual_seed(0)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        name = VersionStore(tmp_path, "7").publish(starting.build(3).state_dict(),
                                                   {"arch": starting.arch, "classes": ["Square", "Disc"]}, "gpu")
    saved = VersionStore(tmp_path, "7").versions_dir / name / "model.pt"
    if not torch.cuda.is_available():  # the tags are real: without map_location the load wants a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(saved, weights_only=True)
    state, _ = VersionStore(tmp_path, "7").load(name)
    assert {t.device.type for t in state.values()} == {"cpu"}
    url = image_server.add("/a.png", shapes_image(0)[0])
    reply = app.test_client().post("/predict", json={"tasks": [{"id": 1, "data": {"image": url}}],
                                                     "project": "7.1", "label_config": CONFIG})
    assert reply.get_json()["results"][0]["model_version"] == name


FORK_CHECK = textwrap.dedent('''
    import json, os, sys, torch
    calls = []
    def recorder(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call
    # every way into CUDA: the availability check (cuInit), the device count, torch's lazy init
    for owner, name in ((torch._C, "_cuda_getDeviceCount"), (torch._C, "_cuda_init"), (torch.cuda, "is_available"),
                        (torch.cuda, "device_count"), (torch.cuda, "_lazy_init")):
        if hasattr(owner, name):
            setattr(owner, name, recorder(name, getattr(owner, name)))
    from backend.api import create_app
    from backend.jobs import workers
    from backend.settings import Settings
    settings = Settings.from_env(device="auto")
    create_app(settings)
    after_app = list(calls)
    # the parent's code path up to its first fork; then the worker stops as on SIGTERM (else run_worker's
    # supervisor would start it again)
    workers.LivetrainWorker.work = lambda self, **kw: setattr(workers.LivetrainWorker, "stop_requested_by_signal", True)
    workers.run_worker(settings, queue="training")
    print(json.dumps({"after_app": after_app, "after_worker": calls, "initialized": torch.cuda.is_initialized()}))
''')


def test_nothing_asks_cuda_before_a_fork(tmp_path):
    """The app factory (gunicorn forks after it with --preload) and the RQ worker's parent (it forks a work
    horse per job) make no CUDA call at all, not even is_available(); a fresh interpreter, so that imports
    count too."""
    env = dict(os.environ, MODEL_DIR=str(tmp_path), REDIS_URL="", DOWNLOAD_WEIGHTS="false", LABEL_STUDIO_URL="",
               TORCH_HOME=str(tmp_path / "torch"), LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", FORK_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"after_app": [], "after_worker": [], "initialized": False}, report
