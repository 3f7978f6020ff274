"""What a failover may not take back, on a real replicated Redis (a master, two replicas, three
sentinels on loopback): a protected write and every Celery message are held by the replicas
before they count as done, and a replica the sentinels call down stops being waited for (it
cannot be promoted), while one they still see up is always waited for."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from drivers import config
from drivers.errors import StorkError
from drivers.redis_settings import RedisSettings
from worker import connect, failover, testing

DOWN_AFTER_MS = 2000


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Iterator[testing.SentinelGroup]:
    found = testing.SentinelGroup(tmp_path_factory.mktemp("replicated"), down_after_ms=DOWN_AFTER_MS)
    yield found
    found.stop()


def settings(group: testing.SentinelGroup, wait: int = 2) -> RedisSettings:
    sentinels = ", ".join(f'"{a}"' for a in group.addresses)
    text = f'[redis]\nsentinels = [{sentinels}]\nmaster_name = "{group.NAME}"\nwait_replicas = {wait}\n'
    return config.parse(text, Path("stork.toml"), {"STORK_NODE": "n"}).redis


def replicas(group: testing.SentinelGroup) -> list[testing.RedisServer]:
    master = group.master()
    return [m for port, m in group.members.items() if port != master]


def waits(group: testing.SentinelGroup) -> int:
    return int(group.members[group.master()].client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def test_a_celery_message_is_held_by_every_replica_when_the_send_returns(group):
    s = settings(group)
    options = connect.celery_settings(s, "worker", 60)
    before = waits(group)
    with Connection(options["broker_url"], transport_options=options["broker_transport_options"]) as conn:
        channel = conn.default_channel
        assert isinstance(channel, failover.SentinelChannel)  # picked by the sentinel:// scheme
        assert len(channel.client.connection_pool.sentinel_manager.sentinels) == len(group.sentinels)
        queue = conn.SimpleQueue("replicated-send")
        queue.put({"step": 1})
        queue.close()
    assert waits(group) == before + 1
    for replica in replicas(group):
        assert replica.client.llen("replicated-send") == 1


def test_a_replica_still_up_is_waited_for(group):
    """Stopped just now, the sentinels have not called it down yet: the write is not acknowledged."""
    r = connect.client(s := settings(group), "worker")
    victim = replicas(group)[0]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        assert not connect.write_replicated(r, s.wait_replicas, lambda c: c.set("waited", 1), patience=0.5)
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)


def test_a_replica_the_sentinels_call_down_is_not_waited_for(group):
    r = connect.client(s := settings(group), "worker")
    victim, other = replicas(group)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        sentinel = redis.Redis(port=next(iter(group.sentinels)), decode_responses=True)
        testing.wait_for(lambda: any(x["port"] == victim.port and x["is_sdown"]
                                     for x in sentinel.sentinel_slaves(group.NAME)), 30, "the replica called down")
        assert connect.write_replicated(r, s.wait_replicas, lambda c: c.set("while-down", 1), patience=10)
        assert other.client.get("while-down") == "1"
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    testing.wait_for(lambda: victim.client.get("while-down") == "1", 30, "the replica to catch up")
    testing.wait_for(lambda: connect.replicas_to_wait_for(r.connection_pool, 2) == 2, 30, "the sentinels to see it up")
    assert connect.write_replicated(r, s.wait_replicas, lambda c: c.set("both-again", 1), patience=10)
    assert victim.client.get("both-again") == "1"  # waited for again: it holds the write when the call returns


def _half_closed(channel) -> None:
    """As a close that failed on the gone master leaves it: pools dropped, the transport's
    connection gone (kombu's Connection.collect after a failover restarted the consumer)."""
    channel._disconnect_pools()
    channel.connection.client = None


def _closed(channel) -> None:
    """As a close that got as far as leaving its transport, its unacked messages not given back."""
    channel._disconnect_pools()
    channel.connection.close_channel(channel)


@pytest.mark.parametrize("close", [_half_closed, _closed])
def test_a_step_ending_after_its_consumer_restarted_still_acks(group, close):
    """A failover restarts the consumer while a step runs (a backup, in a CI run); the step then
    ends and acks on the channel that restart closed. kombu's channel reached for the gone
    connection and raised AttributeError ('hostname'), an unrecoverable error after which the
    worker took no task again. stork's channel acks through the master there is now: the
    message leaves kombu's unacked hash (or a reject puts it back on its queue) at once, rather
    than after the visibility timeout while the sweep waits for the live worker to give it back."""
    options = connect.celery_settings(settings(group), "worker", 60)
    queue = f"acked-after-restart-{close.__name__}"
    with Connection(options["broker_url"], transport_options=options["broker_transport_options"]) as conn:
        channel = conn.channel()
        conn.SimpleQueue(queue).put({"step": 1})
        first = channel.basic_get(queue, no_ack=False)
        conn.SimpleQueue(queue).put({"step": 2})
        second = channel.basic_get(queue, no_ack=False)
        transport, client = channel.connection, conn.transport.client
        master = group.members[group.master()].client
        assert master.hexists("unacked", first.delivery_tag) and master.hexists("unacked", second.delivery_tag)
        close(channel)
        try:
            channel.basic_ack(first.delivery_tag)  # no AttributeError: the consumer's loop lives on
            channel.basic_reject(second.delivery_tag, requeue=True)
        finally:
            transport.client = client
        assert not master.hexists("unacked", first.delivery_tag)
        assert not master.hexists("unacked", second.delivery_tag)
        assert master.llen(queue) == 1  # the rejected one, back for the next worker
        assert channel._pool is None  # the connection the ack made is let go again
    master.delete(queue, f"_kombu.binding.{queue}")


# ---- a record that a step acts on is held by the replicas, or the step does not act -------------


def every_replica_up(group: testing.SentinelGroup) -> bool:
    """No sentinel calls a replica down (one stopped a moment ago may still be called so)."""
    for port in group.sentinels:
        sentinel = redis.Redis(port=port, decode_responses=True)
        if any(x["is_sdown"] or x["is_odown"] for x in sentinel.sentinel_slaves(group.NAME)):
            return False
    return True


@contextlib.contextmanager
def stopped_replica(group, monkeypatch) -> Iterator[None]:
    """A replica stopped just now (every sentinel still counts on it), and half a second's
    patience instead of a minute: no write is confirmed."""
    with monkeypatch.context() as m:
        m.setattr(connect, "REPLICATION_PATIENCE", 0.5)
        testing.wait_for(lambda: every_replica_up(group), 30, "the sentinels to see every replica up")
        victim = replicas(group)[0]
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)


@pytest.fixture
def one_replica_stopped(group, monkeypatch) -> Iterator[None]:
    with stopped_replica(group, monkeypatch):
        yield


def node_config(group: testing.SentinelGroup, base: Path):
    sentinels = ", ".join(f'"{a}"' for a in group.addresses)
    text = (f'[redis]\nsentinels = [{sentinels}]\nmaster_name = "{group.NAME}"\nwait_replicas = 2\n'
            f'[paths]\nguests = "guests"\nlocks = "lock"\n[storage.local]\ntype = "dir"\npath = "images"\n')
    (base / "stork.toml").write_text(text)
    return config.parse(text, base / "stork.toml", {"STORK_NODE": "n"})


def create_job(r: redis.Redis, vmid: int, running: bool):
    """A `create` job of one 1 MiB disk, recorded at its allocate step: idle, or run by this process."""
    from worker import liveness, records
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord, JobState

    steps = [s.name for s in KINDS["create"].steps]
    at = steps.index("allocate")
    plan = {"storage": "local", "size": 1 << 20, "format": "raw", "owner": vmid}
    held = {"current": {"step": at, "name": "allocate", "node": "n", "worker": liveness.process_id(),
                        "attempt": 1}} if running else {}
    job = JobRecord(id=records.new_id(), kind="create", node="n", steps=steps, queues=["node.n"] * len(steps),
                    params={"node": "n", "vmid": vmid, "disks": {"scsi0": plan}}, done=at,
                    state=JobState.RUNNING if running else JobState.QUEUED, **held)
    records.create(r, job, {"phase": "queued"})
    return job


def test_a_step_makes_no_volume_its_saved_name_is_not_replicated_for(group, tmp_path, one_replica_stopped):
    """A step saves what it is about to make (a name, a disk about to be renamed into a base)
    before it makes it. Taken back by a failover, that save would leave the made volume unknown
    to the job: its retry fails on the old name, its undo has nothing to turn back, and the
    guest names a disk that is gone (its data in a base no one knows of). So a save the
    replicas do not confirm stops the step before it acts."""
    from worker import liveness
    from worker.context import StepContext
    from worker.jobs import steps
    from worker.jobs.kinds import KINDS

    cfg = node_config(group, tmp_path)
    r = connect.client(cfg.redis, "worker")
    job = create_job(r, 7001, running=True)
    ctx = StepContext(job=job, cfg=cfg, r=r, node="n", step="allocate", worker=liveness.process_id(), kinds=KINDS)
    with pytest.raises(connect.NotReplicated, match=f"what step allocate of job {job.id} saved"):
        steps.allocate_disks(ctx)
    assert not list((tmp_path / "images").rglob("*.raw"))


def test_a_step_does_not_begin_where_its_start_is_not_replicated(group, tmp_path, one_replica_stopped):
    """Any step's start, not only a commit's: lost in a failover, it lets a second process take
    the step beside this one, and this one's saves and end are then refused while its effects stand."""
    from worker import liveness, runner
    from worker.jobs.kinds import KINDS
    from worker.records import load

    cfg = node_config(group, tmp_path)
    r = connect.client(cfg.redis, "worker")
    job = create_job(r, 7002, running=False)
    with pytest.raises(connect.NotReplicated, match=f"the start of step allocate of job {job.id}"):
        runner._start_step(r, cfg, job, KINDS["create"], job.done, liveness.process_id(),
                           {"done": job.done, "idle": True}, {})
    given_back = load(r, job.id)  # the sweep sends it again, as a lost message, and it counts no attempt
    assert given_back.current is None and given_back.attempts == {} and given_back.ran_on == {}


def test_an_undo_does_not_begin_where_its_start_is_not_replicated(group, tmp_path, monkeypatch):
    """A master cut off from its replicas (a partition) may be replaced while a step there
    fails: the new master carries the step forward (a move's switch attaches the copy), and an
    undo run from the old master's record would free that copy. So an undo acts only once its
    start is held by the replicas; unconfirmed, it is given back for the sweep, its volume kept."""
    from types import SimpleNamespace

    from worker import records, runner
    from worker.jobs.kinds import KINDS
    from worker.records import JobState

    cfg = node_config(group, tmp_path)
    r = connect.client(cfg.redis, "worker")
    job = create_job(r, 7003, running=False)
    volid, made = "local:7003/vm-7003-disk-0.raw", tmp_path / "images" / "7003" / "vm-7003-disk-0.raw"
    made.parent.mkdir(parents=True)
    made.write_bytes(b"\0" * 4096)
    records.transition(r, job.id, (JobState.QUEUED,), JobState.UNDOING, guard={"idle": True},
                       ctx={"made": {"scsi0": volid}}, undo=[job.done], undone=[], final="failed")
    monkeypatch.setattr(runner, "config", lambda: cfg)
    monkeypatch.setattr(runner, "redis_client", lambda: r)
    task = SimpleNamespace(request=SimpleNamespace(id=None, hostname=None))
    with stopped_replica(group, monkeypatch), \
            pytest.raises(connect.NotReplicated, match=f"the start of undo allocate of job {job.id}"):
        runner.run_undo(task, job.id, KINDS["create"], job.done)
    given_back = records.load(r, job.id)
    assert made.exists() and given_back.current is None and given_back.undone == []
    runner.run_undo(task, job.id, KINDS["create"], job.done)  # confirmed: the undo runs
    assert not made.exists() and records.load(r, job.id).undone == [job.done]


def test_a_new_job_whose_message_cannot_be_sent_is_cancelled_not_left_for_the_sweep(group, tmp_path, monkeypatch):
    """Recorded, and then its message not sent (the broker away past the send's patience): its
    user is told it failed, so it must not run later. Left queued, the sweep would send it two
    minutes on (a `guest destroy` reported failed, destroying all the same); it is cancelled."""
    from worker import runner
    from worker.app import make_app
    from worker.records import load

    cfg = node_config(group, tmp_path)
    r = connect.client(cfg.redis, "producer")
    away = config.parse(f'[redis]\nurl = "redis://127.0.0.1:{testing.free_port()}/0"\n', tmp_path / "away.toml",
                        {"STORK_NODE": "n"})
    monkeypatch.setattr(failover, "SEND_PATIENCE", 0.5)
    with pytest.raises(StorkError, match=r"^new job \S+: its message could not be sent: .*; it was not sent, "
                                         r"and is cancelled$") as refused:
        runner.submit("ping", {"node": "n"}, cfg, r, make_app(away, "producer"))
    job = load(r, str(refused.value).split()[2].rstrip(":"))
    assert job.state == "cancelled" and job.error.startswith("not sent: its message could not be sent")


def test_a_new_job_the_replicas_do_not_confirm_is_not_sent(group, tmp_path, one_replica_stopped):
    """The submit fails naming the job, and sends nothing: where the record stands (no failover
    came), the sweep sends it; where a failover took it back, no step runs for a job not known."""
    from worker import runner
    from worker.app import make_app
    from worker.records import load

    cfg = node_config(group, tmp_path)
    r = connect.client(cfg.redis, "producer")
    master = group.members[group.master()].client
    before = {q: master.llen(q) for q in ("node.n", "shared")}
    with pytest.raises(connect.NotReplicated, match=r"new job .* was not confirmed") as refused:
        runner.submit("ping", {"node": "n"}, cfg, r, make_app(cfg, "producer"))
    job_id = str(refused.value).split()[2]
    assert str(refused.value).endswith("it was not sent, and is cancelled")
    assert load(master, job_id).state == "cancelled"  # where it stands, the sweep does not send it later
    assert {q: master.llen(q) for q in ("node.n", "shared")} == before
