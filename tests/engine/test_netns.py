"""Copies between nodes over a real link: node `far`'s worker runs in a network namespace of
its own (tests/netns.py), reached over a veth pair; its exports listen on its address there
(10.213.77.2), node1's on the host end (10.213.77.1), as [nodes.<name>] address says. Skipped
where this machine cannot make a namespace."""

from __future__ import annotations

import socket

import pytest

from tests import netns
from tests.conftest import NETNS, NO_NETNS, REDIS_PORT, Worker
from tests.helpers import held_copy, qemu_io_write, qemu_same, volume_path

pytestmark = pytest.mark.skipif(bool(NO_NETNS), reason=NO_NETNS or "a namespace is there")


@pytest.fixture(scope="module")
def far(workers):
    """node `far`'s worker, inside the namespace, reaching Redis on the host end of the link."""
    assert isinstance(NETNS, netns.Netns)
    worker = Worker("far", concurrency=2, env={"STORK_REDIS_URL": f"redis://{netns.HOST_IP}:{REDIS_PORT}/0"},
                    prefix=tuple(NETNS.prefix))
    yield worker
    worker.stop()


def _guest(client, vmid: int, node: str, storage: str, mib: int = 128) -> str:
    job = client.run("create", vmid=vmid, node=node, disks={"scsi0": {"storage": storage, "size": f"{mib}M"}})
    assert job.state == "succeeded", job.error
    volid = job.result["disks"]["scsi0"]
    qemu_io_write(volume_path(volid), "raw", 0, (mib - 8) << 20, 0x3C)
    return volid


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


def test_a_copy_from_the_far_node_is_served_on_its_own_address_only(client, vmid, far):
    """far exports on 10.213.77.2, inside its namespace: node1 reads it across the veth pair,
    and nothing answers for that export on this side's loopback."""
    g, c = vmid(), vmid()
    source = _guest(client, g, "far", "far")
    job = client.submit("full_clone", vmid=g, newid=c, storage="local1")
    with held_copy(client, job.id):
        export = client.job(job.id).ctx["exports"]["scsi0"]
        assert export["host"] == netns.NS_IP
        assert _refused("127.0.0.1", export["port"])
    job = client.wait(job.id, timeout=120)
    assert job.state == "succeeded", job.error
    assert job.ran_on["export"] == "far" and job.ran_on["copy_data"] == "node1"
    assert qemu_same(volume_path(source), volume_path(client.guest(c).disks["scsi0"]))


def test_a_template_of_node1_is_linked_cloned_and_a_guest_migrated_onto_the_far_node(client, vmid, far):
    """node1 exports on the host end of the link; far makes a replica and clones it, and a
    guest goes to far and back."""
    t, c, g = vmid(), vmid(), vmid()
    _guest(client, t, "node1", "local1", mib=64)
    assert client.run("template", vmid=t).state == "succeeded"
    job = client.run("linked_clone", vmid=t, newid=c, storage="far")
    assert job.state == "succeeded" and job.kind == "replica_clone", job.error
    assert job.ctx["exports"]["scsi0"]["host"] == netns.HOST_IP and job.ran_on["copy_data"] == "far"
    assert qemu_same(volume_path(client.guest(t).disks["scsi0"]), volume_path(client.guest(c).disks["scsi0"]))

    volid = _guest(client, g, "node1", "local1", mib=64)
    data = volume_path(volid).read_bytes()
    assert client.run("migrate", vmid=g, node="far", storage="far").state == "succeeded"
    assert client.guest(g).node == "far" and volume_path(client.guest(g).disks["scsi0"]).read_bytes() == data
    back = client.run("migrate", vmid=g, node="node1", storage="local1")
    assert back.state == "succeeded", back.error
    assert client.guest(g).node == "node1" and volume_path(client.guest(g).disks["scsi0"]).read_bytes() == data
