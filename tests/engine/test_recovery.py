"""Recovery decisions on job records in the real Redis, with the real workers finishing
what is sent again: a commit step is never rolled back, only carried forward."""

from __future__ import annotations

import socket
import time

import pytest

from drivers.errors import Refused
from worker import records, recovery
from worker.jobs.kinds import KINDS
from worker.records import JobRecord, JobState

DEAD = f"{socket.gethostname()}:999999999"  # a process id that cannot exist


def interrupted_job(client, kind: str, params: dict, done: int, holder: str = DEAD) -> JobRecord:
    """A job of `kind` whose step `done` was running in `holder` (by default a dead process)."""
    spec = KINDS[kind]
    job = JobRecord(
        id=records.new_id(), kind=kind, params=params, node="node1", steps=[s.name for s in spec.steps],
        queues=spec.queues(params, client.cfg), state=JobState.RUNNING, done=done,
        current={"step": done, "name": spec.steps[done].name, "node": "node1", "worker": holder, "attempt": 1},
        attempts={str(done): 1},
    )
    records.create(client.r, job, {"phase": "queued"})
    return job


def test_a_commit_step_interrupted_is_carried_forward_not_undone(client, vmid):
    """A resize whose process died in its commit step: the restarted node sends the rest of
    the job again; it succeeds and the guest is unlocked — nothing is rolled back."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    volid = f"local:{g}/vm-{g}-disk-0.raw"
    params = KINDS["resize"].prepare({"volid": volid, "size": "16M"}, client.cfg)
    job = interrupted_job(client, "resize", params, done=1)
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=job.id)
    assert job.id in recovery.reconcile(client.r, "node1")
    job = client.wait(job.id, timeout=30)
    assert job.state == "succeeded", job.error
    assert client.guest(g).lock == "" and client.volume(volid).virtual_size == 16 << 20


def test_a_job_interrupted_before_its_commit_is_failed_and_undone(client, vmid):
    """The same interruption one step earlier (the lock step) fails the job and undoes it."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "16M"}, client.cfg)
    job = interrupted_job(client, "resize", params, done=0)
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=job.id)
    assert job.id in recovery.reconcile(client.r, "node1")
    job = client.wait(job.id, timeout=30)
    assert job.state == "failed" and job.error == "the worker on node node1 died during step lock_guest"
    assert client.guest(g).lock == ""


@pytest.mark.parametrize("by", ["sweep", "cancel"])
def test_a_failure_decided_elsewhere_keeps_what_the_step_saved_since_it_was_read(client, vmid, monkeypatch, by):
    """The sweep (or a cancel) reads a job whose process looks gone; before it fails the job,
    that process saves what it is about to make (a template's disk about to become a base).
    The failure must not write back the older record: the undo would not know the base."""
    from worker import runner

    g = vmid()
    params = {"lock_vmid": g, "bases": {}, "node": "node1", "storages": ["local"]}
    job = interrupted_job(client, "template", params, done=1)
    read = records.load(client.r, job.id)  # as the sweep or the cancel read it
    based = {"scsi0": [f"local:{g}/vm-{g}-disk-0.raw", f"local:base/base-{g}-disk-0.raw"]}
    records.transition(client.r, job.id, (JobState.RUNNING,), guard={"owner": DEAD, "done": 1}, ctx={"based": based})
    monkeypatch.setattr(runner, "dispatch_undo", lambda job, sender=None: None)  # the record is what is checked
    monkeypatch.setattr(runner, "holding", lambda r, holder, job_id: False)
    monkeypatch.setattr(records, "load", lambda r, job_id: read)  # cancel's read, the stale copy
    try:
        if by == "sweep":
            recovery._recover(client.r, read, DEAD, read.current, False)
        else:
            runner.cancel(client.r, job.id)
        monkeypatch.undo()
        now = records.load(client.r, job.id)
        assert now.state == "undoing" and now.ctx == {"based": based}
    finally:
        client.r.srem(records.ACTIVE, job.id)


def test_a_committed_job_cannot_be_cancelled(client, vmid):
    """Once a commit step is done the job's change stands: cancel is refused, nothing changes."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "16M"}, client.cfg)
    job = interrupted_job(client, "resize", params, done=2)
    with pytest.raises(Refused, match=f"job {job.id} has committed its change: it can no longer be cancelled"):
        client.cancel(job.id)
    assert client.job(job.id).state == "running" and not client.job(job.id).cancel


def test_the_sweep_recovers_a_job_whose_process_on_another_host_is_gone(client, vmid):
    """The periodic sweep uses the heartbeat keys: a holder on another host without one is
    gone, so its job is failed and undone without waiting for that node's worker."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "16M"}, client.cfg)
    gone = interrupted_job(client, "resize", params, done=0, holder="elsewhere:4242")
    alive = interrupted_job(client, "resize", params, done=0, holder="elsewhere:4343")
    client.r.set("stork:alive:elsewhere:4343", alive.id, ex=30)  # alive, and at this job
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=gone.id)
    acted = recovery.sweep()
    assert gone.id in acted and alive.id not in acted
    job = client.wait(gone.id, timeout=30)
    assert job.state == "failed" and job.error == "the process running step lock_guest on node node1 is gone"
    assert client.guest(g).lock == "" and client.job(alive.id).state == "running"
    client.r.delete("stork:alive:elsewhere:4343")


@pytest.mark.parametrize("odd", ["current not a table", "updated not a time", "an undo past its kind's steps",
                                 "queues not names"])
def test_one_odd_record_stops_no_sweep(client, vmid, odd):
    """A record not as stork writes it (hand-written, another version's) is skipped and logged:
    before, the first one raised out of every sweep from then on, and no job in the cluster was
    recovered or sent again."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "16M"}, client.cfg)
    gone = interrupted_job(client, "resize", params, done=0, holder="elsewhere:4242")
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=gone.id)
    spec = KINDS["move"]
    strange = JobRecord(id=records.new_id(), kind="move", params={"node": "node1"}, node="node1",
                        steps=[s.name for s in spec.steps], queues=["node.gone"] * len(spec.steps), done=2,
                        updated=time.time() - 3600)
    if odd == "an undo past its kind's steps":
        strange.state, strange.undo, strange.final = JobState.UNDOING, [len(spec.steps) + 3], "failed"
    records.create(client.r, strange, {"phase": "queued"})
    if odd == "current not a table":
        client.r.hset(records.job_key(strange.id), "current", '"garbage"')
    elif odd == "updated not a time":
        client.r.hset(records.job_key(strange.id), "updated", '"yesterday"')
    elif odd == "queues not names":
        client.r.hset(records.job_key(strange.id), "queues", '[["node.gone"]]')

    try:
        assert gone.id in recovery.sweep()
        assert client.wait(gone.id, timeout=30).state == "failed" and client.guest(g).lock == ""
    finally:
        client.r.srem(records.ACTIVE, strange.id)  # a hand-made record: no worker will ever end it


def test_an_undo_taken_over_saves_nothing_over_its_successors(client):
    """An undo's process was taken over (its heartbeat lapsed through a partition while it did
    long I/O) and another process runs the undo now: the first one's save of what it knows (an
    older ctx) is refused, as a step's is, not written over what its successor saved."""
    from worker.context import StepContext
    from worker.records import StateConflict

    spec = KINDS["move"]
    plan = [2, 0]
    saved = {"made": {"scsi0": "local:9/vm-9-disk-1.raw"}, "freeing": "successor's"}
    job = JobRecord(id=records.new_id(), kind="move", params={"node": "node1"}, node="node1",
                    steps=[s.name for s in spec.steps], queues=["node.gone"] * len(spec.steps), state=JobState.UNDOING,
                    done=3, undo=plan, final="failed", ctx=saved,
                    current={"undo": 2, "name": spec.steps[2].name, "node": "node1", "worker": "successor:1",
                             "since": time.time()})
    records.create(client.r, job, {"phase": "queued"})
    stale = records.load(client.r, job.id)
    stale.ctx = {"made": {"scsi0": "local:9/vm-9-disk-1.raw"}}  # what it knew before the successor's save
    ctx = StepContext(job=stale, cfg=client.cfg, r=client.r, node="node1", step="undo_allocate",
                      worker="taken-over:1", kinds=KINDS)
    try:
        with pytest.raises(StateConflict):
            ctx.save()
        assert records.load(client.r, job.id).ctx == saved
    finally:
        client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it


def test_the_sweep_takes_over_only_the_very_undo_it_found_lost(client):
    """The sweep read a job whose undo of one step a process ran, and found that process no
    longer at it: meanwhile the same process ended that undo and started the next one. The
    takeover's guard (the start's `since`, and the undos done) refuses it: before, the guard
    named the holder only, and the sweep cleared the running undo and sent the chain again, so
    another process ran that undo beside it and the job ended while it still ran."""
    from worker import runner

    spec = KINDS["move"]
    queues = ["node.gone"] * len(spec.steps)  # nothing here runs what would be sent
    plan = runner.undo_plan(spec, 2, 2)
    job = JobRecord(id=records.new_id(), kind="move", params={"node": "node1"}, node="node1",
                    steps=[s.name for s in spec.steps], queues=queues, state=JobState.UNDOING, done=2,
                    undo=plan, final="failed", error="failed in its copy",
                    current={"undo": plan[0], "name": spec.steps[plan[0]].name, "node": "node1", "worker": DEAD,
                             "since": 1000.0})
    records.create(client.r, job, {"phase": "queued"})
    try:
        read_by_the_sweep = records.load(client.r, job.id)
        next_undo = {"undo": plan[1], "name": spec.steps[plan[1]].name, "node": "node1", "worker": DEAD,
                     "since": 1001.5}
        records.transition(client.r, job.id, (JobState.UNDOING,), guard={"owner": DEAD}, undone=[plan[0]],
                           current=next_undo)  # the same process: one undo ended, the next begun
        with pytest.raises(records.StateConflict):
            recovery._recover(client.r, read_by_the_sweep, DEAD, read_by_the_sweep.current, starting=False)
        assert records.load(client.r, job.id).current == next_undo
        read_again = records.load(client.r, job.id)
        again = {**next_undo, "since": time.time()}  # that undo failed and was begun again: only `since` tells
        records.transition(client.r, job.id, (JobState.UNDOING,), guard={"owner": DEAD}, current=again)
        with pytest.raises(records.StateConflict):
            recovery._recover(client.r, read_again, DEAD, read_again.current, starting=False)
        recovery._recover(client.r, records.load(client.r, job.id), DEAD, again, starting=False)
        assert records.load(client.r, job.id).current is None  # the undo it finds lost now, it takes over
    finally:
        client.r.srem(records.ACTIVE, job.id)
