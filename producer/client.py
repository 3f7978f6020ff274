"""The Python client: submit jobs, wait for them, read storages, volumes and guests.

    from producer.client import Client
    stork = Client()                              # config from STORK_CONFIG
    job = stork.run("linked_clone", vmid=100, newid=101)
    assert job.state == "succeeded", job.error

Volumes and guests are read directly (configs and storage are visible from this node);
every change goes through a job.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis

from drivers import BACKUP_STORAGES, backup_storage, driver_for, names, status_of
from drivers import config as config_module
from drivers.config import Config, StorageConfig
from drivers.errors import NotFound, Refused, StorkError
from drivers.guests import Guest, GuestStore
from worker import connect, events, records
from worker.records import JobRecord, JobState

if TYPE_CHECKING:
    from celery import Celery

    from drivers.backends.base import Driver, VolumeInfo
    from drivers.backup.records import Damaged, Snapshot
    from drivers.backup.serve import Export

# What sends jobs (Celery's app, the job kinds, the runner), and what reads volumes and backups,
# is imported where it is used: a client that only reads jobs (`stork job list`) starts without it.

EventHook = Callable[[dict[str, Any]], None]


def job_guests(job: JobRecord) -> list[int]:
    """The guests a job acts on, from its params (source first)."""
    return records.guests_of(job.params)


class JobTimeout(StorkError):
    """A wait ran out of time; the job goes on."""


class Client:
    def __init__(self, cfg: Config | None = None, r: redis.Redis | None = None) -> None:
        self.cfg = cfg or config_module.load()
        self.role = connect.role("producer")
        self.r = r or connect.client(self.cfg.redis, self.role)
        self.guest_store = GuestStore(self.cfg.guests_dir, self.cfg.lock_timeout)

    @cached_property
    def app(self) -> Celery:
        """Celery's app on the Redis of this config: steps go where the record goes."""
        from worker.app import make_app

        return make_app(self.cfg, self.role)

    # ---- jobs ----------------------------------------------------------------------
    @staticmethod
    def kinds() -> dict[str, str]:
        from worker.jobs.kinds import KINDS

        return {name: kind.summary for name, kind in KINDS.items()}

    def submit(self, kind: str, **options: Any) -> JobRecord:
        """Check and enqueue a job; StorkError (nothing changed) when it is refused."""
        from worker import runner

        try:
            return runner.submit(kind, options, self.cfg, self.r, self.app)
        except redis.exceptions.NoPermissionError as e:
            raise StorkError(f"Redis refused it to the {self.role} role's user: {e}") from None
        except connect.NotReplicated as e:  # Redis answered: its replicas did not
            raise StorkError(str(e)) from None
        except redis.RedisError as e:
            raise StorkError(f"cannot reach {connect.trouble(self.cfg.redis, e)}") from None

    def job(self, job_id: str) -> JobRecord:
        return records.load(self.r, records.resolve(self.r, job_id))

    def jobs(self, limit: int = 50, state: str | None = None, kind: str | None = None, vmid: int | None = None,
             since: float | None = None) -> list[JobRecord]:
        """The most recent jobs, newest first (finished ones are kept for 30 days), filtered by
        state, kind, a guest they act on, and creation time. Read from the narrowest index the
        filters name (a guest's, a kind's, a state's), so the cost follows the jobs shown, not
        the jobs on record."""
        index = records.guest_index(vmid) if vmid else records.kind_index(kind) if kind else \
            records.state_index(state) if state else records.JOBS
        found: list[JobRecord] = []
        for job in records.newest(self.r, index, since, page=max(limit, 50)):
            if (state and str(job.state) != state) or (kind and job.kind != kind) or \
                    (vmid and vmid not in job_guests(job)):
                continue
            found.append(job)
            if len(found) >= limit:
                break
        return found

    def step_times(self, job_id: str) -> dict[str, dict[str, float]]:
        """When each step (and undo) of a job started and ended, from its event history."""
        times: dict[str, dict[str, float]] = {}
        for _, values in self.r.xrange(records.events_key(records.resolve(self.r, job_id))):
            event = json.loads(values["event"])
            if event.get("phase") in ("start", "done", "undo") and event.get("step"):
                name = event["step"] if event["phase"] != "undo" else f"undo {event['step']}"
                times.setdefault(name, {})["end" if event["phase"] == "done" else "start"] = event["time"]
        return times

    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """Messages the workers could not turn into a task, newest first: dicts with raw, size,
        reason, queue, node and time (worker/deadletter.py)."""
        from worker import deadletter

        return deadletter.read(self.r, limit)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: its undo runs, and it ends `cancelled`. Refused once it has ended."""
        from worker import runner

        return runner.cancel(self.r, records.resolve(self.r, job_id), self.app)

    def abandon(self, job_id: str, node: str) -> JobRecord:
        """Give up `node` (gone for good) for an undoing job: its undos there are not run, each
        named in its error; the others run, and the job ends as its undo would have. For a running
        job past its commit whose steps left all wait there: not run, the job ends succeeded,
        its result's `not_run` naming them; where those steps run on any node (a message fused
        with the node's step before them waits there), they are sent again and the job goes on."""
        from worker import runner

        return runner.abandon(self.r, records.resolve(self.r, job_id), names.node(node), self.app)

    def events(self, job_id: str, idle: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Every event of the job from its start, then live ones, until it finishes."""
        job_id = records.resolve(self.r, job_id)
        for event in events.follow(self.r, job_id, block_ms=500):
            if event is not None:
                yield event
                continue
            if idle:
                idle()
            if records.load(self.r, job_id).state.terminal:  # the stream was trimmed or lost
                return

    def wait(self, job_id: str, on_event: EventHook | None = None, timeout: float | None = None) -> JobRecord:
        """Wait until the job ends; JobTimeout after `timeout` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def check_deadline() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id} still running after {timeout:g}s")

        for event in self.events(job_id, idle=check_deadline):
            if on_event:
                on_event(event)
            check_deadline()
        return self.job(job_id)

    def ping(self, nodes: list[str] | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Ask each node's worker (default: every node the config names) to answer a ping job,
        all at once. Per node: node, ok, seconds, job, error; where none answered within
        `timeout`, the queue nobody serves, and the job is withdrawn with its message, so a
        worker that starts later finds nothing left behind."""
        from worker import runner

        jobs: dict[str, JobRecord] = {}
        try:
            for node in dict.fromkeys(nodes or self.cfg.known_nodes()):
                jobs[node] = self.submit("ping", node=node)
        except BaseException:  # a refused node: the pings sent already are taken back
            for job in jobs.values():
                with contextlib.suppress(StorkError):
                    runner.withdraw(self.r, job.id)
            raise
        deadline = time.monotonic() + timeout
        answers = []
        for node, job in jobs.items():
            with contextlib.suppress(JobTimeout):
                self.wait(job.id, timeout=max(0.0, deadline - time.monotonic()))
            answers.append(self._answer(node, self.job(job.id), timeout))
        return answers

    def _answer(self, node: str, job: JobRecord, timeout: float) -> dict[str, Any]:
        from worker import runner

        answer = {"node": node, "job": job.id, "ok": job.state == JobState.SUCCEEDED, "queue": None, "error": ""}
        if job.state.terminal:
            return {**answer, "seconds": round(job.finished - job.created, 3), "error": job.error}
        try:
            runner.withdraw(self.r, job.id)
        except StorkError:  # a worker took the step a moment ago, or it ended meanwhile
            late = self.job(job.id)
            if late.state.terminal:
                return self._answer(node, late, timeout)
            step = (late.current or {}).get("name", "?")
            return {**answer, "seconds": None, "error": f"no answer in {timeout:g} s (step {step} in progress)"}
        queue = job.queues[job.done]
        return {**answer, "seconds": None, "queue": queue,
                "error": f"no worker serves queue {queue} (no answer in {timeout:g} s)"}

    def run(self, kind: str, on_event: EventHook | None = None, timeout: float | None = None,
            **options: Any) -> JobRecord:
        return self.wait(self.submit(kind, **options).id, on_event, timeout)

    # ---- reads ---------------------------------------------------------------------
    def storages(self) -> list[StorageConfig]:
        return sorted(self.cfg.storages.values(), key=lambda s: s.id)

    def _storage_here(self, storage_id: str) -> StorageConfig:
        storage = self.cfg.storage(storage_id)
        if not storage.on_node(self.cfg.node):
            raise Refused(f"storage {storage_id!r} is local to node(s) {', '.join(storage.nodes)}: "
                          f"it cannot be read from node {self.cfg.node!r}")
        return storage

    def storage_status(self) -> list[dict[str, Any]]:
        """Per storage, as `pvesm status`: type, shared, active, total, used, available bytes. A
        storage this node cannot read is listed inactive, with the reason."""
        rows = []
        for s in self.storages():
            row: dict[str, Any] = {"id": s.id, "type": s.type, "shared": s.shared, "active": False,
                                   "total": None, "used": None, "available": None, "error": ""}
            if not s.on_node(self.cfg.node):
                row["error"] = f"not on node {self.cfg.node} (nodes: {', '.join(s.nodes)})"
            else:
                try:
                    row["total"], row["used"], row["available"] = status_of(s)
                    row["active"] = True
                except (StorkError, OSError) as e:
                    row["error"] = str(e) if isinstance(e, StorkError) else f"{e.filename or s.id}: {e.strerror}"
            rows.append(row)
        return rows

    def volumes(self, storage_id: str | None = None) -> list[VolumeInfo]:
        """Volumes with the guests that use each (`<vmid>:<disk>`, or `<vmid>:unused`), and
        those that no guest, no unfinished job and no job on record names flagged as orphans;
        entries only named like volumes (a directory, a symlink) with their `problem`."""
        from drivers.backends.base import VolumeInfo

        ids = [storage_id] if storage_id else [s.id for s in self.storages()
                                                if s.on_node(self.cfg.node) and "images" in s.content]
        users, owned = self._users(), self._owned_by_jobs()
        found = []
        for sid in ids:
            drv = driver_for(self._storage_here(sid))
            infos = [drv.info(v) for v in drv.list_volumes()]
            theirs = self._foreign_users(drv)
            found += [replace(info, users=(*users.get(info.volid, ()), *theirs(info.volid)),
                              orphan=info.volid not in users and info.volid not in owned and not theirs(info.volid))
                      for info in infos]
            found += [VolumeInfo(drv.volid(v), v.fmt, 0, 0, v.is_base, users=tuple(users.get(drv.volid(v), ())),
                                 problem=problem) for v, problem in drv.strays()]
            found += [VolumeInfo(f"{sid}:{name}/", "-", 0, 0, name == "base", problem=problem)
                      for name, problem in drv.stray_folders()]  # a guest folder that is a symlink, say
        return sorted(found, key=lambda v: v.volid)

    @staticmethod
    def _foreign_users(drv: Driver) -> Callable[[str], tuple[str, ...]]:
        """Who outside stork uses each volume (Proxmox VE's guests, on a storage of its layout),
        by volume id; where that cannot be read, every volume says so (none is an orphan)."""
        try:
            by_name = drv.foreign_users_by_volume()
        except StorkError as e:
            unknown = (f"? ({e})",)
            return lambda volid: unknown
        return lambda volid: tuple(by_name.get(volid.split(":", 1)[1], ()))

    def _owned_by_jobs(self) -> set[str]:
        """Volume ids that unfinished jobs use, or that jobs still on record made (a copy's result)."""
        from worker.jobs import usage

        owned: set[str] = set()
        for job in records.load_many(self.r, records.recent_ids(self.r, limit=100_000)):
            if not job.state.terminal:
                owned |= usage.job_volumes(job)
            owned |= {v for v in json.dumps(job.result).split('"') if ":" in v and "/" in v}
        return owned

    def volume(self, volid: str) -> VolumeInfo:
        vid = names.volume_id(volid)
        drv = driver_for(self._storage_here(vid.storage))
        info = drv.info(drv.parse_volname(vid.volname))
        users = [*self._users().get(info.volid, []), *self._foreign_users(drv)(info.volid)]
        guests, _broken = self.guest_store.scan()
        replicas = sorted(f"{v} (node {r['node']})" for g in guests for v, r in g.replicas.items() if r["of"] == volid)
        return replace(info, users=tuple(users), replicas=tuple(replicas),
                       orphan=not users and info.volid not in self._owned_by_jobs())

    def _users(self) -> dict[str, list[str]]:
        guests, _broken = self.guest_store.scan()  # a display: broken configs show in `guest list`
        users: dict[str, list[str]] = {}
        for g in guests:
            named = [*g.disks.items(), *(("unused", v) for v in g.unused), *(("replica", v) for v in g.replicas)]
            for key, volid in named:
                users.setdefault(volid, []).append(f"{g.vmid}:{key}")
        return users

    # ---- backups: read and marked here, written and checked by jobs --------------------------
    def backups(self, storage_id: str | None = None, vmid: int | None = None) -> list[tuple[str, Snapshot | Damaged]]:
        """(backup storage id, snapshot) of every backup on the storages this node reaches, oldest
        first; one that cannot be read is there as Damaged, with the reason. A storage that
        cannot be opened is left out (`backup_listing` says which and why)."""
        return self.backup_listing(storage_id, vmid)[0]

    def backup_listing(self, storage_id: str | None = None, vmid: int | None = None
                       ) -> tuple[list[tuple[str, Snapshot | Damaged]], dict[str, str]]:
        """`backups`, and each backup storage that could not be opened or listed with its error
        (a missing key file, an unmounted NAS): one such never hides the others. A storage named
        is read or refused."""
        from worker.jobs.prepare_backups import backup_storage_id

        ids = [backup_storage_id(self.cfg, storage_id)] if storage_id else [
            s.id for s in self.storages() if s.type in BACKUP_STORAGES and s.on_node(self.cfg.node)]
        found: list[tuple[str, Snapshot | Damaged]] = []
        unreadable: dict[str, str] = {}
        for sid in ids:
            try:
                listing = backup_storage(self._storage_here(sid)).open().listing(vmid)
            except StorkError as e:
                if storage_id:
                    raise
                unreadable[sid] = str(e)
                continue
            found += [(sid, snap) for snap in [*listing.snapshots, *listing.damaged]]
        return sorted(found, key=lambda pair: (pair[1].id.time_text, pair[1].id.vmid)), unreadable

    def backup(self, text: str) -> tuple[str, Snapshot]:
        from worker.jobs.prepare_backups import find_backup

        sid, store, bid = find_backup(self.cfg, text)
        return sid, store.snapshot(bid)

    def serve_backup(self, text: str, disk: str, address: str, port: int) -> Export:
        """One disk of a backup, ready to be served read-only over NBD on address:port."""
        from drivers.backup.datapath import DiskReader
        from drivers.backup.serve import Export, listen
        from worker.jobs.prepare_backups import find_backup

        _, store, bid = find_backup(self.cfg, text)
        disks = store.snapshot(bid).manifest.disks
        if disk not in disks:
            raise NotFound(f"backup {bid} has no disk {disk!r} (it has: {', '.join(disks) or 'none'})")
        reader = DiskReader(store, store.index(bid, disk), f"backup {bid} {disk}")
        return Export(disk, reader, listen(address, port))

    def protect_backup(self, text: str, protected: bool) -> None:
        from worker.jobs.prepare_backups import find_backup

        _, store, bid = find_backup(self.cfg, text)
        store.set_protected(bid, protected)

    def forget_backup(self, text: str, damaged: bool = False) -> str:
        """Remove a backup (refused while protected); its chunks go at the next gc. With
        `damaged`, one that cannot be read, whatever its state says; returns why it could not."""
        from worker.jobs import usage
        from worker.jobs.prepare_backups import find_backup

        sid, store, bid = find_backup(self.cfg, text)
        # a restore reading it: gc would take its chunks too
        return store.forget(bid, damaged=damaged, held=lambda id: usage.backup_readers(self.r, sid, id))

    def schedules(self) -> list[dict[str, Any]]:
        """Each backup schedule with its last run, that run's outcome, and its next slot."""
        from worker.jobs import schedules

        return schedules.status(self.cfg, self.r)

    def guests(self) -> list[Guest]:
        return self.guest_store.list()

    def guest(self, vmid: int | str) -> Guest:
        return self.guest_store.read(names.vmid(vmid))

