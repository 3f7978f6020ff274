"""The backup chunk store, on real files in a temp directory (small chunks keep it fast)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard

from drivers.backup.codec import KIND_RAW, KIND_ZSTD, MAGIC, PlainCodec, is_zero
from drivers.backup.records import BackupId, BaseRef, Index, Patch, Snapshot, backup_id, blob_name, disk_key
from drivers.backup.store import QUARANTINE, ChunkStore
from drivers.errors import AlreadyExists, Corrupt, InvalidName, NotFound, Refused
from tests import storages
from tests.helpers import resident_pages

CS = 4096
T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
HOUR = 3600.0
FORK = multiprocessing.get_context("fork")


def noise(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CS] for i in range(0, len(data), CS)]


def chunk_path(store: ChunkStore, digest: str) -> Path:
    return store.root / ".chunks" / digest[:4] / digest


def chunk_files(store: ChunkStore) -> list[Path]:
    return sorted(p for p in (store.root / ".chunks").glob("*/*") if not p.name.startswith("."))


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def orphan_of(store: ChunkStore, data: bytes) -> str:
    """The chunk of `data` (one chunk's worth) as a forgotten backup leaves it: named by none."""
    store.forget(str(back_up(store, 100, T0 - timedelta(days=1), {"scsi0": data}).id))
    return store.codec.digest(data)


def back_up(store: ChunkStore, vmid: int, when: datetime, disks: dict[str, bytes], notes: str = "") -> Snapshot:
    """A whole backup as the backup job writes one: chunks, one index per disk, the config."""
    with store.begin(vmid, when, notes=notes) as writer:
        for key, data in disks.items():
            digests = [writer.put_chunk(c)[0] for c in chunks(data)]
            writer.add_index(key, Index("raw", len(data), digests, CS))
        writer.add_blob("guest.conf", b"memory: 512\nscsi0: local:100/vm-100-disk-0.raw\n")
        return writer.commit()


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    root = tmp_path / "backup"
    root.mkdir()
    return ChunkStore(root, chunk_size=CS)


class TestChunks:
    def test_a_chunk_reads_back_as_it_was_put(self, store):
        """Random data is stored raw, compressible data zstd-compressed; both read back intact."""
        random_data, text = noise(CS), (b"stork " * CS)[:CS]
        for data, kind in ((random_data, KIND_RAW), (text, KIND_ZSTD)):
            digest, written = store.put_chunk(data)
            blob = chunk_path(store, digest).read_bytes()
            assert blob[:5] == MAGIC + bytes([kind])
            assert written == len(blob)
            assert store.read_chunk(digest) == data
        assert chunk_path(store, store.codec.digest(text)).stat().st_size < CS / 10

    def test_a_new_chunk_is_flushed_and_leaves_the_page_cache(self, store):
        """A backup writes gigabytes nobody reads soon: each chunk file, once flushed, gives its
        pages back for the next one (on a virtual machine a new page can cost the host a fault)."""
        digest, _ = store.put_chunk(noise(CS))
        assert resident_pages(chunk_path(store, digest)) == 0
        assert store.read_chunk(digest) == noise(CS)

    def test_the_last_chunk_of_a_disk_may_be_short(self, store):
        digest, _ = store.put_chunk(b"tail")
        assert store.read_chunk(digest) == b"tail"

    def test_an_all_zero_chunk_is_never_stored(self, store):
        """Zeros come back as None, the index's mark for a hole, and leave no file."""
        assert store.put_chunk(bytes(CS)) == (None, 0)
        assert store.put_chunk(bytes(100)) == (None, 0)
        assert not (store.root / ".chunks").exists()
        assert is_zero(bytes(CS)) and not is_zero(bytes(CS - 1) + b"\1") and not is_zero(b"\1" + bytes(CS - 1))

    def test_a_second_put_of_the_same_data_writes_nothing_and_refreshes_the_chunk(self, store):
        data = noise(CS)
        digest, written = store.put_chunk(data)
        age(chunk_path(store, digest), HOUR)
        assert store.put_chunk(data) == (digest, 0)
        assert written > 0 and len(chunk_files(store)) == 1
        assert time.time() - chunk_path(store, digest).stat().st_mtime < 60

    def test_a_chunk_larger_than_the_chunk_size_is_refused(self, store):
        with pytest.raises(ValueError, match="1 to 4096 bytes"):
            store.put_chunk(noise(CS + 1))

    def test_a_corrupt_chunk_is_named_when_read(self, store):
        digest, _ = store.put_chunk(noise(CS))
        path = chunk_path(store, digest)
        blob = bytearray(path.read_bytes())
        blob[100] ^= 0xFF
        path.write_bytes(blob)
        with pytest.raises(Corrupt, match=f"chunk {digest}: its data does not match its digest"):
            store.read_chunk(digest)

    def test_a_missing_chunk_is_named_when_read(self, store):
        digest = "ab" * 32
        with pytest.raises(NotFound, match=f"chunk {digest}: missing"):
            store.read_chunk(digest)

    def test_a_malformed_digest_is_refused(self, store):
        with pytest.raises(InvalidName, match=re.escape("invalid chunk digest '../etc'")):
            store.read_chunk("../etc")

    def test_concurrent_threads_store_each_chunk_once(self, store):
        """Hashing and compressing run in a thread pool: same and different data at once."""
        datas = [noise(CS, seed % 5) for seed in range(40)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(store.put_chunk, datas))
        assert len({d for d, _ in results}) == 5 == len(chunk_files(store))
        assert sum(1 for _, written in results if written) == 5
        assert all(store.read_chunk(d) == data for (d, _), data in zip(results, datas, strict=True))

    def test_concurrent_processes_putting_the_same_chunk_leave_one_file(self, store):
        with FORK.Pool(4) as pool:
            results = pool.map(_put_same_chunk, [str(store.root)] * 16)
        assert len(set(results)) == 1
        assert [p.name for p in chunk_files(store)] == [results[0]]
        assert not [p for p in (store.root / ".chunks").glob("*/*.tmp")]


def _put_same_chunk(root: str) -> str:
    digest, _ = ChunkStore(root, chunk_size=CS).put_chunk(noise(CS, seed=7))
    assert digest is not None
    return digest


class TestCodec:
    def test_an_encrypted_chunk_is_refused_without_a_key(self):
        with pytest.raises(Refused, match="encrypted"):
            PlainCodec(CS).decode(MAGIC + b"\2" + b"x" * 40, "ab" * 32)

    def test_an_unknown_kind_or_header_is_corrupt(self):
        with pytest.raises(Corrupt, match="unknown chunk kind 9"):
            PlainCodec(CS).decode(MAGIC + b"\x09" + b"x", "ab" * 32)
        with pytest.raises(Corrupt, match="not a chunk file"):
            PlainCodec(CS).decode(b"PK\3\4", "ab" * 32)

    def test_a_frame_declaring_more_than_a_chunk_is_not_decompressed(self):
        """zstd would allocate what a frame declares; a chunk file cannot claim more than a chunk."""
        bomb = MAGIC + bytes([KIND_ZSTD]) + zstandard.ZstdCompressor(level=1).compress(bytes(CS * 64))
        with pytest.raises(Corrupt, match=f"frame declares {CS * 64} bytes"):
            PlainCodec(CS).decode(bomb, "ab" * 32)


BASE_REF = BaseRef("vm/100/2026-01-01T00:00:00Z", "scsi0", "ef" * 32)


class TestIndex:
    def test_the_content_digest_is_equal_exactly_when_the_data_is(self):
        a = Index("raw", 2 * CS, ["aa" * 32, None], CS)
        assert a.content == Index("qcow2", 2 * CS, ("aa" * 32, None), CS).content
        assert a.content != Index("raw", 2 * CS, [None, "aa" * 32], CS).content
        assert a.content != Index("raw", 2 * CS - 512, ["aa" * 32, None], CS).content

    def test_an_index_round_trips_through_json(self):
        index = Index("qcow2", CS + 1, ["ab" * 32, None], CS)
        assert Index.from_json(index.to_json(), "x") == index
        patches = [Patch("ab" * 32, "cd" * 32, ((0, 16), (32, 8))), Patch(None, None, ((8, 8),))]
        patched = Index("qcow2", 2 * CS, patches, CS, base=BASE_REF)
        assert Index.from_json(patched.to_json(), "x") == patched
        assert [d for _, d in patched.digests()] == ["ab" * 32, "cd" * 32]

    def test_a_patch_lays_its_runs_over_the_base_chunk(self):
        assert Patch(None, None, ((2, 3), (8, 1))).apply(b"abcdefghij", b"XYZW") == b"abXYZfghWj"
        with pytest.raises(ValueError, match="a patch of 4 bytes"):
            Patch(None, None, ((2, 3), (8, 1))).apply(b"abcdefghij", b"XYZ")

    BAD = [
        ("unknown format", {"format": "vmdk"}, "format 'vmdk'"),
        ("too few chunks", {"chunks": ["ab" * 32]}, "1 chunks for 8192 bytes, expected 2"),
        ("a digest with upper case", {"chunks": ["AB" * 32, None]}, "not 64 hex digits"),
        ("a digest that is a path", {"chunks": ["../../etc/passwd", None]}, "not 64 hex digits"),
        ("negative size", {"virtual_size": -1}, "virtual size -1"),
        ("chunk size not a power of two", {"chunk_size": 5000}, "chunk size 5000"),
        ("a base with a bad id", {"base": {"backup": "vm/1/x", "disk": "scsi0", "digest": "ab" * 32}}, "backup id"),
        ("a patch run past its chunk", {"base": vars(BASE_REF), "chunks": [
            {"base": None, "own": "ab" * 32, "runs": [[0, CS + 1]]}, None]}, "past the chunk"),
        ("overlapping patch runs", {"base": vars(BASE_REF), "chunks": [
            {"base": None, "own": "ab" * 32, "runs": [[0, 16], [8, 16]]}, None]}, "patch run offset 8"),
        ("a patch run that is text", {"base": vars(BASE_REF), "chunks": [
            {"base": None, "own": "ab" * 32, "runs": [["0", 16]]}, None]}, "patch run offset '0'"),
        ("a patch naming a path", {"base": vars(BASE_REF), "chunks": [
            {"base": "../../x", "own": "ab" * 32, "runs": [[0, 16]]}, None]}, "not 64 hex digits"),
        ("a patch with more fields", {"base": vars(BASE_REF), "chunks": [
            {"base": None, "own": "ab" * 32, "runs": [[0, 16]], "path": "/etc"}, None]}, "not base, own and runs"),
    ]

    @pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
    def test_a_bad_index_file_is_corrupt(self, what, change, message):
        """An index read from storage is input: every field is checked, the error names the file."""
        doc = json.loads(Index("raw", 2 * CS, ["ab" * 32, None], CS).to_json())
        doc.update(change)
        with pytest.raises(Corrupt, match=f"scsi0.index.json: .*{message}"):
            Index.from_json(json.dumps(doc).encode(), "scsi0.index.json")

    def test_an_index_whose_content_digest_lies_is_corrupt(self):
        doc = json.loads(Index("raw", CS, ["ab" * 32], CS).to_json())
        doc["content"] = "cd" * 32
        with pytest.raises(Corrupt, match="content digest does not match"):
            Index.from_json(json.dumps(doc).encode(), "scsi0.index.json")

    def test_an_unknown_format_version_is_refused(self):
        doc = json.loads(Index("raw", CS, ["ab" * 32], CS).to_json())
        doc["version"] = 2
        with pytest.raises(Refused, match="format version 2"):
            Index.from_json(json.dumps(doc).encode(), "scsi0.index.json")


class TestSnapshots:
    def test_a_snapshot_is_invisible_until_commit(self, store):
        writer = store.begin(100, T0)
        writer.add_index("scsi0", Index("raw", CS, [writer.put_chunk(noise(CS))[0]], CS))
        assert store.snapshots() == []
        with pytest.raises(NotFound, match="backup vm/100/2026-11-26T12:00:00Z: no such backup"):
            store.snapshot("vm/100/2026-11-26T12:00:00Z")
        snapshot = writer.commit()
        assert store.snapshots() == [snapshot] == store.snapshots(100)
        assert str(snapshot.id) == "vm/100/2026-11-26T12:00:00Z"
        assert snapshot.manifest.size == CS and snapshot.manifest.written > 0

    def test_snapshots_are_listed_by_guest_then_time(self, store):
        for vmid, hours in ((101, 0), (100, 2), (100, 1)):
            back_up(store, vmid, T0 + timedelta(hours=hours), {"scsi0": noise(CS)})
        assert [(s.id.vmid, s.id.time.hour) for s in store.snapshots()] == [(100, 13), (100, 14), (101, 12)]
        assert len(store.snapshots(101)) == 1 and store.snapshots(102) == []

    def test_blobs_and_indexes_read_back(self, store):
        data = noise(CS) + bytes(CS) + noise(100, seed=2)
        snapshot = back_up(store, 100, T0, {"scsi0": data})
        index = store.index(str(snapshot.id), "scsi0")
        assert index.virtual_size == len(data) and index.chunks[1] is None
        assert b"".join(store.read_chunk(d) if d else bytes(CS) for d in index.chunks) == data
        assert store.read_blob(str(snapshot.id), "guest.conf").startswith(b"memory: 512")

    def test_an_unchanged_rebackup_writes_nothing(self, store):
        """Content-addressed chunks: the same data again costs only an index."""
        disks = {"scsi0": noise(3 * CS), "efidisk0": noise(CS, seed=3)}
        first = back_up(store, 100, T0, disks)
        second = back_up(store, 100, T0 + timedelta(days=1), disks)
        assert first.manifest.written > 0 and second.manifest.written == 0
        assert first.manifest.disks == second.manifest.disks

    def test_abort_leaves_nothing(self, store):
        writer = store.begin(100, T0)
        writer.add_blob("guest.conf", b"x")
        writer.abort()
        assert os.listdir(store.root / "vm" / "100") == []

    def test_an_error_inside_the_with_block_aborts(self, store):
        with pytest.raises(RuntimeError), store.begin(100, T0):
            raise RuntimeError("backup failed")
        assert os.listdir(store.root / "vm" / "100") == [] and store.snapshots() == []

    def test_commit_refuses_a_time_that_exists(self, store):
        """Two backups of one guest in the same second: the second one fails, the first stays."""
        first, second = store.begin(100, T0), store.begin(100, T0)
        first.commit()
        with pytest.raises(AlreadyExists, match="backup vm/100/2026-11-26T12:00:00Z already exists"):
            second.commit()
        second.abort()
        with pytest.raises(AlreadyExists):
            store.begin(100, T0)
        assert len(store.snapshots()) == 1

    def test_an_index_must_name_only_chunks_this_backup_stored(self, store):
        """A chunk named without being put or reused would not be protected from gc."""
        stranger, _ = store.put_chunk(noise(CS))
        with store.begin(100, T0) as writer, pytest.raises(Refused, match=f"chunk {stranger}"):
            writer.add_index("scsi0", Index("raw", CS, [stranger], CS))
        with store.begin(100, T0) as writer:
            assert writer.reuse_chunk(stranger)
            writer.add_index("scsi0", Index("raw", CS, [stranger], CS))
            assert not writer.reuse_chunk("cd" * 32)

    def test_a_flipped_byte_in_an_index_is_caught_on_read(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(2 * CS)})
        path = store.root / "vm" / "100" / snapshot.id.time_text / "scsi0.index.json"
        raw = bytearray(path.read_bytes())
        raw[raw.index(b'"chunks"') + 20] ^= 1
        path.write_bytes(raw)
        with pytest.raises(Corrupt, match=re.escape("scsi0.index.json does not match the checksum in its manifest")):
            store.index(str(snapshot.id), "scsi0")

    def test_notes_and_protection_live_in_the_state_file(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)}, notes="before upgrade")
        assert store.snapshot(str(snapshot.id)).state.notes == "before upgrade" == snapshot.state.notes
        manifest = (store.root / "vm" / "100" / snapshot.id.time_text / "manifest.json").read_bytes()
        store.set_notes(str(snapshot.id), "kept for the audit")
        store.set_protected(str(snapshot.id), True)
        reread = store.snapshot(str(snapshot.id))
        assert (reread.state.notes, reread.state.protected) == ("kept for the audit", True)
        assert (store.root / "vm" / "100" / snapshot.id.time_text / "manifest.json").read_bytes() == manifest

    def test_forget_is_refused_while_protected(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        store.set_protected(str(snapshot.id), True)
        with pytest.raises(Refused, match="protected"):
            store.forget(str(snapshot.id))
        store.set_protected(str(snapshot.id), False)
        store.forget(str(snapshot.id))
        assert store.snapshots() == []
        assert not [n for n in os.listdir(store.root / "vm" / "100") if n != ".lock"]

    def test_a_protected_snapshot_with_a_damaged_manifest_can_be_unprotected_and_forgotten(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        store.set_protected(str(snapshot.id), True)
        (store.root / "vm" / "100" / snapshot.id.time_text / "manifest.json").write_text("{ damaged")
        with pytest.raises(Refused, match="protected"):
            store.forget(str(snapshot.id))
        store.set_protected(str(snapshot.id), False)
        store.forget(str(snapshot.id))
        assert not [n for n in os.listdir(store.root / "vm" / "100") if n != ".lock"]


class TestDamaged:
    """One damaged snapshot is listed apart and stops no reader of the others."""

    @pytest.mark.parametrize(("file", "content", "reason"), [
        pytest.param("manifest.json", "{ flipped", r"manifest\.json: not valid JSON", id="manifest-garbled"),
        pytest.param("manifest.json", '{"version": 99}', "format version 99", id="manifest-version"),
        pytest.param("state.json", '{"version": 1, "prot', r"state\.json: not valid JSON", id="state-truncated"),
    ])
    def test_a_damaged_snapshot_is_listed_apart_with_its_reason(self, store, file, content, reason):
        a = back_up(store, 100, T0, {"scsi0": noise(CS)})
        b = back_up(store, 101, T0, {"scsi0": noise(CS, seed=2)})
        c = back_up(store, 101, T0 + timedelta(hours=1), {"scsi0": noise(CS, seed=3)})
        (store.root / "vm" / "101" / b.id.time_text / file).write_text(content)
        listing = store.listing()
        assert [s.id for s in listing.snapshots] == [a.id, c.id] == [s.id for s in store.snapshots()]
        assert [d.id for d in listing.damaged] == [b.id] and re.search(reason, listing.damaged[0].reason)
        assert listing.ids == [a.id, b.id, c.id]

    def test_forget_with_damaged_removes_a_snapshot_whose_state_is_truncated(self, store):
        """Neither unprotect nor a plain forget can read its state; both name the way out."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        store.set_protected(str(snapshot.id), True)
        state = store.root / "vm" / "100" / snapshot.id.time_text / "state.json"
        state.write_text(state.read_text()[:10])
        way_out = rf"state\.json.*'stork backup forget --damaged {snapshot.id}' removes it"
        for attempt in (lambda: store.set_protected(str(snapshot.id), False), lambda: store.forget(str(snapshot.id))):
            with pytest.raises(Corrupt, match=way_out):
                attempt()
        assert "not valid JSON" in store.forget(str(snapshot.id), damaged=True)
        assert store.listing().ids == []

    def test_forget_with_damaged_is_refused_for_a_snapshot_that_can_be_read(self, store):
        """--damaged is no way around protection: a sound, protected snapshot stays."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        store.set_protected(str(snapshot.id), True)
        with pytest.raises(Refused, match=f"backup {snapshot.id} is not damaged: forget it without --damaged"):
            store.forget(str(snapshot.id), damaged=True)
        assert store.snapshot(str(snapshot.id)).state.protected

    def test_a_link_at_a_snapshots_name_is_listed_damaged_and_forget_damaged_removes_only_the_link(self, store,
                                                                                                 tmp_path):
        """Something other than a folder at a snapshot's name (a link, here to a copy of a sound
        snapshot elsewhere) is a damaged snapshot: the others are listed and backed up onto, gc
        stops and names the way out, and forget --damaged removes the link, not what it names."""
        a = back_up(store, 100, T0, {"scsi0": noise(CS)})
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "kept").write_text("not stork's to remove")
        stray = store.root / "vm" / "100" / (T0 + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        stray.symlink_to(elsewhere)
        listing = store.listing()
        assert [s.id for s in listing.snapshots] == [a.id]
        assert [str(d.id) for d in listing.damaged] == [f"vm/100/{stray.name}"]
        assert "is a symlink" in listing.damaged[0].reason
        with pytest.raises(Refused, match=rf"gc stopped before removing anything: .*'stork backup forget --damaged "
                                          rf"vm/100/{stray.name}' lets gc go on"):
            store.gc(margin=0)
        assert "not a directory: it is a symlink" in store.forget(f"vm/100/{stray.name}", damaged=True)
        assert not stray.is_symlink() and (elsewhere / "kept").exists()
        assert store.listing().damaged == [] and store.gc(margin=0).chunks_kept == 1

    def test_a_link_at_a_guests_name_stops_no_listing_but_stops_gc(self, store, tmp_path):
        """A guest's folder that is a link may hold snapshots whose chunks gc cannot see:
        gc refuses, naming it; the listings (and the backups that read them) pass it over."""
        a = back_up(store, 100, T0, {"scsi0": noise(CS)})
        (tmp_path / "elsewhere").mkdir()
        (store.root / "vm" / "200").symlink_to(tmp_path / "elsewhere")
        assert [s.id for s in store.listing().snapshots] == [a.id] and store.listing().damaged == []
        with pytest.raises(Refused, match=r"vm/200: not a directory"):
            store.gc(margin=0)


class TestVerify:
    def test_an_intact_snapshot_verifies_ok_and_says_so_in_its_state(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(2 * CS)})
        result = store.verify(str(snapshot.id))
        assert result.ok and result.problems == ()
        assert store.snapshot(str(snapshot.id)).state.verify == result

    def test_verify_names_a_corrupt_and_a_missing_chunk_with_disk_and_offset(self, store):
        data = noise(CS, 1) + noise(CS, 2) + noise(CS, 1)  # chunk 0 again at offset 2*CS: read once
        snapshot = back_up(store, 100, T0, {"scsi0": data, "virtio1": noise(CS, 3)})
        first, _, _ = store.index(str(snapshot.id), "scsi0").chunks
        (other,) = store.index(str(snapshot.id), "virtio1").chunks
        path = chunk_path(store, first)
        blob = bytearray(path.read_bytes())
        blob[-1] ^= 1
        path.write_bytes(blob)
        chunk_path(store, other).unlink()

        result = store.verify(str(snapshot.id))
        assert result.state == "failed"
        problems = {p.digest: p for p in result.problems}
        assert set(problems) == {first, other}
        assert problems[first].places == (("scsi0", 0), ("scsi0", 2 * CS))
        assert "does not match its digest" in problems[first].error
        assert problems[other].places == (("virtio1", 0),) and "missing" in problems[other].error
        assert f"{other}" in str(problems[other]) and "virtio1 at byte 0" in str(problems[other])
        assert store.snapshot(str(snapshot.id)).state.verify == result

    def test_a_chunk_found_lost_fails_every_backup_naming_it_not_only_the_one_verified(self, store):
        """A backup verified ok earlier that names a chunk found damaged or missing since is
        failed too: prune and sync would count its stale "ok" as sound and let an older backup
        that restores go for it. One that does not name it keeps its state."""
        from drivers.backup.retention import candidate

        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        new = back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared + noise(CS, 3)})
        other = back_up(store, 101, T0, {"scsi0": noise(CS, 4)})
        assert store.verify(str(new.id)).ok and store.verify(str(other.id)).ok
        lost = store.index(str(old.id), "scsi0").chunks[0]
        chunk_path(store, lost).unlink()

        assert store.verify(str(old.id)).state == "failed"
        stale = store.snapshot(str(new.id)).state.verify
        assert stale.state == "failed" and [p.digest for p in stale.problems] == [lost]
        assert f"found by the verify of backup {old.id}" in stale.problems[0].error
        assert candidate(store.snapshot(str(new.id))).failed
        assert store.snapshot(str(other.id)).state.verify.ok

    def test_a_verify_killed_as_it_sets_a_damaged_chunk_aside_has_recorded_every_backup_naming_it(
            self, store, tmp_path):
        """The move aside comes after the records: a verify killed (SIGKILL) at it leaves the
        chunk where it was, and both backups naming it recorded failed, where it had left the
        chunk gone and both "ok" (until their next verify, prune would count them sound). The
        next verify finds it again and moves it."""
        import sys

        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        new = back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared + noise(CS, 3)})
        assert store.verify(str(old.id)).ok and store.verify(str(new.id)).ok
        digest = store.index(str(old.id), "scsi0").chunks[0]
        path = chunk_path(store, digest)
        rotted = bytearray(path.read_bytes())
        rotted[len(rotted) // 2] ^= 0xFF
        path.write_bytes(bytes(rotted))
        armed = tmp_path / "faults"
        armed.write_text("quarantine")
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from drivers.backup.store import ChunkStore; "
             "ChunkStore(Path(sys.argv[1]), chunk_size=int(sys.argv[2])).verify(sys.argv[3])",
             str(store.root), str(CS), str(old.id)],
            env={**os.environ, "STORK_FAULTS": str(armed)}, capture_output=True, text=True)
        assert child.returncode == -9, child.stderr
        assert path.exists() and not path.with_name(f"{digest}.bad").exists()
        for snapshot in (old, new):
            verified = store.snapshot(str(snapshot.id)).state.verify
            assert verified.state == "failed" and [p.digest for p in verified.problems] == [digest]
        assert store.verify(str(old.id)).state == "failed"
        assert not path.exists() and path.with_name(f"{digest}.bad").exists()

    def test_a_backup_committed_between_a_verifys_records_and_its_move_is_recorded_failed(self, store):
        """Verify records the backups naming a damaged chunk, then moves it aside. A backup that
        reused the chunk and committed in between found it in place at its commit, and was in
        no listing: it is recorded failed once the chunk is moved."""
        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        digest = store.index(str(old.id), "scsi0").chunks[0]
        path = chunk_path(store, digest)
        path.write_bytes(path.read_bytes()[:-1] + b"!")
        move, late = store._quarantine, []

        def commit_first(d: str) -> bool:  # the backup's commit, in the moment before the move
            late.append(back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared}))
            return move(d)

        store._quarantine = commit_first
        assert store.verify(str(old.id)).state == "failed" and not path.exists()
        verified = store.snapshot(str(late[0].id)).state.verify
        assert verified.state == "failed" and [p.digest for p in verified.problems] == [digest]

    def test_a_damaged_chunk_a_backup_that_cannot_be_recorded_names_stays_in_place(self, store):
        """The other backup's state cannot be written (a full store): the chunk is not set
        aside (that backup would stay "ok" naming a chunk gone), and the next verify that meets
        it tries again, in the same process too; once it can be recorded, the chunk goes."""
        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        new = back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared})
        assert store.verify(str(new.id)).ok
        digest = store.index(str(old.id), "scsi0").chunks[0]
        path = chunk_path(store, digest)
        path.write_bytes(path.read_bytes()[:-1] + b"!")
        change = store._change_state

        def full_for_new(id, **fields):
            if id == new.id:
                raise OSError(28, "No space left on device")
            return change(id, **fields)

        store._change_state = full_for_new
        assert store.verify(str(old.id)).state == "failed"
        assert path.exists() and store.snapshot(str(new.id)).state.verify.ok
        store._change_state = change
        assert store.verify(str(old.id)).state == "failed" and not path.exists()
        assert store.snapshot(str(new.id)).state.verify.state == "failed"

    def test_a_chunk_that_reads_sound_again_fails_no_other_backup_and_stays(self, store):
        """A read error that passed by the time verify looks again (a soft NFS mount's timeout):
        the backup verified is recorded failed, as its read met it, but no other backup naming
        the chunk is, and the chunk is not set aside."""
        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        new = back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared})
        assert store.verify(str(new.id)).ok
        digest = store.index(str(old.id), "scsi0").chunks[0]
        read, failing = store.read_chunk, [digest]

        def once_unreadable(d: str) -> bytes:
            if d in failing:
                failing.remove(d)
                raise Corrupt(f"chunk {d}: cannot be read back: Input/output error")
            return read(d)

        store.read_chunk = once_unreadable
        assert store.verify(str(old.id)).state == "failed"
        assert store.snapshot(str(new.id)).state.verify.ok and chunk_path(store, digest).exists()

    def test_a_backup_that_reused_a_chunk_a_verify_set_aside_meanwhile_is_recorded_failed(self, store):
        """A backup reusing a chunk names it without reading it. A verify that sets it aside while
        that backup runs fails every committed backup naming it, and this one was not committed
        yet: it would be counted sound, and prune would let the older backup that restores go
        for it. Its commit finds the chunk gone and records it failed; a chunk stored again
        meanwhile (sound) is no loss."""
        from drivers.backup.retention import candidate

        shared = noise(CS, 1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, 2)})
        lost = store.index(str(old.id), "scsi0").chunks[0]
        with store.begin(100, T0 + timedelta(days=1)) as writer:
            assert writer.reuse_chunk(lost)
            own, _ = writer.put_chunk(noise(CS, 3))
            writer.add_index("scsi0", Index("raw", 2 * CS, [lost, own], CS))
            chunk_path(store, lost).write_bytes(b"rot")  # the verify of the older backup runs now
            assert store.verify(str(old.id)).state == "failed"
            made = writer.commit()
        assert [p.digest for p in made.state.verify.problems] == [lost]
        assert candidate(store.snapshot(str(made.id))).failed
        with store.begin(100, T0 + timedelta(days=2)) as writer:  # one whose chunk was stored again since
            assert not writer.reuse_chunk(lost)
            assert writer.put_chunk(shared)[0] == lost
            writer.add_index("scsi0", Index("raw", CS, [lost], CS))
            again = writer.commit()
            assert again.state.verify is None
        # a backup step sent again after a crash right after the commit looks again, from its indexes
        assert store.fail_for_lost(str(again.id)) is None
        chunk_path(store, lost).unlink()
        assert [p.digest for p in store.fail_for_lost(str(again.id)).verify.problems] == [lost]
        assert candidate(store.snapshot(str(again.id))).failed

    def test_a_chunk_the_disk_cannot_read_back_is_set_aside_and_stored_again_by_the_next_backup(self, tmp_path):
        """A chunk whose block btrfs finds damaged (its checksum, as a bad sector) reads as EIO:
        verify records it damaged and moves it aside, like a chunk whose data does not match its
        digest; the backups naming it are failed; the next backup of that data stores it again
        (before, verify stopped at the error and every later backup named the unreadable file)."""
        fs = storages.make("btrfs", tmp_path, size_mib=256)
        if isinstance(fs, str):
            pytest.skip(fs)
        try:
            size = 1 << 20  # past btrfs's inline size
            data = noise(2 * size)
            (fs.mount / "backup").mkdir()

            def back_up_whole(store: ChunkStore, when: datetime) -> Snapshot:
                with store.begin(100, when) as writer:
                    digests = [writer.put_chunk(data[i:i + size])[0] for i in (0, size)]
                    writer.add_index("scsi0", Index("raw", len(data), digests, size))
                    return writer.commit()

            store = ChunkStore(fs.mount / "backup", chunk_size=size)
            old, new = back_up_whole(store, T0), back_up_whole(store, T0 + timedelta(days=1))
            assert store.verify(str(new.id)).ok
            victim = store.index(str(old.id), "scsi0").chunks[1]
            storages.damage_on_disk(fs, chunk_path(store, victim))
            with pytest.raises(Corrupt, match=f"chunk {victim}: cannot be read back: Input/output error"):
                store.read_chunk(victim)

            result = store.verify(str(old.id))
            assert result.state == "failed" and [p.digest for p in result.problems] == [victim]
            assert f"set aside as {victim}.bad" in result.problems[0].error
            assert not chunk_path(store, victim).exists() and chunk_path(store, victim + ".bad").exists()
            assert store.snapshot(str(new.id)).state.verify.state == "failed"
            third = back_up_whole(store, T0 + timedelta(days=2))
            assert store.read_chunk(victim) == data[size:] and store.verify(str(third.id)).ok
        finally:
            fs.close()


class _Ahead:
    """`time` as a node whose clock runs 600 s ahead of the store's sees it."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.time() + 600


def _commit_one(writer, digest: str) -> Snapshot:
    writer.add_index("scsi0", Index("raw", CS, [digest], CS))
    writer.add_blob("guest.conf", b"memory: 512\n")
    return writer.commit()


class TestGc:
    def test_gc_removes_unreferenced_old_chunks_and_keeps_referenced_ones(self, store):
        """Also a dead writer's temp file goes once it is older than the cutoff; a fresh one stays."""
        kept = back_up(store, 100, T0, {"scsi0": noise(2 * CS)})
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        orphan_size = chunk_path(store, orphan).stat().st_size
        stale, fresh = (chunk_path(store, orphan).parent / f".{orphan}.{n}.tmp" for n in ("stale", "fresh"))
        stale.write_bytes(b"half a chunk")
        fresh.write_bytes(b"half a chunk")
        age(stale, 2 * HOUR)
        result = store.gc(now=time.time() - 1)
        assert (result.chunks_removed, result.chunks_kept, stale.exists(), fresh.exists()) == (0, 3, False, True)
        # the orphan is kept for being new, and said so: when a gc will take it
        mtime = chunk_path(store, orphan).stat().st_mtime
        assert (result.chunks_too_new, result.removable_after) == (1, mtime + 300.0)
        result = store.gc(now=time.time() + HOUR)
        assert (result.chunks_removed, result.bytes_removed, result.chunks_kept) == (1, orphan_size, 2)
        assert not chunk_path(store, orphan).exists()
        assert store.verify(str(kept.id)).ok

    def test_gc_keeps_what_a_long_backup_reused_where_its_clock_runs_ahead_of_the_store(self, store, monkeypatch):
        """The backup's node runs 10 minutes ahead of the store's clock (an NFS server's), beyond
        gc's margin. Early on, the backup reuses an old chunk no snapshot names, which sets the
        chunk's time to the store's now; a gc an hour later, while the backup still runs, must
        not take it for older than the backup's start."""
        from drivers.backup import writer as writer_module

        data = noise(CS, seed=11)
        orphan, _ = store.put_chunk(data)
        age(chunk_path(store, orphan), 2 * HOUR)
        monkeypatch.setattr(writer_module, "time", _Ahead())
        with store.begin(100, T0) as writer:
            assert writer.put_chunk(data) == (orphan, 0)  # reused
            assert store.gc(now=time.time() + HOUR).chunks_removed == 0
            snapshot = _commit_one(writer, orphan)
        assert store.verify(str(snapshot.id)).ok

    def test_gc_keeps_what_a_backup_begun_after_its_scan_reused_where_its_clock_runs_ahead(self, store, monkeypatch):
        """gc's node runs 10 minutes ahead of the store's clock: a backup begun after gc looked
        for running ones reuses an old chunk no snapshot names; gc must not take it for old."""
        from drivers.backup import store as store_module

        data = noise(CS, seed=12)
        orphan = orphan_of(store, data)
        age(chunk_path(store, orphan), 2 * HOUR)
        monkeypatch.setattr(store_module, "time", _Ahead())
        scan, begun = store._live_partials, []

        def scan_then_begin() -> tuple:
            found = scan()
            begun.append(store.begin(100, T0))
            assert begun[0].put_chunk(data) == (orphan, 0)  # reused
            return found

        monkeypatch.setattr(store, "_live_partials", scan_then_begin)
        assert store.gc().chunks_removed == 0
        with begun[0] as writer:
            snapshot = _commit_one(writer, orphan)
        assert store.verify(str(snapshot.id)).ok

    def test_gc_reads_the_store_clock_without_room_and_stops_where_it_cannot(self, tmp_path):
        """gc dates its start by the store's clock (a node's may run ahead of it): by a file it
        makes, or where the store has no room for one (no inode left), by touching its folder;
        where it can do neither (a read-only store), it stops before removing anything (it took
        the node's clock before)."""
        from tests.helpers import tmpfs

        with tmpfs(tmp_path / "store", "4m,nr_inodes=64") as path:
            store = ChunkStore(path, chunk_size=CS)
            orphan = orphan_of(store, noise(CS, seed=13))
            age(chunk_path(store, orphan), 2 * HOUR)
            filler = path / "filler"
            filler.mkdir()
            with contextlib.suppress(OSError):
                for n in range(100):
                    (filler / str(n)).touch()
            with pytest.raises(OSError):
                (path / "one-more").touch()  # no inode left: gc's clock file cannot be made
            assert store.gc().chunks_removed == 1
            shutil.rmtree(filler)
            orphan, _ = store.put_chunk(noise(CS, seed=14))
            age(chunk_path(store, orphan), 2 * HOUR)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
            try:
                with pytest.raises(Refused, match=rf"gc stopped before removing anything: the clock of {path} "
                                                  r"cannot be read \(Read-only file system\)"):
                    store.gc()
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)

    def test_gc_keeps_an_unreferenced_chunk_younger_than_the_margin(self, store):
        orphan = orphan_of(store, noise(CS))
        assert store.gc().chunks_removed == 0
        assert chunk_path(store, orphan).exists()

    def test_gc_refuses_chunks_with_no_vm_folder_beside_them(self, store, tmp_path):
        """A store copied into place (rsync -a: `.chunks` first, in name order, with their old
        times) and gc run on it before `vm/` arrived: no backup names its chunks yet, and none
        is garbage. gc stops, naming the folder; once it is there, gc goes on."""
        back_up(store, 100, T0, {"scsi0": noise(2 * CS)})
        copy = ChunkStore(tmp_path / "copy", chunk_size=CS)
        subprocess.run(["cp", "-a", str(store.root), str(copy.root)], check=True)
        shutil.rmtree(copy.root / "vm")
        with pytest.raises(Refused, match=rf"^gc stopped before removing anything: {copy.root} has chunks and no "
                                          rf"vm/ folder.* make the folder {copy.root / 'vm'} and run gc again"):
            copy.gc(now=time.time() + HOUR)
        assert len(chunk_files(copy)) == 2
        (copy.root / "vm").mkdir()
        assert copy.gc(now=time.time() + HOUR).chunks_removed == 2
        opened = ChunkStore(tmp_path / "opened", chunk_size=CS)  # for a first backup that then failed
        opened.root.mkdir()
        opened.check_chunk_size()  # records written in .chunks: no chunk there, nothing refused
        assert opened.gc().chunks_removed == 0

    def test_gc_frees_the_chunks_only_a_forgotten_snapshot_used(self, store):
        shared = noise(CS, seed=1)
        old = back_up(store, 100, T0, {"scsi0": shared + noise(CS, seed=2)})
        new = back_up(store, 100, T0 + timedelta(days=1), {"scsi0": shared + noise(CS, seed=3)})
        store.forget(str(old.id))
        assert store.gc(now=time.time() + HOUR).chunks_removed == 1
        assert store.verify(str(new.id)).ok

    def test_gc_keeps_what_a_snapshot_with_a_damaged_manifest_indexes_and_goes_on(self, store):
        """A damaged manifest does not stop gc, nor free the chunks its sound index names."""
        data = noise(2 * CS)
        snapshot = back_up(store, 100, T0, {"scsi0": data})
        (store.root / "vm" / "100" / snapshot.id.time_text / "manifest.json").write_text("{")
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        assert store.gc(now=time.time() + HOUR).chunks_removed == 1
        assert not chunk_path(store, orphan).exists()
        assert [store.read_chunk(store.codec.digest(c)) for c in chunks(data)] == chunks(data)

    def test_gc_stops_before_removing_anything_when_an_index_cannot_be_read(self, store):
        """The chunks of an index that does not parse cannot be known: gc removes nothing and
        names the way out."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        (store.root / "vm" / "100" / snapshot.id.time_text / "scsi0.index.json").write_text("{")
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        with pytest.raises(Refused, match=r"gc stopped before removing anything: .*scsi0\.index\.json: not valid "
                                          r"JSON.*'stork backup forget --damaged vm/100/"):
            store.gc(now=time.time() + HOUR)
        assert chunk_path(store, orphan).exists()

    def test_gc_stops_at_an_index_that_is_a_symlink_and_forget_damaged_lets_it_go_on(self, store):
        """A symlink is never followed, so its index's chunks cannot be known: gc removes
        nothing, and the backup, damaged so, goes with forget --damaged (then gc runs)."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        index = store.root / "vm" / "100" / snapshot.id.time_text / "scsi0.index.json"
        (store.root / "elsewhere.json").write_bytes(index.read_bytes())
        index.unlink()
        index.symlink_to(store.root / "elsewhere.json")
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        with pytest.raises(Refused, match=r"gc stopped before removing anything: .*scsi0\.index\.json"):
            store.gc(now=time.time() + HOUR)
        assert chunk_path(store, orphan).exists()
        assert "scsi0.index.json" in store.forget(str(snapshot.id), damaged=True)
        assert store.gc(now=time.time() + HOUR).chunks_removed == 2

    def test_forget_damaged_refuses_a_backup_a_newer_stork_wrote(self, store):
        """Not damaged, only newer: its protection holds against --damaged."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        manifest = store.root / "vm" / "100" / snapshot.id.time_text / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 2', 1))
        assert [d.id for d in store.listing().damaged] == [snapshot.id]  # this stork cannot read it
        with pytest.raises(Refused, match=r"is not damaged: .*format version 2.*a newer stork wrote it"):
            store.forget(str(snapshot.id), damaged=True)

    def test_gc_stops_at_an_index_that_parses_but_is_not_the_one_its_manifest_sealed(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        index = store.root / "vm" / "100" / snapshot.id.time_text / "scsi0.index.json"
        index.write_bytes(index.read_bytes() + b"\n")  # still an index, no longer the sealed one
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        with pytest.raises(Refused, match=r"scsi0\.index\.json does not match the checksum in its manifest"):
            store.gc(now=time.time() + HOUR)
        assert chunk_path(store, orphan).exists()

    def test_gc_stops_when_an_index_its_manifest_names_is_missing(self, store):
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        (store.root / "vm" / "100" / snapshot.id.time_text / "scsi0.index.json").unlink()
        orphan, _ = store.put_chunk(noise(CS, seed=9))
        with pytest.raises(Refused, match=r"gc stopped before removing anything: .*scsi0\.index\.json: no such file"):
            store.gc(now=time.time() + HOUR)
        assert chunk_path(store, orphan).exists()

    def test_gc_keeps_what_a_backup_in_another_process_stored_or_reused(self, store):
        """The writer in the child holds its partial's lock: every chunk it touched survives a gc
        that would remove any chunk an hour old, referenced by an index yet or not."""
        old = back_up(store, 100, T0, {"scsi0": noise(CS, 1) + noise(CS, 2)})
        reused, dropped = store.index(str(old.id), "scsi0").chunks
        for path in chunk_files(store):
            age(path, 2 * HOUR)
        store.forget(str(old.id))  # from now on only the running backup refers to `reused`

        ready, proceed = FORK.Event(), FORK.Event()
        child = FORK.Process(target=_slow_backup, args=(str(store.root), reused, ready, proceed))
        child.start()
        try:
            assert ready.wait(20)
            result = store.gc(now=time.time() + HOUR)
        finally:
            proceed.set()
            child.join(20)
        assert child.exitcode == 0
        assert (result.chunks_removed, result.chunks_kept, result.partials_removed) == (1, 3, 0)
        assert not chunk_path(store, dropped).exists()
        (snapshot,) = store.snapshots()
        assert store.verify(str(snapshot.id)).ok

    def test_gc_keeps_a_live_writer_of_its_own_process(self, store):
        with store.begin(100, T0) as writer:
            digest, _ = writer.put_chunk(noise(CS))
            assert store.gc(now=time.time() + HOUR).partials_removed == 0
            writer.add_index("scsi0", Index("raw", CS, [digest], CS))
            writer.commit()
        assert store.verify("vm/100/2026-11-26T12:00:00Z").ok

    def test_a_damaged_chunk_moved_aside_is_kept_for_a_look_then_removed_by_gc(self, store):
        """verify moves it aside as <digest>.bad, dated then; gc leaves it for QUARANTINE,
        then removes it and counts it apart."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        (digest,) = store.index(str(snapshot.id), "scsi0").chunks
        path = chunk_path(store, digest)
        age(path, 90 * 86400)  # an old chunk: its age must not count towards its time aside
        path.write_bytes(path.read_bytes()[:-1] + b"!")
        assert not store.verify(str(snapshot.id)).ok
        bad = path.with_name(f"{digest}.bad")
        assert bad.exists() and not path.exists() and time.time() - bad.stat().st_mtime < 60
        assert store.gc(now=time.time() + HOUR).bad_chunks_removed == 0 and bad.exists()
        assert store.gc(now=time.time() + QUARANTINE + HOUR).bad_chunks_removed == 1 and not bad.exists()

    def test_a_chunk_set_aside_for_a_read_error_that_passed_is_put_back_not_removed(self, store):
        """A soft NFS mount turns a read's timeout into EIO: verify set a sound chunk aside.
        Once its time aside is over, gc reads it again: sound, and named by a backup, it is
        put back (the backup verifies sound again), where it would have been removed with the
        only copy of that data. One that reads damaged still, or that no backup names, goes."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS, 1) + noise(CS, 2)})
        sound, rotten = store.index(str(snapshot.id), "scsi0").chunks
        for digest in (sound, rotten):
            path = chunk_path(store, digest)
            path.rename(path.with_name(f"{digest}.bad"))  # as verify moves it aside
        bad = chunk_path(store, rotten).with_name(f"{rotten}.bad")
        bad.write_bytes(bad.read_bytes()[:-1] + b"!")
        orphan, _ = store.put_chunk(noise(CS, 3))
        chunk_path(store, orphan).rename(chunk_path(store, orphan).with_name(f"{orphan}.bad"))
        result = store.gc(now=time.time() + QUARANTINE + HOUR)
        assert (result.bad_chunks_restored, result.bad_chunks_removed) == (1, 2)
        assert chunk_path(store, sound).exists() and not chunk_path(store, sound).with_name(f"{sound}.bad").exists()
        assert not bad.exists() and not chunk_path(store, rotten).exists()
        assert [p.digest for p in store.verify(str(snapshot.id)).problems] == [rotten]

    def test_a_chunk_stored_anew_since_verify_read_it_is_not_moved_aside(self, store):
        """Between verify's read and its quarantine, gc may take the damaged file and a backup
        store the chunk anew: the quarantine reads it again under the lock and leaves it."""
        snapshot = back_up(store, 100, T0, {"scsi0": noise(CS)})
        (digest,) = store.index(str(snapshot.id), "scsi0").chunks
        store._quarantine(digest)
        assert chunk_path(store, digest).exists() and not chunk_path(store, digest).with_name(f"{digest}.bad").exists()

    def test_gc_running_alongside_backups_never_breaks_one(self, store):
        """Writers re-back-up the same data and forget the previous backup before committing,
        so between those steps only the running backup refers to its chunks; gc loops with a
        margin of only 50 ms all the while. Every snapshot left verifies."""
        done = threading.Event()

        def backups(vmid: int) -> None:
            previous = None
            for round in range(6):
                with store.begin(vmid, T0 + timedelta(minutes=round)) as writer:
                    data = noise(2 * CS, seed=vmid) + noise(2 * CS, seed=vmid * 100 + round)
                    digests = [writer.put_chunk(c)[0] for c in chunks(data)]
                    writer.add_index("scsi0", Index("raw", len(data), digests, CS))
                    if previous:
                        store.forget(str(previous.id))
                    previous = writer.commit()

        def collect() -> int:
            removed = 0
            while not done.is_set():
                removed += store.gc(margin=0.05).chunks_removed
            return removed

        with ThreadPoolExecutor(4) as pool:
            collector = pool.submit(collect)
            list(pool.map(backups, (100, 101, 102)))
            done.set()
            collector.result()
        snapshots = store.snapshots()
        assert [s.id.vmid for s in snapshots] == [100, 101, 102]
        assert all(store.verify(str(s.id)).ok for s in snapshots)
        store.gc(now=time.time() + HOUR)
        assert len(chunk_files(store)) == 12 and all(store.verify(str(s.id)).ok for s in snapshots)

    def test_gc_removes_the_partial_of_a_writer_that_died(self, store):
        child = FORK.Process(target=_die_while_writing, args=(str(store.root),))
        child.start()
        child.join(20)
        assert [n for n in os.listdir(store.root / "vm" / "100") if n.startswith(".partial-")]
        result = store.gc(now=time.time() + HOUR)
        assert (result.partials_removed, result.chunks_removed) == (1, 1)
        assert os.listdir(store.root / "vm" / "100") == [".lock"]


def _slow_backup(root: str, reused: str, ready, proceed) -> None:
    """A backup that reuses one old chunk, writes two new ones and names only one of those in
    an index before it pauses; it commits when told to."""
    with ChunkStore(root, chunk_size=CS).begin(100, T0 + timedelta(days=1)) as writer:
        assert writer.reuse_chunk(reused)
        new, _ = writer.put_chunk(noise(CS, seed=11))
        writer.add_index("scsi0", Index("raw", 2 * CS, [reused, new], CS))
        pending, _ = writer.put_chunk(noise(CS, seed=12))
        ready.set()
        assert proceed.wait(20)
        writer.add_index("scsi1", Index("raw", CS, [pending], CS))
        writer.commit()


def _die_while_writing(root: str) -> None:
    writer = ChunkStore(root, chunk_size=CS).begin(100, T0)
    writer.put_chunk(noise(CS))
    os._exit(0)  # no abort, no cleanup: as if killed


class TestSafety:
    def test_a_symlinked_guest_folder_is_refused_and_not_followed(self, store, tmp_path):
        """Every use of that guest's folder is refused; the listing of every guest passes it
        over (one guest's odd folder stops no other guest's backups), and gc stops at it."""
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / "2026-11-26T12:00:00Z").mkdir(parents=True)
        (store.root / "vm").mkdir()
        (store.root / "vm" / "100").symlink_to(elsewhere)
        for attempt in (lambda: store.snapshots(100), lambda: store.snapshot("vm/100/2026-11-26T12:00:00Z"),
                        lambda: store.begin(100, T0 + timedelta(hours=1)), lambda: store.gc()):
            with pytest.raises(Refused, match=r"symlink|not a directory"):
                attempt()
        assert store.snapshots() == []
        assert os.listdir(elsewhere) == ["2026-11-26T12:00:00Z"]

    def test_a_symlink_at_a_chunk_path_is_refused_and_not_followed(self, store, tmp_path):
        data = noise(CS)
        digest = store.codec.digest(data)
        target = tmp_path / "precious"
        target.write_bytes(store.codec.encode(data))
        age(target, HOUR)
        before = target.stat().st_mtime
        chunk_path(store, digest).parent.mkdir(parents=True)
        chunk_path(store, digest).symlink_to(target)
        with pytest.raises(Refused, match="symlink"):
            store.put_chunk(data)
        with pytest.raises(Refused, match="symlink"):
            store.read_chunk(digest)
        assert target.stat().st_mtime == before

    def test_status_reports_the_file_system_of_the_root(self, store):
        total, used, available = store.status()
        assert 0 < available <= total and 0 <= used <= total

    def test_a_missing_root_or_a_file_as_root_is_a_clear_error(self, tmp_path):
        with pytest.raises(NotFound, match=f"backup storage {tmp_path / 'nowhere'}: no such directory"):
            ChunkStore(tmp_path / "nowhere").snapshots()
        (tmp_path / "file").write_text("")
        with pytest.raises(Refused, match="not a directory"):
            ChunkStore(tmp_path / "file").put_chunk(b"x")
        assert not (tmp_path / "nowhere").exists()

    def test_a_store_not_made_yet_opens_to_be_read_and_holds_nothing(self, tmp_path):
        """A sync's new target, say: nothing is made or recorded, and nothing refused."""
        store = ChunkStore(tmp_path / "not-yet")
        store.check_key(record=False)
        store.check_chunk_size(record=False)
        assert not (tmp_path / "not-yet").exists()

    BAD_IDS = [
        ("no time", "vm/100"),
        ("guest id below 100", "vm/99/2026-11-26T12:00:00Z"),
        ("zero-padded guest id", "vm/0100/2026-11-26T12:00:00Z"),
        ("another kind", "ct/100/2026-11-26T12:00:00Z"),
        ("a space for the T", "vm/100/2026-11-26 12:00:00Z"),
        ("an offset", "vm/100/2026-11-26T12:00:00+01:00"),
        ("fractional seconds", "vm/100/2026-11-26T12:00:00.5Z"),
        ("no such day", "vm/100/2026-02-30T12:00:00Z"),
        ("a trailing part", "vm/100/2026-11-26T12:00:00Z/manifest.json"),
        ("a parent folder", "vm/100/.."),
        ("empty", ""),
        ("not text", 100),
    ]

    @pytest.mark.parametrize(("what", "text"), BAD_IDS, ids=[b[0] for b in BAD_IDS])
    def test_an_invalid_backup_id_is_refused_in_one_line(self, what, text):
        with pytest.raises(InvalidName, match=r"^invalid backup id .*: .*") as caught:
            backup_id(text)
        assert "\n" not in str(caught.value)

    def test_a_valid_backup_id_round_trips(self):
        parsed = backup_id("vm/100/2026-11-26T12:00:00Z")
        assert parsed == BackupId(100, T0) and str(parsed) == "vm/100/2026-11-26T12:00:00Z"

    @pytest.mark.parametrize("name", ["", "../x", "Scsi0", "a/b", "-x", "x" * 65, "scsi0.index"])
    def test_an_invalid_disk_key_is_refused(self, name):
        with pytest.raises(InvalidName, match="invalid disk key"):
            disk_key(name)

    @pytest.mark.parametrize("name", ["manifest.json", "state.json", "scsi0.index.json", "../guest.conf", ".lock"])
    def test_a_blob_may_not_take_a_name_the_store_uses(self, name):
        with pytest.raises(InvalidName, match="invalid blob name"):
            blob_name(name)

    def test_a_time_without_zone_is_refused(self, store):
        with pytest.raises(InvalidName, match="no time zone"):
            store.begin(100, datetime(2026, 11, 26, 12))


def test_a_store_made_with_another_chunk_size_is_refused(tmp_path):
    """Opened with another chunk size, every stored chunk would seem damaged: the store
    records its own when first opened, and another is one refusal."""
    root = tmp_path / "sized"
    root.mkdir()
    ChunkStore(root).check_chunk_size()
    ChunkStore(root).check_chunk_size()  # the same size again: fine
    with pytest.raises(Refused, match=f"backup storage {root} holds chunks of 4194304 bytes, not 1048576"):
        ChunkStore(root, chunk_size=1 << 20).check_chunk_size()


def test_verify_names_a_patch_whose_chunks_do_not_fit_together(store):
    """Each chunk sound, but the patch's own chunk is shorter than its runs: verify says so
    (restore would refuse it) with the disk and offset."""
    base, own = b"b" * CS, b"o" * 16
    with store.begin(100) as writer:
        under, _ = writer.put_chunk(base)
        patch, _ = writer.put_chunk(own)
        writer.add_index("scsi0", Index("raw", CS, [Patch(under, patch, ((0, 32),))], CS))
        snap = writer.commit()
    result = store.verify(str(snap.id))
    assert not result.ok and [(p.digest, p.places) for p in result.problems] == [(patch, (("scsi0", 0),))]
    assert "16 bytes where 32 belong" in result.problems[0].error
