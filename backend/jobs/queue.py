"""The RQ queue livetrain's background jobs run on."""

from __future__ import annotations

import redis
from rq import Queue

QUEUE_NAME = "livetrain"


def job_queue(connection: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=connection)
