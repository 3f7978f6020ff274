"""Where a job's steps meet another job's, or a step tried again after a crash meets what the
try before left: a linked clone or an assembled template never reads through a base that an
undo may still rename back, and that undo keeps a base clones read through; a free, destroy or
disk remove tried again neither frees a volume a guest attached meanwhile nor one another job
made under the freed name since; a resize tried again takes its own rounding for no shrink; a
job cancelled in its commit step is undone from that commit. Each acts on a hand-made record through the real
steps, with real volumes and configs on the session cluster."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from tests.conftest import BASE
from tests.helpers import qemu_same, volume_path
from tests.jobs.test_templates import template_of


@contextlib.contextmanager
def recorded(client, kind: str, state: str, at: str | None = None, **fields) -> Iterator[object]:
    """A job record made by hand, as a job of `kind` left it (running step `at`, in this
    process); no worker ever runs it."""
    from worker import liveness, records
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord

    steps = [s.name for s in KINDS[kind].steps]
    if at is not None:  # held by this live process: the sweep leaves it alone
        fields |= {"done": steps.index(at), "current": {"step": steps.index(at), "name": at, "node": "node1",
                                                         "worker": liveness.process_id(), "attempt": 2}}
    job = JobRecord(id=records.new_id(), kind=kind, node="node1", steps=steps, queues=["shared"] * len(steps),
                    state=state, **fields)
    records.create(client.r, job, {"phase": "queued"})
    try:
        yield job
    finally:
        client.r.srem(records.ACTIVE, job.id)


def step_context(client, job, step: str):
    from worker import liveness
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS

    return StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step=step, worker=liveness.process_id(),
                       kinds=KINDS)


@contextlib.contextmanager
def template_undoing(client, t: int, disk: str, base: str) -> Iterator[object]:
    """A template job of guest `t` undoing, the guest as the job left it before its commit (its
    disk `disk`, which make_bases renamed to `base`); afterwards unlocked, and a template again
    where the base is still there."""
    with recorded(client, "template", "undoing", params={"lock_vmid": t},
                  ctx={"based": {"scsi0": [disk, base]}}) as job:
        with client.guest_store.editing(t) as box:
            box[0] = box[0].with_(disks={"scsi0": disk}, template=False, lock="template", lock_job=job.id)
        try:
            yield job
        finally:
            based = {"disks": {"scsi0": base}, "template": True} if volume_path(base).exists() else {}
            with client.guest_store.editing(t) as box:
                box[0] = box[0].with_(lock="", lock_job="", **based)


def held_by(client, g: int, job) -> None:
    """Guest `g` locked by the hand-made job, as its lock step leaves it."""
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock=job.kind, lock_job=job.id)


def dies_after_its_first_free(monkeypatch, step, ctx) -> None:
    """Run `step` in a process that dies right after its first free (an OSError stands for
    the death), before its config drops the volume."""
    from drivers.backends.dir import DirDriver

    free = DirDriver.free

    def dies(self, vol):
        free(self, vol)
        raise OSError(5, "the process dies here")

    monkeypatch.setattr(DirDriver, "free", dies)
    with pytest.raises(OSError, match="the process dies here"):
        step(ctx)
    monkeypatch.undo()


def fails_at_its_config_write(client, monkeypatch, job, step: str):
    """Run `step` of the hand-made `job` through the runner with every guest config write
    failing (a full disk): the job fails; (its record now, the undo plans it sent)."""
    from drivers.guests import GuestStore
    from worker import records, runner
    from worker.jobs.kinds import KINDS

    sent: list[list[int]] = []
    monkeypatch.setattr(runner, "dispatch_undo", lambda job, sender=None: sent.append(list(job.undo)))

    def full(self, vmid):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GuestStore, "editing", full)
    with pytest.raises(OSError):
        runner._run(step_context(client, job, step), KINDS[job.kind], job.steps.index(step))
    monkeypatch.undo()
    return records.load(client.r, job.id), sent


def test_an_undo_keeps_a_base_that_linked_clones_read_through(stork, client, vmid):
    """A template job undone after a linked clone was made of its new base (its guest not yet
    committed, so no config names the base): renamed back, the clone's backing would be gone."""
    from drivers.errors import Refused
    from worker.jobs.steps import unmake_bases

    t, c = vmid(), vmid()
    base = template_of(stork, t)
    code, _, err = stork("guest", "create", c, "--disk", f"scsi0={base}")
    assert code == 0, err
    clone = client.guest(c).disks["scsi0"]
    disk = f"local:{t}/vm-{t}-disk-0.raw"
    with template_undoing(client, t, disk, base) as job:
        with pytest.raises(Refused, match=f"kept as base: {base} .*linked clone {clone}"):
            unmake_bases(step_context(client, job, "undo_make_bases"))
        assert volume_path(base).exists() and not volume_path(disk).exists()
        assert qemu_same(volume_path(base), volume_path(clone))


def test_an_undo_renames_back_a_base_that_another_live_job_reads_only_once_it_ended(stork, client, vmid):
    """A template job undone while a copy of its new base runs: renamed back, the base would be
    gone under the copy, and left a base, the guest would name a disk gone. The undo is tried
    again later (not a decision that stands), the base as it was meanwhile; once the copy has
    ended, it renames the base back."""
    from drivers.errors import Refused, StorageUnavailable
    from worker import records
    from worker.jobs.prepare import prepare_copy
    from worker.jobs.steps import unmake_bases

    t = vmid()
    base = template_of(stork, t)
    disk = f"local:{t}/vm-{t}-disk-0.raw"
    with template_undoing(client, t, disk, base) as job:
        with recorded(client, "copy", "running",
                      params=prepare_copy({"volid": base, "vmid": t, "storage": "local"}, client.cfg)) as copy:
            with pytest.raises(StorageUnavailable, match=f"{base} is read by job {copy.id} \\(copy\\)") as raised:
                unmake_bases(step_context(client, job, "undo_make_bases"))
            assert not isinstance(raised.value, Refused)  # not a decision: run_undo tries it again
            assert volume_path(base).exists() and not volume_path(disk).exists()
        assert client.r.sismember(records.ACTIVE, copy.id) == 0  # the copy ended
        unmake_bases(step_context(client, job, "undo_make_bases"))
        assert volume_path(disk).exists() and not volume_path(base).exists()


def test_an_undo_that_cannot_tell_whether_a_guest_uses_the_base_tries_again_later(stork, client, vmid):
    """A template job undone while another guest's config cannot be read (a hand edit with a
    typo): whether that guest names the base cannot be told. Taken as a decision, the undo was
    noted done and the guest unlocked naming a disk gone, its data in a base nothing named. It
    is tried again later instead, the base and the lock as they were; once the config reads,
    the base is renamed back."""
    from drivers.errors import Refused, StorageUnavailable
    from worker.jobs.steps import unmake_bases

    t, other = vmid(), vmid()
    base = template_of(stork, t)
    disk = f"local:{t}/vm-{t}-disk-0.raw"
    broken = BASE / "guests" / f"{other}.toml"
    with template_undoing(client, t, disk, base) as job:
        try:
            broken.write_text("[disk]\nscsi0 = 'local:1/vm-1-disk-0.raw'\n")
            with pytest.raises(StorageUnavailable, match=f"{base} not renamed back yet: cannot tell whether {base} is "
                                                         f"in use: {broken}: broken guest config") as raised:
                unmake_bases(step_context(client, job, "undo_make_bases"))
            assert not isinstance(raised.value, Refused)  # not a decision: run_undo tries it again
            assert volume_path(base).exists() and not volume_path(disk).exists()
            broken.unlink()
            unmake_bases(step_context(client, job, "undo_make_bases"))
            assert volume_path(disk).exists() and not volume_path(base).exists()
        finally:
            broken.unlink(missing_ok=True)


def test_an_undo_that_the_storage_refuses_to_rename_back_keeps_the_base_as_a_decision(stork, client, vmid,
                                                                                     monkeypatch):
    """A storage that refuses the rename back itself (RBD's or ZFS's word on a clone it knows of
    and stork does not list) gives a decision, not a passing trouble: kept as base, named."""
    from drivers.backends.dir import DirDriver
    from drivers.errors import Refused
    from worker.jobs.steps import unmake_bases

    def refuse(self, base, vol):
        raise Refused("it has dependent clones")

    t = vmid()
    base = template_of(stork, t)
    disk = f"local:{t}/vm-{t}-disk-0.raw"
    monkeypatch.setattr(DirDriver, "unmake_base", refuse)
    with template_undoing(client, t, disk, base) as job:
        with pytest.raises(Refused, match=f"kept as base: {base} \\(it has dependent clones\\)"):
            unmake_bases(step_context(client, job, "undo_make_bases"))
        assert volume_path(base).exists()


def test_an_undone_switch_gives_back_only_the_slots_it_wrote(client, vmid):
    """A move's switch refused (a hand edit landed while it edited the config): its undo gives
    back the old disk only where the slot holds the copy, and leaves the hand edit."""
    from drivers.guests import Guest
    from worker.jobs.steps import unswitch_disks

    g = vmid()
    old, copy, by_hand = (f"local:{g}/vm-{g}-disk-{n}.raw" for n in range(3))
    client.guest_store.create(Guest(g, "node1", disks={"scsi0": by_hand, "scsi1": copy}))
    with recorded(client, "move", "undoing", params={"lock_vmid": g},
                  ctx={"replaced": {"scsi0": old, "scsi1": old.replace("disk-0", "disk-9")},
                       "made": {"scsi0": copy.replace("disk-1", "disk-8"), "scsi1": copy}}) as job:
        held_by(client, g, job)
        unswitch_disks(step_context(client, job, "undo_switch_disks"))
        assert client.guest(g).disks == {"scsi0": by_hand, "scsi1": old.replace("disk-0", "disk-9")}
    client.guest_store.delete(g)


def test_an_undo_keeps_a_base_with_linked_clones_that_a_record_written_by_hand_names_as_made(stork, client, vmid):
    """A job record is input: one written into Redis by hand that names a base among what its job
    made would have the undo free it (no guest names it once its template's config is gone)
    under the linked clones that read through it. Kept, naming them."""
    from drivers.errors import Refused
    from worker.jobs.steps import free_made

    t, c = vmid(), vmid()
    base = template_of(stork, t)
    assert client.run("linked_clone", vmid=t, newid=c).state == "succeeded"
    (BASE / "guests" / f"{t}.toml").unlink()  # an operator removed the template's config by hand
    with recorded(client, "create", "undoing", params={"new_vmid": vmid()}, ctx={"made": {"scsi0": base}}) as job, \
            pytest.raises(Refused, match=f"kept {base} \\(in use by linked clone local:{c}/vm-{c}-disk-0.qcow2\\)"):
        free_made(step_context(client, job, "undo_allocate"))
    assert volume_path(base).exists()


@pytest.mark.parametrize("how", ["linked clone", "assemble"])
def test_a_base_whose_job_has_not_ended_is_not_read_through(stork, client, vmid, how):
    """Until the job that made a base ends, its undo may rename it back: a linked clone of it,
    or a template assembled of it, is refused by the step, under the storage lock."""
    t, g = vmid(), vmid()
    base = template_of(stork, t)
    with recorded(client, "template", "running", params={"lock_vmid": t},
                  ctx={"based": {"scsi0": [f"local:{t}/vm-{t}-disk-0.raw", base]}}) as maker:
        if how == "linked clone":
            job = client.run("create", vmid=g, disks={"scsi0": {"base": base}})
        else:
            job = client.run("assemble", vmid=g, disks={"scsi0": base})
    assert job.state == "failed"
    assert f"{base} is being made a base by job {maker.id} (template): use it once that job has ended" in job.error
    assert not client.guest_store.exists(g) and volume_path(base).exists()


def test_a_base_whose_job_passed_its_commit_is_read_through(stork, client, vmid):
    """Nothing at or before a commit is undone: a base whose job has committed (and is still
    ending, say undoing a later step) can no longer be renamed back, and is cloned."""
    t, g = vmid(), vmid()
    base = template_of(stork, t)
    with recorded(client, "template", "undoing", done=3, params={"lock_vmid": t},
                  ctx={"based": {"scsi0": [f"local:{t}/vm-{t}-disk-0.raw", base]}}):
        job = client.run("create", vmid=g, disks={"scsi0": {"base": base}})
    assert job.state == "succeeded", job.error
    assert client.volume(client.guest(g).disks["scsi0"]).parent == base


def test_a_free_tried_again_after_a_crash_checks_its_volume_again(stork, client, vmid):
    """A free whose process died between saving the volume's identity and freeing it had let
    the storage lock go: a template assembled of the base meanwhile attaches it, and the free
    tried again refuses rather than leave that template naming a volume gone."""
    from drivers import driver_for
    from drivers.errors import Refused
    from worker.jobs.steps import free_volume

    t, a = vmid(), vmid()
    base = template_of(stork, t)
    with client.guest_store.editing(t) as box:  # a base no guest names: free to free
        box[0] = box[0].with_(disks={})
    drv = driver_for(client.cfg.storage("local"))
    identity = drv.identity(drv.parse_volname(base.split(":", 1)[1]))
    with recorded(client, "free", "running", at="free_volume", params={"volid": base, "node": "node1"},
                  ctx={"freeing": identity}) as job:
        assembled = client.run("assemble", vmid=a, disks={"scsi0": base})
        assert assembled.state == "succeeded", assembled.error
        with pytest.raises(Refused, match=rf"{base} is in use by guest {a} \(scsi0\)"):
            free_volume(step_context(client, job, "free_volume"))
    assert volume_path(base).exists()


def test_a_destroy_saves_its_volumes_before_freeing_and_frees_only_those_when_tried_again(
        stork, client, vmid, monkeypatch):
    """A destroy whose process dies after its first free: by its next try another job may have
    made a new volume under the name it freed (a copy for the same owner), or under that of a
    disk whose volume was missing. The identities saved before the first free tell them
    apart: those volumes stay, the rest are freed, and the config goes."""
    from drivers import driver_for
    from worker import records
    from worker.jobs.steps import destroy_guest

    g = vmid()
    code, _, err = stork("guest", "create", g, *(f"--disk=scsi{i}=local:8M" for i in range(4)))
    assert code == 0, err
    first, second, third, missing = (client.guest(g).disks[f"scsi{i}"] for i in range(4))
    volume_path(missing).unlink()
    drv = driver_for(client.cfg.storage("local"))
    with recorded(client, "destroy", "running", at="destroy", params={"lock_vmid": g, "node": "node1", "forget": True},
                  ctx={"destroying": g}) as job:  # --forget: a disk's volume missing does not refuse it
        held_by(client, g, job)
        dies_after_its_first_free(monkeypatch, destroy_guest, step_context(client, job, "destroy"))
        saved = records.load(client.r, job.id).ctx["freed_volumes"]
        assert set(saved) == {first, second, third, missing} and saved[missing] == ""
        assert not volume_path(first).exists() and volume_path(second).exists()
        for volid in (first, missing):  # made since, by another job
            drv.allocate(drv.parse_volname(volid.split(":", 1)[1]), 1 << 20)
        retry = records.load(client.r, job.id)
        ctx = step_context(client, retry, "destroy")
        destroy_guest(ctx)
    try:
        assert volume_path(first).exists() and volume_path(missing).exists()
        assert not volume_path(second).exists() and not volume_path(third).exists()
        assert not client.guest_store.exists(g)
        assert ctx.job.result["freed"] == [second, third]
    finally:
        for volid in (first, missing):  # no guest names them: the orphan checks of other tests
            volume_path(volid).unlink(missing_ok=True)


def test_the_steps_refuse_a_volume_not_there_where_the_submit_could_not_look(stork, client, vmid):
    """The submit looks only where its node sees the storage: the steps decide. A disk remove's
    and a destroy's step refuse a volume that is not there (a storage not mounted reads so),
    nothing dropped from the guest."""
    from drivers.errors import Refused
    from worker.jobs.steps import destroy_guest, remove_disk

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M", "--disk=scsi1=local:8M")
    assert code == 0, err
    missing = client.guest(g).disks["scsi1"]
    volume_path(missing).unlink()
    for kind, step, params in (("remove_disk", remove_disk, {"disk": "scsi1"}), ("destroy", destroy_guest, {})):
        with recorded(client, kind, "running", at=step.__name__ if kind == "remove_disk" else "destroy",
                      params={"lock_vmid": g, "node": "node1", **params}) as job:
            held_by(client, g, job)
            with pytest.raises(Refused, match=rf"no volume at {missing} \(a storage not mounted\?\): not "):
                step(step_context(client, job, step.__name__))
    assert set(client.guest(g).disks) == {"scsi0", "scsi1"}
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(lock="", lock_job="")
    assert stork("guest", "destroy", g, "--forget")[0] == 0


def test_a_destroy_tried_again_takes_for_freed_only_the_volume_it_was_freeing(stork, client, vmid, monkeypatch):
    """A node rebooted in the middle of a destroy, and its worker came back before a storage was
    mounted: every disk it had not come to reads as absent. Taken for freed by the try before
    (their identities were saved), they were dropped from the guest and listed as freed. Only
    the volume it was freeing is: the others are refused as not there, as on a first try."""
    from drivers.errors import Refused
    from worker import records
    from worker.jobs.steps import destroy_guest

    g = vmid()
    code, _, err = stork("guest", "create", g, *(f"--disk=scsi{i}=local:8M" for i in range(3)))
    assert code == 0, err
    first, second, third = (client.guest(g).disks[f"scsi{i}"] for i in range(3))
    away = volume_path(third).with_name("away")
    with recorded(client, "destroy", "running", at="destroy", params={"lock_vmid": g, "node": "node1"},
                  ctx={"destroying": g}) as job:
        held_by(client, g, job)
        dies_after_its_first_free(monkeypatch, destroy_guest, step_context(client, job, "destroy"))
        assert not volume_path(first).exists() and records.load(client.r, job.id).ctx["freeing"] == first
        volume_path(third).rename(away)  # its storage not mounted yet
        try:
            with pytest.raises(Refused, match=rf"no volume at {third} \(a storage not mounted\?\)"):
                destroy_guest(step_context(client, records.load(client.r, job.id), "destroy"))
        finally:
            away.rename(volume_path(third))
        assert client.guest(g).disks == {"scsi0": first, "scsi1": second, "scsi2": third}
        ctx = step_context(client, records.load(client.r, job.id), "destroy")
        destroy_guest(ctx)
    assert not client.guest_store.exists(g) and ctx.job.result["freed"] == [first, second, third]
    assert not volume_path(second).exists() and not volume_path(third).exists()


def test_a_remove_disk_tried_again_leaves_a_volume_made_under_the_name_it_freed(stork, client, vmid, monkeypatch):
    """remove_disk frees the disk, then drops it from the config: a process that dies between
    the two leaves the config naming the freed name, where another job may make a new volume
    before the step is tried again. The identity saved before the free tells them apart: the
    new volume stays, and the config drops the disk."""
    from drivers import driver_for
    from worker import records
    from worker.jobs.steps import remove_disk

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M", "--disk=scsi1=local:8M")
    assert code == 0, err
    kept, removed = client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]
    with recorded(client, "remove_disk", "running", at="remove_disk",
                  params={"lock_vmid": g, "disk": "scsi1", "node": "node1"}) as job:
        held_by(client, g, job)
        dies_after_its_first_free(monkeypatch, remove_disk, step_context(client, job, "remove_disk"))
        assert not volume_path(removed).exists() and client.guest(g).disks["scsi1"] == removed
        drv = driver_for(client.cfg.storage("local"))
        drv.allocate(drv.parse_volname(removed.split(":", 1)[1]), 1 << 20)  # made since, by another job
        remove_disk(step_context(client, records.load(client.r, job.id), "remove_disk"))
    try:
        assert volume_path(removed).exists() and volume_path(kept).exists()
        assert client.guest(g).disks == {"scsi0": kept} and client.guest(g).lock == ""
    finally:
        volume_path(removed).unlink(missing_ok=True)  # no guest names it: the orphan checks of other tests


def test_a_job_interrupted_in_its_commit_step_is_cancelled_from_that_commit(client, vmid, monkeypatch):
    """Its commit may have made its change (remove_disk's free): a cancel of the job, waiting for
    its step to be sent again (to a node that may never come back), undoes it from that commit
    on, whose own undo checks what stands, not from the step before."""
    from worker import records, runner

    sent: list[list[int]] = []
    monkeypatch.setattr(runner, "dispatch_undo", lambda job, sender=None: sent.append(list(job.undo)))
    with recorded(client, "remove_disk", "running", done=1, attempts={"1": 1},
                  params={"lock_vmid": vmid(), "disk": "scsi1", "node": "node1"}) as job:
        runner.cancel(client.r, job.id)
        after = records.load(client.r, job.id)
        assert (after.state, after.undo, sent) == ("undoing", [1, 0], [[1, 0]])


def test_a_resize_tried_again_after_its_volume_grew_is_done(stork, client, vmid):
    """A backend may round a size up (LVM, to whole extents): a resize whose process died after
    the volume grew finds it larger than asked, which is the try before's work, not a shrink."""
    from worker.jobs.steps import resize_volume

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M")
    assert code == 0, err
    volid = client.guest(g).disks["scsi0"]
    asked = (8 << 20) + 512
    with recorded(client, "resize", "running", at="resize", params={"volid": volid, "size": asked, "node": "node1",
                                                                     "lock_vmid": g},
                  ctx={"resized_from": 8 << 20}) as job:
        os.truncate(volume_path(volid), 12 << 20)  # as the try before left it, rounded up
        ctx = step_context(client, job, "resize")
        resize_volume(ctx)
    assert ctx.job.result == {"volid": volid, "size": asked}
    assert volume_path(volid).stat().st_size == 12 << 20


def test_a_remove_disk_whose_config_write_fails_after_the_free_drops_the_volume_in_its_undo(
        stork, client, vmid, monkeypatch):
    """The free went through and the config's write failed (a full disk, say): the job fails,
    and its undo drops the freed volume from the guest, which would otherwise name a volume
    gone (a name another job may give a new volume) once unlocked."""
    from worker.jobs.steps import forget_freed

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M", "--disk=scsi1=local:8M")
    assert code == 0, err
    kept, removed = client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]
    with recorded(client, "remove_disk", "running", at="remove_disk",
                  params={"lock_vmid": g, "disk": "scsi1", "node": "node1"}) as job:
        held_by(client, g, job)
        failed, sent = fails_at_its_config_write(client, monkeypatch, job, "remove_disk")
        assert failed.state == "undoing" and sent == [[1, 0]] and not volume_path(removed).exists()
        forget_freed(step_context(client, failed, "undo_remove_disk"))
    assert client.guest(g).disks == {"scsi0": kept}
    with client.guest_store.editing(g) as box:  # as the undo of lock_guest, next, leaves it
        box[0] = box[0].with_(lock="", lock_job="")


def test_a_free_stopped_after_its_free_drops_the_volume_from_the_guests_in_its_undo(stork, client, vmid):
    """A free cancelled (or failed) while it waited to be sent again after its free: its undo
    drops the volume from the guest that kept it as unused, which would otherwise name a volume
    gone; where the volume it saved still stands, nothing was freed and nothing changes."""
    from drivers import driver_for
    from worker.jobs.steps import forget_free

    g = vmid()
    code, _, err = stork("guest", "create", g, *(f"--disk=scsi{i}=local:8M" for i in range(3)))
    assert code == 0, err
    disks = client.guest(g).disks
    gone, kept = disks["scsi1"], disks["scsi2"]
    with client.guest_store.editing(g) as box:  # both kept as unused
        box[0] = box[0].with_(disks={"scsi0": disks["scsi0"]}, unused=(gone, kept))
    drv = driver_for(client.cfg.storage("local"))
    saved = {v: drv.identity(drv.parse_volname(v.split(":", 1)[1])) for v in (gone, kept)}
    volume_path(gone).unlink()  # freed by the step's first try
    for volid in (gone, kept):
        with recorded(client, "free", "undoing", params={"volid": volid, "node": "node1"},
                      ctx={"freeing": saved[volid]}) as job:
            forget_free(step_context(client, job, "undo_free_volume"))
    assert client.guest(g).unused == (kept,) and volume_path(kept).exists()


def test_a_move_whose_config_write_fails_after_freeing_its_source_drops_it_in_its_undo(
        stork, client, vmid, monkeypatch):
    """A disk move with --delete-source frees the original, then drops it from the guest's
    unused list. The config's write failing in between (a full disk), the job is undone past
    its commit: its undo drops the freed original, which the guest would otherwise list as
    unused, a name a later disk of it may take. The guest is no longer the job's by then: the
    switch unlocked it."""
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import forget_freed_sources

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M", "--disk=scsi1=local:8M")
    assert code == 0, err
    moved, original = client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]
    with client.guest_store.editing(g) as box:  # switched to the copy, the original kept as unused
        box[0] = box[0].with_(disks={"scsi0": moved}, unused=(original,))
    steps = [s.name for s in KINDS["move"].steps]
    with recorded(client, "move", "running", at="free_sources", ctx={"replaced": {"scsi0": original}},
                  params={"lock_vmid": g, "delete_source": True, "node": "node1"}) as job:
        failed, sent = fails_at_its_config_write(client, monkeypatch, job, "free_sources")
        assert failed.state == "undoing" and sent == [[steps.index("free_sources"), 0]]
        assert not volume_path(original).exists() and client.guest(g).unused == (original,)
        forget_freed_sources(step_context(client, failed, "undo_free_sources"))
    assert client.guest(g).unused == () and client.guest(g).disks == {"scsi0": moved}


def test_a_linked_clone_cut_off_midway_under_its_name_is_freed_and_made_again(stork, client, vmid):
    """A step saved its clone's name as pending (and claimed it), and its process died in the
    clone: an `rbd clone` makes the whole image under its name before it links it to its base,
    so the name holds a volume that reads zeros. Tried again, the step takes only a clone of
    its base for made: that one is freed, and the disk is cloned anew (here a dir storage's
    volume of that name, not linked to the base, stands for what rbd leaves)."""
    from drivers import driver_for
    from worker.jobs import usage
    from worker.jobs.kinds import KINDS
    from worker.jobs.steps import free_made, link_disks

    t, c = vmid(), vmid()
    base = template_of(stork, t)
    drv = driver_for(client.cfg.storage("local"))
    volid = f"local:{c}/vm-{c}-disk-0.qcow2"
    vol = drv.parse_volname(volid.split(":", 1)[1])
    params = KINDS["linked_clone"].prepare({"vmid": t, "newid": c}, client.cfg)
    with recorded(client, "linked_clone", "running", at="link_disks", params=params,
                  ctx={"pending": {"scsi0": volid}}) as job:
        usage.claim(client.r, volid, job.id)
        drv.allocate(vol, 16 << 20)  # the image made, not yet linked to its base
        ctx = step_context(client, job, "link_disks")
        try:
            link_disks(ctx)
            made = ctx.data["made"]["scsi0"]
            assert drv.parent_of(drv.parse_volname(made.split(":", 1)[1])) == drv.parse_volname(base.split(":", 1)[1])
            assert qemu_same(volume_path(base), volume_path(made))  # the base's data, not zeros
        finally:
            free_made(ctx)
            usage.release_claims(client.r, ctx.job)


def test_a_disk_remove_never_frees_a_volume_its_guest_names_in_another_slot(stork, client, vmid):
    """A config edited by hand names one volume in two slots: `disk remove` of one is refused
    at submit and, where the edit came after the submit, by the step, naming the other slot;
    the volume stays (the in-use check passes over the guest its job holds)."""
    from drivers.errors import Refused
    from worker.jobs.steps import remove_disk

    g = vmid()
    code, _, err = stork("guest", "create", g, "--disk=scsi0=local:8M", "--disk=scsi1=local:8M")
    assert code == 0, err
    shared, own = client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(disks={"scsi0": shared, "scsi1": shared})
    code, _, err = stork("disk", "remove", str(g), "scsi0")
    assert (code, err) == (1, f"stork: guest {g} names {shared} also as scsi1: edit its config so that one slot "
                              "names it, then remove that one\n")
    with recorded(client, "remove_disk", "running", at="remove_disk",
                  params={"lock_vmid": g, "disk": "scsi0", "node": "node1"}) as job:
        held_by(client, g, job)
        with pytest.raises(Refused, match=f"guest {g} names {shared} also as scsi1"):
            remove_disk(step_context(client, job, "remove_disk"))
    assert volume_path(shared).exists() and client.guest(g).disks == {"scsi0": shared, "scsi1": shared}
    with client.guest_store.editing(g) as box:  # as it was: no orphan, no lock for the checks of other tests
        box[0] = box[0].with_(disks={"scsi0": shared, "scsi1": own}, lock="", lock_job="")
