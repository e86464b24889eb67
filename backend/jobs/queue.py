"""The RQ queues livetrain's background jobs run on.

Training goes on ``livetrain``; re-scoring and "Complete" jobs on ``livetrain-rescore``. Each queue has
a worker process of its own (``backend/jobs/workers.py``): a training session holds its worker for
minutes, and re-scoring must make progress meanwhile.
"""

from __future__ import annotations

import redis
from rq import Queue

# seconds before each new try of a job while Label Studio is unavailable: short at first (a restart of Label Studio
# takes seconds), growing threefold, then 10 minutes; after the last one the job fails with Label Studio's error
RETRY_DELAYS = (5, 15, 45, 135, 405, 600, 600)
QUEUE_NAME = "livetrain"
RESCORE_QUEUE_NAME = "livetrain-rescore"


def job_queue(connection: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection)


def rescore_queue(connection: redis.Redis) -> Queue:
    return Queue(RESCORE_QUEUE_NAME, connection=connection)
