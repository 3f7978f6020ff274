"""Ceph RBD storage end to end, on a real one-node Ceph cluster the session starts (storage
`ceph`, shared): a template, its linked and full clones and moves in and out, through the
CLI, the queue and the workers of both nodes; what stork made is checked with the real `rbd`
tool and `qemu-img` through librbd. Skipped, with the reason, where no cluster can start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from drivers import driver_for
from drivers.backends.rbd import RbdDriver
from drivers.errors import Refused, StorkError
from drivers.names import VolName
from drivers.storage import StorageConfig
from tests.conftest import CEPH, NO_CEPH
from tests.helpers import PATTERN_MIB, fill, qemu_io_write, volume_path

pytestmark = pytest.mark.skipif(bool(NO_CEPH), reason=f"rbd: {NO_CEPH}")


def image(volid: str) -> str:
    """The RBD image of a `ceph:` volume: `<folder>.<name>.<fmt>` in the pool."""
    folder, _, file = volid.split(":", 1)[1].partition("/")
    return f"{CEPH.pool}/{folder}.{file}"


def info(volid: str) -> dict:
    return json.loads(CEPH.rbd("info", "--format", "json", image(volid)))


def same(a: str, b: str) -> bool:
    """qemu-img compare of two volumes, each a file or an RBD image read through librbd."""
    def spec(volid: str) -> str:
        return CEPH.spec(image(volid).split("/", 1)[1]) if volid.startswith("ceph:") else str(volume_path(volid))

    fmt = lambda v: "qcow2" if v.endswith(".qcow2") else "raw"  # noqa: E731
    return subprocess.run(["qemu-img", "compare", "-q", "-f", fmt(a), "-F", fmt(b), spec(a), spec(b)],
                          check=False).returncode == 0


@pytest.fixture
def template(stork, vmid, tmp_path) -> tuple[int, str]:
    """A template on ceph whose base holds a pattern (written to a local disk, moved in)."""
    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=local:16M")
    assert code == 0, err
    qemu_io_write(volume_path(f"local:{g}/vm-{g}-disk-0.raw"), "raw", PATTERN_MIB, PATTERN_MIB, 0x4d)
    code, _, err = stork("disk", "move", g, "scsi0", "ceph")
    assert code == 0, err
    code, _, err = stork("template", g)
    assert code == 0, err
    return g, f"ceph:base/base-{g}-disk-0.raw"


def test_a_template_is_an_image_with_a_protected_snapshot(client, template):
    g, base = template
    assert client.guest(g).disks == {"scsi0": base}
    snaps = json.loads(CEPH.rbd("snap", "ls", "--format", "json", image(base)))
    assert [s["name"] for s in snaps] == ["__base__"]
    assert json.loads(CEPH.rbd("info", "--format", "json", f"{image(base)}@__base__"))["protected"] == "true"
    assert client.volume(base).is_base and client.volume(base).virtual_size == 16 << 20


def test_a_linked_clone_is_an_rbd_clone_whose_parent_is_the_base(stork, client, vmid, template):
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--linked")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk == f"ceph:{c}/vm-{c}-disk-0.raw"
    parent = info(disk)["parent"]
    assert (parent["pool"], parent["image"], parent["snapshot"]) == (CEPH.pool, image(base).split("/")[1], "__base__")
    assert client.volume(disk).parent == base and client.volume(base).clones == (disk,)
    assert same(base, disk)
    code, _, err = stork("guest", "destroy", g)
    assert code == 1 and err == f"stork: guest {g}: base {base} still has linked clones: {disk}\n"  # at submit


def test_ceph_itself_refuses_to_drop_a_base_with_clones_as_storks_refusal(stork, client, vmid, template):
    g, base = template
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    drv = driver_for(client.cfg.storage("ceph"))
    with pytest.raises(Refused, match=rf"freeing {base} failed: it has linked clones or snapshots \(Ceph: "):
        drv.free(drv.parse_volname(base.split(":", 1)[1]))
    assert json.loads(CEPH.rbd("info", "--format", "json", f"{image(base)}@__base__"))["protected"] == "true"


def test_a_full_clone_and_moves_between_ceph_and_dir_keep_the_data(stork, client, vmid, template):
    g, base = template
    c = vmid()
    code, _, err = stork("clone", g, c, "--full")
    assert code == 0, err
    disk = client.guest(c).disks["scsi0"]
    assert disk.startswith(f"ceph:{c}/") and "parent" not in info(disk) and same(base, disk)
    for storage, fmt in (("local", "qcow2"), ("ceph", "raw")):
        code, _, err = stork("disk", "move", c, "scsi0", storage, "--format", fmt)
        assert code == 0, err
        moved = client.guest(c).disks["scsi0"]
        assert moved.startswith(f"{storage}:") and moved.endswith(f".{fmt}") and same(base, moved)


def test_steps_on_a_shared_rbd_storage_run_on_either_node(stork, client, vmid, template):
    """`ceph` is shared: its steps go to the shared queue, served by node1 and node2."""
    g, _ = template
    nodes: set[str] = set()
    for _ in range(4):
        c = vmid()
        job = client.run("linked_clone", vmid=g, newid=c)
        assert job.state == "succeeded", job.error
        nodes |= set(job.ran_on.values())
    assert nodes <= {"node1", "node2"} and nodes


def test_destroying_a_clone_and_its_template_leaves_no_image(stork, client, vmid, template):
    g, base = template
    c = vmid()
    assert stork("clone", g, c, "--linked")[0] == 0
    assert stork("guest", "destroy", c)[0] == 0
    assert stork("guest", "destroy", g)[0] == 0
    names = {e["image"] for e in json.loads(CEPH.rbd("ls", "-l", "--format", "json", CEPH.pool) or "[]")}
    assert image(base).split("/")[1] not in names and f"{c}.vm-{c}-disk-0.raw" not in names


def test_an_unreachable_cluster_is_one_line_not_a_hang(tmp_path: Path):
    """A storage whose ceph.conf names no running monitor: a listing fails within the
    client's timeout, in one line naming what was being done."""
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon_host = 127.0.0.1:1\nauth_client_required = none\nclient_mount_timeout = 3\n"
                    "rados_mon_op_timeout = 3\n")
    drv = driver_for(StorageConfig("far", "rbd", shared=True, options={"pool": "stork", "conf": conf,
                                                                        "username": "admin"}))
    with pytest.raises(StorkError) as failed:
        drv.list_volumes()
    assert str(failed.value).startswith("listing pool stork failed: ") and "\n" not in str(failed.value)


_namespaces = iter(range(1_000_000))


@pytest.fixture
def rbd() -> RbdDriver:
    """A fresh, empty rbd storage: a namespace of its own in the test cluster's pool."""
    ns = f"copy{next(_namespaces)}"
    CEPH.rbd("namespace", "create", f"{CEPH.pool}/{ns}")
    d = driver_for(StorageConfig("r", "rbd", shared=True, options={"pool": CEPH.pool, "namespace": ns,
                                                                   "conf": CEPH.conf, "username": "admin"}))
    assert isinstance(d, RbdDriver)
    return d


def images(d: RbdDriver) -> list[str]:
    return sorted(i["image"] for i in json.loads(CEPH.rbd("ls", "-l", "--format", "json", d.where))
                  if "snapshot" not in i)


BASE, DISK = VolName(None, "base-100-disk-0", "raw"), VolName(100, "vm-100-disk-0", "raw")
COPY = VolName(101, "vm-101-disk-0", "raw")


def test_a_copy_of_a_base_within_the_cluster_is_a_plain_disk_of_its_data(rbd):
    """The copy, a plain disk, has the base's data and none of its snapshot, no parent, and
    nothing else is left in the pool."""
    rbd.allocate(DISK, 16 << 20)
    fill(rbd, DISK, 0, b"\x5a" * (1 << 20))
    rbd.make_base(DISK, BASE)
    rbd.allocate(COPY, 16 << 20)
    seen: list[tuple[int, int]] = []
    rbd.copy_from(rbd, BASE, COPY, lambda done, total: seen.append((done, total)))
    rbd.compare(rbd, BASE, COPY)
    assert seen[-1] == (16 << 20, 16 << 20) and rbd.parent_of(COPY) is None
    assert json.loads(CEPH.rbd("snap", "ls", "--format", "json", f"{rbd.where}/101.vm-101-disk-0.raw")) == []
    assert images(rbd) == ["101.vm-101-disk-0.raw", "base.base-100-disk-0.raw"]
    rbd.free_volume(COPY)
    rbd.free_volume(BASE)  # the copy never was its clone


def test_a_copy_of_a_linked_clone_is_flattened_not_a_clone_of_its_base(rbd):
    rbd.allocate(DISK, 16 << 20)
    fill(rbd, DISK, 0, b"\x5a" * (1 << 20))
    rbd.make_base(DISK, BASE)
    clone = VolName(102, "vm-102-disk-0", "raw")
    rbd.link_clone(BASE, clone)
    rbd.allocate(COPY, 16 << 20)
    rbd.copy_from(rbd, clone, COPY)
    rbd.compare(rbd, clone, COPY)
    assert rbd.parent_of(COPY) is None and rbd.clones_of(BASE) == [clone]


def test_exists_asks_the_image_and_a_missing_namespace_is_not_taken_for_an_empty_one(rbd):
    """exists() asks the image itself (`rbd info`, not a listing, which leaves out an image it
    cannot open and exits 0): present, absent; and where the storage's namespace is not there,
    NotFound, never "gone"."""
    from drivers.errors import NotFound

    vol = rbd.parse_volname("100/vm-100-disk-0.raw")
    assert not rbd.exists(vol)
    rbd.allocate(vol, 4 << 20)
    assert rbd.exists(vol)
    CEPH.rbd("rm", f"{rbd.where}/{image('ceph:100/vm-100-disk-0.raw').split('/', 1)[1]}")
    CEPH.rbd("namespace", "remove", rbd.where)
    with pytest.raises(NotFound):
        rbd.exists(vol)
