"""Redis failing over under real work: three members (a master and two replicas, append-only)
and three sentinels on loopback; two worker nodes and the client find the master through the
sentinels, and wait for both replicas (wait_replicas = 2). The master is failed over by
SENTINEL FAILOVER, SIGKILLed, or stopped (SIGSTOP: its connections hang instead of being
refused) while linked clones, a full clone's copy and a backup run. Every job must end, each commit
run once, no guest stay locked, and both nodes answer a ping afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers import config
from producer.client import Client
from tests.helpers import held_copy
from worker import records, recovery, testing
from worker.records import JobRecord

NODES = ("ha1", "ha2")


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.group = testing.SentinelGroup(base / "redis")
        sentinels = ", ".join(f'"{a}"' for a in self.group.addresses)
        self.file = base / "stork.toml"
        self.file.write_text(
            f'[redis]\nsentinels = [{sentinels}]\nmaster_name = "{self.group.NAME}"\nwait_replicas = 2\n'
            f'[paths]\nguests = "guests"\nlocks = "lock"\n'
            f'[storage.local]\ntype = "dir"\npath = "images"\n'
            f'[storage.backup]\ntype = "chunkstore"\npath = "backup"\ncontent = ["backup"]\n')
        self.env = {**os.environ, "STORK_CONFIG": str(self.file), "STORK_NODE": NODES[0]}
        self.env.pop("STORK_REDIS_URL", None)
        self.workers: dict[str, testing.Worker] = {}
        try:
            for node in NODES:
                self.workers[node] = testing.Worker(node, base, concurrency=2, env={**self.env, "STORK_NODE": node})
            self.client = Client(config.load(self.env))
        except BaseException:  # nothing left running behind a fixture that failed to start
            self.stop()
            raise

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.group.stop()


@pytest.fixture(scope="module")
def ha(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ha"))
    yield cluster
    cluster.stop()
    for data in ("images", "backup"):  # the disks and backups (GBs); the logs stay for a failure's reading
        shutil.rmtree(cluster.base / data, ignore_errors=True)


_ids = iter(range(500, 10_000))


def template(ha: Cluster, size: str = "64M") -> int:
    t = next(_ids)
    assert ha.client.run("create", vmid=t, disks={"scsi0": {"storage": "local", "size": size}},
                         timeout=120).state == "succeeded"
    assert ha.client.run("template", vmid=t, timeout=120).state == "succeeded"
    return t


# a message the master popped as it stopped, its reply never reaching the worker, is lost with
# the connection (kombu's Redis transport takes a message out before it is acknowledged): the
# sweep sends it again once its job has sat still for recovery.STALE, at its next round (a minute)
ENDED_WITHIN = recovery.STALE + 180


def ended(ha: Cluster, job_ids: list[str], timeout: float = ENDED_WITHIN) -> list[JobRecord]:
    def all_ended() -> list[JobRecord] | None:
        for worker in ha.workers.values():
            assert worker.proc.poll() is None, "a worker died:\n" + worker.log.read_text()[-3000:]
        jobs = [ha.client.job(j) for j in job_ids]
        return jobs if all(j.state.terminal for j in jobs) else None
    try:
        return testing.wait_for(all_ended, timeout, "every job to end", interval=0.5)
    except AssertionError:
        left = [(j.id, j.state, j.done, j.steps[j.done] if j.done < len(j.steps) else "", j.current)
                for j in map(ha.client.job, job_ids) if not j.state.terminal]
        raise AssertionError(f"{len(left)} jobs did not end: {left[:5]}") from None


def commits_started(ha: Cluster, job: JobRecord) -> int:
    """How many times the job's commit step was started, from its event history."""
    starts = 0
    for _, values in ha.client.r.xrange(records.events_key(job.id)):
        event = records.json.loads(values["event"])
        if event.get("phase") == "start" and event.get("step") == "commit_guest":
            starts += 1
    return starts


def assert_sound(ha: Cluster, jobs: list[JobRecord], template_id: int | None = None) -> None:
    """Each job succeeded with its commit run once; no guest is left locked; both nodes answer."""
    bad = [(j.id, j.state, j.error) for j in jobs if j.state != "succeeded"]
    assert not bad, bad
    for job in jobs:
        if "commit_guest" in job.steps:
            assert commits_started(ha, job) == 1, f"job {job.id}'s commit ran more than once"
    locked = [(g.vmid, g.lock) for g in ha.client.guests() if g.lock]
    assert not locked, locked
    answers = ha.client.ping(list(NODES), timeout=30)
    assert all(a["ok"] for a in answers), answers


def submit_clones(ha: Cluster, t: int, count: int) -> tuple[list[str], list[int]]:
    news = [next(_ids) for _ in range(count)]
    return [ha.client.submit("linked_clone", vmid=t, newid=n).id for n in news], news


def test_a_sentinel_failover_and_back_during_100_linked_clones(ha):
    """SENTINEL FAILOVER while 100 linked clones run, and a second one back: all 100 succeed,
    each commit once, each clone's disk an overlay of the template's base."""
    t = template(ha)
    first = ha.group.master()
    job_ids, news = submit_clones(ha, t, 50)
    time.sleep(0.5)
    second = ha.group.failover()
    more, more_news = submit_clones(ha, t, 50)
    jobs = ended(ha, job_ids + more)
    assert_sound(ha, jobs)
    assert len({g.vmid for g in ha.client.guests()} & set(news + more_news)) == 100
    back = [second]
    while ha.group.settled(2) != first and len(back) < 5:  # a failover picks any replica: go round to the first
        back.append(ha.group.failover())
    again = ended(ha, submit_clones(ha, t, 10)[0])
    assert_sound(ha, again)


def test_the_master_killed_during_a_copy(ha):
    """SIGKILL of the master while a full clone copies (held mid-way, then let run with no
    master until the sentinels promote a replica): the copy's step rides it out, and the clone
    is identical; the old master comes back as a replica."""
    src = next(_ids)
    assert ha.client.run("create", vmid=src, disks={"scsi0": {"storage": "local", "size": "512M"}},
                         timeout=120).state == "succeeded"
    image = ha.base / "images" / str(src) / f"vm-{src}-disk-0.raw"
    with open(image, "r+b") as f:
        for _ in range(512 // 8):
            f.write(os.urandom(1 << 16) * 128)
    new = next(_ids)
    job = ha.client.submit("full_clone", vmid=src, newid=new, storage="local")
    with held_copy(ha.client, job.id):
        old = ha.group.master()
        victim = ha.group.members[old]
        victim.proc.kill()
        victim.proc.wait()
    ha.group.wait_for_new_master(old)
    [done] = ended(ha, [job.id])
    assert_sound(ha, [done])
    victim.start()  # back as a replica of the new master (the sentinels reconfigure it)
    testing.wait_for(lambda: victim.client.role()[0] == "slave", 30, "the old master to follow")
    target = ha.base / "images" / str(new) / f"vm-{new}-disk-0.raw"
    assert subprocess.run(["qemu-img", "compare", "-q", str(image), str(target)], check=False).returncode == 0


def test_a_failover_during_a_backup(ha):
    """SENTINEL FAILOVER while a backup writes: it ends succeeded and verifies."""
    g = next(_ids)
    assert ha.client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "512M"}},
                         timeout=120).state == "succeeded"
    with open(ha.base / "images" / str(g) / f"vm-{g}-disk-0.raw", "r+b") as f:
        for _ in range(512 // 8):
            f.write(os.urandom(1 << 16) * 128)
    job = ha.client.submit("backup", vmid=g, storage="backup")
    testing.wait_for(lambda: ha.client.job(job.id).current is not None, 60, "the backup to start")
    ha.group.failover()
    [done] = ended(ha, [job.id])
    assert_sound(ha, [done])
    verify = ha.client.run("verify", storage="backup", timeout=120)
    assert verify.state == "succeeded", verify.error


def test_the_master_stopped_so_connections_hang(ha):
    """SIGSTOP of the master while linked clones run: nothing refuses a connection, they hang;
    socket timeouts and keepalive turn that into errors, the sentinels promote a replica, and
    every job ends succeeded. The stopped master, continued, comes back as a replica."""
    t = template(ha)
    job_ids, _ = submit_clones(ha, t, 30)
    time.sleep(0.3)
    old = ha.group.master()
    victim = ha.group.members[old]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        ha.group.wait_for_new_master(old)
        jobs = ended(ha, job_ids)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert_sound(ha, jobs)
    testing.wait_for(lambda: victim.client.role()[0] == "slave", 30, "the old master to follow")
