"""Re-scoring throughput (tasks/s) vs the bare model's batched forward, measured in one run.

A re-scoring pass (``backend.jobs.rescoring.rescore_project``, in process) over N unlabeled tasks of a
Label Studio double (tests/fake_label_studio.py: the real API shapes over HTTP on 127.0.0.1): list the
tasks, fetch and decode every image, run the model with the UNCERTAINTY measure, write the predictions in
batches and move the project's model_version. Then the bare model on the same decoded images, in batches
of the same size as the predictor's forwards. Prints both rates and their ratio.

    python scripts/bench_rescore.py [--tasks 32] [--arch fasterrcnn_lite0_fpn] [--uncertainty least_confidence]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.inference.predictor import FORWARD_BATCH, RAW_SCORE_FLOOR  # noqa: E402
from backend.labelstudio.convert import image_to_tensor  # noqa: E402
from backend.model_store.models import model_from_version  # noqa: E402
from backend.model_store.versions import VersionStore  # noqa: E402
from backend.model_store.architectures import build_detector  # noqa: E402
from tests.fake_label_studio import FakeLabelStudio  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="WBC"/><Label value="RBC"/><Label value="Platelets"/></RectangleLabels></View>"""


def images(count: int) -> list[bytes]:
    """BCCD photos when the shared dataset is there, else generated 640x480 pictures."""
    folder = ROOT.parent / "shared/datasets/bccd/images"
    paths = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    out = [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)
    while len(out) < count:
        image = Image.new("RGB", (640, 480), (200, 180, 190))
        draw = ImageDraw.Draw(image)
        for _ in range(20):
            x, y, r = rng.integers(20, 620), rng.integers(20, 460), rng.integers(8, 40)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--arch", default="fasterrcnn_lite0_fpn")
    parser.add_argument("--uncertainty", default="least_confidence",
                        choices=["least_confidence", "entropy", "flip_stability"])
    parser.add_argument("--min-size", type=int, default=0, help="0 = the architecture's default")
    parser.add_argument("--batch", type=int, default=16, help="RESCORE_BATCH")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    fake = FakeLabelStudio()
    project = fake.add_project(CONFIG, title="Bench")
    for i, body in enumerate(images(args.tasks)):
        fake.add_task(project, body, name=f"img{i}.jpg")
    workdir = Path(tempfile.mkdtemp(prefix="bench-rescore-"))
    os.environ.update(MODEL_DIR=str(workdir), LABEL_STUDIO_URL=fake.url, LABEL_STUDIO_API_KEY=fake.token,
                      DOWNLOAD_WEIGHTS="false", UNCERTAINTY=args.uncertainty, RESCORE_BATCH=str(args.batch),
                      MIN_SIZE=str(args.min_size), DEVICE="cpu", LOG_LEVEL="WARNING")
    os.environ.pop("REDIS_URL", None)  # the embedded Redis under MODEL_DIR
    from backend.jobs.rescoring import rescore_project  # after the environment: it reads Settings.from_env()

    # a version of the chosen architecture (ImageNet backbone for Lite0, random heads: the cost is the same)
    torch.manual_seed(0)
    pretrained = args.arch == "fasterrcnn_lite0_fpn"
    model = build_detector(args.arch, 4, pretrained_backbone=pretrained)
    store = VersionStore(workdir, str(project))
    version = store.publish(model.state_dict(), {"arch": args.arch, "classes": ["WBC", "RBC", "Platelets"]}, "Bench")

    started = time.perf_counter()
    report = rescore_project(str(project))
    rescore_s = time.perf_counter() - started
    assert report["written"] == args.tasks, report
    assert fake.projects[project]["model_version"] == version

    bare = model_from_version(*store.load(version), min_size=args.min_size)
    bare.roi_heads.score_thresh = RAW_SCORE_FLOOR
    bare.eval()
    tensors = [image_to_tensor(Image.open(io.BytesIO(fake.files[t["data"]["image"]])).convert("RGB"))
               for t in fake.tasks.values()]
    with torch.inference_mode():
        bare([tensors[0]])  # warm-up, as the re-scoring job's first forward was
        started = time.perf_counter()
        for start in range(0, len(tensors), FORWARD_BATCH):
            bare(tensors[start:start + FORWARD_BATCH])
    bare_s = time.perf_counter() - started
    fake.close()

    rescore_rate, bare_rate = args.tasks / rescore_s, args.tasks / bare_s
    print(f"\n{args.tasks} tasks, {args.arch}, UNCERTAINTY={args.uncertainty}, {args.threads} CPU threads, "
          f"batches of {FORWARD_BATCH} images per forward, {args.batch} tasks per Label Studio write\n")
    print("| path | tasks/s | s |")
    print("|---|---:|---:|")
    print(f"| re-scoring job (list, fetch, decode, forward + score, write, model_version) | {rescore_rate:.2f} | {rescore_s:.1f} |")
    print(f"| bare batched forward | {bare_rate:.2f} | {bare_s:.1f} |")
    print(f"\nre-scoring / bare throughput: {rescore_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()
