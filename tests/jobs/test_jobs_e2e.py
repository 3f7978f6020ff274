"""Each CLI command through the queue to real celery workers, real qemu-img and real files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

from tests.conftest import BASE, storage_path
from tests.helpers import (
    PATTERN_MIB,
    exports_running,
    guest_data_sha,
    held_copy,
    qemu_check,
    qemu_io_write,
    qemu_same,
    volume_path,
)
from worker.testing import ROOT, make_ova, ovf_text, wait_for


def make_guest(stork, vmid, *disks, template=False):
    args = ["guest", "create", vmid]
    for d in disks:
        args += ["--disk", d]
    code, _, err = stork(*args)
    assert code == 0, err
    if template:
        code, _, err = stork("template", vmid)
        assert code == 0, err
    return json.loads(stork("--json", "guest", "show", vmid)[1])


class TestGuests:
    def test_guest_create_makes_sparse_disks_in_each_format(self, stork, vmid):
        """`guest create` allocates one sparse volume per --disk and records them in the config."""
        g = vmid()
        code, out, _ = stork("guest", "create", g, "--disk", "scsi0=local:1G", "--disk",
                             "scsi1=local:512M,format=qcow2", "--name", "web")
        assert code == 0 and "succeeded" in out
        guest = json.loads(stork("--json", "guest", "show", g)[1])
        assert guest["disks"] == {"scsi0": f"local:{g}/vm-{g}-disk-0.raw", "scsi1": f"local:{g}/vm-{g}-disk-1.qcow2"}
        assert (guest["name"], guest["template"], guest["lock"]) == ("web", False, "")
        raw = volume_path(guest["disks"]["scsi0"])
        assert raw.stat().st_size == 1 << 30 and raw.stat().st_blocks * 512 < 1 << 20
        qemu_check(volume_path(guest["disks"]["scsi1"]))
        info = json.loads(stork("--json", "volume", "info", guest["disks"]["scsi1"])[1])
        assert (info["format"], info["virtual_size"], info["base"]) == ("qcow2", 512 << 20, False)

    def test_guest_import_copies_an_image_file_into_a_new_guest(self, stork, vmid, tmp_path):
        """`guest import` turns an existing raw or qcow2 file into the guest's disk; the file stays."""
        g = vmid()
        image = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
        qemu_io_write(image, "qcow2", 3 * PATTERN_MIB, PATTERN_MIB, 0x42)
        code, _, err = stork("guest", "import", g, "--disk", f"virtio0={image}")
        assert code == 0, err
        disk = volume_path(json.loads(stork("--json", "guest", "show", g)[1])["disks"]["virtio0"])
        assert disk.suffix == ".qcow2" and qemu_same(image, disk) and image.exists()

    @pytest.mark.parametrize(("fmt", "options"), [
        ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vmdk", ["-o", "subformat=monolithicFlat"]),
        ("vmdk", ["-o", "subformat=twoGbMaxExtentFlat"]), ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
        ("vhdx", []), ("vpc", []), ("vpc", ["-o", "subformat=fixed"]), ("vdi", []), ("qcow", [])],
        ids=["vmdk", "vmdk-streamOptimized", "vmdk-monolithicFlat", "vmdk-twoGbMaxExtentFlat",
             "vmdk-twoGbMaxExtentSparse", "vhdx", "vhd", "vhd-fixed", "vdi", "qcow"])
    def test_guest_import_reads_the_formats_of_other_hypervisors(self, stork, vmid, tmp_path, fmt, options):
        """A disk from VMware, Hyper-V, VirtualBox or an old qemu comes in with the same data,
        in a format the storage keeps (raw on a dir storage); the format is told by stork
        from the file's bytes (drivers/sniff.py), not guessed by qemu."""
        g = vmid()
        source = tmp_path / "source.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "64M"], check=True)
        qemu_io_write(source, "qcow2", 5 * PATTERN_MIB, PATTERN_MIB, 0x37)
        image = tmp_path / f"disk.{fmt}"
        subprocess.run(["qemu-img", "convert", "-q", "-O", fmt, *options, str(source), str(image)], check=True)
        code, _, err = stork("guest", "import", g, "--disk", f"scsi0={image}")
        assert code == 0, err
        disk = volume_path(json.loads(stork("--json", "guest", "show", g)[1])["disks"]["scsi0"])
        assert disk.suffix == ".raw" and qemu_same(source, disk)

    @pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another user's")
    @pytest.mark.parametrize("options", [["qcow2"], ["vmdk", "-o", "subformat=twoGbMaxExtentFlat"]],
                             ids=["qcow2", "vmdk-descriptor-and-extents"])
    def test_an_image_of_another_user_is_imported_through_its_owners_reader(self, stork, vmid, tmp_path, options):
        """A file of a user other than root, which the worker (root) imports, is read by a
        qemu-nbd run as its owner (docs/security.md): the same data comes in, from a qcow2 and
        from a VMDK descriptor with its extents beside it, which that qemu reads through the
        descriptor stork writes."""
        g = vmid()
        source = tmp_path / "source.raw"
        source.write_bytes(os.urandom(PATTERN_MIB) + bytes(PATTERN_MIB) + b"\x3c" * PATTERN_MIB)
        folder = tmp_path / "user"
        folder.mkdir()
        image = folder / "disk.img"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", *options, str(source), str(image)], check=True)
        for file in folder.iterdir():
            os.chown(file, 65534, 65534)
        code, _, err = stork("guest", "import", g, "--disk", f"scsi0={image}")
        assert code == 0, err
        disk = volume_path(json.loads(stork("--json", "guest", "show", g)[1])["disks"]["scsi0"])
        assert qemu_same(source, disk)

    def test_a_vendor_appliance_becomes_a_template_and_its_clones_in_two_commands(self, stork, vmid, tmp_path):
        """The seed's workflow from a VMware disk: `guest import --as-template`, then `clone`:
        the template's disk is a base holding the image's data, the clone reads through it."""
        t, c = vmid(), vmid()
        source = tmp_path / "appliance.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "32M"], check=True)
        qemu_io_write(source, "qcow2", 2 * PATTERN_MIB, PATTERN_MIB, 0x5A)
        image = tmp_path / "appliance.vmdk"
        subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source),
                        str(image)], check=True)
        code, _, err = stork("guest", "import", t, "--disk", f"scsi0={image}", "--as-template", "--name", "appliance")
        assert code == 0, err
        template = json.loads(stork("--json", "guest", "show", t)[1])
        assert template["template"] is True and template["name"] == "appliance"
        base = template["disks"]["scsi0"]
        assert base.startswith("local:base/") and volume_path(base).stat().st_mode & 0o777 == 0o444
        assert qemu_same(source, volume_path(base))
        code, _, err = stork("clone", t, c)
        assert code == 0, err
        clone = volume_path(json.loads(stork("--json", "guest", "show", c)[1])["disks"]["scsi0"])
        assert clone.suffix == ".qcow2" and qemu_same(source, clone)

    def test_an_ova_becomes_the_guest_it_describes_read_in_place(self, stork, vmid, tmp_path):
        """`guest import --ova`: the OVF's disks in their slots, read from the archive where
        they are (nothing extracted), its name, and notes on what stork does not use."""
        g = vmid()
        disks = []
        for n, pattern in enumerate((0x21, 0x22)):
            source = tmp_path / f"source{n}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), f"{16 * (n + 1)}M"], check=True)
            qemu_io_write(source, "qcow2", n * PATTERN_MIB, PATTERN_MIB, pattern)
            vmdk = tmp_path / f"disk{n}.vmdk"
            subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized",
                            str(source), str(vmdk)], check=True)
            disks.append((source, vmdk))
        ovf = ovf_text([("disk0.vmdk", 16 << 20, "6", "0"), ("disk1.vmdk", 32 << 20, "20", "2")], name="vendor-app")
        archive = make_ova(tmp_path / "vendor.ova", [("vendor.ovf", ovf.encode()), ("disk0.vmdk", disks[0][1]),
                                                      ("disk1.vmdk", disks[1][1])])
        for _, vmdk in disks:
            vmdk.unlink()  # only the archive is read
        code, out, err = stork("--json", "guest", "import", g, "--ova", str(archive))
        assert code == 0, err
        assert json.loads(out)["result"]["notes"] == "OVF: 2 CPUs, memory 4096 byte * 2^20, network VM Network (E1000)"
        guest = json.loads(stork("--json", "guest", "show", g)[1])
        assert guest["name"] == "vendor-app" and sorted(guest["disks"]) == ["sata2", "scsi0"]
        assert guest["notes"].startswith("OVF: 2 CPUs")  # kept in the guest's config
        assert qemu_same(disks[0][0], volume_path(guest["disks"]["scsi0"]))
        assert qemu_same(disks[1][0], volume_path(guest["disks"]["sata2"]))

    def test_an_ovf_with_its_disk_files_beside_it_becomes_the_guest_it_describes(self, stork, vmid, tmp_path):
        """`guest import --ovf`: an export folder (the OVF, its disks next to it), as a template."""
        g = vmid()
        source = tmp_path / "source.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "8M"], check=True)
        qemu_io_write(source, "qcow2", PATTERN_MIB, PATTERN_MIB, 0x44)
        export = tmp_path / "export"
        export.mkdir()
        subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized", str(source),
                        str(export / "app-disk1.vmdk")], check=True)
        (export / "app.ovf").write_text(ovf_text([("app-disk1.vmdk", 8 << 20, "5", "0")], name="app"))
        code, _, err = stork("guest", "import", g, "--ovf", str(export / "app.ovf"), "--as-template")
        assert code == 0, err
        guest = json.loads(stork("--json", "guest", "show", g)[1])
        assert guest["template"] is True and list(guest["disks"]) == ["ide0"]
        assert qemu_same(source, volume_path(guest["disks"]["ide0"]))

    def test_guest_list_and_destroy(self, stork, vmid):
        """`guest destroy` frees the disks and removes the config."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:64M")
        assert str(g) in stork("guest", "list")[1]
        code, _, err = stork("guest", "destroy", g)
        assert code == 0, err
        assert not volume_path(guest["disks"]["scsi0"]).exists()
        assert stork("guest", "show", g)[0] == 1


class TestBasesAndTemplates:
    def test_template_turns_every_disk_into_a_read_only_base(self, stork, vmid):
        """`template` renames each disk into base/ (0444) and marks the guest a template."""
        g = vmid()
        before = make_guest(stork, g, "scsi0=local:64M", "scsi1=local:32M,format=qcow2")
        qemu_io_write(volume_path(before["disks"]["scsi0"]), "raw", 0, PATTERN_MIB, 0x11)
        code, _, err = stork("template", g)
        assert code == 0, err
        guest = json.loads(stork("--json", "guest", "show", g)[1])
        assert guest["template"] is True and guest["lock"] == ""
        assert guest["disks"] == {"scsi0": f"local:base/base-{g}-disk-0.raw",
                                  "scsi1": f"local:base/base-{g}-disk-1.qcow2"}
        for volid in guest["disks"].values():
            assert volume_path(volid).stat().st_mode & 0o777 == 0o444
        assert not any(volume_path(v).exists() for v in before["disks"].values())

    def test_base_command_takes_a_name_in_the_base_namespace(self, stork, vmid):
        """`base VOLID --name` is the seed's local:base/<name>.<fmt>; the guest that ran from the
        disk keeps running, from a writable linked clone of the new base in the same slot."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:16M")
        code, out, err = stork("base", guest["disks"]["scsi0"], "--name", f"golden-{g}")
        assert code == 0, err
        assert re.search(rf"^  bases: +scsi0 = local:base/golden-{g}.raw$", out, re.M), out
        disk = json.loads(stork("--json", "guest", "show", g)[1])["disks"]["scsi0"]
        assert disk == f"local:{g}/vm-{g}-disk-0.qcow2"  # the name the disk left free
        clone = json.loads(stork("--json", "volume", "info", disk)[1])
        assert clone["parent"] == f"local:base/golden-{g}.raw" and clone["base"] is False
        info = json.loads(stork("--json", "volume", "info", f"local:base/golden-{g}.raw")[1])
        assert info["base"] is True

    def test_a_base_name_no_volume_id_could_name_is_refused(self, stork, vmid):
        """`foo.` would make base/foo..raw: one line, nothing renamed."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:16M")
        code, _, err = stork("base", guest["disks"]["scsi0"], "--name", f"golden-{g}.")
        assert code != 0 and err.count("\n") == 1 and f"invalid base name 'golden-{g}.'" in err, err
        assert volume_path(guest["disks"]["scsi0"]).exists()
        assert json.loads(stork("--json", "guest", "show", g)[1])["disks"] == guest["disks"]

    def test_linked_clone_is_a_qcow2_overlay_of_the_base_by_relative_path(self, stork, vmid):
        """A template clones linked by default: same data, tiny file, base recorded in the image."""
        t, c = vmid(), vmid()
        make_guest(stork, t, "scsi0=local:64M")
        qemu_io_write(storage_path("local") / f"{t}/vm-{t}-disk-0.raw", "raw", 5 * PATTERN_MIB, PATTERN_MIB, 0x33)
        stork("template", t)
        code, _, err = stork("clone", t, c, "--name", "linked")
        assert code == 0, err
        clone = json.loads(stork("--json", "guest", "show", c)[1])
        overlay, base = volume_path(clone["disks"]["scsi0"]), storage_path("local") / f"base/base-{t}-disk-0.raw"
        assert overlay.suffix == ".qcow2" and overlay.stat().st_size < 1 << 20
        backing = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                            capture_output=True, check=True).stdout)["backing-filename"]
        assert backing == f"../base/base-{t}-disk-0.raw"
        assert qemu_same(base, overlay)
        qemu_check(overlay)
        info = json.loads(stork("--json", "volume", "info", f"local:base/base-{t}-disk-0.raw")[1])
        assert info["clones"] == [clone["disks"]["scsi0"]]
        assert json.loads(stork("--json", "volume", "info", clone["disks"]["scsi0"])[1])["parent"] == \
            f"local:base/base-{t}-disk-0.raw"

    def test_template_update_cycle_full_clone_change_template_again(self, stork, vmid):
        """The seed's cycle: full-clone the template, change the clone, template the clone."""
        t, work, c = vmid(), vmid(), vmid()
        make_guest(stork, t, "scsi0=local:32M", template=True)
        assert stork("clone", t, work, "--full")[0] == 0
        disk = volume_path(json.loads(stork("--json", "guest", "show", work)[1])["disks"]["scsi0"])
        qemu_io_write(disk, "raw", 0, PATTERN_MIB, 0x77)
        assert stork("template", work)[0] == 0
        assert stork("clone", work, c)[0] == 0
        clone_disk = volume_path(json.loads(stork("--json", "guest", "show", c)[1])["disks"]["scsi0"])
        original = storage_path("local") / f"base/base-{t}-disk-0.raw"
        assert not qemu_same(original, clone_disk)  # the change reached the new template's clones
        assert guest_data_sha(clone_disk) == guest_data_sha(storage_path("local") / f"base/base-{work}-disk-0.raw")


class TestCopies:
    def test_full_clone_converts_between_formats_and_stays_sparse(self, stork, vmid):
        """--full copies raw -> qcow2 -> raw with identical data and no zero blocks written."""
        a, b, c = vmid(), vmid(), vmid()
        src = make_guest(stork, a, "scsi0=local:256M")
        qemu_io_write(volume_path(src["disks"]["scsi0"]), "raw", 100 * PATTERN_MIB, 4 * PATTERN_MIB, 0x5A)
        assert stork("clone", a, b, "--format", "qcow2")[0] == 0  # non-template: full by default
        assert stork("clone", b, c, "--full", "--format", "raw", "--storage", "shared")[0] == 0
        qcow, raw = (volume_path(json.loads(stork("--json", "guest", "show", g)[1])["disks"]["scsi0"])
                     for g in (b, c))
        assert qcow.suffix == ".qcow2" and raw.suffix == ".raw" and "shared" in str(raw)
        qemu_check(qcow)
        shas = {guest_data_sha(p) for p in (volume_path(src["disks"]["scsi0"]), qcow, raw)}
        assert len(shas) == 1
        assert raw.stat().st_blocks * 512 < 16 * PATTERN_MIB

    def test_disk_copy_makes_an_unattached_volume_on_another_storage(self, stork, vmid):
        """`disk copy` leaves the source as it was and prints the new volume."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:32M")
        code, out, err = stork("--json", "disk", "copy", guest["disks"]["scsi0"], "shared", "--format", "qcow2")
        assert code == 0, err
        new = json.loads(out)["result"]["volumes"]["copy"]
        assert new == f"shared:{g}/vm-{g}-disk-0.qcow2"
        assert qemu_same(volume_path(guest["disks"]["scsi0"]), volume_path(new))

    def test_disk_move_keeps_the_source_as_unused_unless_asked_to_delete_it(self, stork, vmid):
        """`disk move` switches the guest to the verified copy; --delete-source frees the old one."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:32M", "scsi1=local:32M")
        assert stork("disk", "move", g, "scsi0", "shared")[0] == 0
        moved = json.loads(stork("--json", "guest", "show", g)[1])
        assert moved["disks"]["scsi0"].startswith("shared:") and moved["unused"] == [guest["disks"]["scsi0"]]
        assert volume_path(guest["disks"]["scsi0"]).exists()
        assert stork("disk", "move", g, "scsi1", "shared", "--format", "qcow2", "--delete-source")[0] == 0
        moved = json.loads(stork("--json", "guest", "show", g)[1])
        assert moved["disks"]["scsi1"].endswith(".qcow2") and not volume_path(guest["disks"]["scsi1"]).exists()
        assert stork("volume", "free", guest["disks"]["scsi0"])[0] == 0  # an unused volume may be freed
        assert json.loads(stork("--json", "guest", "show", g)[1])["unused"] == []

    def test_resize_grows_a_disk(self, stork, vmid):
        """`disk resize` grows a writable disk."""
        g = vmid()
        guest = make_guest(stork, g, "scsi0=local:32M,format=qcow2")
        assert stork("disk", "resize", guest["disks"]["scsi0"], "64M")[0] == 0
        assert json.loads(stork("--json", "volume", "info", guest["disks"]["scsi0"])[1])["virtual_size"] == 64 << 20


class TestJobs:
    def test_no_wait_prints_the_job_id_and_watch_replays_every_event(self, stork, vmid):
        """--no-wait returns at once; a late `job watch` sees the whole history."""
        g = vmid()
        code, out, _ = stork("guest", "create", g, "--disk", "scsi0=local:16M", "--no-wait")
        job_id = out.strip()
        assert code == 0 and len(job_id) == 12
        code, out, _ = stork("--json", "job", "watch", job_id)
        phases = [json.loads(line)["phase"] for line in out.splitlines()]
        assert code == 0
        assert phases[0] == "queued" and phases[-1] == "finished"
        assert phases.count("start") == 3 and phases.count("done") == 3
        record = json.loads(stork("--json", "job", "show", job_id[:6])[1])
        assert record["state"] == "succeeded" and record["done"] == 3
        assert job_id in stork("job", "list")[1]

    def test_copy_progress_is_reported_in_bytes(self, client, vmid):
        """A full clone's copy step publishes done/total bytes up to the whole size."""
        g, c = vmid(), vmid()
        assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "512M"}}).state == "succeeded"
        path = storage_path("local") / f"{g}/vm-{g}-disk-0.raw"
        with open(path, "r+b") as f:
            for i in range(0, 512, 2):
                f.seek(i * PATTERN_MIB)
                f.write(os.urandom(PATTERN_MIB))
        seen = []
        job = client.run("full_clone", vmid=g, newid=c, on_event=seen.append)
        assert job.state == "succeeded", job.error
        progress = [e for e in seen if e["phase"] == "progress"]
        assert progress and progress[-1]["done"] == progress[-1]["total"] == 512 << 20
        assert all(e["step"] == "copy_data" and e["rate"] >= 0 for e in progress)
        # the rate is of data moved: half the disk holds data, the other half holes; qemu-img's
        # percent is of that data, so each event's share of data is its share of the disk
        assert progress[-1]["data_done"] == progress[-1]["data_total"] == 256 << 20
        assert all(e["data_done"] == e["done"] * e["data_total"] // e["total"] for e in progress)

    def test_cancel_during_a_copy_undoes_everything(self, client, vmid):
        """A cancelled full clone stops its copy, frees the target and removes the new guest."""
        g, c = vmid(), vmid()
        client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "512M"}})
        path = storage_path("local") / f"{g}/vm-{g}-disk-0.raw"
        with open(path, "r+b") as f:
            for i in range(0, 512, 4):
                f.seek(i * PATTERN_MIB)
                f.write(b"\x5a" * PATTERN_MIB)
        job = client.submit("full_clone", vmid=g, newid=c)
        with held_copy(client, job.id):  # mid-copy, whatever the machine's speed
            client.cancel(job.id)
        job = client.wait(job.id, timeout=60)
        assert job.state == "cancelled" and job.error == "cancelled by user"
        assert not client.guest_store.exists(c)
        assert not (storage_path("local") / str(c)).exists()
        assert client.guest(g).lock == ""

    def test_twenty_linked_clones_of_one_template_at_once_all_succeed(self, client, vmid):
        """20 clones submitted together: no lock timeout, 20 distinct overlays of one base."""
        t = vmid()
        client.run("create", vmid=t, disks={"scsi0": {"storage": "local", "size": "1G"}})
        client.run("template", vmid=t)
        news = [vmid() for _ in range(20)]
        jobs = []
        threads = [threading.Thread(target=lambda n=n: jobs.append(client.submit("linked_clone", vmid=t, newid=n)))
                   for n in news]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        done = [client.wait(j.id, timeout=120) for j in jobs]
        assert [j.state for j in done] == ["succeeded"] * 20, [j.error for j in done]
        volumes = {client.guest(n).disks["scsi0"] for n in news}
        assert len(volumes) == 20
        base = f"local:base/base-{t}-disk-0.raw"
        assert set(client.volume(base).clones) == volumes
        for v in volumes:
            qemu_check(volume_path(v))

    def test_steps_one_node_can_run_in_a_row_are_one_task_each_step_still_recorded(self, client, vmid):
        """A linked clone on a node-local storage is one Celery task on that node, its three steps
        each started, recorded and evented on their own; a full clone's copy is a task of its own."""
        t, linked, full = vmid(), vmid(), vmid()
        client.run("create", vmid=t, disks={"scsi0": {"storage": "local", "size": "64M"}})
        client.run("template", vmid=t)
        job = client.run("linked_clone", vmid=t, newid=linked)
        assert job.state == "succeeded", job.error
        seen = list(client.events(job.id))
        starts = [e for e in seen if e["phase"] == "start"]
        assert [e["step"] for e in starts] == ["reserve_guest", "link_disks", "commit_guest"]
        assert [e["step"] for e in seen if e["phase"] == "done"] == ["reserve_guest", "link_disks", "commit_guest"]
        assert len({e["task"] for e in starts}) == 1 and {e["node"] for e in starts} == {"node1"}
        job = client.run("full_clone", vmid=t, newid=full)
        assert job.state == "succeeded", job.error
        task = {e["step"]: e["task"] for e in client.events(job.id) if e["phase"] == "start"}
        assert task["lock_guest"] == task["reserve_guest"] == task["allocate"]
        assert len({task["allocate"], task["copy_data"], task["commit_guest"]}) == 3

    def test_the_installed_stork_command_exits_non_zero_on_failure(self, workers, vmid):
        """The real entry point: exit 0 on success, 1 with a one-line error on refusal, 2 for a
        mistake in the command line (a bad guest id)."""
        exe = [sys.executable, "-m", "producer.cli"]
        ok = subprocess.run([*exe, "guest", "create", str(vmid()), "--disk", "scsi0=local:8M"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([*exe, "guest", "create", "12", "--disk", "scsi0=local:8M"],
                             cwd=ROOT, capture_output=True, text=True, check=False)
        assert (bad.returncode, bad.stdout) == (2, "")
        assert bad.stderr.strip() == "stork: invalid guest id '12': expected a number from 100 to 999999999"
        refused = subprocess.run([*exe, "template", "99999"], cwd=ROOT, capture_output=True, text=True, check=False)
        assert (refused.returncode, refused.stdout, refused.stderr) == (1, "", "stork: unknown guest 99999\n")


def test_guest_configs_are_replaced_whole_never_rewritten_in_place(client, vmid):
    """Each config change is a new file renamed over the old one (a reader never sees half a
    config), and no temp file stays behind."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    path = BASE / "guests" / f"{g}.toml"
    with open(path) as old:  # a reader holding the config while jobs change it
        before = old.read()
        assert client.run("resize", volid=f"local:{g}/vm-{g}-disk-0.raw", size="16M").state == "succeeded"
        assert os.fstat(old.fileno()).st_nlink == 0  # replaced by rename, not rewritten in place
        old.seek(0)
        assert old.read() == before
    assert client.guest(g).lock == ""
    assert not [p for p in (BASE / "guests").iterdir() if p.name.startswith(f".{g}.toml") and p.name.endswith(".tmp")]


def test_a_new_disk_never_takes_a_name_its_guest_names_though_the_storage_lists_nothing_there(client, vmid):
    """The guest's disk is away from the storage (its file system not mounted, say): a disk
    added meanwhile takes the next name, not the one the guest names already, so once the old
    disk is back the guest has two disks, not one named twice (written over by its "new" one)."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M", "format": "raw"}})
    disk = storage_path("local") / f"{g}/vm-{g}-disk-0.raw"
    away = disk.with_name("away")
    disk.rename(away)
    try:
        job = client.run("add_disk", vmid=g, disks={"scsi1": {"storage": "local", "size": "8M", "format": "raw"},
                                                    "scsi2": {"storage": "local", "size": "8M", "format": "qcow2"}})
    finally:
        away.rename(disk)
    assert job.state == "succeeded", job.error
    assert client.guest(g).disks == {"scsi0": f"local:{g}/vm-{g}-disk-0.raw", "scsi1": f"local:{g}/vm-{g}-disk-1.raw",
                                     "scsi2": f"local:{g}/vm-{g}-disk-2.qcow2"}  # a number, whatever the format


def test_a_disk_whose_volume_is_not_there_is_neither_removed_nor_destroyed_without_forget(client, stork, vmid):
    """Its file system not mounted (a dir storage without is_mountpoint reads as empty), a
    disk's volume is not there: dropped from its guest, its name would be free for the next new
    disk, and the old disk would come back under it once mounted. `disk remove` and `guest
    destroy` refuse, naming `--forget`, which drops such a volume once it is gone for good (and
    is refused for one that is there)."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M", "format": "raw"},
                                        "scsi1": {"storage": "local", "size": "8M", "format": "raw"}})
    disk = storage_path("local") / f"{g}/vm-{g}-disk-1.raw"
    away = disk.with_name("away")
    disk.rename(away)
    try:
        volid = f"local:{g}/vm-{g}-disk-1.raw"
        code, _, err = stork("disk", "remove", str(g), "scsi1")
        assert (code, err) == (1, f"stork: no volume at {volid} (a storage not mounted?): not removed; 'stork disk "
                                  f"remove {g} scsi1 --forget' drops it once gone for good\n")  # at submit
        code, _, err = stork("guest", "destroy", str(g))
        assert (code, err) == (1, f"stork: no volume at {volid} (a storage not mounted?): not destroyed (guest {g}); "
                                  f"'stork guest destroy {g} --forget' drops it once gone for good\n")
        assert set(client.guest(g).disks) == {"scsi0", "scsi1"} and client.guest(g).lock == ""
        code, _, err = stork("disk", "remove", str(g), "scsi0", "--forget")
        assert code == 1 and f"local:{g}/vm-{g}-disk-0.raw is there: --forget is for a volume gone already" in err
        assert stork("disk", "remove", str(g), "scsi1", "--forget")[0] == 0
        assert set(client.guest(g).disks) == {"scsi0"}
    finally:
        away.rename(disk)
    disk.rename(away)
    try:
        client.guest_store.write(client.guest(g).with_(unused=(volid,)))
        code, out, err = stork("--json", "guest", "destroy", str(g), "--forget")
        assert code == 0, err
        result = json.loads(out)["result"]
        assert (result["freed"], result["forgotten"]) == ([f"local:{g}/vm-{g}-disk-0.raw"], [volid])
        assert not client.guest_store.exists(g)
    finally:
        away.unlink()


def test_a_moved_qcow2_holding_internal_snapshots_is_kept_not_freed(client, vmid):
    """The copy carries the disk's data, not the snapshots inside its qcow2 file (made by Proxmox
    VE, libvirt or qemu-img): --delete-source keeps such a source as unused, with a warning, as
    Proxmox VE's move_disk refuses to delete it."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M", "format": "qcow2"}})
    source = client.guest(g).disks["scsi0"]
    subprocess.run(["qemu-img", "snapshot", "-c", "before-upgrade", str(volume_path(source))], check=True)
    job = client.run("move", vmid=g, disk="scsi0", storage="shared", delete_source=True)
    assert job.state == "succeeded", job.error
    assert "it holds 1 internal snapshot(s), which its copy does not carry" in job.result["warning"]
    guest = client.guest(g)
    assert guest.disks["scsi0"].startswith("shared:") and guest.unused == (source,)
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(volume_path(source))], capture_output=True, text=True,
                            check=True).stdout
    assert "before-upgrade" in listed


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])  # a qcow2's internal snapshots are looked for first
def test_a_moves_source_not_there_at_its_free_stays_listed_as_unused(client, vmid, tmp_path, fmt):
    """--delete-source finds no volume where the source was: its storage may not be mounted (a
    dir storage without is_mountpoint reads as empty). It is kept listed as unused, said in the
    warning, not taken for freed: dropped, it would come back unlisted once mounted. Here the
    storage's lock holds the free back while the file is moved away, as an unmount hides it."""
    from drivers.flock import file_lock
    from tests.conftest import BASE

    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M", "format": fmt}})
    source_volid = client.guest(g).disks["scsi0"]
    source, hidden = volume_path(source_volid), tmp_path / f"hidden.{fmt}"
    with file_lock(BASE / "lock" / "storage-local.lock", 10, "the test"):  # the free's
        job = client.submit("move", vmid=g, disk="scsi0", storage="shared", delete_source=True)
        wait_for(lambda: client.guest(g).disks["scsi0"].startswith("shared:"), timeout=20)
        shutil.move(source, hidden)
    done = client.wait(job.id, timeout=30)
    assert done.state == "succeeded", done.error
    assert f"kept {source_volid} as unused: no volume at {source_volid} (a storage not mounted?)" in \
        done.result["warning"]
    assert client.guest(g).unused == (source_volid,)
    shutil.move(hidden, source)  # mounted again: the guest still lists it


def test_a_move_whose_source_cannot_be_freed_still_stands(client, vmid):
    """--delete-source runs after the move is committed: a source that cannot be freed is
    kept as unused and reported; the guest keeps its new disk."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    source = storage_path("local") / f"{g}/vm-{g}-disk-0.raw"
    subprocess.run(["chattr", "+i", str(source)], check=True)
    try:
        job = client.run("move", vmid=g, disk="scsi0", storage="shared", delete_source=True)
    finally:
        subprocess.run(["chattr", "-i", str(source)], check=True)
    assert job.state == "succeeded", job.error
    assert "kept local:" in job.result["warning"]
    guest = client.guest(g)
    assert guest.disks["scsi0"].startswith("shared:") and guest.unused == (f"local:{g}/vm-{g}-disk-0.raw",)
    assert volume_path(guest.disks["scsi0"]).exists() and source.exists()


def test_a_guest_changed_after_submit_is_refused_by_the_step(client, vmid):
    """The step re-reads the guest under its lock: disks that changed since submit stop the job."""
    from drivers.errors import Refused
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import lock_guest
    from worker.records import JobRecord, JobState

    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    job = JobRecord(id=records.new_id(), kind="template", node="node1", steps=["lock_guest"], queues=["shared"],
                    params={"lock_vmid": g, "expect_disks": {"scsi0": f"local:{g}/vm-{g}-disk-9.raw"}},
                    state=JobState.RUNNING,
                    current={"step": 0, "name": "lock_guest", "node": "node1", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="lock_guest", worker="test:1",
                      kinds=KINDS)
    with pytest.raises(Refused, match=f"guest {g} changed since the job was submitted"):
        lock_guest(ctx)
    assert client.guest(g).lock == ""
    client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it


def test_a_pending_name_a_forged_record_gives_a_guests_disk_is_neither_adopted_nor_freed(client, vmid):
    """A record is input: one written by hand (the producer's Redis user may write records and
    name claims) names another guest's disk as the name its step left pending before a crash.
    Adopted, the commit would attach it to a second guest; freed (a linked clone cut off
    midway), the guest would lose it. Refused, naming who uses it; the disk stays."""
    from drivers.errors import Refused
    from worker import records
    from worker.context import StepContext
    from worker.jobs import steps, usage
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord, JobState

    g, n = vmid(), vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    theirs = client.guest(g).disks["scsi0"]
    spec = KINDS["create"]
    job = JobRecord(id=records.new_id(), kind="create", node="node1", steps=[s.name for s in spec.steps],
                    queues=spec.queues({"node": "node1", "storages": ["local"]}, client.cfg), state=JobState.RUNNING,
                    done=1,
                    params={"new_vmid": n, "node": "node1", "storages": ["local"],
                            "disks": {"scsi0": {"storage": "local", "size": 8 << 20, "format": "raw", "owner": n}}},
                    ctx={"pending": {"scsi0": theirs}},
                    current={"step": 1, "name": "allocate", "node": "node1", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    usage.claim(client.r, theirs, job.id)
    ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="allocate", worker="test:1",
                      kinds=KINDS)
    try:
        with pytest.raises(Refused, match=f"{theirs}, which this job's record names as its own, is in use by "
                                          f"guest {g}"):
            steps.allocate_disks(ctx)
        assert "made" not in ctx.data and volume_path(theirs).exists() and client.guest(g).disks["scsi0"] == theirs
    finally:
        client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it
        usage.release_claims(client.r, job)


@pytest.mark.parametrize("seen", [{"expect_rev": ""}, {}], ids=["submitted against it", "by a stork of before"])
def test_a_config_of_before_the_rev_locks_for_a_job_that_saw_it_so(client, vmid, seen):
    """A config written before stork kept a rev has none: a job submitted against it saw none
    (and one recorded before the rev existed checks none), so the lock is taken."""
    from drivers.guests import GuestStore
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import lock_guest, unlock_guest
    from worker.records import JobRecord, JobState

    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    store = GuestStore(client.cfg.guests_dir)
    store.write(client.guest(g).with_(rev=""))  # as a stork of before wrote it
    job = JobRecord(id=records.new_id(), kind="resize", node="node1", steps=["lock_guest"], queues=["shared"],
                    params={"lock_vmid": g, "expect_disks": client.guest(g).disks, **seen}, state=JobState.RUNNING,
                    current={"step": 0, "name": "lock_guest", "node": "node1", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="lock_guest", worker="test:1",
                      kinds=KINDS)
    try:
        lock_guest(ctx)
        assert client.guest(g).lock_job == job.id and client.guest(g).rev == ""
    finally:
        unlock_guest(ctx)
        client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it


@pytest.mark.parametrize("meanwhile", ["disk removed and added again", "guest destroyed and made again"])
def test_a_job_delivered_late_past_disks_changed_back_is_refused(client, vmid, monkeypatch, meanwhile):
    """A message kept in a dead worker's unacked set is resent minutes later: a `disk remove`
    run twice (Ctrl-C, then again), the disk added again under the freed name meanwhile (or the
    guest destroyed and made alike). The volume ids match what the late job saw at submit; the
    config's rev does not, and the new disk stays."""
    from worker import runner

    g = vmid()
    layout = {"scsi0": {"storage": "local", "size": "8M"}, "scsi1": {"storage": "local", "size": "8M"}}
    client.run("create", vmid=g, disks=layout)
    held: list = []
    with monkeypatch.context() as m:  # recorded and queued, its message not delivered yet
        m.setattr(runner, "send_steps", lambda record, start, sender=None: held.append((record, start)))
        late = client.submit("remove_disk", vmid=g, disk="scsi1")
    if meanwhile == "disk removed and added again":
        assert client.run("remove_disk", vmid=g, disk="scsi1").state == "succeeded"
        assert client.run("add_disk", vmid=g, disks={"scsi1": layout["scsi1"]}).state == "succeeded"
    else:
        assert client.run("destroy", vmid=g).state == "succeeded"
        assert client.run("create", vmid=g, disks=layout).state == "succeeded"
    new = client.guest(g)
    assert new.disks == late.params["expect_disks"]  # the same volume ids: they alone cannot tell
    with volume_path(new.disks["scsi1"]).open("r+b") as f:
        f.write(b"new data")
    runner.send_steps(*held[0], client.app)
    job = client.wait(late.id, timeout=60)
    assert job.state == "failed" and f"guest {g} changed since the job was submitted (its disks were changed, " \
        "and changed back, or it was destroyed and made again)" in job.error
    assert client.guest(g).disks == new.disks and client.guest(g).lock == ""
    assert volume_path(new.disks["scsi1"]).read_bytes().startswith(b"new data")


def test_a_move_whose_switch_stood_is_not_switched_back_by_its_undo(client, vmid):
    """The switch wrote the guest's config (its copy attached, the guest unlocked in the same
    write) and then its step failed: the undo leaves the guest as the switch made it (it may
    have run from the copy since), and the copy stays, as the guest names it."""
    from drivers.errors import Refused
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import free_made, unswitch_disks
    from worker.records import JobRecord, JobState

    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"},
                                        "scsi1": {"storage": "local", "size": "8M"}})
    old, copy = client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]
    with client.guest_store.editing(g) as box:  # as the switch left it
        box[0] = box[0].with_(disks={"scsi0": copy}, unused=(old,))
    kind = KINDS["move"]
    job = JobRecord(id=records.new_id(), kind="move", node="node1", steps=[s.name for s in kind.steps],
                    queues=["shared"] * len(kind.steps), state=JobState.UNDOING, params={"lock_vmid": g},
                    ctx={"made": {"scsi0": copy}, "replaced": {"scsi0": old}})
    records.create(client.r, job, {"phase": "queued"})
    ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="undo_switch_disks",
                      worker="test:1", kinds=KINDS)
    try:
        unswitch_disks(ctx)
        assert client.guest(g).disks == {"scsi0": copy} and client.guest(g).unused == (old,)
        with pytest.raises(Refused, match=rf"kept {copy} \(in use by guest {g} \(scsi0\)"):
            free_made(ctx)
        assert volume_path(copy).exists()
    finally:
        client.r.srem(records.ACTIVE, job.id)


class TestReads:
    def test_storage_list_shows_every_configured_storage(self, stork):
        """`storage list` names each storage with its type, sharing and nodes."""
        code, out, _ = stork("--json", "storage", "list")
        rows = {r["id"]: r for r in json.loads(out)}
        assert code == 0 and {"local", "local1", "local2", "shared"} <= set(rows)
        assert rows["shared"]["shared"] is True and rows["local2"]["nodes"] == ["node2"]
        assert "local2" in stork("storage", "list")[1]

    def test_volume_list_shows_bases_with_their_clones(self, stork, vmid):
        """`volume list STORAGE` lists every volume; a base shows its clones, a clone its parent."""
        t, c = vmid(), vmid()
        make_guest(stork, t, "scsi0=local:8M", template=True)
        assert stork("clone", t, c)[0] == 0
        code, out, _ = stork("--json", "volume", "list", "local")
        assert code == 0
        vols = {v["volid"]: v for v in json.loads(out)}
        base, clone = f"local:base/base-{t}-disk-0.raw", f"local:{c}/vm-{c}-disk-0.qcow2"
        assert vols[base]["clones"] == [clone] and vols[clone]["parent"] == base
        assert f"{base}" in stork("volume", "list")[1]

    def test_cancelling_a_job_waiting_for_a_node_that_is_down_undoes_it(self, stork, client, vmid):
        """A job whose next step waits on the queue of a node with no worker is not stuck:
        `job cancel` undoes what it did (here a full clone onto node `crash`, whose worker is
        not running: node1 locked the source, reserved the clone and exported the disk) and it
        ends cancelled."""
        g, c = vmid(), vmid()
        assert client.run("create", vmid=g, node="node1",
                          disks={"scsi0": {"storage": "local1", "size": "8M"}}).state == "succeeded"
        job = client.submit("full_clone", vmid=g, newid=c, storage="crash")
        wait_for(lambda: client.job(job.id).done == job.steps.index("allocate"), 10, "node1's steps")
        assert client.guest_store.exists(c) and client.guest(g).lock == "full_clone" and exports_running()
        code, out, _ = stork("job", "cancel", job.id)
        assert code == 0 and "cancel" in out
        job = client.wait(job.id, timeout=30)
        assert job.state == "cancelled" and not client.guest_store.exists(c) and client.guest(g).lock == ""
        assert [i for i in job.undone] == job.undo == [job.steps.index(s) for s in ("export", "reserve_guest",
                                                                                    "lock_guest")]
        wait_for(lambda: not exports_running(), 10, "the export to end")
        code, _, err = stork("job", "cancel", job.id)
        assert code == 1 and err.strip() == f"stork: job {job.id} is cancelled already"
        code, _, err = stork("job", "cancel", "ffffffffffff")
        assert code == 1 and "unknown job" in err


def test_progress_bar_shows_bytes_percent_rate_and_eta():
    """The live bar: step counter, bar, percent, bytes, rate and time left."""
    from producer.progress import bar_line

    line = bar_line({"step": "copy_data", "done": 1 << 30, "total": 4 << 30, "rate": 512 << 20},
                    ["lock_guest", "copy_data"], width=8)
    assert line == "[2/2] copy_data [##......]  25.0% 1.0 GiB/4.0 GiB 512.0 MiB/s ETA 6s"
    # a copy that knows its data: the rate and the time left are of data, not of holes
    line = bar_line({"step": "copy_data", "done": 8 << 30, "total": 16 << 30, "rate": 256 << 20,
                     "data_done": 1 << 30, "data_total": 3 << 30}, ["copy_data"], width=8)
    assert line == "[1/1] copy_data [####....]  50.0% 8.0 GiB/16.0 GiB (data 1.0 GiB/3.0 GiB) 256.0 MiB/s ETA 8s"


def test_copies_send_celery_task_progress_events_for_flower(client, vmid):
    """Flower reads worker events: a copy step sends `task-progress` events carrying the job."""
    from worker.app import app

    g, c = vmid(), vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "1G"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        for _ in range(256):
            f.write(b"\x11" * (4 * PATTERN_MIB))
    seen: list[dict] = []
    ready = threading.Event()

    def capture() -> None:
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"task-progress": seen.append})
            ready.set()
            with contextlib.suppress(Exception):  # its timeout: what was seen is checked below
                receiver.capture(limit=None, timeout=20, wakeup=False)

    listener = threading.Thread(target=capture, daemon=True)
    listener.start()
    ready.wait(5)
    job = client.run("full_clone", vmid=g, newid=c)
    wait_for(lambda: any(e.get("job") == job.id for e in seen), 10, "a task-progress event")
    event = next(e for e in seen if e.get("job") == job.id)
    assert event["step"] == "copy_data" and event["total"] == 1 << 30 and 0 <= event["done"] <= 1 << 30


def test_finished_jobs_expire_and_running_ones_do_not(client, vmid):
    """A finished job's record and events are kept for the time the workers' config gives
    (jobs.keep_days, 30 days here); an active one has no expiry."""
    from worker import records

    assert client.r.get(records.KEEP) == str(client.cfg.job_keep_days * 86400)  # set by each worker at its start
    job = client.run("create", vmid=vmid(), disks={"scsi0": {"storage": "local", "size": "8M"}})
    assert 0 < client.r.ttl(records.job_key(job.id)) <= records.RETENTION
    assert 0 < client.r.ttl(records.events_key(job.id)) <= records.RETENTION
    waiting = client.submit("ping", node="nobody")
    assert client.r.ttl(records.job_key(waiting.id)) == -1
    client.cancel(waiting.id)


def test_the_live_view_draws_on_a_terminal_and_stays_quiet_elsewhere():
    """On a terminal the view redraws one line per step and bar; piped, it prints nothing."""
    import io

    from producer.progress import ProgressView

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    events = [{"phase": "queued", "job": "j", "kind": "copy", "steps": ["allocate", "copy_data"]},
              {"phase": "start", "step": "copy_data", "node": "n1"},
              {"phase": "progress", "step": "copy_data", "done": 1 << 30, "total": 2 << 30, "rate": 1 << 30},
              {"phase": "finished", "state": "succeeded"}]
    tty, pipe = Terminal(), io.StringIO()
    for out in (tty, pipe):
        view = ProgressView(out)
        for event in events:
            view(event)
    assert "job j queued (copy)" in tty.getvalue() and "[2/2] copy_data on n1" in tty.getvalue()
    assert " 50.0% 1.0 GiB/2.0 GiB 1.0 GiB/s ETA 1s" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""
