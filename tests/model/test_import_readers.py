"""Who reads an image to import (drivers/qemu.py: reader_for), decided on real files: a user's
file by that user, root's by root; and the files refused because another user could rewrite
them between stork's checks and qemu's reads."""

from __future__ import annotations

import os
import pwd
import re

import pytest

from drivers import qemu, safedir
from drivers.errors import InvalidName
from drivers.tools import Reader

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of other users'")

NOBODY = pwd.getpwnam("nobody")


@pytest.mark.parametrize(("uid", "gid", "mode", "expected"), [
    (0, 0, 0o644, None),  # root's: read as root
    (0, 0, 0o600, None),
    (0, 0, 0o664, None),  # root's own group, no other member
    (NOBODY.pw_uid, NOBODY.pw_gid, 0o644, Reader(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")),
    (NOBODY.pw_uid, NOBODY.pw_gid, 0o664, Reader(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")),  # umask 002
    (NOBODY.pw_uid, 0, 0o640, Reader(NOBODY.pw_uid, NOBODY.pw_gid, "nobody")),  # the owner's groups, not the file's
    (4242, 4242, 0o644, Reader(4242, 65534, None)),  # no passwd entry: no groups
    (0, 0, 0o646, "others than its owner may write it (mode 0646)"),
    (NOBODY.pw_uid, NOBODY.pw_gid, 0o666, "others than its owner may write it (mode 0666)"),
    (NOBODY.pw_uid, 0, 0o664, "others than its owner may write it (mode 0664)"),  # not the owner's group
    (NOBODY.pw_uid, NOBODY.pw_gid, 0o044, "its owner (uid 65534) may not read it"),
], ids=["root", "root-private", "root-group-writable", "user", "user-umask-002", "user-file-in-root-group",
        "uid-without-passwd", "root-world-writable", "user-world-writable", "user-group-writable-root-group",
        "user-unreadable-to-owner"])
def test_who_reads_an_import(tmp_path, uid, gid, mode, expected):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    os.chown(path, uid, gid)
    path.chmod(mode)
    fd = os.open(path, os.O_RDONLY)
    try:
        if isinstance(expected, str):
            with pytest.raises(InvalidName, match="^" + re.escape(f"{path}: {expected}")):
                qemu.reader_for(fd, str(path))
        else:
            assert qemu.reader_for(fd, str(path)) == expected
    finally:
        os.close(fd)



MOUNTS = [
    "27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
    "40 27 0:45 / /mnt/user\\040files rw,nosuid,nodev,relatime shared:20 - fuse.sshfs me@host:/ "
    "rw,user_id=1000,group_id=1000,allow_other",
    "41 27 0:46 / /mnt/ntfs rw,relatime - fuseblk /dev/sdb1 rw,user_id=0,group_id=0,allow_other",
    "42 27 0:47 / /mnt/odd rw - fuse.thing thing rw,group_id=0",
    "43 27 0:48 / /zfs/pool rw - fuse zfs-fuse rw,user_id=0,group_id=0,default_permissions,allow_other",
]


@pytest.mark.parametrize(("device", "expected"), [
    ("254:1", None),  # ext4: the files' owners are the kernel's word
    ("0:45", 1000),  # a user's sshfs: that user's daemon makes up every owner, root's too
    ("0:46", None),  # root's FUSE
    ("0:48", None),
])
def test_who_answers_for_a_fuse_file_system(device, expected):
    assert qemu.fuse_mounter(MOUNTS, device) == expected


def test_a_fuse_file_system_missing_from_the_mount_table_cannot_be_told():
    """Reached through another mount namespace (/proc/PID/root/...), or a line split by a form
    feed in its mount point had the table been split on every line break: refused, not trusted."""
    with pytest.raises(LookupError):
        qemu.fuse_mounter(MOUNTS, "0:99")
    split = "40 27 0:45 / /mnt/a\fb rw - fuse.sshfs me@host:/ rw,user_id=1000,group_id=1000"
    assert qemu.fuse_mounter(split.split("\n"), "0:45") == 1000
    with pytest.raises(LookupError):
        qemu.fuse_mounter(split.splitlines(), "0:45")


def test_the_file_system_of_an_ordinary_file_is_no_fuse(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(512))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert safedir.fs_magic(fd) != qemu.FUSE_MAGIC and qemu._fuse_mounter(fd, str(path)) is None
    finally:
        os.close(fd)


def test_a_fuse_mount_that_does_not_say_who_mounted_it_cannot_be_told():
    with pytest.raises(ValueError):
        qemu.fuse_mounter(MOUNTS, "0:47")
