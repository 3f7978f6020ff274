"""A volume into a chunk store, and back: the data path of backup and restore.

A backup reads the guest-visible data of any volume through qemu-nbd (drivers/nbd.py), or,
for an image made of files (raw, and qcow2 whose data is neither compressed, encrypted nor in
an external file), straight from the files at the host offsets `qemu-img map` gives for each
extent: what qemu-nbd would return, without a process and a socket in between. It goes
chunk by chunk of the store's chunk size and reads the least it can (decide()): a chunk
that `qemu-img map` shows as known zeros is never read (its index entry is null); a linked
clone's chunk that holds nothing of the clone's own (every extent at depth >= 1) is the
base's entry, when the base was backed up, and one with a little of the clone's own is a
patch: those runs alone, stored over the base's chunk. With a dirty bitmap, a chunk not
written since the previous backup is that backup's entry, and a written one a patch of what
was written. A clone that qemu sees as a plain image (a btrfs or ZFS snapshot, an RBD
clone) is read whole, and deduplication keeps what it shares with its base out of the store.
Hashing and compressing run in a thread pool (hashlib and zstandard release the GIL) while
the next chunk is read, with a bounded number of chunks in flight so memory stays a few
chunks. Files are read, and a restored raw file written, past the page cache where the file
system allows (MappedFiles, RawFile): gigabytes read or written once need no cache.

A restore writes every non-null chunk (a patch laid over its chunk), read back and checked
against its digest, and skips null ones where the target reads as zeros (a new file or thin
volume), writing zeros only where it does not (a thick LV). A missing or corrupt chunk stops
it with the chunk named.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate

from drivers import nbd, qemu
from drivers.backup.records import BaseRef, Entry, Index, Patch, Snapshot, entry_digests
from drivers.backup.store import ChunkStore, SnapshotWriter
from drivers.errors import Corrupt, NotFound

Progress = Callable[[int, int], None]
# one thread per core hashes and compresses (or decodes); beyond 8 the reading loop, which holds
# the GIL, and the disk bound it, while memory grows with the chunks in flight
THREADS = max(2, min(os.cpu_count() or 2, 8))
CLUSTER = 64 << 10  # qcow2's default cluster: a linked clone restored writes no less
IN_FLIGHT = THREADS + 4  # chunks read but not yet stored (or fetched but not yet written): a few MiB each
WRITEBACK_EVERY = 128 << 20  # a restore into a file starts its writeback after this many bytes
PATCH_SHARE = 0.5  # a chunk whose new runs cover at most this share of it is stored as a patch


def _spans(size: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, size, chunk):
        yield start, min(chunk, size - start)


class RawFile:
    """A raw image file without backing, written at guest offsets directly (its bytes are the
    guest's): what qemu-nbd would do, without the socket in between.

    Whole aligned blocks go to the disk directly (O_DIRECT, through a page-aligned buffer of
    its own), the rest through the page cache, written back as it goes (see _Writeback). A
    restore writes gigabytes once: through the page cache each new page is a copy and, on a
    virtual machine whose host takes back freed memory, a fault in the host too (measured
    here: 5 s of kernel time for 1.2 GiB, 0.1 s direct), and the host's cache is flushed out
    by data nobody reads soon. A file system without direct I/O gets every write buffered.
    Not thread-safe: one writer. The caller (the driver's image()) flushes the file."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd, self.label = fd, label
        self.size = os.fstat(fd).st_size
        self.direct = qemu.reopen_direct(fd, write=True)
        self._aligned: mmap.mmap | None = None  # made at the first direct write; unmapped when collected
        self._writeback = _Writeback(fd)

    def write(self, offset: int, data: bytes) -> None:
        if self.direct is not None and offset % _ALIGN == 0 and len(data) % _ALIGN == 0:
            try:
                self._write_direct(offset, memoryview(data))
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._stop_direct()  # a block size above _ALIGN, or no direct I/O after all
        _write_all(self.fd, memoryview(data), offset)
        self._writeback.wrote(len(data))

    def _write_direct(self, offset: int, view: memoryview) -> None:
        assert self.direct is not None
        if self._aligned is None:
            self._aligned = mmap.mmap(-1, _DIRECT_BUFFER)
        with memoryview(self._aligned) as aligned:
            for at in range(0, len(view), _DIRECT_BUFFER):
                piece = view[at:at + _DIRECT_BUFFER]
                aligned[:len(piece)] = piece
                _write_all(self.direct, aligned[:len(piece)], offset + at)

    def _stop_direct(self) -> None:
        if self.direct is not None:
            direct, self.direct = self.direct, None
            os.close(direct)

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        # the buffer is not closed here: a failed write's traceback may still hold a view of it
        # (closing would raise BufferError over the write's own error); it goes with this object
        try:
            self._stop_direct()
        finally:
            self._writeback.close(failed=exc[0] is not None)


_ALIGN = qemu.DIRECT_ALIGN
_DIRECT_BUFFER = 4 << 20  # a chunk of the store's default size: one copy, one write


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class MappedFiles:
    """An image made of files, read through its map: an extent at depth d is read from the
    d-th file of the backing chain at the extent's host offset, and one qemu knows to be
    zeros is not read at all.

    Each file is read past the page cache where it takes it (O_DIRECT, rounded out to whole
    pages, through a page-aligned buffer), as RawFile writes: a nightly backup reads data
    nobody has read lately, and through the cache every page is a new one (measured here, a
    2 GiB disk not in the cache: 4.2-5.2 s buffered, 0.5-0.8 s direct). Dirty pages of the
    range are written back by the kernel before a direct read, so it reads what a buffered
    one would. One reader at a time."""

    def __init__(self, fds: list[int], extents: list[nbd.Extent], label: str) -> None:
        self.fds, self.extents, self.label = fds, extents, label
        self.starts = [e.start for e in extents]
        self.size = extents[-1].start + extents[-1].length if extents else 0
        self.direct = [qemu.reopen_direct(fd, write=False) for fd in fds]
        self._aligned: mmap.mmap | None = None  # made at the first direct read; unmapped when collected

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        view, end = memoryview(out), offset + length
        n = max(bisect_right(self.starts, offset) - 1, 0)
        while n < len(self.extents) and self.extents[n].start < end:
            e = self.extents[n]
            lo, hi = max(e.start, offset), min(e.start + e.length, end)
            if not e.zero and hi > lo:
                assert e.offset is not None  # readable() admits no other extent
                self._read_into(e.depth, view[lo - offset:hi - offset], e.offset + lo - e.start)
            n += 1
        return bytes(out)

    def _read_into(self, depth: int, into: memoryview, at: int) -> None:
        if (direct := self.direct[depth]) is not None:
            try:
                into, at = self._read_direct(direct, into, at)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct[depth] = None  # a block larger than a page: buffered from now on
                os.close(direct)
        while into:  # buffered: all of it, or what a direct read came back short of
            got = os.preadv(self.fds[depth], [into], at)
            if not got:
                raise nbd.NbdError(f"{self.label}: a file of it ends at byte {at}")
            into, at = into[got:], at + got

    def _read_direct(self, fd: int, into: memoryview, at: int) -> tuple[memoryview, int]:
        """Read what it can direct; what is left (at the file's end, or after a short read)."""
        if self._aligned is None:
            self._aligned = mmap.mmap(-1, _DIRECT_BUFFER)
        with memoryview(self._aligned) as aligned:
            while into:
                start = at - at % _ALIGN
                span = min(_DIRECT_BUFFER, -(-(at + len(into) - start) // _ALIGN) * _ALIGN)
                got = os.preadv(fd, [aligned[:span]], start) - (at - start)
                if got <= 0:
                    break
                n = min(got, len(into))
                into[:n] = aligned[at - start:at - start + n]
                into, at = into[n:], at + n
        return into, at

    def close(self) -> None:
        for n, fd in enumerate(self.direct):
            if fd is not None:
                self.direct[n] = None
                os.close(fd)

    def __enter__(self) -> MappedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def readable(image: qemu.Image, extents: list[nbd.Extent]) -> list[int] | None:
    """The descriptors of the image's files, top first, if every extent can be read from them
    at its host offset (a file chain of raw and plain qcow2, every extent zeros or data with an
    offset in a file of the chain); None: read it through qemu-nbd."""
    fds: list[int] = []
    layer: qemu.Image | None = image
    while layer is not None:
        if layer.fmt not in ("raw", "qcow2") or not layer.is_file:
            return None
        if layer.fmt == "qcow2":
            header = qemu.read_qcow2_header(layer.fds[0])
            if header is None or header.external_data_file or header.encrypted:
                return None
        fds.append(layer.fds[0])
        layer = layer.backing if layer.fmt == "qcow2" else None
    if all(e.zero or (e.data and e.offset is not None and e.depth < len(fds)) for e in extents):
        return fds
    return None


@contextmanager
def _reading(image: qemu.Image, extents: list[nbd.Extent]) -> Iterator[MappedFiles | nbd.Client]:
    """Guest data to read: from the image's files where its map allows, else through qemu-nbd."""
    if (fds := readable(image, extents)) is not None:
        with MappedFiles(fds, extents, image.label) as files:
            yield files
    else:
        with nbd.served(image) as client:
            yield client


@contextmanager
def _writing(image: qemu.Image) -> Iterator[RawFile | nbd.Client]:
    """Guest data to write: a raw file directly, anything else through qemu-nbd. The caller
    (the driver's image()) flushes a written file when it closes it."""
    if image.fmt == "raw" and image.backing is None and image.is_file:
        with RawFile(image.fds[0], image.label) as raw:
            yield raw
    else:
        with nbd.served(image, write=True) as client:
            yield client


def chunk_plan(extents: list[nbd.Extent], size: int, chunk: int, own: list[Runs] | None = None) -> list[str]:
    """What to do with each chunk: "zero" (known zeros only), "base" (nothing of the image's
    own: read through its base), "patch" (some of the image's own beside its base's data:
    decide() stores the own runs alone, if they are few enough), or "read". A pure
    function of the map, which must cover the image from 0 without a gap (qemu-img's does);
    an area qemu does not know to be zero (`"data": false, "zero": false`) is read. `own` is
    own_runs() of the same map, where the caller has it already."""
    plan = []
    own = own if own is not None else own_runs(extents, size, chunk)
    for here, runs in zip(_per_chunk(extents, size, chunk), own, strict=True):
        if all(e.zero for e in here):
            plan.append("zero")
        elif not runs:
            plan.append("base")
        elif any(e.depth > 0 for e in here):
            plan.append("patch")
        else:
            plan.append("read")
    return plan


Runs = tuple[tuple[int, int], ...]  # areas of a chunk: (offset in it, length), ascending, disjoint


def own_runs(extents: list[nbd.Extent], size: int, chunk: int) -> list[Runs]:
    """Per chunk, the areas that are the image's own (depth 0: data or zeros it wrote)."""
    return _runs_where(extents, size, chunk, lambda e: e.depth == 0)


def dirty_runs(dirty: list[nbd.Extent], size: int, chunk: int) -> list[Runs]:
    """Per chunk, the areas a dirty bitmap shows written since it was added (qemu reports them
    `"data": false` when a bitmap stands in for block status)."""
    return _runs_where(dirty, size, chunk, lambda e: not e.data)


def _runs_where(extents: list[nbd.Extent], size: int, chunk: int, pick: Callable[[nbd.Extent], bool]) -> list[Runs]:
    """Per chunk, the areas of the extents `pick` accepts, adjacent ones merged. Pure."""
    found = []
    for (start, length), here in zip(_spans(size, chunk), _per_chunk(extents, size, chunk), strict=True):
        picked = [(max(e.start, start) - start, min(e.start + e.length, start + length) - max(e.start, start))
                  for e in here if pick(e)]
        found.append(tuple(_merged([], picked)))
    return found


def _merged(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two run lists, touching runs joined."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted([*a, *b]):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], offset + length) - out[-1][0])
        else:
            out.append((offset, length))
    return out


def _per_chunk(extents: list[nbd.Extent], size: int, chunk: int) -> Iterator[list[nbd.Extent]]:
    """The extents each chunk overlaps, in chunk order, of a map that must cover the image
    from 0 without a gap or an overlap (qemu-img's does)."""
    at = 0
    for e in extents:
        if e.start != at or e.length <= 0:
            raise nbd.NbdError(f"qemu-img map has a gap or an overlap at byte {at}")
        at += e.length
    if at != size:
        raise nbd.NbdError(f"qemu-img map covers {at} bytes of {size}")
    it, pending = iter(extents), []
    for start, length in _spans(size, chunk):
        end = start + length
        pending = [e for e in pending if e.start + e.length > start]
        while (current := next(it, None)) is not None:
            pending.append(current)
            if current.start + current.length >= end:
                break
        yield [e for e in pending if e.start < end and e.start + e.length > start]


def find_base(store: ChunkStore, snapshots: list[Snapshot], volid: str, identity: str) -> tuple[BaseRef, Index] | None:
    """The newest of the store's `snapshots` (listed once by the caller: listing reads every
    manifest) holding a disk read from this very volume (its id and identity token both match:
    a base freed and made again under its name is another volume), with that disk's index."""
    for snap in sorted(snapshots, key=lambda s: s.id.time_text, reverse=True):
        for key, disk in snap.manifest.disks.items():
            if disk.source == volid and disk.identity == identity:
                index = store.index(str(snap.id), key)
                return BaseRef(str(snap.id), key, index.content), index
    return None


_NONE = object()  # no entry at all (None is an entry: zeros)


@dataclass(frozen=True)
class Action:
    """What a backup does with one chunk: "zero" (nothing: known zeros), "take" (an earlier
    backup's entry stands for it), "patch" (read `runs` alone and store them over `entry`, a
    whole chunk of an earlier backup) or "read" (the whole chunk)."""

    kind: str
    entry: Entry = None
    runs: Runs = ()


def decide(plan: list[str], own: list[Runs], base: Index | None, previous: Index | None,
           dirty: list[Runs] | None, chunk: int, size: int) -> list[Action]:
    """Per chunk, the least a backup must read. With the disk's previous backup and what its
    dirty bitmap shows written since: a clean chunk is the previous entry, a written one a
    patch of the written runs over the previous chunk (a previous patch's runs joined in, over
    its own base chunk: a patch never lies over a patch). A linked clone's chunk that is all
    its base's is the base's entry, and one that is a little of its own a patch of those runs
    over the base's chunk. A patch covers at most PATCH_SHARE of its chunk; anything else is
    read whole. A pure function of the maps and the earlier indexes."""
    usable_base = base if base and base.chunk_size == chunk else None
    usable_previous = previous if previous and dirty is not None and previous.chunk_size == chunk and \
        previous.virtual_size == size and len(dirty) == len(plan) else None
    actions = []
    for n, what in enumerate(plan):
        if what == "zero":
            actions.append(Action("zero"))
            continue
        length = min(chunk, size - n * chunk)
        candidates: list[Action] = []
        if usable_previous and dirty is not None:
            before = usable_previous.chunks[n]
            if not dirty[n]:
                candidates.append(Action("take", before))
            elif isinstance(before, Patch):
                candidates.append(Action("patch", before.base, tuple(_merged(before.runs, dirty[n]))))
            else:
                candidates.append(Action("patch", before, dirty[n]))
        # the base's chunk here only if it is as long (a clone grown past its base reads the rest)
        beneath = usable_base.chunks[n] if usable_base and n < len(usable_base.chunks) and \
            min(chunk, usable_base.virtual_size - n * chunk) == length else _NONE
        if beneath is not _NONE and what == "base":
            candidates.append(Action("take", beneath))
        elif beneath is not _NONE and what == "patch" and not isinstance(beneath, Patch):
            candidates.append(Action("patch", beneath, own[n]))
        actions.append(next((a for a in candidates if a.kind == "take" or
                             sum(k for _, k in a.runs) <= length * PATCH_SHARE), Action("read")))
    return actions


@functools.cache
def _keep_chunk_buffers() -> None:
    """glibc serves each chunk-sized buffer (4 MiB read, compressed, sealed, decoded) from an
    mmap of its own and unmaps it when freed, so every buffer is faulted in page by page anew:
    measured here, 1.4 s of kernel time in a 2 GiB encrypted backup (4.1 s -> 3.1 s without).
    Buffers below 32 MiB come from the heap instead, which keeps up to 128 MiB it could give
    back. Process-wide and once; nothing to do off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def back_up(image: qemu.Image, fmt: str, writer: SnapshotWriter, base: BaseRef | None = None,
            base_index: Index | None = None, progress: Progress | None = None, previous: Index | None = None,
            dirty: list[nbd.Extent] | None = None) -> Index:
    """Read `image` into the writer's store; its index (not yet added to the writer). With the
    previous backup of this disk and the extents of a dirty bitmap added at that backup, only
    what was written since is read (see decide())."""
    _keep_chunk_buffers()
    chunk = writer.store.chunk_size
    mapped = nbd.extents(image)
    size = max((e.start + e.length for e in mapped), default=0)
    own = own_runs(mapped, size, chunk)
    plan = chunk_plan(mapped, size, chunk, own)
    actions = decide(plan, own, base_index, previous,
                     dirty_runs(dirty, size, chunk) if dirty is not None else None, chunk, size)
    entries: list[Entry] = [None] * len(plan)
    with _reading(image, mapped) as client, ThreadPoolExecutor(THREADS) as pool:
        if client.size != size:
            raise nbd.NbdError(f"{image.label}: {client.size} bytes to read, qemu-img maps {size}")
        flying: deque[tuple[int, Future[Entry]]] = deque()
        done = 0
        for n, ((start, length), action) in enumerate(zip(_spans(size, chunk), actions, strict=True)):
            if action.kind == "take" and _reused(writer, action.entry):
                entries[n] = action.entry
            elif action.kind == "patch" and _reused(writer, action.entry):
                assert not isinstance(action.entry, Patch)  # decide() lays a patch over a whole chunk only
                own = b"".join(client.read(start + at, k) for at, k in action.runs)
                flying.append((n, pool.submit(_put_patch, writer, action.entry, action.runs, own)))
            elif action.kind != "zero":  # read it (also where an earlier chunk is gone from the store)
                flying.append((n, pool.submit(_put_whole, writer, client.read(start, length))))
            while len(flying) >= IN_FLIGHT:
                k, future = flying.popleft()
                entries[k] = future.result()
            done += length
            if progress:
                progress(done, size)
        for k, future in flying:
            entries[k] = future.result()
    return Index(format=fmt, virtual_size=size, chunks=entries, chunk_size=chunk, base=base)


class _Writeback:
    """Starts writing a file's buffered writes back to disk while the writing goes on: an
    fdatasync in a thread of its own, one at a time, at most every WRITEBACK_EVERY bytes
    written, so the disk works while chunks are decompressed and the caller's final fsync (the
    durability promise) finds little left; the pages written back are then dropped from the
    cache, to be used again for the next ones. The kernel would start only at its dirty
    threshold, a share of RAM, or after 30 s."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pool: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None
        self.unflushed = 0

    def wrote(self, n: int) -> None:
        self.unflushed += n
        if self.unflushed >= WRITEBACK_EVERY and (self.pending is None or self.pending.done()):
            if self.pending is not None:
                self.pending.result()  # an error writing back fails the restore
            self.pool = self.pool or ThreadPoolExecutor(1)
            self.pending, self.unflushed = self.pool.submit(self._write_back), 0

    def _write_back(self) -> None:
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages only: a dirty one stays

    def close(self, failed: bool) -> None:
        if self.pool:
            self.pool.shutdown(wait=True)
        if self.pending is not None and not failed:
            self.pending.result()


def _reused(writer: SnapshotWriter, entry: Entry) -> bool:
    """Name an earlier entry's chunks in this backup; False if one is gone from the store."""
    return all(writer.reuse_chunk(d) for d in entry_digests(entry))


def _put_whole(writer: SnapshotWriter, data: bytes) -> Entry:
    return writer.put_chunk(data)[0]


def _put_patch(writer: SnapshotWriter, under: str | None, runs: Runs, own: bytes) -> Entry:
    digest = writer.put_chunk(own)[0]
    return None if under is None and digest is None else Patch(under, digest, runs)  # zeros over zeros


class Chunks:
    """The data of index entries, read back from the store and checked: a chunk, zeros, or a
    patch laid over its base chunk. `label` names what is read in errors."""

    def __init__(self, store: ChunkStore, chunk_size: int, label: str) -> None:
        self.store, self.zero, self.label = store, bytes(chunk_size), label

    def own_of(self, patch: Patch) -> bytes:
        """A patch's own bytes, read back and checked against its runs."""
        own = self.store.read_chunk(patch.own) if patch.own else bytes(patch.own_size)
        if len(own) != patch.own_size:
            raise Corrupt(f"{self.label}: a patch of {patch.own_size} bytes names a chunk of {len(own)}")
        return own

    def data_of(self, entry: Entry, length: int) -> bytes:
        """An entry's chunk data (`length` bytes: the last chunk of a disk may be short)."""
        if entry is None:
            return self.zero[:length]
        if isinstance(entry, str):
            data = self.store.read_chunk(entry)
        else:
            try:
                data = entry.apply(self.data_of(entry.base, length), self.own_of(entry))
            except ValueError as e:
                raise Corrupt(f"{self.label}: a patch over chunk {entry.base or 'zero'}: {e}") from None
        if len(data) != length:  # damage, as verify calls it: a relinked restore writes around it
            raise Corrupt(f"{self.label}: a chunk of {len(data)} bytes where {length} belong")
        return data


class DiskReader:
    """A backed-up disk read at any offset, as its guest saw it, straight from the store (the
    last few chunks kept decoded: reads come in runs)."""

    KEPT = 8

    def __init__(self, store: ChunkStore, index: Index, label: str) -> None:
        self.index, self.size = index, index.virtual_size
        self.chunks = Chunks(store, index.chunk_size, label)
        self._kept: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside a disk of {self.size} bytes")
        out, cs = bytearray(), self.index.chunk_size
        while length:
            n, at = divmod(offset, cs)
            piece = self._chunk(n)[at:at + length]
            out += piece
            offset, length = offset + len(piece), length - len(piece)
        return bytes(out)

    def _chunk(self, n: int) -> bytes:
        with self._lock:
            if (data := self._kept.get(n)) is not None:
                return data
        cs = self.index.chunk_size
        data = self.chunks.data_of(self.index.chunks[n], min(cs, self.size - n * cs))
        with self._lock:
            self._kept[n] = data
            while len(self._kept) > self.KEPT:
                del self._kept[next(iter(self._kept))]
        return data


def restore(store: ChunkStore, index: Index, image: qemu.Image, reads_zero: bool,
            progress: Progress | None = None, base: Index | None = None) -> None:
    """Write the index's data into `image` (as big as the index says), flushed at the end
    through qemu-nbd (a raw file is flushed by its caller, the driver's image()).
    With `base`, the image is a linked clone of the volume that index was read from: only
    what differs from it is written, zeros too (the clone reads the base elsewhere): a patch
    over the base's very chunk writes its runs alone, any other chunk the clusters that
    differ. Each chunk's writes are the same however often they are made, so a restore
    redone after a crash needs no fresh target."""
    if base is not None and (base.chunk_size, base.virtual_size) != (index.chunk_size, index.virtual_size):
        raise nbd.NbdError(f"{image.label}: the base's backup has another size or chunk size")
    _keep_chunk_buffers()
    chunks = Chunks(store, index.chunk_size, image.label)
    own_of, data_of = chunks.own_of, chunks.data_of

    def writes(n: int, entry: Entry, length: int) -> list[tuple[int, bytes]]:
        """What chunk n needs written, as (offset in the chunk, bytes)."""
        if base is None:
            return [(0, data_of(entry, length))]
        under = base.chunks[n]
        if isinstance(entry, Patch) and entry.base == under:  # only the runs: the base is beneath
            own = own_of(entry)
            starts = accumulate((k for _, k in entry.runs), initial=0)
            return [(at, own[s:s + k]) for (at, k), s in zip(entry.runs, starts, strict=False)]
        data = data_of(entry, length)
        try:
            beneath = data_of(under, length)
        except (NotFound, Corrupt):  # the base's backup lost it: write the whole chunk
            return [(0, data)]
        return [(at, data[at:at + CLUSTER]) for at in range(0, length, CLUSTER)
                if data[at:at + CLUSTER] != beneath[at:at + CLUSTER]]

    with _writing(image) as client, ThreadPoolExecutor(THREADS) as pool:
        if client.size < index.virtual_size:
            raise nbd.NbdError(f"{image.label}: {client.size} bytes, the backup holds {index.virtual_size}")
        flying: deque[tuple[int, int, Future[list[tuple[int, bytes]]]]] = deque()
        done = 0

        def write_oldest() -> None:
            nonlocal done
            start, length, future = flying.popleft()
            for at, piece in future.result():
                client.write(start + at, piece)
            done += length
            if progress:
                progress(done, index.virtual_size)

        for n, ((start, length), entry) in enumerate(zip(_spans(index.virtual_size, index.chunk_size),
                                                         index.chunks, strict=True)):
            if base is not None and base.chunks[n] == entry:
                done += length  # the clone reads it from its base
                continue
            if entry is None and base is None:
                if not reads_zero:
                    client.write(start, chunks.zero[:length])
                done += length
                continue
            flying.append((start, length, pool.submit(writes, n, entry, length)))
            if len(flying) >= IN_FLIGHT:
                write_oldest()
        while flying:
            write_oldest()
