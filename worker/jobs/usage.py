"""Which volumes are in use, and by whom: asked under a volume's storage lock before anything
frees, renames or overwrites it.

A volume is in use when a guest config names it or when a job that has not ended reads,
makes or renames it (a full clone's target mid-copy belongs to no guest yet, and a template's
bases are read by every full clone of it). The check fails closed: a guest config or a job
record that cannot be read might name the volume, so the answer is "refused", naming what
could not be read.

Names a job is about to create are also *claimed* (`stork:claims:<storage>`, volname -> job
id) before they are created and until the job ends: no other job picks a claimed name, so
a redelivered step that finds its pending name present and claimed by its own job knows it
made that volume before its process died.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import redis

from drivers import driver_for, names
from drivers.backends.base import Driver
from drivers.errors import NotFound, Refused, StorageUnavailable, StorkError
from drivers.guests import Guest
from drivers.names import VolName
from worker import records
from worker.context import StepContext
from worker.jobs import params
from worker.records import JobRecord


def job_volumes(job: JobRecord) -> set[str]:
    """Every volume id a job reads, makes or renames, from its params and what it made (both
    checked against their schemas by the worker, worker/jobs/params.py, before any step uses them)."""
    return records.params_volumes(job.params) | records.ctx_volumes(job.ctx)


def backup_readers(r: redis.Redis, store: str, backup: str) -> str:
    """The live jobs that read a backup (a restore), as a reason to keep it, to follow "backup
    <id> is" ("" for none): a prune or forget would take it from under them, and gc its chunks.
    One whose record cannot be read may be one."""
    ref = records.backup_ref(store, backup)
    try:
        readers = [f"job {j.id} ({j.kind})" for j in _jobs_naming(r, ref) if ref in records.params_volumes(j.params)]
    except Refused as e:
        return f"kept: {e}"
    return f"read by {', '.join(readers)} now: forget it once that ended" if readers else ""


def candidates(ctx: StepContext, volid: str) -> list[Guest]:
    """The guests whose configs may name `volid` (GuestStore.candidates, a superset); Refused
    when they cannot be told."""
    try:
        return ctx.guests.candidates(volid)
    except StorkError as e:
        raise Refused(f"cannot tell whether {volid} is in use: {e}") from None


def named_here(guest: Guest, volid: str, node: str, shared: bool, unused: bool = True,
               replicas: bool = True) -> list[str]:
    """Where `guest`'s config names the volume `volid` is on `node`: its disk keys, "unused"
    (with `unused`), "replica" (with `replicas`). On a storage each node has its own of (not
    `shared`: `local`), one id names a volume on every node: a guest's disks and unused volumes
    are those on its own node, a replica is the one on the node its record names. Only where
    the storage truly is each node's own: one declared so that is one folder for all (an NFS
    export without `shared = true`) would make a guest's disk look unused from another node."""
    here = shared or guest.node == node
    keys = [key for key, v in guest.disks.items() if v == volid and here]
    if unused and here and volid in guest.unused:
        keys.append("unused")
    if replicas and volid in guest.replicas and (shared or guest.replicas[volid].get("node") == node):
        keys.append("replica")
    return keys


def guest_users(ctx: StepContext, volid: str, count_unused: bool = True, but: int | None = None,
                outside: bool = True, guests: list[Guest] | None = None, count_replicas: bool = True) -> list[str]:
    """Guests, besides those this job holds (and `but`), that attach `volid`, or, with
    count_unused, keep it as unused, or, with count_replicas, record it as a replica of their
    bases (only `volume free`, which then drops it from them, frees one that is): those the
    guest volume index names (`candidates`, or the `guests` a caller read so), each confirmed
    by its config; and, with `outside`, guests of another manager its storage knows of (Proxmox
    VE's, whose configs name a volume in every way, unused ones too: stork leaves such a volume
    as it is). A guest of any node counts, also on a storage each node has its own of: a
    storage declared so that is in truth one for all must not let a guest's disk go."""
    if guests is None:
        guests = candidates(ctx, volid)
    found = foreign_users(ctx, volid) if outside else []
    return [
        f"guest {g.vmid} ({key})"
        for g in guests if g.lock_job != ctx.job.id and g.vmid != but
        for key, v in [*g.disks.items(), *((("unused", u) for u in g.unused) if count_unused else ()),
                       *((("replica", r) for r in g.replicas) if count_replicas else ())]
        if v == volid
    ] + found


def require_named_once(guest: Guest, volid: str, key: str) -> None:
    """Refuse where the guest's config names `volid` elsewhere than its disk `key` (another slot,
    hand-edited; unused; a replica): removing that disk must not free what the guest still uses."""
    also = [k for k, v in guest.disks.items() if v == volid and k != key] + \
        (["unused"] if volid in guest.unused else []) + (["replica"] if volid in guest.replicas else [])
    if also:
        raise Refused(f"guest {guest.vmid} names {volid} also as {', '.join(also)}: edit its config so that one "
                      "slot names it, then remove that one")


def held_guest_users(ctx: StepContext, volid: str, guests: list[Guest] | None = None) -> list[str]:
    """The guests this job holds (locked by it) that attach `volid`. An undo never frees or
    renames such a volume: a commit that wrote its config and then failed (a directory's fsync,
    say), or whose step was tried too often, is undone without its write taken back (restore
    --force keeps its guest locked past its commit), and the guest would name a volume gone.
    Only the volume of that id on the guest's node: a migration's copy on the target node may
    have its original's name, which a job can make only where the target's storage is not the
    source's (there the name is taken), so this holds also for a storage misdeclared as each
    node's own."""
    shared = ctx.cfg.storage(names.volume_id(volid).storage).shared
    return [f"guest {g.vmid} ({key}), held by this job"
            for g in (candidates(ctx, volid) if guests is None else guests) if g.lock_job == ctx.job.id
            for key in named_here(g, volid, ctx.node, shared, unused=False, replicas=False)]


def foreign_users(ctx: StepContext, volid: str) -> list[str]:
    """Users of `volid` outside stork that its storage knows of (Driver.foreign_users); Refused
    when they cannot be told."""
    try:
        vid = names.volume_id(volid)
        drv = driver_for(ctx.cfg.storage(vid.storage))
        return drv.foreign_users(drv.parse_volname(vid.volname))
    except StorageUnavailable:
        raise  # for now (configs moving while read): a step fails, an undo is tried again later
    except StorkError as e:
        raise Refused(f"cannot tell whether {volid} is in use: {e}") from None


def foreign_folder(storage: str, owner: int, whose: str) -> str:
    """Why a volume of guest `owner` is not made on `storage`: another manager's guest of that id."""
    return (f"guest id {owner} is {whose}: a volume of stork's for guest {owner} on storage {storage!r} would be "
            "in that guest's folder")


def _other_jobs_naming(ctx: StepContext, volid: str) -> list[JobRecord]:
    """Jobs, besides this one, that have not ended and whose records may name `volid`."""
    return _jobs_naming(ctx.r, volid, but=ctx.job.id)


def _jobs_naming(r: redis.Redis, volid: str, but: str | None = None) -> list[JobRecord]:
    """Jobs (but `but`) that have not ended and whose records may name `volid` (the volume's
    index, records.candidates; a backup by records.backup_ref), each record checked: one that
    cannot be read might name it, so the answer is Refused."""
    try:
        jobs = records.load_many(r, [j for j in records.candidates(r, volid) if j != but])
        for job in jobs:
            params.check_record(job)
    except StorkError as e:
        raise Refused(f"cannot tell whether {volid} is in use: {e}") from None
    return jobs


def job_users(ctx: StepContext, volid: str) -> list[str]:
    """Jobs, besides this one, that have not ended and read, make or rename `volid`, each
    confirmed by its record."""
    return [f"job {job.id} ({job.kind})" for job in _other_jobs_naming(ctx, volid) if volid in job_volumes(job)]


def require_base_made(ctx: StepContext, base_volid: str) -> None:
    """Refuse to read through, or attach, a base that a job made which may still rename it
    back to the disk it was: one that has not ended nor passed its commit (every kind makes
    its bases before its commit, and nothing at or before a commit is undone). A linked clone
    or a template naming it would lose it."""
    def may_rename_back(job: JobRecord) -> bool:
        kind = ctx.kinds.get(job.kind)
        return kind is None or not kind.committed(job.done)

    if makers := [job for job in _other_jobs_naming(ctx, base_volid)
                  if any(pair[1] == base_volid for pair in (job.ctx.get("based") or {}).values())
                  and may_rename_back(job)]:
        raise Refused(f"{base_volid} is being made a base by job {makers[0].id} ({makers[0].kind}): "
                      "use it once that job has ended")


def users(ctx: StepContext, volid: str, count_unused: bool = True, but: int | None = None,
          guests: list[Guest] | None = None, count_replicas: bool = True) -> list[str]:
    """Who uses `volid`: guests (see guest_users) and jobs that have not ended."""
    return guest_users(ctx, volid, count_unused, but, guests=guests, count_replicas=count_replicas) + \
        job_users(ctx, volid)


def require_unused(ctx: StepContext, volid: str, count_unused: bool = True, but: int | None = None,
                   guests: list[Guest] | None = None, count_replicas: bool = True) -> None:
    if found := users(ctx, volid, count_unused, but, guests, count_replicas):
        raise Refused(f"{volid} is in use by {', '.join(found)}")


def stale_replica_records(guests: Iterable[Guest], volid: str, node: str, shared: bool, identity: str) -> list[int]:
    """The guests recording `volid` as a replica on `node` whose replica it is no longer: the
    replica's own identity recorded, and the volume at the name another (the replica removed
    by hand, its name taken since). Such a volume is not theirs to free, nor to clone from."""
    return [g.vmid for g in guests if "replica" in named_here(g, volid, node, shared, unused=False)
            and g.replicas[volid].get("own_identity", identity) != identity]


def not_the_replica(volid: str, vmid: int) -> str:
    return (f"{volid} is not the replica guest {vmid} records (its name holds another volume since): not freed; "
            f"'stork volume free --forget {volid}' drops the record and leaves the volume")


def names_its_config_holds(ctx: StepContext, drv: Driver, owner: int) -> frozenset[str]:
    """The disk names (stems, any format) on `drv`'s storage that guest `owner`'s config names
    where it stands on this node (disks, unused, replicas). A new volume of that guest never
    takes one, though the storage lists nothing under it (its file system not mounted, a volume
    removed by hand): the guest would name one volume twice and, once the storage is back,
    write its new disk over its old one. Only its own config is read, as cheap as one file, and
    refused only where that one cannot be read. A volume this job renamed into a base is gone
    by its own doing: its name is free (`stork base` gives the guest a linked clone in its place)."""
    try:
        guest = ctx.guests.read(owner)
    except NotFound:
        return frozenset()
    renamed = {pair[0] for pair in ctx.data.get("based", {}).values()}
    found = set()
    for volid in guest.volumes() - renamed:
        vid = names.volume_id(volid)
        if vid.storage == drv.storage.id and named_here(guest, volid, ctx.node, drv.storage.shared):
            with contextlib.suppress(names.InvalidName):
                if (vol := drv.parse_volname(vid.volname)).owner == owner:
                    found.add(vol.name)
    return frozenset(found)


# ---- claims on names being made ---------------------------------------------------------


def _claims_key(storage: str) -> str:
    return f"stork:claims:{storage}"


def claim(r: redis.Redis, volid: str, job_id: str) -> None:
    vid = names.volume_id(volid)
    r.hset(_claims_key(vid.storage), vid.volname, job_id)


def claimed_by(r: redis.Redis, volid: str) -> str | None:
    vid = names.volume_id(volid)
    return r.hget(_claims_key(vid.storage), vid.volname)


def claimed_names(r: redis.Redis, storage: str, owner: int, except_job: str) -> frozenset[str]:
    """Disk names (stems) of `owner` on `storage` that other jobs have claimed."""
    taken = set()
    for volname, job_id in r.hgetall(_claims_key(storage)).items():
        if job_id != except_job and volname.startswith(f"{owner}/"):
            taken.add(volname.split("/", 1)[1].rsplit(".", 1)[0])
    return frozenset(taken)


# ARGV: triples of claims key, volname, job id; each claim is dropped only if that job still holds it.
_DROP = """
for i = 1, #ARGV, 3 do
  if redis.call('HGET', ARGV[i], ARGV[i + 1]) == ARGV[i + 2] then redis.call('HDEL', ARGV[i], ARGV[i + 1]) end
end
"""


def _drop(r: redis.Redis, claims: list[tuple[str, str, str]]) -> None:
    if claims:
        records.script(r, "_stork_drop_claims", _DROP)(args=[x for triple in claims for x in triple])


def release_claims(r: redis.Redis, job: JobRecord) -> None:
    """Drop the job's claims (it has ended: what it made is attached, in its result, or freed,
    and a name it renamed into base/ is settled)."""
    volids = {*(job.ctx.get("made") or {}).values(), *(job.ctx.get("pending") or {}).values(),
              *(job.ctx.get("linked") or {}).values(),
              *(pair[0] for pair in (job.ctx.get("based") or {}).values())}
    vids = [names.volume_id(v) for v in volids]
    _drop(r, [(_claims_key(v.storage), v.volname, job.id) for v in vids])


def prune_claims(r: redis.Redis, storages: Iterable[str]) -> int:
    """Drop claims of jobs that have ended (a process died between a job's end and its
    release_claims) on these storages; run by the sweep. The claims are read before the active
    set: a job is active before it claims anything, so a claim whose job is not active then is
    stale. (One hash per storage, read by name: no scan of the keyspace, which holds every job.)"""
    keys = [_claims_key(sid) for sid in storages]
    with r.pipeline(transaction=False) as p:
        for key in keys:
            p.hgetall(key)
        claimed = p.execute()
    active = set(records.active_ids(r))
    stale = [(key, volname, job_id) for key, claims in zip(keys, claimed, strict=True)
             for volname, job_id in claims.items() if job_id not in active]
    _drop(r, stale)
    return len(stale)


def require_base_unread(drv: Driver, vol: VolName, vmid: int) -> None:
    """Refuse to free guest `vmid`'s base while linked clones read through it (at submit, where
    the storage is on this node, and again in the step, under the storage lock)."""
    if vol.is_base and drv.exists(vol) and (readers := drv.readers_of(vol)):
        raise Refused(f"guest {vmid}: base {drv.volid(vol)} still has linked clones: {', '.join(readers)}")


def not_there(volids: list[str], what: str, forget: str) -> Refused:
    """The refusal of a disk remove or a destroy that finds no volume at `volids`: a storage not
    mounted reads as empty (a dir storage without is_mountpoint), and dropped, each name would
    go to the next new disk and the old one come back under it. `forget`: the command that
    drops them once they are gone for good."""
    return Refused(f"no volume at {', '.join(volids)} (a storage not mounted?): not {what}; {forget} drops "
                   f"{'them' if len(volids) > 1 else 'it'} once gone for good")
