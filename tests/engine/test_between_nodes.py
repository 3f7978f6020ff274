"""Copies between nodes: node1's and node2's workers, each with its own node-local storage
(local1, local2), a volume of one copied to the other through a qemu-nbd export over TLS
(drivers/transfer.py) — full clones, disk copies, template copies and migrations, through
the CLI, the data compared with qemu-img compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.errors import Refused
from tests.helpers import exports_running, qemu_io_write, qemu_same, volume_path


def _make(client, vmid: int, node: str, storage: str, mib: int = 64, fmt: str = "raw") -> str:
    """A guest with one disk holding a recognisable pattern; its volume id."""
    job = client.run("create", vmid=vmid, node=node, disks={"scsi0": {"storage": storage, "size": f"{mib}M",
                                                                      "format": fmt}})
    assert job.state == "succeeded", job.error
    volid = client.guest(vmid).disks["scsi0"]
    qemu_io_write(volume_path(volid), fmt, 3 << 20, 2 << 20, 0x5A)
    qemu_io_write(volume_path(volid), fmt, (mib - 1) << 20, 1 << 20, 0x17)
    return volid


def _sides(job) -> tuple[set[str], set[str]]:
    """The nodes the job's export steps and its copy steps ran on."""
    return ({job.ran_on[s] for s in ("export", "end_export")}, {job.ran_on[s] for s in ("allocate", "copy_data")})


def test_a_full_clone_onto_another_nodes_storage_is_copied_there_through_an_export(client, vmid, stork):
    """A template on node1's local storage, cloned in full onto node2's: node1 exports, node2
    copies, the new guest lives on node2, its disk equals the base, and no export is left."""
    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1", fmt="qcow2")
    assert client.run("template", vmid=t).state == "succeeded"
    code, out, err = stork("--json", "clone", t, c, "--full", "--storage", "local2")
    assert code == 0, err
    job = client.job(json.loads(out)["id"])
    assert _sides(job) == ({"node1"}, {"node2"})
    clone = client.guest(c)
    assert clone.node == "node2" and clone.disks["scsi0"].startswith("local2:")
    assert qemu_same(volume_path(client.guest(t).disks["scsi0"]), volume_path(clone.disks["scsi0"]))
    assert exports_running() == []


def test_a_disk_copy_and_a_template_copy_cross_nodes(client, vmid, stork):
    g, t2 = vmid(), vmid()
    volid = _make(client, g, "node1", "local1")
    code, out, err = stork("--json", "disk", "copy", volid, "local2")
    assert code == 0, err
    job = client.job(json.loads(out)["id"])
    copy = job.result["volumes"]["copy"]
    assert copy.startswith("local2:") and qemu_same(volume_path(volid), volume_path(copy))
    assert _sides(job) == ({"node1"}, {"node2"})

    assert client.run("template", vmid=g).state == "succeeded"
    code, _, err = stork("template", "copy", g, t2, "--storage", "local2")
    assert code == 0, err
    copied = client.guest(t2)
    assert copied.template and copied.node == "node2" and "/base-" in copied.disks["scsi0"]
    assert qemu_same(volume_path(client.guest(g).disks["scsi0"]), volume_path(copied.disks["scsi0"]))


def test_a_guest_migrates_to_another_node_and_back(client, vmid, stork):
    """Every disk copied, verified, the guest switched to node2, the originals freed; then
    back to node1 with --keep-source, which leaves the copies on node2 and says so."""
    g = vmid()
    volid = _make(client, g, "node1", "local1")
    first = volume_path(volid).read_bytes()
    code, out, err = stork("--json", "guest", "migrate", g, "node2", "--storage-map", "local1=local2")
    assert code == 0, err
    guest = client.guest(g)
    assert guest.node == "node2" and guest.disks["scsi0"].startswith("local2:") and guest.unused == ()
    assert volume_path(guest.disks["scsi0"]).read_bytes() == first
    assert not volume_path(volid).exists()  # freed on node1

    code, out, err = stork("--json", "guest", "migrate", g, "node1", "--storage", "local1", "--keep-source")
    assert code == 0, err
    job = client.job(json.loads(out)["id"])
    back = client.guest(g)
    assert back.node == "node1" and back.disks["scsi0"].startswith("local1:")
    assert job.result["kept"] == {"node": "node2", "volumes": [guest.disks["scsi0"]]}
    assert volume_path(guest.disks["scsi0"]).exists()
    assert volume_path(back.disks["scsi0"]).read_bytes() == first


def test_a_migrations_late_free_leaves_the_guests_unused_list_on_its_new_node_alone(client, vmid, stork):
    """The free of the originals on node1 may run long after the switch (node1 busy, or down for
    the maintenance the guest left for), while the guest is unlocked on node2. The unused list is
    node2's then: a volume kept there under an original's id (a disk of a storage both nodes
    have, detached since) stays listed. Here node1's storage lock holds the free back, and the
    id is put in the list by hand."""
    from drivers.flock import file_lock
    from drivers.guests import GuestStore
    from tests.conftest import BASE

    g = vmid()
    volid = _make(client, g, "node1", "local1", mib=8)
    with file_lock(BASE / "lock" / "storage-local1.lock", 10, "the test"):  # the free's, on node1
        job = client.submit("migrate", vmid=g, node="node2", storage="local2")
        deadline = time.monotonic() + 20
        while client.guest(g).node != "node2":
            assert time.monotonic() < deadline, client.job(job.id).error
            time.sleep(0.05)
        with GuestStore(BASE / "guests").editing(g) as box:
            box[0] = box[0].with_(unused=(volid,))
    done = client.wait(job.id, timeout=30)
    assert done.state == "succeeded" and not volume_path(volid).exists()
    assert client.guest(g).unused == (volid,)


def test_a_template_migrates_with_its_bases(client, vmid, stork):
    t = vmid()
    _make(client, t, "node1", "local1")
    assert client.run("template", vmid=t).state == "succeeded"
    base = client.guest(t).disks["scsi0"]
    code, _, err = stork("guest", "migrate", t, "node2", "--storage-map", "local1=local2")
    assert code == 0, err
    moved = client.guest(t)
    assert moved.template and moved.node == "node2"
    assert moved.disks["scsi0"] == base.replace("local1:", "local2:")  # a base keeps its name
    assert not volume_path(base).exists()
    code, _, err = stork("clone", t, vmid())  # linked, on node2 now
    assert code == 0, err


def test_a_template_whose_bases_have_linked_clones_does_not_migrate(client, vmid, stork):
    """Refused by the export step on node1, which lists the clones; nothing is left on node2."""
    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1")
    assert client.run("template", vmid=t).state == "succeeded"
    assert client.run("linked_clone", vmid=t, newid=c).state == "succeeded"
    before = sorted(p.name for p in volume_path("local2:x").parent.glob("**/*"))
    code, _, err = stork("guest", "migrate", t, "node2", "--storage-map", "local1=local2")
    assert code == 1
    assert "linked clone(s) on node node1" in err and client.guest(c).disks["scsi0"] in err
    assert client.guest(t).node == "node1" and not client.guest(t).lock
    assert sorted(p.name for p in volume_path("local2:x").parent.glob("**/*")) == before
    assert exports_running() == []


@pytest.mark.parametrize(("args", "message"), [
    (["node1"], "is on node 'node1' already"),
    (["node7"], "unknown node 'node7'"),
    (["node2"], "storage 'local1' does not exist on node 'node2' (map local1 to one that does"),
    (["node2", "--storage-map", "local1"], "invalid storage map entry 'local1': expected OLD=NEW"),
    (["node2", "--storage-map", "local1=local2,local1=shared"],  # the last won, without a word
     "invalid storage map 'local1=local2,local1=shared': local1 is mapped twice"),
])
def test_a_migration_that_cannot_work_is_refused_before_anything_runs(client, vmid, stork, args, message):
    g = vmid()
    _make(client, g, "node1", "local1", mib=8)
    code, _, err = stork("guest", "migrate", g, *args)
    assert code in (1, 2) and message in err, err
    assert client.guest(g).node == "node1" and client.jobs(vmid=g, kind="migrate") == []


def test_a_linked_clone_does_not_migrate_away_from_its_base(client, vmid, stork):
    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    assert client.run("linked_clone", vmid=t, newid=c).state == "succeeded"
    code, _, err = stork("guest", "migrate", c, "node2", "--storage-map", "local1=local2")
    assert code == 1 and "is a linked clone of" in err and "clone it with --full first" in err


def test_a_disk_move_onto_another_nodes_storage_points_to_migrate(client, vmid):
    g = vmid()
    _make(client, g, "node1", "local1", mib=8)
    with pytest.raises(Refused, match=f"disks stay on its node \\(move the guest with 'stork guest migrate {g}"):
        client.submit("move", vmid=g, disk="scsi0", storage="local2")


def test_without_a_cluster_key_copies_between_nodes_are_refused(client, vmid):
    """A config without [cluster] tls_psk_file: refused at submit, naming the key to set."""
    from dataclasses import replace

    from worker.jobs.kinds import KINDS

    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    keyless = replace(client.cfg, cluster_key=None)
    with pytest.raises(Refused, match=r"needs the cluster key: set \[cluster\] tls_psk_file"):
        KINDS["full_clone"].prepare({"vmid": t, "newid": vmid(), "storage": "local2"}, keyless)
    with pytest.raises(Refused, match=r"needs the cluster key"):
        KINDS["migrate"].prepare({"vmid": t, "node": "node2", "storage": "local2"}, keyless)


def test_the_export_refuses_a_reader_without_the_key(tmp_path):
    """qemu-nbd serves the cluster key's holders only: another key, or no TLS, is refused."""
    from drivers import qemu, transfer

    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x42" * (1 << 20))
    key, other = tmp_path / "cluster.psk", tmp_path / "other.psk"
    transfer.make_key(key)
    transfer.make_key(other)
    fd = os.open(image, os.O_RDONLY)
    try:
        export = transfer.start(qemu.Image.of_fd("raw", fd, "disk"), 1 << 20, "127.0.0.1", key)
    finally:
        os.close(fd)
    try:
        copy = tmp_path / "copy.raw"
        copy.write_bytes(b"\0" * (1 << 20))
        target_fd = os.open(copy, os.O_RDWR)
        target = qemu.Image.of_fd("raw", target_fd, "copy")
        with pytest.raises(Exception, match="TLS"):
            qemu.convert(transfer.source(export, other, "disk"), target, 1 << 20)
        plain = subprocess.run(["qemu-img", "info", f"nbd://127.0.0.1:{export.port}/{export.name}"],
                               capture_output=True, text=True, check=False)
        assert plain.returncode == 1 and "TLS" in plain.stderr
        qemu.convert(transfer.source(export, key, "disk"), target, 1 << 20)  # the key's holder reads it
        os.close(target_fd)
        assert copy.read_bytes() == image.read_bytes()
    finally:
        transfer.stop(export)
    assert not transfer.running(export)


# ---- template replicas -------------------------------------------------------------------


def _parent(volid: str) -> str | None:
    """The base a volume reads through, read from its storage (every node's is on this machine)."""
    from drivers import driver_for
    from producer.client import Client

    storage, volname = volid.split(":", 1)
    drv = driver_for(Client().cfg.storage(storage))
    parent = drv.parent_of(drv.parse_volname(volname))
    return drv.volid(parent) if parent else None


def test_a_linked_clone_onto_another_node_copies_each_base_there_once_as_a_replica(client, vmid, stork):
    """The first linked clone of a node1 template onto local2 copies its base there as a
    replica (recorded in the template, verified, read-only) and clones that; the second
    reuses it: an ordinary linked clone on node2, no copy, no export."""
    t, c1, c2 = vmid(), vmid(), vmid()
    _make(client, t, "node1", "local1", fmt="qcow2")
    assert client.run("template", vmid=t).state == "succeeded"
    base = client.guest(t).disks["scsi0"]
    code, out, err = stork("--json", "clone", t, c1, "--storage", "local2")
    assert code == 0, err
    first = client.job(json.loads(out)["id"])
    assert first.kind == "replica_clone" and _sides(first) == ({"node1"}, {"node2"})
    [(replica, record)] = client.guest(t).replicas.items()
    assert replica.startswith("local2:base/") and record["of"] == base and record["node"] == "node2"
    clone = client.guest(c1)
    assert clone.node == "node2" and _parent(clone.disks["scsi0"]) == replica
    assert qemu_same(volume_path(base), volume_path(clone.disks["scsi0"]))
    assert client.guest(t).lock == "" and exports_running() == []

    code, out, err = stork("--json", "clone", t, c2, "--storage", "local2")
    assert code == 0, err
    second = client.job(json.loads(out)["id"])
    assert second.kind == "linked_clone" and "export" not in second.ran_on and second.ran_on["link_disks"] == "node2"
    assert _parent(client.guest(c2).disks["scsi0"]) == replica and len(client.guest(t).replicas) == 1

    code, out, _ = stork("--json", "template", "replicas", t)
    assert code == 0 and json.loads(out) == [{"replica": replica, "of": base, "identity": record["identity"],
                                              "node": "node2", "own_identity": record["own_identity"]}]
    code, out, _ = stork("--json", "volume", "info", base)
    assert code == 0 and json.loads(out)["replicas"] == [f"{replica} (node node2)"]
    on_node2 = subprocess.run([sys.executable, "-m", "producer.cli", "--json", "volume", "list", "local2"],
                              env={**os.environ, "STORK_NODE": "node2"}, capture_output=True, text=True, check=True)
    listed = next(v for v in json.loads(on_node2.stdout) if v["volid"] == replica)
    assert listed["users"] == [f"{t}:replica"] and not listed["orphan"] and listed["base"]


def test_a_template_with_replicas_is_destroyed_with_them_but_not_while_one_has_clones(client, vmid, stork):
    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1", mib=16)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, c, "--storage", "local2")[0] == 0
    [replica] = client.guest(t).replicas
    clone_disk = client.guest(c).disks["scsi0"]
    code, _, err = stork("guest", "destroy", t)
    assert code == 1 and f"replica {replica} on node node2 still has linked clones: {clone_disk}" in err
    assert client.guest(t).replicas and volume_path(replica).exists() and client.guest(t).lock == ""
    assert stork("guest", "destroy", c)[0] == 0
    code, out, err = stork("--json", "guest", "destroy", t)
    assert code == 0, err
    assert not volume_path(replica).exists() and not client.guest_store.exists(t)
    assert json.loads(out)["result"]["freed_replicas"] == [replica]


def test_freeing_a_replica_drops_it_from_its_template(client, vmid, stork):
    """`volume free` of a replica runs on its node and forgets it; the next clone there makes
    a new one."""
    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1", mib=16)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, c, "--storage", "local2")[0] == 0
    [replica] = client.guest(t).replicas
    code, _, err = stork("volume", "free", replica)
    assert code == 1 and "linked clone" in err  # its clone reads through it
    assert stork("guest", "destroy", c)[0] == 0
    code, _, err = stork("volume", "free", replica)
    assert code == 0, err
    assert client.guest(t).replicas == {} and not volume_path(replica).exists()
    code, out, err = stork("--json", "clone", t, vmid(), "--storage", "local2")
    assert code == 0 and client.job(json.loads(out)["id"]).kind == "replica_clone"


# ---- what the review of this wing found ----------------------------------------------------


def test_a_disk_on_a_storage_every_node_has_is_exported_by_its_own_node(client, vmid):
    """`local` exists on every node, each with its own volumes: a full clone of a node1 guest's
    `local` disk onto node2's storage reads node1's volume through node1's export, never
    node2's volume of the same name."""
    g, c = vmid(), vmid()
    _make(client, g, "node1", "local", mib=8)
    job = client.run("full_clone", vmid=g, newid=c, storage="local2")
    assert job.state == "succeeded", job.error
    assert job.params["disks"]["scsi0"]["across"] is True and job.ran_on["export"] == "node1"
    assert qemu_same(volume_path(client.guest(g).disks["scsi0"]), volume_path(client.guest(c).disks["scsi0"]))


def _submitted_but_held(client, monkeypatch, kind: str, **options):
    """A job recorded, its steps held back (as if its queue were long) until the test sends them."""
    from worker import runner

    with monkeypatch.context() as m:
        m.setattr(runner, "send_steps", lambda *args, **kwargs: None)
        return runner.submit(kind, options, client.cfg, client.r)


def test_a_job_submitted_before_its_guest_moved_to_another_node_is_refused(client, vmid, monkeypatch):
    """A second migration prepared while the guest was on node1 runs after it moved: refused
    by the lock step, the guest and its disks untouched."""
    from worker import runner

    g = vmid()
    _make(client, g, "node1", "local1", mib=8)
    late = _submitted_but_held(client, monkeypatch, "migrate", vmid=g, node="node2", storage="local2")
    assert client.run("migrate", vmid=g, node="node2", storage="local2", keep_source=True).state == "succeeded"
    moved = client.guest(g)
    runner.send_steps(late, late.done)
    job = client.wait(late.id, timeout=30)
    assert job.state == "failed" and f"guest {g} moved to node node2 since the job was submitted" in job.error
    assert client.guest(g) == moved



def test_a_linked_clone_submitted_before_its_template_moved_to_another_node_is_refused(client, vmid, monkeypatch):
    """Prepared while the template was on node1, run after it moved to node2 with --keep-source:
    refused by the link step on node1, which makes nothing of the base left behind there (a copy
    the operator is told to free, whose name may be the moved base's own)."""
    from worker import runner

    t, c = vmid(), vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    late = _submitted_but_held(client, monkeypatch, "linked_clone", vmid=t, newid=c)
    assert client.run("migrate", vmid=t, node="node2", storage="local2", keep_source=True).state == "succeeded"
    runner.send_steps(late, late.done)
    job = client.wait(late.id, timeout=30)
    assert job.state == "failed" and f"guest {t} moved to node node2 since the job was submitted" in job.error
    assert not list(volume_path(f"local1:{c}/vm-{c}-disk-0.qcow2").parent.glob("*"))  # nothing made on node1

def test_a_job_recorded_by_another_version_is_failed_without_running_or_undoing(client, vmid, monkeypatch):
    """A record whose steps are not its kind's (written before an upgrade): its step numbers
    name other steps now, so nothing runs and nothing is undone; the error says what it had made."""
    from worker import records, runner

    g = vmid()
    _make(client, g, "node1", "local1", mib=8)
    old = _submitted_but_held(client, monkeypatch, "full_clone", vmid=g, newid=vmid())
    before = sorted(p.name for p in volume_path(client.guest(g).disks["scsi0"]).parent.iterdir())
    steps = ["lock_guest", "reserve_guest", "allocate", "copy_data", "commit_guest"]  # full_clone before this wing
    records.update(client.r, old.id, steps=steps, queues=[old.queues[old.steps.index(s)] for s in steps])
    runner.send_steps(records.load(client.r, old.id), old.done)
    job = client.wait(old.id, timeout=30)
    assert job.state == "failed" and job.error.startswith("job recorded by another version of stork")
    assert job.ran_on == {} and client.guest(g).lock == ""
    assert sorted(p.name for p in volume_path(client.guest(g).disks["scsi0"]).parent.iterdir()) == before


def test_a_replica_made_from_an_earlier_volume_of_its_bases_name_is_not_used(client, vmid, stork):
    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, vmid(), "--storage", "local2")[0] == 0
    [replica] = client.guest(t).replicas
    with client.guest_store.editing(t) as box:  # as if the base had been made anew since
        box[0] = box[0].with_(replicas={replica: {**box[0].replicas[replica], "identity": "0:0"}})
    code, _, err = stork("clone", t, vmid(), "--storage", "local2")
    assert code == 1 and f"replica {replica} was made from an earlier volume named" in err


def _replica_taken_over(client, vmid, stork) -> tuple[int, str, Path]:
    """A node1 template whose replica on node2 was removed by hand (its storage rebuilt, say)
    and another base made there under its name: (the template, the replica's id, its path)."""
    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, c := vmid(), "--storage", "local2")[0] == 0
    assert stork("guest", "destroy", c)[0] == 0
    [replica] = client.guest(t).replicas
    path = volume_path(replica)
    subprocess.run(["chattr", "-i", str(path)], check=True)  # bases are immutable
    path.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "8M"], check=True)  # another base, that name
    return t, replica, path


def test_a_volume_that_took_a_replicas_name_since_is_neither_cloned_nor_freed_as_the_replica(client, vmid, stork):
    """node2's replica is removed by hand (its storage rebuilt, say) and another base made
    there under its name: a linked clone onto node2 is refused, naming it, and the template's
    destroy leaves it where it is (a warning), where both took it for the replica by its name."""
    t, replica, path = _replica_taken_over(client, vmid, stork)
    code, _, err = stork("clone", t, vmid(), "--storage", "local2")
    assert code == 1 and f"{replica} is no longer the replica guest {t} records" in err, err
    code, out, err = stork("--json", "guest", "destroy", t)
    assert code == 0, err
    result = json.loads(out)["result"]
    assert result["freed_replicas"] == [] and f"{replica}: its name holds another volume now" in result["warning"]
    assert path.exists() and not client.guest_store.exists(t)


def test_a_replica_record_whose_volume_another_took_is_dropped_by_forget_the_volume_kept(client, vmid, stork):
    """`volume free` of the name would free the other volume: refused, naming --forget, which
    drops the template's record and leaves the volume."""
    t, replica, path = _replica_taken_over(client, vmid, stork)
    code, _, err = stork("volume", "free", replica)
    assert code == 1 and f"{replica} is not the replica guest {t} records" in err and "--forget" in err, err
    assert path.exists() and client.guest(t).replicas
    code, out, err = stork("--json", "volume", "free", "--forget", replica)
    assert code == 0, err
    assert json.loads(out)["result"]["guests"] == [t] and client.guest(t).replicas == {} and path.exists()


def test_a_replica_clone_onto_the_templates_own_node_is_refused(client, vmid):
    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    with pytest.raises(Refused, match="needs no replica"):
        client.submit("replica_clone", vmid=t, newid=vmid(), storage="local1")


def test_a_template_on_shared_storage_with_linked_clones_gets_a_replica_on_another_nodes_storage(client, vmid):
    """Its base stays where it is, clones and all: only a copy of it is made a base on node2."""
    t = vmid()
    job = client.run("create", vmid=t, disks={"scsi0": {"storage": "shared", "size": "16M"}})
    assert job.state == "succeeded", job.error
    assert client.run("template", vmid=t).state == "succeeded"
    assert client.run("linked_clone", vmid=t, newid=vmid()).state == "succeeded"  # on shared, beside its base
    job = client.run("linked_clone", vmid=t, newid=vmid(), storage="local2")
    assert job.state == "succeeded" and job.kind == "replica_clone", job.error
    assert job.params["disks"]["scsi0"]["across"] is False  # node2 reads the shared base itself
    assert len(client.guest(t).replicas) == 1


def test_a_guest_keeping_unused_volumes_on_its_node_does_not_migrate(client, vmid, stork):
    g = vmid()
    _make(client, g, "node1", "local1", mib=8)
    assert client.run("add_disk", vmid=g, disks={"scsi1": {"storage": "local1", "size": "8M"}}).state == "succeeded"
    assert client.run("detach", vmid=g, disk="scsi1").state == "succeeded"
    [unused] = client.guest(g).unused
    code, _, err = stork("guest", "migrate", g, "node2", "--storage", "local2")
    assert code == 1 and f"keeps unused volumes on node node1: {unused}" in err
    assert client.guest(g).node == "node1"


def test_a_template_with_replicas_is_not_restored_over_nor_destroyed_with_replicas_on_two_nodes(client, vmid, stork):
    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, vmid(), "--storage", "local2")[0] == 0
    [replica] = client.guest(t).replicas
    code, out, err = stork("--json", "backup", t, "--storage", "backup")
    assert code == 0, err
    backup = json.loads(out)["result"]["backup"]
    code, _, err = stork("restore", backup, t, "--force")
    assert code == 1 and f"guest {t} has replicas of its bases on other nodes: {replica}" in err
    far = "crash:base/base-1-disk-0.raw"  # a second node's replica, as a record (no volume is read)
    with client.guest_store.editing(t) as box:
        box[0] = box[0].with_(replicas={**box[0].replicas, far: {**box[0].replicas[replica], "node": "crash"}})
    code, _, err = stork("guest", "destroy", t)
    assert code == 1 and f"has replicas on 2 nodes: {far} (node crash), {replica} (node node2)" in err
    assert client.guest_store.exists(t) and volume_path(replica).exists()


def test_a_cluster_key_is_never_written_over(stork, tmp_path):
    key = tmp_path / "cluster.psk"
    code, _, err = stork("cluster", "key", key)
    assert code == 0 and key.read_text().startswith("stork:"), err
    before = key.read_text()
    code, _, err = stork("cluster", "key", key)
    assert code == 1 and "exists already: a new key would lock out the nodes that hold the old one" in err
    assert key.read_text() == before


def test_migrate_takes_a_storage_or_a_storage_map_not_both(stork, capsys):
    with pytest.raises(SystemExit) as stop:
        stork("guest", "migrate", "100", "node2", "--storage", "local2", "--storage-map", "local1=local2")
    assert stop.value.code == 2 and "not allowed with argument --storage" in capsys.readouterr().err


def test_a_template_whose_replica_was_removed_by_hand_is_still_destroyed(client, vmid, stork):
    t = vmid()
    _make(client, t, "node1", "local1", mib=8)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, c := vmid(), "--storage", "local2")[0] == 0
    assert stork("guest", "destroy", c)[0] == 0
    [replica] = client.guest(t).replicas
    subprocess.run(["chattr", "-i", str(volume_path(replica))], check=True)  # bases are immutable
    volume_path(replica).unlink()
    code, out, err = stork("--json", "guest", "destroy", t)
    assert code == 0, err
    assert not client.guest_store.exists(t) and json.loads(out)["result"]["freed_replicas"] == []


def test_a_free_on_one_node_leaves_the_guests_of_another_listing_their_own_volume_of_that_id(client, vmid, stork):
    """`local` is each node's own storage: one volume id names a volume on every node. The
    free of node2's drops it from no guest of node1, which keeps its own volume of that id as
    unused (here both nodes' `local` are one folder, so the step is run as node2 directly)."""
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import free_volume
    from worker.records import JobRecord

    g = vmid()
    _make(client, g, "node1", "local", mib=8)
    volid = client.guest(g).disks["scsi0"]
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(disks={}, unused=(volid,))
    job = JobRecord(id=records.new_id(), kind="free", node="node2", steps=["free_volume"], queues=["node.node2"],
                    state="running", params={"volid": volid, "node": "node2"}, done=0,
                    current={"step": 0, "name": "free_volume", "node": "node2", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    try:
        ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node2", step="free_volume", worker="test:1",
                          kinds=KINDS)
        free_volume(ctx)
    finally:
        client.r.srem(records.ACTIVE, job.id)
    assert client.guest(g).unused == (volid,)  # node1's, which a free there would drop


def _as_node2_with_its_own_local(client, tmp_path, kind: str, step: str, params: dict, ctx: dict | None = None):
    """A step context of node2 whose `local` is a folder of its own (in this cluster both nodes'
    `local` are one folder), for a job recorded as running that step there."""
    from dataclasses import replace

    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord

    local = client.cfg.storage("local")
    cfg = replace(client.cfg, node="node2", storages={
        **client.cfg.storages, "local": replace(local, options={**local.options, "path": str(tmp_path)})})
    steps = [s.name for s in KINDS[kind].steps]
    job = JobRecord(id=records.new_id(), kind=kind, node="node2", steps=steps, queues=["node.node2"] * len(steps),
                    state="running", params={"node": "node2", **params}, done=steps.index(step), ctx=ctx or {},
                    current={"step": steps.index(step), "name": step, "node": "node2", "worker": "test:1",
                             "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    return StepContext(job=job, cfg=cfg, r=client.r, node="node2", step=step, worker="test:1", kinds=KINDS)


def _node2_copy(tmp_path, volid: str):
    """node2's volume of the id `volid` names on node1: a copy of node1's, in node2's `local`."""
    path = tmp_path / volid.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(volume_path(volid).read_bytes())
    return path


def test_a_failed_migration_frees_its_copies_on_the_target_node_that_have_the_originals_names(client, vmid,
                                                                                              tmp_path):
    """`local` is each node's own, and a migration copies a disk there under its name on node1.
    Undone (its copy failed, say), it frees its copy on node2: the guest it holds attaches node1's
    volume of that id, not node2's (which was kept for ever, and no `volume free` could free it)."""
    from worker import records
    from worker.jobs.steps import free_made

    g = vmid()
    volid = _make(client, g, "node1", "local", mib=8)
    original = volume_path(volid).read_bytes()
    copy = _node2_copy(tmp_path, volid)
    ctx = _as_node2_with_its_own_local(
        client, tmp_path, "migrate", "allocate",
        {"lock_vmid": g, "source_node": "node1", "target_node": "node2", "delete_source": True},
        ctx={"made": {"scsi0": volid}})
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="migrate", lock_job=ctx.job.id)
    try:
        free_made(ctx)
    finally:
        client.r.srem(records.ACTIVE, ctx.job.id)
    assert not copy.exists()
    assert volume_path(volid).read_bytes() == original and client.guest(g).disks["scsi0"] == volid


def test_a_replica_another_template_is_assembled_of_stays_when_that_template_moves_away(client, vmid, stork):
    """A replica is a base like any other: a template assembled of it on node2 that then
    migrates to node1 frees its old disks there, but not the replica, which the template it was
    copied for still records (and clones onto node2 read through): kept, and said."""
    t, c, assembled = vmid(), vmid(), vmid()
    _make(client, t, "node1", "local1", mib=16)
    assert client.run("template", vmid=t).state == "succeeded"
    assert stork("clone", t, c, "--storage", "local2")[0] == 0
    [replica] = client.guest(t).replicas
    assert stork("guest", "destroy", c)[0] == 0
    job = client.run("assemble", vmid=assembled, disks={"scsi0": replica}, node="node2")
    assert job.state == "succeeded", job.error
    code, out, err = stork("--json", "guest", "migrate", assembled, "node1", "--storage", "shared")
    assert code == 0, err
    assert f"kept {replica} on node node2" in json.loads(out)["result"]["warning"], out
    assert volume_path(replica).exists() and replica in client.guest(t).replicas
    code, out, err = stork("--json", "clone", t, c, "--storage", "local2")
    assert code == 0, err
    assert client.job(json.loads(out)["id"]).kind == "linked_clone"
    assert _parent(client.guest(c).disks["scsi0"]) == replica
