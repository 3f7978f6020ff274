"""A nightly backup of 10,000 guests, as beat starts it, and `backup list` among their backups.

    .venv/bin/python bench/nightly.py [--guests N]

Starts its own redis-server (no workers: the jobs wait in their queue) and writes N guest
configs (default 10,000), one disk each. Measured:
- one run of a `[schedule.nightly]` over every guest, as beat's tick starts it (each guest's
  backup job checked, recorded and sent): wall time, Redis time (INFO commandstats), keys and
  memory it leaves, beside the previous way (the run's whole record, with every job so far,
  saved again after each guest: quadratic);
- beat's idle tick (the other 1,439 minutes of a day): Redis time and keys written;
- `stork schedule list` once the run is recorded;
- `backup list` of one guest (`Client.backups`) in a chunk store holding one backup of each
  guest, beside the listing of all of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.scale import median_ms, redis_usec
from worker import testing

SLOT = datetime(2026, 12, 7, 2, 0, tzinfo=UTC)


def setup(guests: int) -> tuple[Path, testing.RedisServer]:
    base = Path(tempfile.mkdtemp(prefix="stork-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    port = testing.free_port()
    (base / "stork.toml").write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\nlocks = "lock"\n'
        '[storage.local]\ntype = "dir"\npath = "images"\n'
        '[storage.backup]\ntype = "chunkstore"\npath = "backup"\ncontent = ["backup"]\n'
        '[schedule.nightly]\nschedule = "0 2 * * *"\nguests = "all"\nstorage = "backup"\nkeep-daily = 7\n')
    os.environ.update(STORK_CONFIG=str(base / "stork.toml"), STORK_NODE="n000")
    os.environ.pop("STORK_REDIS_URL", None)
    from drivers.guests import Guest, GuestStore
    from worker.app import config

    store = GuestStore(config().guests_dir)
    for vmid in range(100, 100 + guests):
        store.create(Guest(vmid, "n000", disks={"scsi0": f"local:{vmid}/vm-{vmid}-disk-0.raw"}))
    return base, testing.RedisServer(port, base)


def run_nightly(r, name: str, at: datetime) -> tuple[float, float, int, int]:  # type: ignore[no-untyped-def]
    """One run of the schedule `name` at `at`: seconds, Redis µs, keys and bytes added."""
    from worker.app import app, config
    from worker.jobs import schedules

    cfg = config()
    keys, memory = r.dbsize(), r.info("memory")["used_memory"]
    t0 = time.perf_counter()
    usec = redis_usec(r, lambda: schedules.tick(cfg, r, app, at))
    took = time.perf_counter() - t0
    return took, usec, r.dbsize() - keys, r.info("memory")["used_memory"] - memory


@contextlib.contextmanager
def previous_recording() -> Iterator[None]:
    """Before: each guest's job saved the run's whole record again (every job so far inline)."""
    from worker.jobs import schedules

    runs: dict[tuple[str, str], dict[str, dict[str, str]]] = {}

    def record_held(r, name, slot, holder, part, key, value):  # type: ignore[no-untyped-def]
        run = runs.setdefault((name, slot), {"jobs": {}, "refused": {}})
        run[part][key] = value
        keys = [schedules._key(name, f"starting:{slot}"), schedules._key(name, f"run:{slot}")]
        return bool(r.eval(schedules._SAVE_HELD, 2, *keys, holder, json.dumps({"slot": slot, **run}),
                           schedules.SLOT_KEY_TTL))

    current = schedules._record_held
    schedules._record_held = record_held  # type: ignore[assignment]
    try:
        yield
    finally:
        schedules._record_held = current


def idle_ticks(r, count: int = 10) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Beat's tick in a minute nothing is due: Redis µs per tick, keys added over `count`."""
    from worker.app import app, config
    from worker.jobs import schedules

    cfg = config()
    keys = r.dbsize()
    usec = sum(redis_usec(r, lambda m=m: schedules.tick(cfg, r, app, SLOT + timedelta(minutes=m)))
               for m in range(5, 5 + count))
    return usec / count, r.dbsize() - keys


def fill_backups(guests: int) -> None:
    from drivers import backup_storage
    from worker.app import config

    store = backup_storage(config().storage("backup")).open_for_backup()
    for vmid in range(100, 100 + guests):
        with store.begin(vmid) as writer:
            writer.put_chunk(vmid.to_bytes(4, "big") * 1024)
            writer.add_blob("guest.conf", f"node = 'n000'\ndisks = {{}}\n# {vmid}\n".encode())
            writer.commit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guests", type=int, default=10_000)
    args = parser.parse_args()
    base, server = setup(args.guests)
    try:
        from producer.client import Client
        from worker.app import config
        from worker.jobs import schedules

        r = server.client
        with previous_recording():  # each way on an empty Redis, as on the first night
            before = run_nightly(r, "nightly", SLOT + timedelta(seconds=30))
        r.flushall()
        now = run_nightly(r, "nightly", SLOT + timedelta(seconds=30))
        assert len(schedules._last(r, "nightly")["jobs"]) == args.guests
        idle_usec, idle_keys = idle_ticks(r)
        status_ms = median_ms(lambda: schedules.status(config(), r, SLOT + timedelta(hours=1)))
        t0 = time.monotonic()
        fill_backups(args.guests)
        filled = time.monotonic() - t0
        client = Client()
        one = median_ms(lambda: client.backups("backup", vmid=100 + args.guests // 2))
        every = median_ms(lambda: client.backups("backup"))
        assert len(client.backups("backup", vmid=100)) == 1 and len(client.backups("backup")) == args.guests

        print(f"\nA nightly backup schedule over {args.guests} guests; Redis {r.info('server')['redis_version']}")
        print(f"\n{'one run, as beat starts it':34} {'stork':>12} {'previous':>12}")
        print(f"{'wall time':34} {now[0]:10.1f} s {before[0]:10.1f} s")
        print(f"{'Redis time':34} {now[1] / 1e6:10.2f} s {before[1] / 1e6:10.2f} s")
        print(f"{'keys added (jobs, events, indexes)':34} {now[2]:12} {before[2]:12}")
        print(f"{'memory added':34} {now[3] / 2**20:8.1f} MiB {before[3] / 2**20:8.1f} MiB")
        print(f"\nbeat's idle tick (1,439 a day): {idle_usec / 1000:.2f} ms of Redis time, "
              f"{idle_keys} keys added over 10")
        print(f"schedule list after the run: {status_ms:.0f} ms")
        print(f"\nbackup list, {args.guests} guests' backups in one store (filled in {filled:.0f} s):")
        print(f"{'  of one guest':34} {one:8.1f} ms")
        print(f"{'  of every guest':34} {every:8.1f} ms")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
