"""What stork knows of storage; pure Python and each backend's tools, no Celery, no Redis.

Three things: the cluster model and the I/O helpers every wing uses (this folder's modules),
`backends/` (one module per storage type behind the `Driver` interface) and `backup/` (the
chunk store and the data path into it). Nothing here imports `worker` or `producer`, and
`backends/` and `backup/` meet only through the `Driver` interface.

The registry: `driver_for(storage)` picks an image storage's driver, `backup_storage(storage)`
a backup storage's; `STORAGE_TYPES` is every type the config knows, each with its OPTIONS,
CONTENT, always_shared and place()."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from drivers.errors import Refused

TYPE_CHECKING = False  # as typing's, whose import is a twentieth of `stork --help`; type checkers take it as true
if TYPE_CHECKING:
    from typing import Any

    from drivers.backends.base import Driver
    from drivers.backup.storage import ChunkStoreStorage
    from drivers.storage import StorageConfig


class _Backends(Mapping[str, type]):
    """Storage type -> its class, each backend's module imported when its type is first looked
    up: a command imports only the backends of the storages it touches (`stork --help` none,
    `job list` those its config names), nor what they alone need (cryptography, for an
    encrypted chunk store). `in` and the type names import nothing."""

    def __init__(self, table: dict[str, tuple[str, str]]) -> None:
        self._table = table

    def __getitem__(self, type_name: str) -> type:
        module, name = self._table[type_name]
        return getattr(importlib.import_module(module), name)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


_IMAGES = {"dir": ("drivers.backends.dir", "DirDriver"), "btrfs": ("drivers.backends.btrfs", "BtrfsDriver"),
           "zfs": ("drivers.backends.zfs", "ZfsDriver"), "rbd": ("drivers.backends.rbd", "RbdDriver"),
           "lvm": ("drivers.backends.lvm", "LvmDriver"), "lvmthin": ("drivers.backends.lvmthin", "LvmThinDriver")}
_BACKUPS = {"chunkstore": ("drivers.backup.storage", "ChunkStoreStorage")}
DRIVERS: Mapping[str, type[Driver]] = _Backends(_IMAGES)
BACKUP_STORAGES: Mapping[str, type[ChunkStoreStorage]] = _Backends(_BACKUPS)
STORAGE_TYPES: Mapping[str, Any] = _Backends({**_IMAGES, **_BACKUPS})


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
