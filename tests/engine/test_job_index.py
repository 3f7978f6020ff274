"""The job indexes on a real Redis (a private one): lookups by id prefix and listings by state,
kind, guest and time read only what they show, stay equal to a scan of every record through
transitions, drop ids whose records expired, and are filled once for records made before them.
The volume sets ("which jobs that have not ended name this volume?") hold every such job
through creates, ctx writes and ends, and are built once for jobs recorded before them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import redis

from drivers.errors import NotFound, StorkError
from worker import records, testing
from worker.records import JobRecord, JobState

KINDS = ("linked_clone", "backup", "destroy")


@pytest.fixture
def r(tmp_path) -> Iterator[redis.Redis]:
    server = testing.RedisServer(testing.free_port(), tmp_path)
    yield server.client
    server.stop()


def make(r: redis.Redis, n: int, created: float) -> JobRecord:
    job = JobRecord(id=records.new_id(), kind=KINDS[n % 3], params={"vmid": 100 + n % 5, "node": "n1"}, node="n1",
                    steps=["a"], queues=["q"], created=created)
    records.create(r, job, {"phase": "queued"})
    return job


def listed(r: redis.Redis, index: str, since: float | None = None) -> list[str]:
    return [job.id for job in records.newest(r, index, since, page=7)]


def test_listings_by_index_equal_a_scan_of_every_record(r):
    now = time.time()
    jobs = [make(r, n, now - 1000 + n) for n in range(60)]
    for job, end in zip(jobs[::4], itertools.cycle([JobState.SUCCEEDED, JobState.FAILED]), strict=False):
        records.transition(r, job.id, (JobState.QUEUED,), end, finished=time.time())
    records.transition(r, jobs[1].id, (JobState.QUEUED,), JobState.RUNNING)
    every = [records.load(r, j.id) for j in reversed(jobs)]  # newest first
    for state in JobState:
        assert listed(r, records.state_index(state)) == [j.id for j in every if j.state == state], state
    for kind in KINDS:
        assert listed(r, records.kind_index(kind)) == [j.id for j in every if j.kind == kind]
    assert listed(r, records.guest_index(102)) == [j.id for j in every if j.params["vmid"] == 102]
    assert listed(r, records.JOBS, since=now - 950) == [j.id for j in every if j.created >= now - 950]


def test_an_id_is_found_by_a_unique_prefix_and_an_ambiguous_one_is_named(r):
    ids = ["aaa111000000", "aaa222000000", "bbb333000000"]
    for job_id in ids:
        records.create(r, JobRecord(id=job_id, kind="ping", params={}, node="n", steps=["a"], queues=["q"]), {})
    assert records.resolve(r, "aaa1") == "aaa111000000" and records.resolve(r, "b") == "bbb333000000"
    with pytest.raises(NotFound, match="job id 'aaa' is ambiguous"):
        records.resolve(r, "aaa")
    with pytest.raises(NotFound, match="unknown job 'ccc'"):
        records.resolve(r, "ccc")


def test_an_expired_record_leaves_the_listings(r):
    jobs = [make(r, n, time.time()) for n in range(5)]
    r.delete(records.job_key(jobs[2].id))  # its record expired
    assert jobs[2].id not in listed(r, records.JOBS)
    assert r.zscore(records.JOBS, jobs[2].id) is None  # dropped when met
    old = make(r, 0, time.time() - records.RETENTION - 10)
    make(r, 0, time.time())  # the next create of its kind trims what is older than the retention
    assert r.zscore(records.kind_index(old.kind), old.id) is None and r.zscore(records.JOBS, old.id) is None
    assert not r.zrangebylex(records.IDS, f"[{old.id}", f"[{old.id}")


@pytest.mark.parametrize("days", [None, 2, "0", "soon"])
def test_finished_jobs_are_kept_as_long_as_the_workers_config_says(r, days):
    """jobs.keep_days, set by each worker at its start (stork:settings:keep), reaches every
    producer's and worker's scripts: the expiry of a job that ends, and the trim at each create.
    A value written there by hand that is not a whole day or more counts as unset."""
    keep = days * 86400 if isinstance(days, int) else records.RETENTION
    if isinstance(days, int):
        records.set_keep(r, days)
    elif days is not None:
        r.set(records.KEEP, days)
    job = make(r, 0, time.time())
    assert r.ttl(records.job_key(job.id)) == -1  # active: no expiry
    records.transition(r, job.id, (JobState.QUEUED,), JobState.SUCCEEDED, finished=time.time())
    for key in (records.job_key(job.id), records.events_key(job.id)):
        assert keep - 5 < r.ttl(key) <= keep
    older, newer = make(r, 0, time.time() - keep - 10), make(r, 0, time.time() - keep + 3600)
    make(r, 0, time.time())  # a create trims the indexes of what is older than jobs are kept
    assert r.zscore(records.JOBS, older.id) is None and r.zscore(records.JOBS, newer.id) is not None


def test_records_made_before_the_indexes_are_indexed_once(r):
    jobs = [make(r, n, time.time() - 100 + n) for n in range(12)]
    for key in (records.IDS, *(records.kind_index(k) for k in KINDS), records.state_index(JobState.QUEUED)):
        r.delete(key)  # as a version without indexes left them
    assert records.index_all(r) == 12 and records.index_all(r) == 0
    assert listed(r, records.kind_index("backup")) == [j.id for j in reversed(jobs) if j.kind == "backup"]
    assert records.resolve(r, jobs[3].id[:8]) == jobs[3].id


def volume_job(r: redis.Redis, n: int) -> JobRecord:
    """A job whose params name a source volume (one of three) and the volume it acts on."""
    job = JobRecord(id=records.new_id(), kind="full_clone", node="n1", steps=["a", "b"], queues=["q", "q"],
                    params={"volid": f"s:{n}/vm-{n}-disk-0.raw",
                            "disks": {"scsi0": {"source": f"s:base/b{n % 3}.raw", "owner": 500}}})
    records.create(r, job, {"phase": "queued"})
    return job


def users_by_scan(r: redis.Redis, volid: str) -> list[str]:
    """The truth the sets stand for: every job that has not ended and names volid, from its record."""
    jobs = records.load_many(r, records.active_ids(r))
    return sorted(j.id for j in jobs if volid in records.params_volumes(j.params) | records.ctx_volumes(j.ctx))


def test_the_volume_sets_name_every_job_that_has_not_ended_and_only_those(r):
    records.index_volumes(r)  # a new cluster: nothing to index, the sets are used from now on
    jobs = [volume_job(r, n) for n in range(12)]
    for n, job in enumerate(jobs[:8]):  # steps record what they make, as ctx.save does
        records.transition(r, job.id, (JobState.QUEUED,), JobState.RUNNING,
                           ctx={"pending": {"scsi0": f"t:{n % 2}/made.raw"}})
    records.transition(r, jobs[0].id, (JobState.RUNNING,), ctx={"made": {"scsi0": "t:0/made.raw"},
                                                                "based": {"d": ["t:x/y.raw", "t:base/y.raw"]}})
    for job in jobs[::3]:
        records.transition(r, job.id, (JobState.RUNNING, JobState.QUEUED), JobState.SUCCEEDED)
    records.transition(r, jobs[1].id, (JobState.RUNNING,), JobState.UNDOING)
    # an undo step's save: ctx grows (a set never shrinks while its job runs: a superset, which
    # the check narrows by reading each record)
    records.update(r, jobs[1].id, ctx={"pending": {"scsi0": "t:1/made.raw"}, "replaced": {"scsi0": "t:undo/r.raw"}})
    volumes = {v for j in jobs for v in records.params_volumes(j.params)} | {
        "t:0/made.raw", "t:1/made.raw", "t:x/y.raw", "t:base/y.raw", "t:undo/r.raw"}
    for volid in volumes:
        assert records.candidates(r, volid) == users_by_scan(r, volid), volid
    assert records.candidates(r, "t:undo/r.raw") == [jobs[1].id]
    assert records.candidates(r, "t:x/y.raw") == []  # jobs[0] ended: its end took it out
    for job in jobs[::3]:
        assert not r.exists(records.volumes_key(job.id))
    assert not r.exists(records.volume_index("t:x/y.raw"))  # no set is left for a volume no job names


def test_a_job_that_ended_is_not_put_back_by_a_late_write_nor_kept_when_met(r):
    records.index_volumes(r)
    job = volume_job(r, 1)
    records.transition(r, job.id, (JobState.QUEUED,), JobState.CANCELLED)
    records.update(r, job.id, ctx={"made": {"scsi0": "t:late/x.raw"}})  # a late step's save, after the end
    assert not r.exists(records.volume_index("t:late/x.raw")) and not r.exists(records.volumes_key(job.id))
    r.sadd(records.volume_index("s:1/vm-1-disk-0.raw"), job.id)  # an id left by a process from before the end
    assert records.candidates(r, "s:1/vm-1-disk-0.raw") == []
    assert not r.exists(records.volume_index("s:1/vm-1-disk-0.raw"))  # dropped when met


def test_jobs_recorded_before_the_volume_sets_are_put_in_them_once(r):
    jobs = [volume_job(r, n) for n in range(6)]
    records.transition(r, jobs[0].id, (JobState.QUEUED,), JobState.RUNNING, ctx={"made": {"d": "t:1/m.raw"}})
    records.transition(r, jobs[5].id, (JobState.QUEUED,), JobState.FAILED)
    for key in r.scan_iter(f"{records.volume_index('')}*"):
        r.delete(key)  # as a version without the sets left them
    for job in jobs:
        r.delete(records.volumes_key(job.id))
    # until they are built, every job that has not ended may name the volume: its record says
    assert records.candidates(r, "t:1/m.raw") == sorted(j.id for j in jobs[:5])
    assert records.index_volumes(r) == 5 and records.index_volumes(r) == 0
    assert records.candidates(r, "t:1/m.raw") == [jobs[0].id]
    users = sorted([jobs[1].id, jobs[4].id])
    assert records.candidates(r, "s:base/b1.raw") == users_by_scan(r, "s:base/b1.raw") == users


def test_a_record_that_cannot_be_read_leaves_the_volume_sets_unbuilt(r):
    """The checks then read every job's record, and refuse naming that one (fail closed)."""
    job = volume_job(r, 1)
    r.hset(records.job_key(job.id), "params", '{"disks": ["not", "plans"]}')
    with pytest.raises(StorkError, match=f"job record {job.id} cannot be read"):
        records.index_volumes(r)
    assert not r.exists(records.VOLUMES_INDEXED)
    assert records.candidates(r, "s:base/b1.raw") == [job.id]
