"""A worker SIGKILLed right after each effect (a volume made, renamed into base/, freed) on the
btrfs and ZFS storages, as tests/faults/test_safety.py does on dir storage: the redelivered step
adopts or finishes what was done, the job succeeds, and the guest's folder holds exactly its
volumes (no second disk, no temp subvolume or dataset). Ceph is shared, so its steps may run
on workers without fault points: it is not in this table."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import BTRFS, NO_BTRFS, NO_ZFS, ZFS
from tests.helpers import crash

STORAGES = [
    pytest.param("bt", marks=pytest.mark.skipif(bool(NO_BTRFS), reason=f"btrfs: {NO_BTRFS}")),
    pytest.param("zfs", marks=pytest.mark.skipif(bool(NO_ZFS), reason=f"zfs: {NO_ZFS}")),
]


def held(storage: str, folder: int | str) -> list[str]:
    """Everything in a guest's (or the base) folder of the storage, hidden temp entries
    included: the entries of a btrfs folder, the datasets below a ZFS folder dataset."""
    if storage == "bt":
        path = BTRFS.mount / str(folder)
        return sorted(os.listdir(path)) if path.exists() else []
    out = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", ZFS.name], capture_output=True, text=True,
                         check=True).stdout.split()
    return sorted(name.rpartition("/")[2] for name in out if name.startswith(f"{ZFS.name}/{folder}/"))


def guest(client, g: int, storage: str) -> str:
    job = client.run("create", vmid=g, node="crash", disks={"scsi0": {"storage": storage, "size": "4M"}})
    assert job.state == "succeeded", job.error
    return job.result["disks"]["scsi0"]


@pytest.mark.parametrize("storage", STORAGES)
def test_a_crash_right_after_a_disk_is_made_adopts_it(client, vmid, faulty, storage):
    c = vmid()
    job = crash(client, faulty, "created", "create", vmid=c, node="crash",
                disks={"scsi0": {"storage": storage, "size": "4M"}})
    assert job.result["disks"] == {"scsi0": f"{storage}:{c}/vm-{c}-disk-0.raw"}
    assert held(storage, c) == [f"vm-{c}-disk-0.raw"] and client.guest(c).lock == ""


@pytest.mark.parametrize("storage", STORAGES)
def test_a_crash_right_after_a_linked_clone_is_made_adopts_it(client, vmid, faulty, storage):
    g, c = vmid(), vmid()
    guest(client, g, storage)
    assert client.run("template", vmid=g).state == "succeeded"
    job = crash(client, faulty, "created", "linked_clone", vmid=g, newid=c)
    disk = job.result["disks"]["scsi0"]
    assert held(storage, c) == [f"vm-{c}-disk-0.raw"] and client.volume(disk).parent == client.guest(g).disks["scsi0"]


@pytest.mark.parametrize("storage", STORAGES)
def test_a_crash_right_after_the_rename_into_base_completes_the_template(client, vmid, faulty, storage):
    g = vmid()
    guest(client, g, storage)
    crash(client, faulty, "based", "template", vmid=g)
    base = client.guest(g).disks["scsi0"]
    assert client.guest(g).template and client.volume(base).is_base and held(storage, g) == []
    c = vmid()
    assert client.run("linked_clone", vmid=g, newid=c).state == "succeeded"  # protected: clonable


@pytest.mark.parametrize("storage", STORAGES)
def test_a_crash_right_after_a_destroy_frees_a_disk_finishes_it(client, vmid, faulty, storage):
    g = vmid()
    job = client.run("create", vmid=g, node="crash", disks={"scsi0": {"storage": storage, "size": "4M"},
                                                            "scsi1": {"storage": storage, "size": "4M"}})
    assert job.state == "succeeded", job.error
    crash(client, faulty, "freed", "destroy", vmid=g)
    assert not client.guest_store.exists(g) and held(storage, g) == []
