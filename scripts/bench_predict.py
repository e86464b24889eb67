"""Median /predict latency for one 640x480 image through the real HTTP stack (`livetrain serve`:
gunicorn, Flask, image fetch + cache, decode, conversion) vs the bare model forward on the same image,
measured in one run. Prints the ratio; the target is <= 1.25 on CPU.

    python scripts/bench_predict.py [--image PATH] [--runs 30] [--arch fasterrcnn_mobilenet_v3_large_320_fpn]

Without --image it uses a BCCD photo from ../shared/datasets when present, else a generated picture.
The two are interleaved (one /predict, then one bare forward, repeated) so that drift in the machine's
speed hits both alike; the server idles while the bare model runs, so they compete for no cores.
"""

from __future__ import annotations

import argparse
import http.server
import io
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

from backend.inference.predictor import RAW_SCORE_FLOOR  # noqa: E402
from backend.labelstudio.convert import image_to_tensor  # noqa: E402
from backend.model_store.models import model_from_version  # noqa: E402
from backend.model_store.versions import VersionStore  # noqa: E402
from backend.model_store.weights import resolve_starting_weights  # noqa: E402
from backend.simulation.processes import LivetrainServer  # noqa: E402

# After a forward, torch's OpenMP threads spin-wait for more work for a while; a pause between the
# two measurements keeps one process's spinning threads from slowing the other's forward.
QUIET_S = 0.3
CONFIG = """<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">
<Label value="WBC"/><Label value="RBC"/><Label value="Platelets"/></RectangleLabels></View>"""


def bench_image(path: str | None) -> bytes:
    default = ROOT.parent / "shared/datasets/bccd/images/BloodImage_00000.jpg"
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


def publish_version(model_dir: str, arch: str):
    """Publish one version of the starting model (new head) for project 1, as a training round would,
    and return (architecture, the same model as the server will load it)."""
    weights = resolve_starting_weights(arch, os.environ.get("WEIGHTS_PATH", ""), os.environ.get("WEIGHTS_SHA256", ""),
                                       download=os.environ.get("DOWNLOAD_WEIGHTS", "true").lower() != "false")
    classes = ["WBC", "RBC", "Platelets"]
    torch.manual_seed(0)
    store = VersionStore(Path(model_dir), "1")
    name = store.publish(weights.build(len(classes) + 1).state_dict(), {"arch": weights.arch, "classes": classes}, "bench")
    state, meta = store.load(name)
    model = model_from_version(state, meta).eval()
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR  # the server's post-processing
    return weights.arch, model


def measure(url: str, runs: int, arch: str, body: bytes) -> tuple[str, list[float], list[float]]:
    """Alternate one /predict and one bare forward, so drift in machine speed hits both alike."""
    tensor = image_to_tensor(Image.open(io.BytesIO(body)).convert("RGB"))
    with tempfile.TemporaryDirectory() as model_dir:
        name, model = publish_version(model_dir, arch)
        # the server finds the same starting weights as publish_version() above
        env = {"MODEL_ARCH": arch, "LOG_LEVEL": "WARNING", "TORCH_HOME": Path(torch.hub.get_dir()).parent,
               "DOWNLOAD_WEIGHTS": os.environ.get("DOWNLOAD_WEIGHTS", "true")}
        server = LivetrainServer(Path(model_dir), env=env, worker=False, cwd=ROOT)
        try:
            server.wait_ready(timeout=120)
            base = server.url + "/predict"
            payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": "1.1", "label_config": CONFIG}
            session = requests.Session()
            http_times, forward_times = [], []
            with torch.inference_mode():
                for i in range(runs + 3):  # 3 warm-ups: the server builds its model, fills the image cache
                    start = time.perf_counter()
                    session.post(base, json=payload, timeout=120).raise_for_status()
                    http_s = time.perf_counter() - start
                    time.sleep(QUIET_S)
                    start = time.perf_counter()
                    model([tensor])
                    forward_s = time.perf_counter() - start
                    time.sleep(QUIET_S)
                    if i >= 3:
                        http_times.append(http_s)
                        forward_times.append(forward_s)
            return name, http_times, forward_times
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--arch", default=os.environ.get("MODEL_ARCH", "auto"))
    args = parser.parse_args()
    body = bench_image(args.image)
    httpd, url = serve_file(body)
    arch, http_times, forward_times = measure(url, args.runs, args.arch, body)
    httpd.shutdown()
    http_ms = 1000 * statistics.median(http_times)
    forward_ms = 1000 * statistics.median(forward_times)
    print(f"arch={arch} threads={torch.get_num_threads()} runs={args.runs} image=640x480")
    print(f"/predict via HTTP (gunicorn):   median {http_ms:7.1f} ms")
    print(f"bare model forward:             median {forward_ms:7.1f} ms")
    print(f"ratio /predict / forward = {http_ms / forward_ms:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()
