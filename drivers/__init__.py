"""What stork knows of storage; pure Python and each backend's tools, no Celery, no Redis.

Three things: the cluster model and the I/O helpers every wing uses (this folder's modules),
`backends/` (one module per storage type behind the `Driver` interface) and `backup/` (the
chunk store and the data path into it). Nothing here imports `worker` or `producer`, and
`backends/` and `backup/` meet only through the `Driver` interface.

The registry: `driver_for(storage)` picks an image storage's driver, `backup_storage(storage)`
a backup storage's; `STORAGE_TYPES` is every type the config knows, each with its OPTIONS,
CONTENT, always_shared and place()."""

from __future__ import annotations

from drivers.backends.base import Driver
from drivers.backends.btrfs import BtrfsDriver
from drivers.backends.dir import DirDriver
from drivers.backends.lvm import LvmDriver
from drivers.backends.lvmthin import LvmThinDriver
from drivers.backends.rbd import RbdDriver
from drivers.backends.zfs import ZfsDriver
from drivers.backup.storage import ChunkStoreStorage
from drivers.errors import Refused
from drivers.storage import StorageConfig

DRIVERS: dict[str, type[Driver]] = {
    "dir": DirDriver,
    "btrfs": BtrfsDriver,
    "zfs": ZfsDriver,
    "rbd": RbdDriver,
    "lvm": LvmDriver,
    "lvmthin": LvmThinDriver,
}
BACKUP_STORAGES: dict[str, type[ChunkStoreStorage]] = {"chunkstore": ChunkStoreStorage}
STORAGE_TYPES: dict[str, type[Driver] | type[ChunkStoreStorage]] = {**DRIVERS, **BACKUP_STORAGES}


def driver_for(storage: StorageConfig) -> Driver:
    if storage.type not in DRIVERS:
        raise Refused(f"storage {storage.id!r} holds backups, not disk images")
    return DRIVERS[storage.type](storage)


def backup_storage(storage: StorageConfig) -> ChunkStoreStorage:
    if storage.type not in BACKUP_STORAGES:
        raise Refused(f"storage {storage.id!r} holds disk images, not backups (a backup storage is "
                      "type = \"chunkstore\")")
    return BACKUP_STORAGES[storage.type](storage)


def status_of(storage: StorageConfig) -> tuple[int, int, int]:
    """(total, used, available) bytes of any storage."""
    if storage.type in BACKUP_STORAGES:
        return backup_storage(storage).status()
    return driver_for(storage).status()
