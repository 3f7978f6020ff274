"""Full copies on a dir storage whose filesystem shares extents (a real XFS made with
reflink=1 on a loop device, storage `xfs`): within it a copy shares the source's extents
(FICLONE) instead of copying data; to another filesystem, or from a linked clone (whose data
is partly its base's), it is the qemu-img copy. Skipped, with the reason, where this machine
cannot make an XFS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import NO_XFS
from tests.helpers import PATTERN_MIB, qemu_io_write, qemu_same, volume_path

pytestmark = pytest.mark.skipif(bool(NO_XFS), reason=f"xfs: {NO_XFS}")


def shared_extents(path: Path) -> int:
    """How many of the file's extents the filesystem reports as shared (filefrag's flag)."""
    out = subprocess.run(["filefrag", "-v", str(path)], check=True, capture_output=True, text=True).stdout
    return sum("shared" in line for line in out.splitlines())


def guest_on_xfs(stork, g: int) -> str:
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=xfs:32M")
    assert code == 0, err
    disk = f"xfs:{g}/vm-{g}-disk-0.raw"
    qemu_io_write(volume_path(disk), "raw", 0, 8 * PATTERN_MIB, 0x6d)
    return disk


def test_a_full_clone_on_the_same_xfs_shares_extents(stork, client, vmid):
    g, c = vmid(), vmid()
    disk = guest_on_xfs(stork, g)
    code, _, err = stork("clone", g, c, "--full")
    assert code == 0, err
    copy = client.guest(c).disks["scsi0"]
    assert copy.startswith(f"xfs:{c}/") and qemu_same(volume_path(disk), volume_path(copy))
    assert shared_extents(volume_path(copy)) > 0 and shared_extents(volume_path(disk)) > 0
    qemu_io_write(volume_path(copy), "raw", 0, PATTERN_MIB, 0x01)  # copy-on-write: the source keeps its data
    assert not qemu_same(volume_path(disk), volume_path(copy))


def test_a_copy_to_another_filesystem_is_a_plain_copy(stork, client, vmid):
    g, c = vmid(), vmid()
    disk = guest_on_xfs(stork, g)
    code, _, err = stork("clone", g, c, "--full", "--storage", "local")
    assert code == 0, err
    copy = client.guest(c).disks["scsi0"]
    assert copy.startswith(f"local:{c}/") and qemu_same(volume_path(disk), volume_path(copy))
    assert shared_extents(volume_path(copy)) == 0 and shared_extents(volume_path(disk)) == 0


def test_a_full_clone_of_a_linked_clone_is_flattened_not_shared(stork, client, vmid):
    """A linked clone's file is an overlay that reads through its base: a full clone of it
    is the guest's whole data, made by qemu-img, with no base."""
    g, linked, full = vmid(), vmid(), vmid()
    guest_on_xfs(stork, g)
    assert stork("template", g)[0] == 0
    assert stork("clone", g, linked, "--linked")[0] == 0
    code, _, err = stork("clone", linked, full, "--full")
    assert code == 0, err
    source, copy = client.guest(linked).disks["scsi0"], client.guest(full).disks["scsi0"]
    assert client.volume(copy).parent is None and client.volume(source).parent is not None
    assert qemu_same(volume_path(source), volume_path(copy))
