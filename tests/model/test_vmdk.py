"""VMDK descriptors read as input (drivers/vmdk.py): the extents of every descriptor kind
stork imports, each refusal of one that would make qemu read another file, and the descriptor
stork writes for qemu."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import vmdk
from drivers.errors import InvalidName
from drivers.vmdk import Extent


def descriptor(create_type: str, *extents: str, extra: str = "") -> bytes:
    return (f'# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="{create_type}"\n{extra}'
            f'\n# Extent description\n' + "\n".join(extents) + '\n\n# The Disk Data Base\n#DDB\n'
            'ddb.adapterType = "lsilogic"\nddb.geometry.cylinders = "16"\n').encode()


@pytest.mark.parametrize(("text", "extents"), [
    (descriptor("monolithicFlat", 'RW 8192 FLAT "a-flat.vmdk" 0'), [Extent("RW", 8192, "FLAT", "a-flat.vmdk", 0)]),
    (descriptor("twoGbMaxExtentFlat", 'RW 4194304 FLAT "a-f001.vmdk" 0', 'RW 2048 FLAT "a-f002.vmdk" 0'),
     [Extent("RW", 4194304, "FLAT", "a-f001.vmdk", 0), Extent("RW", 2048, "FLAT", "a-f002.vmdk", 0)]),
    (descriptor("twoGbMaxExtentSparse", 'RW 4192256 SPARSE "a-s001.vmdk"'),
     [Extent("RW", 4192256, "SPARSE", "a-s001.vmdk", 0)]),
    (descriptor("vmfs", 'RW 2048 VMFS "a-flat.vmdk"'), [Extent("RW", 2048, "FLAT", "a-flat.vmdk", 0)]),
])
def test_the_extents_of_each_descriptor_kind_stork_imports(text, extents):
    found = vmdk.parse(text, "a.vmdk")
    assert list(found.extents) == extents and found.size == sum(e.sectors for e in extents) * 512


@pytest.mark.parametrize(("text", "message"), [
    (descriptor("monolithicFlat", 'RW 8 FLAT "/etc/shadow" 0'), "'/etc/shadow' is not a file beside the descriptor"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "../up.vmdk" 0'), "'../up.vmdk' is not a file beside the descriptor"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "sub/a.vmdk" 0'), "'sub/a.vmdk' is not a file beside the descriptor"),
    (descriptor("monolithicFlat", 'RW 8 FLAT ".." 0'), "'..' is not a file beside the descriptor"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "a.vmdk" 0', extra='parentFileNameHint="base.vmdk"\n'),
     "a delta VMDK reads its parent disk"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "a.vmdk" 0').replace(b"parentCID=ffffffff", b"parentCID=1234"),
     "a delta VMDK reads its parent disk"),
    (descriptor("vmfsRDM", 'RW 8 FLAT "a.vmdk" 0'), "createType 'vmfsRDM' is not imported"),
    (descriptor("monolithicFlat"), "names no extent"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "a.vmdk" 0', extra="this is not a key\n"), "line not read"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "\u00e9.vmdk" 0'.encode().decode("latin-1")), "ASCII text"),
    (b"#" * (vmdk.MAX_DESCRIPTOR + 1), "is not read"),
    (descriptor("monolithicFlat", 'RDONLY 8 FLAT "a.vmdk" 0'), "RDONLY FLAT is not read by qemu"),
    (descriptor("monolithicFlat", "RW 8 ZERO"), "RW ZERO is not read by qemu"),
    (descriptor("monolithicFlat", 'RW 8 FLAT "a\tb.vmdk" 0'), "is not a file beside the descriptor"),
    (descriptor("monolithicFlat", f'RW {"9" * 5000} FLAT "a.vmdk" 0'), "line not read"),
])
def test_a_descriptor_that_would_read_another_file_or_is_not_understood_is_refused(text, message):
    with pytest.raises(InvalidName, match=message):
        vmdk.parse(text if isinstance(text, bytes) else text.encode("latin-1"), "a.vmdk")


def test_the_descriptor_qemu_is_given_names_only_the_links_stork_made():
    found = vmdk.parse(descriptor("twoGbMaxExtentSparse", 'RW 8 FLAT "x.vmdk" 2', 'RW 8 SPARSE "y.vmdk"'), "a.vmdk")
    text = vmdk.text(found, ["extent0", "extent1"])
    assert 'RW 8 FLAT "extent0" 2\nRW 8 SPARSE "extent1"\n' in text and "x.vmdk" not in text
    assert "\n\n" not in text  # qemu reads an extent after a blank line twice
    assert vmdk.parse(text.encode(), "again").extents[0] == Extent("RW", 8, "FLAT", "extent0", 2)


PART = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters='"'), max_size=20)


@given(st.one_of(st.builds(lambda a, b: f"{a}/{b}", PART, PART), st.sampled_from([".", ".."])))
def test_no_extent_name_with_a_folder_in_it_is_ever_taken(name):
    with pytest.raises(InvalidName):
        vmdk.parse(descriptor("monolithicFlat", f'RW 8 FLAT "{name}" 0'), "a.vmdk")
