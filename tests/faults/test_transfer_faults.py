"""A copy between nodes when a node's worker dies mid-transfer, or the user cancels: the job
ends failed (or cancelled) and undone on both sides — the target's half-made volume freed,
the source's export ended — and nothing is left running. node1 and node2 are the session's
workers; `crash` is a node whose worker (one process) these tests kill and start again."""

from __future__ import annotations

import pytest

from tests.conftest import Worker, storage_path
from tests.helpers import PATTERN_MIB, exports_running, held_copy, volume_path
from worker import recovery
from worker.testing import wait_for

SIZE_MIB = 256


@pytest.fixture
def crash_worker(workers):
    holder = {"worker": Worker("crash", concurrency=1)}
    yield holder
    holder["worker"].stop()


def filled_guest(client, vmid: int, node: str, storage: str) -> str:
    job = client.run("create", vmid=vmid, node=node, disks={"scsi0": {"storage": storage, "size": f"{SIZE_MIB}M"}})
    assert job.state == "succeeded", job.error
    volid = job.result["disks"]["scsi0"]
    with open(volume_path(volid), "r+b") as f:
        for _ in range(SIZE_MIB // 8):
            f.write(b"\xc3" * (8 * PATTERN_MIB))
    return volid


def test_the_target_node_dying_mid_transfer_ends_the_export_and_frees_the_target_once_back(
        client, vmid, crash_worker):
    """node1 exports, `crash` copies and is SIGKILLed: the sweep fails the job, node1's worker
    ends its export by itself (the undo waits for `crash`), and `crash`, started again, frees
    its half-made volume; the job ends failed, the source unlocked."""
    g, c = vmid(), vmid()
    filled_guest(client, g, "node1", "local1")
    job = client.submit("full_clone", vmid=g, newid=c, storage="crash")
    with held_copy(client, job.id):
        during = client.job(job.id)
        assert during.current["name"] == "copy_data" and during.current["node"] == "crash"
        assert len(exports_running()) == 1
        crash_worker["worker"].kill()
    target = volume_path(during.ctx["made"]["scsi0"])
    assert target.exists()
    wait_for(lambda: job.id in recovery.sweep() or client.job(job.id).state == "undoing", 30, "the sweep to fail it")
    wait_for(lambda: exports_running() == [], 45, "node1's worker to end its export")
    assert client.job(job.id).state == "undoing"  # its target's undo waits for node crash
    crash_worker["worker"] = Worker("crash", concurrency=1)
    job = client.wait(job.id, timeout=90)
    assert job.state == "failed" and "copy_data" in job.error
    assert not target.exists() and not client.guest_store.exists(c)
    assert client.guest(g).lock == ""


def test_the_source_node_dying_mid_transfer_fails_the_copy_and_the_target_frees_it_at_once(
        client, vmid, crash_worker):
    """`crash` exports, node2 copies; `crash` is SIGKILLed: its export dies with it, node2's
    copy fails and node2 frees its volume without waiting; the job ends once `crash` is back."""
    g, c = vmid(), vmid()
    filled_guest(client, g, "crash", "crash")
    job = client.submit("full_clone", vmid=g, newid=c, storage="local2")
    with held_copy(client, job.id):
        during = client.job(job.id)
        assert during.current["node"] == "node2"
        crash_worker["worker"].kill()
    wait_for(lambda: exports_running() == [], 10, "the export to die with its worker")
    target = volume_path(during.ctx["made"]["scsi0"])
    wait_for(lambda: not target.exists(), 60, "node2 to free its half-made copy")
    crash_worker["worker"] = Worker("crash", concurrency=1)
    job = client.wait(job.id, timeout=90)
    assert job.state == "failed" and "copying" in job.error
    assert not client.guest_store.exists(c) and client.guest(g).lock == ""


def test_cancelling_a_transfer_ends_it_on_both_sides(client, vmid, workers):
    g, c = vmid(), vmid()
    filled_guest(client, g, "node1", "local1")
    job = client.submit("full_clone", vmid=g, newid=c, storage="local2")
    with held_copy(client, job.id):
        during = client.job(job.id)
        client.cancel(job.id)
    job = client.wait(job.id, timeout=60)
    assert job.state == "cancelled"
    assert not volume_path(during.ctx["made"]["scsi0"]).exists() and not client.guest_store.exists(c)
    assert exports_running() == [] and client.guest(g).lock == ""
    assert sorted(p.name for p in storage_path("local2").glob(f"{c}/*")) == []


def test_a_replica_clone_cancelled_mid_copy_leaves_no_replica(client, vmid, workers):
    """Cancelled while the base is copied to node2: the half-made replica is freed, the
    template records none and is unlocked, and the next clone there makes one whole."""
    t, c = vmid(), vmid()
    filled_guest(client, t, "node1", "local1")
    assert client.run("template", vmid=t).state == "succeeded"
    job = client.submit("linked_clone", vmid=t, newid=c, storage="local2")
    assert job.kind == "replica_clone"
    with held_copy(client, job.id):
        during = client.job(job.id)
        assert client.guest(t).lock == "replica_clone"
        client.cancel(job.id)
    job = client.wait(job.id, timeout=60)
    assert job.state == "cancelled"
    assert not volume_path(during.ctx["made"]["scsi0"]).exists()
    assert client.guest(t).replicas == {} and client.guest(t).lock == "" and not client.guest_store.exists(c)
    assert exports_running() == []
    again = client.run("linked_clone", vmid=t, newid=c, storage="local2")
    assert again.state == "succeeded", again.error
    assert len(client.guest(t).replicas) == 1
