"""Step functions of the backup and restore jobs (declared in worker/jobs/kinds.py).

A backup reads every disk of a guest, locked with `lock = "backup"`, into a chunk store
snapshot together with its config; the snapshot appears only at commit. A linked clone's
disk whose base was backed up before (the same volume: its id and identity token match)
reads only its own chunks and names the base's index. The snapshot id is saved before the
commit, so a step redelivered after it finds the snapshot and does not make a second one;
one redelivered before it starts again (the dead attempt's partial folder is removed by gc).

A restore makes new volumes (ALLOCATE), writes each disk's chunks into them, makes them
bases for a template, and registers the guest last: a missing or corrupt chunk fails the
job before that, and the undo frees what it made.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from drivers import backup_storage, faults, guests, nbd, qemu
from drivers.backends.base import Driver
from drivers.backup import retention
from drivers.backup.datapath import back_up, find_base, restore
from drivers.backup.records import BackupId, BaseRef, Index, Listing, Snapshot, format_time, parse_time
from drivers.backup.retention import Keep
from drivers.backup.store import ChunkStore
from drivers.backup.sync import sync
from drivers.errors import Corrupt, NotFound, Refused, StorkError
from drivers.names import VolName
from drivers.nbd import Extent
from worker import notify
from worker.app import app
from worker.context import StepContext
from worker.jobs import steps, usage
from worker.metrics import record_backup


def _store(ctx: StepContext) -> ChunkStore:
    """The job's backup storage, to read and keep (restore, verify, prune, gc): nothing made."""
    return backup_storage(ctx.cfg.storage(ctx.params["store"])).open()


def backup_guest(ctx: StepContext) -> None:
    """Read the guest's config and every disk into one snapshot."""
    store, vmid = backup_storage(ctx.cfg.storage(ctx.params["store"])).open_for_backup(), ctx.params["vmid"]
    if (done := ctx.data.get("backup")) and store.exists(done):  # committed before the process died
        store.fail_for_lost(done)  # perhaps before its writer looked at its chunks
        if warnings := _report(ctx, store, done):
            ctx.set_result(warning="; ".join(warnings))
        return
    guest = ctx.guests.read(vmid)
    disks = {key: (volid, *ctx.volume(volid)) for key, volid in ctx.params["volumes"].items()}
    total = sum(drv.virtual_size(vol) for _, drv, vol in disks.values())
    before = 0
    listing = store.listing()  # once: each listing reads every manifest in the store
    known = listing.snapshots  # what a disk may build on; a damaged snapshot is not among them
    unread: list[str] = []  # earlier backups a disk could not build on, a time past the clock: said in the result
    if "time" not in ctx.data:  # kept: a redelivered step writes the same snapshot
        ctx.data["time"] = format_time(_backup_time(listing.ids, vmid))
        ctx.save()
    if parse_time(ctx.data["time"]) > datetime.now(UTC) + retention.AHEAD:
        unread.append(f"dated {ctx.data['time']}, after an earlier backup dated past this node's clock (its node's "
                      "clock ran ahead): prune keeps every backup of this guest until that time has come")
    with store.begin(vmid, parse_time(ctx.data["time"]), ctx.params.get("notes", "")) as writer:
        reads = {}
        for key, (volid, drv, vol) in disks.items():
            parent = drv.parent_of(vol)
            found = _readable_base(store, known, drv.volid(parent), drv.identity(parent), unread) if parent else None
            bitmapped = vol.fmt == "qcow2" and not vol.is_base  # only these have dirty bitmaps to read by
            # this disk's newest backup here: what its bitmap's changes lie over
            previous = _readable_base(store, known, volid, drv.identity(vol), unread) if bitmapped else None
            dirty, reads[key] = _changes_since(ctx, drv, vol, previous)

            def progress(done: int, _size: int, offset: int = before, what: str = f"{key}: {volid}") -> None:
                ctx.progress(offset + done, total, what)

            with drv.image(vol) as image:
                index = back_up(image, vol.fmt, writer, *(found or (None, None)), progress=progress,
                                previous=previous[1] if previous and dirty is not None else None, dirty=dirty)
            writer.add_index(key, index, source=volid, identity=drv.identity(vol))
            faults.point("backed-up")
            before += index.virtual_size
        writer.add_blob("guest.conf", guests.dumps(guest.with_(lock="", lock_job="", rev="")).encode())
        ctx.data["backup"] = str(writer.id)
        ctx.save()
        writer.commit()
    faults.point("committed")
    warnings = unread + [w for _, drv, vol in disks.values() if (w := _drop_older_bitmaps(ctx, drv, vol))]
    warnings += _report(ctx, store, ctx.data["backup"], reads)
    if warnings:
        ctx.set_result(warning="; ".join(warnings))


def _readable_base(store: ChunkStore, known: list[Snapshot], volid: str, identity: str,
                   unread: list[str]) -> tuple[BaseRef, Index] | None:
    """find_base; None where the index it finds cannot be read (damaged, or gone): a backup
    builds only on what it can read, so that disk is read whole, and `unread` says why, rather
    than one damaged backup stopping every later backup of the disk and of its clones."""
    try:
        return find_base(store, known, volid, identity)
    except (Corrupt, NotFound, Refused) as e:  # Refused: not a file it reads (a symlink), or a newer stork's format
        unread.append(f"{volid} read whole, not built on its earlier backup: {e}")
        return None


def _backup_time(ids: list[BackupId], vmid: int) -> datetime:
    """Now, to the second; or a second after the guest's newest backup (damaged or not), if that
    is not older (two backups in one second would have one id; a guest's backups run one at a time)."""
    now = datetime.now(UTC).replace(microsecond=0)
    newest = max((id.time for id in ids if id.vmid == vmid), default=None)
    return max(now, newest + timedelta(seconds=1)) if newest else now


def _report(ctx: StepContext, store: ChunkStore, made: str, reads: dict[str, str] | None = None) -> list[str]:
    """The backup's result; the warning where it was recorded failed at its commit (a chunk it
    reused set aside by a verify meanwhile), which then does not count as the guest's last backup."""
    snapshot = store.snapshot(made)
    manifest = snapshot.manifest
    ctx.set_result(backup=made, storage=ctx.params["store"], size=manifest.size, written=manifest.written,
                   **({"reads": reads} if reads else {}))
    if (verify := snapshot.state.verify) is not None and not verify.ok:
        return [f"recorded failed: {len(verify.problems)} chunk(s) it names were found damaged by a verify while it "
                "ran; the next backup stores them again"]
    record_backup(ctx.r, ctx.params["vmid"], ctx.params["store"], manifest)  # for the metrics endpoint
    return []


# ---- persistent dirty bitmaps: what changed since this disk's previous backup ----------------


def bitmap_name(store: str, time_text: str) -> str:
    """The bitmap a backup into `store` at `time_text` adds to a qcow2 disk: it records every
    write from that backup on. One per backup storage, so a backup to another storage does
    not hide changes from this one's next backup."""
    return f"stork-{store}-{time_text.replace('-', '').replace(':', '')}"


def incremental_refusal(marks: dict[str, list[str]], expected: str | None) -> str | None:
    """Why the disk cannot be read incrementally (None: it can). `expected` is the bitmap the
    previous backup of this disk into this storage added; `marks` the disk's bitmaps."""
    if expected is None:
        return "no earlier backup of this disk in this storage"
    if expected not in marks:
        return f"no dirty bitmap {expected} (added by the earlier backup)"
    if "in-use" in marks[expected]:
        return f"dirty bitmap {expected} is in use (the image was not closed cleanly)"
    if "auto" not in marks[expected]:
        return f"dirty bitmap {expected} is disabled (it may not hold every write since)"
    return None


def _changes_since(ctx: StepContext, drv: Driver, vol: VolName,
                   previous: tuple[BaseRef, Index] | None) -> tuple[list[Extent] | None, str]:
    """For a writable qcow2 disk: the dirty extents since its previous backup here (None for a
    full read) and a line saying which; the bitmap for the next backup added before any read."""
    if vol.fmt != "qcow2" or vol.is_base:
        return None, "full read (only a writable qcow2 disk has dirty bitmaps)"
    if theirs := _used_outside(drv, vol):
        return None, f"full read (stork adds no dirty bitmap to a disk {theirs})"
    try:
        return _through_bitmap(ctx, drv, vol, previous)
    except Refused as e:  # not to be written (a volume with a hard link): read whole, and not marked
        return None, f"full read (no dirty bitmap added: {e})"


def _through_bitmap(ctx: StepContext, drv: Driver, vol: VolName,
                    previous: tuple[BaseRef, Index] | None) -> tuple[list[Extent] | None, str]:
    store = ctx.params["store"]
    expected = bitmap_name(store, previous[0].backup.rpartition("/")[2]) if previous else None
    with drv.image(vol, write=True) as image:
        marks = qemu.bitmaps(image)
        if marks is None:  # every backup of it is a full read, not a failure
            return None, ("full read (a qcow2 v2 image holds no dirty bitmaps: 'qemu-img amend -o compat=1.1' "
                          "upgrades it)")
        now = bitmap_name(store, ctx.data["time"])
        if now not in marks:  # first: a write from here on is in it, whatever happens next
            qemu.add_bitmap(image, now)
        why = incremental_refusal(marks, expected)
        if why is None and previous and previous[1].virtual_size != drv.virtual_size(vol):
            why = "the disk was resized since its earlier backup"
        if why is not None:
            return None, f"full read: {why}"
        assert expected is not None and previous is not None
        return nbd.dirty_extents(image, expected), f"incremental: what changed since {previous[0].backup}"


def _used_outside(drv: Driver, vol: VolName) -> str:
    """Whose the disk is besides stork's, if anyone's (a Proxmox VE guest may be running from
    it: stork only reads it); one that cannot be told counts as used."""
    try:
        found = drv.foreign_users(vol)
    except StorkError as e:
        return f"that may be in use outside stork ({e})"
    return f"in use by {', '.join(found)}" if found else ""


def _drop_older_bitmaps(ctx: StepContext, drv: Driver, vol: VolName) -> str | None:
    """After the commit: this storage's bitmaps of earlier backups go (the new one stays). The
    backup stands whatever happens here: a failure is a warning (the next backup drops them)."""
    if vol.fmt != "qcow2" or vol.is_base or _used_outside(drv, vol):
        return None
    ours = re.compile(rf"stork-{re.escape(ctx.params['store'])}-\d{{8}}T\d{{6}}Z")
    keep = bitmap_name(ctx.params["store"], ctx.data["time"])
    try:
        with drv.image(vol, write=True) as image:
            for name in qemu.bitmaps(image) or {}:
                if ours.fullmatch(name) and name != keep:
                    qemu.remove_bitmap(image, name)
    except (StorkError, OSError) as e:
        return f"{drv.volid(vol)}: older dirty bitmaps kept: {e}"
    return None


def restore_data(ctx: StepContext) -> None:
    """Write each disk's chunks into its allocated volume; a write interrupted by a crash is
    redone into the recreated volume (zero chunks are skipped on the assumption it is empty)."""
    store, backup_id = _store(ctx), ctx.params["backup"]
    restored: list[str] = ctx.data.setdefault("restored", [])
    total = sum(int(plan["size"]) for plan in ctx.params["disks"].values())
    offset = sum(int(ctx.params["disks"][key]["size"]) for key in restored)
    for key, plan in ctx.params["disks"].items():
        if key in restored:
            continue
        drv, dst = ctx.volume(ctx.data["made"][key])
        index = store.index(backup_id, key)
        relinked = "base" in plan and index.base is not None
        base = _base_index(store, index) if relinked else None
        reads_zero = drv.new_volumes_read_zero and not relinked  # a clone reads its base where not written
        if ctx.data.get("restoring") == key and not relinked:  # a relinked clone is rewritten whole-chunk
            with ctx.storage_lock(drv):
                ctx.fence(drv)
                drv.recreate(dst, int(plan["size"]))
        ctx.data["restoring"] = key
        ctx.save()

        def progress(done: int, _size: int, before: int = offset, what: str = f"{key}: {backup_id}") -> None:
            ctx.progress(before + done, total, what)

        with drv.image(dst, write=True) as image:
            restore(store, index, image, reads_zero, progress, base=base)
        faults.point("restored")
        offset += int(plan["size"])
        restored.append(key)
        ctx.data.pop("restoring")
        ctx.save()


def _base_index(store: ChunkStore, index: Index) -> Index | None:
    """The index of the base a relinked clone is restored over, to write only what differs;
    None if that backup was forgotten since the restore was planned, or cannot be read (damaged):
    then every chunk is written, zeros too, and the clone is as right, only not as thin."""
    assert index.base is not None
    try:
        return store.index(index.base.backup, index.base.disk)
    except (Corrupt, NotFound, Refused):
        return None


def reserve_restored(ctx: StepContext) -> None:
    """A new guest's config, locked by this job; nothing for a guest being replaced (--force),
    which LOCK_GUEST holds instead."""
    if not ctx.params.get("replace"):
        steps.reserve_guest(ctx)


def unreserve_restored(ctx: StepContext) -> None:
    if not ctx.params.get("replace"):  # never remove the guest being replaced
        steps.unreserve_guest(ctx)


def make_restored_bases(ctx: StepContext) -> None:
    """A template's disks come back as bases."""
    if ctx.params["template"]:
        steps.make_copies_bases(ctx)


def commit_restored(ctx: StepContext) -> None:
    """Register the restored guest (a template with its bases): the job's commit point. A
    guest replaced (--force) gets the restored disks; its old ones are kept as unused until
    FREE_REPLACED frees them, so none is ever unnamed."""
    if ctx.params.get("replace"):
        _replace_guest(ctx)
    elif ctx.params["template"]:
        steps.commit_template_copy(ctx)
    else:
        steps.commit_new_guest(ctx)


def _replace_guest(ctx: StepContext) -> None:
    vmid = ctx.params["new_vmid"]
    disks = {key: pair[1] for key, pair in ctx.data.get("based", {}).items()} or dict(ctx.data.get("made", {}))
    with ctx.guests.editing(vmid) as box:
        old = box[0]
        if old.lock_job != ctx.job.id:
            if "replaced" in ctx.data:
                return  # redelivered after it was done
            raise Refused(f"guest {vmid} is no longer locked by this job: not replaced")
        if "replaced" not in ctx.data:
            # the config names the restored disks already: an attempt before wrote it, and the
            # record of what it replaced was lost (a failover or a power loss took back the save).
            # Which unused entries were the old disks cannot be told: none is freed (kept as unused).
            # A disk in a slot the backup does not have (added since it was made) is not replaced:
            # it stays, as unused
            ctx.data["replaced"] = {} if old.disks == disks else {k: v for k, v in old.disks.items() if k in disks}
            ctx.save()
            if old.disks == disks and old.disks:
                ctx.set_result(warning=f"the replaced disks of guest {vmid} were not freed (the record of which they "
                                       "were was lost): they stay listed as unused")
        # decided by the config, not by the saved record: a step killed between the save and
        # this write finds the guest still naming its old disks, which FREE_REPLACED would free
        if old.disks != disks:
            name = ctx.params.get("name") or old.name
            kept = [v for k, v in old.disks.items() if k not in ctx.data["replaced"]]
            # still locked: FREE_REPLACED unlocks it once the old disks are freed
            box[0] = old.with_(disks=disks, template=ctx.params["template"], name=name,
                               unused=(*old.unused, *ctx.data["replaced"].values(), *kept))
            if kept:
                ctx.set_result(warning=f"kept as unused, not in the backup: {', '.join(kept)}")
    ctx.set_result(vmid=vmid, disks=disks, template=ctx.params["template"],
                   replaced=ctx.data.get("replaced", {}))


def free_replaced(ctx: StepContext) -> None:
    """Free the replaced guest's old disks and drop them from its unused list; one that cannot
    be freed (a base that linked clones read through) stays listed as unused, with a warning."""
    if not ctx.params.get("replace"):
        return
    vmid = ctx.params["new_vmid"]
    try:
        guest: guests.Guest | None = ctx.guests.read(vmid)
    except StorkError:
        guest = None
    if guest is not None and guest.lock_job != ctx.job.id:  # tried again after its config's write unlocked it
        if kept_before := [v for v in ctx.data.get("replaced", {}).values() if v in guest.unused]:
            ctx.set_result(warning=f"kept as unused: {'; '.join(kept_before)}")  # said again: that try's is lost
        return
    freed, kept = [], []
    try:  # fails closed: with a guest config unreadable, nothing is freed
        replaced = set(ctx.data.get("replaced", {}).values())
        others = {v for volid in replaced for g in ctx.guests.candidates(volid) if g.vmid != vmid
                  for v in (*g.disks.values(), *g.unused)}
    except StorkError as e:
        others, kept = set(ctx.data.get("replaced", {}).values()), [f"nothing freed: {e}"]
    # what the guest attaches is never freed, whatever the record says it replaced (cannot tell: none is)
    attached = set(guest.disks.values()) if guest is not None else set(ctx.data.get("replaced", {}).values())
    for key, volid in ctx.data.get("replaced", {}).items():
        try:
            drv, vol = ctx.volume(volid)
            with ctx.storage_lock(drv):
                if not steps.freed_before(ctx, drv, vol, key):  # (what holds the name since is not ours to check)
                    if volid in others:
                        raise Refused("another guest names it")
                    if volid in attached:
                        raise Refused(f"guest {vmid} attaches it")
                    usage.require_unused(ctx, volid, count_unused=False)  # the replaced guest keeps it as unused
                    steps.free_replaced_volume(ctx, drv, vol, key)  # refuses a base with linked clones
            freed.append(volid)
        except (StorkError, OSError) as e:
            kept.append(f"{volid}: {e}")
    with ctx.guests.editing(vmid) as box:
        if box[0].lock_job == ctx.job.id:
            box[0] = box[0].with_(unused=tuple(v for v in box[0].unused if v not in freed), lock="", lock_job="")
    if kept:  # after the commit's own warning (the disks the backup does not have), where it gave one
        said = ctx.job.result.get("warning")
        ctx.set_result(warning=f"{said + '; ' if said else ''}kept as unused: {'; '.join(kept)}")


# ---- keeping a backup storage: verify, prune, gc -------------------------------------------


def verify_backups(ctx: StepContext) -> None:
    """Read back every chunk of each backup named (all, where none is) and record the outcome
    in each; the job fails naming the first problem if any backup is damaged. With all, a
    backup whose manifest or state cannot be read counts as damaged and the others go on."""
    store = _store(ctx)
    listing = None if ctx.params["backups"] else store.listing()
    unreadable = listing.damaged if listing else []
    ids = ctx.params["backups"] or [str(s.id) for s in _due(listing.snapshots, ctx.params.get("reverify_after"))]
    states = {str(d.id): f"damaged: {d.reason}" for d in unreadable}
    damaged = [f"{d.id}: {d.reason}" for d in unreadable]
    for n, bid in enumerate(ids):
        try:
            result = store.verify(bid)
        except NotFound:  # of all listed, one a prune forgot since (one named by the user: its job fails)
            if listing is None or store.exists(bid):
                raise
            states[bid] = "forgotten meanwhile"
            ctx.progress(n + 1, len(ids), bid)
            continue
        states[bid] = result.state
        if not result.ok:
            why = f"{result.problems[0]}" + (f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1
                                             else "")
            states[bid] = f"{result.state}: {why}"  # each damaged backup named with its first problem
            damaged.append(f"{bid}: {why}")
        ctx.progress(n + 1, len(ids), bid)
    ctx.set_result(verified=states)
    if damaged:
        summary = f"{len(damaged)} of {len(states)} backup(s) damaged in storage {ctx.params['store']}: {damaged[0]}"
        notify.announce(ctx.cfg, app, notify.event("backup-damaged", summary[:300], storage=ctx.params["store"],
                                                   damaged=damaged, job=ctx.job.id))
        raise Corrupt(f"{len(damaged)} of {len(states)} backup(s) damaged: {damaged[0]}")


def _due(snapshots: list[Snapshot], days: int | None, now: datetime | None = None) -> list[Snapshot]:
    """The snapshots to verify: all, or with `days`, those not verified sound within that many days."""
    if days is None:
        return snapshots
    since = (now or datetime.now(UTC)) - timedelta(days=days)
    return [s for s in snapshots
            if not (s.state.verify and s.state.verify.ok and parse_time(s.state.verify.time) >= since)]


def prune_backups(ctx: StepContext) -> None:
    """Apply the retention to each guest's backups (one guest's, if named): forget what it
    does not keep, or only say so on a dry run."""
    vmid = ctx.params.get("vmid")
    ctx.set_result(**_prune(_store(ctx), Keep(**ctx.params["keep"]), {vmid} if vmid is not None else None,
                            ctx.params["dry_run"], _readers_of(ctx, ctx.params["store"])))


def _readers_of(ctx: StepContext, store: str) -> Callable[[str], str]:
    """Why a backup of `store` is kept from a forget: a live job (a restore) reads it."""
    return lambda backup: usage.backup_readers(ctx.r, store, backup)


def _prune(store: ChunkStore, keep: Keep, vmids: set[int] | None, dry_run: bool,
           held: Callable[[str], str]) -> dict[str, Any]:
    """The retention applied to each guest's backups (of `vmids`, where given): the decisions,
    how many were removed, and those protected since the listing (kept, and the others go on).
    Each guest's backups are decided again, and forgotten, under the guest's lock, on their
    states as they stand then (ChunkStore.forget_chosen); a dry run decides on the listing."""
    listing = store.listing(next(iter(vmids)) if vmids and len(vmids) == 1 else None)  # once: it reads manifests
    guests = sorted({s.id.vmid for s in listing.snapshots if vmids is None or s.id.vmid in vmids})
    decisions: list[dict[str, Any]] = []
    removed, skipped = 0, {}  # kept against the retention: protected since the listing, read by a job
    for guest in guests:
        decided: list[retention.Decision] = []

        def choose(now: Listing, decided: list[retention.Decision] = decided) -> list[str]:
            decided[:] = retention.plan([retention.candidate(s) for s in now.snapshots], keep)
            return [d.id for d in decided if not d.keep]

        if dry_run:  # a backup a job reads is said kept there too, as the forget would keep it
            choose(Listing([s for s in listing.snapshots if s.id.vmid == guest], []))
            skipped |= {d.id: f"backup {d.id} is {why}" for d in decided if not d.keep and (why := held(d.id))}
        else:
            forgotten, refused = store.forget_chosen(guest, choose, held)
            removed, skipped = removed + len(forgotten), {**skipped, **refused}
        decisions += [{"id": d.id, "keep": True, "reason": f"kept: {skipped[d.id]}"} if d.id in skipped else
                      {"id": d.id, "keep": d.keep, "reason": d.reason} for d in decided]
    # a damaged backup is neither counted nor removed: whether it is protected cannot be read
    decisions += [{"id": str(d.id), "keep": True, "reason": f"damaged, kept: {d.reason}"}
                  for d in listing.damaged if vmids is None or d.id.vmid in vmids]
    if dry_run:
        removed = sum(not d["keep"] for d in decisions)
    return {"decisions": decisions, "removed": removed, "dry_run": dry_run,
            **({"warning": f"kept: {'; '.join(f'{id}: {why}' for id, why in skipped.items())}"} if skipped else {})}


def sync_backups(ctx: StepContext) -> None:
    """Copy the backups of the source storage (of the guests named, or all) that the target
    lacks, only the chunks it lacks; then, with a retention, prune the target. The job fails
    naming the first backup that could not be copied, once the others are."""
    source = _store(ctx)
    target = backup_storage(ctx.cfg.storage(ctx.params["target"])).open_for_backup()
    vmids, keep = set(ctx.params["vmids"]) or None, Keep(**ctx.params["keep"])
    result = sync(source, target, vmids, progress=lambda done, total, what: ctx.progress(done, total, what),
                  keep=keep, reencrypt=ctx.params.get("reencrypt", False))
    ctx.set_result(copied=result.copied, present=result.present, mended=result.mended, written=result.written,
                   **({"gone": result.gone} if result.gone else {}))
    if keep.keeps_something:
        pruned = _prune(target, keep, vmids, dry_run=False, held=_readers_of(ctx, ctx.params["target"]))
        ctx.set_result(pruned=pruned["removed"], **({"warning": pruned["warning"]} if "warning" in pruned else {}))
    if result.failed:
        first = next(iter(result.failed.items()))
        raise Corrupt(f"{len(result.failed)} backup(s) not copied: {first[0]}: {first[1]}")


def collect_garbage(ctx: StepContext) -> None:
    """Remove the chunks no backup refers to (safe while backups run: see ChunkStore.gc)."""
    result = _store(ctx).gc()
    ctx.set_result(chunks_removed=result.chunks_removed, bytes_removed=result.bytes_removed,
                   chunks_kept=result.chunks_kept, partials_removed=result.partials_removed,
                   bad_chunks_removed=result.bad_chunks_removed, bad_chunks_restored=result.bad_chunks_restored,
                   chunks_too_new=result.chunks_too_new,
                   removable_after=result.removable_after)
