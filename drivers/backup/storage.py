"""The backup storage type: `type = "chunkstore"` in the config, a directory holding a chunk
store (drivers/backup/store.py). It sits in the same registry as the image drivers, so the
config checks its options, sharing and overlaps the same way, but it holds backups only: an
image job is refused on it, and a backup job on an image storage (drivers/__init__.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from drivers.backup.store import ChunkStore
from drivers.errors import Refused
from drivers.storage import PATH, Option, StorageConfig, is_path_text


def _mountpoint(v: Any) -> bool:
    return isinstance(v, bool) or (is_path_text(v) and Path(v).is_absolute())


class ChunkStoreStorage:
    type_name: ClassVar[str] = "chunkstore"
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "path": PATH,
        # chunks encrypted and manifests authenticated with this key (drivers/backup/crypt.py)
        "keyfile": Option(is_path_text, "the path of a key file (stork backup key create FILE)", is_path=True),
        # as Proxmox VE's dir storages: a store on a NAS is never written to the disk beneath an
        # unmounted mount point
        "is_mountpoint": Option(_mountpoint, "true (the path is a mount point), or the absolute path of the mount "
                                "point holding it", default=False),
    }
    CONTENT: ClassVar[frozenset[str]] = frozenset({"backup"})
    always_shared: ClassVar[bool] = False

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return None  # a directory: overlaps are checked by path

    def __init__(self, storage: StorageConfig) -> None:
        self.storage = storage

    def open(self) -> ChunkStore:
        """The store, to read: nothing is made or recorded (a store that is not there yet holds
        no backups). Refused if its mount is missing, or its key or chunk size is not the one
        the store recorded."""
        store = self._store()
        store.check_key(record=False)
        store.check_chunk_size(record=False)
        return store

    def open_for_backup(self) -> ChunkStore:
        """The store, to write a backup into: its directory made where missing (as a dir storage
        makes its own) and its key's fingerprint and chunk size recorded at the first backup."""
        store = self._store()
        store.root.mkdir(parents=True, exist_ok=True)
        store.check_key()
        store.check_chunk_size()
        return store

    def _store(self) -> ChunkStore:
        assert self.storage.path is not None
        self._check_mounted(self.storage.path)
        keyfile = self.storage.options.get("keyfile")
        if not keyfile:
            return ChunkStore(self.storage.path)
        from drivers.backup.crypt import EncryptedCodec, load_key  # cryptography: for an encrypted store only

        return ChunkStore(self.storage.path, codec=EncryptedCodec(load_key(keyfile)))

    def _check_mounted(self, path: Path) -> None:
        wanted = self.storage.options.get("is_mountpoint")
        if not wanted:
            return
        mountpoint = path if wanted is True else Path(wanted)
        if mountpoint != path and mountpoint not in path.parents:
            raise Refused(f"backup storage {self.storage.id!r}: is_mountpoint {mountpoint} does not hold its "
                          f"path {path}")
        if not os.path.ismount(mountpoint):
            raise Refused(f"backup storage {self.storage.id!r}: {mountpoint} is not mounted (is_mountpoint): "
                          "nothing is read or written there until it is")

    def status(self) -> tuple[int, int, int]:
        return self.open().status()
