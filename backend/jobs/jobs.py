"""What the API and the CLI say about one background job (RQ keeps it in Redis)."""

from __future__ import annotations

import time

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from backend.errors import LivetrainError


class JobNotFound(LivetrainError):
    status = 404


def job_report(connection: redis.Redis, job_id: str) -> dict:
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for a day or more, then forgotten)") from None
    status = job.get_status(refresh=True)
    status = getattr(status, "value", status)
    report = {"id": job.id, "status": status, "description": job.description,
              "progress": job.meta.get("progress"), "result": None, "error": None}
    if status == "finished":
        report["result"] = job.return_value()
    elif status == "failed":
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or ""
        report["error"] = text.strip().splitlines()[-1] if text.strip() else "failed"
    return report


def wait_for_job(connection: redis.Redis, job_id: str, timeout: float, interval: float = 0.5) -> dict:
    """Poll until the job finished or failed (used by the CLI's --wait)."""
    deadline = time.monotonic() + timeout
    while True:
        report = job_report(connection, job_id)
        if report["status"] in ("finished", "failed", "stopped", "canceled") or time.monotonic() > deadline:
            return report
        time.sleep(interval)
