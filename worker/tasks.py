"""Celery tasks, generated from the job kinds: `stork.<kind>.<step>` for every step,
`stork.<kind>.undo_<step>` for every undo, and `stork.job.finalize`."""

from __future__ import annotations

from celery import Task

from worker import recovery, runner
from worker.app import app
from worker.jobs import KINDS, JobKind
from worker.queues import SHARED_QUEUE

SWEEP = recovery.SWEEP  # seconds between sweeps for stuck jobs


def _register(kind: JobKind, index: int) -> None:
    step = kind.steps[index]

    @app.task(name=runner.task_name(kind.name, step.name), bind=True)
    def run(self: Task, job_id: str) -> None:
        runner.run_step(self, job_id, kind, index)

    if step.undo is not None:

        @app.task(name=runner.undo_task_name(kind.name, step.name), bind=True)
        def undo(self: Task, job_id: str, step_index: int) -> None:
            runner.run_undo(self, job_id, kind, step_index)


for _kind in KINDS.values():
    for _index in range(len(_kind.steps)):
        _register(_kind, _index)


@app.task(name=runner.FINALIZE)
def finalize(job_id: str) -> None:
    runner.finalize(job_id)


@app.task(name="stork.job.sweep", expires=SWEEP)
def sweep() -> list[str]:
    """Recover jobs stuck on a dead process anywhere (sent by beat every SWEEP seconds)."""
    return recovery.periodic_sweep()


app.conf.beat_schedule = {
    "stork-sweep": {"task": "stork.job.sweep", "schedule": SWEEP, "options": {"queue": SHARED_QUEUE}},
}


@app.task(name="stork.noop")
def noop(token: str | None = None) -> None:
    """Does nothing; with a token, signals `stork:noop:<token>` (the benchmarks' reference
    chain, and a way to check that a queue is served)."""
    if token:
        from worker.app import redis_client

        r = redis_client()
        r.rpush(f"stork:noop:{token}", 1)
        r.expire(f"stork:noop:{token}", 3600)
