"""Storage locks: short, only around naming, allocation, rename and free (never around a
data copy). Each yields a `Lease` whose `check()` a step calls right before every effect it
makes on the storage.

Node-local storage: an flock on `<locks>/storage-<id>.lock`, taken in the process that runs
the step and released by the kernel if that process dies; the kernel keeps it, so its check
has nothing to do. Shared storage: a Redis lease (redis-py's `Lock` on `stork:lock:storage:<id>`)
that a thread renews every LEASE/3 seconds while it is held, so nodes sharing the storage
exclude each other and the lease expires within LEASE seconds of its holder's death. Each
grant takes a fencing token from an INCR counter (`stork:lock:<name>:fence`, which holds the
latest token granted): `check()` raises LeaseLost unless this holder still owns the lease
and no later token was granted, so a holder that stalled past its lease (a long GC pause, a
frozen VM, Redis away) stops instead of acting beside the next holder.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import redis
import structlog
from redis.exceptions import LockError

from drivers import driver_for
from drivers.config import Config, StorageConfig
from drivers.errors import LockTimeout, StorkError
from drivers.flock import POLL, dir_lock, file_lock

LEASE = 60.0  # seconds a shared-storage lease lasts unless renewed
log = structlog.get_logger("stork.locks")


class LeaseLost(StorkError):
    """The lease on a shared storage expired or was granted to another holder while held."""


class Lease:
    """A held storage lock."""

    def check(self) -> None:
        """Raise LeaseLost if the lock is no longer this holder's (never, for an flock)."""


class RedisLease(Lease):
    def __init__(self, r: redis.Redis, name: str, timeout: float, what: str) -> None:
        self.r, self.what, self.fence_key = r, what, f"stork:lock:{name}:fence"
        self.lock = r.lock(f"stork:lock:{name}", timeout=LEASE, sleep=POLL * 2, blocking_timeout=timeout,
                           thread_local=False)
        if not self.lock.acquire():
            raise LockTimeout(f"{what}: lock not free after {timeout:g}s")
        try:
            self.token = int(r.incr(self.fence_key))
        except BaseException:  # not held without a token (nor left to block the storage for a lease's time)
            with contextlib.suppress(LockError, redis.RedisError):
                self.lock.release()
            raise
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="stork-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE / 3):
            try:
                self.lock.reacquire()
            except LockError as e:  # not ours any more: check() says so at the next effect
                log.warning("lease_lost", lock=self.what, error=str(e))
                return
            except redis.RedisError as e:  # Redis away: try again, the lease may outlive it
                log.warning("lease_renewal_failed", lock=self.what, error=str(e))

    def check(self) -> None:
        with self.r.pipeline(transaction=True) as p:
            p.get(self.lock.name)
            p.get(self.fence_key)
            owner, fence = p.execute()
        token = self.lock.local.token
        if owner != (token.decode() if isinstance(token, bytes) else token) or fence != str(self.token):
            raise LeaseLost(f"{self.what}: the lease was lost (expired or granted to another holder, token "
                            f"{fence} after ours {self.token}): stopped before acting")

    def release(self) -> None:
        self._stop.set()
        try:
            self.lock.release()
        except LockError:
            raise LeaseLost(f"{self.what}: the lease was lost before it was released") from None


@contextlib.contextmanager
def storage_lock(cfg: Config, r: redis.Redis, storage: StorageConfig) -> Iterator[Lease]:
    what = f"storage {storage.id!r}"
    if not storage.shared:
        with file_lock(cfg.locks_dir / f"storage-{storage.id}.lock", cfg.lock_timeout, what), \
                foreign_locks(cfg, storage, what):
            yield Lease()
        return
    lease = RedisLease(r, f"storage:{storage.id}", cfg.lock_timeout, what)
    try:
        with foreign_locks(cfg, storage, what):
            yield lease
    except BaseException:
        with contextlib.suppress(LeaseLost, redis.RedisError):
            lease.release()  # the step's own error is the one to report (the lease expires by itself)
        raise
    lease.release()


@contextlib.contextmanager
def foreign_locks(cfg: Config, storage: StorageConfig, what: str) -> Iterator[None]:
    """The locks another manager of the same volumes takes (Proxmox VE's), after ours: it never
    takes ours, so no cycle."""
    with contextlib.ExitStack() as held:
        for theirs in driver_for(storage).foreign_locks() if "images" in storage.content else ():
            lock = file_lock if theirs.kind == "flock" else dir_lock
            held.enter_context(lock(theirs.path, cfg.lock_timeout, f"{what} (lock {theirs.path})"))
        yield
