"""Recovery: no job is left without someone to finish it.

Two kinds of job need a hand, found by `reconcile` (when a worker starts, for its node) and by
`sweep` (beat, every minute, for every node):
- a job whose step or undo is held by a process that is gone, or alive but no longer at it
  (worker/liveness.py): a step before the job's commit is failed and undone; a commit step, or
  one after it, is sent again (the job only goes forward); an interrupted undo is sent again.
  A step Celery is redelivering (its pool process was killed, the worker lives) is left to
  that redelivery, which adopts the job;
- a job with nothing in progress that has not moved for STALE seconds while its next message
  is neither waiting in a queue nor recently taken (lost with a worker killed between steps,
  or sitting in kombu's `unacked` hash of a dead consumer until the 12 h visibility timeout):
  its next step is sent again (steps are guarded, so a duplicate is harmless), at most
  MAX_RESENDS times before the job is failed and undone; an undo is sent again, and a failed
  undo once its retry time has come.
A job waiting in the queue of a node that is down is waiting, not stuck: it runs when the
node is back, or is undone at once by `stork job cancel`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
import structlog

from drivers import nbd, transfer
from drivers.errors import StorkError
from drivers.guests import GuestStore
from worker import records
from worker.app import app, config, redis_client
from worker.broker import Pending, pending_messages
from worker.jobs import params, usage
from worker.jobs.kinds import KINDS
from worker.liveness import holder_alive, holding, process_alive
from worker.queues import SHARED_QUEUE
from worker.records import JobRecord, JobState, StateConflict
from worker.runner import (
    FINALIZE,
    committed,
    dispatch_undo,
    idle_undo_from,
    send_steps,
    start_undo,
    task_name,
    undo_task_name,
)

log = structlog.get_logger("stork.recovery")
STALE = 120  # seconds a job may sit with nothing in progress and no message on its way
MAX_RESENDS = 3  # times the next step is sent again before the job is failed


def next_task(job: JobRecord) -> str:
    """The task a job with nothing in progress waits for (a fused run may carry its step too)."""
    kind = KINDS[job.kind]
    if job.state == JobState.UNDOING:
        left = [i for i in job.undo if i not in job.undone]
        return undo_task_name(job.kind, kind.steps[left[0]].name) if left else FINALIZE
    return task_name(job.kind, job.steps[job.done])


def runs_step(p: Pending, job: JobRecord, step: str) -> bool:
    """Does the message run this step of the job: the step's own task, or a fused run that
    starts at an earlier step and goes through it?"""
    if p.task == task_name(job.kind, step):
        return True
    if p.through is None or step not in job.steps:
        return False
    names = [task_name(job.kind, s) for s in job.steps]
    return p.task in names and names.index(p.task) < job.steps.index(step) <= p.through


def awaited(job: JobRecord, p: Pending) -> bool:
    """Is the message what a job with nothing in progress waits for?"""
    if job.state == JobState.UNDOING:
        return p.task == next_task(job)
    return runs_step(p, job, job.steps[job.done])


def idle_action(job: JobRecord, now: float, pending: list[Pending]) -> str:
    """What a job with nothing in progress needs: "wait", "resend" or "fail"."""
    if job.kind not in KINDS or (job.state != JobState.UNDOING and job.done >= len(job.steps)):
        return "wait"  # not a record the sweep can reason about: left alone
    if any(awaited(job, p) and (p.since is None or now - p.since < STALE) for p in pending):
        return "wait"  # queued, or taken a moment ago
    if job.state == JobState.UNDOING and job.undo_retry:
        return "resend" if job.undo_retry.get("at", 0) <= now else "wait"
    if now - job.updated < STALE:
        return "wait"
    if job.state != JobState.UNDOING and job.resends >= MAX_RESENDS and not committed(KINDS[job.kind], job):
        return "fail"  # a job past its commit only goes forward: it is sent again instead
    return "resend"


def redelivered(job: JobRecord, pending: list[Pending], parent_alive: bool, now: float) -> bool:
    """Is the step a gone process held on its way to another one? Celery puts the message of
    a step whose pool process died back in its queue (reject on worker lost). So: the message
    is queued; or it is the original delivery (taken before the step started), still held by
    that process's worker, which lives and will put it back; or it was taken again since the
    step started, not long ago. A message taken by a consumer that died too is given up after
    STALE."""
    current = job.current or {}
    if "step" not in current:
        return False  # an undo: sending it again is harmless
    step, started = current.get("name", ""), current.get("since", now)

    def on_its_way(p: Pending) -> bool:
        if p.since is None:
            return True
        if p.since <= started:
            return parent_alive
        return now - p.since < STALE

    return any(runs_step(p, job, step) and on_its_way(p) for p in pending)


# what a record that is not as stork writes it raises (hand-written, another version's): one
# such record is skipped and logged, and stops no sweep (every other job is recovered as ever)
ODD = (StorkError, KeyError, IndexError, TypeError, ValueError, AttributeError)


def _require_shape(job: JobRecord) -> None:
    """TypeError where a field the sweep reads of every job is not as stork writes it (the
    sets of queues it gathers, the times it compares, would fail for every job at once)."""
    current = job.current if job.current is not None else {}
    if not isinstance(job.queues, list) or not all(isinstance(q, str) for q in job.queues):
        raise TypeError(f"queues {job.queues!r}: expected a list of queue names")
    if not isinstance(current, dict):
        raise TypeError(f"current {current!r}: expected a table")
    for what, value in (("updated", job.updated), ("current.since", current.get("since", 0.0))):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{what} {value!r}: expected a time")


def reconcile(r: redis.Redis, node: str | None = None) -> list[str]:
    """Recover what needs a hand (see the module docstring); with `node` (a worker starting),
    held jobs of that node only. Returns the ids it acted on."""
    acted, idle, held = [], [], []
    for job in _active_jobs(r):
        try:
            _require_shape(job)
            current = job.current or {}
            holder = current.get("worker")
            if holder is None:
                idle.append(job)
            elif (node is None or current.get("node") == node) and not holding(r, holder, job.id):
                held.append(job)
        except ODD as e:
            log.warning("sweep_skipped_job", job_id=job.id, error=repr(e))
    for job in _not_redelivered(r, held):
        try:
            _recover(r, job, job.current["worker"], job.current, starting=node is not None)
            log.warning("reconciled_job", job_id=job.id, state=str(job.state))
            acted.append(job.id)
        except StateConflict:
            continue  # it moved meanwhile
        except ODD as e:
            log.warning("sweep_skipped_job", job_id=job.id, error=repr(e))
    return acted + _nudge(r, idle)


def _active_jobs(r: redis.Redis, page: int = 200) -> Iterator[JobRecord]:
    """Every active job's record, a page per round trip; a record that cannot be read is
    skipped and logged (one odd record stops no sweep)."""
    ids = records.active_ids(r)
    for start in range(0, len(ids), page):
        chunk = ids[start:start + page]
        try:
            yield from records.load_many(r, chunk)
            continue
        except StorkError:
            pass  # one record of the page is odd: read them one by one to skip only it
        for job_id in chunk:
            try:
                yield records.load(r, job_id)
            except ODD as e:
                log.warning("sweep_skipped_job", job_id=job_id, error=repr(e))


def _not_redelivered(r: redis.Redis, held: list[JobRecord]) -> list[JobRecord]:
    """The held jobs whose step is not on its way to another process (which adopts the job)."""
    if not held:
        return []
    queues = {q for job in held for q in job.queues} | {SHARED_QUEUE}
    parents = {job.id: process_alive(r, job.current.get("parent")) for job in held}
    for look in range(2):
        pending, now = pending_messages(r, queues), time.time()
        held = [job for job in held if not redelivered(job, pending.get(job.id, []), parents[job.id], now)]
        if look or not any(parents[job.id] for job in held):
            return held
        # kombu moves a message between the unacked hash and its queue in two steps, and a
        # consumer takes one before it records it: where its worker lives, look once more
        time.sleep(1.0)
    return held


def _recover(r: redis.Redis, job: JobRecord, holder: str, current: dict[str, Any], starting: bool) -> None:
    kind, where = KINDS[job.kind], current.get("node")
    what = f"{'undo of ' if 'undo' in current else ''}step {current.get('name')}"
    if holder_alive(r, holder):
        lost = f"the process running {what} on node {where} gave it up"
    elif starting:
        lost = f"the worker on node {where} died during {what}"
    else:
        lost = f"the process running {what} on node {where} is gone"
    # the very start judged lost (its `since`): the same process may have ended it and started
    # the next undo meanwhile, which a guard on the holder alone would take over too
    very = {"owner": holder, **({"since": current["since"]} if "since" in current else {})}
    if job.state == JobState.RUNNING and (kind.steps[current["step"]].commit or committed(kind, job)):
        records.transition(r, job.id, (JobState.RUNNING,), guard={**very, "done": job.done}, current=None)
        send_steps(job, job.done)  # carried forward from the interrupted step
        lost += "; the step was sent again"
    elif job.state == JobState.RUNNING:
        start_undo(r, job, current["step"], JobState.FAILED, lost, {**very, "done": job.done}, own=False)
    elif job.state == JobState.UNDOING:
        records.transition(r, job.id, (JobState.UNDOING,), current=None,
                           guard={**very, "undone": len(job.undone), "undos": len(job.undo)})
        dispatch_undo(job)
        lost += "; the undo was sent again"
    _end_in_flower(current, lost)


def _end_in_flower(current: dict[str, Any], why: str) -> None:
    """End the lost process's task in Flower: a task whose worker died sends no end event of
    its own, and would show as running for ever. Sent as from that task's worker, where the
    task belongs. Best effort: the job record is the truth."""
    if not current.get("task") or not current.get("hostname"):
        return
    try:
        with app.events.default_dispatcher(hostname=current["hostname"]) as dispatcher:
            dispatcher.send("task-failed", uuid=current["task"], exception=why, traceback="")
    except Exception as e:
        log.warning("flower_end_event_lost", task=current["task"], error=str(e))


def _nudge(r: redis.Redis, idle: list[JobRecord]) -> list[str]:
    """Send again what jobs with nothing in progress wait for, where no message is on its way."""
    now = time.time()
    candidates = [job for job in idle if _action(job, now, []) != "wait"]
    if not candidates:
        return []
    pending = pending_messages(r, {q for job in candidates for q in job.queues} | {SHARED_QUEUE})
    acted = []
    for job in candidates:
        action = _action(job, now, pending.get(job.id, []))
        try:
            if action == "resend" and job.state == JobState.UNDOING:
                records.transition(r, job.id, (JobState.UNDOING,), guard={"idle": True})  # marks it moved
                dispatch_undo(job)
            elif action == "resend":
                records.transition(r, job.id, (JobState.QUEUED, JobState.RUNNING),
                                   guard={"idle": True, "done": job.done}, resends=job.resends + 1)
                send_steps(job, job.done)
            elif action == "fail":
                start_undo(r, job, idle_undo_from(KINDS[job.kind], job), JobState.FAILED,
                           f"no worker took step {job.steps[job.done]} (sent {job.resends + 1} times)",
                           {"idle": True, "done": job.done}, own=False)
            else:
                continue
        except StateConflict:
            continue  # it moved meanwhile
        except ODD as e:
            log.warning("sweep_skipped_job", job_id=job.id, error=repr(e))
            continue
        log.warning("nudged_job", job_id=job.id, action=action, state=str(job.state))
        acted.append(job.id)
    return acted


def _action(job: JobRecord, now: float, pending: list[Pending]) -> str:
    """idle_action, "wait" for a record it cannot reason about (logged)."""
    try:
        return idle_action(job, now, pending)
    except ODD as e:
        log.warning("sweep_skipped_job", job_id=job.id, error=repr(e))
        return "wait"


def sweep() -> list[str]:
    """Recover jobs anywhere in the cluster, so none waits for its node's worker to restart;
    drop name claims of jobs that ended without releasing them; remove the temp files crashed
    writers left among the guest configs and bring their volume index up to them (a shared
    directory: one node sweeps it for all)."""
    r, cfg = redis_client(), config()
    usage.prune_claims(r, cfg.storages)
    guests = GuestStore(cfg.guests_dir, cfg.lock_timeout)
    try:
        guests.sweep_temps()
    except OSError as e:  # litter, never worth a sweep: jobs are recovered all the same
        log.warning("guest_temps_not_swept", error=str(e))
    try:
        guests.refresh_index()
    except (OSError, StorkError) as e:  # the checks read more configs until a refresh works: never unsafe
        log.warning("guest_index_not_refreshed", error=str(e))
    except Exception:  # whatever it meets (a bug, a config no reader foresaw), jobs are recovered all the same
        log.exception("guest_index_not_refreshed")
    return reconcile(r)


SWEEP = 60.0  # seconds between sweeps, cluster-wide
SWEEP_KEY = "stork:sweep"  # set for SWEEP seconds by whoever swept last


def periodic_sweep() -> list[str]:
    """The sweep as beat's task and each worker's main process run it: at most once per SWEEP
    seconds in the whole cluster, whoever comes first (so a cluster whose pool processes are
    all busy with long copies still sweeps, from the workers' main processes)."""
    if not redis_client().set(SWEEP_KEY, "1", nx=True, ex=int(SWEEP) - 5):
        return []
    return sweep()


def end_exports_of_failed_jobs(r: redis.Redis) -> int:
    """Stop this machine's exports (drivers/transfer.py) of jobs being undone: the undo that
    stops them may wait behind one on a node that is down, and an export serves nobody once
    its job fails. Every node runs it (only the node holding an export can stop it; stop
    acts only on the very process the record names, so another node's record is a no-op).
    Returns how many it stopped."""
    stopped = 0
    for job_id in r.zrange(records.state_index(JobState.UNDOING), 0, -1):  # the few being undone, not every job
        try:
            job = records.load(r, job_id)
            if job.state != JobState.UNDOING:
                continue
            params.check_record(job)  # a record is input: what it names is checked before a signal is sent
            for data in (job.ctx.get("exports") or {}).values():
                export = transfer.Export.from_dict(data)
                if transfer.running(export):
                    transfer.stop(export)
                    stopped += 1
                    log.warning("export_stopped", job_id=job.id, export=export.name)
        except ODD as e:
            log.warning("sweep_skipped_job", job_id=job_id, error=repr(e))
    return stopped


def start_sweeper() -> None:
    """Sweep from a daemon thread of this (main) worker process, for as long as it lives;
    this node's exports of failed jobs are ended, and its steps' stale qemu-nbd socket folders
    removed, every time (not once per cluster)."""

    def loop() -> None:
        while True:
            time.sleep(SWEEP / 2)
            try:
                end_exports_of_failed_jobs(redis_client())
                periodic_sweep()
                nbd.remove_stale_folders()
            except Exception as e:  # a sweep that failed is tried again next time
                log.warning("sweep_failed", error=repr(e))

    threading.Thread(target=loop, name="stork-sweeper", daemon=True).start()
