"""Storage locks: short, only around naming, allocation, rename and free (never around a
data copy).

Node-local storage: an flock on `<locks>/storage-<id>.lock`, taken in the process that runs
the step and released by the kernel if that process dies. Shared storage: a Redis lease
(`stork:lock:storage:<id>`, SET NX PX) holding a fencing token from an INCR counter, so
that nodes sharing the storage exclude each other; the lease expires if its holder dies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import redis

from drivers.config import Config, StorageConfig
from drivers.errors import LockTimeout
from drivers.flock import POLL, file_lock

LEASE_MS = 60_000

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@contextlib.contextmanager
def lease(r: redis.Redis, name: str, timeout: float, what: str) -> Iterator[int]:
    key = f"stork:lock:{name}"
    token = int(r.incr(f"{key}:fence"))
    deadline = time.monotonic() + timeout
    while not r.set(key, token, nx=True, px=LEASE_MS):
        if time.monotonic() > deadline:
            raise LockTimeout(f"{what}: lock not free after {timeout:g}s")
        time.sleep(POLL)
    try:
        yield token
    finally:
        r.eval(_RELEASE, 1, key, token)


@contextlib.contextmanager
def storage_lock(cfg: Config, r: redis.Redis, storage: StorageConfig) -> Iterator[None]:
    what = f"storage {storage.id!r}"
    if storage.shared:
        with lease(r, f"storage:{storage.id}", cfg.lock_timeout, what):
            yield
    else:
        with file_lock(cfg.locks_dir / f"storage-{storage.id}.lock", cfg.lock_timeout, what):
            yield
