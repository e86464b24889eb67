"""The RQ queues livetrain's background jobs run on.

Training goes on ``livetrain``; re-scoring and "Complete" jobs on ``livetrain-rescore``. Each queue has
a worker process of its own (``backend/jobs/workers.py``): a training session holds its worker for
minutes, and re-scoring must make progress meanwhile.
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
