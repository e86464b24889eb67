"""``livetrain simulate`` / ``scripts/simulate.py``: arguments, and starting what is not running yet."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

log = logging.getLogger(__name__)


def pace(value: str) -> float | None:
    return None if value == "wait" else float(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="COCO dataset folder (annotations.json + images)")
    p.add_argument("--images", type=int, default=100, help="how many images to label, in dataset order")
    p.add_argument("--split", default="train", help="only images whose 'split' is this ('' for all)")
    p.add_argument("--kind", choices=("boxes", "polygons", "brush"), default="boxes",
                   help="boxes: RectangleLabels project, rectangle ground truth, box-IoU quality (default); "
                        "polygons: PolygonLabels project (Mask R-CNN), the COCO polygon segmentations as ground "
                        "truth (one polygon per part), mask-IoU quality, segm mAP live vs offline; brush: the "
                        "same as a BrushLabels project (one RLE per object)")
    p.add_argument("--order", choices=("sequential", "next"), default="sequential",
                   help="sequential: label the images in dataset order (default); next: label what Label Studio's "
                        "GET /api/projects/<id>/next/ serves (the label stream), recording per pick how many "
                        "versions and seconds its prediction was behind the active version")
    p.add_argument("--pool", type=int, default=0,
                   help="import this many images as tasks (at least --images); --images of them are labeled")
    p.add_argument("--via", choices=("label-studio", "backend"), default="label-studio",
                   help="where the pre-label comes from: Label Studio (task opened) or our POST /predict")
    p.add_argument("--pace", type=pace, default=10.0, help="seconds per image, or 'wait' for each round to finish")
    p.add_argument("--out", type=Path, default=Path("simulation"), help="folder for the log, summary and plot")
    p.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"))
    p.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"), help="Label Studio legacy token")
    p.add_argument("--start-label-studio", action="store_true",
                   help="start a throwaway Label Studio 1.23.2 on 127.0.0.1 (installed once into its own venv)")
    p.add_argument("--ml-url", default=None, help="a running livetrain (default: start one, see --start-backend)")
    p.add_argument("--backend-env", action="append", default=[], metavar="NAME=VALUE",
                   help="settings for the livetrain this command starts (repeatable)")
    p.add_argument("--ml-user", default=os.environ.get("BASIC_AUTH_USER"), help="Basic auth of a running livetrain")
    p.add_argument("--ml-password", default=os.environ.get("BASIC_AUTH_PASS"))
    p.add_argument("--title", default="livetrain simulation")
    p.add_argument("--session-timeout", type=float, default=900.0,
                   help="seconds to wait, after the last image, for the training session to end (0: don't wait)")
    # live vs offline: the final live version against the same network trained offline (simulation/offline.py)
    p.add_argument("--model-dir", type=Path, default=None,
                   help="MODEL_DIR of the running livetrain at --ml-url, for the live vs offline comparison "
                        "(a livetrain this command starts: known; without either the comparison is skipped)")
    p.add_argument("--test-split", default="test", help="images of this split score the live and offline models")
    p.add_argument("--test-images", type=int, default=0, help="score on the first N test images only (0 = all)")
    p.add_argument("--no-offline", action="store_true",
                   help="score the live model only: the offline training costs as much CPU as the session's")
    p.add_argument("--compare-with", type=Path, default=None, metavar="SIMULATION_JSONL",
                   help="a previous run's simulation.jsonl: its rolling mean is drawn dashed in the plot")
    p.add_argument("--screenshot", type=Path, default=None, metavar="PNG",
                   help="after the session, save a screenshot of the backend's status page (scripts/screenshot_status.py: "
                        "playwright and Debian's chromium)")
    p.add_argument("--compare-label", default="before", help="legend label of --compare-with's curve")
    p.add_argument("--editor-screenshot", type=Path, default=None, metavar="PNG",
                   help="with --start-label-studio and --pool larger than --images: after the session, open the "
                        "unlabeled task with the largest prediction in Label Studio's labeling page (chromium) "
                        "and save a screenshot")


def simulate(args: argparse.Namespace) -> int:
    from backend.simulation.ls_api import LabelStudioAPI
    from backend.simulation.ls_server import LabelStudioServer
    from backend.simulation.processes import LivetrainServer
    from backend.simulation.session import Simulation, SimulationConfig

    if args.compare_with and not args.compare_with.is_file():
        raise SystemExit(f"--compare-with {args.compare_with}: no such file")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        url, key = args.label_studio_url, args.api_key
        if args.start_label_studio:
            server = LabelStudioServer(Path(tempfile.mkdtemp(prefix="livetrain-sim-ls-")))
            stack.callback(server.stop)
            credentials = server.start()
            url, key = credentials.url, credentials.token
            log.info("Label Studio %s started", url)
        if not (url and key):
            raise SystemExit("give --label-studio-url and --api-key (or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY), "
                             "or --start-label-studio")
        ml_url, model_dir = args.ml_url, args.model_dir
        env = dict(item.split("=", 1) for item in args.backend_env)
        torch_home = None  # the backend's TORCH_HOME, where its torchvision weights are cached
        if not ml_url:
            if args.ml_user and args.ml_password:
                env.update(BASIC_AUTH_USER=args.ml_user, BASIC_AUTH_PASS=args.ml_password)
            env.update(LABEL_STUDIO_URL=url, LABEL_STUDIO_API_KEY=key)
            # a fresh MODEL_DIR per run: a new Label Studio reuses project ids, and old versions would leak in
            backend = LivetrainServer(Path(tempfile.mkdtemp(prefix="models-", dir=out)), env=env, log_path=out / "serve.log")
            stack.callback(backend.stop)
            model_dir = backend.model_dir
            # what LivetrainServer gives the backend unless env says otherwise: the offline run must resolve
            # the same starting weights
            env = {"DOWNLOAD_WEIGHTS": "false", "TORCH_HOME": str(model_dir / "torch"), **env}
            torch_home = env["TORCH_HOME"]
            health = backend.wait_ready(timeout=300)
            ml_url = backend.url
            model = (health.get("mask_model") or {}) if args.kind != "boxes" else health
            log.info("livetrain %s started (%s, %s)", ml_url, model.get("model_class"), model.get("weights_source"))
        config = SimulationConfig(data=args.data, images=args.images, split=args.split, via=args.via, kind=args.kind,
                                  order=args.order, pool=args.pool,
                                  pace=args.pace, title=args.title, session_timeout=args.session_timeout,
                                  compare_with=args.compare_with, compare_label=args.compare_label)
        ml_auth = (args.ml_user, args.ml_password) if args.ml_user and args.ml_password else None
        simulation = Simulation(config, LabelStudioAPI(url, token=key), ml_url, out, ml_auth=ml_auth)
        summary = simulation.run()
        if args.screenshot:
            screenshot(ml_url, args.screenshot, ml_auth)
        if args.editor_screenshot:
            summary = editor_screenshot(simulation, args.editor_screenshot, args.start_label_studio)
        # the session has ended and its versions are on disk: stop Label Studio and a backend we started, so
        # that the offline training has the CPU to itself (a backend at --ml-url keeps running)
        stack.close()
        settings = backend_settings(env, model_dir)
        summary = simulation.compare_with_offline(model_dir, settings, args.test_split, args.test_images,
                                                  offline=not args.no_offline, torch_home=torch_home)
    print(json.dumps(summary, indent=2))
    return 0


def screenshot(ml_url: str, path: Path, auth) -> None:
    """The status page as a browser sees it, with the session's plots (never fails the simulation)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_status.py"
    command = [sys.executable, str(script), ml_url.rstrip("/") + "/", str(path), "--full-page", "--wait", "3"]
    env = dict(os.environ)
    if auth:  # through the environment: a password on a command line shows in ps
        env.update(BASIC_AUTH_USER=auth[0], BASIC_AUTH_PASS=auth[1])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("no screenshot: %s", exc)
        return
    if done.returncode:
        log.warning("no screenshot (%s): %s", done.returncode, done.stderr.strip()[-500:])
    else:
        log.info("status page screenshot: %s", path)


def editor_screenshot(simulation, path: Path, started: bool, timeout: float = 600.0) -> dict:
    """Once the final version has re-scored the unlabeled tasks, the labeling page with the largest of its
    predictions (``backend.simulation.editor``); recorded as ``editor`` in the summary. Never fails the run."""
    import time

    from backend.simulation.editor import screenshot_prediction
    from backend.simulation.ls_server import PASSWORD, USER

    report = {"skipped": "needs --start-label-studio (the browser logs in as the user it creates)"}
    if started:
        deadline = time.monotonic() + timeout
        status = simulation.project_status()
        while time.monotonic() < deadline:  # the re-scoring of the active version writes the predictions
            rescore = status.get("rescore") or {}
            if rescore.get("state") in ("done", "error") and rescore.get("version") == status.get("active_version"):
                break
            time.sleep(2.0)
            status = simulation.project_status()
        try:
            report = screenshot_prediction(simulation.ls, simulation.ls.url, USER, PASSWORD, simulation.project["id"],
                                           status.get("active_version") or "", path)
        except Exception as exc:  # a convenience: the numbers are in the summary either way
            report = {"skipped": f"{type(exc).__name__}: {exc}"}
    log.info("editor screenshot: %s", report)
    simulation.summary["editor"] = report
    simulation.write_summary()
    return simulation.summary


def backend_settings(env: dict, model_dir: Path | None):
    """The backend's settings as far as the simulator knows them: its environment is this process's plus
    ``env`` (--backend-env, and what LivetrainServer adds)."""
    from backend.settings import Settings

    full = dict(os.environ, **env)
    if model_dir is not None:
        full["MODEL_DIR"] = str(model_dir)
    return Settings.from_env(full)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return simulate(parser.parse_args(argv))
