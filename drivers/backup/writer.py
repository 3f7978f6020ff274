"""The writer of one snapshot of a chunk store (drivers.backup.store): it fills a hidden partial
folder and publishes it at commit. gc asks here whether a partial's writer is alive, and since when.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from drivers.backup.files import LOCK, MANIFEST_MAC, PARTIAL, discard, now_text, open_lock, still_named
from drivers.backup.records import (
    MANIFEST,
    BackupId,
    DiskSummary,
    FileSum,
    Index,
    Manifest,
    Snapshot,
    State,
    blob_name,
    disk_key,
    format_time,
    index_file,
)
from drivers.errors import AlreadyExists, NotFound, Refused, StorkError
from drivers.safedir import SafeDir

_LIVE_PARTIALS: set[tuple[int, int]] = set()  # (st_dev, st_ino) of partial folders written here: see writer_is_live


class Store(Protocol):
    """What a writer needs of its chunk store (drivers.backup.store.ChunkStore, which makes it)."""

    root: Path
    chunk_size: int

    @property
    def seals_records(self) -> bool: ...
    def open_dir(self, folder: int, name: str) -> int: ...
    def put_chunk(self, data: bytes) -> tuple[str | None, int]: ...
    def touch_chunk(self, digest: str) -> bool: ...
    def put_stored(self, digest: str, blob: bytes) -> int: ...
    def write_file(self, folder: int, name: str, data: bytes) -> None: ...
    def write_state(self, folder: int, id: BackupId, state: State) -> None: ...
    def flush_chunk_folders(self, prefixes: set[str]) -> None: ...
    def manifest_mac(self, manifest: bytes) -> bytes | None: ...
    def fail_for_lost(self, id: str, named: list[str]) -> State | None: ...


class SnapshotWriter:
    """A snapshot being written, made by ChunkStore.begin. Chunks may be put from many threads;
    the rest is called by one. As a context manager it aborts unless committed."""

    def __init__(self, store: Store, id: BackupId, notes: str, vm: int) -> None:
        self.store, self.id, self.notes = store, id, notes
        self._vm = vm
        self._lock = threading.Lock()
        self._chunks: set[str] = set()
        self._prefixes: set[str] = set()
        self._written = 0
        self._files: dict[str, FileSum] = {}
        self._disks: dict[str, DiskSummary] = {}
        self._open = True
        self.started = time.time()
        self.made: str | None = None  # the start its manifest records where not this writer's: a copy's original's
        self._name, self._folder, self._held = self._make_partial()
        self._identity = (os.fstat(self._folder).st_dev, os.fstat(self._folder).st_ino)
        _LIVE_PARTIALS.add(self._identity)

    def _make_partial(self) -> tuple[str, int, int]:
        """Make the partial folder and take its lock, recording our start in the lock file."""
        for _ in range(3):
            name = f"{PARTIAL}{self.id.time_text}-{secrets.token_hex(4)}"
            with self._writing("starting it"):
                os.mkdir(name, 0o755, dir_fd=self._vm)
            with contextlib.suppress(NotFound, FileNotFoundError):
                if claimed := self._claim(name):
                    self._record_start(name, *claimed)
                    return name, *claimed
        raise Refused(f"backup {self.id}: its partial folder was removed three times while being made")

    def _record_start(self, name: str, folder: int, lock: int) -> None:
        """Our start into the lock we hold; if that fails (a full store), the partial goes again
        and its lock is let go, so that gc never takes a writer that gave up for a live one."""
        try:
            with self._writing("starting it"):
                # the earlier of this node's clock and the store's (the folder's time): the one
                # its chunks' times are written in (ChunkStore.gc)
                start = min(self.started, os.fstat(folder).st_mtime)
                os.pwrite(lock, f"{start}\n".encode(), 0)
                os.fsync(self._vm)
        except BaseException:
            with contextlib.suppress(OSError, StorkError):
                discard(self._vm, name, "partial")
            os.close(lock)
            os.close(folder)
            raise

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """An error of the store's file system (full, read-only, failing) as one line naming the
        store, the backup and what was being written."""
        try:
            yield
        except OSError as e:
            where = f" ({e.filename})" if isinstance(e.filename, str) else ""
            raise StorkError(f"backup storage {self.store.root}: backup {self.id}: {what}{where}: "
                             f"{e.strerror or e}") from e

    def _claim(self, name: str) -> tuple[int, int] | None:
        """(folder, lock) of the partial `name`, locked; None if gc took it first. gc removes a
        partial whose lock it gets, and could get this one in the instant before we do; it
        renames the partial to trash while holding the lock, so once we hold it, the name
        still holding our folder means it is ours."""
        folder = self.store.open_dir(self._vm, name)
        try:
            lock = open_lock(folder, LOCK)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except BaseException:
            os.close(folder)
            raise
        if still_named(self._vm, name, folder):
            return folder, lock
        os.close(lock)
        os.close(folder)
        return None

    # ---- chunks (any thread) ----------------------------------------------------------------
    def put_chunk(self, data: bytes) -> tuple[str | None, int]:
        """ChunkStore.put_chunk, remembered for this snapshot."""
        with self._writing("storing a chunk"):
            digest, written = self.store.put_chunk(data)
        if digest is not None:
            self._note(digest, written)
        return digest, written

    def put_stored(self, digest: str, blob: bytes) -> int:
        """ChunkStore.put_stored (a chunk file of a store with the same key), remembered."""
        with self._writing("storing a chunk"):
            written = self.store.put_stored(digest, blob)
        self._note(digest, written)
        return written

    def reuse_chunk(self, digest: str) -> bool:
        """Name a stored chunk without its data (unchanged since the base backup): touches it so
        gc keeps it. False if it is not stored: then put its data."""
        if not self.store.touch_chunk(digest):
            return False
        self._note(digest, 0)
        return True

    def _note(self, digest: str, written: int) -> None:
        with self._lock:
            self._chunks.add(digest)
            self._prefixes.add(digest[:4])
            self._written += written

    # ---- files --------------------------------------------------------------------------------
    def add_blob(self, name: str, data: bytes) -> None:
        self._add_file(blob_name(name), bytes(data))

    def add_index(self, key: str, index: Index, source: str = "", identity: str = "") -> None:
        """Add a disk's index; every chunk it names must have been put or reused by this writer
        (which is what keeps gc from removing it before commit). `source` and `identity` name
        the volume it was read from (its volume id, and its driver's identity token), so a
        later backup of a linked clone can find its base's index."""
        disk_key(key)
        if index.chunk_size != self.store.chunk_size:
            raise ValueError(f"index {key} has chunk size {index.chunk_size}, the store {self.store.chunk_size}")
        with self._lock:
            unknown = next((d for _, d in index.digests() if d not in self._chunks), None)
        if unknown is not None:
            raise Refused(f"backup {self.id}: index {key} names chunk {unknown}, which this backup "
                          "neither stored nor reused")
        self._add_file(index_file(key), index.to_json())
        self._disks[key] = DiskSummary(index.format, index.virtual_size, index.content, source, identity)

    def _add_file(self, name: str, data: bytes) -> None:
        self._check_open()
        if name in self._files:
            raise AlreadyExists(f"backup {self.id}: {name} was added already")
        with self._writing(f"writing {name}"):
            self.store.write_file(self._folder, name, data)
        self._files[name] = FileSum.of(data)

    def _check_open(self) -> None:
        if not self._open:
            raise Refused(f"backup {self.id}: already committed or aborted")

    # ---- the end ------------------------------------------------------------------------------
    def commit(self) -> Snapshot:
        """Make the snapshot durable, then visible: chunk folders, files and the partial folder
        are flushed before the rename that publishes it. AlreadyExists if its time is taken."""
        self._check_open()
        with self._writing("committing it"):
            return self._commit()

    def _commit(self) -> Snapshot:
        with self._lock:
            prefixes, written, chunks = set(self._prefixes), self._written, sorted(self._chunks)
        self.store.flush_chunk_folders(prefixes)
        if self.notes or self.store.seals_records:  # else no state.json: read as the default
            self.store.write_state(self._folder, self.id, State(notes=self.notes))
        manifest = Manifest(dict(self._files), dict(self._disks), sum(d.virtual_size for d in self._disks.values()),
                            written, self.made or format_time(datetime.fromtimestamp(self.started, UTC)), now_text(),
                            sealed_state=self.store.seals_records)
        manifest_json = manifest.to_json(self.id)
        if mac := self.store.manifest_mac(manifest_json):
            self.store.write_file(self._folder, MANIFEST_MAC, mac)
        self.store.write_file(self._folder, MANIFEST, manifest_json)
        os.fsync(self._folder)
        try:
            SafeDir.rename(self._vm, self._name, self._vm, self.id.time_text, what=f"backup {self.id}")
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer committed the same time
                raise AlreadyExists(f"backup {self.id} already exists") from None
            raise
        self._close()
        # A verify may have moved a chunk this backup reused aside as damaged while it ran, and
        # listed the store to fail every backup naming it before this one was there (prune would
        # count it sound). Looked at after the rename: that listing saw this backup, or this
        # sees the chunk gone (stored again since, by another backup, it is sound: present).
        failed = self.store.fail_for_lost(str(self.id), chunks)
        return Snapshot(self.id, manifest, failed or State(notes=self.notes))

    def abort(self) -> None:
        """Remove the partial folder; nothing of this snapshot was ever visible."""
        if not self._open:
            return
        try:
            discard(self._vm, self._name, "partial")
        finally:
            self._close()

    def _close(self) -> None:
        self._open = False
        _LIVE_PARTIALS.discard(self._identity)
        for fd in (self._held, self._folder, self._vm):
            os.close(fd)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


# ---- gc's view of a partial -------------------------------------------------------------------


def writer_is_live(folder: int, lock: int) -> bool:
    """Does a writer hold this partial's lock? Asks this process's own writers first: where flock
    is emulated with POSIX locks (NFS), a process would get a lock it holds itself."""
    st = os.fstat(folder)
    if (st.st_dev, st.st_ino) in _LIVE_PARTIALS:
        return True
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def recorded_start(lock: int) -> float:
    """The start a live writer wrote into its lock file. Empty means it has just taken its lock
    and put no chunk yet, so any start from now on is safe: +inf leaves the cutoff at gc's own."""
    try:
        return float(os.pread(lock, 64, 0).decode().strip())
    except ValueError:  # UnicodeDecodeError is one
        return float("inf")
