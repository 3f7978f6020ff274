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
