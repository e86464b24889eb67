"""Median /predict latency for one 640x480 image through the real HTTP stack (`livetrain serve`:
gunicorn, Flask, image fetch + cache, decode, conversion) vs the bare model forward on the same image,
measured in one run. Prints the ratio; the target is <= 1.25 on CPU.

    python scripts/bench_predict.py [--image PATH] [--runs 30] [--arch fasterrcnn_mobilenet_v3_large_320_fpn]
    python scripts/bench_predict.py --arch maskrcnn_lite0_fpn [--output polygons|brush] [--version DIR]
    python scripts/bench_predict.py --arch fasterrcnn_lite0_slim --compare fasterrcnn_lite0_fpn

The bare forward runs the model as the server does (channels-last memory on a CPU). ``--compare ARCH`` also times
that architecture's bare forward (its starting model, the server's score floor, the default memory layout: as it
was served before) in the same interleaved loop: a new default against the previous one, side by side.

Without --image it uses a BCCD photo from ../shared/datasets when present, else a generated picture.
The two are interleaved (one /predict, then one bare forward, repeated) so that drift in the machine's
speed hits both alike; the server idles while the bare model runs, so they compete for no cores.

A Mask R-CNN (``--arch maskrcnn_*``) answers a PolygonLabels (or BrushLabels) config, and the reference is
the bare forward *plus* the mask post-processing the server does (pasting each returned instance into its
box, contours or RLE), timed separately in process so that its share is printed. A model with an untrained
head returns no region above SCORE_THRESHOLD, so there would be nothing to post-process: ``--version DIR``
serves a trained version directory (``MODEL_DIR/<project>/versions/<name>``, e.g. from ``livetrain
simulate``) instead, and ``--score-threshold`` lowers the threshold of both sides.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model_store.detect import forward  # noqa: E402
from backend.inference.predictor import RAW_SCORE_FLOOR, LoadedModel, Predictor  # noqa: E402
from backend.labelstudio.convert import image_to_tensor  # noqa: E402
from backend.labelstudio.label_config import parse_label_config  # noqa: E402
from backend.model_store.architectures import task_of  # noqa: E402
from backend.model_store.models import for_inference, model_from_version  # noqa: E402
from backend.model_store.versions import VersionStore  # noqa: E402
from backend.model_store.weights import resolve_starting_weights  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.processes import LivetrainServer  # noqa: E402

# After a forward, torch's OpenMP threads spin-wait for more work for a while; a pause between the
# two measurements keeps one process's spinning threads from slowing the other's forward.
QUIET_S = 0.3
CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="WBC"/><Label value="RBC"/><Label value="Platelets"/></RectangleLabels></View>"""


def mask_config(output: str, classes) -> str:
    tag = "PolygonLabels" if output == "polygons" else "BrushLabels"
    labels = "".join(f'<Label value="{c}"/>' for c in classes)
    return f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'


def bench_image(path: str | None, masks: bool = False) -> bytes:
    default = ROOT.parent / ("shared/datasets/building_facades/images/val_0001.jpg" if masks
                             else "shared/datasets/bccd/images/BloodImage_00000.jpg")
    if path or default.exists():
        image = Image.open(path or default).convert("RGB").resize((640, 480))
    else:
        image = Image.new("RGB", (640, 480), (200, 180, 190))
        draw = ImageDraw.Draw(image)
        rng = np.random.default_rng(0)
        for _ in range(20):
            x, y, r = rng.integers(20, 620), rng.integers(20, 460), rng.integers(8, 40)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def serve_file(body: bytes) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/bench.jpg"


def starting_model(arch: str, classes: list[str]) -> tuple[str, torch.nn.Module]:
    """``arch``'s starting model (new heads for ``classes``), as a first training round builds it."""
    task = "masks" if arch != "auto" and task_of(arch) == "masks" else "boxes"
    weights = resolve_starting_weights(arch, os.environ.get("WEIGHTS_PATH", ""), os.environ.get("WEIGHTS_SHA256", ""),
                                       download=os.environ.get("DOWNLOAD_WEIGHTS", "true").lower() != "false", task=task)
    torch.manual_seed(0)
    return weights.arch, weights.build(len(classes) + 1)


def publish_version(model_dir: str, arch: str, version: str | None = None):
    """Publish one version for project 1: a trained ``version`` directory, else the starting model (new head)
    as a training round would; return (architecture, the same model as the server will load it, classes)."""
    store = VersionStore(Path(model_dir), "1")
    if version:
        trained = torch.load(Path(version) / "model.pt", map_location="cpu", weights_only=True)
        meta = json.loads((Path(version) / "meta.json").read_text())
        name = store.publish(trained, {k: meta[k] for k in ("arch", "classes", "task") if k in meta}, "bench")
    else:
        classes = ["WBC", "RBC", "Platelets"]
        built_arch, model = starting_model(arch, classes)
        name = store.publish(model.state_dict(), {"arch": built_arch, "classes": classes}, "bench")
    state, meta = store.load(name)
    model = for_inference(model_from_version(state, meta), torch.device("cpu"))  # as the server runs it
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR  # the server's post-processing
    return meta["arch"], model, meta["classes"]


def measure(url: str, args, body: bytes) -> tuple[str, list[float], list[float], list[float], int, list[float]]:
    """Alternate one /predict and one bare forward (+ mask post-processing), so drift in machine speed hits
    both alike. Returns (arch, /predict times, forward times, post-processing times, regions per answer,
    ``--compare`` forward times)."""
    image = Image.open(io.BytesIO(body)).convert("RGB")
    tensor = image_to_tensor(image)
    with tempfile.TemporaryDirectory() as model_dir:
        arch, model, classes = publish_version(model_dir, args.arch, args.version)
        masks = task_of(arch) == "masks"
        config = mask_config(args.output, classes) if masks else CONFIG
        control = parse_label_config(config).primary
        # the server's post-processing, in process (the server reads MASK_MIN_PART from the same environment)
        post = Predictor(None, None, args.score_threshold, 100, mask_min_part=Settings.from_env().mask_min_part)
        other = None
        if args.compare:  # another architecture's bare forward on the same image, in the default memory layout (as
            other = starting_model(args.compare, classes)[1].eval()  # served before channels-last serving)
            other.roi_heads.score_thresh = RAW_SCORE_FLOOR
        loaded = LoadedModel(model, "bench", tuple(classes))
        # the server finds the same starting weights as publish_version() above
        env = {"MODEL_ARCH" if not masks else "MASK_ARCH": args.arch if not args.version else arch,
               "LOG_LEVEL": "WARNING", "TORCH_HOME": Path(torch.hub.get_dir()).parent,
               "DOWNLOAD_WEIGHTS": os.environ.get("DOWNLOAD_WEIGHTS", "true"), "SCORE_THRESHOLD": args.score_threshold,
               "IMAGE_URL_ALLOWLIST": "127.0.0.1"}  # serve_file's image server is on 127.0.0.1
        server = LivetrainServer(Path(model_dir), env=env, worker=False, cwd=ROOT)
        try:
            server.wait_ready(timeout=120)
            base = server.url + "/predict"
            payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": "1.1", "label_config": config}
            session = requests.Session()
            http_times, forward_times, post_times, other_times = [], [], [], []
            regions = 0
            with torch.inference_mode():
                for i in range(args.runs + 3):  # 3 warm-ups: the server builds its model, fills the image cache
                    start = time.perf_counter()
                    reply = session.post(base, json=payload, timeout=120)
                    reply.raise_for_status()
                    http_s = time.perf_counter() - start
                    regions = len(reply.json()["results"][0]["result"])
                    time.sleep(QUIET_S)
                    start = time.perf_counter()
                    det = forward(model, [tensor])[0]
                    forward_s = time.perf_counter() - start
                    start = time.perf_counter()
                    post._to_prediction(det, 1.0, image.size, control, loaded, None, None)
                    post_s = time.perf_counter() - start
                    time.sleep(QUIET_S)
                    if other is not None:
                        start = time.perf_counter()
                        forward(other, [tensor])
                        other_times.append(time.perf_counter() - start)
                        time.sleep(QUIET_S)
                    if i >= 3:
                        http_times.append(http_s)
                        forward_times.append(forward_s)
                        post_times.append(post_s)
            return arch, http_times, forward_times, post_times, regions, other_times[3:]
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--arch", default=os.environ.get("MODEL_ARCH", "auto"))
    parser.add_argument("--output", choices=("polygons", "brush"), default="polygons", help="mask models: the config's tag")
    parser.add_argument("--version", help="a trained version directory to serve instead of the starting model")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--compare", metavar="ARCH", help="also time this architecture's bare forward in the same run "
                        "(e.g. the previous default, fasterrcnn_lite0_fpn)")
    args = parser.parse_args()
    masks = args.arch.startswith("maskrcnn") or bool(args.version)
    body = bench_image(args.image, masks)
    httpd, url = serve_file(body)
    arch, http_times, forward_times, post_times, regions, other_times = measure(url, args, body)
    httpd.shutdown()
    http_ms = 1000 * statistics.median(http_times)
    forward_ms = 1000 * statistics.median(forward_times)
    post_ms = 1000 * statistics.median(post_times)
    size = "x".join(map(str, Image.open(io.BytesIO(body)).size))
    print(f"arch={arch} threads={torch.get_num_threads()} runs={args.runs} image={size} regions/answer={regions}")
    print(f"/predict via HTTP (gunicorn):   median {http_ms:7.1f} ms")
    print(f"bare model forward:             median {forward_ms:7.1f} ms")
    print(f"post-processing (regions):      median {post_ms:7.1f} ms "
          f"({100 * post_ms / (forward_ms + post_ms):.1f}% of forward + post-processing)")
    print(f"ratio /predict / (forward + post-processing) = {http_ms / (forward_ms + post_ms):.3f} (target <= 1.25)")
    if other_times:
        other_ms = 1000 * statistics.median(other_times)
        print(f"{args.compare} bare forward: median {other_ms:7.1f} ms; this forward / it = {forward_ms / other_ms:.2f}, "
              f"/predict / it = {http_ms / other_ms:.2f}")


if __name__ == "__main__":
    main()
