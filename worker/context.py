"""What a step function gets: its job, the config, drivers, locks, progress, cancellation."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import structlog
from celery import Task
from kombu.exceptions import OperationalError

from drivers import driver_for
from drivers.backends.base import Driver
from drivers.config import Config
from drivers.errors import JobCancelled, Refused
from drivers.guests import GuestStore
from drivers.names import VolName, volume_id
from worker import connect, events, locks, records
from worker.records import JobRecord

if TYPE_CHECKING:
    from worker.jobs.kinds import JobKind

PROGRESS_INTERVAL = 0.5  # seconds between progress events
log = structlog.get_logger("stork.context")


@dataclass
class StepContext:
    job: JobRecord
    cfg: Config
    r: redis.Redis
    node: str  # the node this step runs on
    step: str
    worker: str  # host:pid of the process running the step
    kinds: Mapping[str, JobKind]  # the catalogue, from the runner: a step reads another job's kind here
    attempt: int = 1
    task: Task | None = None
    _leases: dict[str, locks.Lease] = field(default_factory=dict, repr=False)
    _last_progress: float = field(default=0.0, repr=False)
    _progress_start: tuple[float, int] = field(default=(0.0, 0), repr=False)

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def data(self) -> dict[str, Any]:
        """What the steps made so far (saved in the job record, read by undo)."""
        return self.job.ctx

    @property
    def guests(self) -> GuestStore:
        return GuestStore(self.cfg.guests_dir, self.cfg.lock_timeout)

    def save(self, then: Callable[[redis.Redis], object] | None = None) -> None:
        """Persist `data` now: call it before creating anything, so undo can find it; `then`, a
        write made with it (a claim on the name about to be made). Held by Redis's replicas
        before it returns, where they are configured (NotReplicated where not in time): a
        failover that took it back would leave the step's next effect (a disk renamed into a
        base) unknown to the job, its undo and its retry. StateConflict (the step stops) if
        the job was taken from this step meanwhile."""
        def write(client: redis.Redis) -> None:
            if self.job.state == records.JobState.UNDOING:  # an undo: while it is still this process's
                records.transition(client, self.job.id, (records.JobState.UNDOING,), guard={"owner": self.worker},
                                   ctx=self.job.ctx)
            else:
                records.transition(client, self.job.id, (records.JobState.RUNNING,),
                                   guard={"owner": self.worker, "done": self.job.done}, ctx=self.job.ctx)
            if then is not None:
                then(client)

        connect.require_replicated(self.r, self.cfg.redis.wait_replicas, write,
                                   f"what step {self.step} of job {self.job.id} saved")

    def set_result(self, **values: Any) -> None:
        """Add to the job's result (stored when the step ends)."""
        self.job.result.update(values)

    def driver(self, storage_id: str) -> Driver:
        storage = self.cfg.storage(storage_id)
        if not storage.on_node(self.node):
            raise Refused(f"storage {storage_id!r} does not exist on node {self.node!r}")
        structlog.contextvars.bind_contextvars(storage=storage_id)
        return driver_for(storage)

    def volname(self, volid: str) -> VolName:
        """Parse a volume id without touching the storage (fine from any node)."""
        vid = volume_id(volid)
        return driver_for(self.cfg.storage(vid.storage)).parse_volname(vid.volname)

    def volume(self, volid: str) -> tuple[Driver, VolName]:
        vid = volume_id(volid)
        drv = self.driver(vid.storage)
        return drv, drv.parse_volname(vid.volname)

    @contextlib.contextmanager
    def storage_lock(self, drv: Driver) -> Iterator[None]:
        with locks.storage_lock(self.cfg, self.r, drv.storage) as lease:
            self._leases[drv.storage.id] = lease
            try:
                yield
            finally:
                del self._leases[drv.storage.id]

    def fence(self, drv: Driver) -> None:
        """Call right before an effect on the storage, under its lock: LeaseLost (the step
        stops) if a shared storage's lease is no longer this step's."""
        self._leases[drv.storage.id].check()

    @contextlib.contextmanager
    def storage_locks(self, drivers: list[Driver]) -> Iterator[None]:
        """The locks of several storages, taken in name order (so two jobs cannot deadlock)."""
        unique = {d.storage.id: d for d in drivers}
        with contextlib.ExitStack() as stack:
            for sid in sorted(unique):
                stack.enter_context(self.storage_lock(unique[sid]))
            yield

    def check_cancel(self) -> None:
        if records.cancel_requested(self.r, self.job.id):
            raise JobCancelled(f"job {self.job.id} cancelled")

    def progress(self, done: int, total: int, message: str = "", data: tuple[int, int] | None = None) -> None:
        """Report bytes done (throttled) and stop the step if the job was cancelled. `data`:
        (bytes of data done, of data in all), where a copy knows them: the rate is then of data
        moved, not of holes skipped."""
        now = time.monotonic()
        moved = data[0] if data else done
        if not self._progress_start[0]:
            self._progress_start = (now, moved)
        if now - self._last_progress < PROGRESS_INTERVAL and done < total:
            return
        self._last_progress = now
        self.check_cancel()
        t0, d0 = self._progress_start
        rate = (moved - d0) / (now - t0) if now > t0 else 0.0
        fields = {"done": done, "total": total, "rate": int(rate), "message": message,
                  **({"data_done": data[0], "data_total": data[1]} if data else {})}
        events.emit(self.r, self.job.id, self.job.kind, "progress", step=self.step, node=self.node, **fields)
        if self.task is not None:
            try:
                self.task.send_event("task-progress", job=self.job.id, step=self.step, **fields)
            except (OperationalError, OSError, redis.RedisError) as e:  # Flower's view, best effort: the
                log.warning("progress_event_lost", error=str(e))  # job's own events went out above
