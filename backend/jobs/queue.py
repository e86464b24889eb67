"""The RQ queues livetrain's background jobs run on.

Training rounds go on ``livetrain``; re-scoring and "Complete" jobs on ``livetrain-rescore``, which a
worker only takes from when no round is waiting (RQ serves a worker's queues in order).
"""

from __future__ import annotations

import redis
from rq import Queue

QUEUE_NAME = "livetrain"
RESCORE_QUEUE_NAME = "livetrain-rescore"


def job_queue(connection: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection)


def rescore_queue(connection: redis.Redis) -> Queue:
    return Queue(RESCORE_QUEUE_NAME, connection=connection)


def worker_queues(connection: redis.Redis) -> list[Queue]:
    """Highest priority first."""
    return [job_queue(connection), rescore_queue(connection)]
