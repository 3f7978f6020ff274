"""Offsite copies (drivers/backup/sync.py) between real chunk stores on real files: only what the
target lacks travels, the target ends equal chunk for chunk, damage in the source is named and
stops only its snapshot, stores of other keys are refused, and a sync killed mid-way (a real
process, SIGKILL at a fault point) is finished by the next one without copying again."""

from __future__ import annotations

import multiprocessing
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from drivers import faults
from drivers.backup.crypt import EncryptedCodec
from drivers.backup.datapath import DiskReader
from drivers.backup.retention import Keep
from drivers.backup.store import ChunkStore
from drivers.backup.sync import sync
from drivers.errors import Refused
from tests.backup.test_chunkstore import CS, HOUR, T0, back_up, chunk_path, noise

FORK = multiprocessing.get_context("fork")


def stores(tmp_path: Path, key: bytes | None = None, other_key: bytes | None = None) -> tuple[ChunkStore, ChunkStore]:
    made = []
    for name, k in (("here", key), ("offsite", other_key if other_key is not None else key)):
        (tmp_path / name).mkdir(parents=True)
        made.append(ChunkStore(tmp_path / name, chunk_size=CS, codec=EncryptedCodec(k) if k else None))
    return made[0], made[1]


def chunk_files(store: ChunkStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store.root / ".chunks").glob("*/*") if not p.name.startswith(".")}


def same_backups(a: ChunkStore, b: ChunkStore) -> bool:
    """Every snapshot of `a` is in `b` with the same indexes, blobs and notes, and its chunks read equal."""
    for snap in a.snapshots():
        copy = b.snapshot(str(snap.id))
        if (copy.manifest.files, copy.manifest.disks, copy.state.notes) != \
                (snap.manifest.files, snap.manifest.disks, snap.state.notes):
            return False
        for key in snap.manifest.disks:
            if any(a.read_chunk(d) != b.read_chunk(d) for _, d in a.index(str(snap.id), key).digests()):
                return False
    return True


def test_a_sync_copies_what_the_target_lacks_and_nothing_twice(tmp_path):
    here, offsite = stores(tmp_path)
    shared = noise(CS, 1)
    back_up(here, 100, T0, {"scsi0": shared + noise(CS, 2)}, notes="before the upgrade")
    back_up(here, 101, T0, {"scsi0": shared + noise(CS, 3)})
    first = sync(here, offsite)
    assert (len(first.copied), first.present, first.failed) == (2, 0, {})
    assert chunk_files(offsite) == chunk_files(here) and same_backups(here, offsite)
    back_up(here, 100, T0 + timedelta(hours=1), {"scsi0": shared + noise(CS, 4)})
    second = sync(here, offsite)
    assert (second.copied, second.present) == ([f"vm/100/{(T0 + timedelta(hours=1)):%Y-%m-%dT%H:%M:%SZ}"], 2)
    assert 0 < second.written < 2 * CS  # the one new chunk; the shared one stayed
    assert chunk_files(offsite) == chunk_files(here) and same_backups(here, offsite)
    assert sync(here, offsite).copied == []


def test_another_backup_under_the_same_id_in_the_target_is_named_not_taken_for_a_copy(tmp_path):
    """The target may hold a backup of that id made there, or synced from another store whose
    guest ids clash: it was counted present, and the offsite copy of the source's backup never
    existed. It is named failed and left as it is; a copy synced before still counts present."""
    here, offsite = stores(tmp_path)
    back_up(here, 100, T0, {"scsi0": noise(CS, 1)})
    back_up(here, 101, T0, {"scsi0": noise(CS, 2)})
    back_up(offsite, 100, T0, {"scsi0": noise(CS, 3)})  # another guest 100's, the same second
    assert sync(here, offsite, vmids={101}).copied == ["vm/101/2026-11-26T12:00:00Z"]
    result = sync(here, offsite)
    assert (result.copied, result.present) == ([], 1)
    assert "the target holds another backup under this id" in result.failed["vm/100/2026-11-26T12:00:00Z"]
    assert offsite.read_chunk(offsite.index("vm/100/2026-11-26T12:00:00Z", "scsi0").chunks[0]) == noise(CS, 3)


def test_a_copy_whose_reused_chunk_was_set_aside_meanwhile_is_named_failed_not_copied(tmp_path, monkeypatch):
    """A chunk the target held, reused by the copy without reading it, set aside by a verify
    of the target while the copy ran: the copy is recorded failed at its commit there, and
    the sync says so instead of counting it copied."""
    here, offsite = stores(tmp_path)
    shared = noise(CS, 1)
    back_up(here, 100, T0, {"scsi0": shared + noise(CS, 2)})
    assert len(sync(here, offsite).copied) == 1
    later = back_up(here, 100, T0 + timedelta(hours=1), {"scsi0": shared + noise(CS, 3)})
    reused = here.index(str(later.id), "scsi0").chunks[0]
    monkeypatch.setattr(faults, "point", lambda name: chunk_path(offsite, reused).unlink(missing_ok=True))
    result = sync(here, offsite)
    assert result.copied == [] and "its copy is recorded failed in the target" in result.failed[str(later.id)]
    assert not offsite.snapshot(str(later.id)).state.verify.ok
    monkeypatch.undo()
    again = sync(here, offsite)  # the next one mends it: the lost chunk written again, the copy verified
    assert (again.mended, again.present, again.failed) == ([str(later.id)], 1, {})
    assert offsite.snapshot(str(later.id)).state.verify.ok and same_backups(here, offsite)


@pytest.mark.parametrize("keys", ["plain", "same key", "re-encrypted"])
def test_a_copy_a_verify_of_the_target_found_damaged_is_mended_from_the_source_never_counted_present(tmp_path, keys):
    """One chunk of the target's copy rots and the target's verify sets it aside: the next
    sync writes that chunk again from the source (sealed anew under the target's key where it
    re-encrypts), verifies the copy there, and only then counts it; the sync after counts it
    present. A copy recorded failed never counts as present: the offsite copy would not restore."""
    key = os.urandom(32)
    here, offsite = stores(tmp_path, *{"plain": (None, None), "same key": (key, None),
                                       "re-encrypted": (key, os.urandom(32))}[keys])
    reencrypt = keys == "re-encrypted"
    snap = back_up(here, 100, T0, {"scsi0": noise(3 * CS, 1)})
    assert sync(here, offsite, reencrypt=reencrypt).copied == [str(snap.id)]
    rotten = offsite.index(str(snap.id), "scsi0").chunks[1]
    path = chunk_path(offsite, rotten)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert not offsite.verify(str(snap.id)).ok and not path.exists()  # set aside as .bad
    result = sync(here, offsite, reencrypt=reencrypt)
    assert (result.mended, result.present, result.copied, result.failed) == ([str(snap.id)], 0, [], {})
    assert result.written > 0 and path.exists() and offsite.snapshot(str(snap.id)).state.verify.ok
    assert disk_data(offsite, str(snap.id)) == noise(3 * CS, 1)
    after = sync(here, offsite, reencrypt=reencrypt)
    assert (after.mended, after.present, after.written) == ([], 1, 0)


def test_a_failed_copy_whose_damaged_chunk_is_still_in_place_is_mended_in_one_sync(tmp_path):
    """A verify of the target killed before it set the damaged chunk aside leaves the copy
    recorded failed and the chunk where it was: nothing is missing to write. The mend's own
    verify sets it aside; the chunk is then written from the source and the copy verified sound
    (not named still damaged, with advice to forget it)."""
    from drivers.backup.records import Problem, VerifyResult

    here, offsite = stores(tmp_path)
    snap = back_up(here, 100, T0, {"scsi0": noise(2 * CS, 1)})
    assert sync(here, offsite).copied == [str(snap.id)]
    rotten = offsite.index(str(snap.id), "scsi0").chunks[1]
    path = chunk_path(offsite, rotten)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    offsite._change_state(snap.id, verify=VerifyResult("failed", "2026-11-27T00:00:00Z",
                                                       (Problem(rotten, "damaged"),)))  # as the killed verify left it
    result = sync(here, offsite)
    assert (result.mended, result.failed) == ([str(snap.id)], {})
    assert offsite.snapshot(str(snap.id)).state.verify.ok and disk_data(offsite, str(snap.id)) == noise(2 * CS, 1)


def test_a_failed_copy_the_source_cannot_mend_is_named_at_every_sync_and_left_as_it_is(tmp_path):
    """The chunk is gone from the source too: the copy is named failed, sync after sync (never
    counted present), and nothing of it is removed: what of it still reads stays."""
    here, offsite = stores(tmp_path)
    snap = back_up(here, 100, T0, {"scsi0": noise(2 * CS, 1)})
    assert sync(here, offsite).copied == [str(snap.id)]
    lost = offsite.index(str(snap.id), "scsi0").chunks[0]
    chunk_path(offsite, lost).unlink()
    chunk_path(here, lost).unlink()
    assert not offsite.verify(str(snap.id)).ok
    for _ in range(2):
        result = sync(here, offsite)
        assert (result.mended, result.present) == ([], 0)
        why = result.failed[str(snap.id)]
        assert f"recorded failed and could not be mended from here: chunk {lost}: missing" in why
    assert offsite.exists(str(snap.id)) and not offsite.snapshot(str(snap.id)).state.verify.ok


def test_a_copy_records_when_its_original_was_made(tmp_path):
    """The retention takes a misdated backup's period from when it was made (its manifest's
    start): a copy keeps its original's, not the time of the sync that made it, so the offsite
    store's prune counts it for the same day as the source's."""
    from drivers.backup.records import Index

    here, offsite = stores(tmp_path)
    with here.begin(100, T0) as writer:
        writer.made = "2026-11-20T02:00:00Z"  # as a copy synced into `here` records its own original's
        writer.add_index("scsi0", Index("raw", CS, [writer.put_chunk(noise(CS, 1))[0]], CS))
        snap = writer.commit()
    assert sync(here, offsite).copied == [str(snap.id)]
    assert offsite.snapshot(str(snap.id)).manifest.started == "2026-11-20T02:00:00Z"


def test_a_sync_of_some_guests_copies_only_theirs(tmp_path):
    here, offsite = stores(tmp_path)
    back_up(here, 100, T0, {"scsi0": noise(CS, 1)})
    back_up(here, 101, T0, {"scsi0": noise(CS, 2)})
    assert sync(here, offsite, vmids={101}).copied == ["vm/101/2026-11-26T12:00:00Z"]
    assert [s.id.vmid for s in offsite.snapshots()] == [101]


def test_a_sync_with_a_retention_neither_counts_nor_copies_a_backup_its_verify_found_damaged(tmp_path):
    """keep-last 1 over a guest whose newest backup failed its verify: the older, sound one is
    copied (the damaged one must not stand for it), and the damaged one is not (its copy would
    count as sound offsite)."""
    here, offsite = stores(tmp_path)
    sound = back_up(here, 100, T0, {"scsi0": noise(CS, 1)})
    damaged = back_up(here, 100, T0 + timedelta(hours=1), {"scsi0": noise(CS, 2)})
    (digest,) = here.index(str(damaged.id), "scsi0").chunks
    path = chunk_path(here, digest)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    assert not here.verify(str(damaged.id)).ok
    result = sync(here, offsite, keep=Keep(last=1))
    assert (result.copied, result.failed) == ([str(sound.id)], {})
    assert [str(s.id) for s in offsite.snapshots()] == [str(sound.id)]


def test_damage_in_the_source_is_named_and_stops_only_its_backup(tmp_path):
    """A chunk that does not decode to its digest never lands; a snapshot whose manifest cannot
    be read is named; the other backups are copied, and nothing half-copied is visible."""
    here, offsite = stores(tmp_path)
    bad = back_up(here, 100, T0, {"scsi0": noise(CS, 1)})
    unreadable = back_up(here, 101, T0, {"scsi0": noise(CS, 2)})
    good = back_up(here, 102, T0, {"scsi0": noise(CS, 3)})
    (digest,) = here.index(str(bad.id), "scsi0").chunks
    path = chunk_path(here, digest)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    (here.root / "vm" / "101" / unreadable.id.time_text / "manifest.json").write_text("{")
    result = sync(here, offsite)
    assert result.copied == [str(good.id)]
    assert digest in result.failed[str(bad.id)] and "does not match its digest" in result.failed[str(bad.id)]
    assert "not read" in result.failed[str(unreadable.id)]
    assert [str(s.id) for s in offsite.snapshots()] == [str(good.id)] and offsite.listing().damaged == []
    assert not chunk_path(offsite, digest).exists()


def test_a_backup_pruned_in_the_source_after_the_listing_is_gone_not_failed(tmp_path, monkeypatch):
    """A prune of the source forgot a backup between the sync's listing and its copy: nothing
    to copy, and no damage to name (the job failed naming it "not copied"); a file of a backup
    still there that is missing is its damage, as before."""
    here, offsite = stores(tmp_path)
    pruned = back_up(here, 100, T0, {"scsi0": noise(CS, 1)})
    kept = back_up(here, 100, T0 + timedelta(hours=1), {"scsi0": noise(CS, 2)})
    listing = ChunkStore.listing

    def listed_then_pruned(store, *args, **kwargs):
        found = listing(store, *args, **kwargs)
        if store is here:
            here.forget(str(pruned.id))
        return found

    monkeypatch.setattr(ChunkStore, "listing", listed_then_pruned)
    result = sync(here, offsite)
    assert (result.copied, result.gone, result.failed) == ([str(kept.id)], [str(pruned.id)], {})


def test_encrypted_stores_sync_only_under_the_same_key(tmp_path):
    key = os.urandom(32)
    here, offsite = stores(tmp_path, key)
    snap = back_up(here, 100, T0, {"scsi0": noise(2 * CS)})
    assert sync(here, offsite).copied == [str(snap.id)]
    assert chunk_files(offsite) == chunk_files(here) and same_backups(here, offsite)  # sealed bytes, as they were
    assert offsite.verify(str(snap.id)).ok
    for name, other in (("other", os.urandom(32)), ("plain", b"")):
        a, b = stores(tmp_path / name, key, other)
        with pytest.raises(Refused, match="do not have the same key: a sync copies chunks as they are stored"):
            sync(a, b)
    a, b = stores(tmp_path / "downgrade", key, b"")
    with pytest.raises(Refused, match="never copies encrypted backups into a store without a key"):
        sync(a, b, reencrypt=True)


def disk_data(store: ChunkStore, id: str, key: str = "scsi0") -> bytes:
    reader = DiskReader(store, store.index(id, key), id)
    return reader.read(0, reader.size)


@pytest.mark.parametrize("source_key", [b"", os.urandom(32)], ids=["from a plain store", "from another key"])
def test_a_reencrypting_sync_seals_each_chunk_anew_under_the_targets_key(tmp_path, source_key):
    """Names and sealed bytes all change, patches' chunks too; the data does not."""
    here, offsite = stores(tmp_path, source_key, os.urandom(32))
    base = back_up(here, 100, T0, {"scsi0": noise(2 * CS, 1)})
    snap = here.snapshot(str(base.id))
    result = sync(here, offsite, reencrypt=True)
    assert result.copied == [str(snap.id)] and result.failed == {}
    assert not set(chunk_files(offsite)) & set(chunk_files(here))
    assert disk_data(offsite, str(snap.id)) == disk_data(here, str(snap.id)) == noise(2 * CS, 1)
    assert offsite.verify(str(snap.id)).ok and sync(here, offsite, reencrypt=True).copied == []


def test_a_reencrypted_patch_lays_the_same_runs_over_its_resealed_base(tmp_path):
    from drivers.backup.records import Index, Patch

    here, offsite = stores(tmp_path, os.urandom(32), os.urandom(32))
    under, own = noise(CS, 1), noise(512, 2)
    with here.begin(100, T0) as writer:
        base_digest, _ = writer.put_chunk(under)
        own_digest, _ = writer.put_chunk(own)
        writer.add_index("scsi0", Index("raw", CS, [Patch(base_digest, own_digest, ((1024, 512),))], CS))
        snap = writer.commit()
    sync(here, offsite, reencrypt=True)
    expected = under[:1024] + own + under[1536:]
    assert disk_data(here, str(snap.id)) == expected == disk_data(offsite, str(snap.id))
    [patch] = offsite.index(str(snap.id), "scsi0").chunks
    assert isinstance(patch, Patch) and patch.runs == ((1024, 512),) and {patch.base, patch.own}.isdisjoint(
        {base_digest, own_digest})


def _sync_until_killed(here: str, offsite: str, armed: str) -> None:
    os.environ[faults.ENV] = armed
    sync(ChunkStore(here, chunk_size=CS), ChunkStore(offsite, chunk_size=CS))


def test_a_sync_killed_mid_way_is_finished_by_the_next_without_copying_again(tmp_path):
    """SIGKILL right after the first chunk landed: nothing visible in the target but that chunk
    and a dead writer's partial; the next sync copies the rest only, gc takes the partial."""
    here, offsite = stores(tmp_path)
    snap = back_up(here, 100, T0, {"scsi0": noise(3 * CS)})
    armed = tmp_path / "faults"
    armed.write_text("synced-chunk")
    child = FORK.Process(target=_sync_until_killed, args=(str(here.root), str(offsite.root), str(armed)))
    child.start()
    child.join(30)
    assert child.exitcode == -9 and armed.read_text() == ""
    assert offsite.snapshots() == [] and len(chunk_files(offsite)) == 1
    result = sync(here, offsite)
    assert result.copied == [str(snap.id)] and 0 < result.written < sum(map(len, chunk_files(here).values()))
    assert chunk_files(offsite) == chunk_files(here) and same_backups(here, offsite)
    assert offsite.gc(now=time.time() + HOUR).partials_removed == 1
    assert offsite.verify(str(snap.id)).ok


def test_a_sync_with_a_retention_copies_only_what_it_keeps(tmp_path):
    """keep-last 1: of a guest's three backups only the newest is copied (a prune of the target
    would remove the others right after), and a later sync copies nothing again."""
    here, offsite = stores(tmp_path)
    made = [back_up(here, 100, T0 + timedelta(hours=h), {"scsi0": noise(CS, h + 1)}) for h in range(3)]
    keep = Keep.from_options({"keep-last": 1})
    assert sync(here, offsite, keep=keep).copied == [str(made[-1].id)]
    assert sync(here, offsite, keep=keep).copied == []
    assert [str(s.id) for s in offsite.snapshots()] == [str(made[-1].id)]
