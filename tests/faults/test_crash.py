"""Killing a worker mid-copy: the job ends failed with everything undone, or completes on
redelivery — never a hanging job, never an orphan volume or a guest left locked."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from tests.conftest import Worker, storage_path
from tests.helpers import PATTERN_MIB, held_copy, qemu_same, volume_path
from worker import liveness, recovery
from worker.records import JobRecord
from worker.testing import wait_for

SIZE_MIB = 512


@pytest.fixture
def crash_worker(workers):
    """A worker for node `crash` alone (one process), which the tests kill."""
    holder = {"worker": Worker("crash", concurrency=1)}
    yield holder
    holder["worker"].stop()


def big_guest(client, vmid: int) -> str:
    job = client.run("create", vmid=vmid, node="crash", disks={"scsi0": {"storage": "crash", "size": f"{SIZE_MIB}M"}})
    assert job.state == "succeeded", job.error
    path = storage_path("crash") / f"{vmid}/vm-{vmid}-disk-0.raw"
    chunk = b"\xc3" * (8 * PATTERN_MIB)
    with open(path, "r+b") as f:
        for _ in range(SIZE_MIB // 8):
            f.write(chunk)
    return job.result["disks"]["scsi0"]


@contextlib.contextmanager
def copying(client, job_id: str) -> Iterator[JobRecord]:
    """Hold the job's copy mid-way (its qemu-img stopped, progress reported: tests/helpers.py)
    and give its record then; the copy goes on after, if its process still lives."""
    with held_copy(client, job_id):
        yield client.job(job_id)


def test_killing_the_whole_worker_mid_copy_fails_the_job_and_undoes_it(client, vmid, crash_worker):
    """SIGKILL to the node's worker group; on restart it fails the job and frees the target."""
    g, c = vmid(), vmid()
    big_guest(client, g)
    job = client.submit("full_clone", vmid=g, newid=c)
    with copying(client, job.id) as during:
        assert during.current["name"] == "copy_data" and client.guest(g).lock == "full_clone"
        crash_worker["worker"].kill()
    target = volume_path(during.ctx["made"]["scsi0"])
    assert target.exists()  # half-copied, owned by a dead worker
    crash_worker["worker"] = Worker("crash", concurrency=1)  # reconciles at start
    job = client.wait(job.id, timeout=60)
    assert job.state == "failed"
    # the restarted worker reconciles, unless the cluster-wide sweep (other nodes' workers,
    # once a minute) got to the job first: either says which step died where
    assert job.error in ("the worker on node crash died during step copy_data",
                         "the process running step copy_data on node crash is gone")
    assert not target.exists() and not client.guest_store.exists(c)
    assert client.guest(g).lock == ""


def test_killing_the_process_running_the_copy_redelivers_and_completes(client, vmid, crash_worker):
    """SIGKILL to the pool process only: Celery redelivers the step, which copies afresh; a
    sweep meanwhile (the process is gone) leaves the job to that redelivery."""
    g, c = vmid(), vmid()
    source = big_guest(client, g)
    job = client.submit("full_clone", vmid=g, newid=c)
    with copying(client, job.id) as during:
        pid = int(during.current["worker"].split(":")[1])  # <host>:<pid>:<start>:<boot>
        assert pid != crash_worker["worker"].proc.pid
        half_copied = volume_path(during.ctx["made"]["scsi0"]).stat().st_ino
        main = crash_worker["worker"].proc.pid
        os.kill(main, signal.SIGSTOP)  # the worker holds the message and cannot put it back yet
        try:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not liveness.holder_alive(client.r, during.current["worker"]), 10,
                     "the copy's process to die")
            # the process is gone and the job still names it: the sweep must leave it to the redelivery
            assert job.id not in recovery.sweep()
            assert client.job(job.id).state == "running"
        finally:
            os.kill(main, signal.SIGCONT)
    job = client.wait(job.id, timeout=120)
    assert job.state == "succeeded", job.error
    assert job.attempts[str(job.steps.index("copy_data"))] == 2
    # the redelivered copy went into a freshly allocated target, not the half-written one
    assert volume_path(job.result["disks"]["scsi0"]).stat().st_ino != half_copied
    assert qemu_same(volume_path(source), volume_path(job.result["disks"]["scsi0"]))
    wait_for(lambda: client.guest(g).lock == "", 5, "source unlocked")


def test_cancelling_a_job_whose_worker_died_undoes_it_when_the_node_is_back(client, vmid, crash_worker):
    """Cancel a job whose copying process is dead: it is undone (not just failed) as soon as
    the node's worker serves its queue again, and ends cancelled with nothing left."""
    g, c = vmid(), vmid()
    big_guest(client, g)
    job = client.submit("full_clone", vmid=g, newid=c)
    with copying(client, job.id) as during:
        crash_worker["worker"].kill()
    client.cancel(job.id)
    assert client.job(job.id).state == "undoing"
    crash_worker["worker"] = Worker("crash", concurrency=1)
    job = client.wait(job.id, timeout=60)
    assert job.state == "cancelled" and job.error == "cancelled by user"
    assert not volume_path(during.ctx["made"]["scsi0"]).exists() and not client.guest_store.exists(c)
    assert client.guest(g).lock == ""
