"""btrfs storage end to end, on a real btrfs on a loop device (storage `bt`): a template, its
linked and full clones and moves in and out, through the CLI, the queue and the workers; what
stork made is checked with the real `btrfs` tool. Skipped, with the reason, where this machine
cannot make a btrfs."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from drivers import driver_for
from drivers.errors import Refused, StorageUnavailable
from drivers.names import VolName
from drivers.storage import StorageConfig
from tests.conftest import NO_BTRFS, storage_path
from tests.helpers import PATTERN_MIB, qemu_io_write, qemu_same, volume_path

pytestmark = pytest.mark.skipif(bool(NO_BTRFS), reason=f"btrfs: {NO_BTRFS}")


def image(volid: str) -> Path:
    """A btrfs volume's image file: `disk.raw` in its subvolume."""
    storage, volname = volid.split(":", 1)
    return (storage_path(storage) / volname / "disk.raw") if storage == "bt" else volume_path(volid)


def btrfs(*args: str) -> str:
    return subprocess.run(["btrfs", *args], check=True, capture_output=True, text=True).stdout


def show(volid: str) -> dict[str, str]:
    """`btrfs subvolume show` of a volume's subvolume, as field -> value."""
    out = btrfs("subvolume", "show", str(image(volid).parent))
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()[1:]) if v}


@pytest.fixture
def template(stork, vmid) -> tuple[int, str]:
    """A template on bt whose base holds a pattern; (vmid, base volume id)."""
    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=bt:16M")
    assert code == 0, err
    qemu_io_write(image(f"bt:{g}/vm-{g}-disk-0.raw"), "raw", PATTERN_MIB, PATTERN_MIB, 0x5b)
    code, _, err = stork("template", g)
    assert code == 0, err
    return g, f"bt:base/base-{g}-disk-0.raw"


def test_a_template_is_a_read_only_subvolume(client, template):
    g, base = template
    assert client.guest(g).disks == {"scsi0": base}
    assert btrfs("property", "get", str(image(base).parent), "ro").strip() == "ro=true"
    with pytest.raises(OSError) as refused, open(image(base), "r+b"):
        pass
    assert refused.value.errno == errno.EROFS  # read-only for root too: the filesystem refuses, not file modes
    assert client.volume(base).is_base


def test_a_linked_clone_is_a_snapshot_whose_parent_is_the_base(stork, client, vmid, template):
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--linked")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk == f"bt:{c}/vm-{c}-disk-0.raw"
    assert show(disk)["Parent UUID"] == show(base)["UUID"]  # btrfs itself says which base it is of
    assert client.volume(disk).parent == base and client.volume(base).clones == (disk,)
    assert qemu_same(image(base), image(disk))
    qemu_io_write(image(disk), "raw", 0, PATTERN_MIB, 0x11)  # the clone is writable, the base unchanged
    assert not qemu_same(image(base), image(disk))
    code, _, err = stork("guest", "destroy", g)
    assert code == 1 and err == f"stork: guest {g}: base {base} still has linked clones: {disk}\n"  # at submit
    assert image(base).exists()


def test_a_full_clone_on_the_same_btrfs_shares_extents(stork, client, vmid, template):
    """Copied by FICLONE: equal data, and the filesystem reports the extents as shared."""
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--full")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk.startswith(f"bt:{c}/") and qemu_same(image(base), image(disk))
    assert client.volume(disk).parent is None  # a copy: no link to the base
    usage = btrfs("filesystem", "du", "--raw", str(image(disk)))
    _, exclusive, shared = (int(x) for x in usage.splitlines()[1].split()[:3])
    assert shared >= PATTERN_MIB and exclusive == 0, usage


def test_disks_move_between_btrfs_and_dir_storage(stork, client, vmid):
    """A disk moved from dir to bt and back, in raw and qcow2: equal data at each hop."""
    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=local:16M")
    assert code == 0, err
    qemu_io_write(volume_path(f"local:{g}/vm-{g}-disk-0.raw"), "raw", 0, 2 * PATTERN_MIB, 0x3c)
    reference = image(f"local:{g}/vm-{g}-disk-0.raw").read_bytes()
    for storage, fmt in (("bt", "raw"), ("local", "qcow2"), ("bt", "raw")):
        code, _, err = stork("disk", "move", g, "scsi0", storage, "--format", fmt)
        assert code == 0, err
        disk = client.guest(g).disks["scsi0"]
        assert disk.startswith(f"{storage}:") and disk.endswith(f".{fmt}")
        flat = image(disk)
        if fmt == "qcow2":
            assert client.volume(disk).virtual_size == len(reference)
        else:
            assert flat.read_bytes() == reference


def test_btrfs_refuses_qcow2_in_one_line(stork, vmid):
    g = vmid()
    code, out, err = stork("guest", "create", g, "--disk", "scsi0=bt:16M,format=qcow2")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "storage 'bt' cannot hold qcow2 volumes" in err


def test_destroying_a_clone_and_its_template_leaves_no_subvolume(stork, client, vmid, template):
    g, _ = template
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    assert stork("guest", "destroy", c)[0] == 0
    assert stork("guest", "destroy", g)[0] == 0
    listed = btrfs("subvolume", "list", "-o", str(storage_path("bt")))
    assert f"{c}/" not in listed and f"base-{g}-disk-0" not in listed
    assert not (storage_path("bt") / str(c)).exists()


@pytest.mark.parametrize("call", ["allocate", "exists", "identity", "free", "free_partial", "free_volume",
                                  "unmake_base"])
def test_a_btrfs_storage_on_another_filesystem_is_unavailable_in_one_line(tmp_path, call):
    """An unmounted btrfs leaves a plain directory of the root filesystem at the path: every
    call is refused as unavailable (an undo is tried again), naming it, before anything is made
    there; none reads the empty directory as the storage (a volume gone, nothing to free, a base
    never renamed), and none of the plain directory's entries is removed."""
    drv = driver_for(StorageConfig("lost", "btrfs", options={"path": tmp_path}))
    vol = drv.parse_volname("100/vm-100-disk-0.raw")
    (tmp_path / "100").mkdir()
    (tmp_path / "100" / "vm-100-disk-0.raw").mkdir()  # what a copy of the tree there would hold
    args = {"allocate": (vol, 1 << 20), "unmake_base": (drv.parse_volname("base/base-100-disk-0.raw"), vol)}
    with pytest.raises(StorageUnavailable, match=rf"storage 'lost': {tmp_path} is not on a btrfs filesystem"):
        getattr(drv, call)(*args.get(call, (vol,)))
    assert [p.name for p in tmp_path.rglob("*")] == ["100", "vm-100-disk-0.raw"]


def test_a_subvolume_mounted_over_a_volumes_name_is_not_deleted(client, vmid):
    """A bind mount puts another subvolume at a volume's name: freeing the volume is refused,
    and the other subvolume (reached through the mount) is not deleted."""
    drv = driver_for(client.cfg.storage("bt"))
    g, other = vmid(), vmid()
    vol, elsewhere = (drv.parse_volname(f"{n}/vm-{n}-disk-0.raw") for n in (g, other))
    drv.allocate(vol, 1 << 20)
    drv.allocate(elsewhere, 1 << 20)
    target = image(f"bt:{vol}").parent
    subprocess.run(["mount", "--bind", str(image(f"bt:{elsewhere}").parent), str(target)], check=True)
    try:
        with pytest.raises(Refused, match="not held by its folder"):
            drv.free(vol)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert drv.exists(elsewhere) and image(f"bt:{elsewhere}").exists() and drv.exists(vol)
    drv.free(vol)
    drv.free(elsewhere)


def test_with_is_mountpoint_a_directory_of_a_btrfs_that_is_no_mount_is_unavailable(client):
    """Where the host's root file system is a btrfs, an unmounted storage leaves a plain
    directory that is on a btrfs too: `is_mountpoint` tells it apart by the mount table (a
    directory inside the test's btrfs stands for it); the mount itself is the storage."""
    root = storage_path("bt")
    inside = root / "not-a-mount"
    inside.mkdir(exist_ok=True)
    vol = VolName(100, "vm-100-disk-0", "raw")
    unmounted = driver_for(StorageConfig("lost", "btrfs", options={"path": inside, "is_mountpoint": True}))
    with pytest.raises(StorageUnavailable, match=rf"storage 'lost': {inside} is not a mounted file system"):
        unmounted.exists(vol)
    mounted = driver_for(StorageConfig("bt2", "btrfs", options={"path": root, "is_mountpoint": True}))
    assert not mounted.exists(vol)  # asked of the mounted btrfs: no such volume there
    inside.rmdir()
