"""The backup storage type: `type = "chunkstore"` in the config, a directory holding a chunk
store (drivers/backup/store.py). It sits in the same registry as the image drivers, so the
config checks its options, sharing and overlaps the same way, but it holds backups only: an
image job is refused on it, and a backup job on an image storage (drivers/__init__.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from drivers.backup.crypt import EncryptedCodec, load_key
from drivers.backup.store import ChunkStore
from drivers.storage import PATH, Option, StorageConfig, is_path_text


class ChunkStoreStorage:
    type_name: ClassVar[str] = "chunkstore"
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "path": PATH,
        # chunks encrypted and manifests authenticated with this key (drivers/backup/crypt.py)
        "keyfile": Option(is_path_text, "the path of a key file (stork backup key create FILE)", is_path=True),
    }
    CONTENT: ClassVar[frozenset[str]] = frozenset({"backup"})
    always_shared: ClassVar[bool] = False

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        return None  # a directory: overlaps are checked by path

    def __init__(self, storage: StorageConfig) -> None:
        self.storage = storage

    def open(self) -> ChunkStore:
        """The store, its directory made where missing (as a dir storage makes its own), with
        its key where it has one; refused if the key or the chunk size is not the store's."""
        assert self.storage.path is not None
        self.storage.path.mkdir(parents=True, exist_ok=True)
        keyfile = self.storage.options.get("keyfile")
        store = ChunkStore(self.storage.path, codec=EncryptedCodec(load_key(keyfile)) if keyfile else None)
        store.check_key()
        store.check_chunk_size()
        return store

    def status(self) -> tuple[int, int, int]:
        return self.open().status()
