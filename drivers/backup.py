"""A volume into a chunk store, and back: the data path of backup and restore.

A backup reads the guest-visible data of any volume through qemu-nbd (drivers/nbd.py), or,
for an image made of files (raw, and qcow2 whose data is neither compressed, encrypted nor in
an external file), straight from the files at the host offsets `qemu-img map` gives for each
extent: what qemu-nbd would return, without a process and a socket in between. It reads
chunk by chunk of the store's chunk size: a
chunk that `qemu-img map` shows as known zeros is never read (its index entry is null); a
linked clone's chunk that holds nothing of the clone's own (every extent of it at depth >= 1,
read through its base) is taken from the base's index when the base was backed up, so only
the clone's own data is read. A clone that qemu sees as a plain image (a btrfs or ZFS
snapshot, an RBD clone) is read whole, and deduplication keeps what it shares with its base
out of the store. Hashing and compressing run in a thread pool (hashlib and zstandard release
the GIL) while the next chunk is read, with a bounded number of chunks in flight so memory
stays a few chunks.

A restore writes every non-null chunk, read back and checked against its digest, and skips
null ones where the target reads as zeros (a new file or thin volume), writing zeros only
where it does not (a thick LV). A missing or corrupt chunk stops it with the chunk named.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from drivers import nbd, qemu
from drivers.backuprecords import BaseRef, Index
from drivers.chunkstore import ChunkStore, SnapshotWriter
from drivers.errors import Corrupt, NotFound

Progress = Callable[[int, int], None]
THREADS = 2
CLUSTER = 64 << 10  # qcow2's default cluster: a linked clone restored writes no less
IN_FLIGHT = 6  # chunks read but not yet stored (or fetched but not yet written)


def _spans(size: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, size, chunk):
        yield start, min(chunk, size - start)


class RawFile:
    """A raw image file without backing, written at guest offsets directly (its bytes are the
    guest's): what qemu-nbd would do, without the socket in between."""

    def __init__(self, fd: int, label: str) -> None:
        self.fd, self.label = fd, label
        self.size = os.fstat(fd).st_size

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(self.fd, view, offset + len(data) - len(view)):]


class MappedFiles:
    """An image made of files, read through its map: an extent at depth d is read from the
    d-th file of the backing chain at the extent's host offset, and one qemu knows to be
    zeros is not read at all."""

    def __init__(self, fds: list[int], extents: list[nbd.Extent], label: str) -> None:
        self.fds, self.extents, self.label = fds, extents, label
        self.starts = [e.start for e in extents]
        self.size = extents[-1].start + extents[-1].length if extents else 0

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        view, end = memoryview(out), offset + length
        n = max(bisect_right(self.starts, offset) - 1, 0)
        while n < len(self.extents) and self.extents[n].start < end:
            e = self.extents[n]
            lo, hi = max(e.start, offset), min(e.start + e.length, end)
            if not e.zero and hi > lo:
                assert e.offset is not None  # readable() admits no other extent
                self._read_into(self.fds[e.depth], view[lo - offset:hi - offset], e.offset + lo - e.start)
            n += 1
        return bytes(out)

    def _read_into(self, fd: int, into: memoryview, at: int) -> None:
        while into:
            got = os.preadv(fd, [into], at)
            if not got:
                raise nbd.NbdError(f"{self.label}: a file of it ends at byte {at}")
            into, at = into[got:], at + got


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
        yield MappedFiles(fds, extents, image.label)
    else:
        with nbd.served(image) as client:
            yield client


@contextmanager
def _writing(image: qemu.Image) -> Iterator[RawFile | nbd.Client]:
    """Guest data to write: a raw file directly, anything else through qemu-nbd. The caller
    (the driver's image()) flushes a written file when it closes it."""
    if image.fmt == "raw" and image.backing is None and image.is_file:
        yield RawFile(image.fds[0], image.label)
    else:
        with nbd.served(image, write=True) as client:
            yield client


def chunk_plan(extents: list[nbd.Extent], size: int, chunk: int) -> list[str]:
    """What to do with each chunk: "zero" (known zeros only), "base" (nothing of the image's
    own: read through its base), or "read". A pure function of the map, which must cover the
    image from 0 without a gap (qemu-img's does); an area qemu does not know to be zero
    (`"data": false, "zero": false`) is read."""
    plan = []
    for here in _per_chunk(extents, size, chunk):
        if all(e.zero for e in here):
            plan.append("zero")
        elif all(e.depth > 0 for e in here):
            plan.append("base")
        else:
            plan.append("read")
    return plan


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


def find_base(store: ChunkStore, volid: str, identity: str) -> tuple[BaseRef, Index] | None:
    """The newest backed-up disk read from this very volume (its id and identity token both
    match: a base freed and made again under its name is another volume), with its index."""
    for snap in sorted(store.snapshots(), key=lambda s: s.id.time_text, reverse=True):
        for key, disk in snap.manifest.disks.items():
            if disk.source == volid and disk.identity == identity:
                index = store.index(str(snap.id), key)
                return BaseRef(str(snap.id), key, index.content), index
    return None


def clean_chunks(dirty: list[nbd.Extent], size: int, chunk: int) -> list[bool]:
    """Per chunk, whether a dirty bitmap shows it unwritten since the bitmap was added (every
    extent of it `"data": true`, qemu's way of saying clean). A pure function of the map."""
    return [all(e.data for e in here) for here in _per_chunk(dirty, size, chunk)]


def sources(plan: list[str], base: Index | None, previous: Index | None, clean: list[bool] | None,
            chunk: int, size: int) -> list[Index | None]:
    """Per chunk, the earlier index whose entry stands for it (a clone's base's, where the
    chunk is all the base's; the same disk's previous backup's, where its dirty bitmap shows
    the chunk unwritten since), or None: read it (or nothing to read, for "zero")."""
    usable_base = base if base and base.chunk_size == chunk else None
    usable_previous = previous if previous and clean and previous.chunk_size == chunk and \
        previous.virtual_size == size and len(clean) == len(plan) else None
    found: list[Index | None] = []
    for n, what in enumerate(plan):
        if what == "zero":
            found.append(None)
        elif usable_previous and clean and clean[n]:
            found.append(usable_previous)
        elif what == "base" and usable_base and n < len(usable_base.chunks):
            found.append(usable_base)
        else:
            found.append(None)
    return found


def back_up(image: qemu.Image, fmt: str, writer: SnapshotWriter, base: BaseRef | None = None,
            base_index: Index | None = None, progress: Progress | None = None, previous: Index | None = None,
            dirty: list[nbd.Extent] | None = None) -> Index:
    """Read `image` into the writer's store; its index (not yet added to the writer). With the
    previous backup of this disk and the extents of a dirty bitmap added at that backup, only
    chunks written since are read."""
    chunk = writer.store.chunk_size
    mapped = nbd.extents(image)
    size = max((e.start + e.length for e in mapped), default=0)
    plan = chunk_plan(mapped, size, chunk)
    clean = clean_chunks(dirty, size, chunk) if dirty is not None else None
    taken_from = sources(plan, base_index, previous, clean, chunk, size)
    digests: list[str | None] = [None] * len(plan)
    with _reading(image, mapped) as client, ThreadPoolExecutor(THREADS) as pool:
        if client.size != size:
            raise nbd.NbdError(f"{image.label}: {client.size} bytes to read, qemu-img maps {size}")
        flying: deque[tuple[int, Future[tuple[str | None, int]]]] = deque()
        done = 0
        for n, ((start, length), what) in enumerate(zip(_spans(size, chunk), plan, strict=True)):
            earlier = taken_from[n]
            taken = earlier.chunks[n] if earlier else None
            if earlier and (taken is None or writer.reuse_chunk(taken)):
                digests[n] = taken
            elif what != "zero":  # read it (also where the earlier chunk is gone from the store)
                flying.append((n, pool.submit(writer.put_chunk, client.read(start, length))))
                while len(flying) >= IN_FLIGHT:
                    k, future = flying.popleft()
                    digests[k] = future.result()[0]
            done += length
            if progress:
                progress(done, size)
        for k, future in flying:
            digests[k] = future.result()[0]
    return Index(format=fmt, virtual_size=size, chunks=digests, chunk_size=chunk, base=base)


def restore(store: ChunkStore, index: Index, image: qemu.Image, reads_zero: bool,
            progress: Progress | None = None, base: Index | None = None) -> None:
    """Write the index's data into `image` (as big as the index says), flushed at the end.
    With `base`, the image is a linked clone of the volume that index was read from: only the
    chunks that differ from it are written, zeros too (the clone reads the base elsewhere).
    Every write is a whole chunk, so a restore redone after a crash needs no fresh target."""
    zero = bytes(index.chunk_size)
    if base is not None and (base.chunk_size, base.virtual_size) != (index.chunk_size, index.virtual_size):
        raise nbd.NbdError(f"{image.label}: the base's backup has another size or chunk size")
    with _writing(image) as client, ThreadPoolExecutor(THREADS) as pool:
        if client.size < index.virtual_size:
            raise nbd.NbdError(f"{image.label}: {client.size} bytes, the backup holds {index.virtual_size}")
        flying: deque[tuple[int, int, Future[tuple[bytes, bytes | None]]]] = deque()
        done = 0

        def fetch(digest: str | None, under: str | None, length: int) -> tuple[bytes, bytes | None]:
            """The chunk's data and, on a linked clone, the base's data at its place (None: write
            the whole chunk, also where the base's chunk is gone from the store or damaged)."""
            data = store.read_chunk(digest) if digest else zero[:length]
            if base is None or under is None:
                return data, None if base is None else zero[:length]
            try:
                return data, store.read_chunk(under)
            except (NotFound, Corrupt):
                return data, None

        def write_oldest() -> None:
            nonlocal done
            start, length, future = flying.popleft()
            data, beneath = future.result()
            if len(data) != length:
                raise nbd.NbdError(f"{image.label}: a chunk of {len(data)} bytes where {length} belong")
            if beneath is None:
                client.write(start, data)
            else:  # only the clusters that differ from the base: the clone stays thin
                for at in range(0, length, CLUSTER):
                    if data[at:at + CLUSTER] != beneath[at:at + CLUSTER]:
                        client.write(start + at, data[at:at + CLUSTER])
            done += length
            if progress:
                progress(done, index.virtual_size)

        for n, ((start, length), digest) in enumerate(zip(_spans(index.virtual_size, index.chunk_size),
                                                          index.chunks, strict=True)):
            if base is not None and base.chunks[n] == digest:
                done += length  # the clone reads it from its base
                continue
            if digest is None and base is None:
                if not reads_zero:
                    client.write(start, zero[:length])
                done += length
                continue
            under = base.chunks[n] if base is not None else None
            flying.append((start, length, pool.submit(fetch, digest, under, length)))
            if len(flying) >= IN_FLIGHT:
                write_oldest()
        while flying:
            write_oldest()
