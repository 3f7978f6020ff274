"""The data path of backup and restore (drivers/backup/datapath.py) on real images: qemu-img made
raw and qcow2 volumes on a dir storage, read through a real qemu-nbd into a real chunk store
and written back, compared with `qemu-img compare`."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from drivers import driver_for, qemu
from drivers.backends.dir import DirDriver
from drivers.backup.datapath import (
    Action,
    MappedFiles,
    RawFile,
    back_up,
    chunk_plan,
    decide,
    dirty_runs,
    own_runs,
    readable,
    restore,
)
from drivers.backup.records import BaseRef, Index, Patch
from drivers.backup.store import ChunkStore
from drivers.errors import Corrupt
from drivers.names import VolName
from drivers.nbd import Extent, NbdError, extents, served
from drivers.storage import StorageConfig
from tests.helpers import fill, qemu_io_write, resident_pages, tmpfs
from worker.testing import ROOT, wait_for

MIB = 1 << 20
CHUNK = MIB  # small chunks keep the images small


def test_chunk_plan_refuses_a_map_with_a_gap():
    with pytest.raises(NbdError, match="gap or an overlap at byte 1048576"):
        chunk_plan([Extent(0, MIB, True, False, 0), Extent(2 * MIB, 2 * MIB, True, False, 0)], 4 * MIB, MIB)
    with pytest.raises(NbdError, match="covers 1048576 bytes of 4194304"):
        chunk_plan([Extent(0, MIB, True, False, 0)], 4 * MIB, MIB)


@pytest.mark.parametrize(
    ("extents", "plan"),
    [
        pytest.param([(0, 4, True, False, 0)], ["read"] * 4, id="all data"),
        pytest.param([(0, 4, False, True, 0)], ["zero"] * 4, id="all zeros"),
        pytest.param([(0, 1, False, True, 0), (1, 3, True, False, 0)], ["zero", "read", "read", "read"], id="a hole"),
        pytest.param([(0, 1, False, False, 0), (1, 3, True, False, 0)], ["read"] * 4,
                     id="an area not known to be zero is read"),
        pytest.param([(0, 4, True, False, 1)], ["base"] * 4, id="a clone reading its base only"),
        pytest.param([(0, 1, True, False, 1), (1, 1, False, True, 0), (2, 2, True, False, 1)],
                     ["base", "zero", "base", "base"], id="a clone's own zeros over base data are zeros"),
        pytest.param([(0, 0.5, True, False, 1), (0.5, 3.5, True, False, 0)], ["patch", "read", "read", "read"],
                     id="a chunk half the clone's own is a patch, all its own is read"),
        pytest.param([(0, 0.25, True, False, 1), (0.25, 0.75, True, False, 0)], ["patch", "zero", "zero", "zero"],
                     id="a chunk mostly the clone's own: decide() reads it whole"),
        pytest.param([(0, 0.5, False, True, 0), (0.5, 3.5, True, False, 1)], ["patch", "base", "base", "base"],
                     id="own zeros beside base data: a patch"),
        pytest.param([(0, 2.5, True, False, 0), (2.5, 1.5, False, True, 0)], ["read", "read", "read", "zero"],
                     id="an extent ending inside a chunk"),
    ],
)
def test_chunk_plan_reads_only_what_holds_the_images_own_data(extents, plan):
    mapped = [Extent(int(s * CHUNK), int(n * CHUNK), data, zero, depth) for s, n, data, zero, depth in extents]
    if sum(n for _, n, *_ in extents) < 4:  # the rest of the image: zeros of the base
        end = int(sum(n for _, n, *_ in extents) * CHUNK)
        mapped.append(Extent(end, 4 * CHUNK - end, False, True, 1))
    assert chunk_plan(mapped, 4 * CHUNK, CHUNK) == plan


@pytest.mark.parametrize(
    ("extents", "runs"),
    [
        pytest.param([(0, 2, 1)], [(), ()], id="all the base's"),
        pytest.param([(0, 2, 0)], [((0, CHUNK),), ((0, CHUNK),)], id="all its own"),
        pytest.param([(0, 0.25, 0), (0.25, 0.25, 0), (0.5, 1.5, 1)], [((0, CHUNK // 2),), ()],
                     id="adjacent own extents merge"),
        pytest.param([(0, 0.25, 1), (0.25, 1, 0), (1.25, 0.75, 1)],
                     [((CHUNK // 4, 3 * CHUNK // 4),), ((0, CHUNK // 4),)], id="an own extent across chunks is cut"),
        pytest.param([(0, 0.25, 0), (0.25, 0.5, 1), (0.75, 1.25, 0)],
                     [((0, CHUNK // 4), (3 * CHUNK // 4, CHUNK // 4)), ((0, CHUNK),)], id="two runs in a chunk"),
    ],
)
def test_own_runs_are_the_clones_own_areas_per_chunk(extents, runs):
    mapped = [Extent(int(s * CHUNK), int(n * CHUNK), True, False, depth) for s, n, depth in extents]
    assert own_runs(mapped, 2 * CHUNK, CHUNK) == runs


@pytest.fixture
def dir_storage(tmp_path) -> DirDriver:
    d = driver_for(StorageConfig("local", "dir", options={"path": tmp_path / "images"}))
    assert isinstance(d, DirDriver)
    return d


@pytest.fixture
def store(tmp_path) -> ChunkStore:
    (tmp_path / "store").mkdir()
    return ChunkStore(tmp_path / "store", chunk_size=CHUNK)


def disk_with_data(drv: DirDriver, vol: VolName) -> None:
    """8 MiB: random data in chunks 1 and 5, text-like in 2, zeros elsewhere."""
    drv.allocate(vol, 8 * MIB)
    fill(drv, vol, 1 * MIB, os.urandom(MIB))
    fill(drv, vol, 2 * MIB, b"stork backs up " * (MIB // 15))
    fill(drv, vol, 5 * MIB, os.urandom(MIB // 2))


def backed_up(store: ChunkStore, drv: DirDriver, vol: VolName, vmid: int = 100, **base):
    with store.begin(vmid) as writer, drv.image(vol) as image:
        index = back_up(image, vol.fmt, writer, **base)
        writer.add_index("scsi0", index)
        snap = writer.commit()
    return snap, index


def comes_back_whole(drv: DirDriver, store: ChunkStore, index: Index, source: VolName) -> None:
    """Restore `index` into a new raw volume, sparse, and compare it with `source`."""
    whole = VolName(300, "vm-300-disk-0", "raw")
    drv.allocate(whole, index.virtual_size)
    with drv.image(whole, write=True) as image:
        restore(store, index, image, reads_zero=True)
    drv.compare(drv, source, whole)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("target_fmt", ["raw", "qcow2"])
def test_a_disk_comes_back_equal_in_any_format_and_zero_chunks_are_neither_stored_nor_read(
        dir_storage, store, fmt, target_fmt):
    src = VolName(100, "vm-100-disk-0", fmt)
    disk_with_data(dir_storage, src)
    snap, index = backed_up(store, dir_storage, src)
    assert [d is not None for d in index.chunks] == [False, True, True, False, False, True, False, False]
    assert index.virtual_size == 8 * MIB and index.format == fmt
    assert snap.manifest.written < 3 * MIB  # two random chunks and a compressed text one
    dst = VolName(200, "vm-200-disk-0", target_fmt)
    dir_storage.allocate(dst, 8 * MIB)
    with dir_storage.image(dst, write=True) as image:
        restore(store, store.index(str(snap.id), "scsi0"), image, reads_zero=True)
    dir_storage.compare(dir_storage, src, dst)
    assert dir_storage.allocated_size(dst) < 4 * MIB  # sparse: zero chunks were not written


def test_an_unchanged_re_backup_writes_nothing_new(dir_storage, store):
    src = VolName(100, "vm-100-disk-0", "raw")
    disk_with_data(dir_storage, src)
    backed_up(store, dir_storage, src)
    snap, _ = backed_up(store, dir_storage, src, vmid=101)
    assert snap.manifest.written == 0


def test_a_linked_clone_stores_only_its_own_clusters_and_comes_back_equal_whole_or_relinked(
        dir_storage, store, tmp_path):
    """A clone's chunks that are all its base's are the base's entries; one where it wrote a
    cluster is a patch: that cluster, over the base's chunk; one mostly its own is whole.
    Restored elsewhere it is whole; restored as a clone of the same base only its clusters
    are written, and where the base's chunk under a whole one is gone, that chunk whole."""
    disk = VolName(100, "vm-100-disk-0", "raw")
    disk_with_data(dir_storage, disk)
    base = VolName(None, "base-100-disk-0", "raw")
    dir_storage.make_base(disk, base)
    base_snap, base_index = backed_up(store, dir_storage, base)
    clone = VolName(101, "vm-101-disk-0", "qcow2")
    dir_storage.link_clone(base, clone)
    overlay = tmp_path / "images" / "101" / "vm-101-disk-0.qcow2"
    qemu_io_write(overlay, "qcow2", 1 * MIB + 4096, 4096, 0x5C)  # over the base's random data
    qemu_io_write(overlay, "qcow2", 6 * MIB + 4096, 4096, 0x5D)  # over the base's zeros
    qemu_io_write(overlay, "qcow2", 2 * MIB, 768 << 10, 0x5E)  # most of a chunk: stored whole
    ref = BaseRef(backup=str(base_snap.id), disk="scsi0", digest=base_index.content)
    snap, index = backed_up(store, dir_storage, clone, vmid=101, base=ref, base_index=base_index)
    cluster = ((0, 64 << 10),)
    assert index.base == ref and [c for n, c in enumerate(index.chunks) if n not in (1, 2, 6)] == \
        [c for n, c in enumerate(base_index.chunks) if n not in (1, 2, 6)]
    assert index.chunks[1] == Patch(base_index.chunks[1], index.chunks[1].own, cluster)
    assert index.chunks[6] == Patch(None, index.chunks[6].own, cluster)
    assert isinstance(index.chunks[2], str) and index.chunks[2] != base_index.chunks[2]
    assert 0 < snap.manifest.written <= 2 * (64 << 10) + MIB  # two clusters and a chunk, compressed or not
    assert store.verify(str(snap.id)).ok
    comes_back_whole(dir_storage, store, index, clone)
    beneath = tmp_path / "store" / ".chunks" / base_index.chunks[2][:4] / base_index.chunks[2]
    for vmid, gone, own in ((301, False, 768 << 10), (302, True, MIB)):
        relinked = VolName(vmid, f"vm-{vmid}-disk-0", "qcow2")
        dir_storage.link_clone(base, relinked)
        if gone:
            beneath.rename(beneath.with_suffix(".bad"))  # as verify moves a damaged chunk aside
        with dir_storage.image(relinked, write=True) as image:
            restore(store, index, image, reads_zero=True, base=base_index)
        dir_storage.compare(dir_storage, clone, relinked)
        with dir_storage.image(relinked) as image:
            written = sum(e.length for e in extents(image) if e.depth == 0)
        assert written == 2 * (64 << 10) + own  # its two clusters, and its own chunk's clusters or all of it


def test_a_linked_clone_grown_past_its_base_comes_back_equal(dir_storage, store, tmp_path):
    """The base ends inside a chunk of the grown clone: that chunk is read whole (the grown
    part is the clone's own zeros), the ones before are the base's."""
    disk = VolName(100, "vm-100-disk-0", "raw")
    dir_storage.allocate(disk, 6 * MIB + MIB // 2)
    fill(dir_storage, disk, 6 * MIB, os.urandom(MIB // 2))
    base = VolName(None, "base-100-disk-0", "raw")
    dir_storage.make_base(disk, base)
    base_snap, base_index = backed_up(store, dir_storage, base)
    clone = VolName(101, "vm-101-disk-0", "qcow2")
    dir_storage.link_clone(base, clone)
    dir_storage.resize(clone, 8 * MIB)
    ref = BaseRef(backup=str(base_snap.id), disk="scsi0", digest=base_index.content)
    snap, index = backed_up(store, dir_storage, clone, vmid=101, base=ref, base_index=base_index)
    assert isinstance(index.chunks[6], str) and index.chunks[6] != base_index.chunks[6]
    assert store.verify(str(snap.id)).ok
    comes_back_whole(dir_storage, store, index, clone)


def _image_files(tmp_path: Path) -> dict[str, qemu.Image]:
    """Files of each kind qemu-img makes: raw with a hole, a qcow2 linked clone of it with
    data and zeros of its own, that clone opened without its base, a compressed qcow2 and a
    qcow2 with an external data file."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    def opened(name: str, backing: qemu.Image | None = None) -> qemu.Image:
        fd = os.open(tmp_path / name, os.O_RDONLY | os.O_CLOEXEC)
        return qemu.Image.of_fd("qcow2" if name.endswith(".qcow2") else "raw", fd, name, backing)

    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(MIB)
        f.write(os.urandom(3 * MIB))
        f.write(b"compressible " * (MIB // 13))  # qemu-img convert -c keeps random clusters as they are
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(tmp_path / "clone.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 2M 128k", "-c", "write -z 3M 1M", "-c", "write -P 9 9M 1M",
        str(tmp_path / "clone.qcow2"))
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(base), str(tmp_path / "compressed.qcow2"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.raw'}",
        str(tmp_path / "external.qcow2"), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", str(tmp_path / "external.qcow2"))
    return {"raw": opened("base.raw"), "clone": opened("clone.qcow2", opened("base.raw")),
            "clone alone": opened("clone.qcow2"), "compressed": opened("compressed.qcow2"),
            "external data file": opened("external.qcow2")}


def test_files_are_read_at_their_mapped_offsets_exactly_as_qemu_nbd_reads_them(tmp_path):
    """Raw files and plain qcow2 chains are read straight from their files; compressed
    clusters and an external data file (no host offset in the image's own file) go through
    qemu-nbd. Either way every read, also one across extents, is what qemu-nbd serves."""
    direct = {}
    for kind, image in _image_files(tmp_path).items():
        mapped = extents(image)
        fds = readable(image, mapped)
        direct[kind] = fds is not None
        if fds is None:
            continue
        with MappedFiles(fds, mapped, image.label) as files, served(image) as client:
            assert files.size == client.size
            assert all(files.direct) or _file_system(tmp_path) == "tmpfs"  # past the page cache, where it can
            for offset, length in ((0, files.size), (MIB - 4096, 2 * MIB + 8192), (3 * MIB + 5, 7 * MIB)):
                assert files.read(offset, length) == client.read(offset, length), (kind, offset)
            files.close()  # buffered from here on: the same bytes
            assert files.read(3 * MIB + 5, 7 * MIB) == client.read(3 * MIB + 5, 7 * MIB), kind
    assert direct == {"raw": True, "clone": True, "clone alone": True, "compressed": False,
                      "external data file": False}


def test_a_backup_reads_its_files_past_the_page_cache_to_their_last_byte(tmp_path):
    """A file not in the cache is read direct and stays out of it; its last bytes, short of a
    whole page, are read too; a direct read the kernel refuses (EINVAL: here a buffer at an
    odd address) makes that file's reads buffered, with the same bytes."""
    if _file_system(tmp_path) == "tmpfs":
        pytest.skip("tmpfs has no disk beneath its cache: its direct reads are cached")
    path = tmp_path / "disk.raw"
    data = os.urandom(3 * MIB + 1000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        whole = [Extent(0, len(data), data=True, zero=False, offset=0, depth=0)]
        with MappedFiles([fd], whole, "disk") as files:
            assert files.read(0, len(data)) == data
            assert files.read(3 * MIB + 5, 995) == data[3 * MIB + 5:]
            assert resident_pages(path) == 0
            assert files.read(MIB + 100, 10) == data[MIB + 100:MIB + 110]
            files._aligned = memoryview(mmap.mmap(-1, 8 * MIB))[1:4 * MIB + 1]  # type: ignore[assignment]
            assert files.read(4097, MIB) == data[4097:4097 + MIB]
            assert files.direct == [None]
    finally:
        os.close(fd)


def test_a_compressed_qcow2_is_read_through_qemu_nbd_and_comes_back_equal(tmp_path, store):
    image = _image_files(tmp_path)["compressed"]
    with store.begin(100) as writer:
        index = back_up(image, "qcow2", writer)
        writer.add_index("scsi0", index)
        snap = writer.commit()
    out = tmp_path / "restored.raw"
    with open(out, "wb") as f:
        f.truncate(16 * MIB)
    fd = os.open(out, os.O_RDWR | os.O_CLOEXEC)
    try:
        restore(store, store.index(str(snap.id), "scsi0"), qemu.Image.of_fd("raw", fd, "restored"), reads_zero=True)
    finally:
        os.close(fd)
    assert out.read_bytes() == (tmp_path / "base.raw").read_bytes()


def _file_system(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_restored_raw_file_is_written_past_the_page_cache_where_aligned(tmp_path: Path):
    """Whole aligned blocks go to the disk directly and leave nothing in the page cache; pieces
    that are not aligned go through it, also over pages written directly, and the file reads
    back exactly as written, at its size."""
    if _file_system(tmp_path) == "tmpfs":
        pytest.skip("tmpfs has no disk beneath its cache: its direct writes are cached")
    path = tmp_path / "restored.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    expected = bytearray(16 * MIB)
    writes = [(0, os.urandom(4 * MIB)), (8 * MIB, os.urandom(6 * MIB)), (4 * MIB, os.urandom(64 << 10))]
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with RawFile(fd, "restored") as raw:
            assert raw.direct is not None  # this file system writes direct
            for offset, data in writes:
                raw.write(offset, data)
                expected[offset:offset + len(data)] = data
        assert resident_pages(path) == 0
        with RawFile(fd, "restored") as raw:
            for offset, data in ((4 * MIB + 100, b"x" * 5000), (8 * MIB + 4095, b"y" * 2)):
                raw.write(offset, data)
                expected[offset:offset + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.stat().st_size == 16 * MIB
    assert path.read_bytes() == bytes(expected)


def test_a_direct_write_the_kernel_refuses_is_made_buffered_and_lands_whole(tmp_path: Path):
    """EINVAL from a direct write (here the kernel's own, for a buffer at an odd address; on a
    disk, a block larger than a page) ends direct writing: that piece and the rest are buffered."""
    if _file_system(tmp_path) == "tmpfs":
        pytest.skip("tmpfs takes a direct write from any address")
    path = tmp_path / "restored.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MIB)
    data = os.urandom(8 * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with RawFile(fd, "restored") as raw:
            assert raw.direct is not None
            raw._aligned = memoryview(mmap.mmap(-1, 8 * MIB))[1:4 * MIB + 1]  # type: ignore[assignment]
            raw.write(0, data[:4 * MIB])
            assert raw.direct is None
            raw.write(4 * MIB, data[4 * MIB:])
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_restore_that_fills_its_disk_says_so_and_stops_writing(tmp_path: Path):
    """A write that fails (here the disk full) is the error the restore reports, as itself,
    whether it was a direct write or a buffered one, and RawFile lets go of what it holds."""
    with tmpfs(tmp_path / "small", "4m") as small:
        path = small / "restored.raw"
        with open(path, "wb") as f:
            f.truncate(16 * MIB)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with pytest.raises(OSError) as raised, RawFile(fd, "restored") as raw:
                raw.write(0, os.urandom(8 * MIB))
            assert raised.value.errno == errno.ENOSPC and raw.direct is None
        finally:
            os.close(fd)


def test_a_restore_with_a_corrupt_chunk_stops_naming_it(dir_storage, store, tmp_path: Path):
    src = VolName(100, "vm-100-disk-0", "raw")
    disk_with_data(dir_storage, src)
    _, index = backed_up(store, dir_storage, src)
    digest = index.chunks[1]
    assert digest is not None
    chunk = tmp_path / "store" / ".chunks" / digest[:4] / digest
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0xFF
    chunk.write_bytes(bytes(blob))
    dst = VolName(200, "vm-200-disk-0", "raw")
    dir_storage.allocate(dst, 8 * MIB)
    with pytest.raises(Corrupt, match=digest), dir_storage.image(dst, write=True) as image:
        restore(store, index, image, reads_zero=True)


def test_gc_while_a_backup_runs_keeps_what_it_will_name_and_the_backup_restores_identically(dir_storage, store):
    """gc runs (with no safety margin) while a backup stands halfway: it removes the chunks of
    a forgotten backup, but none that the running one stored or reused before or after."""
    old, src = VolName(100, "vm-100-disk-0", "raw"), VolName(101, "vm-101-disk-0", "raw")
    disk_with_data(dir_storage, old)
    forgotten, _ = backed_up(store, dir_storage, old)
    disk_with_data(dir_storage, src)
    fill(dir_storage, src, 2 * MIB, b"stork backs up " * (MIB // 15))  # a chunk the old backup holds too
    store.forget(str(forgotten.id))
    halfway, go_on = threading.Event(), threading.Event()

    def pause(done: int, size: int) -> None:
        if done == 4 * MIB:
            halfway.set()
            assert go_on.wait(30)

    result: dict[str, object] = {}

    def run() -> None:
        result["snap"], result["index"] = backed_up(store, dir_storage, src, vmid=101, progress=pause)

    backup = threading.Thread(target=run)
    backup.start()
    assert halfway.wait(30)
    removed = store.gc(margin=0)
    go_on.set()
    backup.join(30)
    assert removed.chunks_removed >= 2  # the forgotten backup's random chunks
    comes_back_whole(dir_storage, store, result["index"], src)  # type: ignore[arg-type]
    assert store.verify(str(result["snap"].id)).ok  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("dirty", "runs"),
    [
        pytest.param([(0, 4, True)], [()] * 4, id="nothing written since"),
        pytest.param([(0, 1, True), (1, 1, False), (2, 2, True)], [(), ((0, MIB),), (), ()], id="one chunk written"),
        pytest.param([(0, 1.5, True), (1.5, 0.25, False), (1.75, 2.25, True)], [(), ((MIB // 2, MIB // 4),), (), ()],
                     id="a write inside a chunk"),
        pytest.param([(0, 0.5, True), (0.5, 2, False), (2.5, 1.5, True)],
                     [((MIB // 2, MIB // 2),), ((0, MIB),), ((0, MIB // 2),), ()], id="a write across chunks"),
    ],
)
def test_dirty_runs_are_what_a_dirty_bitmap_shows_written(dirty, runs):
    extents = [Extent(int(s * MIB), int(n * MIB), data, False, 0) for s, n, data in dirty]
    assert dirty_runs(extents, 4 * MIB, MIB) == runs


def index_of(*chunks, base: bool = False) -> Index:
    ref = BaseRef("vm/100/2026-01-01T00:00:00Z", "scsi0", "e" * 64) if base else None
    return Index("qcow2", len(chunks) * MIB, [c * 64 if isinstance(c, str) else c for c in chunks], MIB, ref)


SMALL, HALF, MOST = ((0, 4096),), ((0, MIB // 2),), ((0, 3 * MIB // 4),)
OVER_B = Patch("b" * 64, "c" * 64, ((MIB // 4, 4096),))


@pytest.mark.parametrize(
    ("plan", "own", "previous", "dirty", "expected"),
    [
        pytest.param(["read", "read"], [(), ()], None, None, [Action("read")] * 2, id="no bitmap: read all"),
        pytest.param(["read", "read"], [(), ()], index_of("a", "a"), [(), SMALL],
                     [Action("take", "a" * 64), Action("patch", "a" * 64, SMALL)],
                     id="clean: the previous entry; a little written: a patch over the previous chunk"),
        pytest.param(["read"], [()], index_of("a"), [MOST], [Action("read")], id="mostly written: read whole"),
        pytest.param(["read"], [()], index_of(None), [HALF], [Action("patch", None, HALF)],
                     id="half written over zeros: a patch over zeros"),
        pytest.param(["zero", "read"], [(), ()], index_of("a", "a"), [SMALL, ()],
                     [Action("zero"), Action("take", "a" * 64)], id="zeros stay zeros"),
        pytest.param(["patch"], [SMALL], index_of(OVER_B, base=True), [SMALL],
                     [Action("patch", "b" * 64, ((0, 4096), (MIB // 4, 4096)))],
                     id="written over a previous patch: its runs joined in, over its base chunk"),
        pytest.param(["base", "base"], [(), ()], index_of("a", "a"), [SMALL, ()],
                     [Action("patch", "a" * 64, SMALL), Action("take", "a" * 64)], id="a clone's dirty chunk"),
        pytest.param(["base", "read"], [(), ((0, MIB),)], None, None, [Action("take", "b" * 64), Action("read")],
                     id="a clone without a bitmap: the base's entry, its own read"),
        pytest.param(["patch", "patch"], [SMALL, HALF], None, None,
                     [Action("patch", "b" * 64, SMALL), Action("patch", "b" * 64, HALF)],
                     id="a clone's own runs: a patch over the base's chunk"),
        pytest.param(["patch"], [MOST], None, None, [Action("read")], id="a clone's own over most of a chunk: read"),
    ],
)
def test_decide_reads_the_least_each_chunk_needs(plan, own, previous, dirty, expected):
    base = index_of(*["b"] * len(plan))
    assert decide(plan, own, base, previous, dirty, MIB, len(plan) * MIB) == expected


def test_a_patch_is_never_laid_over_a_patch_of_the_base():
    """A base backed up as a clone itself has patches: a clone of it reads such a chunk whole."""
    base = index_of(OVER_B, base=True)
    assert decide(["patch"], [SMALL], base, None, None, MIB, MIB) == [Action("read")]
    assert decide(["base"], [()], base, None, None, MIB, MIB) == [Action("take", OVER_B)]


def test_a_clone_grown_past_its_base_reads_the_chunk_its_base_ends_in():
    """The base is 1.5 chunks: its last chunk is shorter than the grown clone's, so nothing of
    the clone's there may lie over it (qemu maps the grown part as the clone's own zeros)."""
    base = Index("qcow2", MIB + MIB // 2, ["b" * 64, "b" * 64], MIB)
    grown = decide(["base", "patch", "zero"], [(), ((MIB // 2, MIB // 2),), ()], base, None, None, MIB, 3 * MIB)
    assert grown == [Action("take", "b" * 64), Action("read"), Action("zero")]


def test_a_previous_backup_of_another_size_is_not_used():
    assert decide(["read"], [()], None, index_of("a", "a"), [()], MIB, MIB) == [Action("read")]


def test_the_socket_folders_of_dead_steps_are_removed_and_nothing_else(tmp_path):
    """A step killed while qemu-nbd served leaves its socket folder; the worker's sweep removes
    those whose process is gone, and leaves a live process's, another owner's or a public one,
    a symlink (never followed) and any other name."""
    from drivers.nbd import _FOLDER_NAME, remove_stale_folders
    from drivers.tools import process_start

    ended = subprocess.Popen(["sleep", "60"])  # alive until its start time is read: a zombie has none
    gone = f"stork-nbd-{ended.pid}-{process_start(ended.pid)}"
    ended.kill()
    ended.wait()
    assert _FOLDER_NAME.match(f"{gone}-x"), gone
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    stale, live, public, others = (f"{gone}-abc_1", f"stork-nbd-{os.getpid()}-{process_start(os.getpid())}-def_2",
                                   f"{gone}-pub", f"{gone}-other")
    for name in (stale, live, public, others, "stork-nbd-legacy"):
        (tmp_path / name).mkdir(mode=0o700)
        (tmp_path / name / "sock").write_text("")
    (tmp_path / public).chmod(0o755)
    os.chown(tmp_path / others, 65534, 65534)
    (tmp_path / f"{gone}-link").symlink_to(outside)

    assert remove_stale_folders(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live, public, others, "stork-nbd-legacy", f"{gone}-link", "outside"])
    assert (outside / "keep").read_text() == "kept"


def test_a_qemu_nbd_whose_starter_dies_before_connecting_exits(tmp_path):
    """qemu-nbd serves one connection and exits when it closes; a process killed between
    starting it and connecting must not leave it running, holding the volume open."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MIB))
    starter = textwrap.dedent("""
        import os, signal, sys
        from drivers import nbd, qemu
        image = qemu.Image.of_fd("raw", os.open(sys.argv[1], os.O_RDONLY), sys.argv[1])
        with nbd._qemu_nbd(image, False) as (path, proc, argv):
            while not path.exists():
                pass
            print(proc.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", starter, str(image)], capture_output=True, text=True,
                           cwd=ROOT, check=False)
    assert child.returncode == -9, child.stderr
    pid = int(child.stdout)
    try:
        wait_for(lambda: not _running(pid), 10, what=f"qemu-nbd {pid} to exit once its starter died")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
