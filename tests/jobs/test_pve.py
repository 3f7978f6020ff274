"""A Proxmox VE directory storage adopted in place (storage `pve`: `layout = "pve"`, known to
Proxmox VE as `tank`, its guest configs in tests/conftest.py's PVE_ETC), through the CLI,
the queue and real workers: a Proxmox VE template adopted, cloned, backed up and restored;
every volume a Proxmox VE guest config names left as it is; every refusal of import-pve."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BASE, PVE_ETC
from tests.helpers import PATTERN_MIB, qemu_io_write, qemu_same

IMAGES = BASE / "pve" / "images"
CONFIGS = PVE_ETC / "nodes" / "node1" / "qemu-server"


def path_of(volid: str) -> Path:
    return IMAGES / volid.split(":", 1)[1]


def pve_disk(vmid: int, name: str, fmt: str = "qcow2", pattern: int = 0x5A, base: bool = False) -> Path:
    """A disk as Proxmox VE makes it (a template's base read-only, as create_base leaves it)."""
    (IMAGES / str(vmid)).mkdir(parents=True, exist_ok=True)
    path = IMAGES / str(vmid) / f"{name}.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "32M"], check=True)
    qemu_io_write(path, fmt, 2 * PATTERN_MIB, PATTERN_MIB, pattern)
    if base:
        path.chmod(0o444)
    return path


@pytest.fixture
def pve_config():
    """Write a Proxmox VE guest config; removed after the test."""
    written: list[Path] = []

    def write(vmid: int, text: str, folder: Path = CONFIGS) -> Path:
        path = folder / f"{vmid}.conf"
        path.write_text(text)
        written.append(path)
        return path

    yield write
    for path in written:
        path.unlink(missing_ok=True)


def backing_of(path: Path) -> str:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], capture_output=True, check=True)
    return json.loads(out.stdout).get("backing-filename", "")


def test_a_proxmox_ve_template_is_adopted_cloned_backed_up_and_restored_in_place(stork, client, vmid, pve_config):
    t, linked, full, restored = vmid(), vmid(), vmid(), vmid()
    base = pve_disk(t, f"base-{t}-disk-0", base=True)
    conf = pve_config(t, f"name: debian\ntemplate: 1\ncores: 2\nmemory: 2048\n"
                         f"scsi0: tank:{t}/base-{t}-disk-0.qcow2,size=32M\nnet0: virtio=BC:24:11:00:00:01\n")
    code, out, err = stork("--json", "guest", "import-pve", conf)
    assert code == 0, err
    result = json.loads(out)["result"]
    assert "cores: 2" in result["notes"] and "net0: virtio=BC:24:11:00:00:01" in result["notes"]
    template = client.guest(t)
    assert (template.template, template.name) == (True, "debian") and "memory: 2048" in template.notes
    assert "memory: 2048" in stork("guest", "show", t)[1]  # kept in its config, and shown
    assert template.disks == {"scsi0": f"pve:{t}/base-{t}-disk-0.qcow2"}
    assert base.stat().st_mode & 0o777 == 0o444  # attached where it is: no copy, no rename

    code, _, err = stork("clone", t, linked)
    assert code == 0, err
    clone = client.guest(linked).disks["scsi0"]
    assert clone == f"pve:{linked}/vm-{linked}-disk-0.qcow2"
    assert backing_of(path_of(clone)) == f"../{t}/base-{t}-disk-0.qcow2"  # as `qm clone` writes it
    assert qemu_same(base, path_of(clone))
    code, out, _ = stork("--json", "volume", "info", f"pve:{t}/base-{t}-disk-0.qcow2/{linked}/vm-{linked}-disk-0.qcow2")
    assert code == 0 and json.loads(out)["parent"] == f"pve:{t}/base-{t}-disk-0.qcow2"  # the long form, folded
    code, out, _ = stork("--json", "volume", "list", "pve")
    listed = {v["volid"]: v for v in json.loads(out)}
    assert listed[f"pve:{t}/base-{t}-disk-0.qcow2"]["clones"] == [clone]

    assert stork("clone", t, full, "--full")[0] == 0
    copy = client.guest(full).disks["scsi0"]
    assert copy.startswith(f"pve:{full}/vm-{full}-disk-0.") and qemu_same(base, path_of(copy))

    code, out, err = stork("--json", "backup", linked, "--storage", "backup")
    assert code == 0, err
    code, _, err = stork("restore", json.loads(out)["result"]["backup"], restored)
    assert code == 0, err
    back = client.guest(restored).disks["scsi0"]
    assert back.startswith(f"pve:{restored}/vm-{restored}-disk-0.") and qemu_same(base, path_of(back))

    code, _, err = stork("volume", "free", f"pve:{t}/base-{t}-disk-0.qcow2")
    assert code != 0 and f"in use by guest {t} (scsi0)" in err and base.exists()


def test_a_volume_a_proxmox_ve_guest_names_is_never_freed_resized_or_made_a_base(stork, vmid, pve_config):
    g = vmid()
    disk = pve_disk(g, f"vm-{g}-disk-0", "raw")
    volid = f"pve:{g}/vm-{g}-disk-0.raw"
    before = disk.read_bytes()
    pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.raw,size=32M\n")
    listed = {v["volid"]: v for v in json.loads(stork("--json", "volume", "list", "pve")[1])}
    assert listed[volid]["users"] == [f"Proxmox VE guest {g} (scsi0)"] and not listed[volid]["orphan"]
    for args in (("volume", "free", volid), ("disk", "resize", volid, "64M"), ("base", volid)):
        code, _, err = stork(*args)
        assert code != 0 and f"in use by Proxmox VE guest {g} (scsi0)" in err, (args, err)
    assert disk.read_bytes() == before
    # a config that cannot be read might name it: refused, naming the config
    broken = pve_config(vmid(), "this is no config line\n")
    code, _, err = stork("volume", "free", volid)
    assert code != 0 and "cannot tell whether" in err and str(broken) in err
    broken.unlink()
    (CONFIGS / f"{g}.conf").unlink()  # Proxmox VE forgot the guest: the volume is stork's to free
    code, _, err = stork("volume", "free", volid)
    assert code == 0, err
    assert not disk.exists()


def test_a_disk_a_proxmox_ve_guest_still_names_is_not_moved(stork, client, vmid, pve_config):
    """An adopted guest whose Proxmox VE config still names its disk: that guest may run and
    write the original, which a move's copy would miss. Refused at submit, and by the copy
    step on the disk's node (where Proxmox VE named it only since the submit)."""
    from drivers.errors import Refused
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import copy_data
    from worker.records import JobRecord, JobState

    g = vmid()
    disk = pve_disk(g, f"vm-{g}-disk-0", "raw")
    conf = pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.raw\n")
    assert stork("guest", "import-pve", conf)[0] == 0
    volid = client.guest(g).disks["scsi0"]
    code, _, err = stork("disk", "move", g, "scsi0", "local")
    assert code != 0 and f"{volid} is in use by Proxmox VE guest {g} (scsi0): not moved" in err, err
    assert client.guest(g).disks == {"scsi0": volid} and disk.exists()

    plan = {"source": volid, "storage": "local", "owner": g, "format": "raw", "moves": True}
    job = JobRecord(id=records.new_id(), kind="move", node="node1", steps=["copy_data"], queues=["node.node1"],
                    params={"lock_vmid": g, "disks": {"scsi0": plan}}, ctx={"made": {"scsi0": f"local:{g}/x.raw"}},
                    state=JobState.RUNNING,
                    current={"step": 0, "name": "copy_data", "node": "node1", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    try:
        ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="copy_data", worker="test:1",
                          kinds=KINDS)
        with pytest.raises(Refused, match=f"in use by Proxmox VE guest {g} \\(scsi0\\): not moved"):
            copy_data(ctx)
    finally:
        client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it


def test_an_adopted_disk_cannot_be_adopted_twice(stork, vmid, pve_config):
    g, again = vmid(), vmid()
    pve_disk(g, f"vm-{g}-disk-0", "raw")
    conf = pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.raw\n")
    assert stork("guest", "import-pve", conf)[0] == 0
    code, _, err = stork("guest", "import-pve", conf, "--vmid", again)
    assert code != 0 and f"is in use by guest {g} (scsi0)" in err


def test_a_config_changed_between_submit_and_commit_is_not_adopted_stale(client, vmid, pve_config, monkeypatch):
    """The config is read at submit; Proxmox VE may be at the guest's disks before the job runs
    (a qm move-disk that keeps its source, a migration): the commit reads it again, and one
    changed is not adopted as it was. The same config, read again, is."""
    from worker import runner

    g = vmid()
    pve_disk(g, f"vm-{g}-disk-0", "raw")
    pve_disk(g, f"vm-{g}-disk-1", "raw")
    conf = pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.raw\n")
    held: list = []
    with monkeypatch.context() as m:  # recorded and queued, its message not delivered yet
        m.setattr(runner, "send_steps", lambda record, start, sender=None: held.append((record, start)))
        late = client.submit("import_pve", config=str(conf))
    conf.write_text(f"scsi0: tank:{g}/vm-{g}-disk-1.raw\nunused0: tank:{g}/vm-{g}-disk-0.raw\n")  # moved meanwhile
    runner.send_steps(*held[0], client.app)
    job = client.wait(late.id, timeout=60)
    assert job.state == "failed" and f"{conf} changed since the job was submitted" in job.error
    assert not client.guest_store.exists(g)
    assert client.run("import_pve", config=str(conf)).state == "succeeded"  # read again: adopted as it is now
    assert client.guest(g).disks == {"scsi0": f"pve:{g}/vm-{g}-disk-1.raw"}


def test_a_base_a_job_may_still_rename_back_is_not_adopted(stork, client, vmid, pve_config):
    """A `stork template` of a guest on this storage renamed its disk into a base and has not
    ended: its undo may rename it back. Adopted meanwhile (a config written by hand naming the
    base), the base would be kept for the new template and the guest left naming a disk gone."""
    from tests.jobs.test_races_and_retries import recorded

    g, t = vmid(), vmid()
    pve_disk(g, f"base-{g}-disk-0", "raw", base=True)
    base = f"pve:{g}/base-{g}-disk-0.raw"
    with recorded(client, "template", "running", params={"lock_vmid": g},
                  ctx={"based": {"scsi0": [f"pve:{g}/vm-{g}-disk-0.raw", base]}}) as maker:
        conf = pve_config(t, f"template: 1\nscsi0: tank:{g}/base-{g}-disk-0.raw\n")
        code, _, err = stork("guest", "import-pve", conf)
    assert code == 1 and f"{base} is being made a base by job {maker.id} (template)" in err, err
    assert not client.guest_store.exists(t) and path_of(base).exists()


@pytest.mark.parametrize(("config", "message"), [
    ("scsi0: local-lvm:vm-{g}-disk-0,size=8G\n", "on storage 'local-lvm', which no storage of stork adopts"),
    ("scsi0: tank:{g}/vm-{g}-disk-0.raw\nsata1: /dev/disk/by-id/ata-X\n",
     "sata1 = /dev/disk/by-id/ata-X is no volume"),
    ("template: 1\nscsi0: tank:{g}/vm-{g}-disk-0.raw\n", "is not a base image, and the guest is a template"),
    ("scsi0: tank:{g}/vm-{g}-disk-7.raw\n", "unknown volume pve:{g}/vm-{g}-disk-7.raw"),
    ("scsi0: tank:{g}/vm-{g}-disk-1.vmdk\n", "invalid volume name"),
    ("cores: 2\nide2: none,media=cdrom\n", "the guest has no disk on a storage stork adopts"),
    ("scsi0 tank:{g}/vm-{g}-disk-0.raw\n", ":1: not a Proxmox VE guest config line"),
    ("lock: migrate\nscsi0: tank:{g}/vm-{g}-disk-0.raw\n",
     "the guest is locked by Proxmox VE (migrate): adopt it once"),
    ("scsi0: tank:{g}/vm-{g}-disk-1.raw\n", "vm-{g}-disk-1.raw: not a regular file"),  # a link to the disk-0
], ids=["unknown-storage", "host-device", "template-of-no-base", "missing-volume", "vmdk", "no-disk", "broken",
        "locked", "link"])
def test_import_pve_refuses_with_one_line_and_changes_nothing(stork, client, vmid, pve_config, config, message):
    g = vmid()
    pve_disk(g, f"vm-{g}-disk-0", "raw")
    (IMAGES / str(g) / f"vm-{g}-disk-1.raw").symlink_to(f"vm-{g}-disk-0.raw")
    conf = pve_config(g, config.format(g=g))
    before = sorted(os.listdir(IMAGES / str(g)))
    code, _, err = stork("guest", "import-pve", conf)
    assert code != 0 and message.format(g=g) in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(IMAGES / str(g))) == before
    assert stork("guest", "show", g)[0] != 0  # no guest made


def test_import_pve_wants_a_guest_id_and_a_free_one(stork, vmid, tmp_path, pve_config):
    g = vmid()
    pve_disk(g, f"vm-{g}-disk-0", "raw")
    named = tmp_path / "exported.conf"
    named.write_text(f"scsi0: tank:{g}/vm-{g}-disk-0.raw\n")
    code, _, err = stork("guest", "import-pve", named)
    assert code != 0 and "not named <vmid>.conf: give the guest id (--vmid)" in err
    assert stork("guest", "import-pve", named, "--vmid", g)[0] == 0
    code, _, err = stork("guest", "import-pve", pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.raw\n"))
    assert code != 0 and f"guest {g} already exists" in err
    code, _, err = stork("guest", "import-pve", tmp_path, "--vmid", vmid())  # a folder: one line
    assert code != 0 and err.startswith(f"stork: {tmp_path}: not a regular file") and err.count("\n") == 1


def test_stork_takes_proxmox_ves_lock_of_the_storage_with_its_own(stork, client, vmid):
    """Proxmox VE holds /var/lock/pve-manager/pve-storage-<id> while it names and makes a volume
    (and qemu-img create would truncate one stork had just made): a job waits for it."""
    g = vmid()
    lock = BASE / "pve-locks" / "pve-storage-tank"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, err = stork("guest", "create", g, "--disk", "scsi0=pve:32M", "--no-wait")
        assert code == 0, err
        job = out.strip()
        time.sleep(3)  # a create takes well under a second here: it is waiting for the lock
        assert client.job(job).state == "running" and not (IMAGES / str(g)).exists()
    code, _, err = stork("job", "watch", job)
    assert code == 0, err
    assert client.job(job).state == "succeeded" and client.guest(g).disks == {"scsi0": f"pve:{g}/vm-{g}-disk-0.raw"}


def test_no_volume_of_storks_is_made_in_a_proxmox_ve_guests_folder(stork, client, vmid, pve_config):
    """Proxmox VE counts everything in images/<vmid>/ as that guest's (and `qm destroy` would
    take it along): a new disk, a clone's, a restored one of guest N is refused where Proxmox
    VE has a guest N; on another storage it is made."""
    g, r = vmid(), vmid()
    pve_config(g, "cores: 1\n")
    code, _, err = stork("guest", "create", g, "--disk", "scsi0=pve:8M")
    assert code != 0 and f"guest id {g} is Proxmox VE's" in err and str(CONFIGS / f"{g}.conf") in err
    assert stork("guest", "show", g)[0] != 0 and not (IMAGES / str(g)).exists()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0  # a folder Proxmox VE does not read
    code, _, err = stork("disk", "add", g, "scsi1=pve:8M")
    assert code != 0 and f"guest id {g} is Proxmox VE's" in err and not (IMAGES / str(g)).exists()
    code, out, err = stork("--json", "backup", g, "--storage", "backup")
    assert code == 0, err
    pve_config(r, "cores: 1\n")
    code, _, err = stork("restore", json.loads(out)["result"]["backup"], r, "--storage", "pve")
    assert code != 0 and f"guest id {r} is Proxmox VE's" in err and not (IMAGES / str(r)).exists()


def test_a_name_left_pending_by_a_crash_is_not_taken_from_a_proxmox_ve_guest_made_since(client, vmid, pve_config):
    """A step saved a disk's name as pending (and claimed it), and its process died before
    making it. Meanwhile Proxmox VE made a guest of that id, and that very disk, which knows
    nothing of claims: the step tried again refuses rather than take the disk for its own
    (and copy into it), and the undo leaves it."""
    from drivers.errors import Refused
    from worker import liveness, records
    from worker.context import StepContext
    from worker.jobs import usage
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import allocate_disks, free_made
    from worker.records import JobRecord

    g = vmid()
    volid = f"pve:{g}/vm-{g}-disk-0.qcow2"
    steps = [s.name for s in KINDS["create"].steps]
    at = steps.index("allocate")
    job = JobRecord(id=records.new_id(), kind="create", node="node1", steps=steps, queues=["shared"] * len(steps),
                    state="running", done=at, params={"new_vmid": g, "node": "node1", "disks": {
                        "scsi0": {"storage": "pve", "size": 8 << 20, "format": "qcow2", "owner": g}}},
                    ctx={"pending": {"scsi0": volid}},
                    current={"step": at, "name": "allocate", "node": "node1", "worker": liveness.process_id(),
                             "attempt": 2})
    records.create(client.r, job, {"phase": "queued"})
    usage.claim(client.r, volid, job.id)
    try:
        pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.qcow2,size=32M\n")
        disk = pve_disk(g, f"vm-{g}-disk-0", pattern=0x6B)
        ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="allocate",
                          worker=liveness.process_id(), kinds=KINDS)
        with pytest.raises(Refused, match=f"guest id {g} is Proxmox VE's"):
            allocate_disks(ctx)
        assert "made" not in ctx.data and disk.exists()
        pve_config(g, "cores: 1\n")  # its config names the disk no longer: only the folder says whose it is
        with contextlib.suppress(Refused):
            free_made(ctx)
        assert disk.exists()
    finally:
        usage.release_claims(client.r, job)
        client.r.srem(records.ACTIVE, job.id)
        subprocess.run(["rm", "-rf", str(IMAGES / str(g))], check=True)


def test_a_base_on_a_proxmox_ve_storage_is_named_for_its_own_guest(stork, vmid):
    g, other = vmid(), vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=pve:8M")[0] == 0
    code, _, err = stork("base", f"pve:{g}/vm-{g}-disk-0.raw", "--name", f"base-{other}-mine")
    assert code != 0 and f"its base is named base-{g}-<name>" in err
    assert (IMAGES / str(g) / f"vm-{g}-disk-0.raw").exists() and not (IMAGES / str(other)).exists()


def test_a_disk_a_proxmox_ve_guest_uses_is_backed_up_without_a_bitmap_written_into_it(stork, client, vmid,
                                                                                      pve_config):
    """A running qemu may have the qcow2 open: stork reads it whole and writes nothing into it."""
    g, r = vmid(), vmid()
    disk = pve_disk(g, f"vm-{g}-disk-0")
    conf = pve_config(g, f"scsi0: tank:{g}/vm-{g}-disk-0.qcow2,size=32M\n")
    assert stork("guest", "import-pve", conf)[0] == 0
    code, out, err = stork("--json", "backup", g, "--storage", "backup")
    assert code == 0, err
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(disk)], capture_output=True,
                                     check=True).stdout)
    assert not info.get("format-specific", {}).get("data", {}).get("bitmaps")
    assert stork("restore", json.loads(out)["result"]["backup"], r)[0] == 0
    assert qemu_same(disk, path_of(client.guest(r).disks["scsi0"]))


def test_a_base_disk_of_a_guest_that_is_no_template_is_not_adopted(stork, vmid, pve_config):
    g = vmid()
    pve_disk(g, f"base-{g}-disk-0", base=True)
    code, _, err = stork("guest", "import-pve", pve_config(g, f"scsi0: tank:{g}/base-{g}-disk-0.qcow2\n"))
    assert code != 0 and "is a base image, and the guest is not a template" in err


def test_a_base_that_cannot_keep_its_name_on_a_proxmox_ve_storage_is_not_moved_there(stork, vmid):
    """Refused at submit, before any copy: Proxmox VE names a base for its template."""
    g, t = vmid(), vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    assert stork("base", f"local:{g}/vm-{g}-disk-0.raw", "--name", f"golden-{g}")[0] == 0
    assert stork("template", "assemble", t, "--disk", f"scsi0=local:base/golden-{g}.raw")[0] == 0
    assert stork("guest", "destroy", g)[0] == 0  # its linked clone of the base goes: the base may move
    code, _, err = stork("disk", "move", t, "scsi0", "pve")
    assert code != 0 and f"invalid base name 'golden-{g}'" in err and "Proxmox VE's layout" in err
    assert not (IMAGES / str(t)).exists()
