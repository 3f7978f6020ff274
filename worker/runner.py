"""Running jobs: submit, the generic step / undo / finalize bodies, and undo dispatch.

A job's forward steps travel as one Celery chain of immutable signatures, each with its
queue set explicitly (a chain's later steps do not inherit the first one's queue). The job
record is the truth: a step starts only if exactly the steps before it are done and no live
process holds it (so a duplicate or a late redelivery never runs beside the original), and
records which node and process run it. A step that finds itself done already returns.
When a step fails or sees a cancel request, the steps done so far are undone in reverse (back
to the last completed commit step, after which the job's effect stands), as a second chain
of undo tasks on the same queues, ended by `stork.job.finalize`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis
import structlog
from celery import Celery, Task, chain
from celery.exceptions import Ignore

from drivers.config import Config
from drivers.errors import InvalidName, JobCancelled, NotFound, Refused, StorkError
from worker import broker, connect, events, liveness, notify, records
from worker.app import app, config, redis_client
from worker.context import StepContext
from worker.jobs import params, usage
from worker.jobs.kinds import KINDS, JobKind
from worker.jobs.prepare import refuse_foreign_folders
from worker.liveness import holding, process_id
from worker.queues import SHARED_QUEUE, node_queue
from worker.records import JobRecord, JobState, StateConflict, task_label

log = structlog.get_logger("stork.runner")
MAX_ATTEMPTS = 3  # a step redelivered more often than this (worker lost each time) fails the job
FINALIZE = "stork.job.finalize"


def task_name(kind: str, step: str) -> str:
    return f"stork.{kind}.{step}"


def undo_task_name(kind: str, step: str) -> str:
    return f"stork.{kind}.undo_{step}"


def submit(kind_name: str, options: dict[str, Any], cfg: Config, r: redis.Redis, sender: Celery = app) -> JobRecord:
    """Check the options, record the job and send its chain through `sender` (an app on the
    same Redis as `r`). StorkError when refused."""
    try:
        kind = KINDS[kind_name]
    except KeyError:
        raise StorkError(f"unknown job kind {kind_name!r} (known: {', '.join(KINDS)})") from None
    prepared = kind.prepare(dict(options), cfg)
    if (other := prepared.pop("runs_as", None)) is not None:
        kind = KINDS[other]  # e.g. a linked clone onto another node's storage runs as a replica_clone
    params.check(prepared)  # what the worker will check again; a mismatch is caught here, not there
    refuse_foreign_folders(prepared, cfg)
    record = JobRecord(
        id=records.new_id(), kind=kind.name, params=prepared, node=prepared["node"],
        steps=[s.name for s in kind.steps], queues=kind.queues(prepared, cfg), done=kind.next_step(prepared, -1),
    )
    queued = events.make(record.id, kind.name, "queued", state=JobState.QUEUED, steps=record.steps)
    # replicated before the job is sent or its id shown: a failover must not take back a job a user was told of
    try:
        connect.require_replicated(r, cfg.redis.wait_replicas, lambda client: records.create(client, record, queued),
                                   f"new job {record.id}")
    except connect.NotReplicated as e:
        raise connect.NotReplicated(f"{e}; {_end_unsent(r, cfg, record, str(e))}") from None
    try:
        send_steps(record, record.done, sender)
    except Exception as e:  # tried for SEND_PATIENCE (worker/failover.py): left, the sweep would send it later
        why = f"its message could not be sent: {str(e) or type(e).__name__}"
        raise StorkError(f"new job {record.id}: {why}; {_end_unsent(r, cfg, record, why)}") from None
    return record


def _end_unsent(r: redis.Redis, cfg: Config, record: JobRecord, why: str) -> str:
    """End a job that is not sent cancelled, where its record stands (the sweep sends again
    what an idle job waits for: it would run a job its user was told failed); what became of
    it, for that user. Best effort: Redis, or its replicas, may be away still."""
    error = f"not sent: {why}"
    ended = events.make(record.id, record.kind, events.FINISHED, state=JobState.CANCELLED, message=error)

    def cancel(client: redis.Redis) -> None:
        with contextlib.suppress(StateConflict):  # made again after a reconnect: cancelled by the first try
            records.transition(client, record.id, (JobState.QUEUED,), JobState.CANCELLED,
                               guard={"idle": True, "done": record.done}, error=error,
                               final=str(JobState.CANCELLED), finished=time.time(), events=[ended])

    try:
        connect.write_replicated(r, cfg.redis.wait_replicas, cancel)
        now = records.load(r, record.id)
    except (StorkError, redis.RedisError):
        return "it was not sent; if its record stands, it may still run: see `stork job show`"
    if now.state == JobState.CANCELLED and now.error == error:
        return "it was not sent, and is cancelled"
    return f"it was sent since, and is {now.state}: see `stork job show {record.id}`"


def send_steps(job: JobRecord, start: int, sender: Celery = app) -> None:
    """Send the job's steps from `start` on as one chain of tasks, each on its own queue, each
    running a run of steps (JobKind.runs): the task of the run's first step, told the last one
    (`through`). The job id stays the first argument (recovery and the dead-letter check read
    it); the label is also the kwargs' display form (`kwargsrepr`), so Flower's kwargs column
    reads as plain words, naming the steps a task runs when it runs more than one."""
    label = task_label(job)
    signatures = []
    for steps, queue in _runs(job, start):
        first, through = steps[0], steps[-1]
        shown = f"{label} (steps {', '.join(job.steps[i] for i in steps)})" if len(steps) > 1 else label
        kwargs = {"label": shown, **({"through": through} if through > first else {})}
        signatures.append(sender.signature(task_name(job.kind, job.steps[first]), args=[job.id], kwargs=kwargs,
                                           kwargsrepr=shown, queue=queue, immutable=True))
    chain(*signatures).apply_async()  # retried through a failover (worker/failover.py)


def _runs(job: JobRecord, start: int) -> list[tuple[list[int], str]]:
    """The tasks that run the job's steps from `start` on (JobKind.runs); for a record written
    by another version of stork, whose steps are not its kind's, one task per recorded step,
    each on its recorded queue: the first to run ends the job (`end_unaligned`)."""
    kind = KINDS[job.kind]
    if unaligned(kind, job) or len(job.queues) != len(job.steps):
        return [([i], job.queues[i]) for i in range(start, min(len(job.steps), len(job.queues)))]
    return kind.runs(job.params, job.queues, start)


def run_steps(task: Task, job_id: str, kind: JobKind, first: int, through: int) -> None:
    """Run steps `first` to `through` one after the other, each as `run_step` runs it (its own
    turn check, start, record, events and undo on failure); steps the job goes without, or
    done already (a redelivery), are passed over. A step that stops (failed, cancelled, taken
    elsewhere) raises, which ends the run. The heartbeat names the job for the whole run (from
    before the first start is recorded to after the last end is): between two steps the record
    names no holder, so that costs nothing, and it saves two Redis writes per step. Each step
    after the first starts from the record as the step before left it (`carried`), not read
    again: its start's guard says whether anything changed it meanwhile."""
    carried: JobRecord | None = None
    with liveness.working_on(redis_client(), job_id):
        for index in range(first, max(first, min(through, len(kind.steps) - 1)) + 1):
            carried = run_step(task, job_id, kind, index, carried)


def run_step(task: Task, job_id: str, kind: JobKind, index: int, carried: JobRecord | None = None) -> JobRecord | None:
    """Run step `index` of a job if it is its turn; undo the job if the step fails. Called by
    run_steps, whose heartbeat names the job throughout. `carried`: the record as this process
    finished the step before, to start from without reading it (None: read it). Returns the
    record as this step finished it."""
    cfg, r, me = config(), redis_client(), process_id()
    if carried is not None and carried.done > index:
        return carried  # a step the job goes without (kind.next_step passed it over)
    if carried is not None and carried.done == index and carried.current is None:
        # the step before left the job idle at this step: the start's guard checks that it still
        # is, and that no cancel came meanwhile (else the record is read, and acted on, as below)
        job, turn = carried, {"done": index, "idle": True, "uncancelled": True}
    else:
        job = _job_at_step(r, job_id, index)
        if job is None:
            return None  # a redelivery or duplicate of a finished step: the chain goes on harmlessly
        holder = (job.current or {}).get("worker")
        turn = {"done": index, **({"owner": holder} if holder else {"idle": True})}
    _refuse_or_cancel(r, job, kind, index, turn)
    _refuse_elsewhere(job, index, cfg.node, "step")  # `through` is input
    try:
        attempt = _start_step(r, cfg, job, kind, index, me, turn, _task_of(task))  # inside run_steps' working_on
    except _ReadAgain:
        return run_step(task, job_id, kind, index)
    ctx = StepContext(job=job, cfg=cfg, r=r, node=cfg.node, step=kind.steps[index].name, worker=me,
                      kinds=KINDS, attempt=attempt, task=task)
    _run(ctx, kind, index)
    # replicated (where replicas are configured) before the next step acts on it: a failover that
    # took it back would run this step again, from the record before it, over what the steps after
    # it made of its work (a copy over the disk a committed move switched a guest to). Not
    # confirmed in time, the run stops here (NotReplicated): the sweep goes on from the record
    # the master has, once the process no longer holds the job
    connect.require_replicated(r, cfg.redis.wait_replicas,
                               lambda client: _finish_step(client, job, kind, index, cfg.node, me),
                               f"the end of step {kind.steps[index].name} of job {job_id}")
    job.done, job.current = kind.next_step(job.params, index), None  # as the finish wrote them
    return job


def _refuse_elsewhere(job: JobRecord, index: int, node: str, what: str) -> None:
    """Ignore a step or undo whose queue is another node's: a message that carries it here was
    not sent by stork, and run here it would read the step's node-local volume ids as this
    node's (an undo would free a same-named volume)."""
    if job.queues[index] not in (SHARED_QUEUE, node_queue(node)):
        log.warning(f"{what}_not_for_this_node", job_id=job.id, step=job.steps[index], queue=job.queues[index])
        raise Ignore()


class _ReadAgain(Exception):
    """A carried record's start was refused: something changed the job since (a cancel, say)."""


def _job_at_step(r: redis.Redis, job_id: str, index: int) -> JobRecord | None:
    """The job if step `index` is its turn and no live process holds it; None if the step is
    done already; Ignore (the chain stops) otherwise."""
    try:
        job = _load_sent(r, job_id)
    except StorkError:
        log.warning("step_for_unknown_job", job_id=job_id)
        raise Ignore() from None
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        raise Ignore()  # failed, cancelled or being undone meanwhile: stop the chain
    if job.done > index:
        return None
    if job.done < index or holding(r, (job.current or {}).get("worker"), job_id):
        raise Ignore()  # a duplicate ahead of its turn, or the step runs in a live process
    return job


SECOND_LOOK = 2.0  # seconds: longer than a client takes to find a new master (worker/connect.py)


def _load_sent(r: redis.Redis, job_id: str) -> JobRecord:
    """The record of a job whose message we hold. Every job is recorded (and replicated) before
    its message is sent, so a record not found may only not have reached the node we read from
    yet, in the moment after a failover: look once more before calling the job unknown."""
    try:
        return records.load(r, job_id)
    except NotFound:
        if not connect.fails_over(r):  # one Redis: what is not there was never written
            raise
        time.sleep(SECOND_LOOK)
        return records.load(r, job_id)


def _refuse_or_cancel(r: redis.Redis, job: JobRecord, kind: JobKind, index: int, turn: dict[str, Any]) -> None:
    """Undo instead of starting the step when the record is not fit to act on, or cancelled."""
    if unaligned(kind, job):
        end_unaligned(r, job, (JobState.QUEUED, JobState.RUNNING), turn)
        raise Ignore()
    try:
        params.check_record(job)
    except StorkError as e:  # a record written to Redis by hand: nothing may act on it
        start_undo(r, job, index - 1, JobState.FAILED, str(e), turn)
        raise Ignore() from None
    interrupted = str(index) in job.attempts  # a previous attempt of this step died
    if job.cancel and not committed(kind, job) and not (interrupted and kind.steps[index].commit):
        start_undo(r, job, index if interrupted else index - 1, JobState.CANCELLED, "cancelled by user", turn)
        raise Ignore()


def unaligned(kind: JobKind, job: JobRecord) -> bool:
    """Was the job recorded with other steps than its kind has now (by another version of
    stork, before an upgrade)? Its step numbers then name other steps: none may be run or undone."""
    return job.steps != [step.name for step in kind.steps]


def end_unaligned(r: redis.Redis, job: JobRecord, states: tuple[JobState, ...], guard: dict[str, Any]) -> None:
    """End such a job failed, undoing nothing, and say what it had done (for a hand to clean up)."""
    error = (f"job recorded by another version of stork (steps {', '.join(job.steps)}): not run on, not undone; "
             f"it had done {', '.join(job.steps[:job.done]) or 'nothing'}; its record: {job.ctx or 'nothing made'}")
    with contextlib.suppress(StateConflict):
        ended = events.make(job.id, job.kind, events.FINISHED, state=JobState.FAILED, message=error)
        records.transition(r, job.id, states, JobState.FAILED, guard=guard, error=error, final=str(JobState.FAILED),
                           finished=time.time(), current=None, events=[ended])
    usage.release_claims(r, job)
    log.warning("job_unaligned", job_id=job.id, steps=job.steps)


def _task_of(task: Task) -> dict[str, str]:
    """The Celery task running a step or undo, as its record keeps it: should the process die,
    recovery ends that task in Flower (which otherwise shows it running for ever)."""
    request = task.request
    return {"task": request.id, "hostname": request.hostname} if request.id and request.hostname else {}


def _start_step(r: redis.Redis, cfg: Config, job: JobRecord, kind: JobKind, index: int, me: str,
                turn: dict[str, Any], task: dict[str, str]) -> int:
    """Record that this process runs the step (if it is still its turn); the attempt number.
    Held by Redis's replicas before the step acts, where they are configured (NotReplicated,
    the step not begun, where not in time): lost in a failover, a start would let a second
    worker take the step's message again and run it beside this one, and this process's saves
    and end would then be refused (the record no longer names it) while its effects stand."""
    step, node = kind.steps[index], cfg.node
    before = {"attempts": dict(job.attempts), "ran_on": dict(job.ran_on)}  # what a start given back leaves
    attempt = job.attempts.get(str(index), 0) + 1
    job.attempts[str(index)] = attempt
    job.ran_on[step.name] = node
    job.current = {"step": index, "name": step.name, "node": node, "worker": me, "attempt": attempt,
                   "parent": liveness.parent_id(), "since": time.time(), **task}
    structlog.contextvars.bind_contextvars(job_id=job.id, kind=kind.name, step=step.name, node=node)
    started = job.started or time.time()

    def start(client: redis.Redis) -> None:  # the same values each time: writing it again is a no-op
        try:
            records.transition(
                client, job.id, (JobState.QUEUED, JobState.RUNNING), JobState.RUNNING, guard=turn,
                events=[events.make(job.id, kind.name, "start", step=step.name, node=node, attempt=attempt,
                                    **({"task": task["task"]} if task else {}))],  # which Celery task: Flower's
                current=job.current, attempts=job.attempts, ran_on=job.ran_on, started=started,
                volumes=records.params_volumes(job.params),  # again: a job an older producer made is in no set
            )
        except StateConflict:
            now = records.load(client, job.id)
            holder = now.current or {}
            if (holder.get("worker"), holder.get("step"), holder.get("attempt")) == (me, index, attempt):
                return  # our start went through and only its reply was lost (a retry after a Redis blip)
            if turn.get("uncancelled") and now.done == index and now.current is None:
                raise _ReadAgain() from None  # idle at this step still: cancelled, or its state moved
            # another process took it first; or the record still shows this process on the
            # step before (a fused run whose finish a failover took back): not ours to run
            raise Ignore() from None

    try:
        connect.require_replicated(r, cfg.redis.wait_replicas, start, f"the start of step {step.name} of job {job.id}")
    except connect.NotReplicated as e:  # not begun: given back, for the sweep to send again (as a lost message),
        with contextlib.suppress(StorkError, redis.RedisError):  # as if never started (no attempt counted)
            records.transition(r, job.id, (JobState.RUNNING,), guard={"owner": me, "done": index}, current=None,
                               events=[events.make(job.id, kind.name, "not_begun", step=step.name, node=node,
                                                   message=str(e))], **before)
        raise
    if attempt > MAX_ATTEMPTS:  # (a commit's tries may have made its change: each undo checks what stands)
        start_undo(r, job, index, JobState.FAILED, f"step {step.name} was interrupted {attempt - 1} times",
                   {"owner": me})
        raise Ignore()
    return attempt


def _run(ctx: StepContext, kind: JobKind, index: int) -> None:
    """Run the step's function; on failure or cancel, start the undo."""
    r, job, mine = ctx.r, ctx.job, {"owner": ctx.worker}
    try:
        kind.steps[index].run(ctx)
    except JobCancelled:
        start_undo(r, job, index, JobState.CANCELLED, "cancelled by user", mine)
        raise Ignore() from None
    except StateConflict:
        raise Ignore() from None  # the job was taken from this step (reconciled): its undo owns it
    except StorkError as e:  # refused or failed as stork says why: one line, no traceback (StorkTask.throws)
        log.warning("step_failed", error=str(e))
        start_undo(r, job, index, JobState.FAILED, str(e), mine)
        raise
    except redis.RedisError as e:  # Redis away longer than the client's retries, or its replicas
        lost = str(e) if isinstance(e, connect.NotReplicated) else f"lost its connection to Redis: {e}"
        log.warning("step_failed", error=lost)
        start_undo(r, job, index, JobState.FAILED, f"step {ctx.step} stopped: {lost}", mine)
        raise
    except OSError as e:  # a file system's refusal: say which file, not a Python repr
        where = f"{e.filename}: " if e.filename else ""
        log.warning("step_failed", error=f"{where}{e.strerror or e}")
        start_undo(r, job, index, JobState.FAILED, f"step {ctx.step} failed: {where}{e.strerror or e}", mine)
        raise
    except Exception as e:
        log.exception("step_crashed")
        start_undo(r, job, index, JobState.FAILED, f"internal error in step {ctx.step}: {e!r}", mine)
        raise


def committed(kind: JobKind, job: JobRecord) -> bool:
    """Has a commit step of the job completed? (JobKind.committed)"""
    return kind.committed(job.done)


def idle_undo_from(kind: JobKind, job: JobRecord) -> int:
    """The step the undo of a job between steps starts at: the step before its next one; or,
    where that next one is a commit a process started and did not finish (it may have made
    its change: remove_disk frees the volume before its config drops it), that commit
    itself, whose own undo checks what stands, as for a step tried too often."""
    tried = job.done < len(kind.steps) and kind.steps[job.done].commit and str(job.done) in job.attempts
    return job.done if tried else job.done - 1


def _finish_step(r: redis.Redis, job: JobRecord, kind: JobKind, index: int, node: str, me: str) -> None:
    after = kind.next_step(job.params, index)
    last = after >= len(kind.steps)
    done = [events.make(job.id, kind.name, "done", step=kind.steps[index].name, node=node)]
    if last:
        done.append(events.make(job.id, kind.name, events.FINISHED, state=JobState.SUCCEEDED, result=job.result))
    try:
        records.transition(
            r, job.id, (JobState.RUNNING,), JobState.SUCCEEDED if last else None, events=done,
            guard={"owner": me, "done": index}, done=after, current=None, ctx=job.ctx, result=job.result,
            **({"finished": time.time()} if last else {}),
        )
    except StateConflict:
        now = records.load(r, job.id)
        if now.done <= index or now.state not in (JobState.RUNNING, JobState.SUCCEEDED):
            raise Ignore() from None  # failed by reconciliation while we ran: its undo owns it
        # else our finish went through and only its reply was lost: the chain goes on
    if last:
        usage.release_claims(r, job)
        log.info("job_succeeded")


def cancel(r: redis.Redis, job_id: str, sender: Celery = app) -> JobRecord:
    """Ask a job to stop. A running step sees the flag (long steps between chunks); a job
    between steps (whose next step may wait for a node that is down), or whose step's process
    is gone, is undone at once. Refused once the job has committed (its effect stands)."""
    job = records.load(r, job_id)
    kind = KINDS[job.kind]
    if job.state == JobState.UNDOING and job.undo_retry and not holding(r, (job.current or {}).get("worker"), job.id):
        return _stop_retrying(r, job)
    if job.state.terminal or job.state == JobState.UNDOING:
        raise Refused(f"job {job.id} is {job.state} already")
    if committed(kind, job):
        raise Refused(f"job {job.id} has committed its change: it can no longer be cancelled")
    records.request_cancel(r, job_id)
    current = job.current or {}
    holder = current.get("worker")
    if holder is None:
        start_undo(r, job, idle_undo_from(kind, job), JobState.CANCELLED, "cancelled by user",
                   {"idle": True, "done": job.done}, sender, own=False)
    elif not holding(r, holder, job.id) and not kind.steps[current["step"]].commit:
        start_undo(r, job, current["step"], JobState.CANCELLED, "cancelled by user",
                   {"owner": holder, "done": job.done}, sender, own=False)
    return records.load(r, job_id)


def withdraw(r: redis.Redis, job_id: str) -> JobRecord:
    """End at once a job that waits for a step no worker has taken and has nothing to undo (a
    ping of a node whose worker is down), and take that step's message out of its queue, so
    nothing is left behind for a worker that starts later. Refused for a job with a step in
    progress or something to undo: `cancel` is for those."""
    job = records.load(r, job_id)
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        raise Refused(f"job {job.id} is {job.state}: it cannot be withdrawn")
    if job.current:
        raise Refused(f"job {job.id} has a step in progress: it cannot be withdrawn")
    kind = KINDS[job.kind]  # a commit a process began and did not finish may have made its change: its undo is due
    if undo_plan(kind, job.done, idle_undo_from(kind, job), kind.skipped(job.params)):
        raise Refused(f"job {job.id} has steps to undo: cancel it instead")
    queue, step = _runs(job, job.done)[0][1], job.steps[job.done]  # the queue its task waits in
    error = f"withdrawn: no worker took step {step} from queue {queue}"
    records.transition(r, job.id, (JobState.QUEUED, JobState.RUNNING), JobState.CANCELLED,
                       guard={"idle": True, "done": job.done}, error=error, final=str(JobState.CANCELLED),
                       finished=time.time(),
                       events=[events.make(job.id, job.kind, events.FINISHED, state=JobState.CANCELLED, message=error)])
    broker.drop_queued(r, [queue], job.id)
    usage.release_claims(r, job)
    return records.load(r, job.id)


def _stop_retrying(r: redis.Redis, job: JobRecord) -> JobRecord:
    """An operator gives up on an undo that keeps failing: the job ends (failed, or cancelled
    if it was), listing what was not undone (then `stork guest unlock` frees its guests)."""
    kind = KINDS[job.kind]
    left = [i for i in job.undo if i not in job.undone]
    note = (f"not undone (retries stopped by user): {', '.join(kind.steps[i].name for i in left)}; "
            f"last error: {job.undo_retry.get('error', '?')}")
    records.transition(r, job.id, (JobState.UNDOING,), guard={"idle": True, "undone": len(job.undone)},
                       undone=job.undo, undo_errors=[*job.undo_errors, note], undo_retry={})
    finalize(job.id, r)
    return records.load(r, job.id)


def abandon(r: redis.Redis, job_id: str, node: str, sender: Celery = app) -> JobRecord:
    """An operator gives up a node that is gone for good for an undoing job: the undos it still
    has to run on that node's queue would wait there, and the job and its guests' locks with
    them. Those are dropped from its plan, each named in its error (what they would have undone
    there is left to the operator), their messages taken out of that queue; the others are sent
    again, and the job ends as its undo would have. Refused for a job not undoing, while one of
    its undos runs, and where none waits for that node. An undo of that node's that a worker
    took already, should the node come back, finds it not the job's next and does nothing."""
    job = records.load(r, job_id)
    kind = KINDS[job.kind]
    if job.state == JobState.RUNNING and committed(kind, job):
        return _abandon_committed(r, job, kind, node, sender)
    if job.state != JobState.UNDOING:
        hint = " (`stork job cancel` undoes it)" if not job.state.terminal and not committed(kind, job) else ""
        raise Refused(f"job {job.id} is {job.state}: only the undos of an undoing job can be given up{hint}")
    holder = (job.current or {}).get("worker")
    if holding(r, holder, job.id):
        raise Refused(f"job {job.id} is running its undo of {job.current['name']} now: try again once it ended")
    queue = node_queue(node)
    dropped = [i for i in job.undo if i not in job.undone and job.queues[i] == queue]
    if not dropped:
        raise Refused(f"job {job.id} has no undo left to run on node {node}")
    note = f"not undone (node {node} given up by user): {', '.join(kind.steps[i].name for i in dropped)}"
    turn = {"undone": len(job.undone), "undos": len(job.undo),
            **({"idle": True} if holder is None else {"owner": holder})}
    retry = {"undo_retry": {}} if job.undo_retry.get("index") in dropped else {}  # another's backoff stands
    try:
        records.transition(r, job.id, (JobState.UNDOING,), guard=turn,
                           events=[events.make(job.id, job.kind, "abandon", node=node, message=note)],
                           undo=[i for i in job.undo if i not in dropped], undo_errors=[*job.undo_errors, note],
                           current=None, **retry)
    except StateConflict:
        raise Refused(f"job {job.id} changed meanwhile (an undo started or ended): try again") from None
    broker.drop_queued(r, [queue], job.id)
    job = records.load(r, job.id)
    if set(job.undo) - set(job.undone):
        dispatch_undo(job, sender)  # the rest, on queues that are served
    else:
        finalize(job.id, r)
    return records.load(r, job.id)


def _abandon_committed(r: redis.Redis, job: JobRecord, kind: JobKind, node: str, sender: Celery) -> JobRecord:
    """A running job past its commit, whose steps left all wait on a node gone for good (a
    migration's free of the originals on the node it left): it can be neither cancelled nor
    undone, and would hold its claims, and name the volumes it made as its own, for ever. Those
    steps are not run, their messages taken out of that queue, and the job ends succeeded, its
    commit standing; its result's `not_run` names them (what they would have done there, such
    as the volumes it would have freed, is left to the operator: `job show` lists them)."""
    holder = (job.current or {}).get("worker")
    if holding(r, holder, job.id):
        raise Refused(f"job {job.id} is running step {job.current['name']} now: try again once it ended")
    queue, left = node_queue(node), _steps_left(kind, job)
    if not any(job.queues[i] == queue for i in left):
        return _send_elsewhere(r, job, node, sender)
    if elsewhere := [f"{job.steps[i]} ({job.queues[i]})" for i in left if job.queues[i] != queue]:
        raise Refused(f"job {job.id} has steps left on other queues than node {node}'s: {', '.join(elsewhere)}")
    note = (f"{', '.join(job.steps[i] for i in left)} not run (node {node} given up by user): what "
            f"{'they' if len(left) > 1 else 'it'} would have done there is left to you")
    if isinstance(vmid := job.params.get("lock_vmid"), int):  # a restore --force unlocks its guest last
        note += f"; guest {vmid}, where it is still locked by this job, is freed by 'stork guest unlock {vmid}'"
    result = {**job.result, "not_run": note}
    turn = {"done": job.done, **({"owner": holder} if holder else {"idle": True})}
    try:
        records.transition(r, job.id, (JobState.RUNNING,), JobState.SUCCEEDED, guard=turn, current=None,
                           result=result, finished=time.time(),
                           events=[events.make(job.id, job.kind, "abandon", node=node, message=note),
                                   events.make(job.id, job.kind, events.FINISHED, state=JobState.SUCCEEDED,
                                               result=result)])
    except StateConflict:
        raise Refused(f"job {job.id} changed meanwhile (a step started or ended): try again") from None
    broker.drop_queued(r, [queue], job.id)
    usage.release_claims(r, job)
    return records.load(r, job.id)


def _send_elsewhere(r: redis.Redis, job: JobRecord, node: str, sender: Celery) -> JobRecord:
    """A committed job whose steps left run on any node (unlock_guest), where the message that
    carries them waits in the queue of `node`, gone for good: fused with the node step before
    them, it went back there when its process died after that step. Taken out, they are sent
    again on queues that are served, and the job goes on (before, it waited for ever, its
    guest locked: neither cancelled, past its commit, nor abandoned, its steps not node's).
    A process that died in one of those steps (the caller checked it is not at it) is let go:
    the message went back to that queue, where the sweep takes it for on its way."""
    if not broker.drop_queued(r, [node_queue(node)], job.id):  # none there, or a consumer took it meanwhile
        raise Refused(f"job {job.id} has no step left to run on node {node}")
    holder = job.current or {}
    turn: dict[str, Any] = {"done": job.done, **({"since": holder["since"]} if "since" in holder else {}),
                            **({"owner": holder["worker"]} if holder.get("worker") else {"idle": True})}
    note = f"steps sent again, their message taken out of node {node}'s queue (node given up by user)"
    try:
        records.transition(r, job.id, (JobState.RUNNING,), guard=turn, current=None, resends=job.resends + 1,
                           events=[events.make(job.id, job.kind, "abandon", node=node, message=note)])
    except StateConflict:  # moved on meanwhile (the sweep sent it): the message taken out was not needed
        raise Refused(f"job {job.id} changed meanwhile (a step started or ended): try again") from None
    send_steps(job, job.done, sender)
    return records.load(r, job.id)


def _steps_left(kind: JobKind, job: JobRecord) -> list[int]:
    """The steps a job has still to run, in order (those it goes without passed over)."""
    left, index = [], job.done
    while index < len(kind.steps):
        left.append(index)
        index = kind.next_step(job.params, index)
    return left


def undo_plan(kind: JobKind, done: int, upto: int, skipped: frozenset[int] = frozenset()) -> list[int]:
    """The undos a failure at step `upto` runs, in order, when `done` steps are done: each
    step with an undo back to the last completed commit step, then the steps before that
    commit whose undo releases what they hold (a guest lock). Steps the job went without
    (`skipped`) have nothing to undo."""
    committed = max((i for i in range(min(done, upto + 1)) if kind.steps[i].commit), default=-1)
    undo = [i for i in range(upto, committed, -1) if kind.steps[i].undo is not None and i not in skipped]
    return undo + [i for i in range(committed, -1, -1) if i < done and kind.steps[i].release]


def start_undo(r: redis.Redis, job: JobRecord, upto: int, final: JobState, error: str,
               guard: dict[str, Any], sender: Celery = app, own: bool = True) -> None:
    """Fail or cancel a job: undo steps upto, upto-1, ... (those that have an undo), back to
    the last commit step that completed; steps before it that hold something (a guest lock)
    are released all the same. Does nothing if the guard fails (see transition): every caller
    says which state of the job it decided on. `own`: the caller is the process that ran the
    step, and its ctx and result go with the failure; any other (the sweep, a cancel) leaves
    them as the record has them, since its copy may be older than a save the step made
    after it was read (the guard does not see a save), and the undo must know all it made."""
    kind = KINDS[job.kind]
    undo = undo_plan(kind, job.done, upto, kind.skipped(job.params))
    # with what the failing step found (a verify's damaged backups, each named)
    found = {"ctx": job.ctx, "result": job.result} if own else {}
    try:
        records.transition(
            r, job.id, (JobState.QUEUED, JobState.RUNNING), JobState.UNDOING, guard=guard,
            events=[events.make(job.id, job.kind, "failed", state=JobState.UNDOING, message=error)],
            error=error, final=str(final), undo=undo, undone=[], current=None, **found,
        )
    except StateConflict:
        return  # someone else is failing it already, or it moved on
    log.info("job_undo", job_id=job.id, error=error, undo=[kind.steps[i].name for i in undo])
    job.undo, job.undone = undo, []
    dispatch_undo(job, sender)


def dispatch_undo(job: JobRecord, sender: Celery = app) -> None:
    """Send the chain of undo tasks not yet done, ended by finalize. Sending it twice is
    harmless: an undo runs only while no other undo of the job does, and once."""
    kind = KINDS[job.kind]
    label = task_label(job)
    signatures = [
        sender.signature(undo_task_name(kind.name, kind.steps[i].name), args=[job.id, i], kwargs={"label": label},
                         kwargsrepr=label, queue=job.queues[i], immutable=True)
        for i in job.undo if i not in job.undone
    ]
    signatures.append(sender.signature(FINALIZE, args=[job.id], kwargs={"label": label}, kwargsrepr=label,
                                       queue=SHARED_QUEUE, immutable=True))
    chain(*signatures).apply_async()  # retried through a failover (worker/failover.py)


UNDO_BACKOFF = (60, 600)  # a failed undo is tried again after 1, 2, 4, ... minutes, at most 10


def run_undo(task: Task, job_id: str, kind: JobKind, index: int) -> None:
    """Run undo `index` if it is the job's next one and no live process runs another. A refusal
    (e.g. a volume kept because something uses it) is noted and the undo goes on; any other
    failure stops the chain, to be tried again by the sweep after a backoff."""
    cfg, r, me = config(), redis_client(), process_id()
    job = records.load(r, job_id)
    if job.state == JobState.UNDOING and unaligned(kind, job):
        end_unaligned(r, job, (JobState.UNDOING,), {"idle": True} if not (job.current or {}).get("worker") else
                      {"owner": job.current["worker"]})
        return
    step = kind.steps[index]
    if job.state != JobState.UNDOING or index in job.undone or step.undo is None:
        return
    if next((i for i in job.undo if i not in job.undone), None) != index or job.undo_retry.get("at", 0) > time.time():
        raise Ignore()  # undos run in order, and a failed one waits for its retry time
    _refuse_elsewhere(job, index, cfg.node, "undo")
    structlog.contextvars.bind_contextvars(job_id=job_id, kind=kind.name, step=f"undo_{step.name}", node=cfg.node)
    holder = (job.current or {}).get("worker")
    if holding(r, holder, job_id):
        raise Ignore()  # another undo of this job runs: its chain goes on
    with liveness.working_on(r, job_id):
        turn = {"undone": len(job.undone), "undos": len(job.undo),  # a plan shortened since (abandon) is seen
                **({"owner": holder} if holder else {"idle": True})}
        _start_undo_step(r, cfg, job, kind, index, me, turn, _task_of(task))
        ctx = StepContext(job=job, cfg=cfg, r=r, node=cfg.node, step=f"undo_{step.name}", worker=me,
                          kinds=KINDS, task=task)
        try:
            params.check_record(job)
            step.undo(ctx)
        except (Refused, InvalidName) as e:  # a decision that stands: noted in the job's error
            _undone(r, job, index, me, note=f"undo of {step.name}: {e}")
        except StateConflict:
            raise Ignore() from None  # taken over (its save refused): the undo is its successor's
        except Exception as e:
            log.exception("undo_failed")
            _retry_later(r, job, index, me, f"undo of {step.name}: {e}")
            raise Ignore() from None
        else:
            _undone(r, job, index, me)


def _start_undo_step(r: redis.Redis, cfg: Config, job: JobRecord, kind: JobKind, index: int, me: str,
                     turn: dict[str, Any], task: dict[str, str]) -> None:
    """Record that this process runs undo `index` (Ignore where it is not its turn), held by
    Redis's replicas before the undo acts, as a step's start is: a master cut off from them
    (a partition) may be replaced meanwhile, where the job's step is carried forward, and an
    undo run from the old master's record (a copy freed) would take what that step then
    attaches. Unconfirmed, it is given back for the sweep to send again (NotReplicated)."""
    step = kind.steps[index]
    current = {"undo": index, "name": step.name, "node": cfg.node, "worker": me, "since": time.time(), **task}

    def start(client: redis.Redis) -> None:  # made again after a reconnect: the same start
        try:
            records.transition(client, job.id, (JobState.UNDOING,), guard=turn, current=current,
                               events=[events.make(job.id, kind.name, "undo", step=step.name, node=cfg.node)])
        except StateConflict:
            holder = (records.load(client, job.id).current or {})
            if (holder.get("worker"), holder.get("undo")) == (me, index):
                return  # our start went through and only its reply was lost (a retry after a Redis blip)
            raise Ignore() from None

    try:
        connect.require_replicated(r, cfg.redis.wait_replicas, start, f"the start of undo {step.name} of job {job.id}")
    except connect.NotReplicated:  # not begun: given back, for the sweep to send again
        with contextlib.suppress(StorkError, redis.RedisError):
            records.transition(r, job.id, (JobState.UNDOING,), guard={"owner": me}, current=None)
        raise


def _undone(r: redis.Redis, job: JobRecord, index: int, me: str, note: str = "") -> None:
    records.transition(r, job.id, (JobState.UNDOING,), guard={"owner": me}, undone=[*job.undone, index],
                       undo_errors=[*job.undo_errors, *([note] if note else [])], undo_retry={}, current=None)


def _retry_later(r: redis.Redis, job: JobRecord, index: int, me: str, error: str) -> None:
    attempts = job.undo_retry.get("attempts", 0) + 1 if job.undo_retry.get("index") == index else 1
    delay = min(UNDO_BACKOFF[0] * 2 ** (attempts - 1), UNDO_BACKOFF[1])
    retry = {"index": index, "attempts": attempts, "at": time.time() + delay, "error": error}
    records.transition(r, job.id, (JobState.UNDOING,), guard={"owner": me}, undo_retry=retry, current=None,
                       events=[events.make(job.id, job.kind, "undo_failed", message=f"{error} (again in {delay}s)")])


def finalize(job_id: str, r: redis.Redis | None = None) -> None:
    r = r or redis_client()
    job = records.load(r, job_id)
    if job.state != JobState.UNDOING or set(job.undo) - set(job.undone):
        return  # not undoing, or an earlier undo chain is still at work and will finalize
    final = JobState(job.final or JobState.FAILED)
    message = job.error + (f" (not undone: {'; '.join(job.undo_errors)})" if job.undo_errors else "")
    try:
        records.transition(r, job_id, (JobState.UNDOING,), final, guard={"idle": True}, finished=time.time(),
                           events=[events.make(job_id, job.kind, events.FINISHED, state=final, message=message)])
    except StateConflict:
        return
    usage.release_claims(r, job)
    log.info("job_finished", job_id=job_id, state=str(final), error=job.error)
    if final == JobState.FAILED:
        try:
            _announce_failure(job, message)
        except Exception:  # an alert is never worth more than the job's own end, recorded above
            log.exception("alert_failed", job_id=job_id)


def _announce_failure(job: JobRecord, message: str) -> None:
    params = job.params if isinstance(job.params, dict) else {}
    guests = sorted({v for k in ("vmid", "lock_vmid", "new_vmid") if isinstance(v := params.get(k), int)})
    notify.announce(config(), app, notify.event(
        "job-failed", f"job {job.id} {job.kind}{''.join(f' {g}' for g in guests)} failed: {message}"[:300],
        job=job.id, kind=job.kind, node=job.node, guests=guests, error=message))
