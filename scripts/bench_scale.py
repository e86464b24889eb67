"""Training throughput with 1 vs 2 (or more) RQ training workers over several projects: versions ("rounds")
and SGD steps per minute, in all and per worker.

Setup per configuration: a Label Studio double (tests/fake_label_studio.py) with --projects projects using
the generated shapes images of the test suite, an embedded Redis in a temporary MODEL_DIR and N
`livetrain worker --queue training` processes (TRAIN_THREADS=--threads each, GUARD=false,
RESCORE_ON_PUBLISH=false, IDLE_AFTER=3600 so sessions end only by fair share, SESSION_SLICE=--slice,
PUBLISH_INTERVAL=--publish-interval, MIN_SIZE=128 and the small settings of tests/livetrain_fixtures.py
unless --env overrides them). --images labeled images per project are submitted (webhook through the Flask
app) and the script waits until every project has a version; then, for --duration seconds, one more image
per project every --pace seconds. Counted in that window: versions published (their meta's published_at),
the steps they trained (meta "steps": steps since the previous version), sessions started and projects that
moved between workers. On a machine with fewer cores than workers x threads the workers share the CPU.

    python scripts/bench_scale.py [--workers 1 2] [--projects 3] [--duration 180] [--pace 10] [--images 4]
        [--threads 1] [--slice 20] [--publish-interval 5] [--env KEY=VALUE ...] [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.model_store.versions import VersionStore  # noqa: E402
from tests.livetrain_fixtures import CONFIG, live_env, wait_until, worker_env  # noqa: E402
from tests.scale_fixtures import Recorder, TrainingWorker, queue_workers, submit  # noqa: E402

log = logging.getLogger("bench_scale")


def run(n_workers: int, args, tmp: Path) -> dict:
    fake, first, settings, app = live_env(tmp)
    projects = [str(first)] + [str(fake.add_project(CONFIG, title=f"Project {i + 2}")) for i in range(args.projects - 1)]
    client, redis = app.test_client(), app.extensions["livetrain"].redis
    extra = dict(TRAIN_THREADS=args.threads, SESSION_SLICE=args.slice, IDLE_AFTER=3600,
                 PUBLISH_INTERVAL=args.publish_interval, GUARD="false", RESCORE_ON_PUBLISH="false", KEEP_VERSIONS=100000)
    extra.update(dict(kv.split("=", 1) for kv in args.env))
    workers = []
    seed = 0

    def submit_round():
        nonlocal seed
        for i, p in enumerate(projects):
            submit(fake, client, p, seed + 10000 * i)
        seed += 1

    try:
        for i in range(n_workers):
            env = worker_env(tmp, settings.redis_url, fake.url, fake.token, **extra)
            workers.append(TrainingWorker(env, tmp / f"worker{i}.log"))
        names = wait_until(lambda: len(queue_workers(redis)) == n_workers and queue_workers(redis), timeout=180,
                           what=f"{n_workers} workers")
        recorder = Recorder(redis, projects, interval=0.2)
        recorder.start()
        for _ in range(args.images):
            submit_round()
        log.info("%d worker(s): waiting for a first version of each of %d projects", n_workers, len(projects))
        wait_until(lambda: all(VersionStore(settings.model_dir, p).names() for p in projects), timeout=900,
                   interval=1, what="a version of every project")
        t0 = time.time()
        while time.time() - t0 < args.duration:
            submit_round()
            time.sleep(min(args.pace, max(0.0, args.duration - (time.time() - t0))))
        t1 = time.time()
        recorder.stop()
    finally:
        for worker in workers:
            worker.stop()
        fake.close()

    minutes = (t1 - t0) / 60
    versions = [v for p in projects for v in VersionStore(settings.model_dir, p).list() if t0 <= v["published_at"] <= t1]
    steps = sum(v.get("steps") or 0 for v in versions)
    sessions = [(p, info) for (p, sid), info in recorder.sessions.items() if info.get("started_at", 0) >= t0]
    holders: dict[str, list[str]] = {}  # project -> lock holders (RQ job ids) in order
    for s in recorder.samples:
        if s["token"] and s["t"] >= t0 and (not holders.get(s["project"]) or holders[s["project"]][-1] != s["token"]):
            holders.setdefault(s["project"], []).append(s["token"])
    from rq.job import Job

    jobs = {j.id: j for j in Job.fetch_many(sorted({t for ts in holders.values() for t in ts}), connection=redis) if j}
    moved = [p for p, ts in holders.items() if len({jobs[t].worker_name for t in ts if t in jobs}) > 1]
    return {"workers": n_workers, "projects": len(projects), "threads": args.threads, "minutes": round(minutes, 2),
            "versions": len(versions), "versions_per_min": round(len(versions) / minutes, 2),
            "versions_per_min_per_worker": round(len(versions) / minutes / n_workers, 2),
            "steps": steps, "steps_per_min": round(steps / minutes, 1),
            "steps_per_min_per_worker": round(steps / minutes / n_workers, 1),
            "sessions_started": len(sessions), "projects_moved_between_workers": len(moved),
            "worker_names": sorted(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure, in turn")
    parser.add_argument("--projects", type=int, default=3)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds measured per configuration")
    parser.add_argument("--pace", type=float, default=10.0, help="seconds between submits to each project")
    parser.add_argument("--images", type=int, default=4, help="labeled images per project before the window")
    parser.add_argument("--threads", type=int, default=1, help="TRAIN_THREADS of each worker")
    parser.add_argument("--slice", type=float, default=20.0, help="SESSION_SLICE")
    parser.add_argument("--publish-interval", type=float, default=5.0, help="PUBLISH_INTERVAL")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the workers (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    results = []
    for n in args.workers:
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
            results.append(run(n, args, Path(tmp)))
        log.info("%s", results[-1])
    print(f"\n{'workers':>7} {'projects':>8} {'min':>5} {'versions':>8} {'v/min':>6} {'v/min/worker':>12} "
          f"{'steps/min':>9} {'steps/min/worker':>16} {'sessions':>8} {'moved':>5}")
    for r in results:
        print(f"{r['workers']:>7} {r['projects']:>8} {r['minutes']:>5} {r['versions']:>8} {r['versions_per_min']:>6} "
              f"{r['versions_per_min_per_worker']:>12} {r['steps_per_min']:>9} {r['steps_per_min_per_worker']:>16} "
              f"{r['sessions_started']:>8} {r['projects_moved_between_workers']:>5}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
