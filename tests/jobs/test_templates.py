"""The seed's template paths: disks from base images, disks added, detached and removed,
templates assembled by hand from base images, and templates copied to another storage —
through the CLI, the queue and the workers, on real files."""

from __future__ import annotations

import pytest

from tests.conftest import BASE, storage_path
from tests.helpers import PATTERN_MIB, qemu_check, qemu_io_write, qemu_same, snapshot, volume_path


def template_of(stork, vmid: int, storage: str = "local", size: str = "16M") -> str:
    """A template with one base disk holding a pattern; returns the base's volume id."""
    code, _, err = stork("guest", "create", vmid, "--disk", f"scsi0={storage}:{size}")
    assert code == 0, err
    qemu_io_write(volume_path(f"{storage}:{vmid}/vm-{vmid}-disk-0.raw"), "raw", 0, PATTERN_MIB, 0x42)
    code, _, err = stork("template", vmid)
    assert code == 0, err
    return f"{storage}:base/base-{vmid}-disk-0.raw"


def guest(client, vmid: int):
    return client.guest(vmid)


class TestDisksFromBaseImages:
    def test_a_guest_created_with_a_base_gets_a_linked_clone_of_it(self, stork, client, vmid):
        """`guest create --disk scsi0=local:base/...` makes a linked clone of that base; a size
        next to it makes an empty disk, as before."""
        base = template_of(stork, vmid())
        g = vmid()
        code, _, err = stork("guest", "create", g, "--disk", f"scsi0={base}", "--disk", "scsi1=local:8M")
        assert code == 0, err
        disks = guest(client, g).disks
        assert disks == {"scsi0": f"local:{g}/vm-{g}-disk-0.qcow2", "scsi1": f"local:{g}/vm-{g}-disk-1.raw"}
        assert client.volume(disks["scsi0"]).parent == base
        assert qemu_same(volume_path(base), volume_path(disks["scsi0"]))
        assert f"{g}:scsi0" not in client.volume(base).users  # the base's user is its template
        assert client.volume(disks["scsi0"]).users == (f"{g}:scsi0",)

    def test_disks_are_added_detached_and_removed(self, stork, client, vmid):
        """`disk add` attaches new disks (from a base, or empty); `disk detach` keeps one as
        unused; `disk remove` frees one and the base it read through stays."""
        base = template_of(stork, vmid())
        g = vmid()
        assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
        code, _, err = stork("disk", "add", g, f"scsi1={base}", "scsi2=local:4M,format=qcow2")
        assert code == 0, err
        disks = guest(client, g).disks
        assert disks["scsi1"] == f"local:{g}/vm-{g}-disk-1.qcow2" and disks["scsi2"] == f"local:{g}/vm-{g}-disk-2.qcow2"
        assert client.volume(disks["scsi1"]).parent == base and guest(client, g).lock == ""
        assert stork("disk", "detach", g, "scsi2")[0] == 0
        assert "scsi2" not in guest(client, g).disks and guest(client, g).unused == (disks["scsi2"],)
        code, _, err = stork("disk", "remove", g, "scsi1")
        assert code == 0, err
        assert "scsi1" not in guest(client, g).disks and not volume_path(disks["scsi1"]).exists()
        assert volume_path(base).exists() and client.volume(base).clones == ()


class TestAssembledTemplates:
    def test_a_template_is_assembled_from_existing_bases_and_shares_them(self, stork, client, vmid):
        """`template assemble` attaches bases as they are; the template clones like any; a base
        two templates share is kept when one of them is destroyed, and `volume list` names its users."""
        t1 = vmid()
        base = template_of(stork, t1)
        a = vmid()
        code, _, err = stork("template", "assemble", a, "--disk", f"scsi0={base}", "--name", "assembled")
        assert code == 0, err
        assembled = guest(client, a)
        assert assembled.template and assembled.disks == {"scsi0": base} and assembled.name == "assembled"
        assert sorted(client.volume(base).users) == sorted([f"{a}:scsi0", f"{t1}:scsi0"])
        code, out, _ = stork("volume", "list", "local")
        [row] = [line for line in out.splitlines() if line.startswith(base + " ")]
        assert row.endswith((f"{t1}:scsi0, {a}:scsi0", f"{a}:scsi0, {t1}:scsi0")), row
        c = vmid()
        assert stork("clone", a, c)[0] == 0  # linked: it is a template
        assert client.volume(guest(client, c).disks["scsi0"]).parent == base
        assert stork("guest", "destroy", c)[0] == 0
        code, out, err = stork("--json", "guest", "destroy", a)
        assert code == 0, err
        assert volume_path(base).exists() and guest(client, t1).disks == {"scsi0": base}
        assert '"kept"' in out and base in out

    def test_the_seeds_update_cycle_starts_from_an_assembled_template(self, stork, client, vmid):
        """Assemble, full clone, change the clone's disk, make it a template: its linked clones
        see the change; the assembled template's base is untouched."""
        base = template_of(stork, vmid())
        a, c, d = vmid(), vmid(), vmid()
        assert stork("template", "assemble", a, "--disk", f"scsi0={base}")[0] == 0
        code, _, err = stork("clone", a, c, "--full")
        assert code == 0, err
        changed = volume_path(guest(client, c).disks["scsi0"])
        qemu_io_write(changed, "raw", 2 * PATTERN_MIB, PATTERN_MIB, 0x17)
        assert stork("template", c)[0] == 0
        assert stork("clone", c, d)[0] == 0
        clone = volume_path(guest(client, d).disks["scsi0"])
        qemu_check(clone)
        assert qemu_same(clone, volume_path(guest(client, c).disks["scsi0"]))
        assert not qemu_same(clone, volume_path(base))


class TestMovingBases:
    def test_a_template_moves_its_base_when_no_clone_reads_through_it(self, stork, client, vmid):
        """`disk move` of a template's base: the verified copy becomes a base on the target,
        the template follows it, the old base is freed, and the template clones from there."""
        t, c = vmid(), vmid()
        base = template_of(stork, t)
        code, _, err = stork("disk", "move", t, "scsi0", "shared", "--delete-source")
        assert code == 0, err
        moved = guest(client, t)
        assert moved.template and moved.disks == {"scsi0": f"shared:base/base-{t}-disk-0.raw"} and not moved.unused
        assert not volume_path(base).exists()
        assert volume_path(moved.disks["scsi0"]).stat().st_mode & 0o777 == 0o444
        assert stork("clone", t, c)[0] == 0
        assert client.volume(guest(client, c).disks["scsi0"]).parent == moved.disks["scsi0"]


class TestTemplateCopy:
    def test_a_template_is_copied_to_another_storage_as_a_template(self, stork, client, vmid):
        """`template copy` makes, in one job, a template of full copies of the bases, made bases
        on the target storage, clonable there; the source is untouched."""
        t, copy, c = vmid(), vmid(), vmid()
        base = template_of(stork, t)
        code, _, err = stork("template", "copy", t, copy, "--storage", "shared", "--format", "qcow2")
        assert code == 0, err
        copied = guest(client, copy)
        assert copied.template and copied.disks == {"scsi0": f"shared:base/base-{copy}-disk-0.qcow2"}
        assert qemu_same(volume_path(base), volume_path(copied.disks["scsi0"]))
        assert volume_path(copied.disks["scsi0"]).stat().st_mode & 0o777 == 0o444
        assert stork("clone", copy, c)[0] == 0
        assert guest(client, c).disks["scsi0"].startswith("shared:") and guest(client, t).lock == ""


@pytest.fixture(scope="module")
def world(client):
    """G: a guest with a disk; T: a template; B: its base; N: a base on node1's local storage."""
    from producer.cli import main

    ids = {"G": 95001, "T": 95002, "N": 95003}
    assert main(["guest", "create", str(ids["G"]), "--disk", "scsi0=local:8M"]) == 0
    assert main(["guest", "create", str(ids["T"]), "--disk", "scsi0=local:8M"]) == 0
    assert main(["template", str(ids["T"])]) == 0
    assert main(["guest", "create", str(ids["N"]), "--disk", "scsi0=local1:8M"]) == 0
    assert main(["template", str(ids["N"])]) == 0
    return {**ids, "B": f"local:base/base-{ids['T']}-disk-0.raw", "NB": f"local1:base/base-{ids['N']}-disk-0.raw",
            "GD": f"local:{ids['G']}/vm-{ids['G']}-disk-0.raw"}


REFUSALS = [
    ("a base that does not exist", "guest create 96001 --disk scsi0=local:base/nope.raw",
     "unknown volume local:base/nope.raw"),
    ("a writable volume as a disk's base", "guest create 96002 --disk scsi0={GD}",
     "{GD} is not a base image (make one with 'stork base' or 'stork template')"),
    ("a base on another node's local storage", "guest create 96006 --disk scsi0={NB}",
     "storage 'local1' is local to node(s) node1: it does not exist on node 'node2'"),
    ("a writable volume in an assembled template", "template assemble 96003 --disk scsi0={GD}",
     "{GD} is not a base image"),
    ("options on a disk from a base", "disk add {G} scsi1={B},format=raw",
     "a disk from a base image takes no format: it is a linked clone"),
    ("a disk key in use", "disk add {G} scsi0=local:1M", "guest {G} has a disk scsi0 already"),
    ("adding a disk to a template", "disk add {T} scsi1=local:1M",
     "guest {T} is a template: adding disks is not allowed"),
    ("removing a disk of a template", "disk remove {T} scsi0",
     "guest {T} is a template: removing its disks is not allowed"),
    ("detaching a template's base", "disk detach {T} scsi0",
     "guest {T} is a template: detaching its disks is not allowed"),
    ("detaching a disk that is not there", "disk detach {G} scsi7", "guest {G} has no disk scsi7"),
    ("copying a guest as a template", "template copy {G} 96005", "guest {G} is not a template"),
]


@pytest.mark.parametrize(("what", "args", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(stork, world, what, args, message, monkeypatch):
    """Each refusal: exit 1, one line naming what is wrong, nothing changed on disk or in configs."""
    if "another node" in what:
        monkeypatch.setenv("STORK_NODE", "node2")
    before = snapshot()
    code, _, err = stork(*args.format(**world).split())
    assert code == 1 and err.count("\n") == 1, (code, err)
    assert message.format(**world) in err
    assert snapshot() == before
    assert not (BASE / "guests" / "96001.toml").exists() and not storage_path("local").joinpath("96001").exists()
