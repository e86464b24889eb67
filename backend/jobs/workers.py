"""The RQ worker processes and their CPU shares.

``livetrain worker`` (``--queue all``, what ``livetrain serve`` starts) is two workers: the training
worker in its own process, on the ``livetrain`` queue, and a child process ``livetrain worker --queue
rescore`` on ``livetrain-rescore`` (re-scoring and "Complete"). A training session holds its worker for
minutes; with a worker of its own, re-scoring makes progress meanwhile. The training worker restarts the
child when it dies, passes a stop request (SIGTERM/SIGINT) on to it and stops it when it exits; a child
whose training worker was killed stops after its running job (Linux: PR_SET_PDEATHSIG).

CPU shares: the web process (/predict) runs at normal priority, the trainer TRAIN_NICE lower with
TRAIN_THREADS torch threads, the re-scorer RESCORE_NICE lower with RESCORE_THREADS. Both are relative to
the niceness ``livetrain worker`` started with. RQ runs each job in a forked work horse: it inherits the
niceness, and the torch thread count is set again in it (cheap, and certain whatever the OpenMP runtime
does across fork).

Redis restarted or unreachable: RQ's own wait for a job rides it out, but its work loop quits on a Redis error
anywhere else (a heartbeat while a job runs, its bookkeeping after a job). ``run_worker`` is therefore a
supervisor: the heartbeats of a running job tolerate a lost Redis (the job goes on), and when the RQ worker
quits for any reason but a stop request, it waits for Redis, queues the catch-up sessions again (a full
sync: what was labeled while Redis was down is found) and starts a fresh RQ worker. The process never
exits for good on its own.

CUDA: this parent process never touches it (not even ``torch.cuda.is_available()``, which calls cuInit):
CUDA does not survive a fork, so each work horse picks its device (DEVICE) and initialises CUDA itself.
``fork_work_horse`` logs an error if something broke that rule.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import redis
import torch
from rq import Worker

from backend.jobs.connection import connect, redis_url_for, wait_for_redis
from backend.jobs.queue import job_queue, rescore_queue
from backend.settings import Settings

log = logging.getLogger(__name__)

CHECK_EVERY = 2.0  # seconds between checks that the re-scoring worker still runs
RESTART_AFTER = 10.0  # a child that keeps dying at once (bad settings, Redis gone) is restarted at most this often
PUBSUB_POLL = 1.0  # seconds: how soon the worker's command thread (RQ's pubsub) sees a stop
STOP_TIMEOUT = 20.0  # seconds the child gets to finish its job after the training worker stopped


class LivetrainWorker(Worker):
    """An RQ worker whose work horses run with ``torch_threads`` torch threads and that passes a stop
    request on to ``companion`` (the re-scoring worker it started), so that both stop together."""

    torch_threads: int = 1
    companion: "RescoreWorkerChild | None" = None
    stop_requested_by_signal = False  # SIGTERM/SIGINT: run_worker must not start it again

    def maintain_heartbeats(self, job, execution):
        # Called every job_monitoring_interval while a job runs. RQ lets a Redis error here end the worker,
        # leaving the work horse unwatched; the job may well outlive a Redis restart, so keep waiting for it.
        try:
            super().maintain_heartbeats(job, execution)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("job %s: no heartbeat, Redis is unavailable (%s); the job goes on", job.id, exc)

    def subscribe(self):
        # RQ's own: the same, but its pubsub thread waits 60 s per poll, and once unsubscribed it waits that long
        # for a subscription before it looks at its stop flag, so a warm shutdown took up to a minute longer
        # (longer than `docker stop` waits). A poll a second lets teardown join it within a second.
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=PUBSUB_POLL, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    def fork_work_horse(self, job, queue):
        if torch.cuda.is_initialized():  # a flag, no CUDA call: the horse could not use the GPU
            log.error("CUDA was initialised in the worker process before forking a work horse; CUDA jobs will "
                      "fail in it (nothing may call torch.cuda before the fork)")
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job, queue):
        torch.set_num_threads(self.torch_threads)
        super().main_work_horse(job, queue)

    def request_stop(self, signum, frame):  # first SIGTERM/SIGINT: warm shutdown, after the running job
        LivetrainWorker.stop_requested_by_signal = True
        if self.companion is not None:
            self.companion.forward(signum)
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame):  # the second: cold shutdown, the running job is killed
        LivetrainWorker.stop_requested_by_signal = True
        if self.companion is not None:
            self.companion.forward(signum)
        super().request_force_stop(signum, frame)


class RescoreWorkerChild:
    """``livetrain worker --queue rescore`` as a child process of the training worker."""

    def __init__(self, redis_url: str, base_nice: int):
        self.command = [sys.executable, "-m", "backend.cli", "worker", "--queue", "rescore",
                        "--parent-pid", str(os.getpid()), "--base-nice", str(base_nice)]
        # the same Redis for certain: with REDIS_URL unset the child would otherwise look for the embedded one
        self.env = dict(os.environ, REDIS_URL=redis_url)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.stopping = False
        self.signalled: int | None = None  # the pid a stop request was forwarded to
        self.lock = threading.Lock()  # never taken in a signal handler: the main thread may hold it

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, name="rescore-worker-watch", daemon=True).start()

    def _spawn(self) -> None:
        # A process group of its own: when it dies, what it leaves (its RQ scheduler) goes with it (_reap).
        # Stop requests reach it through forward(), not through the terminal's or serve's process group.
        self.proc = subprocess.Popen(self.command, env=self.env, start_new_session=True)
        self.started = time.monotonic()
        log.info("started the re-scoring worker (pid %d)", self.proc.pid)

    def _watch(self) -> None:
        # Never returns: the child's PR_SET_PDEATHSIG fires when the *thread* that started it ends.
        while True:
            time.sleep(CHECK_EVERY)
            with self.lock:
                if self.stopping or self.proc.poll() is None or time.monotonic() - self.started < RESTART_AFTER:
                    continue
                log.warning("the re-scoring worker (pid %d) exited with %s; starting a new one", self.proc.pid,
                            self.proc.returncode)
                self._reap(self.proc)
                self._spawn()

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        """Kill what is left of a dead child's process group: RQ's scheduler process does not notice that
        its worker died. (A running work horse has a group of its own and finishes its job.)"""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def forward(self, signum: int) -> None:
        """From the training worker's signal handler: stop too (no restart from now on)."""
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)
            self.signalled = proc.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        with self.lock:  # after this, _watch starts nothing new
            self.stopping = True
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.signalled != proc.pid:  # a second SIGTERM would turn its warm shutdown into a cold one
            proc.send_signal(signal.SIGTERM)  # RQ's warm shutdown: it finishes its running job first
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        log.warning("the re-scoring worker (pid %d) still runs after %.0f s; stopping its job", proc.pid, timeout)
        proc.send_signal(signal.SIGTERM)  # a second one: RQ's cold shutdown, which also kills its work horse
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._reap(proc)
            proc.wait()


def set_share(what: str, niceness: int, threads: int) -> None:
    """Run at ``niceness`` (absolute) with ``threads`` torch threads (0 = one per CPU core)."""
    current, target = os.nice(0), min(niceness, 19)
    if target != current:
        try:
            os.nice(target - current)
        except OSError:  # lowering the niceness needs privileges
            log.warning("%s worker: cannot change niceness from %d to %d", what, current, target)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    log.info("%s worker: niceness %d, %d torch thread(s)", what, os.nice(0), torch.get_num_threads())


def stop_with_parent(parent_pid: int) -> None:
    """Linux: get SIGTERM when the parent dies, so that a killed training worker leaves no re-scoring
    worker behind (it finishes its running job, then exits)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: Settings, queue: str = "all", parent_pid: int | None = None,
               base_nice: int | None = None) -> int:
    """``livetrain worker --queue {all,training,rescore}``; ``parent_pid`` and ``base_nice`` are given to
    the re-scoring worker that ``all`` starts."""
    if parent_pid is not None:
        stop_with_parent(parent_pid)
    base = os.nice(0) if base_nice is None else base_nice
    connection = connect(settings)
    companion = None
    if queue == "all":  # started first: it imports torch while this process does too
        companion = RescoreWorkerChild(redis_url_for(settings), base)
        companion.start()
    try:
        # RQ forks a work horse per job: importing the SDK and torchvision once here instead of in every
        # horse saves 1-2 s at the start of each job.
        import label_studio_sdk  # noqa: F401
        import torchvision.models.detection  # noqa: F401

        if queue == "rescore":
            set_share("re-scoring", base + settings.rescore_nice, settings.rescore_threads)
        else:
            set_share("training", base + settings.train_nice, settings.training_threads)
        _supervise(settings, connection, queue, companion)
    finally:
        if companion is not None:
            # From here a further SIGTERM/SIGINT (e.g. serve's own after the one its process group got) is
            # passed on (RQ's cold shutdown there) instead of ending this process before its child.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: companion.forward(signum))
            companion.stop()
    return 0


def _supervise(settings: Settings, connection: redis.Redis, queue: str, companion: "RescoreWorkerChild | None") -> None:
    """Run the RQ worker; start a fresh one whenever it quits without a stop request (see the module doc)."""
    what = "re-scoring worker" if queue == "rescore" else "training worker"
    previous = None
    while True:
        try:
            wait_for_redis(connection, what)
            if previous is not None and previous.scheduler is not None:
                try:  # the old scheduler's lock would keep the new worker's scheduler off for a minute
                    previous.scheduler.release_locks()
                except Exception:
                    pass
            if queue != "rescore":
                _catch_up(settings, connection)  # also after Redis came back: a full sync finds what was missed
            worker = LivetrainWorker([rescore_queue(connection) if queue == "rescore" else job_queue(connection)],
                                     connection=connection)
            worker.companion = companion
            worker.torch_threads = torch.get_num_threads()
            previous = worker
            # The scheduler moves delayed jobs (retries while Label Studio is down) into their queue; each
            # worker's scheduler serves that worker's queue.
            worker.work(with_scheduler=True)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("%s: lost Redis (%s)", what, exc)
        if LivetrainWorker.stop_requested_by_signal:
            return
        log.warning("%s: the RQ worker quit; starting it again once Redis answers", what)
        time.sleep(1.0)


def _catch_up(settings: Settings, connection: redis.Redis) -> None:
    from backend.jobs.training import queue_known_projects

    queued = queue_known_projects(settings, connection)  # catch up with what happened while no worker ran
    if queued:
        log.info("queued a full sync and session for project(s) %s", ", ".join(queued))
