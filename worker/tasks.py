"""Celery tasks, generated from the job kinds: `stork.<kind>.<step>` for every step (which
also runs the steps after it up to a `through` index: a fused run, worker.runner.send_steps),
`stork.<kind>.undo_<step>` for every undo, and `stork.job.finalize`.

Each takes the job id first (recovery and the dead-letter check read `args[0]`) and a
`label` keyword it ignores: the job in words, for Flower's task list (worker.records.task_label).

What Flower shows of a task is what Celery's event state keeps, and only Celery's own task
fields (state, args, kwargs, result, exception, times) reach its pages and its API. So:
- progress: a `task-progress` event makes the task's state PROGRESS (a custom state) and
  carries `result`, a line of percent, bytes and rate, which the task list and the task
  page show (StorkTask.send_event);
- an end: Celery sends no event at all for a task that raises Ignore (a cancelled step, a
  step taken over, a duplicate), which would leave it STARTED or PROGRESS for ever, so
  `_final_state` sends one: `task-cancelled` (state CANCELLED), `task-failed` (FAILURE) or
  `task-ignored` (IGNORED, Celery's own name for it), with the reason. They are custom
  states or FAILURE because Celery ranks REVOKED below any custom state: a `task-revoked`
  after a PROGRESS would not change the state Flower shows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import redis
import structlog
from celery import Task
from celery.exceptions import Ignore

from drivers.errors import StorkError
from worker import notify, records, recovery, runner
from worker.app import app, config, redis_client
from worker.jobs import schedules
from worker.jobs.kinds import KINDS, JobKind
from worker.queues import SHARED_QUEUE
from worker.records import JobState

SWEEP = recovery.SWEEP  # seconds between sweeps for stuck jobs
SCHEDULE_TICK = 60.0  # seconds between looks at the backup schedules
log = structlog.get_logger("stork.worker")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def progress_text(fields: dict[str, Any]) -> str:
    """A progress event as one line, percent first (Flower's list cuts long cells), e.g.
    "42.0% 1.0 GiB of 2.4 GiB, 120.0 MiB/s (scsi0: local:100/vm-100-disk-0.raw)"."""
    try:
        done, total, rate = int(fields.get("done", 0)), int(fields.get("total", 0)), int(fields.get("rate", 0))
        percent = f"{100 * done / total:.1f}% " if total > 0 else ""
        message = f" ({fields['message']})" if fields.get("message") else ""
        data = f" (data {human_bytes(int(fields['data_done']))} of {human_bytes(int(fields['data_total']))})" \
            if "data_total" in fields else ""
        return f"{percent}{human_bytes(done)} of {human_bytes(total)}{data}, {human_bytes(rate)}/s{message}"
    except (TypeError, ValueError):
        return ""


class StorkTask(Task):
    """Base of every job task: its progress events carry a line that Flower shows, and a
    refusal or failure stork explains (StorkError, a file system's error, Redis away) is expected:
    Celery logs it in one line ("raised expected"), keeping tracebacks for bugs."""

    throws = (StorkError, OSError, redis.RedisError)  # a file system's refusal, Redis away: said, not bugs

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Flower's RESULT column shows a task's last progress line: a failed step says its error
        there instead (an event that changes no state, as progress does)."""
        with contextlib.suppress(Exception):  # an event is never worth more than the failure itself
            self.send_event("task-progress", retry=False, result=f"failed: {exc}"[:300])  # Redis away: no wait

    def send_event(self, type_: str, retry: bool = True, retry_policy: Any = None, **fields: Any) -> Any:
        if type_ == "task-progress" and "result" not in fields:
            fields["result"] = progress_text(fields)
            self.request.stork_progress = fields["result"]  # for the end event, should the step stop
        return super().send_event(type_, retry=retry, retry_policy=retry_policy, **fields)


def _why_stopped(task: Task, job_id: str, undo: int | None, started: float) -> tuple[str, dict[str, str]]:
    """The event that ends a task that raised Ignore, and its reason, from the job record."""
    try:
        job = records.load(redis_client(), job_id)
    except Exception as e:  # unknown, forged or unreadable: the task did not run all the same
        return "task-ignored", {"result": f"not run: {e}"}
    last = getattr(task.request, "stork_progress", "")
    if undo is not None:
        retry = job.undo_retry
        if retry.get("index") == undo and job.updated >= started:  # recorded while this task ran
            return "task-failed", {"exception": f"{retry.get('error', 'undo failed')} (tried again later)"}
        return "task-ignored", {"result": f"not run: job {job.id} is {job.state}, this undo is not due here"}
    ending = JobState(job.final) if job.state == JobState.UNDOING and job.final else job.state
    if ending == JobState.CANCELLED:
        return "task-cancelled", {"result": " at ".join(filter(None, [job.error or "cancelled", last]))}
    if ending == JobState.FAILED:
        return "task-failed", {"exception": f"job failed: {job.error}"}
    return "task-ignored", {"result": f"not run: job {job.id} is {job.state} with {job.done} of "
                                      f"{len(job.steps)} steps done (a duplicate, or the step runs elsewhere)"}


@contextlib.contextmanager
def _final_state(task: Task, job_id: str, undo: int | None = None) -> Iterator[None]:
    """Send an end event for a task that raises Ignore (Celery sends none; see the docstring)."""
    started = time.time()
    try:
        yield
    except Ignore:
        try:
            event, fields = _why_stopped(task, job_id, undo, started)
            task.send_event(event, **fields)
        except Exception as e:  # Flower's view, best effort: the job record is the truth
            log.warning("final_event_lost", job_id=job_id, error=str(e))
        raise


def _register(kind: JobKind, index: int) -> None:
    step = kind.steps[index]

    @app.task(name=runner.task_name(kind.name, step.name), bind=True, base=StorkTask)
    def run(self: Task, job_id: str, label: str = "", through: int | None = None) -> None:
        with _final_state(self, job_id):
            last = through if isinstance(through, int) and not isinstance(through, bool) else index
            runner.run_steps(self, job_id, kind, index, last)

    if step.undo is not None:

        @app.task(name=runner.undo_task_name(kind.name, step.name), bind=True, base=StorkTask)
        def undo(self: Task, job_id: str, step_index: int, label: str = "") -> None:
            with _final_state(self, job_id, index):
                if step_index != index:  # the message is input: it undoes this task's own step, or nothing
                    log.warning("undo_of_another_step", job_id=job_id, task=self.name, step_index=step_index)
                    raise Ignore()
                runner.run_undo(self, job_id, kind, index)


for _kind in KINDS.values():
    for _index in range(len(_kind.steps)):
        _register(_kind, _index)


@app.task(name=runner.FINALIZE, base=StorkTask)
def finalize(job_id: str, label: str = "") -> None:
    runner.finalize(job_id)


@app.task(name="stork.job.sweep", expires=SWEEP)
def sweep() -> list[str]:
    """Recover jobs stuck on a dead process anywhere (sent by beat every SWEEP seconds)."""
    return recovery.periodic_sweep()


@app.task(name="stork.schedule.tick", expires=SCHEDULE_TICK)
def schedule_tick() -> list[str]:
    """Start the scheduled backups that are due, and their prunes (sent by beat every minute;
    a slot is run once however many beats send it: worker/jobs/schedules.py)."""
    return schedules.tick(config(), redis_client(), app)


@app.task(name=notify.TASK, autoretry_for=(notify.DeliveryError,), retry_backoff=5, retry_backoff_max=300,
          max_retries=8, retry_jitter=False)
def notify_send(target: str, event: dict) -> None:
    """Deliver one alert to one target (worker/notify.py); a network error is tried again
    after 5, 10, 20, ... seconds (at most 5 minutes apart, 8 times)."""
    notify.deliver(config(), target, event)


app.conf.beat_schedule = {
    "stork-sweep": {"task": "stork.job.sweep", "schedule": SWEEP, "options": {"queue": SHARED_QUEUE}},
    "stork-schedules": {"task": "stork.schedule.tick", "schedule": SCHEDULE_TICK, "options": {"queue": SHARED_QUEUE}},
}


@app.task(name="stork.noop")
def noop(token: str | None = None) -> None:
    """Does nothing; with a token, signals `stork:noop:<token>` (the benchmarks' reference
    chain, and a way to check that a queue is served)."""
    if token:
        r = redis_client()
        r.rpush(f"stork:noop:{token}", 1)
        r.expire(f"stork:noop:{token}", 3600)
