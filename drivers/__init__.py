"""Storage backends. `driver_for(storage)` picks the class from an explicit registry."""

from __future__ import annotations

from drivers.base import Driver
from drivers.btrfs import BtrfsDriver
from drivers.dir import DirDriver
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


def driver_for(storage: StorageConfig) -> Driver:
    return DRIVERS[storage.type](storage)
