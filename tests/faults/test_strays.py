"""Entries named like volumes that are not volumes (a directory, a dangling symlink, a FIFO),
as a user with a shell on the node can leave them: listed as not-a-volume, every command that
meets one says so in one line naming its path, and nothing of the guest's real disks is lost."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import storage_path

STRAYS: dict[str, Callable[[Path], None]] = {
    "directory": lambda p: p.mkdir(),
    "symlink": lambda p: p.symlink_to(p.parent / "nowhere.raw"),
    "fifo": lambda p: os.mkfifo(p),
}
KINDS = {"directory": "a directory", "symlink": "a symlink", "fifo": "a FIFO"}


def guest_with_stray(stork, vmid, kind: str, fmt: str = "raw") -> tuple[int, Path, str]:
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    path = storage_path("local") / str(g) / f"vm-{g}-disk-3.{fmt}"
    STRAYS[kind](path)
    return g, path, f"local:{g}/vm-{g}-disk-3.{fmt}"


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.is_symlink() or path.exists():
        path.unlink()


@pytest.mark.parametrize("kind", list(STRAYS))
def test_volume_list_shows_a_stray_entry_as_not_a_volume(stork, vmid, kind):
    g, path, volid = guest_with_stray(stork, vmid, kind)
    try:
        code, out, err = stork("volume", "list", "local")
        assert code == 0, err
        row = next(line for line in out.splitlines() if line.startswith(volid))
        assert f"NOT A VOLUME ({KINDS[kind]})" in row
        code, out, _ = stork("--json", "volume", "list", "local")
        entry = next(v for v in json.loads(out) if v["volid"] == volid)
        assert entry["problem"] == f"not a regular file: {path} is {KINDS[kind]}"
        assert next(v for v in json.loads(out) if v["volid"] == f"local:{g}/vm-{g}-disk-0.raw")["problem"] == ""
    finally:
        remove(path)


@pytest.mark.parametrize("kind", list(STRAYS))
def test_volume_info_of_a_stray_entry_is_one_line_naming_its_path(stork, vmid, kind):
    _, path, volid = guest_with_stray(stork, vmid, kind, "qcow2")
    try:
        code, out, err = stork("volume", "info", volid)
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        assert f"{volid}: not a regular file: {path} is {KINDS[kind]}" in err
    finally:
        remove(path)


@pytest.mark.parametrize("kind", list(STRAYS))
def test_volume_info_of_a_base_beside_a_stray_entry_lists_its_clones(stork, client, vmid, kind):
    """A base's clones are found by reading every volume's backing: a stray entry among them
    is skipped, not a traceback."""
    g, path, _ = guest_with_stray(stork, vmid, kind, "qcow2")
    try:
        assert stork("template", g)[0] == 0
        base = client.guest(g).disks["scsi0"]
        c = vmid()
        assert stork("clone", g, c, "--linked")[0] == 0
        code, out, err = stork("--json", "volume", "info", base)
        assert code == 0, err
        assert json.loads(out)["clones"] == [client.guest(c).disks["scsi0"]]
    finally:
        remove(path)


@pytest.mark.parametrize("kind", list(STRAYS))
def test_guest_destroy_beside_a_stray_entry_frees_the_disks_and_names_what_it_kept(stork, client, vmid, kind):
    g, path, _ = guest_with_stray(stork, vmid, kind)
    disk = client.guest(g).disks["scsi0"]
    try:
        code, _, err = stork("guest", "destroy", g)
        assert code == 0, err
        assert not client.guest_store.exists(g)
        assert not (storage_path("local") / str(g) / f"vm-{g}-disk-0.raw").exists(), disk
        assert path.is_symlink() or path.exists()  # not ours to remove: left for the operator
    finally:
        remove(path)


@pytest.mark.parametrize("kind", list(STRAYS))
def test_guest_destroy_of_a_disk_replaced_by_a_stray_entry_is_refused_naming_its_path(stork, client, vmid, kind):
    """The disk itself replaced (the file gone, a directory, symlink or FIFO at its name): the
    destroy fails in one line naming the path, frees nothing and keeps the guest."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M", "--disk", "scsi1=local:8M")[0] == 0
    disks = client.guest(g).disks
    path = storage_path("local") / str(g) / f"vm-{g}-disk-1.raw"  # the second: checked before the first is freed
    path.unlink()
    STRAYS[kind](path)
    try:
        code, out, err = stork("guest", "destroy", g)
        assert (code, out) == (1, "") and err.count("\n") == 1, err
        assert f"not a regular file: {path} is {KINDS[kind]}" in err
        assert client.guest(g).disks == disks and client.guest(g).lock == ""
        assert (storage_path("local") / str(g) / f"vm-{g}-disk-0.raw").is_file()
    finally:
        remove(path)


def test_a_guest_folder_that_is_a_symlink_is_listed_as_not_a_volume(stork, vmid, tmp_path):
    """local/<vmid> a symlink to a directory elsewhere: its files are not the storage's, and
    `volume list` says so as `volume info` does, instead of leaving it out."""
    g = vmid()
    (tmp_path / f"vm-{g}-disk-0.raw").write_bytes(b"\0" * 4096)
    folder = storage_path("local") / str(g)
    folder.symlink_to(tmp_path)
    try:
        code, out, err = stork("volume", "list", "local")
        assert code == 0, err
        [row] = [line for line in out.splitlines() if line.startswith(f"local:{g}/")]
        assert row.split()[0] == f"local:{g}/" and row.endswith("NOT A VOLUME (a symlink)"), row
        code, _, err = stork("volume", "info", f"local:{g}/vm-{g}-disk-0.raw")
        assert code == 1 and str(folder) in err
    finally:
        folder.unlink()
    assert (tmp_path / f"vm-{g}-disk-0.raw").exists()  # never followed, never touched


def test_a_volume_removed_by_hand_that_a_guest_lists_is_forgotten_with_forget(stork, client, vmid):
    """A volume removed by hand while its guest keeps it as unused: `volume free` calls it
    unknown and names `--forget`, which drops it from the guest. `--forget` of a volume that
    exists, or that no guest lists, is refused in one line, and changes nothing."""
    g = vmid()
    code, _, err = stork("guest", "create", g, *(f"--disk=scsi{i}=local:8M" for i in range(3)))
    assert code == 0, err
    disks = client.guest(g).disks
    for key in ("scsi1", "scsi2"):
        assert stork("disk", "detach", g, key)[0] == 0
    gone, kept = disks["scsi1"], disks["scsi2"]
    (storage_path("local") / gone.split(":", 1)[1]).unlink()
    code, _, err = stork("volume", "free", gone)
    assert (code, err) == (1, f"stork: unknown volume {gone} (guest {g} still lists it: "
                              f"'stork volume free --forget {gone}' drops it)\n")
    code, _, err = stork("volume", "free", "--forget", kept)
    assert (code, err) == (1, f"stork: {kept} exists: free it (--forget is for a volume gone already)\n")
    assert client.guest(g).unused == (gone, kept)
    code, out, err = stork("--json", "volume", "free", "--forget", gone)
    assert code == 0, err
    assert json.loads(out)["result"] == {"forgot": gone, "guests": [g]}
    assert client.guest(g).unused == (kept,) and (storage_path("local") / kept.split(":", 1)[1]).exists()
    code, _, err = stork("volume", "free", "--forget", gone)
    assert (code, err) == (1, f"stork: unknown volume {gone}: no guest of node node1 lists it\n")


def test_a_volume_on_a_storage_not_mounted_is_neither_called_unknown_nor_forgotten(tmp_path):
    """Its storage unmounted, a volume looks gone: `volume free` and `volume free --forget` are
    refused for the storage (is_mountpoint), and the guest listing it keeps it."""
    from drivers import config
    from drivers.errors import StorageUnavailable
    from drivers.guests import Guest, GuestStore
    from worker.jobs.prepare import prepare_free

    (tmp_path / "m").mkdir()
    cfg = config.parse('[paths]\nguests = "g"\nlocks = "l"\n[storage.m]\ntype = "dir"\npath = "m"\n'
                       "is_mountpoint = true\n", tmp_path / "stork.toml", {"STORK_NODE": "n"})
    volid = "m:100/vm-100-disk-1.raw"
    GuestStore(cfg.guests_dir).create(Guest(100, "n", unused=(volid,)))
    for options in ({}, {"forget": True}):
        with pytest.raises(StorageUnavailable, match=r"is not a mounted file system \(is_mountpoint\)"):
            prepare_free({"volid": volid, **options}, cfg)
    assert GuestStore(cfg.guests_dir).read(100).unused == (volid,)
