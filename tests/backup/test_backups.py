"""Backup and restore end to end, through the CLI, the queue and the workers, into the
session's chunk store (storage `backup`, type chunkstore): guests, templates and linked
clones backed up and restored equal (`qemu-img compare`), the store deduplicating across
them, verify finding damage and restore refusing it, protect/forget, prune and gc; and the
refusals, each one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BASE, NO_BTRFS, NO_CEPH, NO_XFS, NO_ZFS
from tests.helpers import PATTERN_MIB, crash, fill, orphans, qemu_io_write, qemu_same, snapshot, tmpfs, volume_path
from worker.jobs.backups import bitmap_name, incremental_refusal
from worker.testing import wait_for

STORE = BASE / "backup"


def guest_with_data(stork, g: int, fmt: str = "raw", size: str = "16M") -> str:
    code, _, err = stork("guest", "create", g, "--disk", f"scsi0=local:{size},format={fmt}", "--name", f"g{g}")
    assert code == 0, err
    disk = f"local:{g}/vm-{g}-disk-0.{fmt}"
    # bytes of this guest's own (a byte pattern from its id): no other guest's backup holds them
    qemu_io_write(volume_path(disk), fmt, PATTERN_MIB, PATTERN_MIB, 1 + g % 250)
    qemu_io_write(volume_path(disk), fmt, 5 * PATTERN_MIB, PATTERN_MIB // 2, 1 + (g + 7) % 250)
    return disk


def backed_up(stork, g: int, *more: str) -> dict:
    where = () if "--storage" in more else ("--storage", "backup")
    code, out, err = stork("--json", "backup", g, *more, *where)
    assert code == 0, err
    return json.loads(out)["result"]


def test_a_guest_comes_back_equal_as_a_new_guest(stork, client, vmid):
    g, r = vmid(), vmid()
    disk = guest_with_data(stork, g, "qcow2")
    result = backed_up(stork, g, "--notes", "before the upgrade")
    assert result["backup"].startswith(f"vm/{g}/") and result["size"] == 16 << 20
    assert 0 < result["written"] < 2 << 20  # two MiB of data, compressed; zero chunks not stored
    assert client.guest(g).lock == ""
    code, out, _ = stork("backup", "list", g)
    assert code == 0 and result["backup"] in out and "before the upgrade" in out
    code, out, _ = stork("backup", "show", result["backup"])
    assert code == 0 and "scsi0" in out and disk in out
    code, _, err = stork("restore", result["backup"], r, "--format", "raw")
    assert code == 0, err
    restored = client.guest(r)
    assert restored.name == f"g{g}" and list(restored.disks) == ["scsi0"] and not restored.template
    assert qemu_same(volume_path(disk), volume_path(restored.disks["scsi0"]))
    assert restored.disks["scsi0"].endswith(".raw")


def test_an_unchanged_re_backup_writes_nothing_and_a_template_with_clones_costs_little_more(stork, client, vmid):
    t, c1, c2 = vmid(), vmid(), vmid()
    guest_with_data(stork, t)
    assert backed_up(stork, t)["written"] > 0
    assert backed_up(stork, t)["written"] == 0  # unchanged: every chunk is there
    assert stork("template", t)[0] == 0
    template_backup = backed_up(stork, t)
    assert template_backup["written"] == 0  # a base holds the same data as the disk it was
    for c in (c1, c2):
        assert stork("clone", t, c)[0] == 0
        qemu_io_write(volume_path(client.guest(c).disks["scsi0"]), "qcow2", 9 * PATTERN_MIB, 4096, 0x70 + c % 16)
    clone_backup = backed_up(stork, c1)
    assert 0 < clone_backup["written"] < 1 << 20  # its own 4 KiB in one chunk, nothing of the base
    index = json.loads((STORE / clone_backup["backup"] / "scsi0.index.json").read_bytes())
    assert index["base"]["backup"] == template_backup["backup"]


def test_a_template_comes_back_as_a_template_and_a_linked_clone_as_a_full_guest(stork, client, vmid):
    t, c, rt, rc = vmid(), vmid(), vmid(), vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    assert stork("clone", t, c)[0] == 0
    clone_disk = client.guest(c).disks["scsi0"]
    qemu_io_write(volume_path(clone_disk), "qcow2", 2 * PATTERN_MIB, 4096, 0x7A)
    tb, cb = backed_up(stork, t)["backup"], backed_up(stork, c)["backup"]
    assert stork("restore", tb, rt)[0] == 0
    template = client.guest(rt)
    assert template.template and client.volume(template.disks["scsi0"]).is_base
    assert qemu_same(volume_path(client.guest(t).disks["scsi0"]), volume_path(template.disks["scsi0"]))
    assert stork("clone", rt, vmid())[0] == 0  # a restored template is clonable
    assert stork("restore", cb, rc, "--storage", "shared")[0] == 0  # away from its base: whole
    assert qemu_same(volume_path(clone_disk), volume_path(client.guest(rc).disks["scsi0"]))
    assert client.volume(client.guest(rc).disks["scsi0"]).parent is None


def chunk_of(backup: str, disk: str = "scsi0") -> Path:
    index = json.loads((STORE / backup / f"{disk}.index.json").read_bytes())
    digest = next(d for d in index["chunks"] if d)
    return STORE / ".chunks" / digest[:4] / digest


def test_verify_names_a_damaged_chunk_and_restore_refuses_it_leaving_nothing(stork, client, vmid):
    g, r = vmid(), vmid()
    guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    assert stork("verify", backup)[0] == 0
    chunk = chunk_of(backup)
    saved = chunk.read_bytes()
    try:
        chunk.write_bytes(saved[:-1] + bytes([saved[-1] ^ 0xFF]))
        code, _, err = stork("verify", backup)
        assert code == 1 and chunk.name in err and "scsi0 at byte" in err and err.count("\n") == 1
        assert not chunk.exists()  # moved aside: a new backup of the data stores it again
        code, out, _ = stork("backup", "show", backup)
        assert re.search(r"verified:\s+failed", out) and chunk.name in out
        volumes_before = sorted(os.listdir(BASE / "images"))
        code, _, err = stork("restore", backup, r)
        assert code == 1 and chunk.name in err
        assert not client.guest_store.exists(r) and sorted(os.listdir(BASE / "images")) == volumes_before
    finally:
        chunk.with_name(chunk.name + ".bad").unlink(missing_ok=True)  # verify moved it aside
    code, _, err = stork("verify", backup)
    assert code == 1 and chunk.name in err and "missing" in err.lower()
    chunk.write_bytes(saved)  # as the next backup of that data stores it again
    assert stork("verify", backup)[0] == 0 and stork("restore", backup, r)[0] == 0
    assert qemu_same(volume_path(client.guest(g).disks["scsi0"]), volume_path(client.guest(r).disks["scsi0"]))


def test_protect_keeps_a_backup_from_forget_and_prune_and_gc_removes_what_nothing_names(stork, client, vmid):
    g = vmid()
    guest_with_data(stork, g)
    first = backed_up(stork, g)["backup"]
    qemu_io_write(volume_path(client.guest(g).disks["scsi0"]), "raw", 12 * PATTERN_MIB, PATTERN_MIB, 0x55)
    second = backed_up(stork, g)["backup"]
    assert stork("backup", "protect", first)[0] == 0
    code, _, err = stork("backup", "forget", first)
    assert code == 1 and "protected" in err and err.count("\n") == 1
    code, out, err = stork("prune", g, "--storage", "backup", "--keep-last", "0", "--keep-daily", "0",
                           "--keep-hourly", "1", "--dry-run")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows == {second: "keep", first: "keep"}  # the newest for its hour; the other protected
    assert stork("backup", "unprotect", first)[0] == 0
    code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1")
    assert code == 0, err
    assert json.loads(out)["result"]["removed"] == 1
    code, out, _ = stork("backup", "list", g)
    assert second in out and first not in out
    code, out, err = stork("--json", "gc", "--storage", "backup")
    assert code == 0, err
    assert json.loads(out)["result"]["chunks_removed"] == 0  # inside gc's safety margin: kept for now
    assert stork("verify", second)[0] == 0


def test_a_backup_a_restore_reads_is_kept_from_forget_and_prune(stork, client, vmid, monkeypatch):
    """A restore of an old backup (to get data back) while the nightly prune or a hand forget
    would take it: the restore failed on a missing index, and a gc between took its chunks, the
    backup gone for good. A live job reading a backup keeps it, said as a protected one is; once
    the restore ended, the backup goes as decided."""
    from worker import runner

    g, r = vmid(), vmid()
    guest_with_data(stork, g)
    first = backed_up(stork, g)["backup"]
    second = backed_up(stork, g)["backup"]
    held: list = []
    with monkeypatch.context() as m:  # recorded and queued: a restore that has not ended
        m.setattr(runner, "send_steps", lambda record, start, sender=None: held.append((record, start)))
        restore = client.submit("restore", backup=first, newid=r)
    code, _, err = stork("backup", "forget", first)
    assert (code, err) == (1, f"stork: backup {first} is read by job {restore.id} (restore) now: forget it once that "
                              "ended\n")
    for dry in ([], ["--dry-run"]):
        code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1", *dry)
        assert code == 0, err
        pruned = json.loads(out)["result"]
        assert pruned["removed"] == 0 and f"{first}: backup {first} is read by job {restore.id}" in pruned["warning"]
        [decided] = [d for d in pruned["decisions"] if d["id"] == first]
        assert decided["keep"] and decided["reason"].startswith(f"kept: backup {first} is read by job {restore.id}")
    runner.send_steps(*held[0], client.app)
    assert client.wait(restore.id, timeout=60).state == "succeeded"
    assert stork("backup", "forget", first)[0] == 0
    code, out, _ = stork("backup", "list", g)
    assert second in out and first not in out


def test_a_verify_of_all_goes_on_past_a_backup_pruned_after_its_listing(stork, client, vmid, monkeypatch):
    """The nightly verify listed the store, then the prune forgot one of the backups listed: the
    verify stopped there, the backups after it not verified and no alert sent. It is noted as
    forgotten meanwhile, and the others are verified."""
    from drivers.backup.store import ChunkStore
    from drivers.errors import Corrupt
    from worker import records
    from worker.context import StepContext
    from worker.jobs import backups
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord, JobState

    g = vmid()
    guest_with_data(stork, g)
    first = backed_up(stork, g)["backup"]
    second = backed_up(stork, g)["backup"]
    listing = ChunkStore.listing

    def listed_then_pruned(store, *args, **kwargs):
        found = listing(store, *args, **kwargs)
        store.forget(first)  # the prune, between the verify's listing and its reads
        return found

    monkeypatch.setattr(ChunkStore, "listing", listed_then_pruned)
    params = KINDS["verify"].prepare({"storage": "backup"}, client.cfg)
    job = JobRecord(id=records.new_id(), kind="verify", node="node1", steps=["verify"], queues=["shared"],
                    params=params, state=JobState.RUNNING,
                    current={"step": 0, "name": "verify", "node": "node1", "worker": "test:1", "attempt": 1})
    records.create(client.r, job, {"phase": "queued"})
    ctx = StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="verify", worker="test:1", kinds=KINDS)
    try:
        with contextlib.suppress(Corrupt):  # other tests' backups, damaged on purpose, share the store
            backups.verify_backups(ctx)
        verified = ctx.job.result["verified"]
        assert verified[first] == "forgotten meanwhile" and verified[second] == "ok"
    finally:
        client.r.srem(records.ACTIVE, job.id)  # a hand-made record: no worker will ever end it


def test_one_damaged_backup_stops_no_other_backup_listing_prune_or_verify(stork, client, vmid):
    """Guest b's manifest loses its version field (a flipped byte): guest a's backups and
    prunes go on, `backup list` shows b's as DAMAGED with the reason, a prune keeps it, verify
    counts it, and `backup forget --damaged` removes it with a warning."""
    a, b = vmid(), vmid()
    guest_with_data(stork, a)
    guest_with_data(stork, b)
    first = backed_up(stork, a)["backup"]
    damaged = backed_up(stork, b)["backup"]
    manifest = STORE / damaged / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version"', b'"versiom"', 1))
    try:
        second = backed_up(stork, a)["backup"]
        assert second != first
        code, out, err = stork("backup", "list")
        assert code == 0, err
        row = next(line for line in out.splitlines() if line.startswith(damaged))
        assert "DAMAGED" in row and "format version None" in row and second in out
        code, out, _ = stork("--json", "backup", "list", b)
        assert [(r["id"], "format version None" in r["damaged"]) for r in json.loads(out)] == [(damaged, True)]
        code, out, err = stork("--json", "prune", a, "--storage", "backup", "--keep-last", "1")
        assert code == 0 and json.loads(out)["result"]["removed"] == 1, err
        code, out, err = stork("prune", b, "--storage", "backup", "--keep-last", "1", "--dry-run")
        assert code == 0, err
        assert re.search(rf"^{re.escape(damaged)}\s+keep\s+damaged, kept: .*format version None", out, re.M)
        code, out, err = stork("verify", "--all", "--storage", "backup")
        assert code == 1 and re.search(rf"\d+ of \d+ backup\(s\) damaged: {re.escape(damaged)}: .*format version", err)
        assert re.search(rf"{re.escape(damaged)} += damaged: .*format version", out), out  # each one named on stdout
        assert client.backup(second)[1].state.verify.ok  # verified, the damaged one notwithstanding
    finally:
        code, out, err = stork("backup", "forget", "--damaged", damaged)
    assert code == 0 and f"backup {damaged} could not be read" in err and "format version None" in err
    assert damaged not in stork("backup", "list")[1]
    code, _, err = stork("backup", "forget", "--damaged", second)
    assert code == 1 and f"backup {second} is not damaged" in err and err.count("\n") == 1


def test_a_prune_does_not_count_a_backup_its_verify_found_damaged(stork, client, vmid):
    """The newest backup's own chunk rots and verify says so: keep-last 1 keeps it (never
    removed by a prune) and the older, sound one too, which it must not stand for. Once the
    chunk is whole again and verified, it counts, and the older one goes."""
    g = vmid()
    guest_with_data(stork, g)
    first = backed_up(stork, g)["backup"]
    qemu_io_write(volume_path(client.guest(g).disks["scsi0"]), "raw", 13 * PATTERN_MIB, PATTERN_MIB, 0xA0 + g % 16)
    second = backed_up(stork, g)["backup"]
    index = json.loads((STORE / second / "scsi0.index.json").read_bytes())
    digest = index["chunks"][13 * PATTERN_MIB // index["chunk_size"]]  # this backup's own data (no other test's)
    chunk = STORE / ".chunks" / digest[:4] / digest
    saved = chunk.read_bytes()
    try:
        chunk.write_bytes(saved[:-1] + bytes([saved[-1] ^ 0xFF]))
        assert stork("verify", second)[0] == 1
        code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1")
        assert code == 0, err
        result = json.loads(out)["result"]
        reasons = {d["id"]: (d["keep"], d["reason"]) for d in result["decisions"]}
        assert result["removed"] == 0 and reasons[first][0] and reasons[second][0]
        assert reasons[second][1] == "its verify failed: kept, not counted (forget it by hand)"
    finally:
        chunk.with_name(chunk.name + ".bad").unlink(missing_ok=True)  # verify moved it aside
        chunk.write_bytes(saved)
    assert stork("verify", second)[0] == 0
    code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1")
    assert code == 0 and json.loads(out)["result"]["removed"] == 1, err
    assert first not in stork("backup", "list", g)[1]


def test_a_damaged_earlier_backup_is_not_built_on_and_stops_no_backup(stork, client, vmid):
    """The index of a template's backup, which its linked clone's backups build on, is
    damaged: the clone's next backup reads those chunks itself instead of failing, says so,
    and restores equal."""
    t, c, r = vmid(), vmid(), vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    assert stork("clone", t, c)[0] == 0
    template_backup = backed_up(stork, t)["backup"]
    backed_up(stork, c)
    clone_disk = client.guest(c).disks["scsi0"]
    qemu_io_write(volume_path(clone_disk), "qcow2", 3 * PATTERN_MIB, 4096, 0x33)
    index = STORE / template_backup / "scsi0.index.json"
    saved = index.read_bytes()
    index.write_bytes(saved.replace(b'"chunks"', b'"chunkz"', 1))
    try:
        result = backed_up(stork, c)
    finally:
        index.write_bytes(saved)
    assert re.search(rf"{re.escape(client.guest(t).disks['scsi0'])} read whole, not built on its earlier backup: "
                     rf"backup {re.escape(template_backup)}: scsi0.index.json does not match", result["warning"])
    assert stork("restore", result["backup"], r)[0] == 0
    assert qemu_same(volume_path(clone_disk), volume_path(client.guest(r).disks["scsi0"]))


@pytest.fixture
def locked(client, vmid, stork):
    from drivers.guests import GuestStore

    g = vmid()
    guest_with_data(stork, g)
    store = GuestStore(BASE / "guests")
    with store.editing(g) as box:
        box[0] = box[0].with_(lock="destroy", lock_job="someone-else")
    yield g
    with store.editing(g) as box:  # other tests look for guests left locked
        box[0] = box[0].with_(lock="", lock_job="")


REFUSALS = [
    ("unknown backup", "restore vm/100/2020-01-01T00:00:00Z {new}", "unknown backup vm/100/2020-01-01T00:00:00Z"),
    ("bad backup id", "backup show vm/x/now", "invalid backup id"),
    ("restore onto an existing guest", "restore {backup} {g}", "guest {g} already exists"),
    ("an image storage as the backup storage", "backup {g} --storage local",
     "storage 'local' holds disk images, not backups"),
    ("the backup storage as an image storage", "guest create {new} --disk scsi0=backup:4M",
     "storage 'backup' does not hold disk images"),
    ("a locked guest", "backup {locked}", "guest {locked} is locked (destroy)"),
    ("restore --force over a locked guest", "restore {backup} {locked} --force", "guest {locked} is locked (destroy)"),
    ("prune without a keep option", "prune {g} --storage backup", "give at least one keep option"),
    ("prune with a negative count", "prune {g} --storage backup --keep-last -1",
     "keep-last: expected a whole number of 0 or more"),
    ("no backup storage named where several are", "backup {g}",
     "several backup storages (backup, offsite, secret, tiny): name one with --storage"),
    ("sync to a storage of another key", "backup sync --from backup --to secret",
     "do not have the same key: a sync copies chunks as they are stored"),
    ("reverify-after without --all", "verify {backup} --reverify-after 3", "--reverify-after goes with --all"),
    ("sync to itself", "backup sync --from backup --to backup", "'backup' is both the source and the target"),
    ("sync to an image storage", "backup sync --from backup --to local", "storage 'local' holds disk images"),
    ("backup with nothing named", "backup", "name the guests to back up, or give --all"),
    ("forget an unknown backup", "backup forget vm/100/2020-01-01T00:00:00Z", "unknown backup"),
    # once let through at submit and refused by the worker: one rule for both now
    ("notes with a control character", "backup {g} --storage backup --notes before\x7fupgrade",
     "invalid notes: expected one line of printable text"),
]


@pytest.mark.parametrize(("what", "args", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_and_change_nothing(stork, client, vmid, locked, what, args, message):
    g = vmid()
    guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    listed, before = stork("--json", "backup", "list")[1], snapshot()
    values = {"g": g, "new": vmid(), "backup": backup, "locked": locked}
    code, _, err = stork(*args.format(**values).split())
    assert code in (1, 2) and message.format(**values) in err and err.count("\n") == 1, err
    assert stork("--json", "backup", "list")[1] == listed and snapshot() == before
    assert client.guest(locked).lock == "destroy"


def test_one_failing_guest_does_not_stop_the_others_backups(stork, client, vmid, locked):
    g = vmid()
    guest_with_data(stork, g)
    code, _, err = stork("backup", locked, g, "--storage", "backup")
    assert code == 1 and f"guest {locked} is locked" in err
    code, out, _ = stork("backup", "list", g)
    assert f"vm/{g}/" in out
    code, out, err = stork("--json", "backup", locked, g, "--storage", "backup")  # one document, a row each
    rows = json.loads(out)
    assert code == 1 and rows[0]["vmid"] == locked and f"guest {locked} is locked" in rows[0]["error"]
    assert rows[1]["state"] == "succeeded" and rows[1]["params"]["vmid"] == g


def test_backup_all_backs_up_every_guest_not_excluded_and_a_failing_one_stops_none(stork, client, vmid, locked):
    """`backup --all` on the shared test cluster: every guest but the excluded ones (all the
    other tests' guests, so the run stays small), the locked one refused and the rest done."""
    g1, g2 = vmid(), vmid()
    for g in (g1, g2):
        guest_with_data(stork, g)
    others = [g.vmid for g in client.guests() if g.vmid not in (g1, g2, locked)]
    before = {g: len(client.backups(vmid=g)) for g in others[:3]}
    code, _, err = stork("backup", "--all", "--exclude", ",".join(map(str, others)), "--storage", "backup")
    assert code == 1 and f"guest {locked} is locked" in err
    assert [len(client.backups(vmid=g)) for g in (g1, g2)] == [1, 1]
    assert {g: len(client.backups(vmid=g)) for g in others[:3]} == before  # the excluded: none


def test_backups_of_different_guests_at_once_into_one_store_all_verify_and_restore_equal(stork, client, vmid):
    """Three guests holding the same MiB besides their own data, backed up by three jobs at
    once (the workers run four steps each): every backup succeeds and verifies, and each
    comes back equal."""
    guests = [vmid() for _ in range(3)]
    for g in guests:
        disk = guest_with_data(stork, g)
        qemu_io_write(volume_path(disk), "raw", 9 * PATTERN_MIB, PATTERN_MIB, 0xAB)  # the same in all three
    jobs = [client.submit("backup", vmid=g, storage="backup") for g in guests]
    wait_for(lambda: all(client.job(j.id).state.terminal for j in jobs), 120, what="the three backups")
    results = [client.job(j.id) for j in jobs]
    assert [r.state for r in results] == ["succeeded"] * 3, [r.error for r in results]
    for g, result in zip(guests, results, strict=True):
        assert stork("verify", result.result["backup"])[0] == 0
        restored = vmid()
        assert stork("restore", result.result["backup"], restored)[0] == 0
        source, back = client.guest(g).disks["scsi0"], client.guest(restored).disks["scsi0"]
        assert qemu_same(volume_path(source), volume_path(back))


# ---- a worker SIGKILLed mid-backup and mid-restore -------------------------------------------


def crash_guest(client, g: int) -> str:
    """A guest on node `crash`'s storage, so its steps run on the worker with fault points."""
    job = client.run("create", vmid=g, node="crash", disks={"scsi0": {"storage": "crash", "size": "8M"},
                                                            "scsi1": {"storage": "crash", "size": "8M"}})
    assert job.state == "succeeded", job.error
    disk = job.result["disks"]["scsi0"]
    qemu_io_write(volume_path(disk), "raw", 0, PATTERN_MIB, 1 + g % 250)
    return disk


def visible(g: int) -> list[str]:
    """The guest's committed backups and the partial folders of unfinished ones."""
    folder = STORE / "vm" / str(g)
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize("point", ["backed-up", "committed"])
def test_a_backup_killed_before_or_after_its_commit_is_made_once(client, stork, vmid, faulty, point):
    """Killed after its first disk (nothing visible yet) or right after the commit: the
    redelivered step makes the backup, or finds it made; one backup in all, the guest
    unlocked, and gc removes the dead attempt's partial folder."""
    g = vmid()
    crash_guest(client, g)
    job = crash(client, faulty, point, "backup", vmid=g, storage="backup")
    assert client.guest(g).lock == ""
    assert [e for e in visible(g) if not e.startswith(".")] == [job.result["backup"].rpartition("/")[2]]
    assert stork("gc", "--storage", "backup")[0] == 0
    assert [e for e in visible(g) if e.startswith(".partial")] == []
    assert stork("verify", job.result["backup"])[0] == 0


def test_a_restore_killed_after_a_disk_is_written_is_finished_without_an_orphan(client, stork, vmid, faulty):
    g, r = vmid(), vmid()
    disk = crash_guest(client, g)
    backup = client.run("backup", vmid=g, storage="backup").result["backup"]
    job = crash(client, faulty, "restored", "restore", backup=backup, newid=r, storage="crash", node="crash")
    restored = client.guest(r)
    assert sorted(restored.disks) == ["scsi0", "scsi1"] and restored.lock == ""
    assert qemu_same(volume_path(disk), volume_path(restored.disks["scsi0"]))
    assert orphans(client, "crash") == [] and job.result["vmid"] == r


@pytest.fixture
def tiny_store():
    """A 6 MiB tmpfs as the backup storage `tiny`, so that a backup runs out of space."""
    with tmpfs(BASE / "tiny", "6m") as path:
        yield path


def test_a_backup_storage_running_full_fails_the_backup_and_keeps_the_earlier_ones(stork, client, vmid,
                                                                                   tiny_store):
    """Random data does not compress: 2 MiB fits, 12 MiB does not. The failed backup leaves
    nothing visible and no partial folder; the earlier backup still verifies and restores."""
    small, big, r = vmid(), vmid(), vmid()
    for g, mib in ((small, 2), (big, 12)):
        assert stork("guest", "create", g, "--disk", "scsi0=local:16M")[0] == 0
        with open(volume_path(f"local:{g}/vm-{g}-disk-0.raw"), "r+b") as f:
            f.write(os.urandom(mib * PATTERN_MIB))
    earlier = backed_up(stork, small, "--storage", "tiny")["backup"]
    code, _, err = stork("backup", big, "--storage", "tiny")
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert not (tiny_store / "vm" / str(big)).exists() or os.listdir(tiny_store / "vm" / str(big)) == []
    assert client.guest(big).lock == ""
    assert stork("verify", f"tiny:{earlier}")[0] == 0
    assert stork("restore", f"tiny:{earlier}", r)[0] == 0
    assert qemu_same(volume_path(f"local:{small}/vm-{small}-disk-0.raw"), volume_path(client.guest(r).disks["scsi0"]))


def test_a_backup_into_a_store_full_from_the_start_leaves_no_partial_and_names_the_store(stork, client, vmid,
                                                                                          tiny_store):
    """Not even the writer's start fits: the backup fails in one line naming the store and the
    backup, and leaves no partial folder (gc would take its writer, still alive, for a live one)."""
    first, second = vmid(), vmid()
    for g in (first, second):
        assert stork("guest", "create", g, "--disk", "scsi0=local:4M")[0] == 0
    assert stork("backup", first, "--storage", "tiny")[0] == 0  # the store is made and records its chunk size
    with open(tiny_store / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xff" * PATTERN_MIB)
            f.flush()
    try:
        code, _, err = stork("backup", second, "--storage", "tiny")
        assert code == 1 and err.count("\n") == 1, err
        assert f"backup storage {tiny_store}: backup vm/{second}/" in err and "No space left on device" in err
        assert [n for n in os.listdir(tiny_store / "vm" / str(second)) if n != ".lock"] == []
        assert client.guest(second).lock == ""
    finally:
        (tiny_store / "filler").unlink()


def test_a_sync_keeps_an_offsite_copy_that_restores_equal(stork, client, vmid):
    """backup sync copies two guests' backups into `offsite` (only what it lacks, and only what
    the retention given keeps: a second sync copies nothing), and a restore from the copy is equal."""
    a, b, r = vmid(), vmid(), vmid()
    disk = guest_with_data(stork, a)
    guest_with_data(stork, b)
    older = backed_up(stork, a)["backup"]
    qemu_io_write(volume_path(disk), "raw", 3 * PATTERN_MIB, PATTERN_MIB, 0x21)
    newer, other = backed_up(stork, a)["backup"], backed_up(stork, b)["backup"]
    code, out, err = stork("--json", "backup", "sync", "--from", "backup", "--to", "offsite", a, b, "--keep-last", "1")
    assert code == 0, err
    result = json.loads(out)["result"]
    assert sorted(result["copied"]) == sorted([newer, other]) and result["pruned"] == 0  # the older one: not kept
    assert [str(s.id) for _, s in client.backups("offsite", a)] == [newer] != [older]
    code, out, err = stork("--json", "backup", "sync", "--from", "backup", "--to", "offsite", a, b, "--keep-last", "1")
    assert code == 0 and json.loads(out)["result"]["copied"] == [], err  # what the retention removes is not copied
    assert stork("verify", f"offsite:{newer}")[0] == 0
    code, _, err = stork("restore", f"offsite:{newer}", r)
    assert code == 0, err
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))


def test_a_reencrypting_sync_copies_plain_backups_into_an_encrypted_storage(stork, client, vmid):
    g, r = vmid(), vmid()
    disk = guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    code, out, err = stork("--json", "backup", "sync", "--from", "backup", "--to", "secret", g, "--reencrypt")
    assert code == 0 and json.loads(out)["result"]["copied"] == [backup], err
    assert stork("verify", f"secret:{backup}")[0] == 0
    code, _, err = stork("restore", f"secret:{backup}", r)
    assert code == 0, err
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))
    code, _, err = stork("backup", "sync", "--from", "secret", "--to", "offsite", g, "--reencrypt")
    assert code == 1 and "never copies encrypted backups into a store without a key" in err


def test_restore_force_replaces_a_guest_only_once_the_restore_has_succeeded(stork, client, vmid):
    g, other = vmid(), vmid()
    disk = guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    guest_with_data(stork, other, "qcow2")
    old = client.guest(other).disks["scsi0"]
    chunk = chunk_of(backup)
    saved = chunk.read_bytes()
    chunk.unlink()  # first a restore that fails: the guest stays as it was
    code, _, err = stork("restore", backup, other, "--force")
    assert code == 1 and chunk.name in err
    assert client.guest(other).disks == {"scsi0": old} and client.guest(other).lock == ""
    assert volume_path(old).exists()
    chunk.write_bytes(saved)
    code, _, err = stork("restore", backup, other, "--force")
    assert code == 0, err
    replaced = client.guest(other)
    assert replaced.lock == "" and replaced.unused == () and replaced.disks["scsi0"] != old
    assert qemu_same(volume_path(disk), volume_path(replaced.disks["scsi0"]))
    assert not volume_path(old).exists()  # the old disk freed once the new one was in place


def test_restore_force_keeps_a_disk_the_backup_does_not_have_as_unused(stork, client, vmid):
    """A disk added after the backup was made is no disk the backup replaces: it stays, as
    unused, and the result says so; the disk the backup has is replaced and freed."""
    g = vmid()
    guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    old = client.guest(g).disks["scsi0"]
    assert client.run("add_disk", vmid=g, disks={"scsi1": {"storage": "local", "size": "8M"}}).state == "succeeded"
    added = client.guest(g).disks["scsi1"]
    code, out, err = stork("--json", "restore", backup, g, "--force")
    assert code == 0, err
    restored = client.guest(g)
    assert list(restored.disks) == ["scsi0"] and restored.unused == (added,) and restored.lock == ""
    assert volume_path(added).exists() and not volume_path(old).exists()
    assert f"kept as unused, not in the backup: {added}" in json.loads(out)["result"]["warning"]


@contextlib.contextmanager
def _restore_holding(client, g: int, made: str, disks: dict[str, str], unused: tuple[str, ...]):
    """A restore --force job at its commit step, hand-made, holding guest `g` whose config reads
    `disks` and `unused`: the state after a crash, for the steps to be run on directly (its
    StepContext). Afterwards the record leaves the active set and the guest is unlocked."""
    from worker import records
    from worker.context import StepContext
    from worker.jobs.kinds import KINDS
    from worker.records import JobRecord, JobState

    kind = KINDS["restore"]
    commit = [s.name for s in kind.steps].index("commit_guest")
    job = JobRecord(id=records.new_id(), kind="restore", node="node1", steps=[s.name for s in kind.steps],
                    queues=["shared"] * len(kind.steps), state=JobState.RUNNING, done=commit,
                    params={"new_vmid": g, "lock_vmid": g, "replace": True, "template": False, "node": "node1"},
                    ctx={"made": {"scsi0": made}},
                    current={"step": commit, "name": "commit_guest", "node": "node1", "worker": "test:1",
                             "attempt": 2})
    records.create(client.r, job, {"phase": "queued"})
    with client.guest_store.editing(g) as box:
        box[0] = box[0].with_(disks=disks, unused=unused, lock="restore", lock_job=job.id)
    try:
        yield StepContext(job=job, cfg=client.cfg, r=client.r, node="node1", step="commit_guest", worker="test:1",
                          kinds=KINDS)
    finally:
        client.r.srem(records.ACTIVE, job.id)
        with client.guest_store.editing(g) as box:
            box[0] = box[0].with_(lock="", lock_job="")


def _two_disks(client, vmid) -> tuple[int, str, str]:
    """A new guest with two disks: its id, its scsi0 (the old disk) and scsi1 (as restored)."""
    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"},
                                        "scsi1": {"storage": "local", "size": "8M"}})
    return g, client.guest(g).disks["scsi0"], client.guest(g).disks["scsi1"]


def test_a_restore_force_whose_record_of_the_replaced_disks_was_lost_frees_none_of_the_restored(client, vmid):
    """The commit wrote the config (the restored disk attached, the old one kept as unused) and
    the save of what it replaced was lost with its process (a failover, or a power loss that
    took Redis's last second too). Run again, the commit must not take the restored disk for
    the replaced one: nothing is freed, the restored disk stays attached, the old one unused."""
    from worker.jobs import backups

    g, old, restored = _two_disks(client, vmid)
    with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
        backups.commit_restored(ctx)
        assert ctx.data["replaced"] == {} and "were not freed" in ctx.job.result["warning"]
        backups.free_replaced(ctx)
        guest = client.guest(g)
        assert guest.disks == {"scsi0": restored} and guest.unused == (old,) and guest.lock == ""
        assert volume_path(restored).exists() and volume_path(old).exists()


def test_free_replaced_never_frees_a_disk_the_guest_attaches(client, vmid):
    """Whatever the record says was replaced, a disk the guest attaches is kept (and said)."""
    from worker.jobs import backups

    g, old, restored = _two_disks(client, vmid)
    with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
        ctx.data["replaced"] = {"scsi0": restored, "scsi1": old}  # a record that names the restored disk
        backups.free_replaced(ctx)
        assert volume_path(restored).exists() and not volume_path(old).exists()
        assert f"{restored}: guest {g} attaches it" in ctx.job.result["warning"]
        assert client.guest(g).disks == {"scsi0": restored} and client.guest(g).unused == ()


def test_a_free_run_again_after_a_crash_never_frees_a_volume_made_since_under_the_name(client, vmid):
    """The try before freed the replaced disk and died before its end was recorded; another job
    has since made a volume under the freed name. Run again, the step leaves that volume alone:
    it frees a name only while it holds the volume whose identity was saved before the free."""
    from drivers import driver_for
    from worker.jobs import backups

    g, old, restored = _two_disks(client, vmid)
    h = vmid()  # another guest attaches the new volume: not this job's to check, nor to keep listing
    client.run("create", vmid=h, disks={})
    try:
        with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
            drv = driver_for(client.cfg.storage("local"))
            vol = drv.parse_volname(old.split(":", 1)[1])
            ctx.data["replaced"] = {"scsi0": old}
            ctx.data["freed"] = {"scsi0": drv.identity(vol)}  # saved, then freed by the try that died
            drv.free_volume(vol)
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(volume_path(old)), "4M"], check=True)
            with client.guest_store.editing(h) as box:
                box[0] = box[0].with_(disks={"scsi0": old})
            backups.free_replaced(ctx)
            assert volume_path(old).exists() and volume_path(old).stat().st_size == 4 << 20  # another's, kept
            assert client.guest(g).unused == () and client.guest(g).lock == "" and "warning" not in ctx.job.result
    finally:
        with client.guest_store.editing(h) as box:
            box[0] = box[0].with_(disks={})
        volume_path(old).unlink(missing_ok=True)


def test_a_restore_force_stopped_after_freeing_an_old_disk_drops_it_in_its_undo(client, vmid):
    """free_replaced frees the old disk, then drops it from the guest's unused list; stopped in
    between (its config's write failed, or its process died and the job was failed), the job is
    undone past its commit, and that undo drops the freed disk: the guest never lists as unused
    a volume gone, whose name a new disk of it may take."""
    from drivers import driver_for
    from worker import runner
    from worker.jobs import steps
    from worker.jobs.kinds import KINDS

    kind = KINDS["restore"]
    free_replaced = [s.name for s in kind.steps].index("free_replaced")
    assert free_replaced in runner.undo_plan(kind, free_replaced, free_replaced)
    g, old, restored = _two_disks(client, vmid)
    with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
        drv = driver_for(client.cfg.storage("local"))
        vol = drv.parse_volname(old.split(":", 1)[1])
        ctx.data["replaced"] = {"scsi0": old}
        ctx.data["freed"] = {"scsi0": drv.identity(vol)}  # saved, then freed: the config not written after
        drv.free_volume(vol)
        steps.forget_freed_sources(ctx)
        assert client.guest(g).unused == () and client.guest(g).disks == {"scsi0": restored}


def test_free_replaced_tried_again_after_its_config_write_frees_nothing(client, vmid):
    """A try kept an old disk (a passing error), wrote the config (that disk still unused, the
    guest unlocked) and died before its end was recorded. Tried again, the step frees nothing:
    it can no longer drop a volume from the config, which would then list one gone."""
    from worker.jobs import backups

    g, old, restored = _two_disks(client, vmid)
    with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
        ctx.data["replaced"] = {"scsi0": old}
        with client.guest_store.editing(g) as box:  # as the try before left it
            box[0] = box[0].with_(lock="", lock_job="")
        backups.free_replaced(ctx)
        assert volume_path(old).exists() and client.guest(g).unused == (old,)
        assert ctx.job.result["warning"] == f"kept as unused: {old}"


def test_an_undo_never_renames_back_a_base_the_jobs_own_guest_attaches(client, vmid):
    """A template restore --force whose commit wrote the config (its bases attached) and then
    failed: the undo keeps each base the held guest attaches as a base (and says so)."""
    from drivers.errors import Refused
    from worker.jobs import steps

    g = vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    made = client.guest(g).disks["scsi0"]
    client.run("template", vmid=g)
    base = client.guest(g).disks["scsi0"]
    with _restore_holding(client, g, made, {"scsi0": base}, ()) as ctx:
        ctx.data["based"] = {"scsi0": [made, base]}
        with pytest.raises(Refused, match=rf"kept as base: {base} \(in use by guest {g} \(scsi0\), held by this job"):
            steps.unmake_bases(ctx)
        assert volume_path(base).exists() and not volume_path(made).exists()


def test_an_undo_never_frees_a_volume_the_jobs_own_guest_attaches(client, vmid):
    """A commit that wrote the config and then failed (its directory's fsync, say) is undone
    without its write taken back: the volume the held guest now attaches is kept, and said."""
    from drivers.errors import Refused
    from worker.jobs import steps

    g, old, restored = _two_disks(client, vmid)
    with _restore_holding(client, g, restored, {"scsi0": restored}, (old,)) as ctx:
        with pytest.raises(Refused, match=rf"kept {restored} \(in use by guest {g} \(scsi0\), held by this job\)"):
            steps.free_made(ctx)
        assert volume_path(restored).exists()


def test_restore_force_rolls_a_template_back_to_its_backup(stork, client, vmid, tmp_path):
    """The old template's bases hold the default base names until they are freed: the restored
    bases take the next free names, and the old ones go once the guest names the new."""
    t = vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    backup = backed_up(stork, t)["backup"]
    old = client.guest(t).disks["scsi0"]
    assert old == f"local:base/base-{t}-disk-0.raw"
    shutil.copyfile(volume_path(old), tmp_path / "was.raw")
    code, _, err = stork("restore", backup, t, "--force")
    assert code == 0, err
    rolled = client.guest(t)
    assert rolled.template and rolled.lock == "" and rolled.unused == ()
    assert rolled.disks["scsi0"] == f"local:base/base-{t}-disk-1.raw" and not volume_path(old).exists()
    assert client.volume(rolled.disks["scsi0"]).is_base
    assert qemu_same(tmp_path / "was.raw", volume_path(rolled.disks["scsi0"]))
    c = vmid()
    assert stork("clone", t, c)[0] == 0  # a template again, clonable


STORAGE_TYPES = [
    pytest.param("xfs", marks=pytest.mark.skipif(bool(NO_XFS), reason=f"xfs: {NO_XFS}")),
    pytest.param("bt", marks=pytest.mark.skipif(bool(NO_BTRFS), reason=f"btrfs: {NO_BTRFS}")),
    pytest.param("zfs", marks=pytest.mark.skipif(bool(NO_ZFS), reason=f"zfs: {NO_ZFS}")),
    pytest.param("ceph", marks=pytest.mark.skipif(bool(NO_CEPH), reason=f"rbd: {NO_CEPH}")),
]


@pytest.mark.parametrize("storage", STORAGE_TYPES)
def test_backups_read_from_and_restore_to_every_storage_type(stork, client, vmid, storage):
    """A template and its linked clone on the storage, backed up and restored onto it; the
    restored disks equal the originals (compared through the drivers, whatever a volume is)."""
    t, c, rt, rc = vmid(), vmid(), vmid(), vmid()
    code, _, err = stork("guest", "create", t, "--disk", f"scsi0={storage}:16M")
    assert code == 0, err
    drv, vol = client_volume(client, client.guest(t).disks["scsi0"])
    fill(drv, vol, PATTERN_MIB, os.urandom(PATTERN_MIB))
    assert stork("template", t)[0] == 0
    assert stork("clone", t, c)[0] == 0
    clone_drv, clone_vol = client_volume(client, client.guest(c).disks["scsi0"])
    fill(clone_drv, clone_vol, 9 * PATTERN_MIB, os.urandom(4096))
    tb, cb = backed_up(stork, t)["backup"], backed_up(stork, c)
    assert cb["written"] < PATTERN_MIB  # the clone's own chunk only: the rest from the template's index
    for backup, new in ((tb, rt), (cb["backup"], rc)):
        code, _, err = stork("restore", backup, new, "--storage", storage)
        assert code == 0, err
    assert client.guest(rt).template
    for original, restored in ((t, rt), (c, rc)):
        src_drv, src = client_volume(client, client.guest(original).disks["scsi0"])
        dst_drv, dst = client_volume(client, client.guest(restored).disks["scsi0"])
        dst_drv.compare(src_drv, src, dst)
    for g in (rc, c, rt, t):
        assert stork("guest", "destroy", g)[0] == 0


def client_volume(client, volid: str):
    from drivers import driver_for, names

    vid = names.volume_id(volid)
    drv = driver_for(client.cfg.storage(vid.storage))
    return drv, drv.parse_volname(vid.volname)


def bitmaps_of(disk: str) -> dict[str, list[str]]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(volume_path(disk))], capture_output=True,
                         text=True, check=True).stdout
    return {b["name"]: b["flags"] for b in json.loads(out)["format-specific"]["data"].get("bitmaps", [])}


def test_a_qcow2_disk_is_read_incrementally_through_its_dirty_bitmap(stork, client, vmid):
    """The first backup reads it all and adds a bitmap; the next reads only what was written
    since (its result says so), stores it as a patch over the first backup's chunk, takes the
    rest from the first backup's index, restores equal, and leaves only its own bitmap."""
    g, r = vmid(), vmid()
    disk = guest_with_data(stork, g, "qcow2", size="64M")
    first = backed_up(stork, g)
    assert first["reads"]["scsi0"] == "full read: no earlier backup of this disk in this storage"
    assert list(bitmaps_of(disk)) == [bitmap_name("backup", first["backup"].rpartition("/")[2])]
    qemu_io_write(volume_path(disk), "qcow2", 40 * PATTERN_MIB, PATTERN_MIB, 0x3C)
    second = backed_up(stork, g)
    assert second["reads"]["scsi0"] == f"incremental: what changed since {first['backup']}"
    assert 0 < second["written"] <= PATTERN_MIB  # the written MiB, not its whole chunk
    first_index = json.loads((STORE / first["backup"] / "scsi0.index.json").read_bytes())["chunks"]
    second_index = json.loads((STORE / second["backup"] / "scsi0.index.json").read_bytes())["chunks"]
    assert [n for n, (a, b) in enumerate(zip(first_index, second_index, strict=True)) if a != b] == [10]
    assert second_index[10]["base"] == first_index[10] and second_index[10]["runs"] == [[0, PATTERN_MIB]]
    assert stork("restore", second["backup"], r)[0] == 0
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))
    assert list(bitmaps_of(disk)) == [bitmap_name("backup", second["backup"].rpartition("/")[2])]


def test_a_dirty_bitmap_left_in_use_falls_back_to_a_full_read_and_says_so(stork, client, vmid):
    """A qemu killed while the image was open leaves its bitmaps flagged in-use: they may miss
    writes, so the next backup reads the whole disk."""
    g = vmid()
    disk = guest_with_data(stork, g, "qcow2")
    backed_up(stork, g)
    io = subprocess.Popen(["qemu-io", "-f", "qcow2", str(volume_path(disk))], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert io.stdin is not None and io.stdout is not None
    io.stdin.write(b"write -P 0x44 0 65536\n")
    io.stdin.flush()
    io.stdout.readline()
    io.kill()  # open read-write, then gone without closing the image
    io.wait()
    [flags] = bitmaps_of(disk).values()
    assert "in-use" in flags
    again = backed_up(stork, g)
    assert again["reads"]["scsi0"].startswith("full read: dirty bitmap stork-backup-") and "in use" in \
        again["reads"]["scsi0"]
    r = vmid()
    assert stork("restore", again["backup"], r)[0] == 0
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))


def test_a_qcow2_disk_with_a_hard_link_is_read_whole_without_a_bitmap(stork, client, vmid):
    """A volume with a second name (`cp -al`, rsnapshot) is not written, so no dirty bitmap is
    added to it: its backup reads it whole, says why, and restores equal; it is not refused."""
    g, r = vmid(), vmid()
    disk = guest_with_data(stork, g, "qcow2")
    link = volume_path(disk).parent.parent / f"hard-link-of-{g}.qcow2"
    os.link(volume_path(disk), link)
    try:
        backup = backed_up(stork, g)
        assert backup["reads"]["scsi0"].startswith("full read (no dirty bitmap added: ") and \
            "has another name (a hard link)" in backup["reads"]["scsi0"], backup["reads"]
        assert bitmaps_of(disk) == {}
        assert stork("restore", backup["backup"], r)[0] == 0
        assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))
    finally:
        link.unlink()


def test_a_qcow2_v2_disk_is_read_whole_every_time_and_says_why(stork, client, vmid):
    """An old-format qcow2 (compat 0.10, as older Proxmox VE made them, adopted where it lies)
    cannot hold a dirty bitmap: each backup reads it whole and says why, rather than fail every
    night on qemu-img's refusal to add one."""
    g, r = vmid(), vmid()
    disk = guest_with_data(stork, g, "qcow2")
    subprocess.run(["qemu-img", "amend", "-f", "qcow2", "-o", "compat=0.10", str(volume_path(disk))], check=True)
    why = "full read (a qcow2 v2 image holds no dirty bitmaps: 'qemu-img amend -o compat=1.1' upgrades it)"
    assert backed_up(stork, g)["reads"]["scsi0"] == why
    again = backed_up(stork, g)
    assert again["reads"]["scsi0"] == why and "warning" not in again
    assert stork("restore", again["backup"], r)[0] == 0
    assert qemu_same(volume_path(disk), volume_path(client.guest(r).disks["scsi0"]))


def test_a_raw_disk_is_read_whole_and_says_why(stork, vmid):
    g = vmid()
    guest_with_data(stork, g)
    assert backed_up(stork, g)["reads"]["scsi0"] == "full read (only a writable qcow2 disk has dirty bitmaps)"


def test_a_linked_clone_restored_where_its_base_still_is_is_a_linked_clone_again(stork, client, vmid):
    """Its base (the very volume its backup's base was read from) is still there: the restore
    makes a linked clone of it and writes only the clone's own chunks; elsewhere (or once the
    base is another volume) it comes back whole."""
    t, c, relinked, again, whole = vmid(), vmid(), vmid(), vmid(), vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    assert stork("clone", t, c)[0] == 0
    clone_disk = client.guest(c).disks["scsi0"]
    qemu_io_write(volume_path(clone_disk), "qcow2", 9 * PATTERN_MIB, 4096, 0x5C)
    qemu_io_write(volume_path(clone_disk), "qcow2", 1 * PATTERN_MIB, 4096, 0)  # zeros over the base's data
    backed_up(stork, t)
    backup = backed_up(stork, c)["backup"]
    code, _, err = stork("restore", backup, relinked)
    assert code == 0, err
    disk = client.guest(relinked).disks["scsi0"]
    assert client.volume(disk).parent == client.guest(t).disks["scsi0"]
    assert qemu_same(volume_path(clone_disk), volume_path(disk))
    assert volume_path(disk).stat().st_blocks * 512 < 1 << 20  # its two own clusters, not whole chunks
    # the base backup's chunks under the clone's own gone (verify moves a damaged one aside):
    # the clone's patches name only their own runs, so the restore writes those and is right
    clone_chunks = json.loads((STORE / backup / "scsi0.index.json").read_bytes())["chunks"]
    base_ref = json.loads((STORE / backup / "scsi0.index.json").read_bytes())["base"]["backup"]
    base_chunks = json.loads((STORE / base_ref / "scsi0.index.json").read_bytes())["chunks"]
    beneath = [STORE / ".chunks" / d[:4] / d for d, own in zip(base_chunks, clone_chunks, strict=True)
               if d and d != own]
    assert beneath
    for chunk in beneath:
        chunk.rename(chunk.with_suffix(".aside"))
    try:
        code, _, err = stork("restore", backup, again)
    finally:
        for chunk in beneath:
            chunk.with_suffix(".aside").rename(chunk)
    assert code == 0, err
    assert qemu_same(volume_path(clone_disk), volume_path(client.guest(again).disks["scsi0"]))
    code, _, err = stork("restore", backup, whole, "--storage", "xfs" if not NO_XFS else "shared")
    assert code == 0, err
    assert client.volume(client.guest(whole).disks["scsi0"]).parent is None
    assert qemu_same(volume_path(clone_disk), volume_path(client.guest(whole).disks["scsi0"]))


def test_a_linked_clone_whose_base_backup_is_damaged_still_restores(stork, client, vmid):
    """The clone's own backup holds every chunk it needs; its base's backup only lets the
    restore write less. That backup's index damaged: the relinked restore writes every chunk;
    its manifest damaged too: the clone comes back whole. Neither refuses the restore."""
    t, c, index_damaged, manifest_damaged = vmid(), vmid(), vmid(), vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    assert stork("clone", t, c)[0] == 0
    clone_disk = client.guest(c).disks["scsi0"]
    qemu_io_write(volume_path(clone_disk), "qcow2", 9 * PATTERN_MIB, 4096, 0x5C)
    backed_up(stork, t)
    backup = backed_up(stork, c)["backup"]
    base_backup = STORE / json.loads((STORE / backup / "scsi0.index.json").read_bytes())["base"]["backup"]
    sound = {name: (base_backup / name).read_bytes() for name in ("scsi0.index.json", "manifest.json")}
    try:
        for name, restored in (("scsi0.index.json", index_damaged), ("manifest.json", manifest_damaged)):
            (base_backup / name).write_bytes(sound[name][:-2] + b"!}")
            code, _, err = stork("restore", backup, restored)
            assert code == 0, err
            disk = client.guest(restored).disks["scsi0"]
            assert qemu_same(volume_path(clone_disk), volume_path(disk))
            relinked = client.volume(disk).parent == client.guest(t).disks["scsi0"]
            assert relinked == (name == "scsi0.index.json")
    finally:  # the store is the session's: other tests list and verify it
        for name, data in sound.items():
            (base_backup / name).write_bytes(data)


@pytest.mark.parametrize(
    ("marks", "expected", "why"),
    [
        pytest.param({}, None, "no earlier backup of this disk in this storage", id="first backup"),
        pytest.param({"stork-b-1": ["auto"]}, "stork-b-2", "no dirty bitmap stork-b-2", id="bitmap gone"),
        pytest.param({"stork-b-2": ["in-use", "auto"]}, "stork-b-2", "is in use", id="unclean close"),
        pytest.param({"stork-b-2": []}, "stork-b-2", "is disabled", id="disabled"),
        pytest.param({"stork-b-2": ["auto"]}, "stork-b-2", None, id="usable"),
    ],
)
def test_which_dirty_bitmap_is_trusted(marks, expected, why):
    found = incremental_refusal(marks, expected)
    assert found is None if why is None else why in found


def test_a_backup_dated_past_the_clock_is_said_and_stops_the_guests_prunes(stork, client, vmid):
    """A node whose clock ran a year ahead made a backup: the next one is dated just after it
    (ids follow the newest), which its result says, and prune keeps every backup of the guest,
    naming that one, until their time has come or they are forgotten; then prune goes on."""
    from datetime import UTC, datetime, timedelta

    from drivers import backup_storage

    g = vmid()
    guest_with_data(stork, g)
    first = backed_up(stork, g)["backup"]
    store = backup_storage(client.cfg.storage("backup")).open_for_backup()
    ahead = (datetime.now(UTC) + timedelta(days=365)).replace(microsecond=0)
    with store.begin(g, ahead) as writer:
        writer.add_blob("guest.conf", b"made by a node whose clock ran ahead\n")
        future = str(writer.commit().id)
    result = backed_up(stork, g)
    assert result["backup"] > future and "after an earlier backup dated past this node's clock" in result["warning"]
    code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1")
    assert code == 0, err
    decisions = json.loads(out)["result"]["decisions"]
    assert sorted(d["id"] for d in decisions) == sorted([first, future, result["backup"]])
    assert all(d["keep"] and f"backup {future} is dated past this node's clock" in d["reason"] for d in decisions)
    for dated in (result["backup"], future):
        assert stork("backup", "forget", dated)[0] == 0
    code, out, err = stork("--json", "prune", g, "--storage", "backup", "--keep-last", "1")
    assert code == 0 and [d["id"] for d in json.loads(out)["result"]["decisions"]] == [first], err


def test_a_prune_decides_on_the_states_as_they_stand_under_the_guests_lock(tmp_path, monkeypatch):
    """A verify marks the newest backup failed just after prune listed the store: prune
    decides again under the guest's lock, which a verify's state change holds too, so keep-last
    1 keeps the older, sound backup (deciding on its listing, it forgot it)."""
    from datetime import UTC, datetime, timedelta

    from drivers.backup.records import Index
    from drivers.backup.retention import Keep
    from drivers.backup.store import ChunkStore
    from worker.jobs.backups import _prune

    (tmp_path / "store").mkdir()
    store = ChunkStore(tmp_path / "store", chunk_size=4096)
    made = []
    for n in range(2):
        with store.begin(100, datetime(2026, 11, 26, tzinfo=UTC) + timedelta(days=n)) as writer:
            digest, _ = writer.put_chunk(bytes([n + 1]) * 4096)
            writer.add_index("scsi0", Index("raw", 4096, [digest], 4096))
            made.append(str(writer.commit().id))
    older, newest = made
    listing = store.listing

    def then_a_verify_fails_the_newest(vmid=None):
        seen = listing(vmid)
        (chunk,) = store.index(newest, "scsi0").chunks
        (store.root / ".chunks" / chunk[:4] / chunk).unlink()
        assert store.verify(newest).state == "failed"
        return seen

    monkeypatch.setattr(store, "listing", then_a_verify_fails_the_newest)
    result = _prune(store, Keep(last=1), {100}, dry_run=False, held=lambda id: "")  # no job reads any
    assert result["removed"] == 0 and store.exists(older) and store.exists(newest)
    assert {d["id"]: d["keep"] for d in result["decisions"]} == {older: True, newest: True}
