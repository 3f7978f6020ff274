"""LVM-thin storage against the real lvm2, on a volume group on a loop device.

This kernel has no device-mapper, and LVM will not create a thin pool, a thin volume or a thin
snapshot without it (each needs a message to the pool's kernel target). So where there is
none, the pool and the thin volumes a test needs are written into the VG's metadata with
`vgcfgrestore --force`, exactly as LVM records them (a thin-pool segment over hidden
_tdata/_tmeta LVs; thin segments with a device id and, for a snapshot, an origin). Everything
else the driver does then runs on real lvm2 with `activation = 0`: listing from one `lvs`,
parents and clones from LVM's origin field, making a base (rename, read-only, activation
skip, tag) and back, the refusals, the pool's zeroing. What needs the kernel (creating thin
volumes and snapshots, data I/O, pool usage) fails in one line here, and the data test skips.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers import driver_for
from drivers.backends.lvm import LvmDriver
from drivers.backends.lvmthin import LvmThinDriver
from drivers.errors import FeatureUnsupported, NotFound, StorkError
from drivers.names import VolName, flat_name
from drivers.storage import StorageConfig
from tests.storages import DEVICE_MAPPER, lvm, volume_group

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("lvm"), reason="needs root and lvm2")

EXTENT = 4 << 20  # LVM's default extent size
POOL = "pool"
_device_ids = itertools.count(1)


def _restore_with(vg: str, where: Path, blocks: str) -> None:
    """Add LV sections to the VG's metadata and write it back (what lvcreate would record)."""
    backup = where / "vg.txt"
    lvm("vgcfgbackup", "-q", "-f", str(backup), vg)
    text = backup.read_text()
    if "\tlogical_volumes {" in text:
        text = text.replace("\tlogical_volumes {\n", "\tlogical_volumes {\n" + blocks, 1)
    else:  # before the VG section's closing brace
        end = text.rstrip().rindex("}")
        text = text[:end] + "\tlogical_volumes {\n" + blocks + "\t}\n" + text[end:]
    backup.write_text(text)
    lvm("vgcfgrestore", "-q", "--force", "-f", str(backup), vg)


def _lv(name: str, status: str, segment: str, extents: int, tags: tuple[str, ...] = ()) -> str:
    tag_line = f"\t\t\ttags = [{', '.join(f'{t!r}' for t in tags)}]\n".replace("'", '"') if tags else ""
    return (f"\t\t{name} {{\n\t\t\tid = \"{os.urandom(16).hex()[:6]}-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa\"\n"
            f"\t\t\tstatus = [{status}]\n\t\t\tflags = []\n{tag_line}\t\t\tsegment_count = 1\n"
            f"\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {extents}\n"
            f"{segment}\t\t\t}}\n\t\t}}\n")


def _linear(first_extent: int) -> str:
    return (f'\t\t\t\ttype = "striped"\n\t\t\t\tstripe_count = 1\n'
            f'\t\t\t\tstripes = [\n\t\t\t\t\t"pv0", {first_extent}\n\t\t\t\t]\n')


def make_pool(vg: str, where: Path, zero: bool = True) -> None:
    """A 64 MiB thin pool `pool` (8 MiB of metadata)."""
    if DEVICE_MAPPER:
        lvm("lvcreate", "-q", "--type", "thin-pool", "-L", "64m", "-Z", "y" if zero else "n", "-n", POOL, vg)
        return
    pool = (f'\t\t\t\ttype = "thin-pool"\n\t\t\t\tmetadata = "{POOL}_tmeta"\n\t\t\t\tpool = "{POOL}_tdata"\n'
            f'\t\t\t\ttransaction_id = 0\n\t\t\t\tchunk_size = 128\n\t\t\t\tdiscards = "passdown"\n'
            f'\t\t\t\tzero_new_blocks = {int(zero)}\n')
    _restore_with(vg, where, _lv(POOL, '"READ", "WRITE", "VISIBLE"', pool, 16)
                  + _lv(f"{POOL}_tdata", '"READ", "WRITE"', _linear(0), 16)
                  + _lv(f"{POOL}_tmeta", '"READ", "WRITE"', _linear(16), 2))


def made(drv: LvmThinDriver, where: Path, vol: VolName, size: int = 8 << 20, origin: VolName | None = None) -> None:
    """A thin volume (or a thin snapshot of `origin`) as allocate or link_clone leaves it."""
    if DEVICE_MAPPER:
        if origin:
            lvm("lvcreate", "-q", "-s", "-kn", "-n", flat_name(vol), f"{drv.vg}/{flat_name(origin)}")
        else:
            lvm("lvcreate", "-q", "-V", f"{size}b", "--thinpool", f"{drv.vg}/{POOL}", "-n", flat_name(vol))
        return
    segment = (f'\t\t\t\ttype = "thin"\n\t\t\t\tthin_pool = "{POOL}"\n\t\t\t\ttransaction_id = 0\n'
               f"\t\t\t\tdevice_id = {next(_device_ids)}\n")
    if origin:
        segment += f'\t\t\t\torigin = "{flat_name(origin)}"\n'
    base = vol.is_base
    status = '"READ", "VISIBLE"' if base else '"READ", "WRITE", "VISIBLE"'
    _restore_with(drv.vg, where, _lv(flat_name(vol), status, segment, size // EXTENT, ("stork-base",) if base else ()))


@pytest.fixture
def where(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lvmthin")


@pytest.fixture
def vg(where) -> Iterator[str]:
    with volume_group(where) as name:
        yield name


@pytest.fixture
def drv(vg, where) -> LvmThinDriver:
    make_pool(vg, where)
    d = driver_for(StorageConfig("thin", "lvmthin", options={"vgname": vg, "thinpool": POOL}))
    assert isinstance(d, LvmThinDriver)
    return d


def attr(drv: LvmThinDriver, vol: VolName) -> tuple[str, str]:
    out = lvm("lvs", "--noheadings", "-o", "lv_attr,lv_tags", f"{drv.vg}/{flat_name(vol)}").split()
    return out[0], out[1] if len(out) > 1 else ""


DISK, BASE = VolName(100, "vm-100-disk-0", "raw"), VolName(None, "base-100-disk-0", "raw")
CLONES = (VolName(101, "vm-101-disk-0", "raw"), VolName(102, "vm-102-disk-0", "raw"))


def test_thin_volumes_of_the_pool_are_listed_from_one_lvs_and_nothing_thick(drv, where):
    made(drv, where, DISK)
    lvm("lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "200.vm-200-disk-0.raw", drv.vg)  # thick: not ours
    assert drv.list_volumes() == [DISK] and drv.exists(DISK) and drv.list_volumes(100) == [DISK]
    info = drv.info(DISK)
    assert info.virtual_size == 8 << 20 and info.parent is None and not info.is_base
    # an inactive thin volume's provisioned size is unknown to LVM: counted whole, never understated
    assert info.allocated == (8 << 20 if not DEVICE_MAPPER else info.allocated)
    assert drv.identity(DISK) == lvm("lvs", "--noheadings", "-o", "lv_uuid", f"{drv.vg}/{flat_name(DISK)}").strip()
    thick = LvmDriver(StorageConfig("thick", "lvm", options={"vgname": drv.vg}))
    assert thick.list_volumes() == [VolName(200, "vm-200-disk-0", "raw")]  # and the thick driver not the thin


def test_a_base_is_renamed_read_only_skipped_by_activation_tagged_and_back(drv, where):
    made(drv, where, DISK)
    uuid = drv.identity(DISK)
    drv.make_base(DISK, BASE)
    assert drv.list_volumes() == [BASE] and drv.identity(BASE) == uuid
    lv_attr, tags = attr(drv, BASE)
    assert lv_attr[1] == "r" and lv_attr[9] == "k" and tags == "stork-base"
    drv.protect_base(BASE)  # idempotent
    drv.unmake_base(BASE, DISK)
    lv_attr, tags = attr(drv, DISK)
    assert drv.list_volumes() == [DISK] and lv_attr[1] == "w" and lv_attr[9] != "k" and tags == ""


def test_parents_and_clones_come_from_lvms_origin_and_a_base_with_clones_is_not_freed(drv, where):
    made(drv, where, BASE)
    for clone in CLONES:
        made(drv, where, clone, origin=BASE)
    made(drv, where, DISK)
    assert drv.parent_of(CLONES[0]) == BASE and drv.parent_of(DISK) is None and drv.parent_of(BASE) is None
    assert drv.clones_of(BASE) == list(CLONES)
    assert drv.info(BASE).clones == ("thin:101/vm-101-disk-0.raw", "thin:102/vm-102-disk-0.raw")
    assert drv.info(CLONES[1]).parent == "thin:base/base-100-disk-0.raw"
    with pytest.raises(FeatureUnsupported, match=r"thin:base/base-100-disk-0.raw is a base image with 2 linked"):
        drv.free_volume(BASE)
    assert drv.exists(BASE) and drv.clones_of(BASE) == list(CLONES)


def test_the_feature_table_allows_linked_clones_of_raw_bases_only(drv):
    assert drv.has_feature("linked_clone", BASE) and not drv.has_feature("linked_clone", DISK)
    assert drv.has_feature("make_base", DISK) and drv.has_feature("resize", DISK)
    with pytest.raises(FeatureUnsupported, match="cannot hold qcow2 volumes"):
        drv.parse_volname("100/vm-100-disk-0.qcow2")


def test_copies_skip_zero_areas_only_on_a_pool_that_zeroes_new_blocks(vg, where):
    make_pool(vg, where, zero=False)
    d = driver_for(StorageConfig("thin", "lvmthin", options={"vgname": vg, "thinpool": POOL}))
    assert d.new_volumes_read_zero is False  # a provisioned chunk keeps old data beside a partial write


def test_a_pool_that_is_not_a_thin_pool_is_named_in_one_line(drv):
    lvm("lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "plain", drv.vg)
    d = driver_for(StorageConfig("thin", "lvmthin", options={"vgname": drv.vg, "thinpool": "plain"}))
    with pytest.raises(NotFound, match=rf"storage 'thin': {drv.vg}/plain is not a thin pool"):
        d.status()


@pytest.mark.skipif(DEVICE_MAPPER, reason="with device-mapper, thin volumes are created and the pool is active")
def test_without_device_mapper_creating_and_usage_fail_in_one_line_and_leave_nothing(drv, where):
    assert drv.new_volumes_read_zero is True
    with pytest.raises(StorkError) as failed:
        drv.allocate(DISK, 8 << 20)
    assert "creating thin:100/vm-100-disk-0.raw failed" in str(failed.value) and "\n" not in str(failed.value)
    made(drv, where, BASE)
    with pytest.raises(StorkError, match=r"cloning thin:base/base-100-disk-0.raw to thin:101/vm-101-disk-0.raw"):
        drv.link_clone(BASE, CLONES[0])
    with pytest.raises(NotFound, match=r"thin pool stork\d+/pool is not active, LVM does not know its usage"):
        drv.status()
    assert drv.list_volumes() == [BASE]


@pytest.mark.skipif(not DEVICE_MAPPER, reason="this kernel has no device-mapper: no thin volume can be created")
def test_a_linked_clone_reads_its_base_and_writes_only_itself(drv):
    drv.allocate(DISK, 8 << 20)
    with drv.image(DISK, write=True) as image:
        os.pwrite(image.fds[0], b"base" * 1024, 0)
    drv.make_base(DISK, BASE)
    drv.link_clone(BASE, CLONES[0])
    with drv.image(CLONES[0], write=True) as image:
        assert os.pread(image.fds[0], 4096, 0) == b"base" * 1024
        os.pwrite(image.fds[0], b"mine" * 1024, 0)
    with drv.image(BASE) as image:
        assert os.pread(image.fds[0], 4096, 0) == b"base" * 1024
    assert drv.parent_of(CLONES[0]) == BASE
