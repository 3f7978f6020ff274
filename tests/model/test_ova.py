"""OVA archives and OVF descriptors read as input (drivers/ova.py): the guest an OVF describes
as VMware and VirtualBox write it, each refusal of a hostile or broken one, and an archive's
members read in place with links, devices and escaping names refused."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from drivers import ova
from drivers.errors import InvalidName
from worker.testing import make_ova, ovf_text

GIB = 1 << 30


def parsed(text: str) -> ova.Ovf:
    return ova.parse(text.encode(), "x.ovf")


def test_the_guest_an_ovf_describes_its_disks_in_their_slots_and_notes_on_the_rest():
    found = parsed(ovf_text([("disk1.vmdk", 8 * GIB, "6", "0"), ("disk2.vmdk", GIB, "6", "1"),
                             ("cd.vmdk", GIB, "5", "1")], name="web-appliance"))
    assert found.name == "web-appliance"
    assert [(d.key, d.href, d.capacity) for d in found.disks] == [
        ("scsi0", "disk1.vmdk", 8 * GIB), ("scsi1", "disk2.vmdk", GIB), ("ide1", "cd.vmdk", GIB)]
    assert found.notes == "OVF: 2 CPUs, memory 4096 byte * 2^20, network VM Network (E1000)"


@pytest.mark.parametrize(("units", "capacity", "expected"), [
    ("byte", "1073741824", GIB), ("byte * 2^30", "8", 8 * GIB), ("byte * 2^20", "512", 512 << 20)])
def test_a_disk_capacity_is_read_in_its_units(units, capacity, expected):
    declared = f'ovf:capacity="{capacity}" ovf:capacityAllocationUnits="{units}"'
    text = ovf_text([("d.vmdk", 1, "6", "0")]).replace('ovf:capacity="1" ovf:capacityAllocationUnits="byte"', declared)
    assert parsed(text).disks[0].capacity == expected


def test_two_controllers_of_a_kind_at_one_address_get_the_next_free_slot():
    text = ovf_text([("a.vmdk", GIB, "6", "0")], extra=(
        "<Item><rasd:InstanceID>77</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>"
        "<Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk0</rasd:HostResource>"
        "<rasd:InstanceID>78</rasd:InstanceID><rasd:Parent>77</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType>"
        "</Item>"))
    assert [d.key for d in parsed(text).disks] == ["scsi0", "scsi1"]


def test_an_address_that_is_no_plain_number_takes_the_first_free_slot():
    text = ovf_text([("a.vmdk", GIB, "6", "0")]).replace("<rasd:AddressOnParent>0<", "<rasd:AddressOnParent>\u00b2<")
    assert [d.key for d in parsed(text).disks] == ["scsi0"]


def test_a_name_stork_does_not_take_is_left_out():
    assert parsed(ovf_text([("a.vmdk", GIB, "6", "0")], name="../etc")).name == ""


XXE = '<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
BOMB = '<!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'


@pytest.mark.parametrize(("text", "message"), [
    (ovf_text([("a.vmdk", GIB, "6", "0")], prolog=XXE, name="&x;"), "OVF refused: DTDForbidden"),
    (ovf_text([("a.vmdk", GIB, "6", "0")], prolog=BOMB, name="&b;"), "OVF refused: DTDForbidden"),
    ("<Envelope", "not well-formed XML"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace("ovf:/disk/vmdisk0", "ovf:/disk/nothing"),
     "names no disk of the OVF"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace('ovf:fileRef="file0"', 'ovf:fileRef="file9"'),
     "disk 'vmdisk0' names no file of the OVF"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace("<rasd:Parent>16</rasd:Parent>", "<rasd:Parent>99</rasd:Parent>"),
     "is on no IDE, SCSI or SATA controller"),
    (ovf_text([]), "the OVF names no disk"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace('ovf:capacityAllocationUnits="byte"',
                                                   'ovf:capacityAllocationUnits="furlongs"'), "not a size stork reads"),
    ('<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>', "describes no virtual system"),
    ('<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2"/>', "OVF 2.0 is not read"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace('ovf:capacity="1073741824"', f'ovf:capacity="{"9" * 5000}"'),
     "not a size stork reads"),
    (ovf_text([("a.vmdk", GIB, "6", "0")]).replace('ovf:capacityAllocationUnits="byte"',
                                                   'ovf:capacityAllocationUnits="byte * 2^99999"'),
     "not a size stork reads"),
    ("<a>" + "x" * (ova.MAX_OVF + 1) + "</a>", "more than 1048576"),
])
def test_a_hostile_or_broken_ovf_is_refused_naming_why(text, message):
    with pytest.raises(InvalidName, match=message):
        parsed(text)


def _archive(tmp_path, add) -> int:
    path = tmp_path / "x.ova"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        add(tar)
    return os.open(path, os.O_RDONLY)


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"d" * 10) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _link(kind: bytes, name: str, target: str):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)
    return add


@pytest.mark.parametrize(("add", "message"), [
    (lambda tar: _file(tar, "../escape.vmdk"), "member name '../escape.vmdk' is not a plain file name"),
    (lambda tar: _file(tar, "sub/dir.vmdk"), "member name 'sub/dir.vmdk' is not a plain file name"),
    (_link(tarfile.SYMTYPE, "disk.vmdk", "/etc/shadow"), "member 'disk.vmdk' is not a regular file"),
    (_link(tarfile.LNKTYPE, "disk.vmdk", "other"), "member 'disk.vmdk' is not a regular file"),
    (_link(tarfile.CHRTYPE, "disk.vmdk", ""), "member 'disk.vmdk' is not a regular file"),
    (lambda tar: (_file(tar, "a.vmdk"), _file(tar, "a.vmdk")), "member 'a.vmdk' appears twice"),
    (lambda tar: _file(tar, "a\nb.vmdk"), "member name 'a.+b.vmdk' is not a plain file name"),
])
def test_an_archive_member_that_is_a_link_a_device_or_escapes_is_refused(tmp_path, add, message):
    fd = _archive(tmp_path, add)
    try:
        with pytest.raises(InvalidName, match=message):
            ova.members(fd, "x.ova")
    finally:
        os.close(fd)


def test_members_are_found_where_their_data_is(tmp_path):
    path = make_ova(tmp_path / "a.ova", [("a.ovf", b"<x/>"), ("disk.vmdk", b"D" * 3000)])
    fd = os.open(path, os.O_RDONLY)
    try:
        found = ova.members(fd, str(path))
        disk = found["disk.vmdk"]
        assert os.pread(fd, disk.size, disk.offset) == b"D" * 3000
        assert ova.read_member(fd, found["a.ovf"], ova.MAX_OVF) == b"<x/>"
        with pytest.raises(InvalidName, match="more than the 100 an OVF may have"):
            ova.read_member(fd, disk, 100)
    finally:
        os.close(fd)


def test_a_file_that_is_not_a_tar_is_not_an_ova(tmp_path):
    path = tmp_path / "not.ova"
    path.write_bytes(b"\x01" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(InvalidName, match="not an OVA"):
            ova.members(fd, str(path))
    finally:
        os.close(fd)
