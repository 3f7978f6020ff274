"""Every name a user gives is checked before it reaches a path or a command line."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import names
from drivers.errors import InvalidName
from drivers.names import VolName

VOLNAMES = [
    # (description, text, expected or None for a refusal)
    ("a guest disk", "100/vm-100-disk-1.raw", VolName(100, "vm-100-disk-1", "raw")),
    ("a qcow2 guest disk", "101/vm-101-disk-0.qcow2", VolName(101, "vm-101-disk-0", "qcow2")),
    ("the seed's arbitrary base", "base/an-arbitray-name.raw", VolName(None, "an-arbitray-name", "raw")),
    ("a Proxmox-style base", "base/base-100-disk-0.qcow2", VolName(None, "base-100-disk-0", "qcow2")),
    ("parent directory", "base/../etc.raw", None),
    ("dot-dot inside a name", "base/a..b.raw", None),
    ("stem ending in a dot", "base/0..raw", None),
    ("two slashes", "100/x/vm-100-disk-0.raw", None),
    ("no folder", "vm-100-disk-0.raw", None),
    ("leading dash", "base/-rf.raw", None),
    ("unknown format", "base/x.vmdk", None),
    ("no format", "base/x", None),
    ("empty", "", None),
    ("disk of another guest", "100/vm-101-disk-0.raw", None),
    ("guest id below 100", "99/vm-99-disk-0.raw", None),
    ("zero-padded guest id", "0100/vm-100-disk-0.raw", None),
    ("non-ASCII", "base/bäse.raw", None),
    ("over-long", "base/" + "a" * 200 + ".raw", None),
    ("space", "base/a b.raw", None),
    ("absolute", "/etc/passwd", None),
]


@pytest.mark.parametrize(("what", "text", "expected"), VOLNAMES, ids=[v[0] for v in VOLNAMES])
def test_volname_table(what, text, expected):
    """Valid volnames parse to their parts; every unsafe one is refused with InvalidName."""
    if expected is None:
        with pytest.raises(InvalidName, match=r"invalid (volume name|guest id)"):
            names.volname(text)
    else:
        assert names.volname(text) == expected
        assert str(expected) == text


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,30}", fullmatch=True), st.sampled_from(["raw", "qcow2"]))
def test_every_name_a_base_can_take_is_one_a_volume_id_names_again(stem, fmt):
    """`stork base VOLID --name foo.` made base/foo..raw, which no volume id names: the job's
    undo could not turn it back, and the guest named a disk gone. A stem a volume takes is one
    its volume id (and a flat name: RBD, LVM, ZFS) gives back."""
    try:
        vol = VolName(None, stem, fmt)
    except InvalidName:
        assert stem.endswith(".") or ".." in stem
        return
    assert names.volname(str(vol)) == vol
    assert names.from_flat_name(names.flat_name(vol)) == vol


def test_a_guest_name_may_end_in_a_dot_a_volume_name_not():
    """A guest's name is no file name: one ending in '.' (a backup's config may hold one) is kept."""
    assert names.image_name("web.") == "web."
    with pytest.raises(InvalidName, match=r"a volume's name cannot end in '\.'"):
        names.volume_stem("golden.", "base name")


VOLNAME_LIKE = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"(base|0?[1-9][0-9]{1,9}|\.\.)/(vm-[0-9]{2,4}-)?[-A-Za-z0-9_.+/]{0,20}\.(raw|qcow2|img)",
                  fullmatch=True),
)


@given(VOLNAME_LIKE)
def test_any_accepted_volname_is_a_safe_relative_path(text):
    """Whatever parses is the one spelling of that volume and stays inside the storage:
    one '/', no '..', no leading '-' (the strategy generates near-misses of the grammar)."""
    try:
        vol = names.volname(text)
    except InvalidName:
        return
    assert str(vol) == text
    _, file = text.split("/")
    assert ".." not in text and not file.startswith("-") and not text.startswith("/")
    assert text.isascii()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("8", 8 << 30), ("1048576B", 1 << 20),
     ("1024K", 1 << 20), (1 << 20, 1 << 20), (5 << 30, 5 << 30), ("2TiB", 2 << 40), ("64mib", 64 << 20)],
)
def test_sizes_parse_to_bytes(text, expected):
    """Sizes take K/M/G/T (or B) suffixes; a bare number is GiB, as in Proxmox VE; an int is bytes."""
    assert names.size(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("0", "greater than zero"), ("-1G", "expected a positive number"), ("abc", "expected"), ("", "expected"),
    ("1X", "expected"), ("G", "expected"), ("4K", "below 1 MiB"), ("4096B", "below 1 MiB"), (512, "below 1 MiB"),
    ("1000000001B", "512-byte sectors"), ("1.1M", "512-byte sectors"), (True, "expected"),
    ("8GB", "GB is ambiguous .* write 8G or 8GiB"), ("512mb", "mb is ambiguous .* write 512M or 512MiB"),
    ("1TB", "ambiguous"), ("64KB", "ambiguous"),
])
def test_bad_sizes_are_refused(text, why):
    """Zero, negative, unparseable, tiny (below 1 MiB), ragged (not whole sectors) and ambiguous
    (GB: 10^9 or 2^30?) sizes are refused."""
    with pytest.raises(InvalidName, match=f"invalid size .*{why}"):
        names.size(text)


@given(st.text(max_size=20))
def test_size_parser_never_returns_a_non_positive_size(text):
    """The size parser either refuses or returns at least 1 MiB in whole 512-byte sectors."""
    try:
        value = names.size(text)
    except InvalidName:
        return
    assert value >= 1 << 20 and value % 512 == 0


@pytest.mark.parametrize("text", ["99", "0", "-5", "abc", "1000000000", "\uff11\uff12\uff13", ""])
def test_bad_guest_ids_are_refused(text):
    """Guest ids are 100..999999999, ASCII digits only."""
    with pytest.raises(InvalidName, match="invalid guest id"):
        names.vmid(text)


@pytest.mark.parametrize("text", ["local", "nfs-1", "a_b"])
def test_good_storage_ids(text):
    """Lower-case storage ids are accepted as they are."""
    assert names.storage_id(text) == text


@pytest.mark.parametrize("text", ["", "Local", "-x", "1abc", "a/b", "a" * 41, "a:b"])
def test_bad_storage_ids_are_refused(text):
    """Storage ids that could escape a path or look like options are refused."""
    with pytest.raises(InvalidName, match="invalid storage id"):
        names.storage_id(text)


def test_volume_id_splits_on_the_first_colon():
    """A volume id is <storage>:<volname>; a missing part is refused."""
    assert str(names.volume_id("local:base/x.raw")) == "local:base/x.raw"
    for bad in ["local", "local:", ":base/x.raw", "Bad:base/x.raw"]:
        with pytest.raises(InvalidName):
            names.volume_id(bad)


@pytest.mark.parametrize("key", ["ide0", "ide3", "sata5", "scsi0", "scsi30", "virtio15", "efidisk0", "tpmstate0"])
def test_disk_keys_within_proxmox_ranges_are_accepted(key):
    """Every slot Proxmox VE has is a disk key."""
    assert names.disk_key(key) == key


@pytest.mark.parametrize("key", ["ide4", "sata6", "scsi31", "virtio16", "efidisk1", "scsi00", "scsi01", "nvme0", ""])
def test_disk_keys_outside_proxmox_ranges_are_refused(key):
    """A slot no bus has, or a second spelling of one, is refused naming the ranges."""
    with pytest.raises(InvalidName, match="expected ide0-3, sata0-5, scsi0-30, virtio0-15"):
        names.disk_key(key)


# ---- Proxmox VE's names (a dir storage of layout "pve") -----------------------------------
# pve-storage's own cases (test/parse_volname_test.pm, vmid 1234): the volname, and what
# PVE::Storage::Plugin->parse_volname returns for it, (vtype, name, vmid, basename, basevmid,
# isBase, format); or its error. stork must read each disk image case as Proxmox VE does, and
# write back the very same text; it refuses more (the last column says why), never less.
_V = "1234"
PVE_CASES = [
    *[row for s in ("raw", "qcow2") for row in (
        (f"{_V}/vm-{_V}-disk-1.{s}", ("images", f"vm-{_V}-disk-1.{s}", _V, None, None, None, s), ""),
        (f"{_V}/base-{_V}-disk-0.{s}/{_V}/vm-{_V}-disk-0.{s}",
         ("images", f"vm-{_V}-disk-0.{s}", _V, f"base-{_V}-disk-0.{s}", _V, None, s), ""),
        (f"{_V}/base-{_V}-disk-0.{s}", ("images", f"base-{_V}-disk-0.{s}", _V, None, None, "base-", s), ""),
    )],
    # what Proxmox VE reads and stork does not
    (f"{_V}/vm-{_V}-disk-1.vmdk", ("images", f"vm-{_V}-disk-1.vmdk", _V, None, None, None, "vmdk"), "a format stork"),
    (f"{_V}/base-{_V}-disk-0.vmdk", ("images", f"base-{_V}-disk-0.vmdk", _V, None, None, "base-", "vmdk"),
     "a format stork"),
    (f"{_V}/vm-{_V}-disk-0.qcow2/{_V}/vm-{_V}-disk-0.qcow2",
     ("images", f"vm-{_V}-disk-0.qcow2", _V, f"vm-{_V}-disk-0.qcow2", _V, None, "qcow2"), "a base that is no base"),
    (f"{_V}/subvol-{_V}-disk-0.subvol", ("images", f"subvol-{_V}-disk-0.subvol", _V, None, None, None, "subvol"),
     "a container's subvolume"),
    ("iso/some-installation-disk.iso", ("iso", "some-installation-disk.iso"), "not a disk image"),
    ("vztmpl/debian-10.0-standard_10.0-1_amd64.tar.gz", ("vztmpl", "debian-10.0-standard_10.0-1_amd64.tar.gz"),
     "not a disk image"),
    (f"rootdir/{_V}", ("rootdir", _V, _V), "not a disk image"),
    (f"backup/vzdump-qemu-{_V}-2020_03_30-21_12_40.vma", ("backup", f"vzdump-qemu-{_V}-2020_03_30-21_12_40.vma", _V),
     "not a disk image"),
    ("snippets/userconfig.yaml", ("snippets", "userconfig.yaml"), "not a disk image"),
    # what Proxmox VE refuses too
    (f"ssss/base-{_V}-disk-0.raw", None, "refused by both"),
    (f"{_V}/base-{_V}-disk-0.vhdx/{_V}/vm-{_V}-disk-0.vhdx", None, "refused by both"),
    (f"ssss/base-{_V}-disk-0.qcow2/{_V}/vm-{_V}-disk-0.qcow2", None, "refused by both"),
    (f"{_V}/base-{_V}-disk-0.qcow2/ssss/vm-{_V}-disk-0.qcow2", None, "refused by both"),
]


@pytest.mark.parametrize(("text", "pve_reads", "refused"), PVE_CASES, ids=[c[0] for c in PVE_CASES])
def test_proxmox_ve_volnames_read_and_written_as_pve_storage_does(text, pve_reads, refused):
    if refused:
        with pytest.raises(InvalidName, match="Proxmox VE's layout"):
            names.pve_volname(text)
        return
    vol = names.pve_volname(text)
    base = names.pve_volname(text.rsplit("/", 2)[0]) if text.count("/") == 3 else None
    got = ("images", f"{vol.name}.{vol.fmt}", names.pve_folder(vol), f"{base.name}.{base.fmt}" if base else None,
           names.pve_folder(base) if base else None, "base-" if vol.is_base else None, vol.fmt)
    assert got == pve_reads
    assert names.pve_text(vol, base) == text  # and written back the same: a name Proxmox VE reads


@pytest.mark.parametrize(("text", "why"), [
    ("100/vm-101-disk-0.raw", "a disk in another guest's folder"),
    ("100/base-101-disk-0.raw", "a base in another guest's folder"),
    ("0100/vm-100-disk-0.raw", "a second spelling of a folder"),
    ("100/vm-100-a..b.raw", "dot-dot"),
    ("100/vm-100-disk-0.raw/101/vm-101-disk-0.raw", "a long form whose base is no base"),
    ("base/base-100-disk-0.raw", "stork's own layout"),
    ("100/foo.raw", "a name Proxmox VE allows but does not number"),
])
def test_proxmox_ve_volnames_stork_refuses(text, why):
    with pytest.raises(InvalidName, match="Proxmox VE's layout"):
        names.pve_volname(text)


def test_a_template_made_of_a_linked_clone_keeps_its_long_form():
    """Proxmox VE lists a base whose qcow2 still reads through another base in the long form."""
    text = "100/base-100-disk-0.qcow2/101/base-101-disk-0.qcow2"
    assert names.pve_volname(text) == VolName(None, "base-101-disk-0", "qcow2")
    assert names.short_volid(f"local:{text}") == "local:101/base-101-disk-0.qcow2"


def test_a_linked_clones_long_form_is_folded_for_the_cli_and_refused_where_stored():
    long = "local:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2"
    assert names.short_volid(long) == "local:101/vm-101-disk-0.qcow2"
    assert names.short_volid("local:101/vm-101-disk-0.qcow2") == "local:101/vm-101-disk-0.qcow2"
    with pytest.raises(InvalidName, match=r"write it local:101/vm-101-disk-0\.qcow2"):
        names.stored_volid(long)
    assert names.any_volname("100/base-100-disk-0.qcow2") == VolName(None, "base-100-disk-0", "qcow2")
    with pytest.raises(InvalidName):
        names.any_volname("100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2")


def test_a_base_of_proxmox_ves_layout_carries_its_templates_id():
    assert names.pve_folder(VolName(None, "base-100-disk-0", "raw")) == "100"
    for name in ("debian-12", "base-0100-disk-0", "base-99-disk-0"):
        with pytest.raises(InvalidName, match="base-<vmid>-<name>"):
            names.pve_folder(VolName(None, name, "raw"))
