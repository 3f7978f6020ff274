"""The dir driver against real files and the real qemu-img."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from drivers import driver_for
from drivers.config import StorageConfig
from drivers.errors import AlreadyExists, FeatureUnsupported, NotFound, StorageUnavailable
from drivers.names import VolName
from tests.helpers import tmpfs


@pytest.fixture
def drv(tmp_path):
    return driver_for(StorageConfig("local", "dir", options={"path": tmp_path / "images"}))


def path_of(drv, vol: VolName) -> Path:
    """Where the test looks at a volume's file (the driver itself hands out no paths)."""
    return drv.storage.path / str(vol)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_pattern(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_allocate_makes_a_sparse_image_of_the_asked_size(drv):
    """A new raw volume has its virtual size and allocates almost nothing."""
    vol = drv.next_disk_name(100, "raw")
    drv.allocate(vol, 10 << 30)
    info = drv.info(vol)
    assert (info.virtual_size, info.is_base, info.parent) == (10 << 30, False, None)
    assert info.allocated < 1 << 20
    with pytest.raises(AlreadyExists):
        drv.allocate(vol, 1 << 20)


def test_disk_names_count_up_per_guest(drv):
    """The next free vm-<vmid>-disk-N is chosen, whatever the format."""
    drv.allocate(drv.next_disk_name(100, "raw"), 1 << 20)
    assert str(drv.next_disk_name(100, "qcow2")) == "100/vm-100-disk-1.qcow2"
    assert str(drv.next_disk_name(101, "raw")) == "101/vm-101-disk-0.raw"


def test_make_base_renames_into_the_base_namespace_read_only(drv):
    """A base lives under base/, mode 0444, and refuses writes even from root."""
    vol = VolName(100, "vm-100-disk-0", "raw")
    drv.allocate(vol, 1 << 20)
    base = drv.default_base_name(vol)
    drv.make_base(vol, base)
    assert str(base) == "base/base-100-disk-0.raw"
    assert not drv.exists(vol) and drv.exists(base)
    path = path_of(drv, base)
    assert path.stat().st_mode & 0o777 == 0o444
    with pytest.raises(PermissionError):
        open(path, "r+b").close()  # immutable: even root cannot write
    drv.unmake_base(base, vol)
    assert drv.exists(vol) and not drv.exists(base)
    open(path_of(drv, vol), "r+b").close()


def test_linked_clone_reads_through_the_base_by_relative_path(drv):
    """A clone is a qcow2 overlay of the base; the storage tells parent and clones."""
    vol = VolName(100, "vm-100-disk-0", "raw")
    drv.allocate(vol, 4 << 20)
    write_pattern(path_of(drv, vol), 1 << 20, b"stork" * 1000)
    base = drv.default_base_name(vol)
    drv.make_base(vol, base)
    clone = drv.next_disk_name(101, "qcow2")
    drv.link_clone(base, clone)
    out = subprocess.run(["qemu-img", "info", "--output=json", path_of(drv, clone)],
                         capture_output=True, text=True, check=True).stdout
    assert '"backing-filename": "../base/base-100-disk-0.raw"' in out
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", path_of(drv, base), path_of(drv, clone)],
                   check=True)
    assert drv.info(clone).parent == "local:base/base-100-disk-0.raw"
    assert drv.info(base).clones == ("local:101/vm-101-disk-0.qcow2",)


def test_an_overlay_whose_backing_is_another_guests_disk_is_not_read_through(drv):
    """A qcow2 put or adopted in the storage whose backing file is guest 101's disk, not a base:
    nothing would keep that disk from being written, freed or renamed under it, so it is no
    linked clone (no parent, not among any clones) and opening it is refused, not followed."""
    from drivers.errors import Refused

    other = VolName(101, "vm-101-disk-0", "qcow2")
    drv.allocate(other, 4 << 20)
    overlay = VolName(100, "vm-100-disk-0", "qcow2")
    path_of(drv, overlay).parent.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../101/vm-101-disk-0.qcow2", "-F", "qcow2",
                    str(path_of(drv, overlay))], check=True, capture_output=True)
    assert drv.info(overlay).parent is None and drv.clones_of(other) == []
    refused = r"reads '\.\./101/vm-101-disk-0\.qcow2', which is not a base"
    with pytest.raises(Refused, match=refused), drv.image(overlay):
        pass


def test_files_that_are_no_volume_but_read_through_a_base_keep_it(drv):
    """A qcow2 under a name no volume id gives (a clone's copy kept as `.bak`, an image put in
    the guest's folder by hand) that reads through a base is named among the base's readers, and
    the base is not freed; files that read no base, or another one, and stork's own temp files
    (stale under the storage lock, swept by its next writer) are not."""
    vols = [VolName(100, "vm-100-disk-0", "raw"), VolName(102, "vm-102-disk-0", "raw")]
    for vol in vols:
        drv.allocate(vol, 4 << 20)
        drv.make_base(vol, drv.default_base_name(vol))
    base, other = (drv.default_base_name(vol) for vol in vols)
    clone = drv.next_disk_name(101, "qcow2")
    drv.link_clone(base, clone)
    folder = path_of(drv, clone).parent
    for name in ("vm-101-disk-0.qcow2.bak", ".vm-101-disk-0.qcow2.0123456789abcdef.tmp", "old disk.img"):
        subprocess.run(["cp", "-p", str(path_of(drv, clone)), str(folder / name)], check=True)
    (folder / "notes.raw").write_bytes(b"\0" * 4096)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "scratch.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base/base-102-disk-0.raw", "-F", "raw",
                    str(folder / "other.qcow2")], check=True)
    drv.free(clone)
    assert drv.clones_of(base) == []  # no volume reads it
    assert drv.readers_of(base) == [f"file {folder / 'old disk.img'}", f"file {folder / 'vm-101-disk-0.qcow2.bak'}"]
    assert drv.readers_of(other) == [f"file {folder / 'other.qcow2'}"]
    with pytest.raises(FeatureUnsupported, match=r"1 linked clone\(s\): file .*/other\.qcow2$"):
        drv.free_volume(other)
    assert drv.exists(other)


def test_a_volume_with_a_second_name_is_not_written(drv, tmp_path):
    """A hard link at a volume's name (O_NOFOLLOW does not see one) may be a file outside the
    storage: it is read as a volume, never written, resized or restored into."""
    from drivers.errors import Refused

    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"\0" * (1 << 20))
    vol = VolName(100, "vm-100-disk-0", "raw")
    path_of(drv, vol).parent.mkdir(parents=True)
    os.link(outside, path_of(drv, vol))
    assert drv.virtual_size(vol) == 1 << 20
    with pytest.raises(Refused, match=r"local:100/vm-100-disk-0.raw has another name \(a hard link\)"):
        drv.resize(vol, 2 << 20)
    assert outside.stat().st_size == 1 << 20
    # the second name a maker killed between link(2) and its temp name's unlink leaves is its own
    mine = VolName(100, "vm-100-disk-1", "raw")
    drv.allocate(mine, 1 << 20)
    os.link(path_of(drv, mine), path_of(drv, mine).with_name(".vm-100-disk-1.raw.0123456789abcdef.tmp"))
    drv.resize(mine, 2 << 20)
    assert drv.virtual_size(mine) == 2 << 20 and os.stat(path_of(drv, mine)).st_nlink == 1


def test_a_base_with_clones_cannot_be_freed_and_the_error_lists_them(drv):
    """Freeing a base that clones read through is refused, naming every clone."""
    base = VolName(None, "golden", "raw")
    drv.allocate(VolName(100, "vm-100-disk-0", "raw"), 1 << 20)
    drv.make_base(VolName(100, "vm-100-disk-0", "raw"), base)
    for vmid in (101, 102):
        drv.link_clone(base, drv.next_disk_name(vmid, "qcow2"))
    with pytest.raises(FeatureUnsupported, match=r"2 linked clone\(s\): local:101/vm-101-disk-0.qcow2, local:102/"):
        drv.free_volume(base)
    assert drv.exists(base)
    for vmid in (101, 102):
        drv.free_volume(VolName(vmid, f"vm-{vmid}-disk-0", "qcow2"))
    drv.free_volume(base)
    assert drv.list_volumes() == []


def test_features_refuse_writing_a_base_and_cloning_a_non_base(drv):
    """The feature table answers: bases are read-only, linked clones need a base."""
    current, base = VolName(100, "vm-100-disk-0", "raw"), VolName(None, "b", "raw")
    assert drv.has_feature("linked_clone", base) and not drv.has_feature("linked_clone", current)
    assert drv.has_feature("resize", current) and not drv.has_feature("resize", base)
    with pytest.raises(FeatureUnsupported, match=r"read-only base image"):
        drv.require_feature("resize", base)


def test_copy_from_makes_an_identical_sparse_image_in_another_format(drv, tmp_path):
    """A full copy raw -> qcow2 -> raw keeps the data and stays sparse; progress reaches 100%."""
    src = VolName(100, "vm-100-disk-0", "raw")
    drv.allocate(src, 64 << 20)
    write_pattern(path_of(drv, src), 10 << 20, os.urandom(1 << 20))
    mid, back = VolName(100, "vm-100-disk-1", "qcow2"), VolName(100, "vm-100-disk-2", "raw")
    seen = []
    for a, b in ((src, mid), (mid, back)):
        drv.allocate(b, drv.virtual_size(a))
        drv.copy_from(drv, a, b, progress=lambda done, total: seen.append((done, total)))
    drv.compare(drv, src, back)
    assert sha256(path_of(drv, src)) == sha256(path_of(drv, back))
    assert drv.allocated_size(back) < 4 << 20
    assert seen[-1] == (64 << 20, 64 << 20)
    subprocess.run(["qemu-img", "check", path_of(drv, mid)], check=True, capture_output=True)


def test_unknown_volume_is_not_found(drv):
    """Info on a volume that is not there names it."""
    with pytest.raises(NotFound, match=r"unknown volume local:100/vm-100-disk-9\.raw"):
        drv.info(VolName(100, "vm-100-disk-9", "raw"))


# ---- the storage's own keys: format, mkdir, is_mountpoint (as Proxmox VE's dir storage) ----------


def _dir(tmp_path: Path, **options) -> object:
    return driver_for(StorageConfig("d", "dir", options={"path": tmp_path / "d", **options}))


def test_a_missing_directory_is_made_by_status_and_jobs_alike(tmp_path):
    """mkdir (the default): the first status makes it, as the first job would; both agree."""
    drv = _dir(tmp_path, mkdir=True)
    assert drv.status()[0] > 0 and (tmp_path / "d").is_dir()


def test_with_mkdir_false_a_missing_directory_is_refused_everywhere(tmp_path):
    drv = _dir(tmp_path, mkdir=False)
    for use in (drv.status, lambda: drv.allocate(drv.next_disk_name(100, "raw"), 1 << 20)):
        with pytest.raises(StorageUnavailable, match=r"storage 'd': .*/d does not exist \(and mkdir = false\)"):
            use()
    assert not (tmp_path / "d").exists()


def test_is_mountpoint_refuses_a_directory_with_nothing_mounted(tmp_path):
    """Nothing is written onto the disk under an unmounted mount point; once mounted, it serves."""
    (tmp_path / "d").mkdir()
    drv = _dir(tmp_path, is_mountpoint=True)
    for use in (lambda: drv.allocate(VolName(100, "vm-100-disk-0", "raw"), 1 << 20), drv.list_volumes, drv.status):
        with pytest.raises(StorageUnavailable, match=r"is not a mounted file system \(is_mountpoint\)"):
            use()  # refused, listing included (an empty list would say the volumes are gone)
    assert list((tmp_path / "d").iterdir()) == []
    with tmpfs(tmp_path / "d", "8m"):
        vol = drv.next_disk_name(100, "raw")
        drv.allocate(vol, 1 << 20)
        assert drv.exists(vol)
        drv.free(vol)
    (tmp_path / "same-fs").mkdir()  # a bind mount of a directory of the same file system counts too
    done = subprocess.run(["mount", "--bind", str(tmp_path / "same-fs"), str(tmp_path / "d")], check=False)
    if done.returncode == 0:
        try:
            assert drv.status()[0] > 0
        finally:
            subprocess.run(["umount", str(tmp_path / "d")], check=False)


def test_a_storages_format_is_the_default_of_new_volumes(tmp_path):
    from drivers import config
    from worker.jobs import prepare

    text = ('[storage.q]\ntype = "dir"\npath = "q"\nformat = "qcow2"\n'
            '[storage.r]\ntype = "dir"\npath = "r"\n')
    cfg = config.parse(text, tmp_path / "s.toml", {"STORK_NODE": "n"})
    assert prepare._format(cfg, "q", None) == "qcow2" and prepare._format(cfg, "r", None) == "raw"
    assert prepare._format(cfg, "q", "raw") == "raw"  # said on the command line: that one
    assert prepare._format(cfg, "q", None, default="raw") == "raw"  # a copy keeps its source's format


def test_where_a_file_system_gives_no_generation_its_file_handle_tells_a_volume_from_a_later_one(tmp_path):
    """tmpfs gives no inode generation (neither do NFS and CIFS, whose servers reuse an inode
    number at once): the file handle stands in for it (on NFS, the server's, which holds the
    server's generation). A volume keeps its identity when renamed into base/ and when opened
    again; a volume made under its name after it was freed has another."""
    from drivers import safedir

    with tmpfs(tmp_path / "d", "8m"):
        drv = _dir(tmp_path)
        vol, base = VolName(100, "vm-100-disk-0", "raw"), VolName(None, "golden", "raw")
        drv.allocate(vol, 1 << 20)
        first = drv.identity(vol)
        assert first.split(":")[2].startswith("h") and drv.identity(vol) == first
        drv.make_base(vol, base)
        assert drv.identity(base) == first
        drv.free(base)
        drv.allocate(vol, 1 << 20)
        assert drv.identity(vol) != first
        fd = os.open(tmp_path / "d" / "100" / "vm-100-disk-0.raw", os.O_RDONLY)
        try:
            assert safedir._handle_digest(fd) == drv.identity(vol).split(":")[2]
        finally:
            os.close(fd)


@pytest.fixture
def folding(tmp_path):
    """A dir storage on a file system that folds case: a ZFS dataset with casesensitivity=
    insensitive in the session's zfs-fuse pool (as a CIFS share is)."""
    from tests.conftest import NO_ZFS, ZFS

    if NO_ZFS:
        pytest.skip(f"zfs: {NO_ZFS}")
    dataset = f"{ZFS.name}/folds{tmp_path.name[-12:].replace('-', '')}"
    subprocess.run(["zfs", "create", "-o", "casesensitivity=insensitive", dataset], check=True, capture_output=True)
    try:
        yield driver_for(StorageConfig("cifs", "dir", options={"path": ZFS.mount / dataset.split("/", 1)[1]}))
    finally:
        subprocess.run(["zfs", "destroy", "-r", dataset], check=False, capture_output=True)


def test_a_volume_id_in_another_case_is_unknown_where_the_file_system_folds_case(folding):
    """`VM-100-DISK-0` finds the file of `vm-100-disk-0` there, but guest configs, job records and
    the clones' headers name it as spelled: an id in another case is no volume, and freeing,
    basing or opening it is refused, the volume and the base its clone reads through kept."""
    drv = folding
    disk, base = VolName(100, "vm-100-disk-0", "raw"), VolName(None, "golden", "raw")
    drv.allocate(disk, 1 << 20)
    drv.allocate(VolName(101, "vm-101-disk-0", "raw"), 1 << 20)
    drv.make_base(VolName(101, "vm-101-disk-0", "raw"), base)
    clone = drv.next_disk_name(102, "qcow2")
    drv.link_clone(base, clone)
    assert (drv.storage.path / "100" / "VM-100-DISK-0.raw").exists()  # the file system folds case
    for other in (VolName(100, "VM-100-DISK-0", "raw"), VolName(None, "Golden", "raw")):
        assert not drv.exists(other)
        with pytest.raises(NotFound, match="unknown volume"):
            drv.free_volume(other)
        with pytest.raises(NotFound, match="unknown volume"):
            drv.identity(other)
    drv.free(VolName(None, "GOLDEN", "raw"))  # an undo's free of a name it never made: nothing to do
    assert drv.exists(disk) and drv.exists(base) and drv.parent_of(clone) == base
    assert drv.clones_of(base) == [clone]
