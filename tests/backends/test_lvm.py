"""Thick LVM storage against the real lvm2, on a volume group on a loop device. This kernel
has no device-mapper: with `activation = 0` (an lvm.conf of the test's own, through
LVM_SYSTEM_DIR), LVM creates, lists, renames, tags, makes read-only and removes LVs, and that
is what runs here. Whatever needs an active LV (zeroing a new one, any data I/O) is refused
by LVM here: `allocate` then fails in one line and leaves no LV, and the data tests skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from drivers import driver_for
from drivers.backends.lvm import LvmDriver
from drivers.errors import FeatureUnsupported, InvalidName, NotFound, StorkError
from drivers.names import VolName
from drivers.storage import StorageConfig
from tests.storages import DEVICE_MAPPER, lvm, volume_group

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("lvm"), reason="needs root and lvm2")


@pytest.fixture(scope="module")
def vg(tmp_path_factory) -> Iterator[str]:
    with volume_group(tmp_path_factory.mktemp("lvm")) as name:
        yield name


@pytest.fixture
def drv(vg) -> Iterator[LvmDriver]:
    d = driver_for(StorageConfig("thick", "lvm", options={"vgname": vg}))
    assert isinstance(d, LvmDriver)
    yield d
    for vol in d.list_volumes():
        lvm("lvremove", "-q", "-y", f"{vg}/{vol.owner if vol.owner else 'base'}.{vol.name}.{vol.fmt}")


def made(drv: LvmDriver, vol: VolName, size: int = 8 << 20) -> None:
    """An LV as `allocate` leaves it, made directly (allocate zeroes it, which needs an active LV)."""
    lvm("lvcreate", "-q", "-an", "-Zn", "-L", f"{size}b", "-n", f"{vol.owner or 'base'}.{vol.name}.{vol.fmt}", drv.vg)


def attr(drv: LvmDriver, vol: VolName) -> tuple[str, str]:
    name = f"{drv.vg}/{vol.owner or 'base'}.{vol.name}.{vol.fmt}"
    out = lvm("lvs", "--noheadings", "-o", "lv_attr,lv_tags", name).split()
    return out[0], out[1] if len(out) > 1 else ""


def test_volumes_are_lvs_listed_from_one_lvs(drv):
    vol = VolName(100, "vm-100-disk-0", "raw")
    made(drv, vol)
    assert drv.list_volumes() == [vol] and drv.exists(vol) and drv.list_volumes(100) == [vol]
    info = drv.info(vol)
    assert info.virtual_size == 8 << 20 and info.allocated == 8 << 20 and info.parent is None
    assert drv.identity(vol) == lvm("lvs", "--noheadings", "-o", "lv_uuid", f"{drv.vg}/100.vm-100-disk-0.raw").strip()
    total, used, free = drv.status()
    assert total == used + free and used >= 8 << 20


def test_a_base_is_renamed_read_only_and_tagged_and_back(drv):
    vol, base = VolName(100, "vm-100-disk-0", "raw"), VolName(None, "base-100-disk-0", "raw")
    made(drv, vol)
    uuid = drv.identity(vol)
    drv.make_base(vol, base)
    assert drv.list_volumes() == [base] and drv.identity(base) == uuid
    assert attr(drv, base)[0][1] == "r" and attr(drv, base)[1] == "stork-base"
    drv.protect_base(base)  # idempotent
    drv.unmake_base(base, vol)
    assert drv.list_volumes() == [vol] and attr(drv, vol)[0][1] == "w" and attr(drv, vol)[1] == ""


def test_free_removes_the_lv_and_is_a_no_op_when_gone(drv):
    vol = VolName(100, "vm-100-disk-0", "raw")
    made(drv, vol)
    drv.free_volume(vol)
    assert drv.list_volumes() == []
    drv.free(vol)
    with pytest.raises(NotFound, match=r"unknown volume thick:100/vm-100-disk-0\.raw"):
        drv.info(vol)


def test_thick_lvm_makes_no_linked_clones_and_copies_write_zeros(drv):
    base = VolName(None, "b", "raw")
    with pytest.raises(FeatureUnsupported, match="lvm storage does not support it"):
        drv.require_feature("linked_clone", base)
    assert drv.has_feature("make_base", VolName(100, "vm-100-disk-0", "raw"))
    assert not drv.new_volumes_read_zero  # a new LV holds old data: no zero area is skipped


def test_a_name_lvm_reserves_is_refused_in_one_line(drv):
    with pytest.raises(InvalidName, match="LVM reserves names holding _tmeta"):
        drv.parse_volname("base/x_tmeta.raw")


@pytest.mark.skipif(DEVICE_MAPPER, reason="with device-mapper, allocate zeroes the LV and succeeds")
def test_allocate_without_device_mapper_fails_in_one_line_and_leaves_no_lv(drv):
    """allocate zeroes the new LV (another guest's old data must not show through); where
    the LV cannot be activated that fails, and the LV it made is removed again."""
    vol = VolName(100, "vm-100-disk-0", "raw")
    with pytest.raises(StorkError) as failed:
        drv.allocate(vol, 8 << 20)
    assert "activating thick:100/vm-100-disk-0.raw failed" in str(failed.value) and "\n" not in str(failed.value)
    assert drv.list_volumes() == []


def lv_tags(vg: str) -> dict[str, str]:
    out = lvm("lvs", "--noheadings", "--separator", "|", "-o", "lv_name,lv_tags", vg)
    return dict(line.strip().split("|", 1) for line in out.splitlines() if line.strip())


def test_an_lv_a_killed_allocate_left_unzeroed_is_no_volume_and_goes_before_its_name_is_made(drv, vg):
    """allocate tags a new LV until it is zeroed whole. One a killed process left so (made here
    by hand, as its lvcreate left it: another guest's old data in it) is neither listed nor
    found (listed as a stray, its name not given again), so a step tried again never takes it
    for made; free_partial removes it, and so does an allocate of that name, before its own
    lvcreate."""
    vol, flat = VolName(100, "vm-100-disk-0", "raw"), "100.vm-100-disk-0.raw"

    def left_unzeroed() -> None:
        lvm("lvcreate", "-q", "-y", "-an", "-Zn", "--addtag", "stork-zeroing", "-L", "8m", "-n", flat, vg)

    left_unzeroed()
    assert lv_tags(vg) == {flat: "stork-zeroing"} and not drv.exists(vol) and drv.list_volumes() == []
    [(stray, problem)] = drv.strays()
    assert stray == vol and problem.startswith(f"LV {vg}/{flat} was never zeroed whole")
    assert drv.next_disk_name(100, "raw", set()).name == "vm-100-disk-1"  # its name not given again
    drv.free_partial(vol)
    assert lv_tags(vg) == {}
    left_unzeroed()
    try:
        drv.allocate(vol, 8 << 20)
    except StorkError as e:  # no device-mapper here: the new LV cannot be zeroed, and is removed
        assert not DEVICE_MAPPER and "activating" in str(e)
        assert lv_tags(vg) == {}
    else:
        assert lv_tags(vg) == {flat: ""} and drv.list_volumes() == [vol]


@pytest.mark.skipif(not DEVICE_MAPPER, reason="this kernel has no device-mapper: no LV can be activated for data")
def test_allocate_zeroes_and_copies_land_on_the_lv(drv, tmp_path):
    vol = VolName(100, "vm-100-disk-0", "raw")
    drv.allocate(vol, 8 << 20)
    with drv.image(vol) as image:
        assert os.pread(image.fds[0], 1 << 20, 0) == b"\0" * (1 << 20)


@pytest.mark.skipif(DEVICE_MAPPER, reason="with device-mapper the zeroing works: the test after this one runs")
def test_a_resize_that_cannot_zero_what_it_added_shrinks_the_lv_back_in_one_line(drv):
    """The extents lvextend adds hold another guest's old data: resize zeroes them before it
    ends. Where that fails (no device-mapper here to activate the LV), the LV is shrunk back
    to its old size, and the error is one line; so does the zeroing of a resize tried again."""
    vol = VolName(100, "vm-100-disk-0", "raw")
    made(drv, vol, 8 << 20)
    with pytest.raises(StorkError) as failed:
        drv.resize(vol, 16 << 20)
    assert drv.virtual_size(vol) == 8 << 20
    drv.group.resize(vol, 16 << 20)  # a try that died after its lvextend
    with pytest.raises(StorkError):
        drv.zero_grown(vol, 8 << 20)
    assert "activating thick:100/vm-100-disk-0.raw failed" in str(failed.value) and "\n" not in str(failed.value)
    assert drv.virtual_size(vol) == 8 << 20


@pytest.mark.skipif(not DEVICE_MAPPER, reason="this kernel has no device-mapper: no LV can be activated for data")
def test_what_a_resize_adds_reads_as_zeros_also_when_tried_again_after_a_crash(drv, vg):
    """An LV filled with a pattern is removed; a new LV grows into its old extents: what it
    gains reads as zeros, after a resize and after a try that died between lvextend and the
    zeroing (resize_volume tried again zeroes past the size it saved)."""
    old = VolName(100, "vm-100-disk-9", "raw")
    drv.allocate(old, 64 << 20)
    with drv.image(old, write=True) as image:
        os.pwrite(image.fds[0], b"\xaa" * (64 << 20), 0)
    drv.free(old)
    for n in range(2):
        vol = VolName(100, f"vm-100-disk-{n}", "raw")
        drv.allocate(vol, 8 << 20)
        if n == 0:
            drv.resize(vol, 32 << 20)
        else:
            drv.group.resize(vol, 32 << 20)  # the try before died here
            drv.zero_grown(vol, 8 << 20)  # what resize_volume does when tried again
        with drv.image(vol) as image:
            assert os.pread(image.fds[0], 24 << 20, 8 << 20) == b"\0" * (24 << 20)


def test_a_base_of_a_disk_a_guest_runs_from_is_refused_where_no_linked_clone_can_be_made(drv, vg, tmp_path):
    """`stork base` gives a running guest a linked clone of its new base; thick LVM makes none,
    so it is refused before a job exists, naming `stork template` (the data stays as it was)."""
    from drivers import config
    from drivers.errors import Refused
    from drivers.guests import Guest, GuestStore
    from worker.jobs import prepare

    vol = VolName(100, "vm-100-disk-0", "raw")
    made(drv, vol)
    cfg = config.parse(f'[paths]\nguests = "g"\nlocks = "l"\n[storage.thick]\ntype = "lvm"\nvgname = "{vg}"\n',
                       tmp_path / "stork.toml", {"STORK_NODE": "n"})
    GuestStore(cfg.guests_dir).create(Guest(100, "n", disks={"scsi0": "thick:100/vm-100-disk-0.raw"}))
    with pytest.raises(Refused, match=r"guest 100 runs from thick:100/vm-100-disk-0.raw, .* cannot give it a linked "
                                      r"clone .*'stork template 100'"):
        prepare.prepare_base({"volid": "thick:100/vm-100-disk-0.raw"}, cfg)
    assert drv.list_volumes() == [vol]
