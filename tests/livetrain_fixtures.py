"""Pieces of the live-training tests: generated shape images, a Label Studio double, a real worker process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Square" background="red"/>
    <Label value="Disc" background="blue"/>
  </RectangleLabels>
</View>"""

COLORS = {"Square": (220, 40, 40), "Disc": (40, 60, 230)}


def shapes_image(seed: int, width: int = 160, height: int = 120, count: int | None = None):
    """Coloured squares and discs on noise. Returns (PNG bytes, [(x1, y1, x2, y2, label), ...])."""
    rng = np.random.default_rng(seed)
    array = rng.integers(90, 170, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(count or int(rng.integers(1, 4))):
        for _attempt in range(20):
            size = int(rng.integers(24, 44))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            box = (x, y, x + size, y + size)
            if all(box[2] <= o[0] or o[2] <= box[0] or box[3] <= o[1] or o[3] <= box[1] for o in objects):
                break
        label = "Square" if rng.random() < 0.5 else "Disc"
        (draw.rectangle if label == "Square" else draw.ellipse)(box, fill=COLORS[label])
        objects.append((*box, label))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), objects


def regions(fake, objects, width: int = 160, height: int = 120) -> list[dict]:
    """Label Studio rectanglelabels regions (percent units) for pixel boxes."""
    return [fake.rect(100 * x1 / width, 100 * y1 / height, 100 * (x2 - x1) / width, 100 * (y2 - y1) / height,
                      label, ow=width, oh=height) for x1, y1, x2, y2, label in objects]


def live_env(tmp_path: Path, title: str = "Shapes"):
    """A Label Studio double with one project, Settings for a worker on an embedded Redis under
    ``tmp_path``, and the Flask app on them: (fake, project id, settings, app)."""
    from backend.api import create_app
    from backend.jobs.connection import redis_url_for
    from backend.settings import Settings
    from tests.fake_label_studio import FakeLabelStudio

    fake = FakeLabelStudio()
    project = fake.add_project(CONFIG, title=title)
    settings = Settings.from_env(worker_env(tmp_path, "", fake.url, fake.token))
    settings = Settings.from_env(worker_env(tmp_path, redis_url_for(settings), fake.url, fake.token))
    return fake, project, settings, create_app(settings)


def worker_env(model_dir: Path, redis_url: str, ls_url: str, token: str, **extra) -> dict:
    env = dict(os.environ, MODEL_DIR=str(model_dir), REDIS_URL=redis_url, LABEL_STUDIO_URL=ls_url,
               LABEL_STUDIO_API_KEY=token, DOWNLOAD_WEIGHTS="false", MIN_SIZE="128", PUBLISH_INTERVAL="1", IDLE_AFTER="1", MIN_PASSES="2",
               DECAY_STEPS="3", WARMUP_STEPS="2",
               BATCH_SIZE="2", MIN_ANNOTATIONS="3", LOCK_TTL="4", CHECKPOINT_EVERY="2", LOG_LEVEL="INFO",
               TORCH_HOME=str(model_dir / "torch"),
               IMAGE_URL_ALLOWLIST="127.0.0.1")  # tests serve "third-party" images from 127.0.0.1 too
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    """`livetrain worker` in its own process group (so a test can SIGKILL it and its work horse)."""

    def __init__(self, env: dict, log_path: Path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig=signal.SIGKILL) -> None:
        # The whole tree: the training worker, its re-scoring worker child, their schedulers and RQ work
        # horses (each in a process group of its own). Listed before anything dies (an orphan is re-parented
        # and no longer found); the worker first, so that it cannot start a new child meanwhile.
        def descendants(pid: int) -> list[int]:
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            return [p for child in map(int, out) for p in (child, *descendants(child))]

        tree = descendants(self.proc.pid)
        for pid in [self.proc.pid, *tree]:
            try:
                os.killpg(pid, sig) if pid == self.proc.pid else os.kill(pid, sig)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

        def running(pid: int) -> bool:  # a zombie waiting for its new parent to reap it counts as gone
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while any(running(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


POLYGON_CONFIG = CONFIG.replace("RectangleLabels", "PolygonLabels")
BRUSH_CONFIG = CONFIG.replace("RectangleLabels", "BrushLabels")


def shapes_with_masks(seed: int, width: int = 160, height: int = 120, count: int | None = None):
    """``shapes_image`` plus each object's own mask: (PNG bytes, [(bool mask HxW, label), ...]). Discs are
    drawn as ellipses, so their masks are round, not boxes."""
    png, objects = shapes_image(seed, width, height, count)
    out = []
    for x1, y1, x2, y2, label in objects:
        canvas = Image.new("L", (width, height), 0)
        (ImageDraw.Draw(canvas).rectangle if label == "Square" else ImageDraw.Draw(canvas).ellipse)((x1, y1, x2, y2), fill=255)
        out.append((np.asarray(canvas) > 0, label))
    return png, out


def train_version(settings, starting, fetcher, inputs, records, steps: int) -> dict:
    """What a session does with ``records``, in process: score the new ones with the served version, train
    ``steps`` steps and the decay tail, publish. Returns the new version's meta."""
    import torch

    from backend.training.session import TrainingSession

    session = TrainingSession(settings, starting, fetcher, inputs, torch.device("cpu"))
    session.update(records)
    session.score_new(records)
    session.train(steps)
    session.start_decay()
    while not session.decay_done():
        session.step()
    return session.store.meta(session.publish())
