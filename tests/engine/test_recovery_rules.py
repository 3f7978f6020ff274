"""The sweep's decisions as pure functions, table by table: what a job with nothing in
progress needs, and whether a step whose process is gone is being redelivered."""

from __future__ import annotations

import pytest

from worker.broker import Pending
from worker.jobs.kinds import KINDS
from worker.records import JobRecord, JobState
from worker.recovery import STALE, idle_action, redelivered
from worker.runner import idle_undo_from, task_name

NOW = 1_000_000.0
STEPS = [s.name for s in KINDS["resize"].steps]
FIRST = task_name("resize", STEPS[0])


def job(state: JobState = JobState.RUNNING, done: int = 0, updated: float = NOW - 2 * STALE, resends: int = 0,
        current: dict | None = None, **extra) -> JobRecord:
    return JobRecord(id="j1", kind="resize", params={}, node="node1", steps=STEPS, queues=["q"] * len(STEPS),
                     state=state, done=done, updated=updated, resends=resends, current=current, **extra)


@pytest.mark.parametrize(("record", "pending", "action"), [
    (job(updated=NOW - 1), [], "wait"),  # moved a moment ago
    (job(), [Pending(FIRST, None)], "wait"),  # its step is queued
    (job(), [Pending(FIRST, NOW - 5)], "wait"),  # taken a moment ago
    (job(), [Pending(FIRST, NOW - 2 * STALE)], "resend"),  # taken long ago by a consumer that is gone
    (job(), [Pending(task_name("resize", STEPS[1]), None)], "resend"),  # only another step queued
    (job(done=1), [Pending(FIRST, None, through=2)], "wait"),  # a fused run from an earlier step carries it
    (job(done=1), [Pending(task_name("resize", STEPS[1]), NOW - 5, through=2)], "wait"),  # a run from it, taken
    (job(done=1), [Pending(FIRST, None)], "resend"),  # an earlier step's message that stops before it
    (job(done=2), [Pending(FIRST, None, through=1)], "resend"),  # a fused run that ends before it
    (job(done=1), [Pending(FIRST, NOW - 2 * STALE, through=2)], "resend"),  # carried by a consumer long gone
    (job(), [], "resend"),
    (job(resends=3), [], "fail"),  # sent often enough: nobody takes it
    (job(resends=3, done=2), [], "resend"),  # past its commit: it only goes forward
    (job(resends=3, done=1, attempts={"1": 1}), [], "fail"),  # in its commit: undone from it (idle_undo_from)
    (job(done=len(STEPS)), [], "wait"),  # done: not the sweep's business
    (job(state=JobState.UNDOING, undo=[0], undone=[], undo_retry={"at": NOW + 30}), [], "wait"),
    (job(state=JobState.UNDOING, undo=[0], undone=[], undo_retry={"at": NOW - 1}), [], "resend"),
])
def test_what_an_idle_job_needs(record, pending, action):
    assert idle_action(record, NOW, pending) == action


@pytest.mark.parametrize(("record", "start"), [
    (job(done=1), 0),  # between steps: the undo starts at the step before
    (job(done=1, attempts={"1": 1}), 1),  # its commit was tried: that commit's own undo checks what stands
    (job(done=2, attempts={"2": 1}), 1),  # a step tried that is no commit made nothing it keeps
    (job(done=0), -1),
])
def test_where_the_undo_of_a_job_between_steps_starts(record, start):
    assert idle_undo_from(KINDS["resize"], record) == start


HELD = {"step": 0, "name": STEPS[0], "node": "node1", "worker": "h:1", "attempt": 1, "since": NOW - 60}


@pytest.mark.parametrize(("current", "pending", "parent_alive", "answer"), [
    (HELD, [Pending(FIRST, NOW - 90)], True, True),  # its worker lives and will put it back
    (HELD, [Pending(FIRST, None)], False, True),  # put back in its queue
    (HELD, [Pending(FIRST, NOW - 10)], False, True),  # taken again since the step started
    (HELD, [Pending(FIRST, NOW - 90)], False, False),  # the original delivery, its worker died too
    ({**HELD, "since": NOW - 3 * STALE}, [Pending(FIRST, NOW - 2 * STALE)], False, False),  # taken again, died
    ({**HELD, "since": NOW - 3 * STALE}, [Pending(FIRST, NOW - 2 * STALE)], True, False),  # retaken, long ago: died
    (HELD, [Pending(FIRST, NOW - 10)], True, True),  # taken again a moment ago
    (HELD, [Pending(task_name("resize", STEPS[1]), None)], True, False),  # another step's message
    ({**HELD, "step": 1, "name": STEPS[1]}, [Pending(FIRST, None, through=2)], False, True),  # a fused run, put back
    ({**HELD, "step": 1, "name": STEPS[1]}, [Pending(FIRST, None, through=0)], False, False),  # ends before it
    (HELD, [Pending(task_name("resize", STEPS[1]), None, through=2)], False, False),  # a run from a later step
    (HELD, [], True, False),  # acknowledged (a hard time limit): nothing will run it again
    ({"undo": 0, "name": STEPS[0], "worker": "h:1"}, [Pending(FIRST, None)], True, False),  # an undo: sent again
])
def test_a_step_being_redelivered_is_left_to_its_redelivery(current, pending, parent_alive, answer):
    assert redelivered(job(current=current), pending, parent_alive, NOW) is answer
