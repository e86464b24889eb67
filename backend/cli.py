"""``livetrain`` command line: ``serve`` (gunicorn + worker, embedded Redis by default), ``worker``, ``settings``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from backend.settings import Settings, settings_table
from backend.simulation.run import add_arguments as add_simulate_arguments


def serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from backend.jobs.connection import redis_url_for

    settings = Settings.from_env()
    # Children (gunicorn workers, the RQ worker) inherit REDIS_URL, so all share one Redis: with
    # REDIS_URL unset this process starts the embedded one and keeps it alive until it exits.
    os.environ["REDIS_URL"] = redis_url_for(settings)
    worker = None
    if not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"])
    # GET /metrics sums what every gunicorn worker counted: prometheus_client's multiprocess mode, which
    # needs the directory set before any worker imports prometheus_client (set after the RQ worker starts:
    # workers count in Redis instead, backend/jobs/counters.py).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir(settings))

    class Gunicorn(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host or settings.host}:{args.port or settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 300)  # a large predict batch on CPU may take minutes
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("child_exit", _metrics_child_exit)
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn >= 25 binds one control socket per user (~/.gunicorn/gunicorn.ctl); a second
                # `livetrain serve` (another project, a test, a benchmark) would take it over.
                self.cfg.set("control_socket_disable", True)

        def load(self):
            from backend.api import create_app

            return create_app()

    try:
        Gunicorn().run()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: the running jobs finish first
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # a second SIGTERM is RQ's cold shutdown: the workers kill their work horses and the
                # training worker stops its re-scoring child; a plain kill would leave them running
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    worker.kill()
    return 0


def _metrics_dir(settings: Settings):
    """PROMETHEUS_MULTIPROC_DIR when set, else MODEL_DIR/.prometheus; emptied of the last run's files
    (prometheus_client would add a dead run's counts to this one's)."""
    from pathlib import Path

    directory = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or settings.model_dir / ".prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    return directory


def _metrics_child_exit(server, worker) -> None:
    """gunicorn hook, in the master: drop the exited worker's live gauges (its counters keep counting)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker(args: argparse.Namespace) -> int:
    from backend.jobs.workers import run_worker

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(settings, args.queue, parent_pid=args.parent_pid, base_nice=args.base_nice)


def versions(args: argparse.Namespace) -> int:
    from backend.model_store.stores import version_store

    store = version_store(Settings.from_env(), args.project)
    for meta in store.list():
        mark = "*" if meta["active"] else " "
        quality = f"{meta['quality']:.3f}" if isinstance(meta.get("quality"), float) else "-"
        print(f"{mark} {meta['name']:<32} images={meta.get('images')} loss={meta.get('losses', {}).get('loss')} quality={quality}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    from backend.errors import LivetrainError
    from backend.jobs.training import rollback_to

    settings = Settings.from_env()
    try:
        rollback_to(settings, args.project, args.version)
    except LivetrainError as exc:
        print(f"livetrain: {exc.message}", file=sys.stderr)
        return 1
    print(f"project {args.project} now serves {args.version}")
    if settings.rescore_on_publish:  # as the HTTP route does: Label Studio's scores follow the served version
        from backend.jobs.connection import connect
        from backend.jobs.rescoring import rescore_after_publish

        if rescore_after_publish(connect(settings), args.project):
            print("queued re-scoring of the unlabeled tasks with it")
    return 0


def export(args: argparse.Namespace) -> int:
    from PIL import Image

    from backend.errors import LivetrainError
    from backend.inference.export_check import check_export, format_report, sample_images
    from backend.model_store.export import export_version

    settings = Settings.from_env()
    try:
        out = export_version(settings, args.project, args.version, args.format, args.out,
                             min_size=settings.min_size, score_threshold=settings.score_threshold,
                             max_detections=settings.max_detections)
        print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
        if args.no_check:
            return 0
        images = ({path: Image.open(path).convert("RGB") for path in args.check} if args.check
                  else sample_images(settings.image_cache_dir))
        report = check_export(out, settings, images, settings.min_size)
    except (LivetrainError, OSError) as exc:
        print(f"livetrain: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0 if report["ok"] else 3


def train(args: argparse.Namespace) -> int:
    from backend.jobs.connection import connect
    from backend.jobs.training import enqueue_training, wait_for_idle

    settings = Settings.from_env()
    connection = connect(settings)
    queued = enqueue_training(connection, args.project, full=True)
    print("queued a training session" if queued else "a session is already queued or running: it takes the full sync in")
    if args.wait:
        print(wait_for_idle(connection, args.project, timeout=args.wait))
    return 0


def _follow(connection, job_id: str, wait: float) -> int:
    import json

    from backend.jobs.jobs import wait_for_job

    report = wait_for_job(connection, job_id, timeout=wait)
    print(json.dumps(report, default=str))
    return 1 if report["status"] == "failed" else 0


def rescore(args: argparse.Namespace) -> int:
    from backend.jobs.connection import connect
    from backend.jobs.rescoring import enqueue_rescore

    connection = connect(Settings.from_env())
    job_id = enqueue_rescore(connection, args.project)
    print(f"queued re-scoring job {job_id}" if job_id else "a re-scoring job is already pending")
    return _follow(connection, job_id, args.wait) if job_id and args.wait else 0


def complete(args: argparse.Namespace) -> int:
    from backend.errors import LivetrainError
    from backend.jobs.connection import connect
    from backend.jobs.rescoring import enqueue_complete

    connection = connect(Settings.from_env())
    options = {"tasks": args.tasks or None, "min_score": args.min_score, "max_detections": args.max_detections,
               "remove_existing": args.remove_existing, "skip_annotated": args.skip_annotated}
    try:
        job_id = enqueue_complete(connection, args.project, options)
    except LivetrainError as exc:
        print(f"livetrain: {exc.message}", file=sys.stderr)
        return 2
    print(f"queued complete job {job_id}")
    return _follow(connection, job_id, args.wait) if args.wait else 0


def stream(args: argparse.Namespace) -> int:
    """Set a project's sampling in Label Studio by hand (uncertainty / sequential / random)."""
    from backend.errors import LivetrainError
    from backend.jobs.connection import connect
    from backend.jobs.state import ls_credentials
    from backend.jobs.stream_state import StreamState
    from backend.labelstudio.client import LabelStudioClient

    settings = Settings.from_env()
    try:
        connection = connect(settings)
        url, key = ls_credentials(settings, connection)
        with LabelStudioClient(url, key) as client:
            before = client.project(args.project).get("sampling")
            after = client.set_sampling(args.project, args.mode).get("sampling")
        # by hand is final: LABEL_STREAM=uncertainty must not switch it again later
        StreamState(connection, args.project).mark_switched({"from": before, "to": after, "by": "livetrain stream"},
                                                         by_hand=True)
    except LivetrainError as exc:
        print(f"livetrain: {exc.message}", file=sys.stderr)
        return 1
    print(f"project {args.project}: sampling {before!r} -> {after!r}")
    return 0


def simulate(args: argparse.Namespace) -> int:
    from backend.simulation.run import simulate as run_simulation

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_simulation(args)


def show_settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livetrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP backend with gunicorn (and the RQ workers)")
    p.add_argument("--host", default=None, help="overrides HOST")
    p.add_argument("--port", type=int, default=None, help="overrides PORT")
    p.add_argument("--no-worker", action="store_true", help="do not start the RQ workers alongside")
    p.set_defaults(func=serve)
    p = sub.add_parser("worker", help="run the RQ workers: training, and re-scoring in a child process")
    p.add_argument("--queue", choices=("all", "training", "rescore"), default="all",
                   help="training: the training queue only; rescore: re-scoring and Complete jobs only; "
                   "all (default): the training worker here and a rescore worker as a child process")
    # set by `worker --queue all` for the rescore worker it starts
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--base-nice", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=worker)
    sub.add_parser("settings", help="print every setting with its default").set_defaults(func=show_settings)
    p = sub.add_parser("versions", help="list a project's model versions (* = active)")
    p.add_argument("project")
    p.set_defaults(func=versions)
    p = sub.add_parser("rollback", help="make an earlier version the active one")
    p.add_argument("project")
    p.add_argument("version")
    p.set_defaults(func=rollback)
    p = sub.add_parser("export", help="export a version as TorchScript or ONNX (+ labels, config, README); see docs/export.md")
    p.add_argument("project")
    p.add_argument("--version", default=None, help="the version to export (default: the active one)")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    p.add_argument("--out", required=True, help="directory to write the files into")
    p.add_argument("--check", nargs="+", metavar="IMAGE", help="compare with /predict on these images "
                   "(default: two images from the image cache, or generated ones)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")
    p.set_defaults(func=export)
    p = sub.add_parser("train", help="full sync from Label Studio and a training session, now")
    p.add_argument("project")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the session to end")
    p.set_defaults(func=train)
    p = sub.add_parser("rescore", help="score the unlabeled tasks with the active version, write them into Label Studio")
    p.add_argument("project")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the job to finish")
    p.set_defaults(func=rescore)
    p = sub.add_parser("complete", help="pre-label all or selected tasks with the active version (background job)")
    p.add_argument("project")
    p.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    p.add_argument("--min-score", type=float, default=None, help="regions below this score are left out "
                   "(default: SCORE_THRESHOLD / the tag's model_score_threshold)")
    p.add_argument("--max-detections", type=int, default=None, help="at most this many regions per image")
    p.add_argument("--remove-existing", action="store_true", help="delete the tasks' existing predictions")
    p.add_argument("--skip-annotated", action="store_true", help="leave tasks that have annotations alone")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the job to finish")
    p.set_defaults(func=complete)
    p = sub.add_parser("stream", help="set the project's label stream in Label Studio: uncertainty (the most useful "
                       "task next, diverse by cluster), sequential or random")
    p.add_argument("project")
    p.add_argument("mode", choices=("uncertainty", "sequential", "random"))
    p.set_defaults(func=stream)
    p = sub.add_parser("simulate", help="replay a COCO dataset as an annotation session and plot the model quality")
    add_simulate_arguments(p)
    p.set_defaults(func=simulate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # invalid settings: say which, no traceback
        print(f"livetrain: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
