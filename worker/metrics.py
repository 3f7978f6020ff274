"""What a node's Prometheus endpoint (worker/run/metrics.py) says, read at each scrape.

From Redis, written where what they mirror changes: jobs that ended by kind and state (counted
by the transition that ends a job, worker/records.py), jobs not ended yet (the active set),
each guest's last backup that succeeded (written by the backup step at its commit), and each
schedule's last run. From the backup storages this node reaches: size, logical data held,
bytes of chunk files and so the dedup ratio, and backups by verify result; those read every
manifest and chunk folder, so they are computed at most every STORE_EVERY seconds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from drivers import BACKUP_STORAGES, backup_storage
from drivers.backup.records import Manifest, parse_time
from drivers.config import Config
from drivers.errors import StorkError
from worker.records import ACTIVE, BACKUPS, ENDED, job_key

STORE_EVERY = 300.0  # seconds a look at the backup storages is served before the next


def record_backup(r: redis.Redis, vmid: int, storage: str, manifest: Manifest) -> None:
    """Note a guest's backup that just committed, for the endpoint."""
    took = (parse_time(manifest.finished) - parse_time(manifest.started)).total_seconds()
    r.hset(BACKUPS, str(vmid), json.dumps({"time": parse_time(manifest.finished).timestamp(), "storage": storage,
                                            "duration": took, "size": manifest.size, "written": manifest.written}))


Rows = Callable[[], list[dict[str, Any]]]


class Collector:
    """A prometheus_client collector: `collect` builds every family afresh from Redis, and from
    the stores as last looked at. `schedule_rows` is `stork schedule list`'s reader
    (worker/jobs/schedules.status), given by the process that serves the endpoint."""

    def __init__(self, cfg: Callable[[], Config], r: Callable[[], redis.Redis], schedule_rows: Rows) -> None:
        self.cfg, self.r, self.schedule_rows = cfg, r, schedule_rows
        self._looks: dict[str, Look] = {}  # each store's last good look (a failed one is tried at every scrape)
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        r = self.r()
        yield from self._jobs(r)
        yield from self._backups(r)
        yield from self._schedules()
        yield from self._store_metrics()

    @staticmethod
    def _jobs(r: redis.Redis) -> Iterator[Metric]:
        ended = CounterMetricFamily("stork_jobs_ended", "Jobs that ended, by kind and final state",
                                    labels=["kind", "state"])
        for field, count in sorted(r.hgetall(ENDED).items()):
            kind, _, state = str(field).partition("|")
            ended.add_metric([kind, state], float(count))
        yield ended
        active: dict[tuple[str, str], int] = {}
        for job_id in r.smembers(ACTIVE):
            kind, state = r.hmget(job_key(str(job_id)), "kind", "state")
            if kind and state:
                key = (json.loads(kind), str(state))
                active[key] = active.get(key, 0) + 1
        running = GaugeMetricFamily("stork_jobs_active", "Jobs not ended yet, by kind and state",
                                    labels=["kind", "state"])
        for (kind, state), count in sorted(active.items()):
            running.add_metric([kind, state], count)
        yield running

    @staticmethod
    def _backups(r: redis.Redis) -> Iterator[Metric]:
        families = {
            "time": GaugeMetricFamily("stork_backup_last_success_timestamp_seconds",
                                      "When the guest's last backup that succeeded finished",
                                      labels=["vmid", "storage"]),
            "duration": GaugeMetricFamily("stork_backup_last_duration_seconds", "How long that backup took",
                                          labels=["vmid", "storage"]),
            "written": GaugeMetricFamily("stork_backup_last_written_bytes", "Bytes of new chunk files it wrote",
                                         labels=["vmid", "storage"]),
            "size": GaugeMetricFamily("stork_backup_last_size_bytes", "The guest's disks' virtual size it held",
                                      labels=["vmid", "storage"]),
        }
        for vmid, raw in sorted(r.hgetall(BACKUPS).items()):
            last = json.loads(raw)
            for key, family in families.items():
                family.add_metric([str(vmid), last["storage"]], float(last[key]))
        yield from families.values()

    def _schedules(self) -> Iterator[Metric]:
        last = GaugeMetricFamily("stork_schedule_last_run_timestamp_seconds", "The slot of the schedule's last run",
                                 labels=["schedule", "action"])
        jobs = GaugeMetricFamily("stork_schedule_last_run_jobs", "The last run's jobs, by state (refused: not "
                                 "started)", labels=["schedule", "state"])
        for row in self.schedule_rows():
            if row["last"]:
                last.add_metric([row["name"], row["action"]], datetime.fromisoformat(row["last"]).timestamp())
            for state, count in _outcome_counts(row["outcome"]).items():
                jobs.add_metric([row["name"], state], count)
        yield last
        yield jobs

    def _store_metrics(self) -> list[Metric]:
        with self._lock:
            return list(store_metrics(self.cfg(), self._looks))


def _outcome_counts(outcome: str) -> dict[str, int]:
    """`"2 succeeded, 1 refused"` as {"succeeded": 2, "refused": 1}; nothing for an outcome that is no count."""
    counts = {}
    for part in outcome.split(", "):
        number, _, state = part.partition(" ")
        if number.isdigit() and state:
            counts[state] = int(number)
    return counts


Look = tuple[float, dict[str, float], dict[str, int]]  # (when, figures, backups by verify result)


def store_metrics(cfg: Config, looks: dict[str, Look]) -> Iterator[Metric]:
    """Each backup storage this node reaches: file system size and use, data its backups hold,
    bytes of its chunk files, the dedup ratio, and its backups by verify result; a store's
    look in `looks` serves for STORE_EVERY seconds."""
    families = {
        "size": GaugeMetricFamily("stork_store_size_bytes", "The file system holding the store", labels=["storage"]),
        "used": GaugeMetricFamily("stork_store_used_bytes", "Bytes used on that file system", labels=["storage"]),
        "logical": GaugeMetricFamily("stork_store_logical_bytes", "The disks' virtual sizes its backups hold, added up",
                                     labels=["storage"]),
        "chunks": GaugeMetricFamily("stork_store_chunk_bytes", "Bytes of its chunk files", labels=["storage"]),
        "ratio": GaugeMetricFamily("stork_store_dedup_ratio", "Logical bytes per byte of chunk files (0: no "
                                   "chunk file yet)", labels=["storage"]),
    }
    verified = GaugeMetricFamily("stork_store_backups", "Backups by their last verify result (none: never; damaged: "
                                 "its manifest or state cannot be read)", labels=["storage", "verify"])
    up = GaugeMetricFamily("stork_store_up", "Whether the store could be read", labels=["storage"])
    for storage in sorted(cfg.storages.values(), key=lambda s: s.id):
        if storage.type not in BACKUP_STORAGES or not storage.on_node(cfg.node):
            continue
        look = looks.get(storage.id)
        if look is None or time.monotonic() - look[0] > STORE_EVERY:
            try:
                look = looks[storage.id] = (time.monotonic(), *_look_at(backup_storage(storage).open()))
            except (StorkError, OSError):
                looks.pop(storage.id, None)
                up.add_metric([storage.id], 0)
                continue
        _, figures, results = look
        up.add_metric([storage.id], 1)
        for key, family in families.items():
            family.add_metric([storage.id], figures[key])
        for result, count in sorted(results.items()):
            verified.add_metric([storage.id, result], count)
    yield from families.values()
    yield verified
    yield up


def _look_at(store: Any) -> tuple[dict[str, float], dict[str, int]]:
    listing = store.listing()
    total, used, _available = store.status()
    logical = float(sum(s.manifest.size for s in listing.snapshots))
    chunks = float(_chunk_bytes(store.root / ".chunks"))
    results: dict[str, int] = {"damaged": len(listing.damaged)}
    for s in listing.snapshots:
        state = s.state.verify.state if s.state.verify else "none"
        results[state] = results.get(state, 0) + 1
    figures = {"size": float(total), "used": float(used), "logical": logical, "chunks": chunks,
               "ratio": logical / chunks if chunks else 0.0}
    return figures, results


def _chunk_bytes(folder: Any) -> int:
    """Bytes of the chunk files below `folder`, without following a link."""
    total = 0
    try:
        prefixes = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for prefix in prefixes:
        with os.scandir(prefix.path) as entries:
            total += sum(e.stat(follow_symlinks=False).st_size for e in entries
                         if e.is_file(follow_symlinks=False) and not e.name.startswith("."))
    return total
