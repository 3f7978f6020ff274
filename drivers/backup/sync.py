"""Offsite copies: snapshots copied from one chunk store to another, as Proxmox Backup Server's
sync jobs and restic's `copy` do.

Only the chunks the target lacks travel, as stored (so both stores must have the same key, or
none, and the same chunk size; or, asked to re-encrypt, each chunk is read under the source's
key and sealed under the target's); each is checked as it lands (it must decode to its digest with
the target's key), and a snapshot appears in the target only whole, through the target's own
snapshot writer. A sync that is killed leaves a partial folder the target's gc removes; run
again, it finds the chunks that landed already and copies only the rest. A snapshot the
target holds is not copied again; one the source cannot read is named, never copied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from drivers import faults
from drivers.backup.records import MAX_NOTES, Index, Patch, Snapshot, check_notes, index_key
from drivers.backup.retention import Candidate, Keep, candidate, plan
from drivers.backup.store import ChunkStore, SnapshotWriter
from drivers.errors import AlreadyExists, Corrupt, InvalidName, NotFound, Refused

Progress = Callable[[int, int, str], None]  # (snapshots done, snapshots in all, the one at hand)


@dataclass
class SyncResult:
    copied: list[str] = field(default_factory=list)  # snapshot ids now in the target
    present: int = 0  # snapshots the target held already
    mended: list[str] = field(default_factory=list)  # copies the target recorded failed, now whole and verified
    written: int = 0  # bytes of chunk files written into the target
    failed: dict[str, str] = field(default_factory=dict)  # snapshot id -> why it was not copied
    gone: list[str] = field(default_factory=list)  # forgotten in the source after the listing: not copied


def check_pair(source: ChunkStore, target: ChunkStore, reencrypt: bool = False) -> None:
    """Refuse two stores whose chunk files cannot be copied as they are, unless `reencrypt`
    (each chunk decoded under the source's key and sealed under the target's); never into a
    store without a key from one with a key (the backups would lose their encryption)."""
    if source.root.resolve() == target.root.resolve():
        raise Refused(f"backup storage {source.root}: a sync needs two stores, not one")
    if source.chunk_size != target.chunk_size:
        raise Refused(f"backup storages {source.root} and {target.root} have other chunk sizes")
    if source.codec.fingerprint == target.codec.fingerprint:
        return
    keys = " and ".join(f"{s.root} ({f'key {s.codec.fingerprint}' if s.codec.fingerprint else 'no key'})"
                        for s in (source, target))
    if not reencrypt:
        raise Refused(f"backup storages {keys} do not have the same key: a sync copies chunks as they are stored "
                      "(--reencrypt seals each anew under the target's key)")
    if target.codec.fingerprint is None:
        raise Refused(f"backup storages {keys}: a sync never copies encrypted backups into a store without a key")


def sync(source: ChunkStore, target: ChunkStore, vmids: set[int] | None = None,
         progress: Progress | None = None, keep: Keep | None = None, reencrypt: bool = False) -> SyncResult:
    """Copy every snapshot of `source` (of the guests `vmids`, where given) that `target` lacks;
    with `keep`, only those the retention keeps among the source's and the target's together
    (what a prune of the target would remove right after is not copied)."""
    check_pair(source, target, reencrypt)
    reseal = source.codec.fingerprint != target.codec.fingerprint
    listing = source.listing()
    wanted = [s for s in listing.snapshots if vmids is None or s.id.vmid in vmids]
    if keep is not None and keep.keeps_something:
        kept = retained([*wanted, *target.snapshots()], keep)
        # one whose verify failed is kept where it is but not copied: the copy would count as sound there
        wanted = [s for s in wanted if str(s.id) in kept and not candidate(s).failed]
    result = SyncResult(failed={str(d.id): f"not read: {d.reason}" for d in listing.damaged
                                if vmids is None or d.id.vmid in vmids})
    there = target.listing()
    held = {str(s.id): s for s in there.snapshots}
    unreadable = {str(d.id): d.reason for d in there.damaged}
    for n, snapshot in enumerate(wanted):
        id = str(snapshot.id)
        if id in held and same_backup(snapshot, held[id], reseal):
            _count_held(result, source, target, snapshot, held[id], reseal)
        elif id in held or id in unreadable:  # made there, or synced from another store with a clashing guest id
            result.failed[id] = (f"the target's backup under this id cannot be read: {unreadable[id]}" if id in
                                 unreadable else "the target holds another backup under this id (its config or "
                                 "disks differ): not copied")
        else:
            try:
                made = copy_snapshot(source, target, snapshot, reseal)
                result.written += made.manifest.written
                if candidate(made).failed:  # recorded so at its commit: a chunk set aside meanwhile
                    result.failed[id] = "its copy is recorded failed in the target: a chunk it names was found " \
                                        "damaged there meanwhile (the next sync writes it again)"
                else:
                    result.copied.append(id)
            except AlreadyExists:  # another sync copied it meanwhile, or a backup was made there under the id
                _present_or_other(result, source, snapshot, target, reseal)
            except NotFound as e:
                if source.exists(id):
                    result.failed[id] = str(e)  # a file of it missing: its own damage
                else:
                    result.gone.append(id)  # forgotten in the source since the listing (a prune): nothing to copy
            except (Corrupt, Refused, InvalidName) as e:  # its own damage (or a symlink): the others go on
                result.failed[str(snapshot.id)] = str(e)
        if progress:
            progress(n + 1, len(wanted), str(snapshot.id))
    return result


def _present_or_other(result: SyncResult, source: ChunkStore, snapshot: Snapshot, target: ChunkStore,
                      reseal: bool) -> None:
    """Count a snapshot the target came to hold meanwhile as present, where it is a copy (mended
    first, where it is recorded failed)."""
    id = str(snapshot.id)
    try:
        if same_backup(snapshot, theirs := target.snapshot(id), reseal):
            _count_held(result, source, target, snapshot, theirs, reseal)
            return
        result.failed[id] = "the target holds another backup under this id (made meanwhile): not copied"
    except (Corrupt, NotFound, Refused) as e:
        result.failed[id] = f"the target's backup under this id cannot be read: {e}"


def _count_held(result: SyncResult, source: ChunkStore, target: ChunkStore, snapshot: Snapshot, copy: Snapshot,
                reseal: bool) -> None:
    """The target's copy of `snapshot`: present; or, where it is recorded failed, mended (counted
    present, it would stand for an offsite copy that does not restore)."""
    if candidate(copy).failed:
        _mend(result, source, target, snapshot, reseal)
    else:
        result.present += 1


def _mend(result: SyncResult, source: ChunkStore, target: ChunkStore, snapshot: Snapshot, reseal: bool) -> None:
    """A copy the target records failed (a verify there found chunks it names damaged or
    missing): each chunk it lacks written again from the source, then the copy verified there,
    which records it sound again. As Proxmox Backup Server's resync of corrupt snapshots, but
    the copy stays where it is meanwhile: it is only ever added to."""
    id = str(snapshot.id)
    try:
        result.written += _write_missing(source, target, id, snapshot, reseal)
        verdict = target.verify(id)
        if not verdict.ok:  # a chunk there but damaged (a verify killed before it set it aside): aside now;
            result.written += _write_missing(source, target, id, snapshot, reseal)  # or a read error that passed
            verdict = target.verify(id)
    except (Corrupt, NotFound, Refused, InvalidName) as e:
        result.failed[id] = f"its copy in the target is recorded failed and could not be mended from here: {e}"
        return
    if verdict.ok:
        result.mended.append(id)
    else:
        result.failed[id] = (f"its copy in the target is recorded failed and is still damaged after a mend from here: "
                             f"{verdict.problems[0].error} ('stork backup forget' that copy, and the next sync copies "
                             "it again)")


def _write_missing(source: ChunkStore, target: ChunkStore, id: str, snapshot: Snapshot, reseal: bool) -> int:
    """Write again, from the source, each chunk the target's copy names that the target lacks,
    durably (before a verify's "ok" points at them): the bytes written."""
    written, prefixes = 0, set()
    for key in snapshot.manifest.disks:
        pairs = _chunk_pairs(source.index(id, key), target.index(id, key))
        for digest in target.missing_chunks(pairs):
            written += _put_again(source, target, digest, pairs[digest], reseal)
            prefixes.add(digest[:4])
    target.flush_chunk_folders(prefixes)
    return written


def _chunk_pairs(source: Index, target: Index) -> dict[str, str]:
    """Each chunk the target's index names -> the source's chunk at the same place (the same
    digest, unless the copy was re-encrypted); Corrupt where the two are not laid out alike."""
    pairs: dict[str, str] = {}
    mine, theirs = list(source.digests()), list(target.digests())
    if len(mine) != len(theirs) or any(a[0] != b[0] for a, b in zip(mine, theirs, strict=True)):
        raise Corrupt("its index in the target does not lay out its chunks as the source's does")
    for (_, here), (_, there) in zip(mine, theirs, strict=True):
        if pairs.setdefault(there, here) != here:
            raise Corrupt(f"chunk {there}: stands for two chunks of the source")
    return pairs


def _put_again(source: ChunkStore, target: ChunkStore, digest: str, from_digest: str, reseal: bool) -> int:
    """Chunk `digest` of the target written again from the source's `from_digest`: bytes written."""
    if not reseal:
        return target.put_stored(digest, source.read_stored(from_digest))
    made, written = target.put_chunk(source.read_chunk(from_digest))
    if made != digest:
        raise Corrupt(f"chunk {digest}: the source's data at its place seals under another name ({made})")
    return written


def same_backup(source: Snapshot, target: Snapshot, resealed: bool) -> bool:
    """Is the target's snapshot under this id a copy of the source's: the same blobs (a guest
    config is copied as it is), the same disks and sizes, and, where chunks keep their names
    (no re-encryption), the same data?"""
    mine, theirs = source.manifest, target.manifest
    blobs = {name: s for name, s in mine.files.items() if index_key(name) is None}
    return blobs == {name: s for name, s in theirs.files.items() if index_key(name) is None} and \
        mine.disks.keys() == theirs.disks.keys() and \
        all(d.virtual_size == theirs.disks[k].virtual_size and (resealed or d.content == theirs.disks[k].content)
            for k, d in mine.disks.items())


def retained(snapshots: list[Snapshot], keep: Keep) -> set[str]:
    """The ids the retention keeps, guest by guest (a snapshot in both stores counted once, as
    the first listed: the source's)."""
    by_guest: dict[int, dict[str, Candidate]] = {}
    for s in snapshots:
        by_guest.setdefault(s.id.vmid, {}).setdefault(str(s.id), candidate(s))
    return {d.id for guest in by_guest.values() for d in plan(list(guest.values()), keep) if d.keep}


def copy_snapshot(source: ChunkStore, target: ChunkStore, snapshot: Snapshot, reseal: bool = False) -> Snapshot:
    """One snapshot into `target` (its chunks, indexes, blobs and notes), as committed there.
    With `reseal`, each chunk is decoded under the source's key and stored under the target's,
    so its name (a keyed hash) changes, and the index names the new ones."""
    id = str(snapshot.id)
    with target.begin(snapshot.id.vmid, snapshot.id.time, notes=_notes(snapshot.state.notes)) as writer:
        writer.made = snapshot.manifest.started  # when it was made: what the retention's periods may take
        for key, disk in snapshot.manifest.disks.items():
            index = source.index(id, key)  # checked against the source's manifest
            if reseal:
                index = _resealed(index, source, writer)
            for digest in dict.fromkeys(d for _, d in index.digests()):
                if not reseal and not writer.reuse_chunk(digest):
                    writer.put_stored(digest, source.read_stored(digest))
                    faults.point("synced-chunk")
            writer.add_index(key, index, source=disk.source, identity=disk.identity)
        for name in snapshot.manifest.files:
            if index_key(name) is None:
                writer.add_blob(name, source.read_blob(id, name))
        return writer.commit()


def _resealed(index: Index, source: ChunkStore, writer: SnapshotWriter) -> Index:
    """The index with each chunk stored under the target's key (read and checked under the
    source's), named by its new name; a patch's two chunks too."""
    names: dict[str, str] = {}

    def anew(digest: str | None) -> str | None:
        if digest is not None and digest not in names:
            new, _ = writer.put_chunk(source.read_chunk(digest))
            assert new is not None  # a stored chunk is never all zeros: those are not stored
            names[digest] = new
            faults.point("synced-chunk")
        return None if digest is None else names[digest]

    return replace(index, chunks=[Patch(anew(e.base), anew(e.own), e.runs) if isinstance(e, Patch) else anew(e)
                                  for e in index.chunks])


def _notes(notes: str) -> str:
    """Notes as the target takes them: those an older stork (or a hand) wrote may hold what
    today's check refuses (a line break, a control character, more than MAX_NOTES characters)."""
    try:
        return check_notes(notes)
    except InvalidName:
        return " ".join("".join(c if c.isprintable() else " " for c in notes).split())[:MAX_NOTES]
