"""The floor under the distributed runner's cost per job: a bare Celery round trip, no prunehub code and no database.

The distributed runner moves each job through two broker hops: the coordinator's advance sends ``evaluations.run``,
the evaluation worker's job sends the next ``experiments.run`` back. Here two bare Celery workers do only that: a
coordinator (queue ``bare.coordinate``) and an evaluator (``bare.evaluate``), each one prefork process with
prunehub's reliability settings (late acks, one message prefetched, JSON), on the same Redis. A task hands the job
counter to the other queue until it reaches zero; the last one pushes its end time to a Redis list. Reported: wall
time per job (two hops) after a warm-up, the median of ``--rounds``.

    python -m bench.bare_celery [--jobs 200] [--rounds 3]

``bench.orchestration_ab`` prints this figure as a reference line next to the distributed runner's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Processes, loadavg, service_env

REDIS_URL = os.environ.get("PRUNEHUB_BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
COORDINATE, EVALUATE = "bare.coordinate", "bare.evaluate"
DONE = "bench:bare_celery:done"


def make_app(broker_url: str) -> Any:
    """A Celery app configured as prunehub's workers are (``worker.celery_app``), with the two ping-pong tasks."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery("bare", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_queues=tuple(Queue(name, Exchange(name), routing_key=name) for name in (COORDINATE, EVALUATE)),
        task_default_queue=COORDINATE,
        broker_transport_options={"visibility_timeout": 3600},
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )

    @app.task(name=COORDINATE, acks_late=True, ignore_result=True)
    def coordinate(left: int) -> None:  # the advance: send the step's job, or report the end
        if left == 0:
            import redis

            redis.Redis.from_url(broker_url).rpush(DONE, repr(time.time()))
            return
        app.send_task(EVALUATE, args=[left], queue=EVALUATE)

    @app.task(name=EVALUATE, acks_late=True, ignore_result=True)
    def evaluate(left: int) -> None:  # the job: send the next advance
        app.send_task(COORDINATE, args=[left - 1], queue=COORDINATE)

    return app


def _round(app: Any, client: Any, jobs: int) -> float:
    client.delete(DONE)
    started = time.time()
    app.send_task(COORDINATE, args=[jobs], queue=COORDINATE)
    popped = client.blpop([DONE], timeout=max(60, jobs))
    if popped is None:
        raise RuntimeError(f"{jobs} bare round trips did not finish")
    return (float(popped[1]) - started) / jobs * 1e3


def run(jobs: int = 200, rounds: int = 3, warmup: int = 20) -> dict[str, Any]:
    """Start the two workers, run ``warmup`` jobs, then ``rounds`` runs of ``jobs``; ms per job (two hops)."""
    import redis

    assert REDIS_URL.rstrip("/").endswith("/5") or "PRUNEHUB_BENCH_REDIS_URL" in os.environ, "Redis db 5 only"
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    app = make_app(REDIS_URL)
    with tempfile.TemporaryDirectory(prefix="prunehub-bare-celery-") as tmp:
        home = Path(tmp)
        procs = Processes(home)
        env = service_env(home)
        try:
            for queue in (COORDINATE, EVALUATE):
                # The broker by argument: service_env passes no PRUNEHUB_* variable on (PRUNEHUB_BENCH_REDIS_URL).
                procs.spawn([sys.executable, "-m", "bench.bare_celery", "--worker", queue, "--broker", REDIS_URL], env,
                            f"{queue}.log")
            procs.wait_idle(timeout=60)
            _round(app, client, warmup)
            per_job = [_round(app, client, jobs) for _ in range(rounds)]
        finally:
            procs.stop()
            client.flushdb()
    return {"jobs": jobs, "rounds": rounds, "per_job_ms": [round(x, 2) for x in per_job],
            "median_per_job_ms": round(statistics.median(per_job), 2), "load": loadavg()}


def _worker(queue: str, broker_url: str) -> None:
    app = make_app(broker_url)
    app.worker_main(["worker", "--queues", queue, "--concurrency", "1", "--pool", "prefork", "--loglevel", "WARNING",
                     "--hostname", f"bare-{queue}-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a worker process this bench starts
    parser.add_argument("--broker", default=REDIS_URL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.broker)
    else:
        print(json.dumps(run(args.jobs, args.rounds)))
