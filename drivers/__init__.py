"""What stork knows of storage; pure Python and each backend's tools, no Celery, no Redis.

Three things: the cluster model and the I/O helpers every wing uses (this folder's modules),
`backends/` (one module per storage type behind the `Driver` interface) and `backup/` (the
chunk store and the data path into it). Nothing here imports `worker` or `producer`, and
`backends/` and `backup/` meet only through the `Driver` interface.

The registry: `driver_for(storage)` picks an image storage's driver, `backup_storage(storage)`
a backup storage's; `STORAGE_TYPES` is every type the config knows, each with its OPTIONS,
CONTENT, always_shared and place()."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from drivers.errors import Refused

if TYPE_CHECKING:
    from drivers.backends.base import Driver
    from drivers.backup.storage import ChunkStoreStorage
    from drivers.storage import StorageConfig


@functools.cache
def _registry() -> dict[str, dict[str, Any]]:
    """The backends, imported on first use: a command that touches no storage (`stork --help`)
    loads none of them, nor what they need (cryptography, for the chunk store)."""
    from drivers.backends.btrfs import BtrfsDriver
    from drivers.backends.dir import DirDriver
    from drivers.backends.lvm import LvmDriver
    from drivers.backends.lvmthin import LvmThinDriver
    from drivers.backends.rbd import RbdDriver
    from drivers.backends.zfs import ZfsDriver
    from drivers.backup.storage import ChunkStoreStorage

    drivers = {"dir": DirDriver, "btrfs": BtrfsDriver, "zfs": ZfsDriver, "rbd": RbdDriver, "lvm": LvmDriver,
               "lvmthin": LvmThinDriver}
    backups = {"chunkstore": ChunkStoreStorage}
    return {"DRIVERS": drivers, "BACKUP_STORAGES": backups, "STORAGE_TYPES": {**drivers, **backups}}


def __getattr__(name: str) -> Any:
    """DRIVERS (type -> Driver class), BACKUP_STORAGES (type -> ChunkStoreStorage) and
    STORAGE_TYPES (both), built on first use (`_registry`)."""
    if name in ("DRIVERS", "BACKUP_STORAGES", "STORAGE_TYPES"):
        return _registry()[name]
    raise AttributeError(f"module 'drivers' has no attribute {name!r}")


def driver_for(storage: StorageConfig) -> Driver:
    drivers = _registry()["DRIVERS"]
    if storage.type not in drivers:
        raise Refused(f"storage {storage.id!r} holds backups, not disk images")
    return drivers[storage.type](storage)  # type: ignore[no-any-return]


def backup_storage(storage: StorageConfig) -> ChunkStoreStorage:
    backups = _registry()["BACKUP_STORAGES"]
    if storage.type not in backups:
        raise Refused(f"storage {storage.id!r} holds disk images, not backups (a backup storage is "
                      "type = \"chunkstore\")")
    return backups[storage.type](storage)  # type: ignore[no-any-return]


def status_of(storage: StorageConfig) -> tuple[int, int, int]:
    """(total, used, available) bytes of any storage."""
    if storage.type in _registry()["BACKUP_STORAGES"]:
        return backup_storage(storage).status()
    return driver_for(storage).status()
