"""A dir storage of Proxmox VE's layout (`layout = "pve"`), against a tree made the way
Proxmox VE makes it (qemu-img run in `images/`, as pve-storage's clone_image runs it) and the
real qemu-img: stork reads what is there and writes names and backing paths Proxmox VE reads."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from drivers import driver_for, pve
from drivers.backends.base import ForeignLock
from drivers.config import StorageConfig
from drivers.errors import InvalidName, Refused, StorageUnavailable
from drivers.names import VolName

BASE = VolName(None, "base-100-disk-0", "qcow2")
CLONE = VolName(101, "vm-101-disk-0", "qcow2")


def qemu_img(cwd: Path, *args: str) -> None:
    subprocess.run(["qemu-img", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tree(tmp_path):
    """Proxmox VE's /var/lib/vz after `qm template 100` and `qm clone 100 101`, plus a VM 102
    with a raw disk, a vmdk it imported and a file named as Proxmox VE allows but does not number."""
    images = tmp_path / "vz" / "images"
    for vmid in ("100", "101", "102"):
        (images / vmid).mkdir(parents=True)
    qemu_img(images, "create", "-f", "qcow2", "100/base-100-disk-0.qcow2", "64M")
    os.chmod(images / "100/base-100-disk-0.qcow2", 0o444)  # as create_base leaves it
    qemu_img(images, "create", "-b", "../100/base-100-disk-0.qcow2", "-F", "qcow2", "-f", "qcow2",
             "101/vm-101-disk-0.qcow2")
    qemu_img(images, "create", "-f", "raw", "102/vm-102-disk-0.raw", "32M")
    qemu_img(images, "create", "-f", "vmdk", "102/vm-102-disk-1.vmdk", "32M")
    (images / "102" / "notes.raw").write_bytes(b"")
    return tmp_path / "vz"


@pytest.fixture
def drv(tree, tmp_path):
    return driver_for(StorageConfig("local", "dir", options={"path": tree, "layout": "pve", "pve_config": False}))


def backing_of(path: Path) -> str:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, check=True)
    return json.loads(out.stdout).get("backing-filename", "")


def test_what_proxmox_ve_made_is_listed_with_its_parents_and_clones(drv):
    assert sorted(drv.volid(v) for v in drv.list_volumes()) == [
        "local:100/base-100-disk-0.qcow2", "local:101/vm-101-disk-0.qcow2", "local:102/vm-102-disk-0.raw"]
    assert drv.info(BASE).is_base and drv.info(BASE).clones == ("local:101/vm-101-disk-0.qcow2",)
    assert drv.info(CLONE).parent == "local:100/base-100-disk-0.qcow2"
    assert drv.list_volumes(100) == []  # a template's base is not one of the guest's writable disks
    assert drv.parse_volname("100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2") == CLONE


def test_a_linked_clone_stork_makes_is_the_one_proxmox_ve_makes(drv, tree):
    vol = drv.next_disk_name(103, "qcow2")
    drv.link_clone(BASE, vol)
    path = tree / "images" / "103" / "vm-103-disk-0.qcow2"
    assert backing_of(path) == "../100/base-100-disk-0.qcow2"  # what pve-storage's list_images reads as a clone
    assert drv.parent_of(vol) == BASE
    assert sorted(drv.volid(c) for c in drv.clones_of(BASE)) == [
        "local:101/vm-101-disk-0.qcow2", "local:103/vm-103-disk-0.qcow2"]
    assert not [e for e in os.listdir(tree / "images" / "103") if e != "vm-103-disk-0.qcow2"]


def test_a_base_is_made_beside_the_guests_disks_read_only_but_deletable_by_proxmox_ve(drv, tree):
    vol = VolName(102, "vm-102-disk-0", "raw")
    base = drv.free_base_name(vol)
    assert drv.volid(base) == "local:102/base-102-disk-0.raw"
    drv.make_base(vol, base)
    path = tree / "images" / "102" / "base-102-disk-0.raw"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    flags = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True)
    assert flags.returncode != 0 or "i" not in flags.stdout.split()[0]  # never immutable: Proxmox VE unlinks it
    # disk-0 is taken by the template's base, disk-1 by the vmdk, as Proxmox VE numbers disks
    assert drv.next_disk_name(102, "raw") == VolName(102, "vm-102-disk-2", "raw")
    drv.unmake_base(base, vol)
    assert drv.exists(vol) and not drv.exists(base)


def test_names_stork_cannot_place_in_proxmox_ves_layout_are_refused(drv):
    with pytest.raises(InvalidName, match="base-<vmid>-<name>"):
        drv.volid(VolName(None, "debian-12", "raw"))
    with pytest.raises(InvalidName):
        drv.parse_volname("base/base-100-disk-0.qcow2")  # stork's own layout
    with pytest.raises(InvalidName, match=r"raw\|qcow2"):
        drv.parse_volname("102/vm-102-disk-1.vmdk")  # Proxmox VE writes vmdk too: stork reads none


@pytest.fixture
def etc(tmp_path, tree):
    """Proxmox VE's /etc/pve: its storage.cfg names the tree `tank` (and `again`, a second id
    of the same folder through a symlink), and guests of two nodes."""
    etc = tmp_path / "etc-pve"
    (etc / "nodes" / "pve1" / "qemu-server").mkdir(parents=True)
    (etc / "nodes" / "pve2" / "lxc").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tree)
    (etc / "storage.cfg").write_text(f"dir: tank\n\tpath {tree}\n\tcontent images\n\n"
                                     f"dir: again\n\tpath {tmp_path / 'link'}\n\tshared 0\n\n"
                                     "nfs: other\n\tpath /mnt/pve/other\n\tserver 10.0.0.9\n")
    return etc


def test_proxmox_ves_ids_of_the_storage_are_those_of_its_path(etc, tree, tmp_path):
    assert [s.id for s in pve.storages_at(etc, tree)] == ["again", "tank"]
    with pytest.raises(Refused, match=r"no storage in .* has path"):
        pve.storages_at(etc, tmp_path)
    with pytest.raises(Refused, match="pve_config = false"):
        pve.storages_at(tmp_path / "absent", tree)


def test_the_volumes_a_proxmox_ve_guest_names_are_its_in_every_section_by_any_name(etc, tree):
    ids, images = ("again", "tank"), tree / "images"
    (etc / "nodes" / "pve1" / "qemu-server" / "101.conf").write_text(
        "boot: order=scsi0\nscsi0: tank:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2,size=64M\n"
        "ide2: tank:iso/debian.iso,media=cdrom\nunused0: again:101/vm-101-disk-3.raw\n"
        "\n[before]\nscsi1: size=1G,file=tank:101/vm-101-disk-2.raw\nvmstate: tank:101/vm-101-state-before.raw\n")
    (etc / "nodes" / "pve2" / "lxc" / "200.conf").write_text(
        f"rootfs: {images}/102/vm-102-disk-0.raw,size=8G\nlxc.cgroup2.devices.allow: c 10:200 rwm\n"
        "mp0: /srv/data,mp=/data\n")
    assert pve.users(etc, ids, images, "101/vm-101-disk-0.qcow2") == ["Proxmox VE guest 101 (scsi0)"]
    assert pve.users(etc, ids, images, "101/vm-101-disk-2.raw") == ["Proxmox VE guest 101 (before scsi1)"]
    assert pve.users(etc, ids, images, "101/vm-101-disk-3.raw") == ["Proxmox VE guest 101 (unused0)"]
    assert pve.users(etc, ids, images, "102/vm-102-disk-0.raw") == ["Proxmox VE guest 200 (rootfs)"]  # by path
    assert pve.users(etc, ("other",), images, "101/vm-101-disk-3.raw") == []
    (etc / "nodes" / "pve2" / "lxc" / "201.conf").write_text("rootfs tank:201/vm-201-disk-0.raw\n")
    with pytest.raises(InvalidName, match=r"201\.conf:1: not a Proxmox VE guest config line"):
        pve.users(etc, ids, images, "102/vm-102-disk-0.raw")  # fails closed: it might name the volume
    (etc / "nodes" / "pve2" / "lxc" / "201.conf").write_text("rootfs: images/102/vm-102-disk-0.raw\n")
    with pytest.raises(Refused, match=r"201\.conf: cannot read 'images/102/vm-102-disk-0.raw' as a volume"):
        pve.users(etc, ids, images, "102/vm-102-disk-0.raw")
    (etc / "nodes" / "pve2" / "lxc" / "201.conf").unlink()
    assert pve.guest_config(etc, 200) == etc / "nodes" / "pve2" / "lxc" / "200.conf"
    assert pve.guest_config(etc, 203) is None
    with pytest.raises(Refused, match="pve_config = false"):
        pve.users(etc / "absent", ids, images, "102/vm-102-disk-0.raw")


@pytest.mark.parametrize(("value", "target"), [
    ("tank:100/vm-100-disk-0.qcow2,size=1G", "tank:100/vm-100-disk-0.qcow2"),
    (",tank:100/vm-100-disk-0.qcow2,size=1G", "tank:100/vm-100-disk-0.qcow2"),  # an empty item, skipped
    ("size=1G,tank:100/vm-100-disk-0.qcow2", "tank:100/vm-100-disk-0.qcow2"),  # the item without a key, anywhere
    ("file=tank:101/vm-101-disk-0.qcow2,volume=tank:100/vm-100-disk-0.qcow2", "tank:100/vm-100-disk-0.qcow2"),
    ("file=tank:1/a.raw,file=tank:2/b.raw", "?"),  # a key twice: Proxmox VE refuses it (an LXC's volume too)
    ("volume=tank:1/a.raw,volume=tank:2/b.raw", "?"),
    ("tank:1/a.raw,file=tank:2/b.raw", "?"),  # both kinds, or two without a key: Proxmox VE refuses them
    ("tank:1/a.raw,tank:2/b.raw", "?"),
    ("size=1G", "?"),
    ("none,media=cdrom", "none"),
    ("", ""),
])
def test_a_disk_value_names_what_proxmox_ve_reads_in_it(value, target):
    """What stork reads a Proxmox VE guest to use is what Proxmox VE reads (pve-common's
    parse_property_string): reading another volume, stork would take the one the guest runs
    from for unused, and free it."""
    assert pve.target_of(value) == target


def test_a_guest_that_migrates_while_the_configs_are_read_is_seen_or_the_check_refused(etc, tree, monkeypatch):
    """Proxmox VE moves a migrating guest's config to its new node's folder by one rename: here
    VM 101 goes from pve2 to pve1 while pve1's configs are being read (pve1 listed already, pve2
    not yet), so one pass reads it in neither. The pass is made again, and finds it. Where the
    configs keep changing behind every look (a guest made in a folder read already, each time),
    the check is given up for now (tried again later), never answered from a pass that missed one."""
    images = tree / "images"
    pve1, pve2 = etc / "nodes" / "pve1" / "qemu-server", etc / "nodes" / "pve2" / "qemu-server"
    pve2.mkdir(parents=True)
    (pve1 / "300.conf").write_text("memory: 512\n")
    (pve2 / "101.conf").write_text("scsi0: tank:101/vm-101-disk-0.qcow2\n")
    real, made = pve.read, []

    def read_while_it_migrates(path, vmid):
        if vmid == 300 and (pve2 / "101.conf").exists():
            os.rename(pve2 / "101.conf", pve1 / "101.conf")  # between the listings of pve1 and pve2
        return real(path, vmid)

    monkeypatch.setattr(pve, "read", read_while_it_migrates)
    assert pve.users(etc, ("tank",), images, "101/vm-101-disk-0.qcow2") == ["Proxmox VE guest 101 (scsi0)"]

    def read_while_guests_are_made(path, vmid):
        if vmid >= 300:
            made.append(400 + len(made))
            (pve1 / f"{made[-1]}.conf").write_text("memory: 512\n")
        return real(path, vmid)

    monkeypatch.setattr(pve, "read", read_while_guests_are_made)
    with pytest.raises(StorageUnavailable, match=r"guest configs 403 appeared or moved while the configs were read: "):
        pve.users(etc, ("tank",), images, "101/vm-101-disk-0.qcow2")


def test_a_cdrom_line_is_a_disk_as_proxmox_ve_reads_it(etc, tree):
    """Proxmox VE reads `cdrom:` as `ide2:` (parse_vm_config), a disk where no media=cdrom says otherwise."""
    (etc / "nodes" / "pve1" / "qemu-server" / "101.conf").write_text("cdrom: tank:101/vm-101-disk-0.qcow2\n")
    assert pve.users(etc, ("tank",), tree / "images", "101/vm-101-disk-0.qcow2") == ["Proxmox VE guest 101 (ide2)"]
    assert pve.parse(101, "cdrom: tank:101/vm-101-disk-0.qcow2\n", "101.conf").disks == \
        {"ide2": "tank:101/vm-101-disk-0.qcow2"}


def test_a_storage_of_proxmox_ves_layout_takes_its_locks_and_asks_its_guests(etc, tree):
    drv = driver_for(StorageConfig("vz", "dir", options={"path": tree, "layout": "pve", "pve_config": str(etc),
                                                         "pve_locks": "/run/lock/pve-manager"}))
    assert drv.foreign_ids() == ("again", "tank")
    assert drv.foreign_locks() == [ForeignLock(Path("/run/lock/pve-manager/pve-storage-again"), "flock"),
                                   ForeignLock(Path("/run/lock/pve-manager/pve-storage-tank"), "flock")]
    (etc / "nodes" / "pve1" / "qemu-server" / "101.conf").write_text("scsi0: again:101/vm-101-disk-0.qcow2\n")
    assert drv.foreign_users(CLONE) == ["Proxmox VE guest 101 (scsi0)"]
    assert drv.foreign_guest(101) and drv.foreign_guest(104) is None
    with pytest.raises(InvalidName, match="its base is named base-101-<name>"):
        drv.named_base(CLONE, "base-100-mine")  # a base in another guest's folder would be that guest's


def test_a_proxmox_ve_config_is_read_as_a_guest_with_notes():
    guest = pve.parse(9000, "name: debian\ntemplate: 1\ncores: 2\nmemory: 2048\n"
                            "scsi0: local:9000/base-9000-disk-0.qcow2,size=8G\n"
                            "efidisk0: local:9000/base-9000-disk-1.raw,efitype=4m\n"
                            "ide2: none,media=cdrom\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
                            "sata1: /dev/disk/by-id/ata-X\n", "9000.conf")
    assert (guest.name, guest.template) == ("debian", True)
    assert guest.disks == {"scsi0": "local:9000/base-9000-disk-0.qcow2", "efidisk0": "local:9000/base-9000-disk-1.raw"}
    assert guest.notes == {"cores": "2", "memory": "2048", "ide2": "none,media=cdrom",
                           "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"}
    assert guest.devices == {"sata1": "/dev/disk/by-id/ata-X"}  # import-pve refuses it: no volume to attach


@pytest.mark.parametrize(("text", "expected"), [
    ("dir: tank\n\tpath /srv/tank\n\tcontent images\n", [("tank", "dir", "/srv/tank", False)]),
    ("dir: tank\n\tpath /srv/tank\n\tpath /srv/other\n", [("tank", "dir", "/srv/tank", False)]),  # the first stays
    ("dir: tank\n\tpath\t/srv/tank\n\tshared 1\n", [("tank", "dir", "/srv/tank", True)]),  # tabs; shared
    ("nfs: nas\n\tpath /mnt/pve/nas\n\tserver 10.0.0.9\n", [("nas", "nfs", "/mnt/pve/nas", True)]),  # shared by type
    ("Dir: aa\n\tpath /a\n\nDir: bb\n\tpath /b\n", [("aa", "dir", "/a", False), ("bb", "dir", "/b", False)]),
    ("dir: aa\n\tpath /a\n\n\tpath /elsewhere\n", [("aa", "dir", "/a", False)]),  # a blank line ends a section
    ("# a comment\ndir: aa\n  # another\n\tpath /a\n", [("aa", "dir", "/a", False)]),
    ("dir: ../x\n\tpath /x\n", []),  # an id Proxmox VE refuses is no storage (nor a lock file's name)
    ("dir: local\n\tpath /srv/elsewhere\n", [("local", "dir", "/var/lib/vz", False)]),  # local is always there
    ("lvmthin: local\n\tvgname pve\n", [("local", "dir", "/var/lib/vz", False)]),
    ("dir: aa\n\tpath /a\n  \n\tshared\n\tcontent-dirs images=img\n", [("aa", "dir", "/a", True)]),  # spaces: no end
    ("dir: aa\n\tpath /a\ndir: bb\n\tpath /b\n", [("aa", "dir", "/a", False)]),  # a header inside: ignored
    ("dir: ../x\n\tpath /x\ndir: cc\n\tpath /c\n\ndir: dd\n\tpath /d\n", [("dd", "dir", "/d", False)]),
], ids=["dir", "duplicate-key", "tabs-shared", "nfs", "uppercase-type", "blank-line", "comments", "bad-id",
        "local-elsewhere", "local-other-type", "spaces-bare-shared", "header-inside", "bad-section-skipped-whole"])
def test_storage_cfg_is_read_as_proxmox_ve_reads_it(text, expected):
    found = [(s.id, s.type, s.path, s.shared) for s in pve.read_storages(text) if s.id != "local" or "local" in text]
    assert found == expected


def test_a_storage_whose_images_proxmox_ve_keeps_elsewhere_is_refused(tmp_path, tree):
    (tmp_path / "storage.cfg").write_text(f"dir: tank\n\tpath {tree}\n\tcontent-dirs images=vms\n")
    with pytest.raises(Refused, match="content-dirs"):
        pve.storages_at(tmp_path, tree)


def test_a_shared_storage_is_locked_in_proxmox_ves_cluster_file_system(tmp_path, tree):
    (tmp_path / "storage.cfg").write_text(f"dir: tank\n\tpath {tree}\n\tshared 1\n")
    drv = driver_for(StorageConfig("vz", "dir", options={"path": tree, "layout": "pve", "pve_config": str(tmp_path),
                                                         "pve_locks": "/run/lock/pve-manager"}))
    assert drv.foreign_locks() == [ForeignLock(tmp_path / "priv" / "lock" / "storage-tank", "mkdir")]


def test_a_lxc_mount_points_volume_is_read_and_a_value_it_cannot_read_refuses(tmp_path, tree):
    etc, images = tmp_path / "etc", tree / "images"
    (etc / "nodes" / "n" / "lxc").mkdir(parents=True)
    (etc / "nodes" / "n" / "lxc" / "300.conf").write_text("mp0: mp=/data,volume=tank:102/vm-102-disk-0.raw,size=8G\n"
                                                         "mp1: mp=/x,size=8G\n")
    with pytest.raises(Refused, match="cannot read 'mp=/x,size=8G' as a volume"):
        pve.users(etc, ("tank",), images, "102/vm-102-disk-0.raw")
    (etc / "nodes" / "n" / "lxc" / "300.conf").write_text("mp0: mp=/data,volume=TANK2:102/vm-102-disk-0.raw\n"
                                                         "mp1: mp=/data,volume=tank:102/vm-102-disk-0.raw\n")
    assert pve.users(etc, ("tank",), images, "102/vm-102-disk-0.raw") == ["Proxmox VE guest 300 (mp1)"]


def test_a_config_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    """A FIFO given as CONF (or planted among the configs) would block a plain open for good."""
    fifo = tmp_path / "100.conf"
    os.mkfifo(fifo)
    with pytest.raises(InvalidName, match="not a regular file: not a Proxmox VE guest config"):
        pve.read(fifo)
    (tmp_path / "nodes" / "n" / "qemu-server").mkdir(parents=True)
    os.mkfifo(tmp_path / "nodes" / "n" / "qemu-server" / "101.conf")
    with pytest.raises(InvalidName, match="not a regular file"):
        pve.users(tmp_path, ("tank",), tmp_path / "images", "101/vm-101-disk-0.raw")
    os.mkfifo(tmp_path / "storage.cfg")
    with pytest.raises(Refused, match="not a regular file"):
        pve.storages_at(tmp_path, tmp_path)
