"""A storage's configuration: the keys every storage has (type, content, shared, nodes) and the
options its driver declares for itself (`Driver.OPTIONS`: `path` for dir and btrfs, `pool`
for zfs, ...), each with its check, what it expects, whether it is required
and its default, as Proxmox's storage plugins declare their properties and options.

Options that several drivers take are defined once here, so a key means the same thing on
every storage type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    """One key a driver takes in its [storage.<id>] table."""

    check: Callable[[Any], bool]
    expected: str  # what the check wants, for the error naming the file and the key
    required: bool = False
    default: Any = None
    is_path: bool = False  # a relative path is relative to the config file


def is_path_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and "\x00" not in v  # no file name holds a NUL byte


# A ZFS pool or dataset, given to `zfs` as one argument: components of letters, digits and
# _ . : - (what ZFS allows), starting with a letter or digit (never a dash: not an option).
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}(/[A-Za-z0-9][A-Za-z0-9_.:-]{0,127})*")


def _dataset(v: Any) -> bool:
    return isinstance(v, str) and _DATASET.fullmatch(v) is not None and ".." not in v and len(v) <= 200


PATH = Option(is_path_text, "a directory path", required=True, is_path=True)
# as Proxmox VE's dir storage: make the directory when it is missing; refuse a directory that
# should be a mounted file system and is not (nothing is written onto the disk under the mount)
MKDIR = Option(lambda v: isinstance(v, bool), "true or false", default=True)
IS_MOUNTPOINT = Option(lambda v: isinstance(v, bool), "true or false", default=False)
POOL = Option(_dataset, "a pool or dataset name (letters, digits, _ . : -, parts joined by /)", required=True)


@dataclass(frozen=True)
class StorageConfig:
    id: str
    type: str
    content: tuple[str, ...] = ("images",)
    shared: bool = False
    nodes: tuple[str, ...] = ()  # empty: the storage exists on every node
    options: Mapping[str, Any] = field(default_factory=dict)  # the driver's own keys, checked, defaults filled

    def on_node(self, node: str) -> bool:
        return self.shared or not self.nodes or node in self.nodes

    @property
    def path(self) -> Path | None:
        """The directory of a storage of files (dir, btrfs); None for one without."""
        value = self.options.get("path")
        return Path(value) if value is not None else None
