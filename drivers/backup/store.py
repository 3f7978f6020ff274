"""A deduplicating chunk store for backups on a directory, in the spirit of Proxmox Backup Server.

A disk is cut into fixed-size chunks; each chunk is stored once, named by the digest of its
data, and a snapshot's index lists the digests in order (None for an all-zero chunk, which is
never stored; or a patch: a linked clone's own runs, or what an incremental backup found
written, stored as one chunk over an earlier backup's chunk). Layout below the root, the
administrator's configured directory and the only path ever followed; everything below it
is opened with openat(2) and O_NOFOLLOW:

    .chunks/<4 hex>/<64 hex>        a chunk file: b"STKC", a kind byte (0 raw, 1 zstd, 2 kept
                                    for AES-GCM), then the payload (see drivers.backup.codec)
    .chunks/<4 hex>/.lock           flock: shared while a chunk is checked, touched or written,
                                    exclusive while gc sweeps the folder
    .chunks/<4 hex>/.<64 hex>.<random>.tmp   a chunk being written
    .chunks/.chunk-size, .key-fingerprint    recorded when the store is first opened
    vm/<vmid>/.lock                 flock while a snapshot's state.json changes or it is forgotten
    vm/<vmid>/<time>/               a committed snapshot: manifest.json (never changes after
                                    commit), state.json (notes, protected, last verify; MACed
                                    in an encrypted store), blobs
                                    such as guest.conf, one <disk>.index.json per disk
    vm/<vmid>/.partial-<time>-<random>/   a snapshot being written; its writer holds .lock in it
    vm/<vmid>/.trash-<time>-<random>/     a snapshot or dead partial being removed

Manifests, indexes and state files carry a format version; a reader refuses one it does not know.
This module holds the store: its chunks, snapshots and their state, the key and chunk size it
records, verify and gc. A snapshot is written by drivers.backup.writer, and both stand on the file
plumbing in drivers.backup.files; what the stored JSON means is in drivers.backup.records, how a
chunk is encoded in drivers.backup.codec.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import itertools
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers import faults, names
from drivers.backup.codec import CHUNK, KIND_AES_GCM, MAGIC, Codec, PlainCodec, is_zero
from drivers.backup.files import (
    CHUNK_SIZE,
    CHUNKS,
    KEY_FINGERPRINT,
    LOCK,
    MANIFEST_MAC,
    PARTIAL,
    TRASH,
    VM,
    discard,
    flocked,
    now_text,
    open_lock,
    read_all,
    write_all,
)
from drivers.backup.records import (
    DIGEST_PATTERN,
    MANIFEST,
    STATE,
    TIME_PATTERN,
    BackupId,
    Damaged,
    FileSum,
    GcResult,
    Index,
    Listing,
    Manifest,
    Patch,
    Problem,
    Snapshot,
    State,
    VerifyResult,
    backup_id,
    blob_name,
    check_chunk_size,
    check_digest,
    check_notes,
    disk_key,
    format_time,
    index_file,
    index_key,
    parse_time,
)
from drivers.backup.writer import SnapshotWriter, recorded_start, writer_is_live
from drivers.errors import AlreadyExists, Corrupt, InvalidName, NotFound, Refused, StorkError, UnknownFormat
from drivers.safedir import SafeDir, kind_of, refused

__all__ = ["ChunkStore", "SnapshotWriter"]  # SnapshotWriter lives in drivers.backup.writer; imported from here too

_PREFIX = re.compile(r"[0-9a-f]{4}")
_MAX_META = 64 << 20  # a manifest or state file; an index may be larger (16 M chunks for 64 TiB)
_MAX_INDEX = 2 << 30
QUARANTINE = 30 * 86400  # seconds a damaged chunk moved aside (<digest>.bad) is kept for a look
_CODEC_OVERHEAD = 4096  # header, and room for a nonce and tag once chunks can be encrypted

# flock(2) locks an open file on a local file system, but NFS emulates it with POSIX locks, which
# never conflict within one process and all drop when any descriptor of the file is closed. So
# threads of one process also take turns through these (and gc asks this process's writers too:
# see drivers.backup.writer.writer_is_live).
_PREFIX_LOCKS = [threading.Lock() for _ in range(256)]
_STATE_LOCK = threading.Lock()



# ---- the store --------------------------------------------------------------------------------


class ChunkStore:
    """A backup storage on the directory `root`. Thread-safe; several processes and nodes may
    use one root at once (flock must work across them, as on a local file system or NFSv4)."""

    def __init__(self, root: Path | str, chunk_size: int = CHUNK, codec: Codec | None = None) -> None:
        self.root = Path(root)
        self.chunk_size = check_chunk_size(chunk_size)
        self.codec: Codec = codec or PlainCodec(chunk_size)
        self._dir = SafeDir(self.root)
        self._lost_told: set[str] = set()  # chunks whose backups this process has marked failed

    # ---- folders ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _folder(self, *parts: str, create: bool = False) -> Iterator[int]:
        """A descriptor of root/parts..., each step opened without following a symlink (and made
        first if `create`, its parent flushed so the new name is durable)."""
        fd = self._open_root()
        try:
            for depth, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                        os.fsync(fd)
                child = self._dir.open_dir(fd, part, label=str(self.root.joinpath(*parts[:depth + 1])))
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"backup storage {self.root}: no such directory") from None
        except NotADirectoryError:
            raise Refused(f"backup storage {self.root}: not a directory") from None

    @contextlib.contextmanager
    def _snapshot_folder(self, id: BackupId) -> Iterator[int]:
        """The snapshot's folder; NotFound naming the backup where there is none (a file missing
        in it is named by whoever reads it)."""
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(self._folder(VM, str(id.vmid), id.time_text))
            except NotFound:
                self._open_root_or_raise()
                raise NotFound(f"backup {id}: no such backup in {self.root}") from None
            yield folder

    def _open_root_or_raise(self) -> None:
        os.close(self._open_root())

    @contextlib.contextmanager
    def _vm_locked(self, vmid: int) -> Iterator[int]:
        """The guest's folder, with the lock every state.json change and forget holds."""
        with _STATE_LOCK, self._folder(VM, str(vmid)) as vm, flocked(vm, LOCK, exclusive=True):
            yield vm

    @contextlib.contextmanager
    def _prefix_locked(self, prefix: str, exclusive: bool) -> Iterator[int]:
        """A chunk folder with its lock: shared to check, touch or add a chunk, exclusive to sweep."""
        with (_PREFIX_LOCKS[int(prefix, 16) % len(_PREFIX_LOCKS)],
              self._folder(CHUNKS, prefix, create=True) as folder,
              flocked(folder, LOCK, exclusive)):
            yield folder

    def _read(self, folder: int, name: str, limit: int, label: str) -> bytes:
        with self._dir.opened(folder, name, label=label) as fd:
            return read_all(fd, limit, label)

    def open_dir(self, folder: int, name: str) -> int:
        """A descriptor of the folder `name` in `folder`, opened without following a symlink."""
        return self._dir.open_dir(folder, name)

    def write_file(self, folder: int, name: str, data: bytes) -> None:
        """Replace `name` in `folder` with `data`, durably (temp file, fsync, rename, dir fsync).
        Callers are the only writer of the folder at the time (its lock or its partial's)."""
        with self._dir.temp_file(folder, name) as (fd, temp):
            write_all(fd, data)
            os.fsync(fd)
            self._dir.replace(folder, temp, name)

    # ---- chunks -------------------------------------------------------------------------------
    def put_chunk(self, data: bytes) -> tuple[str | None, int]:
        """Store a chunk of at most chunk_size bytes: (its digest, bytes written). An all-zero
        chunk is not stored (digest None, as in an index); a stored one is touched (0 written).
        The new file's folder is not flushed here: SnapshotWriter does that before its commit."""
        if not 0 < len(data) <= self.chunk_size:
            raise ValueError(f"a chunk holds 1 to {self.chunk_size} bytes, not {len(data)}")
        if is_zero(data):
            return None, 0
        digest = self.codec.digest(data)
        if self.touch_chunk(digest):
            return digest, 0
        blob = self.codec.encode(data)  # outside the lock: compressing takes milliseconds
        with self._prefix_locked(digest[:4], exclusive=False) as folder:
            if self._touch(folder, digest) or not self._link_new_chunk(folder, digest, blob):
                return digest, 0
        return digest, len(blob)

    def touch_chunk(self, digest: str) -> bool:
        """Refresh a stored chunk's mtime so a running gc keeps it; False if it is not stored."""
        check_digest(digest)
        with self._prefix_locked(digest[:4], exclusive=False) as folder:
            return self._touch(folder, digest)

    def _touch(self, folder: int, digest: str) -> bool:
        try:
            fd = self._dir.open(folder, digest, label=f"chunk {digest}")
        except NotFound:
            return False
        try:
            os.utime(fd)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _link_new_chunk(folder: int, digest: str, blob: bytes) -> bool:
        """Write the chunk to a temp file, flush it, and link it to its name; False if another
        writer linked the same chunk first (its file is as good as ours)."""
        temp = f".{digest}.{secrets.token_hex(8)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=folder)
        try:
            try:
                write_all(fd, blob)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # flushed: its pages serve the next chunk
            finally:
                os.close(fd)
            os.link(temp, digest, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temp, dir_fd=folder)

    def read_stored(self, digest: str) -> bytes:
        """A chunk file's bytes as stored (encoded, sealed where the store is encrypted), for a
        store with the same key to take as they are (`put_stored`); not checked here."""
        check_digest(digest)
        self._open_root_or_raise()
        try:
            with self._folder(CHUNKS, digest[:4]) as folder:
                return self._read(folder, digest, self.chunk_size + _CODEC_OVERHEAD, f"chunk {digest}")
        except NotFound:
            raise NotFound(f"chunk {digest}: missing from {self.root}") from None

    def put_stored(self, digest: str, blob: bytes) -> int:
        """Store a chunk file as another store of the same key stored it, after checking that it
        decodes to its digest here (Corrupt naming it if not): bytes written, 0 where the chunk
        was there already (then touched, as put_chunk does)."""
        check_digest(digest)
        if self.touch_chunk(digest):
            return 0
        self.codec.decode(blob, digest)
        with self._prefix_locked(digest[:4], exclusive=False) as folder:
            if self._touch(folder, digest) or not self._link_new_chunk(folder, digest, blob):
                return 0
        return len(blob)

    def read_chunk(self, digest: str) -> bytes:
        """A stored chunk's data, checked against its digest; NotFound or Corrupt name the digest
        (Corrupt too where the file system cannot read it back: a bad sector, a checksum of
        btrfs or ZFS that does not match)."""
        try:
            return self.codec.decode(self.read_stored(digest), digest)
        except OSError as e:
            if e.errno not in MEDIA_ERRORS:
                raise
            raise Corrupt(f"chunk {digest}: cannot be read back: {e.strerror}") from None

    def flush_chunk_folders(self, prefixes: set[str]) -> None:
        for prefix in sorted(prefixes):
            with self._folder(CHUNKS, prefix) as folder:
                os.fsync(folder)

    # ---- writing a snapshot ---------------------------------------------------------------------
    def begin(self, vmid: int, time: datetime | None = None, notes: str = "") -> SnapshotWriter:
        """Start a snapshot of guest `vmid` at `time` (UTC, whole seconds; default now). It is
        written into a hidden partial folder and appears only at commit."""
        id = BackupId(names.vmid(vmid), parse_time(format_time(time or datetime.now(UTC))))
        check_notes(notes)
        with self._folder(VM, str(id.vmid), create=True) as vm:
            if SafeDir.entry_exists(vm, id.time_text):
                raise AlreadyExists(f"backup {id} already exists")
            writer_vm = os.dup(vm)
        try:
            return SnapshotWriter(self, id, notes, writer_vm)
        except BaseException:
            os.close(writer_vm)
            raise

    # ---- reading ------------------------------------------------------------------------------
    def listing(self, vmid: int | None = None) -> Listing:
        """Committed snapshots sorted by (vmid, time), oldest first, of one guest if given: those
        that can be read, and apart, with the reason, those that cannot (a damaged, tampered or
        missing manifest or state), so that one damaged snapshot stops no other reader."""
        return self._listing_of(self._snapshot_ids(vmid, strict=False))

    def _listing_of(self, ids: list[BackupId]) -> Listing:
        found, damaged = [], []
        for id in ids:
            try:
                found.append(self._load(id))
            except (Corrupt, NotFound, Refused, OSError) as e:
                if not _is_damage(e):
                    raise  # a file system's passing trouble (a stale handle, a timeout): no damage to list
                if self._entry_exists(id):  # else it was forgotten since the listing
                    damaged.append(Damaged(id, _why(e)))
        return Listing(found, damaged)

    def snapshots(self, vmid: int | None = None) -> list[Snapshot]:
        """The snapshots `listing` can read; the damaged are left out."""
        return self.listing(vmid).snapshots

    def exists(self, id: str) -> bool:
        """Whether the committed snapshot `id` is there."""
        return self._exists(backup_id(id))

    def snapshot(self, id: str) -> Snapshot:
        return self._load(backup_id(id))

    def _load(self, id: BackupId) -> Snapshot:
        with self._snapshot_folder(id) as folder:
            manifest = self._manifest(folder, id)
            return Snapshot(id, manifest, self._state(folder, id, manifest.sealed_state))

    def _exists(self, id: BackupId) -> bool:
        try:
            with self._snapshot_folder(id):
                return True
        except NotFound:
            return False

    def _entry_exists(self, id: BackupId) -> bool:
        """Whether anything is at the snapshot's name (a folder, or what is there instead)."""
        try:
            with self._folder(VM, str(id.vmid)) as vm:
                return SafeDir.entry_exists(vm, id.time_text)
        except NotFound:
            return False

    def _manifest(self, folder: int, id: BackupId) -> Manifest:
        raw = self._read(folder, MANIFEST, _MAX_META, f"backup {id}: {MANIFEST}")
        if (expected := self.manifest_mac(raw)) is not None:
            try:
                mac = self._read(folder, MANIFEST_MAC, 1024, f"backup {id}: {MANIFEST_MAC}")
            except NotFound:
                mac = b""
            if not hmac.compare_digest(mac, expected):
                raise Corrupt(f"backup {id}: its manifest fails authentication (tampered with, or another key)")
        return Manifest.from_json(raw, id)

    @property
    def seals_records(self) -> bool:
        """Whether manifests and states carry MACs (an encrypted store's codec makes them)."""
        return self.codec.mac(b"") is not None

    def manifest_mac(self, manifest: bytes) -> bytes | None:
        """The manifest's MAC where the store is encrypted (drivers/backup/crypt.py), else None."""
        return self.codec.mac(manifest)

    def _state_mac(self, id: BackupId, state: State) -> str | None:
        """The MAC of a snapshot's state in an encrypted store: over the snapshot's id too, so
        the state.json of another (a protected one, say) cannot be copied in."""
        mac = self.codec.mac(f"{STATE} of {id}\n".encode() + state.to_json())
        return mac.decode() if mac is not None else None

    # ---- the store's key ----------------------------------------------------------------------
    def check_key(self, record: bool = True) -> None:
        """Refuse a key that is not the store's, no key for an encrypted store, or a key for a
        store that holds plain chunks already; with `record`, a new store records its key's
        fingerprint (a reader records nothing, and a store with none recorded holds nothing)."""
        given = self.codec.fingerprint
        recorded = self._recorded(KEY_FINGERPRINT)
        if not recorded and self._sealed_backups_found(given):
            if record:  # the record was lost (a copy of the store that left out dot-files): the key proved it
                with self._folder(CHUNKS, create=True) as folder:
                    self._record_once(folder, KEY_FINGERPRINT, str(given))
            return
        if recorded == given:
            return
        if recorded and not given:
            raise Refused(f"backup storage {self.root} is encrypted: name its key file (keyfile) in the config")
        if recorded:
            raise Refused(f"backup storage {self.root}: the key file is not this store's key (its "
                          f"fingerprint is {given}, the store's {recorded})")
        if self._holds_backups():
            raise Refused(f"backup storage {self.root} holds unencrypted backups: give an encrypted storage "
                          "a directory of its own")
        if not record:
            return
        with self._folder(CHUNKS, create=True) as folder:
            if self._record_once(folder, KEY_FINGERPRINT, str(given)) != given:
                raise Refused(f"backup storage {self.root}: another key was recorded for this store meanwhile")

    def _sealed_backups_found(self, given: str | None) -> bool:
        """For a store whose key fingerprint record is missing: False where its first backup is
        a plain store's (no manifest MAC), or it holds none; True where `given`'s key
        authenticates one of its backups; else Refused. Without this, an encrypted store that
        lost the record was taken for a plain one: every backup listed damaged (`forget
        --damaged` would remove them), and plain chunks written among the encrypted ones."""
        try:
            vmids = self._vmids(strict=False)
        except NotFound:
            return False  # no store there yet
        ids = (id for vmid in vmids for id in sorted(self._ids_of(vmid)))
        # the first backup decides: a plain store is opened no slower for want of a record; and
        # a chunk, where that backup's MAC is missing too (damage, or a hand)
        first = next((id for id in ids if self._has(id, MANIFEST)), None)
        sealed = None
        if first is None or not self._has(first, MANIFEST_MAC):
            if (sealed := self._sealed_chunk()) is None:
                return False
            first = None
        missing = f"its key's fingerprint record, .chunks/{KEY_FINGERPRINT}, is missing"
        if not given:
            raise Refused(f"backup storage {self.root} holds encrypted backups ({missing}): name its key file "
                          "(keyfile) in the config")
        for id in itertools.chain([first] if first else [], ids):
            with contextlib.suppress(Corrupt, NotFound, Refused):
                self._load(id)  # its manifest's MAC, under the given key
                return True
        if sealed is not None:
            with contextlib.suppress(Corrupt, NotFound, Refused, OSError):
                self.read_chunk(sealed)  # unsealed and checked against its keyed digest: this key's chunk
                return True
        raise Refused(f"backup storage {self.root}: the key file is not this store's key ({missing}, and no "
                      "backup's manifest authenticates with it)")

    def _first_chunk(self) -> str | None:
        """The digest of the first chunk file met, as the file system lists the folders (a look
        at an entry or two of each, none read whole: a plain store is opened no slower for it);
        None where there is none. A folder that cannot be read raises: both callers decide on
        the answer (a gc that would take the chunks, a store taken for a plain one)."""
        try:
            with self._folder(CHUNKS) as chunks, os.scandir(chunks) as prefixes:
                for prefix in (e.name for e in prefixes if _PREFIX.fullmatch(e.name)):
                    with contextlib.suppress(NotFound), self._folder(CHUNKS, prefix) as folder, \
                            os.scandir(folder) as entries:  # (a prefix folder gone meanwhile holds none)
                        if name := next((e.name for e in entries if DIGEST_PATTERN.fullmatch(e.name)), None):
                            return name
        except NotFound:  # no chunk folder (yet): no chunk
            pass
        return None

    def _sealed_chunk(self) -> str | None:
        """The first chunk met (_first_chunk), where it is sealed by a key (AES-GCM); one that
        cannot be read raises (a store is not taken for a plain one for want of a look)."""
        for _ in range(3):  # a chunk gc removed between the listing and the open: another is looked at
            if (name := self._first_chunk()) is None:
                return None
            with contextlib.suppress(NotFound), self._folder(CHUNKS, name[:4]) as folder, \
                    self._dir.opened(folder, name, label=f"chunk {name}") as fd:
                return name if os.pread(fd, len(MAGIC) + 1, 0) == MAGIC + bytes([KIND_AES_GCM]) else None
        raise Refused(f"backup storage {self.root}: whether its chunks are sealed cannot be told (they go as they "
                      "are looked at): try again")

    def _has(self, id: BackupId, name: str) -> bool:
        try:
            with self._snapshot_folder(id) as folder:
                return SafeDir.entry_exists(folder, name)
        except (NotFound, Refused):
            return False

    def _holds_backups(self) -> bool:
        """Whether any chunk folder or snapshot is there (False where no store is yet)."""
        try:
            with self._folder(CHUNKS) as folder:
                if any(_PREFIX.fullmatch(name) for name in os.listdir(folder)):
                    return True
        except NotFound:
            pass
        try:
            return bool(self._snapshot_ids())
        except NotFound:
            return False

    def check_chunk_size(self, record: bool = True) -> None:
        """Refuse to open a store made with another chunk size (its chunks would all seem
        damaged); with `record`, a store opened first records its own."""
        if record:
            with self._folder(CHUNKS, create=True) as folder:
                recorded: str | None = self._record_once(folder, CHUNK_SIZE, str(self.chunk_size))
        else:
            recorded = self._recorded(CHUNK_SIZE)
        if recorded is not None and recorded != str(self.chunk_size):
            raise Refused(f"backup storage {self.root} holds chunks of {recorded} bytes, not {self.chunk_size}")

    def _recorded(self, name: str) -> str | None:
        """What the store recorded in .chunks/`name`; None where nothing is (or no store is yet)."""
        try:
            with self._folder(CHUNKS) as folder:
                return self._read(folder, name, 1024, name).decode().strip()
        except NotFound:
            return None

    def _record_once(self, folder: int, name: str, value: str) -> str:
        """The value recorded in `name`, recording `value` if none is. Under the folder's lock
        (temp_file sweeps other writers' temp files); link(2) never replaces a record."""
        with contextlib.suppress(NotFound):
            return self._read(folder, name, 1024, name).decode().strip()
        with flocked(folder, LOCK, exclusive=True), self._dir.temp_file(folder, name) as (fd, temp):
            write_all(fd, f"{value}\n".encode())
            os.fsync(fd)
            with contextlib.suppress(AlreadyExists):
                self._dir.link_new(folder, temp, name, name)
        return self._read(folder, name, 1024, name).decode().strip()

    def _state(self, folder: int, id: BackupId, sealed: bool) -> State:
        """The snapshot's state; `sealed` (its manifest says so) requires it present and its MAC
        right. Snapshots of an encrypted store made before states were sealed have none."""
        what = f"backup {id}: {STATE}"
        if not SafeDir.entry_exists(folder, STATE):
            if sealed:  # its commit wrote one
                raise Corrupt(f"{what}: missing")
            return State()
        raw = self._read(folder, STATE, _MAX_META, what)
        state = State.from_json(raw, what)
        if sealed and not hmac.compare_digest(str(State.stated_mac(raw)).encode(),
                                              str(self._state_mac(id, state)).encode()):
            raise Corrupt(f"{what}: fails authentication (tampered with, or another key)")
        return state

    def write_state(self, folder: int, id: BackupId, state: State) -> None:
        self.write_file(folder, STATE, state.to_json(mac=self._state_mac(id, state)))

    def read_blob(self, id: str, name: str) -> bytes:
        """A blob of a snapshot (guest.conf, ...), checked against the manifest."""
        return self._read_checked(backup_id(id), blob_name(name))

    def index(self, id: str, key: str) -> Index:
        """A disk's index, checked against the manifest."""
        parsed = backup_id(id)
        name = index_file(disk_key(key))
        return Index.from_json(self._read_checked(parsed, name), f"backup {parsed}: {name}")

    def _read_checked(self, id: BackupId, name: str) -> bytes:
        with self._snapshot_folder(id) as folder:
            expected = self._manifest(folder, id).files.get(name)
            if expected is None:
                raise NotFound(f"backup {id} has no {name}")
            data = self._read(folder, name, expected.size, f"backup {id}: {name}")
        if FileSum.of(data) != expected:
            raise Corrupt(f"backup {id}: {name} does not match the checksum in its manifest")
        return data

    def _snapshot_ids(self, vmid: int | None = None, strict: bool = True) -> list[BackupId]:
        """Every snapshot's id, one at each name that looks like one (a snapshot's name where a
        folder should be, a link say, is read as a damaged snapshot). `strict` (gc): a guest's
        name that is not a folder is refused, as it might hold snapshots whose chunks must not
        be taken for garbage; else (the readers) it is passed over, so it stops no backup."""
        vmids = self._vmids(strict) if vmid is None else [names.vmid(vmid)]
        return sorted(id for guest in vmids for id in self._ids_of(guest))

    def _vmids(self, strict: bool = True) -> list[int]:
        try:
            with self._folder(VM) as folder, os.scandir(folder) as entries:
                found = [e for e in entries if _is_vmid_name(e.name)]
        except NotFound:
            self._open_root_or_raise()
            return []
        odd = [entry for entry in found if not entry.is_dir(follow_symlinks=False)]
        if odd and strict:
            raise refused(self.root / VM / odd[0].name, "not a directory")
        return [int(e.name) for e in found if e not in odd]

    def _ids_of(self, vmid: int) -> list[BackupId]:
        try:
            with self._folder(VM, str(vmid)) as folder, os.scandir(folder) as entries:
                found = [e for e in entries if TIME_PATTERN.fullmatch(e.name)]
        except NotFound:
            self._open_root_or_raise()
            return []
        ids = []
        for entry in found:
            with contextlib.suppress(InvalidName):  # a look-alike such as 2026-02-30T...: not ours
                ids.append(BackupId(vmid, parse_time(entry.name)))
        return ids

    # ---- changing a snapshot ------------------------------------------------------------------
    def set_protected(self, id: str, protected: bool) -> State:
        return self._change_state(backup_id(id), protected=bool(protected))

    def set_notes(self, id: str, notes: str) -> State:
        return self._change_state(backup_id(id), notes=check_notes(notes))

    def _change_state(self, id: BackupId, **changes: Any) -> State:
        with self._vm_locked_for(id) as vm, self._dir_of(vm, id) as folder:
            try:
                sealed = self._manifest(folder, id).sealed_state
            except (Corrupt, NotFound):  # damaged: still to be unprotected and forgotten
                sealed = False
            try:
                state = replace(self._state(folder, id, sealed), **changes)
            except Corrupt as e:
                raise Corrupt(f"{e}: 'stork backup forget --damaged {id}' removes it") from None
            self.write_state(folder, id, state)
        return state

    @contextlib.contextmanager
    def _vm_locked_for(self, id: BackupId) -> Iterator[int]:
        try:
            with self._vm_locked(id.vmid) as vm:
                yield vm
        except NotFound:
            self._open_root_or_raise()
            raise NotFound(f"backup {id}: no such backup in {self.root}") from None

    @contextlib.contextmanager
    def _dir_of(self, vm: int, id: BackupId) -> Iterator[int]:
        fd = self._dir.open_dir(vm, id.time_text, label=f"backup {id}")
        try:
            yield fd
        finally:
            os.close(fd)

    def forget(self, id: str, damaged: bool = False, held: Callable[[str], str] = lambda id: "") -> str:
        """Remove a snapshot (its chunks stay until gc); Refused while it is protected, or while
        `held` gives a reason (a restore reads it), asked under the guest's lock as a prune's
        is. With `damaged`, a snapshot that cannot be read (its manifest or state damaged,
        tampered with or missing), whatever its state may say, and only such a one; returns why
        it could not be read ("" without `damaged`)."""
        parsed = backup_id(id)
        with self._vm_locked_for(parsed) as vm:
            if why := held(str(parsed)):
                raise Refused(f"backup {parsed} is {why}")
            if damaged and (odd := _not_a_folder(vm, parsed.time_text)):
                os.unlink(parsed.time_text, dir_fd=vm)  # a link is removed, never what it points to
                os.fsync(vm)
                return f"backup {parsed}: {odd}"
            with self._dir_of(vm, parsed) as folder:
                reason = self._why_damaged(folder, parsed) if damaged else self._check_unprotected(folder, parsed)
            discard(vm, parsed.time_text, parsed.time_text)
        return reason

    def forget_chosen(self, vmid: int, choose: Callable[[Listing], list[str]],
                      held: Callable[[str], str] = lambda id: "") -> tuple[list[str], dict[str, str]]:
        """Forget the snapshots of guest `vmid` that `choose` picks from the guest's listing as
        it stands under the guest's lock, which every change of a state (a verify's outcome, a
        protection) holds too: a prune decides on states nothing changes before its forgets
        (a verify that marked the newest backup failed just after prune's own listing let prune
        forget the older, sound one kept for it). One `held` gives a reason to keep (a restore
        reading it) is kept as a protected one is. (forgotten, {refused: why})."""
        forgotten: list[str] = []
        refused_: dict[str, str] = {}
        try:
            with self._vm_locked(vmid) as vm:
                for id in choose(self._listing_of(self._ids_of(vmid))):
                    if (parsed := backup_id(id)).vmid != vmid:
                        raise ValueError(f"{id} is not a backup of guest {vmid}")
                    try:
                        with self._dir_of(vm, parsed) as folder:
                            self._check_unprotected(folder, parsed)
                        if why := held(id):
                            raise Refused(f"backup {id} is {why}")
                    except (Refused, Corrupt) as e:
                        refused_[id] = str(e)
                        continue
                    discard(vm, parsed.time_text, parsed.time_text)
                    forgotten.append(id)
        except NotFound:  # no backup of that guest (any more)
            pass
        return forgotten, refused_

    def _check_unprotected(self, folder: int, id: BackupId) -> str:
        # unsealed read: a forged flag could only keep or let go what deleting the folder
        # would anyway, and a snapshot whose manifest is damaged can still be forgotten
        # (once unprotected: _change_state reads a damaged one's state unsealed too)
        try:
            protected = self._state(folder, id, sealed=False).protected
        except (Corrupt, Refused) as e:
            raise Corrupt(f"{e}: 'stork backup forget --damaged {id}' removes it") from None
        if protected:
            raise Refused(f"backup {id} is protected: unprotect it before forgetting it")
        return ""

    def _why_damaged(self, folder: int, id: BackupId) -> str:
        """Why the snapshot cannot be read (its manifest, state or an index); Refused if it can
        (then it is not damaged, and its protection holds: --damaged is no way around it), and
        for one a newer stork wrote (not damaged either: a newer stork reads it)."""
        try:
            manifest = self._manifest(folder, id)
            self._state(folder, id, manifest.sealed_state)
            for key in manifest.disks:
                self.index(str(id), key)
        except UnknownFormat as e:
            raise Refused(f"backup {id} is not damaged: {e} (a newer stork wrote it)") from None
        except (Corrupt, NotFound, Refused, OSError) as e:
            if not _is_damage(e):
                raise  # passing trouble is no reason to remove a backup
            return _why(e)
        raise Refused(f"backup {id} is not damaged: forget it without --damaged")

    # ---- verify -------------------------------------------------------------------------------
    def verify(self, id: str) -> VerifyResult:
        """Read back every blob, index and chunk of a snapshot (each distinct chunk once), check
        every digest, and record the outcome in its state.json. Damaged chunks are moved aside
        only once it, and every other snapshot naming them, is recorded failed: a verify that dies
        before leaves them where they are, for the next to find, never an "ok" naming a chunk
        gone (prune would count that backup sound)."""
        parsed = backup_id(id)
        snapshot = self._load(parsed)
        lost: set[str] = set()
        damaged: set[str] = set()
        problems = [*self._file_problems(parsed, snapshot.manifest),
                    *self._chunk_problems(parsed, snapshot.manifest, lost, damaged)]
        result = VerifyResult("failed" if problems else "ok", now_text(), tuple(problems))
        self._change_state(parsed, verify=result)
        damaged = {digest for digest in damaged if not self._sound_now(digest)}  # else a read error that passed
        seen, unrecorded = {parsed}, set()
        if new := (lost | damaged) - self._lost_told:  # once per chunk in a process: a verify --all meets it in many
            unrecorded = self._fail_others_naming(new, parsed, seen)
            self._lost_told |= new - unrecorded  # those are tried again by the next verify that meets them
        # a chunk a backup that could not be recorded names stays (the next verify finds it again); a
        # backup committed between the listing and the move, reusing one, was in neither: failed now
        if moved := {digest for digest in sorted(damaged - unrecorded) if self._quarantine(digest)}:
            self._fail_others_naming(moved, parsed, seen)
        return result

    def _fail_others_naming(self, lost: set[str], found_by: BackupId, seen: set[BackupId]) -> set[str]:
        """Record every snapshot not `seen` yet (each added) that names a chunk verify found
        damaged or missing as failed too: an "ok" of its own last verify no longer holds, and
        prune and sync, which do not count a failed backup, would let an older one that restores
        go for it. The chunks named by one whose state could not be written (a full store), all
        of `lost` where one's chunks could not be read for a reason that may pass."""
        unrecorded: set[str] = set()
        for id in self._snapshot_ids(strict=False):
            if id in seen:
                continue
            seen.add(id)
            try:
                named = sorted(self._chunks_of(id) & lost)
            except (StorkError, OSError) as e:
                if not _is_damage(e) and self._entry_exists(id):  # a passing error (ESTALE): it may name any
                    unrecorded.update(lost)
                continue  # else damaged itself (listed apart, never counted), or forgotten meanwhile
            if not named:
                continue
            problems = tuple(Problem(d, f"chunk {d}: damaged or missing, found by the verify of backup {found_by}")
                             for d in named)
            try:
                self._change_state(id, verify=VerifyResult("failed", now_text(), problems))
            except (StorkError, OSError):
                unrecorded.update(named)
        return unrecorded

    def fail_for_lost(self, id: str, named: Iterable[str] | None = None) -> State | None:
        """After a backup's commit: record it failed, as a verify finding them would, where
        chunks it names (`named`, which its writer knows; else read from its indexes) are gone
        by now: a verify set them aside while it was made. Its new state; None where none is gone."""
        parsed = backup_id(id)
        if not (lost := self.missing_chunks(self._chunks_of(parsed) if named is None else named)):
            return None
        problems = tuple(Problem(d, f"chunk {d}: damaged or missing (moved aside by a verify while this "
                                    "backup was made)") for d in lost)
        return self._change_state(parsed, verify=VerifyResult("failed", now_text(), problems))

    def missing_chunks(self, digests: Iterable[str]) -> list[str]:
        """Those of `digests` no chunk file is at: a shared lock per chunk folder, a stat per chunk."""
        missing = []
        for prefix, group in itertools.groupby(sorted(digests), key=lambda digest: digest[:4]):
            with self._prefix_locked(prefix, exclusive=False) as folder:
                missing += [digest for digest in group if not SafeDir.entry_exists(folder, digest)]
        return missing

    def _file_problems(self, id: BackupId, manifest: Manifest) -> Iterator[Problem]:
        for name in manifest.files:
            try:
                self._read_checked(id, name)
            except (Corrupt, NotFound, Refused) as e:
                yield Problem(None, str(e))

    def _chunk_problems(self, id: BackupId, manifest: Manifest, lost: set[str], damaged: set[str]
                        ) -> Iterator[Problem]:
        """What is wrong with the chunks the snapshot names: those missing are added to `lost`,
        those that do not read back as their digest to `damaged` (for the caller to move aside)."""
        places: dict[str, list[tuple[str, int]]] = {}
        indexes: dict[str, Index] = {}
        for key in manifest.disks:
            with contextlib.suppress(Corrupt, NotFound, Refused):  # reported by _file_problems
                indexes[key] = index = self.index(str(id), key)
                for position, digest in index.digests():
                    places.setdefault(digest, []).append((key, position * index.chunk_size))
        lengths: dict[str, int] = {}
        for digest, where in places.items():
            try:
                lengths[digest] = len(self.read_chunk(digest))
            except Corrupt as e:
                damaged.add(digest)
                yield Problem(digest, f"{e} (set aside as {digest}.bad unless it reads sound again)", tuple(where))
            except (NotFound, Refused) as e:
                lost.add(digest)
                yield Problem(digest, str(e), tuple(where))
        for key, index in indexes.items():
            yield from _length_problems(key, index, lengths)

    def _sound_now(self, digest: str) -> bool:
        """Does chunk `digest` read back as its digest now (under its folder's lock)?"""
        with self._prefix_locked(digest[:4], exclusive=False) as folder:
            try:
                return self._reads_sound(folder, digest, digest)
            except OSError as e:
                if e.errno not in MEDIA_ERRORS:
                    raise
                return False  # as verify's own read found it

    def _quarantine(self, digest: str) -> bool:
        """Move a chunk whose data does not match its digest aside, as <digest>.bad: the next
        backup holding that data then stores it again (which makes every backup naming it
        whole again) instead of naming the damaged file. A backup whose patch lies over it
        stays damaged: the next backup of that disk reads the chunk whole instead. False where it
        is sound by now, or gone."""
        with self._prefix_locked(digest[:4], exclusive=True) as folder, contextlib.suppress(FileNotFoundError):
            try:
                if self._reads_sound(folder, digest, digest):
                    return False  # stored anew since verify read it (gc took it, a backup wrote it back): sound
            except OSError as e:  # unreadable: it goes aside
                if e.errno not in MEDIA_ERRORS:
                    raise
            faults.point("quarantine")
            os.rename(digest, f"{digest}.bad", src_dir_fd=folder, dst_dir_fd=folder)
            os.utime(f"{digest}.bad", dir_fd=folder)  # its time aside counts from now (see gc)
            os.fsync(folder)
            return True
        return False

    # ---- garbage collection -------------------------------------------------------------------
    def gc(self, margin: float = 300.0, now: float | None = None) -> GcResult:
        """Remove chunk files no snapshot refers to, and the partial folders of dead writers.

        Safe while backups run. A writer records its start S before it makes its partial folder,
        and every chunk it will name gets an mtime >= S: put_chunk writes it or touches it, and
        reuse without the data goes through touch_chunk. gc first notes its own start G, then
        finds the live partials (their writers hold their locks) and their starts, and only then
        lists the committed snapshots, so every writer is in one of three cases:
        - it committed before that listing: its chunks are marked;
        - its partial was seen live: cutoff <= S - margin, so none of its chunks is old enough;
        - it started after G (or within the margin before): its chunks are newer than the cutoff.
        A chunk is removed only if unmarked with mtime < cutoff = min(G, live starts) - margin,
        checked and removed under the chunk folder's exclusive lock, while put_chunk checks and
        touches under the shared one: either the touch comes first and gc sees the new mtime, or
        the unlink does and put_chunk writes the chunk anew (touch_chunk returns False, and its
        caller must then put the data). The margin covers clock skew between nodes, file
        timestamps that lag the clock by a tick, and the instant between a writer's start and
        its lock. A snapshot whose index files cannot be read stops gc before anything is
        removed: its chunks cannot be told from garbage. Damaged chunks that verify moved aside
        are removed once they have been aside for QUARANTINE (counted apart).

        Chunk times are set by the store's file system (on NFS, by the server's clock), so gc's
        start and each writer's are the earlier of their node's clock and the store's (a new
        file's time): a node whose clock runs ahead of the store's, by more than the margin too,
        never makes a chunk that was just touched look old. (A file system that stamps times by
        its client's clock, as sshfs does, is left to the margin.)

        `now` stands in for gc's start (tests pass a later one to age the whole store).
        """
        self._require_vm_folder()
        started = min(time.time(), self._store_clock()) if now is None else now
        live, partials_removed = self._live_partials()
        cutoff = min([started, *(start for start, _ in live)]) - margin
        marked = self._referenced_chunks()  # listed only now, after the partials: see above
        for _, chunks in live:
            marked |= chunks
        removed, freed, kept, bad, restored, recent, newest = self._sweep_chunks(marked, cutoff, started - QUARANTINE)
        return GcResult(removed, freed, kept, partials_removed, bad, restored, recent,
                        newest + margin if recent else None)

    def _require_vm_folder(self) -> None:
        """Chunks with no `vm/` folder beside them are a store being copied into place (a copy
        that writes `.chunks` first) or one whose folder is lost, not garbage: every writer
        makes `vm/` before its first chunk, and forgetting every backup leaves it. (A store
        opened for a first backup that then failed has `.chunks` with its records only.)"""
        try:
            with self._folder(VM):
                return
        except NotFound:
            pass
        if self._first_chunk() is not None:
            raise Refused(f"gc stopped before removing anything: {self.root} has chunks and no {VM}/ folder, so "
                          f"no backup names them (a store still being copied into place?); if they are garbage, "
                          f"make the folder {self.root / VM} and run gc again")

    def _store_clock(self) -> float:
        """The store file system's clock now: the time of a file made for the purpose; where none
        can be made (a full store, which gc is run to free, must not stop it), the time it gives
        the store's folder touched (no room needed). Never this node's clock, which may run ahead
        of the store's: Refused where neither can be had."""
        name = f".clock.{secrets.token_hex(8)}"
        with self._folder() as root:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=root)
            except OSError:
                try:
                    os.utime(root)
                    return os.fstat(root).st_mtime
                except OSError as e:
                    raise Refused(f"gc stopped before removing anything: the clock of {self.root} cannot be read "
                                  f"({e.strerror})") from None
            try:
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                os.unlink(name, dir_fd=root)

    def _live_partials(self) -> tuple[list[tuple[float, set[str]]], int]:
        """(start, chunks named so far) of each live writer; dead writers' partials and leftover
        trash are removed on the way (their count is returned)."""
        live, removed = [], 0
        for vmid in self._vmids():
            with self._vm_locked(vmid) as vm:
                with os.scandir(vm) as entries:
                    folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
                for name in folders:
                    if name.startswith(TRASH):
                        shutil.rmtree(name, ignore_errors=True, dir_fd=vm)
                    elif name.startswith(PARTIAL):
                        with contextlib.suppress(NotFound, FileNotFoundError):  # committed or aborted meanwhile
                            if partial := self._check_partial(vm, name):
                                live.append(partial)
                            else:
                                removed += 1
        return live, removed

    def _check_partial(self, vm: int, name: str) -> tuple[float, set[str]] | None:
        """A live writer's (start, chunks); None after removing a dead writer's partial."""
        folder = self._dir.open_dir(vm, name)
        try:
            lock = open_lock(folder, LOCK)
            try:
                if writer_is_live(folder, lock):
                    return recorded_start(lock), self._partial_chunks(folder)
                discard(vm, name, "partial")  # still under its lock: see SnapshotWriter._claim
                return None
            finally:
                os.close(lock)
        finally:
            os.close(folder)

    def _partial_chunks(self, folder: int) -> set[str]:
        """Chunks named by the indexes a live writer has added so far (each written whole)."""
        return self._indexed_chunks(folder, "", strict=False)

    def _indexed_chunks(self, folder: int, what: str, strict: bool, sealed: Mapping[str, FileSum] | None = None
                        ) -> set[str]:
        """Chunks named by every index file in `folder`, each read once (to keep chunks, naming
        more is safe). `strict`: one that does not parse is Corrupt, since the chunks it names
        could not be kept; one `sealed` names (a manifest's checksums) must match it."""
        chunks: set[str] = set()
        # strict: every entry named like an index, a symlink or a folder too (refused when read)
        for name in sorted(os.listdir(folder)) if strict else SafeDir.regular_files(folder):
            if index_key(name) is not None:
                try:
                    raw = self._read(folder, name, _MAX_INDEX, f"{what}{name}")
                    index = Index.from_json(raw, f"{what}{name}")
                    if sealed and name in sealed and FileSum.of(raw) != sealed[name]:
                        raise Corrupt(f"{what}{name} does not match the checksum in its manifest")
                except StorkError:
                    if strict:
                        raise
                    continue
                chunks.update(d for _, d in index.digests())
        return chunks

    def _referenced_chunks(self) -> set[str]:
        chunks: set[str] = set()
        for id in self._snapshot_ids():
            try:
                chunks |= self._chunks_of(id)
            except StorkError as e:
                if self._entry_exists(id):  # else it was forgotten meanwhile, and its chunks need no keeping
                    raise Refused(f"gc stopped before removing anything: {e} (the chunks of backup {id} cannot "
                                  f"be known: 'stork backup forget --damaged {id}' lets gc go on)") from e
        return chunks

    def _chunks_of(self, id: BackupId) -> set[str]:
        """What a snapshot names: every index file in its folder, whatever its state says; those
        its manifest names checked against it, where it can be read (a damaged manifest must not
        free the chunks of indexes that are sound, nor a flipped digest the chunk it meant)."""
        with self._snapshot_folder(id) as folder:
            try:
                manifest: Manifest | None = self._manifest(folder, id)
            except (Corrupt, NotFound, Refused):
                manifest = None  # damaged: every index file there counts, as it stands
            sealed = {index_file(key): manifest.files[index_file(key)] for key in manifest.disks} if manifest else {}
            # each one the manifest names present (a regular file: others are refused when read) and sealed by it
            if missing := sorted(set(sealed) - set(SafeDir.regular_files(folder))):
                raise NotFound(f"backup {id}: {missing[0]}: no such file")
            return self._indexed_chunks(folder, f"backup {id}: ", strict=True, sealed=sealed)

    def _sweep_chunks(self, marked: set[str], cutoff: float, bad_cutoff: float
                      ) -> tuple[int, int, int, int, int, int, float]:
        """(removed, bytes freed, kept, damaged removed, damaged restored, kept only for being
        newer than the cutoff, the newest of those's mtime) over every chunk folder."""
        totals = [0, 0, 0, 0, 0, 0]
        newest = 0.0
        try:
            with self._folder(CHUNKS) as folder, os.scandir(folder) as entries:
                prefixes = sorted(e.name for e in entries if _PREFIX.fullmatch(e.name))
        except NotFound:
            self._open_root_or_raise()
            return 0, 0, 0, 0, 0, 0, 0.0
        for prefix in prefixes:
            with self._prefix_locked(prefix, exclusive=True) as folder:
                *counts, latest = _sweep_prefix(folder, marked, cutoff, bad_cutoff, self._reads_sound)
                totals = [a + b for a, b in zip(totals, counts, strict=True)]
                newest = max(newest, latest)
        removed, freed, kept, bad, restored, recent = totals
        return removed, freed, kept, bad, restored, recent, newest

    def _reads_sound(self, folder: int, name: str, digest: str) -> bool:
        """Does the file `name` in the chunk folder read back as the chunk `digest`? (A chunk
        verify set aside for a read error that has passed: a soft NFS mount's timeout, say.)
        OSError where it cannot be read: the caller says what that means."""
        try:
            self.codec.decode(self._read(folder, name, self.chunk_size + _CODEC_OVERHEAD, digest), digest)
        except (Corrupt, NotFound, Refused):
            return False
        return True

    def status(self) -> tuple[int, int, int]:
        """(total, used, available) bytes of the file system holding the store."""
        self._open_root_or_raise()
        st = os.statvfs(self.root)
        total, avail = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return total, total - st.f_bfree * st.f_frsize, avail


def _length_problems(key: str, index: Index, lengths: dict[str, int]) -> Iterator[Problem]:
    """Chunks, each sound, that do not fit where the index puts them (a whole chunk or a patch's
    base not as long as its place, a patch's own chunk not as long as its runs): restore would
    refuse them."""
    for n, entry in enumerate(index.chunks):
        place = min(index.chunk_size, index.virtual_size - n * index.chunk_size)
        if isinstance(entry, str):
            expected: tuple[tuple[str | None, int], ...] = ((entry, place),)
        elif isinstance(entry, Patch):
            expected = ((entry.base, place), (entry.own, entry.own_size))
        else:
            continue
        for digest, expected_length in expected:
            if digest is not None and digest in lengths and lengths[digest] != expected_length:
                yield Problem(digest, f"chunk {digest}: {lengths[digest]} bytes where {expected_length} belong",
                              ((key, n * index.chunk_size),))


MEDIA_ERRORS = frozenset({errno.EIO, errno.EUCLEAN, errno.EBADMSG})  # data the file system cannot give back


def _is_damage(e: BaseException) -> bool:
    """Is the error a snapshot's own damage, not trouble that may pass? A file system's error
    only where the disk cannot give the data back (MEDIA_ERRORS)."""
    return not isinstance(e, OSError) or e.errno in MEDIA_ERRORS


def _why(e: BaseException) -> str:
    """Why a snapshot cannot be read, in one line (a file system's error names its file)."""
    if isinstance(e, OSError):
        return f"{e.filename or 'a file'}: {e.strerror or e}"
    return str(e)


def _not_a_folder(folder: int, name: str) -> str:
    """What is at `name` in `folder` where a folder belongs ("" for a folder or nothing)."""
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return ""
    return "" if stat.S_ISDIR(mode) else f"not a directory: it is {kind_of(mode)}"


def _is_vmid_name(name: str) -> bool:
    try:
        return str(names.vmid(name)) == name
    except InvalidName:
        return False


def _fresh_mtime(folder: int, name: str) -> float:
    """A chunk's mtime read on a fresh open: on NFS a stat may answer from attributes cached for
    up to a minute, so a touch by a writer on another node could go unseen; an open revalidates
    them with the server (close-to-open consistency). +inf where the file is gone."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return float("inf")
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def _sweep_prefix(folder: int, marked: set[str], cutoff: float, bad_cutoff: float,
                  reads_sound: Callable[[int, str, str], bool]) -> tuple[int, int, int, int, int, int, float]:
    """Remove the unmarked chunk files and temp files older than `cutoff`, and damaged chunks
    moved aside before `bad_cutoff`, from one chunk folder (whose exclusive lock the caller
    holds): (removed, bytes freed, kept, damaged removed, damaged restored, kept unmarked for
    being newer than `cutoff`, the newest such mtime). A damaged chunk that a backup names and
    that is not stored anew is read again first: where it reads back sound (its verify met a
    passing read error), it is put back, not removed."""
    removed = freed = kept = bad = restored = recent = 0
    newest = 0.0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)  # fetched now, under the lock
            if DIGEST_PATTERN.fullmatch(entry.name):
                if entry.name in marked:
                    kept += 1
                    continue
                mtime = st.st_mtime if st.st_mtime >= cutoff else _fresh_mtime(folder, entry.name)
                if mtime >= cutoff:  # no backup names it yet, but a writer may be about to
                    kept += 1
                    if mtime != float("inf"):  # (gone meanwhile: nothing to wait for)
                        recent, newest = recent + 1, max(newest, mtime)
                    continue
                removed, freed = removed + 1, freed + st.st_size
            elif entry.name.endswith(".bad") and DIGEST_PATTERN.fullmatch(digest := entry.name[:-4]):
                if st.st_mtime >= bad_cutoff:
                    continue
                if digest in marked and not SafeDir.entry_exists(folder, digest):
                    try:
                        sound = reads_sound(folder, entry.name, digest)
                    except OSError as e:
                        if e.errno not in MEDIA_ERRORS:
                            raise
                        continue  # it may read at the next gc: only a chunk that reads damaged goes
                    if sound:
                        os.rename(entry.name, digest, src_dir_fd=folder, dst_dir_fd=folder)
                        restored += 1
                        continue
                bad, freed = bad + 1, freed + st.st_size
            elif not (entry.name.endswith(".tmp") and st.st_mtime < cutoff):
                continue
            os.unlink(entry.name, dir_fd=folder)
    if removed or bad or restored:
        os.fsync(folder)
    return removed, freed, kept, bad, restored, recent, newest
