"""How long Label Studio's labeling page takes to show a task with livetrain's mask predictions.

    python scripts/bench_editor.py [--objects 50] [--repeats 5] [--ragged 0.3] [--out docs/bench-editor.json]

A throwaway Label Studio 1.23.2 (backend/simulation/ls_server.py), one 640x480 image with ``--objects`` blobs,
each a 28 x 28 mask probability map in its box as Mask R-CNN hands it over, with clean outlines and (``--ragged``)
noisy ones. Each case's prediction is livetrain's own output for those detections (``Predictor._mask_regions``,
as /predict makes it, at the default settings unless the case names one): polygons, polygons of ragged masks
with and without the POLYGON_TOTAL_POINTS budget, brush RLEs one per object and one per class. Every case is
imported as its own task into a PolygonLabels or a BrushLabels project and opened as an annotator opens a task
(Debian's chromium, ``backend.simulation.editor``) ``--repeats`` times; the time is from the navigation's start
until the editor holds every region and lists them (median, seconds), next to the same image with no prediction.
Run it on a quiet machine: the browser and Label Studio share the cores with nothing else.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.labelstudio.label_config import parse_label_config  # noqa: E402
from backend.inference.predictor import Predictor  # noqa: E402
from backend.model_store.detect import paste_in_box  # noqa: E402
from backend.settings import Settings  # noqa: E402
from backend.simulation.editor import CHROMIUM, CHROMIUM_ARGS, LabelingPage  # noqa: E402
from backend.simulation.ls_api import LabelStudioAPI  # noqa: E402
from backend.simulation.ls_server import PASSWORD, USER, LabelStudioServer  # noqa: E402

W, H = 640, 480
LABELS = ("window", "door")
VERSION = "bench-editor"


def config(tag: str) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in LABELS)
    return f'<View><Image name="image" value="$image"/><{tag} name="label" toName="image">{labels}</{tag}></View>'


def blobs(count: int, ragged: float, seed: int = 0) -> tuple[bytes, dict]:
    """A 640x480 image with ``count`` blobs on a grid, and the blobs as Mask R-CNN hands them to livetrain:
    ``{"boxes", "masks"}`` with a 28 x 28 probability map per blob, of a circle with ripples (``ragged``: the
    size of the random ones; 0.05 looks like a clean mask, 0.3 like a noisy one)."""
    rng = np.random.default_rng(seed)
    columns = math.ceil(math.sqrt(count * W / H))
    rows = math.ceil(count / columns)
    cell_w, cell_h = W / columns, H / rows
    pixels = rng.integers(90, 160, (H, W, 3), dtype=np.uint8)
    boxes, masks = [], []
    for i in range(count):
        angles = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        ripple = 1 + 0.15 * np.sin(3 * angles + rng.uniform(0, 6)) + ragged * rng.standard_normal(angles.size)
        fine = Image.new("L", (112, 112), 0)  # drawn at 4x, averaged down: soft edges, as a mask head's output
        ImageDraw.Draw(fine).polygon([(56 + 48 * r * np.cos(a), 56 + 48 * r * np.sin(a)) for a, r in zip(angles, ripple)],
                                     fill=255)
        masks.append(torch.from_numpy(np.asarray(fine.resize((28, 28), Image.BOX), dtype=np.float32) / 255)[None])
        x1, y1 = (i % columns + 0.1) * cell_w, (i // columns + 0.1) * cell_h
        boxes.append([x1, y1, x1 + 0.8 * cell_w, y1 + 0.8 * cell_h])
        crop, (x0, y0) = paste_in_box(masks[-1], boxes[-1], W, H)
        pixels[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]][crop] = (200, 60, 50) if i % 2 == 0 else (50, 80, 200)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue(), {"boxes": torch.tensor(boxes), "masks": torch.stack(masks)}


def prediction(detections: dict, tag: str, settings: Settings) -> list[dict]:
    """livetrain's regions for ``detections`` (every one kept, score 0.9), as /predict makes them."""
    predictor = Predictor.from_settings(None, None, settings)
    kept = [(i, LABELS[i % 2], 0.9) for i in range(len(detections["boxes"]))]
    return predictor._mask_regions(detections, kept, W, H, parse_label_config(config(tag)).primary)


def new_task(ls: LabelStudioAPI, project: int, name: str, png: bytes) -> int:
    """Import one image as a task; its id (import_images answers with all the project's tasks once there are
    as many as it imported)."""
    before = {t["id"] for t in ls.tasks(project)}
    ls.import_images(project, [(name, png)])
    for _ in range(120):
        new = {t["id"] for t in ls.tasks(project)} - before
        if new:
            return new.pop()
        time.sleep(0.5)
    raise RuntimeError(f"no new task in project {project} after importing {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ragged", type=float, default=0.3, help="random ripples of the ragged masks' outlines")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    smooth, ragged = blobs(args.objects, 0.05), blobs(args.objects, args.ragged)
    unbounded = {"POLYGON_TOTAL_POINTS": "1000000"}
    cases = [("no prediction", "PolygonLabels", smooth, None),
             ("polygons", "PolygonLabels", smooth, {}),
             ("polygons, ragged masks", "PolygonLabels", ragged, {}),
             ("polygons, ragged, POLYGON_TOTAL_POINTS=3000", "PolygonLabels", ragged, {"POLYGON_TOTAL_POINTS": "3000"}),
             ("polygons, ragged, no POLYGON_TOTAL_POINTS", "PolygonLabels", ragged, unbounded),
             ("brush", "BrushLabels", smooth, {}),
             ("brush, MASK_OUTPUT=semantic", "BrushLabels", smooth, {"MASK_OUTPUT": "semantic"})]
    server = LabelStudioServer(Path(tempfile.mkdtemp(prefix="bench-editor-ls-")))
    credentials = server.start()
    rows = []
    try:
        ls = LabelStudioAPI(credentials.url, token=credentials.token)
        projects = {tag: ls.create_project(f"bench {tag}", config(tag))["id"] for tag in ("PolygonLabels", "BrushLabels")}
        tasks = []
        for name, tag, (png, detections), env in cases:
            task = new_task(ls, projects[tag], f"case{len(tasks)}.png", png)
            regions = []
            if env is not None:
                regions = prediction(detections, tag, Settings.from_env(env))
                ls.request("POST", "/api/predictions/", json={"task": task, "result": regions, "score": 0.5,
                                                              "model_version": VERSION})
            tasks.append((name, tag, task, regions))
        for project in projects.values():
            ls.update_project(project, model_version=VERSION)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = LabelingPage(browser, credentials.url, USER, PASSWORD)
            page.open(projects["PolygonLabels"], tasks[0][2], 0, timeout=20)  # warm the browser's cache of the editor's code
            for name, tag, task, regions in tasks:
                times = [page.open(projects[tag], task, len(regions)).seconds for _ in range(args.repeats)]
                points = sum(len(r["value"].get("points") or ()) for r in regions)
                rows.append({"case": name, "regions": len(regions), "vertices": points,
                             "max_vertices_per_region": max((len(r["value"].get("points") or ()) for r in regions), default=0),
                             "shown_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]})
                print(json.dumps(rows[-1]), flush=True)
            if page.problems:
                print("page errors:", page.problems, file=sys.stderr)
            browser.close()
    finally:
        server.stop()
    base = rows[0]["shown_s"]
    print(f"\n{args.objects} objects on a {W}x{H} image, median of {args.repeats} opens (seconds from navigation):")
    print(f"{'case':<42} {'regions':>7} {'vertices':>8} {'shown s':>8} {'- empty':>8}")
    for row in rows:
        print(f"{row['case']:<42} {row['regions']:>7} {row['vertices']:>8} {row['shown_s']:>8.2f} "
              f"{row['shown_s'] - base:>+8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"objects": args.objects, "image": [W, H], "repeats": args.repeats,
                                        "ragged": args.ragged, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
