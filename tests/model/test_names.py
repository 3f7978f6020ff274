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
