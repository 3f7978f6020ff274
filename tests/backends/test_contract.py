"""The storage driver contract, which every backend must pass: one test module parametrised
over every driver, each on its real storage (dir: files; btrfs: a real btrfs on a loop
device, skipped with the reason where this machine cannot make one). Data goes in and comes
out through the drivers' own `image()` and is checked with the real `qemu-img compare`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers import DRIVERS, driver_for
from drivers.backends.base import Driver
from drivers.errors import FeatureUnsupported, NotFound
from drivers.names import VolName
from drivers.storage import StorageConfig
from tests.conftest import BTRFS, CEPH, NO_BTRFS, NO_CEPH, NO_ZFS, ZFS
from tests.helpers import fill, read

MIB = 1 << 20
_fresh = itertools.count()


def storage(kind: str, tmp_path: Path) -> StorageConfig:
    """A fresh, empty storage of this kind for one test, on its real filesystem or pool."""
    n = next(_fresh)
    if kind == "btrfs":
        if NO_BTRFS:
            pytest.skip(f"btrfs: {NO_BTRFS}")
        path = BTRFS.mount / "contract" / str(n)
    elif kind == "zfs":
        if NO_ZFS:
            pytest.skip(f"zfs: {NO_ZFS}")
        dataset = f"{ZFS.name}/contract{n}"
        subprocess.run(["zfs", "create", dataset], check=True, capture_output=True)
        return StorageConfig("s", kind, options={"pool": dataset})
    elif kind in ("lvm", "lvmthin"):
        pytest.skip(f"{kind}: its data paths need device-mapper, which this kernel lacks "
                    f"(tests/backends/test_{kind}.py runs the rest)")
    elif kind == "rbd":
        if NO_CEPH:
            pytest.skip(f"rbd: {NO_CEPH}")
        CEPH.rbd("namespace", "create", f"{CEPH.pool}/contract{n}")  # a fresh, empty storage in the pool
        return StorageConfig("s", kind, options={"pool": CEPH.pool, "namespace": f"contract{n}", "conf": CEPH.conf,
                                                 "username": "admin"})
    elif kind == "dir-pve":  # a Proxmox VE directory storage, used in place (drivers/backends/dir.py)
        path = tmp_path / "vz" / str(n)
        path.mkdir(parents=True)
        return StorageConfig("s", "dir", options={"path": path, "layout": "pve", "pve_config": False})
    else:
        path = tmp_path / "images" / str(n)
    path.mkdir(parents=True)
    return StorageConfig("s", kind, options={"path": path})


@pytest.fixture(params=[*sorted(DRIVERS), "dir-pve"])
def drv(request, tmp_path) -> Driver:
    return driver_for(storage(request.param, tmp_path))


@pytest.fixture
def scratch(tmp_path) -> Driver:
    """A dir storage to copy from and to."""
    return driver_for(StorageConfig("scratch", "dir", options={"path": tmp_path / "scratch"}))


def disk(drv: Driver, owner: int = 100, n: int = 0) -> VolName:
    return VolName(owner, f"vm-{owner}-disk-{n}", drv.default_format)


@pytest.fixture
def based(drv) -> Iterator[tuple[VolName, bytes]]:
    """A base made from a disk holding 1 MiB of data at 4 MiB."""
    data = os.urandom(MIB)
    vol = disk(drv)
    drv.allocate(vol, 16 * MIB)
    fill(drv, vol, 4 * MIB, data)
    base = drv.default_base_name(vol)
    drv.make_base(vol, base)
    yield base, data


def leftovers(drv: Driver) -> list[str]:
    """Everything left in the storage, hidden temp entries included: files and folders below
    a directory storage; datasets below a ZFS one; images in an RBD pool or namespace."""
    if drv.type_name == "zfs":
        out = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", drv.pool], check=True, capture_output=True,
                             text=True).stdout.split()
        return [name.removeprefix(drv.pool + "/") for name in out if name != drv.pool]
    if drv.type_name == "rbd":
        return [entry["image"] for entry in json.loads(CEPH.rbd("ls", "-l", "--format", "json", drv.where) or "[]")]
    return sorted(str(p.relative_to(drv.root)) for p in drv.root.rglob("*"))


def test_allocate_then_free_leaves_nothing(drv):
    vol = disk(drv)
    drv.allocate(vol, 32 * MIB)
    assert drv.exists(vol) and drv.list_volumes() == [vol] and drv.list_volumes(100) == [vol]
    info = drv.info(vol)
    assert (info.virtual_size, info.is_base, info.parent, info.clones) == (32 * MIB, False, None, ())
    assert read(drv, vol, 0, MIB) == b"\0" * MIB
    assert drv.identity(vol) == drv.identity(vol)
    drv.free_volume(vol)
    assert not drv.exists(vol) and drv.list_volumes() == [] and leftovers(drv) == []
    drv.free(vol)  # freeing what is gone already is nothing to do


def test_a_base_keeps_the_data_and_is_read_only(drv, based):
    base, data = based
    assert drv.list_volumes() == [base] and not drv.exists(disk(drv))
    assert drv.info(base).is_base and read(drv, base, 4 * MIB, MIB) == data
    with pytest.raises(FeatureUnsupported, match="read-only base image"):
        drv.require_feature("resize", base)
    drv.protect_base(base)  # idempotent


def test_unmake_base_gives_back_a_writable_disk(drv, based):
    base, data = based
    vol = disk(drv)
    drv.unmake_base(base, vol)
    assert drv.list_volumes() == [vol] and read(drv, vol, 4 * MIB, MIB) == data
    fill(drv, vol, 0, b"\x01" * 512)
    assert read(drv, vol, 0, 512) == b"\x01" * 512


def test_a_linked_clone_reads_the_base_and_writes_only_itself(drv, based):
    base, data = based
    clone = VolName(101, "vm-101-disk-0", drv.linked_clone_format)
    drv.link_clone(base, clone)
    assert drv.parent_of(clone) == base and drv.clones_of(base) == [clone]
    assert drv.info(base).clones == (drv.volid(clone),) and drv.info(clone).parent == drv.volid(base)
    assert read(drv, clone, 4 * MIB, MIB) == data
    if drv.linked_clone_format == "raw":
        fill(drv, clone, 4 * MIB, b"\x02" * MIB)
        assert read(drv, clone, 4 * MIB, MIB) == b"\x02" * MIB
    assert read(drv, base, 4 * MIB, MIB) == data


def test_a_base_with_clones_is_not_freed_until_they_are(drv, based):
    base, _ = based
    clone = VolName(101, "vm-101-disk-0", drv.linked_clone_format)
    drv.link_clone(base, clone)
    with pytest.raises(FeatureUnsupported, match=r"is a base image with 1 linked clone\(s\): s:101/vm-101-disk-0"):
        drv.free_volume(base)
    assert drv.exists(base)
    drv.free_volume(clone)
    drv.free_volume(base)
    assert drv.list_volumes() == [] and [p for p in leftovers(drv) if p not in ("base", ".overlays")] == []


def test_only_a_base_is_cloned(drv):
    vol = disk(drv)
    with pytest.raises(FeatureUnsupported, match="it is not a base image"):
        drv.require_feature("linked_clone", vol)


def test_copies_in_and_out_hold_the_same_data(drv, scratch):
    """From a dir volume into this storage and back out, each copy equal by qemu-img compare."""
    src = VolName(100, "vm-100-disk-0", "raw")
    scratch.allocate(src, 16 * MIB)
    fill(scratch, src, 3 * MIB, os.urandom(2 * MIB))
    here, back = disk(drv, 102), VolName(103, "vm-103-disk-0", "qcow2")
    seen: list[tuple[int, int]] = []
    drv.allocate(here, 16 * MIB)
    drv.copy_from(scratch, src, here, progress=lambda done, total: seen.append((done, total)))
    drv.compare(scratch, src, here)
    assert seen[-1] == (16 * MIB, 16 * MIB)
    scratch.allocate(back, 16 * MIB)
    scratch.copy_from(drv, here, back)
    scratch.compare(drv, here, back)


def test_a_copy_within_the_storage_is_equal_and_independent(drv):
    src, dst = disk(drv), disk(drv, 100, 1)
    drv.allocate(src, 16 * MIB)
    fill(drv, src, 0, os.urandom(MIB))
    drv.allocate(dst, 16 * MIB)
    drv.copy_from(drv, src, dst)
    drv.compare(drv, src, dst)
    fill(drv, dst, 0, b"\x03" * 512)
    assert read(drv, src, 0, 512) != b"\x03" * 512


def test_resize_grows_and_keeps_the_data(drv):
    vol = disk(drv)
    drv.allocate(vol, 8 * MIB)
    fill(drv, vol, 0, b"\x04" * MIB)
    drv.resize(vol, 24 * MIB)
    assert drv.virtual_size(vol) == 24 * MIB and read(drv, vol, 0, MIB) == b"\x04" * MIB


def test_an_unknown_volume_is_not_found_by_its_id(drv):
    with pytest.raises(NotFound, match=r"unknown volume s:100/vm-100-disk-9\.raw"):
        drv.info(VolName(100, "vm-100-disk-9", "raw"))


def test_a_directory_named_like_a_volume_is_a_stray_not_a_volume(drv):
    """A plain directory where a volume's name would be: never listed as a volume; a storage
    of files lists it as a stray (a ZFS volume is a dataset: a directory is nothing of its)."""
    if drv.type_name == "rbd":
        pytest.skip("an RBD pool has no directories")
    vol = disk(drv)
    drv.allocate(vol, 8 * MIB)
    stray = disk(drv, 100, 5)
    root = drv.root if hasattr(drv, "root") else drv._mountpoint()
    (root / "100" / f"{stray.name}.{stray.fmt}").mkdir()
    assert drv.list_volumes() == [vol]
    if drv.type_name == "zfs":
        assert drv.strays() == []
    else:
        [(found, problem)] = drv.strays()
        assert found == stray and "is a directory" in problem
        (root / "100" / f"vm-100-disk-1.{drv.default_format}").mkdir()
        assert drv.next_disk_name(100, drv.default_format).name == "vm-100-disk-2"  # a stray's name is taken


PAIRS = [(a, b) for a in sorted(DRIVERS) for b in sorted(DRIVERS)]


@pytest.mark.parametrize(("source_kind", "target_kind"), PAIRS)
def test_a_copy_between_any_two_storages_in_every_target_format_is_equal(source_kind, target_kind, tmp_path):
    """Every pair of storage types, into every format the target holds: the copy equals
    the source by `qemu-img compare` (the path each pair takes: FICLONE within one btrfs,
    qemu-img everywhere else)."""
    source = driver_for(storage(source_kind, tmp_path / "a"))
    target = driver_for(storage(target_kind, tmp_path / "b"))
    src = disk(source)
    source.allocate(src, 8 * MIB)
    fill(source, src, 2 * MIB, os.urandom(MIB))
    for n, fmt in enumerate(target.formats):
        dst = VolName(200, f"vm-200-disk-{n}", fmt)
        target.allocate(dst, 8 * MIB)
        target.copy_from(source, src, dst)
        target.compare(source, src, dst)


def test_identity_is_never_reused_and_recreate_keeps_the_name_empty(drv):
    """A volume made again at a freed volume's name is another volume (its identity
    differs); `recreate` empties a volume in place, keeping its identity."""
    vol = disk(drv)
    drv.allocate(vol, 8 * MIB)
    first = drv.identity(vol)
    drv.free(vol)
    drv.allocate(vol, 8 * MIB)
    second = drv.identity(vol)
    assert second != first
    fill(drv, vol, 0, b"\x05" * MIB)
    drv.recreate(vol, 8 * MIB)
    assert drv.exists(vol) and read(drv, vol, 0, MIB) == b"\0" * MIB and drv.virtual_size(vol) == 8 * MIB
    if drv.type_name != "dir":  # dir replaces the file in one rename: a new file, the name never free
        assert drv.identity(vol) == second
