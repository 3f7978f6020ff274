"""The backup storage type on real directories and a real tmpfs mount: reading never makes or
records a store, a store that must be a mount is refused while it is not mounted, and one
storage that cannot be opened hides no backup in another."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers import backup_storage, config
from drivers.backup.crypt import create_key
from drivers.backup.records import Index, Snapshot
from drivers.backup.store import ChunkStore
from drivers.errors import ConfigError, NotFound, Refused
from drivers.storage import StorageConfig
from tests.backup.test_chunkstore import T0, noise
from tests.helpers import tmpfs
from worker.jobs.prepare_backups import find_backup


def one_backup(store: ChunkStore, vmid: int = 100) -> Snapshot:
    """A backup of a 4 KiB disk (one short chunk) at T0."""
    with store.begin(vmid, T0) as writer:
        digest, _ = writer.put_chunk(noise(4096))
        writer.add_index("scsi0", Index("raw", 4096, [digest], store.chunk_size))
        writer.add_blob("guest.conf", b"node = 'n'\n")
        return writer.commit()


def chunkstore(path: Path, **options: object) -> StorageConfig:
    return StorageConfig("nas", "chunkstore", content=("backup",), options={"path": path, **options})


def test_reading_a_store_makes_and_records_nothing(tmp_path):
    """A listing or a lookup of a store that is not there yet leaves no directory behind (an
    unmounted NAS path stays empty); the first backup makes it and records its chunk size."""
    path = tmp_path / "nas" / "store"
    store = backup_storage(chunkstore(path)).open()
    assert not store.exists("vm/100/2026-11-26T12:00:00Z")
    with pytest.raises(NotFound, match="no such directory"):
        store.listing()
    assert not (tmp_path / "nas").exists()
    store = backup_storage(chunkstore(path)).open_for_backup()
    assert (path / ".chunks" / ".chunk-size").read_text().strip() == str(store.chunk_size)
    one_backup(store)
    assert [str(s.id) for s in backup_storage(chunkstore(path)).open().snapshots()] == ["vm/100/2026-11-26T12:00:00Z"]


@pytest.mark.parametrize("how", ["true", "holding folder"])
def test_a_store_that_must_be_a_mount_is_refused_until_it_is_mounted(tmp_path, how):
    """is_mountpoint: nothing is read or written beneath an unmounted mount point, so backups
    never land on the local disk; once mounted, the store works."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    path, wanted = (mount, True) if how == "true" else (mount / "stork", str(mount))
    storage = chunkstore(path, is_mountpoint=wanted)
    for opening in (backup_storage(storage).open, backup_storage(storage).open_for_backup):
        with pytest.raises(Refused, match=rf"backup storage 'nas': {mount} is not mounted \(is_mountpoint\)"):
            opening()
    assert list(mount.iterdir()) == []
    with tmpfs(mount, "16m"):
        store = backup_storage(storage).open_for_backup()
        one_backup(store)
        assert len(backup_storage(storage).open().snapshots()) == 1


def test_is_mountpoint_must_hold_the_store_path(tmp_path):
    storage = chunkstore(tmp_path / "a", is_mountpoint=str(tmp_path / "b"))
    with pytest.raises(Refused, match=f"is_mountpoint {tmp_path / 'b'} does not hold its path {tmp_path / 'a'}"):
        backup_storage(storage).open()


@pytest.mark.parametrize(("value", "message"), [
    ("'relative/mnt'", "is_mountpoint = 'relative/mnt': expected true"),
    ("5", "is_mountpoint = 5: expected true"),
])
def test_a_bad_is_mountpoint_is_a_config_error(tmp_path, value, message):
    text = f"[storage.nas]\ntype = 'chunkstore'\npath = 'b'\nis_mountpoint = {value}\n"
    with pytest.raises(ConfigError, match=message):
        config.parse(text, tmp_path / "stork.toml", {"STORK_NODE": "n"})


def test_a_storage_that_cannot_be_opened_hides_no_backup_in_another(tmp_path):
    """The key file of one encrypted storage is missing: a backup in another is still found,
    and one found nowhere says which storage could not be searched."""
    create_key(tmp_path / "gone.key")
    cfg = config.parse("[storage.plain]\ntype = 'chunkstore'\npath = 'plain'\n"
                       "[storage.vault]\ntype = 'chunkstore'\npath = 'vault'\nkeyfile = 'gone.key'\n",
                       tmp_path / "stork.toml", {"STORK_NODE": "n"})
    (tmp_path / "gone.key").unlink()
    store = backup_storage(cfg.storage("plain")).open_for_backup()
    made = one_backup(store)
    assert find_backup(cfg, str(made.id))[0] == "plain"
    with pytest.raises(NotFound, match=r"unknown backup vm/101/.*\(not searched: backup storage 'vault': key file "):
        find_backup(cfg, "vm/101/2026-11-26T12:00:00Z")
    with pytest.raises(ConfigError, match=r"key file .*gone\.key: cannot open it"):
        find_backup(cfg, f"vault:{made.id}")
