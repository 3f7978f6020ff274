"""The job indexes on a real Redis (a private one): lookups by id prefix and listings by state,
kind, guest and time read only what they show, stay equal to a scan of every record through
transitions, drop ids whose records expired, and are filled once for records made before them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import redis

from drivers.errors import NotFound
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


def test_records_made_before_the_indexes_are_indexed_once(r):
    jobs = [make(r, n, time.time() - 100 + n) for n in range(12)]
    for key in (records.IDS, *(records.kind_index(k) for k in KINDS), records.state_index(JobState.QUEUED)):
        r.delete(key)  # as a version without indexes left them
    assert records.index_all(r) == 12 and records.index_all(r) == 0
    assert listed(r, records.kind_index("backup")) == [j.id for j in reversed(jobs) if j.kind == "backup"]
    assert records.resolve(r, jobs[3].id[:8]) == jobs[3].id
