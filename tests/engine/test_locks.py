"""Shared-storage leases: renewed while held, fenced by a token that grows with every grant,
a clear failure when lost, and correct under contention from two nodes."""

from __future__ import annotations

import time

import pytest

from drivers.errors import LockTimeout
from worker import locks
from worker.locks import LeaseLost


def shared_storage(client):
    return client.cfg.storage("shared")


def test_twenty_linked_clones_on_shared_storage_from_two_nodes_all_succeed(client, vmid):
    """20 linked clones of one template on a shared storage at once: both nodes make them
    under the one lease, each gets its own disk, and the fencing token grew with every grant."""
    t = vmid()
    job = client.run("create", vmid=t, disks={"scsi0": {"storage": "shared", "size": "8M"}})
    assert job.state == "succeeded", job.error
    assert client.run("template", vmid=t).state == "succeeded"
    fence = int(client.r.get("stork:lock:storage:shared:fence") or 0)
    jobs = [client.submit("linked_clone", vmid=t, newid=vmid()) for _ in range(20)]
    done = [client.wait(j.id, timeout=120) for j in jobs]
    assert [j.state for j in done] == ["succeeded"] * 20, [j.error for j in done]
    disks = {j.result["disks"]["scsi0"] for j in done}
    assert len(disks) == 20
    assert {j.ran_on["link_disks"] for j in done} == {"node1", "node2"}
    assert int(client.r.get("stork:lock:storage:shared:fence")) >= fence + 20


def test_a_lease_held_past_its_lifetime_is_renewed(client, monkeypatch):
    """A holder that keeps a lease for three lease lifetimes still owns it: a thread renews it."""
    monkeypatch.setattr(locks, "LEASE", 1.5)
    with locks.storage_lock(client.cfg, client.r, shared_storage(client)) as lease:
        time.sleep(4.5)
        lease.check()


def test_a_lost_lease_stops_the_holder_before_it_acts(client):
    """A lease that expired (its key gone) fails its check, and its release, with one clear line."""
    with pytest.raises(LeaseLost, match=r"storage 'shared': the lease was lost before it was released"), \
            locks.storage_lock(client.cfg, client.r, shared_storage(client)) as lease:
        client.r.delete("stork:lock:storage:shared")
        with pytest.raises(LeaseLost, match=r"storage 'shared': the lease was lost \(expired or granted to another"):
            lease.check()


def test_a_later_grant_fences_off_the_earlier_holder(client):
    """After its lease expired and another holder was granted one, the first holder's check
    fails: the later token fences it off."""
    first = locks.RedisLease(client.r, "storage:fenced", 5, "storage 'fenced'")
    client.r.delete("stork:lock:storage:fenced")  # as if it expired while the holder stalled
    second = locks.RedisLease(client.r, "storage:fenced", 5, "storage 'fenced'")
    assert second.token > first.token
    second.check()
    with pytest.raises(LeaseLost, match=rf"token {second.token} after ours {first.token}"):
        first.check()
    second.release()
    with pytest.raises(LeaseLost, match="the lease was lost before it was released"):
        first.release()


def test_a_lease_not_granted_in_time_is_a_lock_timeout(client):
    """While another holder has the lease, a second one waits its timeout and gives up with one line."""
    with locks.storage_lock(client.cfg, client.r, shared_storage(client)):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"storage 'contended': lock not free after 0.3s"):
            locks.RedisLease(client.r, "storage:shared", 0.3, "storage 'contended'")
        assert time.monotonic() - started < 2


def test_a_file_lock_another_thread_holds_at_a_fork_is_not_kept_by_the_child(tmp_path):
    """The worker's sweep holds a guest's lock in a thread while Celery's pool forks a process:
    the child's copy of the descriptor would keep the lock for the child's whole life. Once
    the holder lets go, the lock is free, the child still running."""
    import fcntl
    import os
    import threading
    import time

    from drivers.flock import file_lock

    path, held, forked = tmp_path / "guest.lock", threading.Event(), threading.Event()

    def holder() -> None:
        with file_lock(path, 1, "a guest's config"):
            held.set()
            forked.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    running, started = os.pipe()
    child = os.fork()
    if child == 0:  # the pool's new process: runs on, never touching the lock
        os.write(started, b"x")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(running, 1) == b"x"  # past the fork's handlers, in the child
        forked.set()
        thread.join(10)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child kept it
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(running)
        os.close(started)


def test_a_grant_whose_token_cannot_be_had_leaves_no_lease(client):
    """The lock is taken, then its token counted: where the count fails (here a counter that
    holds no number), the lock is let go at once, not left to block the storage for a lease."""
    import redis

    client.r.set("stork:lock:storage:odd:fence", "not a number")
    try:
        with pytest.raises(redis.ResponseError, match="not an integer"):
            locks.RedisLease(client.r, "storage:odd", 5, "storage 'odd'")
        assert not client.r.exists("stork:lock:storage:odd")
    finally:
        client.r.delete("stork:lock:storage:odd:fence", "stork:lock:storage:odd")
