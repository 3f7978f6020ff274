"""Which guest config names which volume, on which node (worker.jobs.usage.named_here, read
by an undo of the guest its job holds, and by a free's drop of unused volumes and replicas):
on a storage each node has its own of (`local`), one volume id names a volume on every node."""

from __future__ import annotations

import pytest

from drivers.guests import Guest
from worker.jobs.usage import named_here

VOL = "local:100/vm-100-disk-0.raw"
BASE = "local:base/base-100-disk-0.raw"
ON_NODE1 = Guest(100, "node1", disks={"scsi0": VOL, "scsi1": VOL}, unused=(VOL,))
TEMPLATE = Guest(100, "node1", template=True, disks={"scsi0": BASE},
                 replicas={BASE: {"of": BASE, "identity": "x", "node": "node2"}})


@pytest.mark.parametrize(("guest", "volid", "node", "shared", "flags", "keys"), [
    # its own node: every way it names the volume
    (ON_NODE1, VOL, "node1", False, {}, ["scsi0", "scsi1", "unused"]),
    (ON_NODE1, VOL, "node1", False, {"unused": False}, ["scsi0", "scsi1"]),
    # another node's volume of that id (a migration's copy, a copy kept after one): not the guest's
    (ON_NODE1, VOL, "node2", False, {}, []),
    # a shared storage's volume is one volume, seen from every node
    (ON_NODE1, VOL, "node2", True, {}, ["scsi0", "scsi1", "unused"]),
    (ON_NODE1, "local:100/vm-100-disk-1.raw", "node1", False, {}, []),
    # a template's base on its node; its replica of that id on the node the record names
    (TEMPLATE, BASE, "node1", False, {}, ["scsi0"]),
    (TEMPLATE, BASE, "node2", False, {}, ["replica"]),
    (TEMPLATE, BASE, "node2", False, {"replicas": False}, []),
    (TEMPLATE, BASE, "node3", False, {}, []),
    (TEMPLATE, BASE, "node3", True, {}, ["scsi0", "replica"]),
])
def test_a_guest_names_a_volume_of_a_node_local_storage_on_its_own_node_only(guest, volid, node, shared, flags,
                                                                             keys):
    assert named_here(guest, volid, node, shared, **flags) == keys
