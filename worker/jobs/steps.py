"""Step functions: each `run` is idempotent given the job (a redelivered step finds its work
done and returns) and each `undo` removes what its run made, tolerating half-made work.

Params are normalized at submit (worker/jobs/kinds.py); what a step makes goes into `ctx.data`
and is saved *before* it is made, so an undo after a crash still finds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drivers import faults, names, pve, qemu, transfer
from drivers.backends.base import Driver
from drivers.errors import AlreadyExists, ConfigError, NotFound, Refused, StorageUnavailable, StorkError
from drivers.guests import Guest, base_mismatch
from drivers.names import VolName
from worker import liveness, records
from worker.context import StepContext
from worker.jobs import usage

# ---- guest locks ---------------------------------------------------------------------


def lock_guest(ctx: StepContext) -> None:
    """Set the guest's `lock` field to this job, refusing a guest that is locked, a template
    (where params say so) or one whose disks changed since the job was submitted."""
    vmid = ctx.params.get("lock_vmid")
    if vmid is None:
        return
    with ctx.guests.editing(vmid) as box:
        guest = box[0]
        if guest.lock_job == ctx.job.id:
            return  # redelivered: the lock is ours already
        guest.require_unlocked()
        if refusal := ctx.params.get("refuse_template"):
            guest.require_not_template(refusal)
        if ctx.params.get("replace") and guest.replicas:  # recorded since the restore was submitted
            raise Refused(f"guest {vmid} has replicas of its bases on other nodes: {', '.join(sorted(guest.replicas))}"
                          " (free them with 'stork volume free VOLID' first)")
        if (node := ctx.params.get("expect_node")) and guest.node != node:
            raise Refused(f"guest {vmid} moved to node {guest.node} since the job was submitted (it was on {node})")
        expected = ctx.params.get("expect_disks")
        if expected is not None and guest.disks != expected:
            raise Refused(f"guest {vmid} changed since the job was submitted (its disks are now "
                          f"{', '.join(f'{k}={v}' for k, v in guest.disks.items()) or 'none'})")
        if (rev := ctx.params.get("expect_rev")) is not None and guest.rev != rev:
            raise Refused(f"guest {vmid} changed since the job was submitted (its disks were changed, and changed "
                          "back, or it was destroyed and made again): submit the job again if it is still wanted")
        box[0] = guest.with_(lock=ctx.job.kind, lock_job=ctx.job.id)


def unlock_guest(ctx: StepContext) -> None:
    """Clear the lock if this job holds it (`lock_job` tells, so no record is needed of it)."""
    vmid = ctx.params.get("lock_vmid")
    if vmid is None:
        return
    try:
        with ctx.guests.editing(vmid) as box:
            if box[0].lock_job == ctx.job.id:
                box[0] = box[0].with_(lock="", lock_job="")
    except NotFound:
        pass  # destroyed: nothing to unlock


def force_unlock(ctx: StepContext) -> None:
    """Clear a guest's lock whose job is no longer live (`qm unlock`): its job ended, or is
    waiting to retry an undo, or is gone. Refused while that job runs or may still run a step."""
    vmid = ctx.params["vmid"]
    with ctx.guests.editing(vmid) as box:
        guest = box[0]
        if not guest.lock:
            raise Refused(f"guest {vmid} is not locked")
        if holder := _live_job(ctx, guest.lock_job):
            raise Refused(f"guest {vmid} is locked by job {guest.lock_job} ({guest.lock}), which {holder}: "
                          "cancel it or wait for it")
        box[0] = guest.with_(lock="", lock_job="")
    ctx.set_result(unlocked=vmid, lock=guest.lock, job=guest.lock_job)


def _live_job(ctx: StepContext, job_id: str) -> str:
    """Why the job is live ("" if it is not): queued or running, or an undo in progress."""
    try:
        job = records.load(ctx.r, job_id) if job_id else None
    except NotFound:
        return ""
    if job is None or job.state.terminal:
        return ""
    if job.state != records.JobState.UNDOING:
        return f"is {job.state}"
    if liveness.holding(ctx.r, (job.current or {}).get("worker"), job.id):
        return "is undoing a step right now"
    kind = ctx.kinds.get(job.kind)
    left = [kind.steps[i] for i in job.undo if i not in job.undone] if kind else []
    if pending := [step.name for step in left if not step.release]:  # undos that still change guests
        return (f"still has to undo {', '.join(pending)} ('stork job cancel {job.id}' stops its retries; "
                f"'stork job abandon {job.id} --node NODE' gives up a node gone for good)")
    return ""


def reserve_guest(ctx: StepContext) -> None:
    """Create the new guest's config, locked by this job (refused if the id is taken)."""
    vmid = ctx.params["new_vmid"]
    guest = Guest(vmid, ctx.params["node"], name=ctx.params.get("name", ""),
                  lock=ctx.job.kind, lock_job=ctx.job.id)
    try:
        ctx.guests.create(guest)
    except AlreadyExists:
        if ctx.guests.read(vmid).lock_job != ctx.job.id:
            raise


def unreserve_guest(ctx: StepContext) -> None:
    """Remove the new guest's config if this job still holds it (not yet committed)."""
    vmid = ctx.params["new_vmid"]
    with contextlib.suppress(NotFound):
        if ctx.guests.read(vmid).lock_job == ctx.job.id:
            ctx.guests.delete(vmid)


# ---- volumes -------------------------------------------------------------------------


def _make_volume(ctx: StepContext, key: str, drv: Driver, owner: int, fmt: str,
                 create: Callable[[VolName], None], table: str = "made",
                 whole: Callable[[VolName], bool] | None = None) -> None:
    """Name and create a volume under the storage lock. The name is saved as pending and
    claimed for this job before it is created, and counts as made once created (saved with the
    step's end or failure). A name left pending by a process that died is settled first: made
    whole (`whole`, where a creation can be cut off midway under its name), it is ours."""
    with ctx.storage_lock(drv):
        if _adopt_pending(ctx, key, table, whole):
            return  # made before the crash: ours
        if whose := drv.foreign_guest(owner):
            raise Refused(usage.foreign_folder(drv.storage.id, owner, whose))
        taken = usage.claimed_names(ctx.r, drv.storage.id, owner, except_job=ctx.job.id) | \
            usage.names_its_config_holds(ctx, drv, owner)
        vol = drv.next_disk_name(owner, fmt, taken)
        ctx.data.setdefault("pending", {})[key] = drv.volid(vol)
        ctx.save(then=lambda client: usage.claim(client, drv.volid(vol), ctx.job.id))
        ctx.fence(drv)
        create(vol)
        ctx.data.setdefault(table, {})[key] = ctx.data["pending"].pop(key)


def _made_before_crash(ctx: StepContext, volid: str) -> bool:
    """Did this job create `volid` in a process that died before saving it as made? Only if
    the name is present and still claimed by this job: no other job creates a claimed name.
    Not where the name's folder is another manager's guest's by now: Proxmox VE knows nothing
    of claims, and a guest it made of that id since may have made that very name. Call it
    under the volume's storage lock."""
    drv, vol = ctx.volume(volid)
    return usage.claimed_by(ctx.r, volid) == ctx.job.id and drv.exists(vol) and \
        (vol.owner is None or not drv.foreign_guest(vol.owner))


def _adopt_pending(ctx: StepContext, key: str, table: str = "made",
                   whole: Callable[[VolName], bool] | None = None) -> bool:
    """Settle `key`'s pending name: made (True); never created, so not ours (False); or made
    by this job but not whole (False, once freed: an `rbd clone` cut off makes a whole image
    under its name, reading zeros, before it links it to its base)."""
    volid = ctx.data.get("pending", {}).get(key)
    if volid is None:
        return False
    if _made_before_crash(ctx, volid):
        drv, vol = ctx.volume(volid)
        if found := _users_of_made(ctx, drv, vol, volid):  # a record written by hand may name any volume
            raise Refused(f"{volid}, which this job's record names as its own, is in use by {', '.join(found)}")
        if whole is None or whole(vol):
            ctx.data.setdefault(table, {})[key] = ctx.data["pending"].pop(key)
            return True
        ctx.fence(drv)
        drv.free(vol)  # ours (claimed, and made by this job), cut off midway
    ctx.data["pending"].pop(key)
    return False


def allocate_disks(ctx: StepContext) -> None:
    """Make one new volume per planned disk: a linked clone of the base a plan names (the
    seed's disk from a base image), else an empty volume of its size (or its source's)."""
    for key, plan in ctx.params["disks"].items():
        if key in ctx.data.get("made", {}):
            continue  # redelivered: made already
        if "base" in plan:
            _link(ctx, key, plan["base"], plan["owner"], plan.get("base_identity"))
            continue
        drv = ctx.driver(plan["storage"])
        size = int(plan["size"]) if "size" in plan else _source_size(ctx, key, plan)

        def allocate(vol: VolName, d: Driver = drv, n: int = size) -> None:
            d.allocate(vol, n)

        _make_volume(ctx, key, drv, plan["owner"], plan["format"], allocate)
    ctx.set_result(volumes=ctx.data.get("made", {}))


def link_disks(ctx: StepContext) -> None:
    """Create one linked clone per planned disk, reading through its base; refused while the
    template is locked (e.g. being destroyed), and where it moved to another node since the job
    was submitted: the bases of the names it holds are there, and a copy here of the same name
    is one `guest migrate --keep-source` left behind, for the operator to free."""
    template = ctx.guests.read(ctx.params["vmid"])
    template.require_unlocked()
    if (node := ctx.params.get("expect_node")) and template.node != node:
        raise Refused(f"guest {template.vmid} moved to node {template.node} since the job was submitted (it was on "
                      f"{node})")
    for key, plan in ctx.params["disks"].items():
        if key not in ctx.data.get("made", {}):  # a template names its bases, and records replicas, once committed
            _link(ctx, key, plan["source"], plan["owner"], plan.get("base_identity"),
                  settled=plan["source"] in template.disks.values() or plan["source"] in template.replicas,
                  what=_replica_recorded(template.vmid, plan["source"]))
    ctx.set_result(volumes=ctx.data.get("made", {}))


def _link(ctx: StepContext, key: str, base_volid: str, owner: int, identity: str | None = None,
          table: str = "made", settled: bool = False,
          what: str = "the base this backup was made against (it was made anew)") -> None:
    """Make `key`'s disk a linked clone of the base `base_volid` (which must still be the very
    volume `identity` names, where the plan gives one: a relinked restore's base, a template's
    replica; else it is no longer `what`). `settled`: no job may rename the base back (an
    unlocked template names it, a template records it as a replica, this job made it), else the
    jobs naming it are asked (usage.require_base_made)."""
    drv, base = ctx.volume(base_volid)
    drv.require_feature("linked_clone", base)

    def link(vol: VolName) -> None:
        drv.require_existing(base)  # under the storage lock that a destroy frees it under
        if not settled:
            usage.require_base_made(ctx, base_volid)
        if identity is not None and drv.identity(base) != identity:
            raise Refused(f"{base_volid} is no longer {what}")
        drv.link_clone(base, vol)

    def linked(vol: VolName) -> bool:
        return drv.parent_of(vol) == base

    _make_volume(ctx, key, drv, owner, drv.linked_clone_format, link, table, whole=linked)


def _replica_recorded(vmid: int, replica: str) -> str:
    return (f"the replica guest {vmid} records (its name holds another volume now): 'stork volume free --forget "
            f"{replica}' drops the record and leaves that volume")


def free_made(ctx: StepContext) -> None:
    """Undo of allocate/link: free every volume this job made, and a pending one it made
    before its process died; keep one that a guest not held by this job, or another live job,
    uses (it is reported, not freed)."""
    _free_made(ctx, "made")


def free_linked(ctx: StepContext) -> None:
    """Undo of link_replicas: free the linked clones it made (as free_made)."""
    _free_made(ctx, "linked")


def _free_made(ctx: StepContext, table: str) -> None:
    made = list(ctx.data.get(table, {}).values())
    kept = []
    for volid in [*made, *ctx.data.get("pending", {}).values()]:
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            if volid not in made and not _made_before_crash(ctx, volid):
                ctx.fence(drv)
                drv.free_partial(vol)  # never created: the name is not ours, a half-made temp file is
                continue
            if not drv.exists(vol):
                continue
            if found := _users_of_made(ctx, drv, vol, volid):
                kept.append(f"{volid} (in use by {', '.join(found)})")
                continue
            ctx.fence(drv)
            drv.free(vol)
    if kept:
        raise Refused(f"kept {'; '.join(kept)}")  # a decision: the undo goes on


def _users_of_made(ctx: StepContext, drv: Driver, vol: VolName, volid: str) -> list[str]:
    """Who uses a volume the job's record names as made by it (none, for one it made): the
    guests and live jobs, and what reads through it where it is a base (no job makes one as
    such: a record written by hand may name one)."""
    guests = usage.candidates(ctx, volid)
    found = usage.users(ctx, volid, guests=guests) + usage.held_guest_users(ctx, volid, guests)
    return found + (_read_through(drv, vol) if vol.is_base else [])


@dataclass(frozen=True)
class _Source:
    """What a planned disk copies from: an opened image file (import), another node's export
    of a volume, or a volume."""

    label: str
    size: int
    image: qemu.Image | None = None
    volume: tuple[Driver, VolName] | None = None
    imported: bool = False


def _volume_size(ctx: StepContext, volid: str) -> int:
    drv, vol = ctx.volume(volid)
    drv.require_existing(vol)
    return drv.virtual_size(vol)


def _source_size(ctx: StepContext, key: str, plan: dict) -> int:
    """The size of a planned disk's source: its export's, where it is on another node."""
    return _export(ctx, key).size if plan.get("across") else _volume_size(ctx, plan["source"])


def _open_source(ctx: StepContext, stack: contextlib.ExitStack, key: str, plan: dict) -> _Source:
    """Open an import file once (its checks and its copy read the same descriptor), reach a
    volume of another node through its export, or name a volume."""
    if "source_path" in plan:
        path = Path(plan["source_path"])
        image, size, _ = stack.enter_context(qemu.open_import(path, plan.get("member")))
        if size != plan["size"]:
            raise Refused(f"{path} changed since the job was submitted (its size is now {size} bytes)")
        return _Source(str(path), size, image=image, imported=True)
    if plan.get("across"):  # a moved one checked where it is, by export_sources
        export = _export(ctx, key)
        return _Source(plan["source"], export.size, image=transfer.source(export, _cluster_key(ctx), plan["source"]))
    drv, vol = ctx.volume(plan["source"])
    _refuse_moving_foreign(ctx, plan)
    return _Source(plan["source"], _volume_size(ctx, plan["source"]), volume=(drv, vol))


def _refuse_moving_foreign(ctx: StepContext, plan: dict) -> None:
    """A guest's disk that another manager's guest names (Proxmox VE's, which may run it) is not
    moved: that guest would go on writing the original, and the copy miss it. Asked on the
    source's node, whose view of that manager is the one that counts."""
    if plan.get("moves") and (found := usage.foreign_users(ctx, plan["source"])):
        raise Refused(f"{plan['source']} is in use by {', '.join(found)}: not moved (its writes would miss the copy)")


def _data_bytes(src: _Source) -> int | None:
    """How much of the source holds data, for a rate of data moved; None where it cannot be
    told in time (the copy goes on all the same, its rate then counting holes)."""
    try:
        if src.volume:
            drv, vol = src.volume
            with drv.image(vol) as image:
                return qemu.data_bytes(image)
        return qemu.data_bytes(src.image) if src.image is not None else None
    except (StorkError, OSError):
        return None


def copy_data(ctx: StepContext) -> None:
    """Copy every planned disk into its allocated volume, reporting bytes as it goes; each
    copy is flushed to stable storage before it counts as copied.

    A copy interrupted by a crash is redone into a freshly recreated target, since zero
    areas are skipped on the assumption that the target is all zeros.
    """
    copied: list[str] = ctx.data.setdefault("copied", [])
    with contextlib.ExitStack() as stack:
        sources = {key: _open_source(ctx, stack, key, plan) for key, plan in ctx.params["disks"].items()}
        total = sum(src.size for src in sources.values())
        offset = sum(sources[key].size for key in copied if key in sources)
        # qemu-img reports percent of the data it moved: of the data, the rate and time left are
        data = {key: _data_bytes(src) for key, src in sources.items() if key not in copied}
        data_total = None if None in data.values() else sum(data.values())  # of what is left to copy
        data_offset = 0
        for key, src in sources.items():
            if key in copied:
                continue
            drv, dst = ctx.volume(ctx.data["made"][key])
            if ctx.data.get("copying") == key:  # a previous attempt died mid-copy
                with ctx.storage_lock(drv):
                    ctx.fence(drv)
                    drv.recreate(dst, src.size)
            ctx.data["copying"] = key
            ctx.save()

            def progress(done: int, _total: int, before: int = offset, data_before: int = data_offset,
                         size: int = src.size, held: int | None = data.get(key), what: str = f"{key}: {src.label}"
                         ) -> None:
                moved = None if held is None or data_total is None else \
                    (data_before + (done * held // size if size else 0), data_total)
                ctx.progress(before + done, total, what, moved)

            if src.volume:
                drv.copy_from(*src.volume, dst, progress)
            else:
                assert src.image is not None
                drv.copy_in(src.image, src.size, dst, progress)
            if src.imported:
                assert src.image is not None
                qemu.recheck_external(src.image)  # still none after the copy
            offset += src.size
            data_offset += data.get(key) or 0
            copied.append(key)
            ctx.data.pop("copying")
            ctx.save()


def verify_copy(ctx: StepContext) -> None:
    """Compare every copy with its source (through its export, from another node; an imported
    file opened and checked again) before the source may go, or the guest is made of it."""
    for key, plan in ctx.params["disks"].items():
        dst_drv, dst = ctx.volume(ctx.data["made"][key])
        if "source_path" in plan:
            with contextlib.ExitStack() as stack:
                dst_drv.compare_with(_open_source(ctx, stack, key, plan).image, dst)  # type: ignore[arg-type]
        elif plan.get("across"):
            dst_drv.compare_with(transfer.source(_export(ctx, key), _cluster_key(ctx), plan["source"]), dst)
        else:
            dst_drv.compare(*ctx.volume(plan["source"]), dst)


# ---- between nodes -------------------------------------------------------------------


def _cluster_key(ctx: StepContext) -> Path:
    if ctx.cfg.cluster_key is None:
        raise Refused(transfer.NO_KEY)
    return ctx.cfg.cluster_key


def _export(ctx: StepContext, key: str) -> transfer.Export:
    try:
        return transfer.Export.from_dict(ctx.data["exports"][key])
    except KeyError:
        raise Refused(f"disk {key} has no export to copy from (the export step did not record one)") from None


def export_sources(ctx: StepContext) -> None:
    """On the source node: export each planned disk that another node copies (`across`),
    read-only, on this node's address, for holders of the cluster key. Recorded before the
    step ends; an export whose recording fails is stopped at once. A redelivered step starts
    anew what died with its process."""
    vmid, node = ctx.params.get("vmid", ctx.params.get("lock_vmid")), ctx.params.get("expect_node")
    if vmid is not None and node and (moved := ctx.guests.read(vmid).node) != node:
        raise Refused(f"guest {vmid} moved to node {moved} since the job was submitted (it was on {node})")
    exports: dict[str, dict] = ctx.data.setdefault("exports", {})
    for key, plan in ctx.params["disks"].items():
        drv, vol = ctx.volume(plan["source"])
        if plan.get("as_base"):  # a base copied whole: which volume it was, for a replica's record
            ctx.data.setdefault("identities", {})[key] = drv.identity(vol)
        if not plan.get("across") or (key in exports and transfer.running(_export(ctx, key))):
            continue
        drv.require_existing(vol)
        _refuse_moving_foreign(ctx, plan)
        if plan.get("as_base") and not ctx.params.get("links") and (readers := drv.readers_of(vol)):
            raise Refused(f"{plan['source']} is a base with {len(readers)} linked clone(s) on node {ctx.node}, which "
                          f"read through it where it is: {', '.join(readers)} "
                          "(move or destroy them first)")
        with drv.image(vol) as image:
            export = transfer.start(image, drv.virtual_size(vol), ctx.cfg.address_of(ctx.node), _cluster_key(ctx))
        exports[key] = export.as_dict()
        try:
            ctx.save()
        except BaseException:
            transfer.stop(export)
            raise
    ctx.set_result(exported=sorted(exports))


def end_exports(ctx: StepContext) -> None:
    """Stop this job's exports (the copies are made, or the job is undone); idempotent."""
    for key in ctx.data.get("exports", {}):
        transfer.stop(_export(ctx, key))


# ---- template replicas ---------------------------------------------------------------


def record_replicas(ctx: StepContext) -> None:
    """Record the bases this job copied onto the target node, verified and made bases, as
    replicas of the template's bases (by volume id and identity), and unlock the template:
    the replicas stand from here on, whatever happens to the clone (later clones reuse them)."""
    vmid = ctx.params["lock_vmid"]
    with ctx.guests.editing(vmid) as box:
        template = box[0]
        if template.lock_job != ctx.job.id:
            return  # redelivered after it finished
        made = {pair[1]: {"of": ctx.params["disks"][key]["source"], "identity": ctx.data["identities"][key],
                          "node": ctx.params["target_node"],
                          **({"own_identity": own} if (own := ctx.data.get("base_identities", {}).get(key)) else {})}
                for key, pair in ctx.data.get("based", {}).items()}
        box[0] = template.with_(replicas={**template.replicas, **made}, lock="", lock_job="")
    ctx.set_result(replicas=sorted(made))


def check_replicas(ctx: StepContext) -> None:
    """On the replicas' node, before a template is destroyed: refused while a replica has
    linked clones (listing them); else each replica's identity is saved, for free_replicas to
    free that very volume once the template is gone (the template stays locked meanwhile, so
    no clone of a replica is made: linked clones need the template unlocked)."""
    vmid = ctx.params["lock_vmid"]
    identities: dict[str, str] = {}
    for volid, record in ctx.guests.read(vmid).replicas.items():
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            if not drv.exists(vol):
                identities[volid] = ""  # gone already (freed by hand): checked, nothing to free
                continue
            identity = drv.identity(vol)
            if record.get("own_identity", identity) != identity:
                identities[volid] = ""  # gone, and its name taken by another volume since: not the template's
                continue
            if readers := drv.readers_of(vol):
                raise Refused(f"guest {vmid}: replica {volid} on node {ctx.node} still has linked clones: "
                              f"{', '.join(readers)}")
            identities[volid] = identity
    ctx.data["replicas"] = identities
    ctx.save()


def free_replicas(ctx: StepContext) -> None:
    """After the template is destroyed: free each replica check_replicas saw, if its name
    still holds that very volume. The destroy stands: one that cannot be freed is a warning."""
    freed, kept = [], []
    for volid, identity in ctx.data.get("replicas", {}).items():
        drv, vol = ctx.volume(volid)
        try:
            with ctx.storage_lock(drv):
                if not drv.exists(vol):
                    continue  # gone before the destroy, or freed by an earlier attempt of this step
                if drv.identity(vol) != identity:
                    raise Refused("its name holds another volume now")
                usage.require_unused(ctx, volid)
                ctx.fence(drv)
                drv.free_volume(vol)  # refuses one with linked clones
            freed.append(volid)
        except (StorkError, OSError) as e:
            kept.append(f"{volid}: {e}")
    ctx.set_result(freed_replicas=sorted(freed), **({"warning": f"kept replicas: {'; '.join(kept)}"} if kept else {}))


def link_replicas(ctx: StepContext) -> None:
    """Make each disk of the new guest a linked clone of its base's replica on the target
    node: one that was there, or the one this job made."""
    based = ctx.data.get("based", {})
    for key, plan in ctx.params["links"].items():
        if key not in ctx.data.get("linked", {}):
            replica = plan.get("replica") or based[key][1]
            _link(ctx, key, replica, ctx.params["new_vmid"], plan.get("base_identity"), table="linked", settled=True,
                  what=_replica_recorded(ctx.params["vmid"], replica))
    ctx.set_result(volumes=ctx.data.get("linked", {}))


def commit_linked(ctx: StepContext) -> None:
    """Attach the linked clones to the new guest and unlock it (the clone's commit)."""
    vmid = ctx.params["new_vmid"]
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks=dict(ctx.data.get("linked", {})), lock="", lock_job="")
    ctx.set_result(vmid=vmid, disks=ctx.data.get("linked", {}))


def resize_volume(ctx: StepContext) -> None:
    """Grow a volume to the size asked (a backend may round it up: LVM to whole extents). The
    size it had is saved first, so a try after a crash that finds it grown by the try before
    reports it done rather than take the rounded size for a shrink."""
    volid, size = ctx.params["volid"], ctx.params["size"]
    drv, vol = ctx.volume(volid)
    drv.require_existing(vol)
    drv.require_feature("resize", vol)
    now = drv.virtual_size(vol)
    if "resized_from" in ctx.data and now >= size:  # grown by a try before, which may have died before zeroing
        drv.zero_grown(vol, ctx.data["resized_from"])
        ctx.set_result(volid=volid, size=size)
        return
    if now == size:
        ctx.set_result(volid=volid, size=size)
        return  # as asked already
    if now > size:
        raise Refused(f"{volid}: shrinking is not supported (would lose data)")
    if found := usage.foreign_users(ctx, volid):  # it may be running there: not ours to write
        raise Refused(f"{volid} is in use by {', '.join(found)}")
    ctx.data["resized_from"] = now
    ctx.save()
    drv.resize(vol, size)
    ctx.set_result(volid=volid, size=size)


def pong(ctx: StepContext) -> None:
    """A step that does nothing but be recorded (which node ran it): the ping job."""
    ctx.set_result(**{ctx.step: ctx.node})


# ---- bases ---------------------------------------------------------------------------


def make_bases(ctx: StepContext) -> None:
    """Turn each planned volume into a read-only base (rename + protect)."""
    _make_bases(ctx, ctx.params["bases"])


def make_moved_bases(ctx: StepContext) -> None:
    """Make the verified copy of each moved base a base on its target storage (same name);
    refused if linked clones read through the source by now."""
    plans = {}
    for key, plan in ctx.params["disks"].items():
        if not plan.get("as_base"):
            continue
        source = ctx.volname(plan["source"])
        # a replica's base does not move; one on another node was checked by the export step (and the free refuses)
        if not plan.get("across") and not ctx.params.get("links"):
            drv, source = ctx.volume(plan["source"])
            if readers := drv.readers_of(source):
                raise Refused(f"{plan['source']} has {len(readers)} linked clone(s) now: {', '.join(readers)}")
        plans[key] = {"source": ctx.data["made"][key], "name": source.name}
    _make_bases(ctx, plans)
    for key in plans:  # each made base's own identity, read on its node: a replica's is recorded (record_replicas)
        drv, base = ctx.volume(ctx.data["based"][key][1])
        ctx.data.setdefault("base_identities", {})[key] = drv.identity(base)


def make_copies_bases(ctx: StepContext) -> None:
    """Turn each volume this job made (a template copy's copies) into a base."""
    _make_bases(ctx, {key: {"source": volid, "name": None} for key, volid in ctx.data.get("made", {}).items()})


def _make_bases(ctx: StepContext, plans: dict[str, dict]) -> None:
    based: dict[str, list[str]] = ctx.data.setdefault("based", {})
    for key, plan in plans.items():
        drv, vol = ctx.volume(plan["source"])
        if key in based:  # redelivered: the name chosen then
            base = ctx.volume(based[key][1])[1]
            if drv.exists(base) and not drv.exists(vol):
                drv.protect_base(base)  # done, but perhaps not yet read-only
                continue
        drv.require_existing(vol)
        drv.require_feature("make_base", vol)
        with ctx.storage_lock(drv):
            if key not in based:  # a name given is refused when taken; a default one moves on
                base = drv.named_base(vol, plan["name"]) if plan.get("name") else drv.free_base_name(vol)
            if drv.exists(base):
                raise AlreadyExists(f"base image {drv.volid(base)} already exists")
            usage.require_unused(ctx, plan["source"])  # e.g. a clone's target, mid-copy
            based[key] = [plan["source"], drv.volid(base)]
            # its name is not free for others until the job ends
            ctx.save(then=lambda client, source=plan["source"]: usage.claim(client, source, ctx.job.id))
            ctx.fence(drv)
            drv.make_base(vol, base)
    # the volumes made into bases are gone by their old names: the result names the bases only
    sources = {pair[0] for pair in based.values()}
    left = {k: v for k, v in ctx.job.result.pop("volumes", {}).items() if v not in sources}
    ctx.set_result(bases={_base_label(ctx, key, pair[0]): pair[1] for key, pair in based.items()},
                   **({"volumes": left} if left else {}))


def _base_label(ctx: StepContext, key: str, source: str) -> str:
    """How a base reads in the result: its disk slot; a lone volume made a base (`stork base`,
    planned as "disk") by its owner's slot, else by the volume it was."""
    if key != "disk":
        return key
    owner_disks = ctx.params.get("expect_disks") or {}
    return next((slot for slot, volid in owner_disks.items() if volid == source), source)


def unmake_bases(ctx: StepContext) -> None:
    """Rename each base made by this job back; one whose old name is taken, that a guest or a
    clone uses, or that the storage refuses to rename, is reported (a decision that stands).
    Where its users cannot be told (a guest config that cannot be read), the undo is tried again
    later, its guest still locked: noted as done, the guest would be unlocked naming a disk
    gone, its data in a base nothing names (which a `volume free` then frees)."""
    taken = []
    for volid, base_volid in ctx.data.get("based", {}).values():
        drv, vol = ctx.volume(volid)
        _, base = ctx.volume(base_volid)
        with ctx.storage_lock(drv):
            if not drv.exists(base):
                continue  # never renamed, or renamed back already
            if drv.exists(vol):
                taken.append(f"{base_volid} (its old name {volid} is taken)")
                continue
            try:
                found = _base_users(ctx, drv, base, base_volid)
            except Refused as e:  # its users cannot be told (a config that cannot be read): later
                raise StorageUnavailable(f"{base_volid} not renamed back yet: {e}") from None
            if found:
                taken.append(f"{base_volid} (in use by {', '.join(found)})")
                continue
            _require_no_readers(ctx, base_volid)
            ctx.fence(drv)
            try:
                drv.unmake_base(base, vol)
            except Refused as e:  # the storage's own word (a clone it knows of that stork does not list)
                taken.append(f"{base_volid} ({e})")
    if taken:
        raise Refused(f"kept as base: {'; '.join(taken)}")


def _base_users(ctx: StepContext, drv: Driver, base: VolName, base_volid: str) -> list[str]:
    """The guests (a replica a template recorded, a restored template, a commit written) and
    linked clones (the guest's own, link_owner's) that use a base this job made."""
    guests = usage.candidates(ctx, base_volid)
    return usage.guest_users(ctx, base_volid, guests=guests) + usage.held_guest_users(ctx, base_volid, guests) + \
        _read_through(drv, base)


def _read_through(drv: Driver, base: VolName) -> list[str]:
    """What reads through `base`, as a use of it: each linked clone, and each file (Driver.readers_of)."""
    return [reader if reader.startswith("file ") else f"linked clone {reader}" for reader in drv.readers_of(base)]


def _require_no_readers(ctx: StepContext, base_volid: str) -> None:
    """A base that a live job reads (a copy of it, say) is renamed back once they end, not
    before (it would be gone under them), nor left a base (the guest, still naming the disk it
    was, would name a volume gone): the undo is tried again later, its guest still locked."""
    try:
        readers = usage.job_users(ctx, base_volid)
    except Refused as e:  # a record that cannot be read may be one: later, too
        raise StorageUnavailable(str(e)) from None
    if readers:
        raise StorageUnavailable(f"{base_volid} is read by {', '.join(readers)}: renamed back once they end")


def link_owner(ctx: StepContext) -> None:
    """A base made of a disk a guest runs from (not a template's): that slot gets a writable
    linked clone of the new base, so the guest still runs (committed by commit_bases)."""
    guest_id = ctx.params.get("lock_vmid")
    for slot, planned in ctx.params.get("link_owner", {}).items():
        if guest_id is not None and slot not in ctx.data.get("made", {}):
            _link(ctx, slot, ctx.data["based"][planned][1], guest_id, settled=True)


def commit_bases(ctx: StepContext) -> None:
    """Point the guest at its new bases and unlock it; a template only when every disk is a
    base (the commit point of base and template jobs)."""
    vmid = ctx.params.get("lock_vmid")
    if vmid is None:
        return
    renamed = dict(ctx.data.get("based", {}).values())
    with ctx.guests.editing(vmid) as box:
        guest = box[0]
        if guest.lock_job != ctx.job.id:
            return  # redelivered after it finished
        made = ctx.data.get("made", {})  # a running guest's clones of its new bases (link_owner)
        disks = {key: made.get(key) or renamed.get(volid, volid) for key, volid in guest.disks.items()}
        template = guest.template or bool(ctx.params.get("make_template"))
        if template and (writable := [v for v in disks.values() if not ctx.volname(v).is_base]):
            raise Refused(f"guest {vmid} cannot be a template: {', '.join(writable)} is not a base")
        unused = tuple(renamed.get(volid, volid) for volid in guest.unused)
        box[0] = guest.with_(disks=disks, unused=unused, template=template, lock="", lock_job="")
    ctx.set_result(vmid=vmid, template=template, **({"disks": dict(made)} if made else {}))


# ---- guests --------------------------------------------------------------------------


def commit_new_guest(ctx: StepContext) -> None:
    """Release the source guest, then attach the made volumes to the new guest and unlock it:
    that one atomic write is the job's commit point (before it, an undo removes all)."""
    unlock_guest(ctx)
    vmid = ctx.params["new_vmid"]
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks=dict(ctx.data.get("made", {})), lock="", lock_job="", **_notes(ctx))
    ctx.set_result(vmid=vmid, disks=ctx.data.get("made", {}), **_notes(ctx))


def _notes(ctx: StepContext) -> dict[str, str]:
    """What an imported OVA or Proxmox VE config described that stork does not use (memory,
    CPUs, networks): kept in the new guest's config and shown in the job's result."""
    return {"notes": ctx.params["notes"]} if ctx.params.get("notes") else {}


def attach_disks(ctx: StepContext) -> None:
    """Attach the volumes this job made to its locked guest, and unlock it (the commit of
    `disk add`)."""
    vmid = ctx.params["lock_vmid"]
    made = ctx.data.get("made", {})
    with ctx.guests.editing(vmid) as box:
        guest = box[0]
        if guest.lock_job == ctx.job.id:
            box[0] = guest.with_(disks={**guest.disks, **made}, lock="", lock_job="")
    ctx.set_result(vmid=vmid, disks=made)


def detach_disk(ctx: StepContext) -> None:
    """Keep a guest's disk as `unused` instead of attached, and unlock it."""
    vmid, key = ctx.params["lock_vmid"], ctx.params["disk"]
    with ctx.guests.editing(vmid) as box:
        guest = box[0]
        if guest.lock_job != ctx.job.id:
            return  # redelivered after it finished
        volid = guest.disks[key]
        box[0] = guest.with_(disks={k: v for k, v in guest.disks.items() if k != key},
                             unused=(*guest.unused, volid), lock="", lock_job="")
    ctx.set_result(vmid=vmid, detached={key: volid})


def remove_disk(ctx: StepContext) -> None:
    """Free a guest's disk, then drop it from the guest and unlock it; a base that linked
    clones read through, or a volume another guest or job uses, is refused first. The
    volume's identity is saved before it is freed: a try after a crash between the free and
    the config's write frees the name only while it still holds that volume (another job may
    have made a new one under the freed name since)."""
    vmid, key = ctx.params["lock_vmid"], ctx.params["disk"]
    guest = ctx.guests.read(vmid)
    if guest.lock_job != ctx.job.id:
        return  # redelivered after it finished
    volid = guest.disks.get(key)
    if volid is not None:
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            if not freed_before(ctx, drv, vol, volid, "freed_volumes"):
                if vol.is_base and drv.exists(vol) and (readers := drv.readers_of(vol)):
                    raise Refused(f"{volid} is a base image with {len(readers)} linked clone(s): {', '.join(readers)}")
                usage.require_unused(ctx, volid)
                usage.require_named_once(guest, volid, key)  # this job's guest: not among the users above
                identities = ctx.data.setdefault("freed_volumes", {})
                if volid not in identities:
                    _require_there_or_forgotten(ctx, drv, vol, volid, f"'stork disk remove {vmid} {key} --forget'")
                    identities[volid] = identity_now(drv, vol)
                    ctx.save()
                ctx.fence(drv)
                drv.free(vol)
    with ctx.guests.editing(vmid) as box:
        box[0] = box[0].with_(disks={k: v for k, v in box[0].disks.items() if k != key}, lock="", lock_job="")
    ctx.set_result(vmid=vmid, removed={key: volid})


def _require_there_or_forgotten(ctx: StepContext, drv: Driver, vol: VolName, volid: str, forget: str) -> None:
    """A disk whose volume is not there may be on a storage not mounted (a dir storage without
    `is_mountpoint` reads as empty): dropped from its guest, its name would be free for a new
    disk, and the old one would come back under it once mounted. Refused, naming `forget` (the
    command that drops it once it is gone for good); with forget, refused where it is there."""
    there, forgetting = drv.exists(vol), bool(ctx.params.get("forget"))
    if not there and not forgetting:
        raise usage.not_there([volid], "removed", forget)
    if there and forgetting:
        raise Refused(f"{volid} is there: --forget is for a volume gone already")


def forget_freed(ctx: StepContext) -> None:
    """Undo of destroy and remove_disk, which free volumes before the config drops them: one
    that failed between the two (its config's write, say) would leave the guest naming a
    volume gone, a name that another job may give a new volume. The volumes it freed (their
    identity saved, and the name holding nothing now, or another volume) leave the config;
    those cannot come back, and the job's error says why it stopped."""
    saved = ctx.data.get("freed_volumes", {})
    gone = set()
    for volid in saved:
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            if freed_before(ctx, drv, vol, volid, "freed_volumes"):
                gone.add(volid)
    if not gone:
        return
    with contextlib.suppress(NotFound), ctx.guests.editing(ctx.params["lock_vmid"]) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks={k: v for k, v in box[0].disks.items() if v not in gone},
                                  unused=tuple(v for v in box[0].unused if v not in gone))


def commit_assembled(ctx: StepContext) -> None:
    """Attach the named bases to the reserved guest as they are and mark it a template: the
    seed's template assembled by hand from base images."""
    vmid = ctx.params["new_vmid"]
    for volid in ctx.params["attach"].values():
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):  # the lock a destroy or free checks and frees it under
            drv.require_existing(vol)
            drv.identity(vol)  # a link or a folder at the name is no volume (refused, opened without following)
            if not vol.is_base:
                raise Refused(f"{volid} is not a base image: a template's disks must all be bases")
            usage.require_base_made(ctx, volid)
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks=dict(ctx.params["attach"]), template=True, lock="", lock_job="")
    ctx.set_result(vmid=vmid, template=True, disks=ctx.params["attach"])


def commit_adopted(ctx: StepContext) -> None:
    """Attach a Proxmox VE guest's volumes to the reserved guest where they are (import-pve),
    a template if it was one; refused for a disk another guest of stork or a live job uses (a
    writable disk in two guests would be written by both; a base may be shared)."""
    vmid, attach, unused = ctx.params["new_vmid"], ctx.params["attach"], ctx.params.get("attach_unused", [])
    template = ctx.params.get("template", False)
    if config := ctx.params.get("config"):  # read at submit on this node: the same config still?
        try:
            same = pve.digest_now(Path(config)) == ctx.params["config_digest"]
        except StorkError:
            same = False
        if not same:
            raise Refused(f"{config} changed since the job was submitted, or is gone (Proxmox VE at its disks?): "
                          "adopt it again")
    for volid in [*attach.values(), *unused]:
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            drv.require_existing(vol)
            drv.identity(vol)  # a link or a folder at the name is no volume (refused, opened without following)
            if volid in attach.values() and (mismatch := base_mismatch(vol.is_base, template, f"guest {vmid}")):
                raise Refused(f"{volid} {mismatch}")
            if vol.is_base:  # a base a job that has not ended may rename back: the guest would name it gone
                usage.require_base_made(ctx, volid)
            elif found := usage.guest_users(ctx, volid, outside=False) + usage.job_users(ctx, volid):
                raise Refused(f"{volid} is in use by {', '.join(found)}")
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks=dict(attach), unused=tuple(unused), template=template, lock="", lock_job="",
                                  **_notes(ctx))
    ctx.set_result(vmid=vmid, template=template, disks=attach, **_notes(ctx))


def commit_template_copy(ctx: StepContext) -> None:
    """Attach the copies, made bases, to the new guest as a template and unlock it."""
    vmid = ctx.params["new_vmid"]
    disks = {key: pair[1] for key, pair in ctx.data.get("based", {}).items()}
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(disks=disks, template=True, lock="", lock_job="", **_notes(ctx))
    ctx.set_result(vmid=vmid, template=True, disks=disks, **_notes(ctx))


def switch_disks(ctx: StepContext) -> None:
    """Attach the copies in place of the originals; keep those as unused or free them later."""
    if switched := _switch_to_copies(ctx, moved_to=None):
        ctx.set_result(vmid=ctx.params["lock_vmid"], disks=switched[0], replaced=switched[1])


def _switch_to_copies(ctx: StepContext, moved_to: str | None) -> tuple[dict[str, str], dict[str, str]] | None:
    """Attach the copies (the bases made of them, for bases) in place of the originals and
    unlock the guest, in one write, the originals saved as `replaced` first: (copies, originals).
    On its own node the originals stay listed as unused until free_sources has freed them; a
    guest moved to another node (`moved_to`) goes there with its copies. None: redelivered
    after it finished."""
    made = {**ctx.data.get("made", {}), **{key: pair[1] for key, pair in ctx.data.get("based", {}).items()}}
    with ctx.guests.editing(ctx.params["lock_vmid"]) as box:
        guest = box[0]
        if guest.lock_job != ctx.job.id:
            return None
        old = {key: guest.disks[key] for key in made}
        ctx.data["replaced"] = old
        ctx.save()
        where = {"node": moved_to} if moved_to else {"unused": (*guest.unused, *old.values())}
        box[0] = guest.with_(disks={**guest.disks, **made}, lock="", lock_job="", **where)
    return made, old


def unswitch_disks(ctx: StepContext) -> None:
    """Give the guest its old disks back, while the job holds it: a switch that was written
    unlocked the guest in the same write, and stands (the guest may have run from its copies
    since; free_made then keeps them, as the guest names them)."""
    old = ctx.data.get("replaced")
    if not old:
        return
    made = {**ctx.data.get("made", {}), **{key: pair[1] for key, pair in ctx.data.get("based", {}).items()}}
    with ctx.guests.editing(ctx.params["lock_vmid"]) as box:
        guest = box[0]
        if guest.lock_job != ctx.job.id:
            return
        # only the slots the switch wrote: one it never wrote (its write refused, a hand edit since) is left
        back = {key: volid for key, volid in old.items() if guest.disks.get(key) == made.get(key)}
        unused = tuple(v for v in guest.unused if v not in back.values())
        box[0] = guest.with_(disks={**guest.disks, **back}, unused=unused)


def switch_node(ctx: StepContext) -> None:
    """Move a migrated guest to its target node, attached to the verified copies there: one
    write of its config, the migration's commit. The originals, on the source node, are not
    the guest's to reach from there: free_sources frees them, or the result names them kept."""
    node = ctx.params["target_node"]
    if not (switched := _switch_to_copies(ctx, moved_to=node)):
        return
    made, old = switched
    ctx.set_result(vmid=ctx.params["lock_vmid"], node=node, disks=made, replaced=old)
    if not ctx.params.get("delete_source"):
        ctx.set_result(kept={"node": ctx.params["source_node"], "volumes": sorted(old.values())})


def identity_now(drv: Driver, vol: VolName) -> str:
    """The identity of the volume `vol` names now, "" where it names none."""
    return drv.identity(vol) if drv.exists(vol) else ""


def freed_before(ctx: StepContext, drv: Driver, vol: VolName, key: str, table: str = "freed") -> bool:
    """Whether a try before freed `vol` (the volume disk `key` had before the job replaced it,
    or, in the table "freed_volumes", the volume id `key`): its identity was saved, and the name
    holds no volume now, or another one (another job's, made under the freed name since:
    neither the job's to free nor to check)."""
    saved = ctx.data.get(table, {}).get(key)
    return saved is not None and (not drv.exists(vol) or drv.identity(vol) != saved)


def require_replaced_there(ctx: StepContext, drv: Driver, vol: VolName, key: str) -> None:
    """Refuse a replaced volume that is not there before a first try frees it."""
    if key not in ctx.data.get("freed", {}) and not drv.exists(vol):
        raise Refused(f"no volume at {drv.volid(vol)} (a storage not mounted?): not freed")


def free_replaced_volume(ctx: StepContext, drv: Driver, vol: VolName, key: str) -> None:
    """Free `vol` (not `freed_before`; under its storage lock, its use checked), its identity
    saved first, so that a try after a crash frees the name only while it still holds it. A
    volume not there at the first try is refused, not taken for freed: its storage may not be
    mounted (a dir storage without is_mountpoint reads as empty), and dropped from the guest's
    unused list it would come back unlisted, its name free for the next new disk."""
    freeing = ctx.data.setdefault("freed", {})  # disk key -> the identity of its volume, as freed
    if key not in freeing:
        require_replaced_there(ctx, drv, vol, key)
        freeing[key] = drv.identity(vol)
        ctx.save()
    ctx.fence(drv)
    drv.free_volume(vol)  # a base that linked clones read through by now is refused


def free_sources(ctx: StepContext) -> None:
    """After a verified move with --delete-source (or a migration without --keep-source),
    free the original volumes; a move drops them from the guest's unused list (a migrated
    guest's list is its new node's, where they were never listed). The job is committed by
    then: a volume that cannot be freed stays (listed as unused after a move), with a warning
    in the result."""
    if not ctx.params.get("delete_source"):
        return
    # a migrated guest's copy may have its original's name, on its new node: not a use of the original
    migrated = ctx.params["lock_vmid"] if ctx.params.get("target_node") else None
    freed, kept, why = [], [], []
    for key, volid in ctx.data.get("replaced", {}).items():
        try:
            drv, vol = ctx.volume(volid)
            with ctx.storage_lock(drv):
                if not freed_before(ctx, drv, vol, key):
                    # kept as unused by this guest: ours
                    usage.require_unused(ctx, volid, count_unused=False, but=migrated)
                    require_replaced_there(ctx, drv, vol, key)  # before its snapshots are looked for
                    if snapshots := drv.internal_snapshots(vol):  # as Proxmox VE's move_disk refuses to
                        raise Refused(f"it holds {snapshots} internal snapshot(s), which its copy does not carry")
                    free_replaced_volume(ctx, drv, vol, key)
            freed.append(volid)
        except (StorkError, OSError) as e:
            kept.append(volid)
            where = f"on node {ctx.node}" if migrated is not None else "as unused"
            why.append(f"kept {volid} {where}: {e}")
    if why:
        ctx.set_result(warning="; ".join(why))
    if migrated is not None:  # its unused list is its new node's, where a volume may have an original's id
        if kept:  # not the guest's to list from there: said in the result
            ctx.set_result(kept={"node": ctx.node, "volumes": kept})
        return
    with ctx.guests.editing(ctx.params["lock_vmid"]) as box:
        box[0] = box[0].with_(unused=tuple(v for v in box[0].unused if v not in freed))


def forget_freed_sources(ctx: StepContext) -> None:
    """Undo of free_sources and of a forced restore's free_replaced, which free the volumes the
    guest's disks had before the job replaced them, then drop them from its unused list: one
    that failed between the two (the config's write, say) would leave the guest listing as
    unused volumes gone, whose names a later disk may take. Those it freed (their identity
    saved) whose name holds nothing now leave the list, whether or not the job still holds the
    guest (a move's switch unlocked it). A migration lists no original as unused (the list is
    the guest's new node's, where a copy may have the same id): nothing to do there."""
    if ctx.params.get("target_node"):
        return
    gone = set()
    for key, volid in ctx.data.get("replaced", {}).items():
        drv, vol = ctx.volume(volid)
        with ctx.storage_lock(drv):
            if key in ctx.data.get("freed", {}) and not drv.exists(vol):  # saved before its free, and gone
                gone.add(volid)
    if gone:
        with contextlib.suppress(NotFound), ctx.guests.editing(ctx.params["lock_vmid"]) as box:
            box[0] = box[0].with_(unused=tuple(v for v in box[0].unused if v not in gone))


def free_volume(ctx: StepContext) -> None:
    """Free a volume that no guest attaches and no live job uses; a base with linked clones
    is refused, listing them. The volume's identity is saved before it is freed, so a step
    redelivered after a crash frees it if still there, and never a volume made since. It is
    then dropped from the guests that keep it as unused: those the check read (under the
    storage lock; each config read again as it is edited), or after a crash, read anew."""
    volid = ctx.params["volid"]
    drv, vol = ctx.volume(volid)
    guests: list[Guest] | None = None
    if ctx.params.get("forget"):
        return _forget_gone(ctx, drv, vol, volid)
    with ctx.storage_lock(drv):
        freeing = ctx.data.get("freeing")
        if freeing is None:
            drv.require_existing(vol)
            guests = usage.candidates(ctx, volid)
            # a volume kept as unused, or recorded as a replica, may go: they forget it after
            usage.require_unused(ctx, volid, count_unused=False, guests=guests, count_replicas=False)
            _refuse_stale_replica(ctx, drv, vol, volid, guests)
            ctx.data["freeing"] = drv.identity(vol)
            ctx.save()
            faults.point("free_recorded")
            ctx.fence(drv)
            drv.free_volume(vol)  # refuses a base with linked clones, listing them
        elif drv.exists(vol) and drv.identity(vol) == freeing:  # the process that saved it died before freeing
            # checked again: the storage lock was let go meanwhile, and a guest may attach it by now (assemble)
            usage.require_unused(ctx, volid, count_unused=False, count_replicas=False)
            ctx.fence(drv)
            drv.free_volume(vol)
    _forget_listed(ctx, volid, guests)
    ctx.set_result(freed=volid)


def _stale_replica_records(ctx: StepContext, drv: Driver, vol: VolName, volid: str,
                           guests: list[Guest] | None = None) -> list[int]:
    return usage.stale_replica_records(usage.candidates(ctx, volid) if guests is None else guests, volid, ctx.node,
                                       drv.storage.shared, drv.identity(vol))


def _refuse_stale_replica(ctx: StepContext, drv: Driver, vol: VolName, volid: str, guests: list[Guest]) -> None:
    if stale := _stale_replica_records(ctx, drv, vol, volid, guests):
        raise Refused(usage.not_the_replica(volid, stale[0]))


def _forget_gone(ctx: StepContext, drv: Driver, vol: VolName, volid: str) -> None:
    """`volume free --forget`: a volume gone already (removed by hand, say) leaves the guests
    of this node that list it as unused, and the replica records made here. Checked under the
    storage lock, where nothing makes or frees it meanwhile: refused while it exists, or a guest
    attaches it, or a live job names it (one may be making it). Where a replica recorded here
    is gone and another volume took its name, only the records go: that volume stays."""
    with ctx.storage_lock(drv):
        drv.status()  # an unmounted storage has no volume to show: refused, not taken for gone
        if drv.exists(vol):
            stale = _stale_replica_records(ctx, drv, vol, volid)
            if not stale and not ctx.data.get("forgetting"):  # (set: a try before dropped them, then died)
                raise Refused(f"{volid} exists: free it (--forget is for a volume gone already)")
            ctx.data.setdefault("forgetting", True)
            ctx.save()
            for vmid in stale:
                with ctx.guests.editing(vmid) as box:
                    box[0] = box[0].with_(replicas={v: r for v, r in box[0].replicas.items() if v != volid})
            ctx.set_result(forgot=volid, guests=stale, **({"warning": f"{volid} holds another volume than the "
                                                          "replica recorded: that volume is kept"} if stale else {}))
            return
        usage.require_unused(ctx, volid, count_unused=False, count_replicas=False)
        ctx.data.setdefault("forgetting", True)  # a try after a crash that forgets none is done all the same
        ctx.save()
        forgotten = _forget_listed(ctx, volid)
    ctx.set_result(forgot=volid, guests=forgotten)


def _forget_listed(ctx: StepContext, volid: str, guests: list[Guest] | None = None) -> list[int]:
    """Drop a freed volume from the guests that keep it as unused or record it as a replica:
    `guests` (read under the storage lock; each config read again as it is edited), or, where
    none were read, those the index names now. On a storage each node has its own of (`local`),
    one id names a volume on every node: only a guest on this node keeps this one as unused,
    and only a replica recorded on this node is this one. The guests edited."""
    if guests is None:
        try:
            guests = ctx.guests.candidates(volid)
        except ConfigError:  # freed already: a broken config must not make it look failed
            guests, _ = ctx.guests.scan()
    shared, edited = ctx.cfg.storage(names.volume_id(volid).storage).shared, []
    for guest in guests:
        keys = usage.named_here(guest, volid, ctx.node, shared)
        unused, replica = "unused" in keys, "replica" in keys
        if unused or replica:
            with ctx.guests.editing(guest.vmid) as box:
                box[0] = box[0].with_(unused=tuple(v for v in box[0].unused if v != volid or not unused),
                                      replicas={v: r for v, r in box[0].replicas.items() if v != volid or not replica})
            edited.append(guest.vmid)
    return edited


def forget_free(ctx: StepContext) -> None:
    """Undo of free_volume, which frees the volume before the guests that list it drop it: one
    that stopped between the two (cancelled while it waited to be sent again, say) would leave
    them naming a volume gone. Where the volume it saved is gone (its name holds nothing now,
    or another volume), they drop it; else nothing was freed, and nothing is done."""
    volid, saved = ctx.params["volid"], ctx.data.get("freeing")
    if saved is None:
        return
    drv, vol = ctx.volume(volid)
    with ctx.storage_lock(drv):
        if identity_now(drv, vol) == saved:
            return
    _forget_listed(ctx, volid)


def destroy_guest(ctx: StepContext) -> None:
    """Free every volume of a guest, dropping each from its config as it goes, then remove
    the config. Refused, before anything is freed, while linked clones use its bases or a
    disk's name holds something that is not a volume (a directory, a symlink): the
    check and the frees happen under the storage locks that a new clone is made under."""
    vmid = ctx.params["lock_vmid"]
    ctx.data["destroying"] = vmid
    ctx.save()
    try:
        guest = ctx.guests.read(vmid)
    except NotFound:
        return  # redelivered after it finished
    if guest.lock_job != ctx.job.id:
        return  # redelivered after it finished, and the id has been used again since
    if unchecked := sorted(set(guest.replicas) - set(ctx.data.get("replicas", {}))):  # recorded since submit
        raise Refused(f"guest {vmid} has replicas on other nodes now: {', '.join(unchecked)}")
    volumes = {v: ctx.volume(v) for v in [*guest.disks.values(), *guest.unused]}
    kept = {}
    with ctx.storage_locks([drv for drv, _ in volumes.values()]):
        # freed by a try before whose process died (the one it was freeing: another it had not come to may read
        # as absent for a storage not mounted yet); or the name holds another job's volume by now
        freeing = ctx.data.get("freeing")
        gone = {volid for volid, (drv, vol) in volumes.items() if freed_before(ctx, drv, vol, volid, "freed_volumes")
                and (volid == freeing or drv.exists(vol))}
        others = {volid for volid in gone if volumes[volid][0].exists(volumes[volid][1])}  # left as they are
        seen = {}  # each volume's identity ("" for none), read once
        for volid, (drv, vol) in volumes.items():
            if volid in gone:
                continue
            # identity() refuses an entry that is not a volume (named, with its path) before any free
            seen[volid] = identity_now(drv, vol)
            usage.require_base_unread(drv, vol, vmid)
            if found := usage.job_users(ctx, volid):
                raise Refused(f"{volid} is in use by {', '.join(found)}")
            if found := usage.guest_users(ctx, volid):
                kept[volid] = found  # e.g. a base another template shares: it stays theirs
        missing = sorted(v for v, identity in seen.items() if not identity and v not in kept)  # (kept: another's)
        if missing and not ctx.params.get("forget"):
            raise usage.not_there(missing, f"destroyed (guest {vmid})", f"'stork guest destroy {vmid} --forget'")
        identities = ctx.data.setdefault("freed_volumes", {})  # saved before any is freed, for a try after a crash
        for volid, identity in seen.items():
            if volid not in kept:
                identities.setdefault(volid, identity)
        ctx.save()
        for volid, (drv, vol) in volumes.items():
            if volid in kept:
                continue
            if volid not in gone:
                ctx.data["freeing"] = volid
                ctx.save()
                ctx.fence(drv)
                drv.free(vol)
            with ctx.guests.editing(vmid) as box:
                g = box[0]
                box[0] = g.with_(disks={k: v for k, v in g.disks.items() if v != volid},
                                 unused=tuple(v for v in g.unused if v != volid))
    ctx.guests.delete(vmid)
    forgotten = [v for v in volumes if v in seen and not seen[v] and v not in kept]  # (--forget: gone already)
    freed = [v for v in volumes if v not in kept and v not in others and v not in forgotten]
    ctx.set_result(destroyed=vmid, freed=freed, **({"forgotten": forgotten} if forgotten else {}),
                   **({"kept": {v: ", ".join(u) for v, u in kept.items()}} if kept else {}))
