"""Never stuck: after each fault, every job reaches succeeded, failed or cancelled within a
bound, every guest lock it took is released, nothing is left that no guest names, and every
node still serves. The sweep that beat sends every minute is called here directly, with its
staleness bound shortened where a test would otherwise wait for it."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.conftest import BASE, Worker
from tests.faults.test_safety import one_disk_guest, orphans
from worker import liveness, records, recovery
from worker.jobs.kinds import KINDS
from worker.records import JobRecord, JobState
from worker.testing import wait_for

BOUND = 90  # seconds: every job here must end within this of the fault ending


def job_record(client, kind: str, params: dict, **fields) -> JobRecord:
    spec = KINDS[kind]
    job = JobRecord(id=records.new_id(), kind=kind, params=params, node=params["node"],
                    steps=[s.name for s in spec.steps], queues=spec.queues(params, client.cfg), **fields)
    records.create(client.r, job, {"phase": "queued"})
    return job


def holder_of(pid: int, start: str | None = None) -> str:
    """The holder id of process `pid` on this host (with another start time: a reused pid)."""
    return (f"{socket.gethostname()}:{pid}:{start or liveness.process_start(pid)}:{liveness._boot_id()}:"
            f"{liveness._pid_namespace()}")


def pool_pids(worker) -> list[int]:
    with open(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children") as f:
        return [int(p) for p in f.read().split()]


def sweep_until_done(client, job_ids: list[str], bound: float = BOUND) -> list[JobRecord]:
    """Run the sweep each second (as beat would each minute) until every job has ended."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        jobs = [client.job(j) for j in job_ids]
        if all(j.state.terminal for j in jobs):
            return jobs
        recovery.sweep()
        time.sleep(1)
    raise AssertionError(f"jobs not ended after {bound}s: {[(j.id, str(j.state)) for j in jobs]}")


@pytest.fixture
def quick_sweep(monkeypatch):
    monkeypatch.setattr(recovery, "STALE", 2)


def test_a_holder_whose_pid_was_reused_is_dead(client, vmid, workers):
    """A job held by `host:<pid>` of a process that has that pid but another start time (a
    worker restarted in a fresh PID namespace) is recovered by the sweep, not left running."""
    g = vmid()
    one_disk_guest(client, g)
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "2M"}, client.cfg)
    reused = holder_of(workers["node1"].proc.pid, start="1")  # a live celery pid, another process start
    job = job_record(client, "resize", params, state=JobState.RUNNING,
                     current={"step": 0, "name": "lock_guest", "node": "node1", "worker": reused, "attempt": 1},
                     attempts={"0": 1})
    assert not liveness.holder_alive(client.r, reused)
    assert job.id in recovery.sweep()
    job = client.wait(job.id, timeout=30)
    assert job.state == "failed" and "is gone" in job.error


def test_a_step_abandoned_by_a_live_process_is_recovered(client, vmid, workers):
    """A live pool process whose heartbeat names no job (it gave the step up, e.g. Redis was
    away too long) does not hold the job: the sweep fails and undoes it."""
    g = vmid()
    one_disk_guest(client, g)
    pid = pool_pids(workers["node1"])[0]
    holder = holder_of(pid)
    wait_for(lambda: client.r.get(f"stork:alive:{holder}") == "", 30, "the pool process's heartbeat")
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "2M"}, client.cfg)
    job = job_record(client, "resize", params, state=JobState.RUNNING,
                     current={"step": 0, "name": "lock_guest", "node": "node1", "worker": holder, "attempt": 1},
                     attempts={"0": 1})
    assert liveness.holder_alive(client.r, holder) and not liveness.holding(client.r, holder, job.id)
    assert job.id in recovery.sweep()
    job = client.wait(job.id, timeout=30)
    assert job.state == "failed" and job.error == "the process running step lock_guest on node node1 gave it up"


def test_a_job_whose_message_was_lost_is_sent_again(client, workers, quick_sweep):
    """A queued job with no message anywhere (lost between steps) is sent again by the sweep and succeeds."""
    job = job_record(client, "ping", {"node": "node2", "storages": [], "pinned": True}, updated=time.time() - 60)
    assert job.id in recovery.sweep()
    job = client.wait(job.id, timeout=30)
    assert job.state == "succeeded" and job.resends == 1


def test_a_job_no_worker_takes_is_failed_after_its_resends(client, workers, quick_sweep):
    """After MAX_RESENDS sends that no worker took, the sweep fails the job (it does not wait forever)."""
    job = job_record(client, "ping", {"node": "node1", "storages": [], "pinned": True}, resends=recovery.MAX_RESENDS,
                     updated=time.time() - 60)
    assert job.id in recovery.sweep()
    job = client.wait(job.id, timeout=30)
    sent = recovery.MAX_RESENDS + 1
    assert job.state == "failed" and job.error == f"no worker took step pong_shared (sent {sent} times)"


def test_a_job_waiting_in_a_queue_is_left_to_wait(client):
    """A job whose next step waits in the queue of a node that is down is waiting, not stuck."""
    job = client.submit("ping", node="nowhere")
    wait_for(lambda: client.r.llen("node.nowhere") == 1, 10, "the node step in its queue")
    records.update(client.r, job.id, updated=time.time() - 3600)
    assert job.id not in recovery.sweep()
    client.cancel(job.id)
    assert client.wait(job.id, timeout=30).state == "cancelled"


def test_a_sigkill_storm_under_queued_clones_leaves_every_job_ended(client, vmid, quick_sweep):
    """The worker group SIGKILLed while 30 linked clones are queued and taken: after a
    restart, the sweep sees each job end, with no guest locked and no orphan volume."""
    worker = Worker("crash", concurrency=2)
    try:
        t = vmid()
        one_disk_guest(client, t, storage="crash", node="crash")
        assert client.run("template", vmid=t).state == "succeeded"
        jobs = [client.submit("linked_clone", vmid=t, newid=vmid()) for _ in range(30)]
        wait_for(lambda: any(client.job(j.id).done for j in jobs), 30, "the first clone steps")
        worker.kill()
        worker = Worker("crash", concurrency=2)
        ended = sweep_until_done(client, [j.id for j in jobs])
    finally:
        worker.stop()
    assert {str(j.state) for j in ended} <= {"succeeded", "failed"} and any(j.state == "succeeded" for j in ended)
    ours = {t, *(j.params["new_vmid"] for j in jobs)}  # (other modules keep guests locked on purpose)
    assert not [g.vmid for g in client.guests() if g.lock and g.vmid in ours], "guests left locked"
    assert orphans(client, "crash") == []
    assert client.run("ping", node="node1").state == "succeeded"


def test_an_undo_that_failed_is_retried_until_it_succeeds(client, stork, vmid, workers):
    """With the guests directory immutable while a full clone commits, its undo cannot remove
    the new guest: the job keeps undoing (retrying) and `guest unlock` is refused while undos
    that change guests remain; once the directory is writable again the retried undo ends the
    job with nothing left and both guests unlocked."""
    g, c = vmid(), vmid()
    source = one_disk_guest(client, g, size="256M")
    with open(BASE / "images" / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(os.urandom(256 << 20))
    guests = BASE / "guests"
    job = client.submit("full_clone", vmid=g, newid=c)
    try:
        wait_for(lambda: (client.job(job.id).current or {}).get("name") == "copy_data", 30, "the copy")
        subprocess.run(["chattr", "+i", str(guests)], check=True)
        wait_for(lambda: client.job(job.id).undo_retry, 60, "the undo to fail")
        assert client.job(job.id).state == "undoing" and client.guest(g).lock == "full_clone"
    finally:
        subprocess.run(["chattr", "-i", str(guests)], check=True)
    code, _, err = stork("guest", "unlock", str(g))
    assert code == 1 and "still has to undo reserve_guest" in err and f"stork job cancel {job.id}" in err
    records.update(client.r, job.id, undo_retry={**client.job(job.id).undo_retry, "at": 0})  # its time has come
    [job] = sweep_until_done(client, [job.id])
    assert job.state == "failed" and not client.guest_store.exists(c)
    assert client.guest(g).lock == "" and orphans(client, "local") == []
    assert client.volume(source).virtual_size == 256 << 20


def test_unlock_is_refused_while_the_locking_job_is_live(client, stork, vmid):
    """`guest unlock` of a guest whose lock belongs to a queued job is refused, naming it."""
    g = vmid()
    one_disk_guest(client, g)
    job = job_record(client, "ping", {"node": "nowhere", "storages": [], "pinned": True})
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="clone", lock_job=job.id)
    code, _, err = stork("guest", "unlock", str(g))
    assert code == 1 and err.endswith(f"guest {g} is locked by job {job.id} (clone), which is queued: "
                                      "cancel it or wait for it\n")
    assert client.guest(g).lock == "clone"
    client.cancel(job.id)
    assert stork("guest", "unlock", str(g))[0] == 0 and client.guest(g).lock == ""


def an_undo_retrying(client, g: int, attempts: int) -> JobRecord:
    """A resize of guest `g`'s disk, undoing, its unlock failed `attempts` times and waiting to be tried again."""
    params = KINDS["resize"].prepare({"volid": f"local:{g}/vm-{g}-disk-0.raw", "size": "2M"}, client.cfg)
    return job_record(client, "resize", params, state=JobState.UNDOING, done=1, undo=[0], final="failed",
                      error="it broke", undo_retry={"index": 0, "attempts": attempts, "at": time.time() + 600,
                                                    "error": "undo of lock_guest: disk on fire"})


def test_cancel_stops_the_retries_of_an_undo_that_keeps_failing(client, stork, vmid):
    """An operator's way out of an undo that fails for good: `job cancel` ends the job failed,
    naming what was not undone, and `guest unlock` then frees its guest."""
    g = vmid()
    one_disk_guest(client, g)
    job = an_undo_retrying(client, g, attempts=5)
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=job.id)
    assert stork("job", "cancel", job.id)[0] == 0
    job = client.job(job.id)
    assert job.state == "failed" and job.undo_errors == [
        "not undone (retries stopped by user): lock_guest; last error: undo of lock_guest: disk on fire"]
    assert stork("guest", "unlock", str(g))[0] == 0 and client.guest(g).lock == ""


def test_abandon_gives_up_a_node_gone_for_good_for_a_job_whose_undo_waits_there(client, stork, vmid):
    """A move's undo waits in the queue of its target node, which never comes back, and the
    job with it, its guest locked. `job abandon --node` drops that node's undos from the plan,
    naming each, takes their message out of its queue, and sends the rest again: the guest's
    unlock runs on the shared queue, and the job ends failed."""
    from worker import broker, runner

    g = vmid()
    one_disk_guest(client, g)
    spec = KINDS["move"]  # failed in its copy: free what it allocated (on node gone), then unlock
    queues = ["shared"] + ["node.gone"] * (len(spec.steps) - 1)
    job = JobRecord(id=records.new_id(), kind="move", params={"lock_vmid": g, "node": "node1"}, node="node1",
                    steps=[s.name for s in spec.steps], queues=queues, state=JobState.UNDOING, done=2,
                    undo=runner.undo_plan(spec, 2, 2), final="failed", error="its target node went away")
    records.create(client.r, job, {"phase": "queued"})
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="move", lock_job=job.id)
    runner.dispatch_undo(job, client.app)

    def waiting_there() -> list[str]:  # the tasks of the job's messages in node gone's queue
        return [p.task for p in broker.pending_messages(client.r, {"node.gone"}).get(job.id, []) if p.since is None]

    assert waiting_there() == ["stork.move.undo_allocate"]
    code, _, err = stork("guest", "unlock", str(g))
    assert code == 1 and f"'stork job abandon {job.id} --node NODE' gives up a node gone for good" in err
    code, out, err = stork("job", "abandon", job.id, "--node", "gone")
    assert code == 0 and out.startswith(f"job {job.id}: undoing; not undone (node gone given up by user)"), err
    assert waiting_there() == []
    ended = client.wait(job.id, timeout=30)
    assert ended.state == "failed" and ended.undo_errors == ["not undone (node gone given up by user): allocate"]
    assert client.guest(g).lock == ""  # its unlock ran on the shared queue
    said = [e for e in client.events(job.id) if e["phase"] == "abandon"]  # `job watch` shows it when it happens
    assert [(e["node"], e["message"]) for e in said] == [("gone", ended.undo_errors[0])]


def test_abandon_ends_a_job_past_its_commit_whose_last_steps_wait_on_a_node_gone_for_good(client, stork, vmid):
    """A migration switched its guest to node2, then its source node died for good before the
    free of the originals ran there: the job could neither be cancelled (committed) nor end, and
    named the guest's new disks as its own for ever (a destroy of the guest refused). `job abandon
    --node` ends it succeeded, its commit standing, the step named as not run, its message out
    of that queue; refused for a node it has no step left on."""
    from worker import broker, runner

    g = vmid()
    disk = one_disk_guest(client, g)
    spec = KINDS["migrate"]
    steps = [s.name for s in spec.steps]
    queues = ["shared"] * (len(steps) - 1) + ["node.gone"]  # free_sources, on the node the guest left
    job = JobRecord(id=records.new_id(), kind="migrate", node="node1", steps=steps, queues=queues,
                    params={"lock_vmid": g, "node": "node1", "source_node": "gone", "target_node": "node1"},
                    state=JobState.RUNNING, done=steps.index("free_sources"),
                    ctx={"replaced": {"scsi0": disk.replace("local:", "gone:")}}, result={"node": "node1"})
    records.create(client.r, job, {"phase": "queued"})
    runner.send_steps(job, job.done, client.app)
    waiting = lambda: [p.task for p in broker.pending_messages(client.r, {"node.gone"}).get(job.id, [])]  # noqa: E731
    assert waiting() == ["stork.migrate.free_sources"]
    code, _, err = stork("job", "cancel", job.id)
    assert code == 1 and "has committed its change" in err
    code, _, err = stork("job", "abandon", job.id, "--node", "node2")
    assert (code, err) == (1, f"stork: job {job.id} has no step left to run on node node2\n")
    code, out, err = stork("job", "abandon", job.id, "--node", "gone")
    note = ("free_sources not run (node gone given up by user): what it would have done there is left to you; "
            f"guest {g}, where it is still locked by this job, is freed by 'stork guest unlock {g}'")
    assert (code, out) == (0, f"job {job.id}: succeeded; {note}\n"), err
    assert waiting() == []
    ended = client.job(job.id)
    assert ended.state == "succeeded" and ended.result == {"node": "node1", "not_run": note}
    assert [e["message"] for e in client.events(job.id) if e["phase"] == "abandon"] == [note]
    assert client.r.sismember(records.ACTIVE, job.id) == 0


@pytest.mark.parametrize("died", ["after the resize", "in the unlock"])
def test_abandon_sends_again_the_shared_steps_a_dead_nodes_fused_message_carried(client, stork, vmid, died):
    """A resize on node `gone`: its lock, resize and unlock run as one task there (the unlock
    runs on any node, fused with the node's step before it). The process died after the resize,
    the message went back to that node's queue, and the node is gone for good: the sweep waits
    for the message, a cancel is refused (committed), and the unlock's own queue is the shared
    one. `job abandon --node gone` takes the message out and sends the unlock again, where any
    node runs it: the job ends, its guest unlocked."""
    from worker import broker, runner

    g = vmid()
    disk = one_disk_guest(client, g)
    spec = KINDS["resize"]
    steps = [s.name for s in spec.steps]
    job = JobRecord(id=records.new_id(), kind="resize", node="gone", steps=steps,
                    queues=["shared", "node.gone", "shared"], params={"lock_vmid": g, "volid": disk, "size": 1 << 24,
                                                                     "node": "gone"},
                    state=JobState.RUNNING, done=steps.index("resize"))
    records.create(client.r, job, {"phase": "queued"})
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="resize", lock_job=job.id)
    runner.send_steps(job, job.done, client.app)  # resize and unlock, one task on node gone's queue
    unlock = steps.index("unlock_guest")
    gone = f"{socket.gethostname()}:999999999"  # a process id that cannot exist
    dead = {"current": {"step": unlock, "name": "unlock_guest", "node": "gone", "worker": gone, "attempt": 1,
                        "since": time.time()}} if died == "in the unlock" else {}
    records.transition(client.r, job.id, (JobState.RUNNING,), guard={"idle": True, "done": job.done},
                       done=unlock, **dead)  # the resize ran, then its process died
    waiting = lambda: [p.task for p in broker.pending_messages(client.r, {"node.gone"}).get(job.id, [])]  # noqa: E731
    assert waiting() == ["stork.resize.resize"]
    code, out, err = stork("job", "abandon", job.id, "--node", "gone")
    assert code == 0 and out.startswith(f"job {job.id}: ") and \
        out.endswith("; its steps left were sent again, out of node gone's queue\n"), err  # running, or done by now
    assert client.wait(job.id, timeout=30).state == "succeeded"
    assert client.guest(g).lock == "" and waiting() == []


def test_an_undo_that_read_the_record_before_an_abandon_does_not_start_after_it(client):
    """run_undo reads the record, then starts the undo it picked by a guarded transition. An
    abandon in between shortened the plan: the start is refused (the `undos` guard), so a
    dropped undo never runs and the abandon's note is never written over by that copy."""
    from worker import runner

    spec = KINDS["move"]
    queues = ["node.gone2"] + ["node.gone"] * (len(spec.steps) - 1)  # nothing runs the rest here
    job = JobRecord(id=records.new_id(), kind="move", params={"node": "node1"}, node="node1",
                    steps=[s.name for s in spec.steps], queues=queues, state=JobState.UNDOING, done=2,
                    undo=runner.undo_plan(spec, 2, 2), final="failed", error="its target node went away")
    records.create(client.r, job, {"phase": "queued"})
    try:
        read_before = records.load(client.r, job.id)
        runner.abandon(client.r, job.id, "gone", client.app)
        start = {"current": {"undo": 1, "name": "allocate", "node": "gone", "worker": "test:1"}}
        with pytest.raises(records.StateConflict):
            records.transition(client.r, job.id, (JobState.UNDOING,), guard={
                "undone": 0, "undos": len(read_before.undo), "idle": True}, **start)
        now = records.load(client.r, job.id)
        assert now.undo == [0] and now.undo_errors == ["not undone (node gone given up by user): allocate"]
        records.transition(client.r, job.id, (JobState.UNDOING,), guard={"undone": 0, "undos": 1, "idle": True},
                           **start)  # the same start from the record as it is now passes
    finally:
        client.r.srem(records.ACTIVE, job.id)


def _undoing_create(client, vmid: int, node: str) -> tuple[JobRecord, str]:
    """A `create` job failed after its allocate step ran on `node`, its undo (free_made) due;
    the disk it names made on node1's local storage, claimed for the job."""
    from drivers import driver_for
    from worker.jobs import usage

    volid = f"local:{vmid}/vm-{vmid}-disk-0.raw"
    drv = driver_for(client.cfg.storage("local"))
    drv.allocate(drv.parse_volname(volid.split(":", 1)[1]), 1 << 20)
    names = [s.name for s in KINDS["create"].steps]
    at = names.index("allocate")
    job = JobRecord(id=records.new_id(), kind="create", params={"node": node}, node=node, steps=names,
                    queues=[f"node.{node}"] * len(names), state=JobState.UNDOING, done=at + 1, undo=[at],
                    final="failed", error=f"failed on {node}", ctx={"made": {"scsi0": volid}})
    records.create(client.r, job, {"phase": "queued"})
    usage.claim(client.r, volid, job.id)
    return job, volid


def test_an_undo_carried_to_a_node_its_step_is_not_for_does_not_run(client, vmid):
    """An undo reads its step's node-local volume ids as its own node's. One carried to another
    node (a message stork did not send there: anyone who can write the broker's bindings can
    route node2's queue to node1) would free a same-named volume on that node: it is refused
    there, as a step is."""
    from celery.exceptions import Ignore

    from tests.helpers import volume_path
    from worker import runner, tasks

    job, volid = _undoing_create(client, vmid(), "node2")
    try:
        with pytest.raises(Ignore):
            tasks.app.tasks[runner.undo_task_name("create", "allocate")].run(job.id, job.undo[0])
        assert volume_path(volid).exists()
        now = records.load(client.r, job.id)
        assert now.undone == [] and now.current is None and now.undo_retry == {}  # refused, not failed
    finally:
        client.r.srem(records.ACTIVE, job.id)
        volume_path(volid).unlink()


def test_an_undo_task_runs_its_own_step_only(client, vmid):
    """The step index an undo's message carries is input: the undo task of one step told
    another's index runs nothing; the right task runs it."""
    from celery.exceptions import Ignore

    from tests.helpers import volume_path
    from worker import runner, tasks

    job, volid = _undoing_create(client, vmid(), "node1")
    try:
        with pytest.raises(Ignore):
            tasks.app.tasks[runner.undo_task_name("create", "reserve_guest")].run(job.id, job.undo[0])
        assert volume_path(volid).exists() and records.load(client.r, job.id).undone == []
        tasks.app.tasks[runner.undo_task_name("create", "allocate")].run(job.id, job.undo[0])
        assert not volume_path(volid).exists() and records.load(client.r, job.id).undone == job.undo
    finally:
        client.r.srem(records.ACTIVE, job.id)
        volume_path(volid).unlink(missing_ok=True)


def test_abandon_is_refused_for_a_job_not_undoing_or_with_nothing_on_that_node(client, stork, vmid):
    """One line each: a queued job is cancelled (its undo runs), an ended one is left as it is,
    and a node none of its undos waits for is not given up."""
    running = job_record(client, "ping", {"node": "nowhere", "storages": [], "pinned": True})
    code, _, err = stork("job", "abandon", running.id, "--node", "nowhere")
    assert (code, err) == (1, f"stork: job {running.id} is queued: only the undos of an undoing job can be given "
                              "up (`stork job cancel` undoes it)\n")
    client.cancel(running.id)
    assert client.wait(running.id, timeout=30).state == "cancelled"  # its (empty) undo may still be under way
    code, _, err = stork("job", "abandon", running.id, "--node", "nowhere")
    assert (code, err) == (1, f"stork: job {running.id} is cancelled: only the undos of an undoing job can be "
                              "given up\n")
    g = vmid()
    one_disk_guest(client, g)
    undoing = an_undo_retrying(client, g, attempts=1)
    code, _, err = stork("job", "abandon", undoing.id, "--node", "node2")
    assert (code, err) == (1, f"stork: job {undoing.id} has no undo left to run on node node2\n")
    assert client.job(undoing.id).state == "undoing"
    assert stork("job", "cancel", undoing.id)[0] == 0  # stops its retries: it ends


ACROSS = {"source_node": "node1", "target_node": "node2"}
UNDO_PLANS = [
    # (kind, its params' nodes, steps done, failed at, undos in order)
    ("full_clone", {}, 4, 4, [3, 1, 0]),  # the copy failed: free the target, drop the new guest, unlock
    ("full_clone", ACROSS, 4, 4, [3, 2, 1, 0]),  # ... and, between nodes, end the export too
    ("migrate", ACROSS, 6, 6, [6, 2, 1, 0]),  # making the copied bases failed: unmake, free, end the export
    # freeing the originals failed after the switch: those it freed leave the unused list, then the lock
    ("migrate", ACROSS, 8, 8, [8, 0]),
    ("move", {}, 6, 6, [6, 0]),  # the same for the old copy of a moved disk
    ("resize", {}, 2, 2, [0]),  # the unlock after the resize failed: the guest is still unlocked
    ("create", {}, 0, 0, [0]),  # the reservation failed: nothing made, its undo checks for itself
]


@pytest.mark.parametrize(("kind", "nodes", "done", "upto", "plan"), UNDO_PLANS,
                         ids=[f"{p[0]}-{p[3]}{'-across' if p[1] else ''}" for p in UNDO_PLANS])
def test_the_undo_plan_stops_at_a_commit_but_releases_guest_locks(kind, nodes, done, upto, plan):
    """undo_plan: undos back to the last completed commit, then every held guest lock; a
    step a job on one node goes without has nothing to undo."""
    from worker.runner import undo_plan

    assert undo_plan(KINDS[kind], done, upto, KINDS[kind].skipped(nodes)) == plan


def test_withdraw_is_refused_for_a_job_whose_commit_a_process_began(client):
    """A free whose commit step a process began and did not finish (it may have freed the
    volume, not yet dropped it from the guests), sent again and waiting: withdrawing it would end
    it with nothing undone; refused, as cancel runs that commit's undo (forget_free)."""
    from drivers.errors import Refused
    from worker import runner

    job = job_record(client, "free", {"volid": "local:91900/vm-91900-disk-0.raw", "node": "nowhere",
                                      "storages": ["local"]}, attempts={"0": 1})
    try:
        with pytest.raises(Refused, match=f"job {job.id} has steps to undo: cancel it instead"):
            runner.withdraw(client.r, job.id)
        assert client.job(job.id).state == "queued"
    finally:
        client.r.srem(records.ACTIVE, job.id)
