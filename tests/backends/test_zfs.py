"""ZFS storage end to end, on a real pool in the zfs-fuse daemon (storage `zfs`): a template,
its linked and full clones and moves in and out, through the CLI, the queue and the workers;
what stork made is checked with the real `zfs` tool. Skipped, with the reason, where this
machine cannot run zfs-fuse."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from drivers import driver_for
from drivers.errors import Refused
from tests.conftest import NO_ZFS, ZFS
from tests.helpers import PATTERN_MIB, qemu_io_write, qemu_same, volume_path

pytestmark = pytest.mark.skipif(bool(NO_ZFS), reason=f"zfs: {NO_ZFS}")


def image(volid: str) -> Path:
    """A volume's image file: for zfs, `disk.raw` in its dataset's mountpoint."""
    storage, volname = volid.split(":", 1)
    return ZFS.mount / volname / "disk.raw" if storage == "zfs" else volume_path(volid)


def dataset(volid: str) -> str:
    return f"{ZFS.name}/{volid.split(':', 1)[1]}"


def zfs_get(prop: str, name: str) -> str:
    return subprocess.run(["zfs", "get", "-H", "-o", "value", prop, name], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def template(stork, vmid) -> tuple[int, str]:
    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=zfs:16M")
    assert code == 0, err
    qemu_io_write(image(f"zfs:{g}/vm-{g}-disk-0.raw"), "raw", PATTERN_MIB, PATTERN_MIB, 0x7a)
    code, _, err = stork("template", g)
    assert code == 0, err
    return g, f"zfs:base/base-{g}-disk-0.raw"


def test_a_template_is_a_read_only_dataset_whose_snapshot_its_clones_are_made_of(stork, client, vmid, template):
    """readonly=on: zfs-fuse refuses a new file in the base's dataset (it does not stop a write
    into an existing one, which root could force anyway); what a linked clone is made of is
    the snapshot @__base__, which nothing can change: a clone made after the base's file was
    overwritten behind stork's back still reads the template's data."""
    g, base = template
    assert client.guest(g).disks == {"scsi0": base}
    assert zfs_get("type", f"{dataset(base)}@__base__") == "snapshot"
    with pytest.raises(OSError) as refused:
        (image(base).parent / "new").write_bytes(b"x")
    assert refused.value.errno == errno.EROFS
    original = image(base).read_bytes()
    fd = os.open(image(base), os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * PATTERN_MIB, PATTERN_MIB)  # forced, as root could
    finally:
        os.close(fd)
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    assert image(client.guest(c).disks["scsi0"]).read_bytes() == original


def test_a_linked_clone_is_a_zfs_clone_of_the_bases_snapshot(stork, client, vmid, template):
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--linked")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk == f"zfs:{c}/vm-{c}-disk-0.raw"
    assert zfs_get("origin", dataset(disk)) == f"{dataset(base)}@__base__"
    assert client.volume(disk).parent == base and client.volume(base).clones == (disk,)
    assert qemu_same(image(base), image(disk))
    qemu_io_write(image(disk), "raw", 0, PATTERN_MIB, 0x11)
    assert not qemu_same(image(base), image(disk))
    code, _, err = stork("guest", "destroy", g)
    assert code == 1 and err == f"stork: guest {g}: base {base} still has linked clones: {disk}\n"  # at submit


def test_zfs_itself_refuses_to_free_a_base_with_clones_as_storks_refusal(stork, client, vmid, template):
    """Below stork's own clone check, ZFS's "snapshot has dependent clones" is a Refused."""
    g, base = template
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    drv = driver_for(client.cfg.storage("zfs"))
    with pytest.raises(Refused, match=rf"freeing {base} failed: it has linked clones \(ZFS: cannot destroy"):
        drv.free(drv.parse_volname(base.split(":", 1)[1]))
    assert zfs_get("type", f"{dataset(base)}@__base__") == "snapshot" and image(base).exists()


def test_a_full_clone_and_moves_between_zfs_and_dir_keep_the_data(stork, client, vmid, template):
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--full")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk.startswith(f"zfs:{c}/") and qemu_same(image(base), image(disk))
    assert zfs_get("origin", dataset(disk)) == "-"
    reference = image(disk).read_bytes()
    for storage, fmt in (("local", "qcow2"), ("zfs", "raw")):
        code, _, err = stork("disk", "move", c, "scsi0", storage, "--format", fmt)
        assert code == 0, err
        moved = client.guest(c).disks["scsi0"]
        assert moved.startswith(f"{storage}:") and moved.endswith(f".{fmt}")
    assert image(client.guest(c).disks["scsi0"]).read_bytes() == reference


def test_a_name_zfs_cannot_hold_is_refused_in_one_line(stork, vmid):
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=zfs:8M")[0] == 0
    code, out, err = stork("base", f"zfs:{g}/vm-{g}-disk-0.raw", "--name", "a+b")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "ZFS names cannot hold '+'" in err, err


def test_destroying_a_clone_and_its_template_leaves_no_dataset(stork, client, vmid, template):
    g, _ = template
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    assert stork("guest", "destroy", c)[0] == 0
    assert stork("guest", "destroy", g)[0] == 0
    listed = subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", ZFS.name], check=True,
                            capture_output=True, text=True).stdout
    assert f"{ZFS.name}/{c}\n" not in listed and f"/{c}/" not in listed and f"base-{g}-disk-0" not in listed
    assert f"{ZFS.name}/{g}\n" not in listed  # the emptied guest folder datasets went too


def test_a_base_left_without_its_snapshot_is_turned_back_and_freed(client, vmid):
    """make_base's process killed between its rename and its protect_base leaves a base
    without its snapshot: the undo turns it back into the disk, and a free of such a base
    frees it (each asks for the snapshot before destroying it: OpenZFS, unlike zfs-fuse,
    fails a destroy of a missing one with a message of its own, and the undo failed for ever)."""
    drv = driver_for(client.cfg.storage("zfs"))
    for n, end in enumerate(("unmade", "freed")):
        g = vmid()
        vol, base = drv.parse_volname(f"{g}/vm-{g}-disk-0.raw"), drv.parse_volname(f"base/base-{g}-disk-{n}.raw")
        drv.allocate(vol, 4 << 20)
        drv._ensure_folder(base)
        drv._rename(drv.dataset(vol), drv.dataset(base), "as make_base renames it")  # and dies
        assert f"{drv.dataset(base)}@" not in subprocess.run(["zfs", "list", "-H", "-t", "snapshot", "-o", "name"],
                                                              check=True, capture_output=True, text=True).stdout
        if end == "unmade":
            drv.unmake_base(base, vol)
            assert drv.exists(vol) and not drv.exists(base)
            drv.free(vol)
        else:
            drv.free(base)
            assert not drv.exists(base)
