"""Job lookups and the sweep at scale, side by side with the scans they replaced, in one run.

    .venv/bin/python bench/scale.py [--finished N] [--queued M] [--nodes K]

Starts its own redis-server (no workers: the load speaks the protocol itself) and fills it:
N finished jobs (default 100,000) recorded and ended through the same `records.create` and Lua
transition a worker uses, with their events, spread over the 30 days they are kept, of mixed
kinds, states and guests (10,000); then M queued jobs (1,000): `ping` jobs submitted as the CLI
submits them, to K node names (100) no worker serves, so their messages wait in K queues.
Measured, each the median of REPEAT runs:
- Redis memory per finished job (used_memory before and after, over N);
- `job list` as the client reads it (default, --state failed, --kind backup, --vmid, --since
  1 h) and `job show` of an id prefix, beside the previous way (every id matched against the
  prefix; each record, newest first, checked against the filter);
- the sweep as it runs once a minute for the cluster (claims and the active jobs) and the
  export check each node runs every 30 s: Redis time (INFO commandstats) per minute at K
  nodes, beside the previous way (a SCAN of the keyspace for claims; every active record
  read one by one on every node).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import testing

REPEAT = 5
DAY = 86400
KINDS = ("linked_clone", "backup", "full_clone", "destroy", "backup", "backup", "verify", "copy")


def setup(nodes: int) -> tuple[Path, testing.RedisServer]:
    base = Path(tempfile.mkdtemp(prefix="stork-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    port = testing.free_port()
    addresses = "".join(f'[nodes.n{k:03d}]\naddress = "127.0.0.1"\n' for k in range(nodes))
    (base / "stork.toml").write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\n'
                                     f'locks = "lock"\n[storage.local]\ntype = "dir"\npath = "images"\n{addresses}')
    os.environ.update(STORK_CONFIG=str(base / "stork.toml"), STORK_NODE="n000")
    os.environ.pop("STORK_REDIS_URL", None)
    return base, testing.RedisServer(port, base)


def fill_finished(r, count: int, guests: int = 10_000) -> None:  # type: ignore[no-untyped-def]
    from worker import events, records
    from worker.records import JobRecord, JobState

    now = time.time()
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        job = JobRecord(id=records.new_id(), kind=kind, params={"vmid": 100 + i % guests, "node": "n000"},
                        node="n000", steps=["run"], queues=["node.n000"],
                        created=now - 29 * DAY + i * (29 * DAY / count))
        records.create(r, job, events.make(job.id, kind, "queued", state=JobState.QUEUED, steps=job.steps))
        end = JobState.FAILED if i % 50 == 0 else JobState.SUCCEEDED
        records.transition(r, job.id, (JobState.QUEUED,), end, finished=job.created + 5, done=1,
                           events=[events.make(job.id, kind, "done", step="run"),
                                   events.make(job.id, kind, events.FINISHED, state=end)])
        if i and i % 20_000 == 0:
            print(f"  {i} finished jobs recorded", file=sys.stderr, flush=True)


def submit_queued(count: int, nodes: int) -> None:
    from worker import runner
    from worker.app import app, config, redis_client

    for i in range(count):
        runner.submit("ping", {"node": f"n{i % nodes:03d}"}, config(), redis_client(), app)


def median_ms(action: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        action()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def redis_usec(r, action: Callable[[], object]) -> float:  # type: ignore[no-untyped-def]
    """Microseconds Redis spent on the commands `action` sent (INFO commandstats)."""
    def total() -> float:  # INFO's own time left out: it is the measuring
        return sum(v["usec"] for k, v in r.info("commandstats").items() if k != "cmdstat_info")
    before = total()
    action()
    return total() - before


def previous_jobs(r, limit: int = 50, **match: object) -> list:  # type: ignore[no-untyped-def]
    """How job list filtered before the indexes: every id, newest first, each record checked."""
    from producer.client import job_guests
    from worker import records

    found = []
    for job_id in records.recent_ids(r, 100_000 if match else limit):
        job = records.load(r, job_id)
        if ("state" in match and str(job.state) != match["state"]) or ("kind" in match and job.kind != match["kind"]) \
                or ("vmid" in match and match["vmid"] not in job_guests(job)) \
                or ("since" in match and job.created < match["since"]):  # type: ignore[operator]
            continue
        found.append(job)
        if len(found) >= limit:
            break
    return found


def previous_resolve(r, prefix: str) -> str:  # type: ignore[no-untyped-def]
    from worker import records

    [match] = [j for j in r.zrange(records.JOBS, 0, -1) if j.startswith(prefix)]
    return match


def previous_sweep_claims(r) -> None:  # type: ignore[no-untyped-def]
    from worker import records

    for key in r.scan_iter(match="stork:claims:*", count=100):
        r.hgetall(key)
        set(records.active_ids(r))


def previous_export_check(r) -> None:  # type: ignore[no-untyped-def]
    from worker import records

    for job_id in records.active_ids(r):
        records.load(r, job_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=1_000)
    parser.add_argument("--nodes", type=int, default=100)
    args = parser.parse_args()
    base, server = setup(args.nodes)
    try:
        r = server.client
        empty = r.info("memory")["used_memory"]
        t0 = time.monotonic()
        fill_finished(r, args.finished)
        per_job = (r.info("memory")["used_memory"] - empty) / args.finished
        filled = time.monotonic() - t0
        submit_queued(args.queued, args.nodes)

        from producer.client import Client
        from worker import records, recovery
        from worker.app import config, redis_client
        from worker.jobs import usage

        client = Client()
        some = records.recent_ids(r, args.finished)[args.finished * 2 // 3]  # an older job
        prefix = some[:7]
        vmid = 4242
        hour_ago = time.time() - 3600
        rows = [
            ("job list (50 newest)", lambda: client.jobs(50), lambda: previous_jobs(r, 50)),
            ("job list --state failed", lambda: client.jobs(50, state="failed"),
             lambda: previous_jobs(r, 50, state="failed")),
            ("job list --kind backup", lambda: client.jobs(50, kind="backup"),
             lambda: previous_jobs(r, 50, kind="backup")),
            (f"job list --vmid {vmid}", lambda: client.jobs(50, vmid=vmid), lambda: previous_jobs(r, 50, vmid=vmid)),
            ("job list --since 1h", lambda: client.jobs(50, since=hour_ago),
             lambda: previous_jobs(r, 50, since=hour_ago)),
            (f"job show {prefix}", lambda: client.job(prefix), lambda: records.load(r, previous_resolve(r, prefix))),
        ]
        assert [j.id for j in client.jobs(50, kind="backup")] == [j.id for j in previous_jobs(r, 50, kind="backup")]
        assert client.job(prefix).id == some
        storages = config().storages
        sweep_now = redis_usec(r, lambda: (usage.prune_claims(r, storages), recovery.reconcile(redis_client())))
        sweep_before = redis_usec(r, lambda: (previous_sweep_claims(r), recovery.reconcile(redis_client())))
        check_now = redis_usec(r, lambda: recovery.end_exports_of_failed_jobs(redis_client()))
        check_before = redis_usec(r, lambda: previous_export_check(r))
        per_minute_now = (sweep_now + 2 * args.nodes * check_now) / 1e6
        per_minute_before = (sweep_before + 2 * args.nodes * check_before) / 1e6

        print(f"\n{args.finished} finished jobs (recorded in {filled:.0f} s), {args.queued} queued in "
              f"{args.nodes} node queues; Redis {r.info('server')['redis_version']}")
        print(f"Redis memory per finished job (record + events + index entries): {per_job / 1024:.2f} KiB")
        print(f"\n{'lookup (median of ' + str(REPEAT) + ')':34} {'stork':>10} {'previous':>10}")
        for name, now, before in rows:
            print(f"{name:34} {median_ms(now):8.1f} ms {median_ms(before):8.1f} ms")
        print(f"\n{'Redis time':34} {'stork':>10} {'previous':>10}")
        print(f"{'one sweep (claims + active jobs)':34} {sweep_now / 1000:8.1f} ms {sweep_before / 1000:8.1f} ms")
        print(f"{'one node export check':34} {check_now / 1000:8.2f} ms {check_before / 1000:8.2f} ms")
        print(f"{f'per minute at {args.nodes} nodes':34} {per_minute_now:9.3f} s {per_minute_before:9.3f} s")
    finally:
        server.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
