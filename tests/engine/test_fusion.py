"""Which steps run together in one task (worker.jobs.kinds.fuse, JobKind.runs), table by
table; a fused run on a real worker is in tests/jobs/test_jobs_e2e.py and its crash in
tests/faults/test_crash.py."""

from __future__ import annotations

import pytest

from worker.jobs.kinds import KINDS, fuse
from worker.queues import SHARED_QUEUE as S
from worker.queues import node_queue

A, B = node_queue("a"), node_queue("b")


@pytest.mark.parametrize(("indexes", "queues", "alone", "runs"), [
    ([0, 1, 2], [S, A, S], set(), [([0, 1, 2], A)]),  # guest-config steps join the node step between them
    ([0, 1, 2], [S, S, S], set(), [([0, 1, 2], S)]),  # all on shared storage: one task anywhere
    ([0, 1], [A, B], set(), [([0], A), ([1], B)]),  # two nodes' steps: never one task
    ([0, 1, 2], [A, S, B], set(), [([0, 1], A), ([2], B)]),  # a shared step joins the run before it
    ([0, 1, 2, 3], [S, A, A, S], {2}, [([0, 1], A), ([2], A), ([3], S)]),  # a step alone ends a run, starts none
    ([0, 1, 2], [S, S, S], {0, 1, 2}, [([0], S), ([1], S), ([2], S)]),  # a ping: each step its own task
    ([1, 2], [S, A, S], set(), [([1, 2], A)]),  # sent again from a later step
    ([0, 2], [S, A, S], set(), [([0, 2], S)]),  # a step the job goes without is not sent
    ([], [S], set(), []),
])
def test_consecutive_steps_are_fused_where_one_worker_can_run_them(indexes, queues, alone, runs):
    assert fuse(indexes, queues, frozenset(alone)) == runs


def named(kind: str, params: dict, queues: list[str], start: int = 0) -> list[tuple[list[str], str]]:
    steps = KINDS[kind].steps
    return [([steps[i].name for i in run], queue) for run, queue in KINDS[kind].runs(params, queues, start)]


def test_a_linked_clone_on_a_node_local_storage_is_one_task_on_that_node():
    assert named("linked_clone", {"node": "a"}, [S, A, S]) == [(["reserve_guest", "link_disks", "commit_guest"], A)]


def test_a_full_clone_sends_its_copy_and_verify_alone():
    queues = [S, S, A, A, A, A, A, S]
    assert named("full_clone", {"node": "a"}, queues) == [
        (["lock_guest", "reserve_guest", "allocate"], A), (["copy_data"], A), (["commit_guest"], S)]
    assert named("full_clone", {"node": "b", "target_node": "b", "source_node": "a"}, [S, S, A, B, B, B, A, S]) == [
        (["lock_guest", "reserve_guest", "export"], A), (["allocate"], B), (["copy_data"], B),
        (["verify_copy"], B), (["end_export", "commit_guest"], A)]


def test_a_ping_still_crosses_every_queue_it_checks():
    assert named("ping", {"node": "a"}, [S, A, S]) == [(["pong_shared"], S), (["pong_node"], A), (["pong_back"], S)]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_step_of_every_kind_is_sent_once_and_in_order(kind):
    """Whatever the queues, the runs cover the steps the job does not go without, each once, in order."""
    n = len(KINDS[kind].steps)
    for queues in ([S] * n, [A] * n, [(A, S, B)[i % 3] for i in range(n)]):
        runs = KINDS[kind].runs({"node": "a"}, queues, 0)
        sent = [i for run, _ in runs for i in run]
        assert sent == [i for i in range(n) if i not in KINDS[kind].skipped({"node": "a"})]
        assert all(queues[i] in (queue, S) for run, queue in runs for i in run)


def test_a_step_does_not_start_while_the_record_shows_its_process_on_the_step_before(redis_server):
    """A failover may take back the finish of a fused run's step k (its write was not yet on a
    replica): the record then still names this process on step k. Starting step k+1 is refused
    (the run stops, the sweep decides), not taken for this process's own start whose reply was
    lost; that one, the record naming it on step k+1, goes on."""
    from celery.exceptions import Ignore

    from worker import events, liveness, records, runner
    from worker.app import config
    from worker.records import JobRecord

    r, me, kind = redis_server, liveness.process_id(), KINDS["linked_clone"]
    job = JobRecord(id=records.new_id(), kind=kind.name, params={"node": "node1"}, node="node1",
                    steps=[s.name for s in kind.steps], queues=[S, node_queue("node1"), S])
    records.create(r, job, events.make(job.id, job.kind, "queued"))
    try:
        records.update(r, job.id, current={"step": 0, "name": "reserve_guest", "worker": me, "attempt": 1})
        read_before = records.load(r, job.id)  # what this process read on the old master: step 0 finished
        read_before.done, read_before.current = 1, None
        with pytest.raises(Ignore):
            runner._start_step(r, config(), read_before, kind, 1, me, {"done": 1, "idle": True}, {})
        assert records.load(r, job.id).current["step"] == 0  # left as it was, for the sweep
        records.update(r, job.id, done=1, current={"step": 1, "name": "link_disks", "worker": me, "attempt": 1})
        read_before.current, read_before.attempts = None, {}
        assert runner._start_step(r, config(), read_before, kind, 1, me, {"done": 1, "idle": True}, {}) == 1
    finally:
        r.srem(records.ACTIVE, job.id)
        r.zrem(records.JOBS, job.id)
        r.delete(records.job_key(job.id), records.events_key(job.id))


def test_a_step_started_from_the_record_the_step_before_left_reads_it_again_after_a_cancel(redis_server):
    """In a fused run, step k+1 starts from the record as step k finished it, without reading
    it; its start's guard refuses if a cancel came meanwhile (the run then reads the record and
    undoes the job, as any step does), and starts it otherwise."""
    from worker import events, liveness, records, runner
    from worker.app import config
    from worker.records import JobRecord

    r, me, kind = redis_server, liveness.process_id(), KINDS["linked_clone"]
    job = JobRecord(id=records.new_id(), kind=kind.name, params={"node": "node1"}, node="node1",
                    steps=[s.name for s in kind.steps], queues=[S, node_queue("node1"), S])
    records.create(r, job, events.make(job.id, job.kind, "queued"))
    carried_turn = {"done": 1, "idle": True, "uncancelled": True}
    try:
        records.update(r, job.id, done=1)  # step 0 finished: idle at step 1
        carried = records.load(r, job.id)
        records.request_cancel(r, job.id)  # after step 0's finish, before step 1's start
        with pytest.raises(runner._ReadAgain):
            runner._start_step(r, config(), carried, kind, 1, me, carried_turn, {})
        assert records.load(r, job.id).current is None  # not started: the record is read again
        r.hset(records.job_key(job.id), "cancel", "false")
        carried.attempts = {}
        assert runner._start_step(r, config(), carried, kind, 1, me, carried_turn, {}) == 1
        assert records.load(r, job.id).current["worker"] == me
    finally:
        r.srem(records.ACTIVE, job.id)
        r.zrem(records.JOBS, job.id)
        r.delete(records.job_key(job.id), records.events_key(job.id), records.volumes_key(job.id))


@pytest.mark.parametrize(("kind", "step", "undone", "why"), [
    # a commit tried a fourth time is undone back as any step: a try may have written the config,
    # and each undo checks what stands (the overlay a committed config names is kept, the guest
    # it no longer holds is not removed: tests/backup/test_backups.py, tests/jobs/test_jobs_e2e.py)
    ("linked_clone", 2, [1, 0], "step commit_guest was interrupted 3 times"),
    ("linked_clone", 1, [1, 0], "step link_disks was interrupted 3 times"),
])
def test_a_step_interrupted_too_often_fails_the_job_and_is_undone_back(
        redis_server, monkeypatch, kind, step, undone, why):
    from celery.exceptions import Ignore

    from worker import events, liveness, records, runner
    from worker.app import config
    from worker.records import JobRecord

    r, me, k = redis_server, liveness.process_id(), KINDS[kind]
    job = JobRecord(id=records.new_id(), kind=kind, params={"node": "node1"}, node="node1",
                    steps=[s.name for s in k.steps], queues=[S, node_queue("node1"), S], done=step,
                    attempts={str(step): runner.MAX_ATTEMPTS})
    records.create(r, job, events.make(job.id, job.kind, "queued"))
    sent: list[list[int]] = []
    monkeypatch.setattr(runner, "dispatch_undo", lambda job, sender=None: sent.append(list(job.undo)))
    try:
        with pytest.raises(Ignore):
            runner._start_step(r, config(), records.load(r, job.id), k, step, me, {"done": step, "idle": True}, {})
        now = records.load(r, job.id)
        assert now.state == "undoing" and now.final == "failed" and why in now.error
        assert now.undo == undone == sent[0]
    finally:
        r.srem(records.ACTIVE, job.id)
        r.zrem(records.JOBS, job.id)
        r.delete(records.job_key(job.id), records.events_key(job.id), records.volumes_key(job.id))
