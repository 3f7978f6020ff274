"""Telling an image's format from its bytes before qemu opens it (drivers/sniff.py): images
made by qemu-img of every format it writes, hand-made headers, and random descriptor text."""

from __future__ import annotations

import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import sniff
from drivers.sniff import Sniffed


@pytest.mark.parametrize(("fmt", "options", "expected"), [
    ("raw", [], "raw"), ("qcow2", [], "qcow2"), ("qcow", [], "qcow"), ("vmdk", [], "vmdk"),
    ("vmdk", ["-o", "subformat=streamOptimized"], "vmdk"), ("vhdx", [], "vhdx"), ("vpc", [], "vpc"),
    ("vpc", ["-o", "subformat=fixed"], "vpc"), ("vdi", [], "vdi"), ("qed", [], "qed"), ("parallels", [], "parallels"),
])
def test_the_format_of_each_image_qemu_img_makes_is_told_from_its_bytes(tmp_path, fmt, options, expected):
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(image), "4M"], check=True)
    with open(image, "rb") as f:
        found = sniff.sniff_file(f.fileno())
    assert found.fmt == expected
    assert bool(found.refusal) == (expected not in sniff.IMPORTABLE)


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_a_vhd_of_a_creator_qemu_does_not_know_is_imported_at_its_footers_size(tmp_path, subformat):
    """VirtualBox writes `vbox` as the creator and geometry for fewer sectors than the disk
    has: qemu, left alone, sizes it by that geometry and a copy loses the disk's end. Its
    footer's size is what an import reads, and the data at the very end comes across."""
    from drivers import qemu

    image = tmp_path / "disk.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={subformat},force_size=on", str(image),
                    "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 67104768 4096", str(image)], check=True,
                   capture_output=True)
    data = bytearray(image.read_bytes())
    for at in [len(data) - 512, *([0] if subformat == "dynamic" else [])]:  # a dynamic VHD's footer is copied first
        footer = data[at:at + 512]
        footer[28:32] = b"vbox"
        footer[56:60] = struct.pack(">HBB", 963, 8, 17)  # the VHD spec's geometry for 64 MiB: 67,054,592 bytes
        footer[64:68] = b"\0\0\0\0"
        footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
        data[at:at + 512] = footer
    image.write_bytes(data)
    with qemu.open_import(image) as (opened, size, fmt):
        assert (fmt, size) == ("vpc", 64 << 20)
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", opened.spec, str(out)], check=True,
                       pass_fds=opened.all_fds)
    assert out.stat().st_size == 64 << 20 and out.read_bytes()[-4096:] == b"\x5a" * 4096


def _vhd_footer(disk_type: int) -> bytes:
    footer = bytearray(512)
    footer[:8] = b"conectix"
    footer[60:64] = struct.pack(">I", disk_type)
    footer[64:68] = struct.pack(">I", ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF)
    return bytes(footer)


VDI = b"\x00" * 0x40 + struct.pack("<I", 0xBEDA107F)


@pytest.mark.parametrize(("head", "tail", "fmt", "refused"), [
    (b"\x00" * 4096, b"\x00" * 512, "raw", False),
    (b"QFI\xfb\x00\x00\x00\x01" + b"\x00" * 64, b"", "qcow", False),  # a backing file it names: refuse_external
    (b"QFI\xfb\x00\x00\x00\x03" + b"\x00" * 64, b"", "qcow2", False),
    (VDI, b"", "vdi", False),
    (_vhd_footer(3), b"", "vpc", False),  # dynamic: a copy of the footer first
    (_vhd_footer(4), b"", "vpc", True),  # differencing: reads its parent
    (b"\x00" * 4096, _vhd_footer(2), "vpc", False),  # fixed: the footer last
    (b"\x00" * 4096, _vhd_footer(2)[:-1] + b"\x01", "raw", False),  # a bad checksum: raw data after all
    (b"# Disk DescriptorFile\nversion=1\nRW 8 FLAT \"/dev/sda\" 0\n", b"", "vmdk descriptor", True),
    (b"#\n  \nversion=2\r\n", b"", "vmdk descriptor", True),
    (b"version=1\n", b"", "vmdk descriptor", True),
    (b"hello\nversion=1\n", b"", "raw", False),  # not a descriptor to qemu either: raw
    (b"COWD" + b"\x00" * 60, b"", "vmdk (VMware 3)", True),
    (b"LUKS\xba\xbe" + b"\x00" * 60, b"", "luks", True),
    (b"QED\x00" + b"\x00" * 60, b"", "qed", True),
])
def test_a_header_is_told_apart_and_refused_where_it_reads_another_file(head, tail, fmt, refused):
    found = sniff.sniff(head, tail)
    assert (found.fmt, bool(found.refusal)) == (fmt, refused)


def test_a_sparse_vmdk_of_capacity_0_is_refused_as_qemu_reads_its_descriptor_as_a_file():
    """qemu opens the extents the embedded descriptor of such a file names: any path."""
    descriptor = b'version=1\ncreateType="monolithicFlat"\nRW 8 FLAT "/etc/shadow" 0\n'
    head = bytearray(b"KDMV" + b"\x00" * 508 + descriptor)
    head[28:44] = struct.pack("<QQ", 1, 1)  # capacity (12:20) left 0
    assert "capacity 0" in sniff.sniff(bytes(head), b"").refusal
    head[12:20] = struct.pack("<Q", 8)
    assert sniff.sniff(bytes(head), b"") == Sniffed("vmdk")  # a disk of 8 sectors: its extent lines are not read


def test_a_sparse_vmdk_whose_descriptor_names_a_parent_is_refused():
    descriptor = b'version=1\ncreateType="monolithicSparse"\nparentFileNameHint="/etc/shadow"\n'
    head = bytearray(b"KDMV" + b"\x00" * 1020 + descriptor)
    head[12:20] = struct.pack("<Q", 2048)  # capacity
    head[28:44] = struct.pack("<QQ", 2, 1)  # the embedded descriptor: sector 2, one sector
    assert "parent" in sniff.sniff(bytes(head), b"").refusal
    head[1024 + descriptor.index(b"/etc/shadow"):1024 + descriptor.index(b"/etc/shadow") + 11] = b" " * 11
    assert sniff.sniff(bytes(head), b"") == Sniffed("vmdk")  # a blank hint: no parent


comment_lines = st.lists(st.one_of(st.just(""), st.text(alphabet=" ", max_size=3),
                                   st.text(max_size=20).map(lambda t: "#" + t.replace("\n", ""))), max_size=5)


@given(comment_lines, st.sampled_from(["1", "2", "3"]), st.text(max_size=200))
def test_any_text_qemu_would_read_as_a_vmdk_descriptor_is_refused(comments, version, rest):
    """qemu's probe: past comment lines and blank lines, a line `version=N`. Whatever follows
    (extent lines naming any file), it is refused, and never handed to qemu."""
    text = "\n".join([*comments, f"version={version}", rest]).encode("utf-8", "surrogatepass")
    assert sniff.sniff(text, b"").refusal


@given(st.binary(max_size=2048), st.binary(min_size=512, max_size=512))
def test_any_bytes_are_told_as_one_format_or_refused(head, tail):
    found = sniff.sniff(head, tail)
    assert found.fmt in sniff.IMPORTABLE or found.refusal
