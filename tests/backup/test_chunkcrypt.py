"""Encrypted backup storages (drivers/backup/crypt.py) on real files: names keyed, data sealed,
manifests authenticated; a wrong or missing key, a tampered chunk or manifest, and a key file
readable by others are each one clear refusal, never garbage restored; and end to end, a
guest backed up into the session's encrypted storage `secret` and restored equal."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drivers import backup_storage
from drivers.backup.crypt import EncryptedCodec, create_key, load_key
from drivers.backup.store import ChunkStore
from drivers.errors import AlreadyExists, ConfigError, Corrupt, Refused
from drivers.storage import StorageConfig
from tests.conftest import BASE
from tests.helpers import PATTERN_MIB, qemu_io_write, qemu_same, tmpfs, volume_path

DATA = b"the guest's secret data " * 40000


def secret_storage(tmp_path: Path, key: Path) -> StorageConfig:
    return StorageConfig("vault", "chunkstore", content=("backup",), options={"path": tmp_path / "vault",
                                                                             "keyfile": key})


@pytest.fixture
def key(tmp_path) -> Path:
    path = tmp_path / "vault.key"
    create_key(path)
    return path


def committed(store: ChunkStore, data: bytes = DATA) -> tuple[str, str]:
    with store.begin(100) as writer:
        digest, _ = writer.put_chunk(data)
        writer.add_blob("guest.conf", b"node = 'n'\n")
        snap = writer.commit()
    assert digest is not None
    return str(snap.id), digest


def test_chunks_are_named_by_a_keyed_hash_and_sealed(tmp_path, key):
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    _, digest = committed(store)
    assert digest != hashlib.sha256(DATA).hexdigest()  # the name does not confirm a guess of the data
    blob = (tmp_path / "vault" / ".chunks" / digest[:4] / digest).read_bytes()
    assert b"secret data" not in blob and blob[4] == 2
    assert store.read_chunk(digest) == DATA


def test_a_tampered_chunk_or_manifest_is_refused(tmp_path, key):
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    bid, digest = committed(store)
    chunk = tmp_path / "vault" / ".chunks" / digest[:4] / digest
    blob = bytearray(chunk.read_bytes())
    blob[-20] ^= 1
    chunk.write_bytes(bytes(blob))
    with pytest.raises(Corrupt, match=f"chunk {digest}: fails authentication"):
        store.read_chunk(digest)
    manifest = tmp_path / "vault" / bid / "manifest.json"
    doc = json.loads(manifest.read_bytes())
    doc["size"] += 1
    manifest.write_text(json.dumps(doc))
    with pytest.raises(Corrupt, match=f"backup {bid}: its manifest fails authentication"):
        store.snapshot(bid)


def test_a_tampered_or_copied_state_is_refused(tmp_path, key):
    """state.json (protected, notes, the verify result) is outside the manifest: it carries a
    MAC of its own, over the snapshot's id too, so neither an edit nor another snapshot's
    state (a protected one's, say) passes."""
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    first, _ = committed(store)
    store.set_protected(first, True)
    assert store.snapshot(first).state.protected
    with store.begin(100, datetime(2026, 1, 2, tzinfo=UTC)) as writer:
        second = str(writer.commit().id)
    state = tmp_path / "vault" / second / "state.json"
    own = state.read_bytes()
    doc = json.loads(own)
    state.write_text(json.dumps({**doc, "protected": True}))
    with pytest.raises(Corrupt, match=f"backup {second}: state.json: fails authentication"):
        store.snapshot(second)
    state.write_bytes((tmp_path / "vault" / first / "state.json").read_bytes())  # a protected one's
    with pytest.raises(Corrupt, match=f"backup {second}: state.json: fails authentication"):
        store.snapshot(second)
    state.unlink()
    with pytest.raises(Corrupt, match=f"backup {second}: state.json: missing"):
        store.snapshot(second)
    state.write_bytes(own)
    assert not store.snapshot(second).state.protected
    store.forget(second)


def test_a_snapshot_whose_state_was_forged_protected_is_forgotten_only_as_damaged(tmp_path, key):
    """An edit that fails authentication: unprotect cannot read the state, a plain forget
    believes the forged flag; `forget --damaged` removes it, saying why."""
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    bid, _ = committed(store)
    state = tmp_path / "vault" / bid / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_bytes()), "protected": True}))
    with pytest.raises(Corrupt, match=f"state.json: fails authentication.*'stork backup forget --damaged {bid}'"):
        store.set_protected(bid, False)
    with pytest.raises(Refused, match="is protected"):
        store.forget(bid)
    assert [str(d.id) for d in store.listing().damaged] == [bid]
    assert "fails authentication" in store.forget(bid, damaged=True)
    assert store.listing().ids == []


def test_a_snapshot_made_before_states_were_sealed_is_read_as_it_is(tmp_path, key):
    """Its manifest (MACed) does not say its state is sealed: a state without a MAC, or none,
    is read as it stands, so a store of earlier backups stays usable (a change writes a MAC,
    which for such a snapshot is not checked)."""
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    bid, _ = committed(store)
    folder = tmp_path / "vault" / bid
    doc = json.loads((folder / "manifest.json").read_bytes())
    assert doc.pop("sealed_state") is True
    raw = json.dumps(doc).encode()
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.mac").write_bytes(EncryptedCodec(load_key(key)).mac(raw))
    (folder / "state.json").unlink()
    assert store.snapshot(bid).state.protected is False
    (folder / "state.json").write_text(json.dumps({"version": 1, "notes": "old", "protected": True, "verify": None}))
    assert store.snapshot(bid).state.notes == "old"
    store.set_protected(bid, False)
    assert "mac" in json.loads((folder / "state.json").read_bytes())


def test_a_wrong_or_missing_key_is_one_refusal(tmp_path, key):
    committed(backup_storage(secret_storage(tmp_path, key)).open_for_backup())
    other = tmp_path / "other.key"
    create_key(other)
    with pytest.raises(Refused, match=r"the key file is not this store's key \(its fingerprint is [0-9a-f]{32}"):
        backup_storage(secret_storage(tmp_path, other)).open()
    plain = StorageConfig("vault", "chunkstore", content=("backup",), options={"path": tmp_path / "vault"})
    with pytest.raises(Refused, match="is encrypted: name its key file"):
        backup_storage(plain).open()


def test_an_encrypted_store_that_lost_its_key_record_is_not_taken_for_a_plain_one(tmp_path, key):
    """Its key's fingerprint record gone (a copy of the store that left out dot-files): with no
    key named it was taken for a plain store, every backup listed damaged (for `forget
    --damaged` to remove) and plain chunks written among the sealed ones. Now it is refused,
    naming the missing record; so is another key; its own key proves itself on a backup's
    manifest, and the record is written again."""
    from drivers.backup.files import KEY_FINGERPRINT

    bid, _ = committed(backup_storage(secret_storage(tmp_path, key)).open_for_backup())
    record = tmp_path / "vault" / ".chunks" / KEY_FINGERPRINT
    recorded = record.read_text()
    record.unlink()
    plain = StorageConfig("vault", "chunkstore", content=("backup",), options={"path": tmp_path / "vault"})
    for opening in (backup_storage(plain).open, backup_storage(plain).open_for_backup):
        with pytest.raises(Refused, match=f"holds encrypted backups \\(its key's fingerprint record, .chunks/"
                                          f"{KEY_FINGERPRINT}, is missing\\): name its key file"):
            opening()
    other = tmp_path / "other.key"
    create_key(other)
    with pytest.raises(Refused, match=r"not this store's key .*no backup's manifest authenticates with it"):
        backup_storage(secret_storage(tmp_path, other)).open_for_backup()
    assert not record.exists()
    store = backup_storage(secret_storage(tmp_path, key)).open_for_backup()
    assert record.read_text().strip() == recorded.strip()
    assert store.snapshot(bid).state.verify is None and not store.listing().damaged


def test_an_encrypted_store_that_lost_its_key_record_and_its_first_mac_is_not_taken_for_a_plain_one(tmp_path, key):
    """The first backup's manifest MAC is gone too (damage, or a hand): a chunk tells instead,
    sealed by a key. Taken for a plain store, new backups were written there in plain."""
    from drivers.backup.files import KEY_FINGERPRINT, MANIFEST_MAC

    committed(backup_storage(secret_storage(tmp_path, key)).open_for_backup())
    (tmp_path / "vault" / ".chunks" / KEY_FINGERPRINT).unlink()
    next((tmp_path / "vault" / "vm").rglob(MANIFEST_MAC)).unlink()
    plain = StorageConfig("vault", "chunkstore", content=("backup",), options={"path": tmp_path / "vault"})
    with pytest.raises(Refused, match=f"holds encrypted backups \\(its key's fingerprint record, .chunks/"
                                      f"{KEY_FINGERPRINT}, is missing\\): name its key file"):
        backup_storage(plain).open_for_backup()
    other = tmp_path / "other.key"
    create_key(other)
    with pytest.raises(Refused, match=r"not this store's key"):
        backup_storage(secret_storage(tmp_path, other)).open_for_backup()
    backup_storage(secret_storage(tmp_path, key)).open_for_backup()  # its own key opens the chunk: written again
    assert (tmp_path / "vault" / ".chunks" / KEY_FINGERPRINT).exists()


def test_a_key_for_a_store_of_plain_backups_is_refused(tmp_path, key):
    plain = StorageConfig("vault", "chunkstore", content=("backup",), options={"path": tmp_path / "vault"})
    committed(backup_storage(plain).open_for_backup())
    with pytest.raises(Refused, match="holds unencrypted backups"):
        backup_storage(secret_storage(tmp_path, key)).open()


def test_key_files_are_made_private_never_overwritten_and_checked(tmp_path, key):
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(AlreadyExists, match="is never overwritten"):
        create_key(key)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\): chmod 600 it"):
        load_key(key)
    key.chmod(0o600)
    key.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a stork key file"):
        load_key(key)
    with pytest.raises(ConfigError, match=f"^key file {tmp_path}: not a regular file$"):  # no traceback's words
        load_key(tmp_path)


def test_a_key_file_that_cannot_be_made_is_one_line_and_leaves_nothing(stork, tmp_path):
    code, out, err = stork("backup", "key", "create", tmp_path / "missing-dir" / "k")
    assert (code, out) == (1, "") and err == (f"stork: key file {tmp_path / 'missing-dir' / 'k'}: cannot create it: "
                                              "No such file or directory\n")
    with tmpfs(tmp_path / "full", "1m") as full:
        with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with pytest.raises(ConfigError, match="cannot write it: No space left on device"):
            create_key(full / "k")
        assert not (full / "k").exists()


def test_the_same_data_under_two_keys_has_unrelated_names():
    a, b = EncryptedCodec(os.urandom(32)), EncryptedCodec(os.urandom(32))
    assert a.digest(DATA) != b.digest(DATA) and a.fingerprint != b.fingerprint


def test_a_guest_backed_up_into_an_encrypted_storage_comes_back_equal(stork, client, vmid):
    g, r = vmid(), vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    disk = client.guest(g).disks["scsi0"]
    qemu_io_write(volume_path(disk), "raw", PATTERN_MIB, PATTERN_MIB, 0x2B)
    code, out, err = stork("--json", "backup", g, "--storage", "secret")
    assert code == 0, err
    backup = json.loads(out)["result"]["backup"]
    assert (BASE / "secret" / backup / "manifest.mac").exists()
    assert stork("verify", f"secret:{backup}")[0] == 0
    assert stork("restore", f"secret:{backup}", r)[0] == 0
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))
