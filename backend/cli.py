"""``livetrain`` command line: ``serve`` (gunicorn + worker, embedded Redis by default), ``worker``, ``settings``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from backend.settings import Settings, settings_table

log = logging.getLogger("livetrain")


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

    class Gunicorn(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host or settings.host}:{args.port or settings.port}")
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", 300)  # a large predict batch on CPU may take minutes
            self.cfg.set("loglevel", settings.log_level.lower())

        def load(self):
            from backend.api import create_app

            return create_app()

    try:
        Gunicorn().run()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def worker(args: argparse.Namespace) -> int:
    from rq import Worker

    from backend.jobs.connection import connect
    from backend.jobs.queue import job_queue

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    connection = connect(settings)
    Worker([job_queue(connection)], connection=connection).work(with_scheduler=False)
    return 0


def show_settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livetrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP backend with gunicorn (and an RQ worker)")
    p.add_argument("--host", default=None, help="overrides HOST")
    p.add_argument("--port", type=int, default=None, help="overrides PORT")
    p.add_argument("--no-worker", action="store_true", help="do not start an RQ worker alongside")
    p.set_defaults(func=serve)
    sub.add_parser("worker", help="run an RQ worker for training jobs").set_defaults(func=worker)
    sub.add_parser("settings", help="print every setting with its default").set_defaults(func=show_settings)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # invalid settings: say which, no traceback
        print(f"livetrain: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
