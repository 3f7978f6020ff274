"""Storage backends. `driver_for(storage)` picks an image storage's driver from an explicit
registry; `backup_storage(storage)` a backup storage's; `STORAGE_TYPES` is every type the
config knows, each with its OPTIONS, CONTENT, always_shared and place()."""

from __future__ import annotations

from drivers.backupstorage import ChunkStoreStorage
from drivers.base import Driver
from drivers.btrfs import BtrfsDriver
from drivers.dir import DirDriver
from drivers.errors import Refused
from drivers.lvm import LvmDriver
from drivers.lvmthin import LvmThinDriver
from drivers.rbd import RbdDriver
from drivers.storage import StorageConfig
from drivers.zfs import ZfsDriver

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
