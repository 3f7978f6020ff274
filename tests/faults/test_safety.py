"""Nothing lost, nothing escapes: in-use checks that fail closed, no step acting outside a
storage (symlinks, special files, forged job records, a flipped import path), copies and
names flushed before anything relies on them, and no orphan after a crash at any effect."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drivers import guest_index
from drivers.errors import StorkError
from drivers.guest_index import VolumeIndex
from tests.conftest import BASE, files_under, storage_path
from tests.helpers import PATTERN_MIB, crash, guest_data_sha, held_copy, orphans, qemu_same, volume_path
from worker import events, records, runner
from worker.jobs import usage
from worker.jobs.kinds import KINDS
from worker.records import JobRecord
from worker.testing import ROOT, wait_for


def one_disk_guest(client, vmid: int, storage: str = "local", size: str = "1M", node: str = "node1") -> str:
    job = client.run("create", vmid=vmid, node=node, disks={"scsi0": {"storage": storage, "size": size}})
    assert job.state == "succeeded", job.error
    return job.result["disks"]["scsi0"]


# ---- in use: guests (failing closed) and live jobs ------------------------------------------


def test_a_broken_guest_config_refuses_a_free_and_is_listed_as_broken(client, stork, vmid):
    """With a guest's config hand-edited (a key misspelt), its disk cannot be freed: the free
    is refused naming the config file, and `guest list` shows it as broken, not omitted."""
    g = vmid()
    disk = one_disk_guest(client, g)
    config = BASE / "guests" / f"{g}.toml"
    original = config.read_text()
    config.write_text(original.replace("[disks]", "[disk]"))
    try:
        code, _, err = stork("volume", "free", disk)
        assert code == 1 and err.count("\n") == 1
        assert f"cannot tell whether {disk} is in use: {config}: broken guest config: unknown key 'disk'" in err
        assert volume_path(disk).exists()
        code, out, _ = stork("guest", "list")
        assert code == 0 and any(line.startswith(f"{g} ") and "BROKEN" in line for line in out.splitlines())
    finally:
        config.write_text(original)


def test_a_disk_a_config_names_by_a_hand_edit_after_the_index_refresh_is_in_use(client, stork, vmid, monkeypatch):
    """The guest volume index (drivers/guest_index.py) is refreshed, then a config is edited in
    place to attach a free disk, its times set back: the free is refused naming that guest
    (its ctime changed), and goes through once the edit is undone. (The refresh, run here,
    trusts configs up to its start, not two minutes before: the test's configs are new.)"""
    monkeypatch.setattr(guest_index, "MARGIN", 0)
    g, h = vmid(), vmid()
    disk = one_disk_guest(client, g)
    one_disk_guest(client, h)
    client.guest_store.write(client.guest_store.read(g).with_(disks={}))  # the disk is no guest's now
    wait_for(lambda: client.guest_store.refresh_index() is not None, 30, "a worker's sweep to let go of the index")
    assert VolumeIndex(client.guest_store.dir).since()
    config = client.guest_store.path(h)
    original, before = config.read_text(), config.stat()
    config.write_text(original + f'scsi9 = "{disk}"\n')
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, _, err = stork("volume", "free", disk)
    assert code == 1 and err.endswith(f"{disk} is in use by guest {h} (scsi9)\n") and volume_path(disk).exists()
    config.write_text(original)
    client.guest_store.refresh_index()
    code, _, err = stork("volume", "free", disk)
    assert code == 0, err
    assert not volume_path(disk).exists()


def test_a_full_clones_target_is_in_use_while_it_copies(client, stork, vmid):
    """While a full clone copies into its target, freeing or basing that target is refused
    naming the job, and the clone then succeeds with an identical disk."""
    g, c = vmid(), vmid()
    source = one_disk_guest(client, g, size="512M")
    with open(volume_path(source), "r+b") as f:
        for _ in range(512 // 8):
            f.write(b"\x5a" * (8 * PATTERN_MIB))
    job = client.submit("full_clone", vmid=g, newid=c)
    with held_copy(client, job.id):
        target = client.job(job.id).ctx["made"]["scsi0"]
        code, _, err = stork("volume", "free", target)
        assert code == 1 and err.endswith(f"free: failed: {target} is in use by job {job.id} (full_clone)\n")
        code, _, err = stork("base", target)
        assert code == 1 and err.endswith(f"{target} is in use by job {job.id} (full_clone)\n")
        assert client.job(job.id).state == "running"  # all of the above happened mid-copy
    job = client.wait(job.id, timeout=120)
    assert job.state == "succeeded", job.error
    assert qemu_same(volume_path(source), volume_path(target))


def test_the_volumes_of_a_job_are_read_from_its_params_and_what_it_made():
    """job_volumes: sources, the volume a job acts on, made, pending, replaced and renamed ones."""
    job = JobRecord(id="j", kind="move", node="n", steps=[], queues=[], params={
        "volid": "a:1/vm-1-disk-0.raw", "disks": {"scsi0": {"source": "a:100/vm-100-disk-0.raw"}},
        "bases": {"disk": {"source": "a:100/vm-100-disk-1.raw", "name": None}}},
        ctx={"made": {"scsi0": "b:100/vm-100-disk-0.raw"}, "pending": {"scsi1": "b:100/vm-100-disk-1.raw"},
             "replaced": {"scsi0": "a:100/vm-100-disk-0.raw"}, "based": {"d": ["a:x/y", "a:base/z.raw"]}})
    assert usage.job_volumes(job) == {
        "a:1/vm-1-disk-0.raw", "a:100/vm-100-disk-0.raw", "a:100/vm-100-disk-1.raw", "b:100/vm-100-disk-0.raw",
        "b:100/vm-100-disk-1.raw", "a:x/y", "a:base/z.raw"}


# ---- nothing outside a storage ----------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A directory outside every storage, with a file that must stay as it is."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"p" * 4096)
    return victim


def untouched(victim: Path) -> bool:
    precious = victim / "precious"
    return (sorted(p.name for p in victim.iterdir()) == ["precious"] and precious.read_bytes() == b"p" * 4096
            and precious.stat().st_mode & 0o777 == 0o644)


def test_a_guest_folder_that_is_a_symlink_is_never_written_into(client, vmid, outside):
    """A guest folder replaced by a symlink to another directory: create is refused and
    nothing appears there."""
    g = vmid()
    storage_path("local").mkdir(parents=True, exist_ok=True)
    (storage_path("local") / str(g)).symlink_to(outside)
    try:
        job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "1M"}})
        assert job.state == "failed" and "not a directory" in job.error and "never follows a symlink" in job.error
        assert untouched(outside) and not client.guest_store.exists(g)
    finally:
        (storage_path("local") / str(g)).unlink()


def test_destroy_does_not_delete_through_a_symlinked_guest_folder(client, vmid, outside):
    """A guest's folder swapped for a symlink to a directory holding a file of its disk's
    name: destroy fails, and that file is still there."""
    g = vmid()
    disk = one_disk_guest(client, g)
    folder = storage_path("local") / str(g)
    (outside / volume_path(disk).name).write_bytes(b"mine")
    folder.rename(BASE / f"moved-{g}")
    folder.symlink_to(outside)
    try:
        job = client.run("destroy", vmid=g)
        assert job.state == "failed" and "not a directory" in job.error
        assert (outside / volume_path(disk).name).read_bytes() == b"mine"
    finally:
        folder.unlink()
        (BASE / f"moved-{g}").rename(folder)
    assert client.guest(g).lock == ""


def test_a_volume_that_is_a_symlink_is_not_read_grown_or_chmodded(client, stork, vmid, outside):
    """A disk replaced by a symlink to an outside file: copy, resize and base are refused and
    the outside file keeps its bytes and mode."""
    g = vmid()
    disk = one_disk_guest(client, g)
    volume_path(disk).unlink()
    volume_path(disk).symlink_to(outside / "precious")
    try:
        for args in (["disk", "copy", disk, "shared"], ["disk", "resize", disk, "2M"], ["base", disk]):
            code, _, err = stork(*args)
            assert code == 1 and f"{disk}: not a regular file" in err, (args, err)
        assert untouched(outside)
    finally:
        volume_path(disk).unlink()


def test_a_fifo_named_like_a_volume_is_refused_at_once(client, stork, vmid):
    """A FIFO where a volume would be blocks nothing: free and info are refused at once."""
    g = vmid()
    one_disk_guest(client, g)
    fifo = storage_path("local") / str(g) / f"vm-{g}-disk-1.raw"
    os.mkfifo(fifo)
    try:
        code, _, err = stork("volume", "free", f"local:{g}/vm-{g}-disk-1.raw")
        assert code == 1 and "not a regular file" in err
        code, _, err = stork("volume", "info", f"local:{g}/vm-{g}-disk-1.raw")
        assert code == 1 and "not a regular file" in err
    finally:
        fifo.unlink()


def test_a_symlink_at_a_temp_name_is_left_alone(client, vmid, outside):
    """The old predictable temp name, planted as a symlink to an outside file, is never
    written through: temp files have random names and are created exclusively, and the stale
    one is swept (the link itself unlinked, its target untouched)."""
    g = vmid()
    (storage_path("local") / str(g)).mkdir(parents=True)
    trap = storage_path("local") / str(g) / f".vm-{g}-disk-0.raw.tmp"
    trap.symlink_to(outside / "precious")
    one_disk_guest(client, g, size="8M")
    assert untouched(outside) and not trap.is_symlink()


def test_a_job_record_forged_in_redis_is_refused_before_any_step_acts(client, vmid):
    """A record written straight into Redis with an owner of '../../victim/escaped' fails
    with the key named, and nothing is created anywhere."""
    g = vmid()
    params = {"new_vmid": g, "name": "", "node": "node1", "storages": ["local"],
              "disks": {"scsi0": {"storage": "local", "size": 1 << 20, "format": "raw",
                                  "owner": "../../victim/escaped"}}}
    kind = KINDS["create"]
    job = JobRecord(id=records.new_id(), kind="create", params=params, node="node1",
                    steps=[s.name for s in kind.steps], queues=kind.queues(params, client.cfg))
    records.create(client.r, job, events.make(job.id, "create", "queued"))
    runner.send_steps(job, 0, client.app)
    job = client.wait(job.id, timeout=30)
    assert job.state == "failed"
    assert job.error == ("job record refused: params.disks.scsi0.owner: '../../victim/escaped': "
                         "expected a guest id")
    assert not client.guest_store.exists(g) and not list(BASE.rglob("escaped*"))


FLIP = """
import os, sys, time
good, bad, path = sys.argv[1:]
while True:
    for src in (good, bad):
        os.link(src, path + ".next")
        os.rename(path + ".next", path)
        time.sleep(0.002)
"""


def test_an_import_copies_the_very_file_it_checked_while_the_path_flips(client, vmid, tmp_path):
    """The import path flipped every 2 ms between a raw image and a qcow2 that reads a secret
    file: every import either copies the raw image or is refused; none copies the secret. An
    import opens the path three times (at submit, to copy, to verify the copy), each time
    finding either file, so about one in eight gets through: up to 120 tries, to see one."""
    good, secret, bad = tmp_path / "good.raw", tmp_path / "secret.raw", tmp_path / "bad.qcow2"
    good.write_bytes(b"\x11" * PATTERN_MIB)
    secret.write_bytes(b"\x5e" * PATTERN_MIB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(bad)], check=True)
    path = tmp_path / "disk.img"
    # flipped by a process of its own: in a thread of this one, the GIL held by the submit's own
    # Python work decided which file the submit met (nearly always the qcow2), not the race
    flipper = subprocess.Popen([sys.executable, "-c", FLIP, str(good), str(bad), str(path)])
    wait_for(path.exists, 5, "the first flip")
    outcomes = []
    try:
        for _ in range(120):  # until both outcomes were seen: the flips race the imports
            if any(what == "copied" for what, _ in outcomes) and sum(what != "copied" for what, _ in outcomes) >= 3:
                break
            g = vmid()
            try:
                job = client.run("import", vmid=g, disks={"scsi0": {"path": str(path)}}, timeout=60)
            except StorkError as e:
                outcomes.append(("refused at submit", str(e)))
                continue
            if job.state == "succeeded":
                copy = volume_path(job.result["disks"]["scsi0"])
                outcomes.append(("copied", guest_data_sha(copy) == guest_data_sha(good)))
            else:
                outcomes.append(("failed", job.error))
    finally:
        flipper.kill()
        flipper.wait()
    assert all(ok for what, ok in outcomes if what == "copied"), outcomes  # never the secret
    assert any(what == "copied" for what, _ in outcomes), outcomes
    refusals = [why for what, why in outcomes if what != "copied"]
    assert all("cannot be imported" in why or "changed since" in why for why in refusals), refusals


REWRITE = """
import os, random, sys, time
path, good, bad = sys.argv[1:]
contents = [(open(good, "rb").read(), 0.012), (open(bad, "rb").read(), 0.004)]
fd = os.open(path, os.O_WRONLY)
while True:
    for data, stay in contents:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        time.sleep(random.uniform(0, stay))  # not in step with the imports
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a file of another user's")
def test_an_import_file_rewritten_after_its_checks_is_read_with_its_owners_rights(tmp_path):
    """The owner of an import file can still write it once stork has checked it, and qemu reads
    its header again at each open: here it is rewritten in place every few ms, a qcow2 of
    data, then one whose data file is a secret only root may read. Every qemu that reads it runs
    as its owner (nobody), so a copy holds the data or fails for want of rights, never the
    secret. Both outcomes must be seen (the rewrites race the opens): up to 300 tries."""
    from drivers import qemu

    secret, good, bad = tmp_path / "secret", tmp_path / "good.qcow2", tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on",
                    str(bad), "1M"], check=True)
    secret.write_bytes(b"^" * (1 << 20))  # after: qemu-img create makes the data file anew
    secret.chmod(0o600)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", str(good)], check=True, capture_output=True)
    path = tmp_path / "disk.qcow2"
    shutil.copyfile(good, path)
    os.chown(path, 65534, 65534)
    target = os.open(tmp_path / "copy.raw", os.O_RDWR | os.O_CREAT, 0o600)
    rewriter = subprocess.Popen([sys.executable, "-c", REWRITE, str(path), str(good), str(bad)])
    copied, denied, other = 0, 0, []
    try:
        for _ in range(300):
            if copied and denied:
                break
            os.ftruncate(target, 0)
            os.ftruncate(target, 1 << 20)
            try:
                with qemu.open_import(path) as (image, size, _):
                    qemu.convert(image, qemu.Image.of_fd("raw", target, "the copy"), size)
            except StorkError as e:
                denied += "Permission denied" in str(e)
                other.append(str(e))
                continue
            assert b"^" * 512 not in os.pread(target, 1 << 20, 0), "the secret was copied"
            copied += 1
    finally:
        rewriter.kill()
        rewriter.wait()
        os.close(target)
    assert copied and denied, (copied, denied, other[-5:])


@pytest.mark.skipif(os.geteuid() != 0, reason="runs qemu-nbd as another user")
def test_a_socket_renamed_over_qemu_nbds_own_is_never_read_through(tmp_path):
    """qemu-nbd run as an import's owner makes its socket in a folder that is the owner's until
    then: the owner could bind a socket of their own there and rename it over qemu-nbd's. stork
    refuses to read through a socket whose peer is not qemu-nbd's process, rather than let its
    qemu-img (root) talk to whatever serves there."""
    import socket
    import tempfile
    import threading

    from drivers import nbd, qemu
    from drivers.tools import Reader

    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x11" * (1 << 20))
    os.chown(disk, 65534, 65534)
    done, squatters = threading.Event(), []

    def squat() -> None:  # as fast as it can: the moment qemu-nbd's socket is there
        prefix = f"stork-nbd-{os.getpid()}-"
        while not done.is_set() and not squatters:
            for name in os.listdir(tempfile.gettempdir()):
                folder = Path(tempfile.gettempdir(), name)
                if name.startswith(prefix) and (folder / "sock").exists():
                    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    squatter.bind(str(folder / "mine"))
                    squatter.listen()
                    os.rename(folder / "mine", folder / "sock")
                    squatters.append(squatter)

    thread = threading.Thread(target=squat)
    thread.start()
    fd = os.open(disk, os.O_RDONLY)
    try:
        with pytest.raises(StorkError, match="the socket is not qemu-nbd's"), \
                nbd.read_as(qemu.Image.of_fd("raw", fd, "disk"), Reader(65534, 65534, "nobody")) as served:
            qemu.data_bytes(served)
    finally:
        done.set()
        thread.join()
        os.close(fd)
        for squatter in squatters:
            squatter.close()
    assert squatters


# ---- durable before visible ----------------------------------------------------------------


def test_new_names_and_copies_are_flushed_before_the_driver_returns(tmp_path):
    """strace of the dir driver: each link or rename is followed by an fsync of its
    directory, and a copy is fsync'd after qemu-img has exited."""
    script = """
import sys
from pathlib import Path
from drivers import driver_for
from drivers.config import StorageConfig
from drivers.names import VolName
d = driver_for(StorageConfig("s", "dir", options={"path": Path(sys.argv[1])}))
a, b = VolName(100, "vm-100-disk-0", "raw"), VolName(100, "vm-100-disk-1", "qcow2")
d.allocate(a, 1 << 20); d.allocate(b, 1 << 20)
d.copy_from(d, a, b)
d.make_base(a, VolName(None, "golden", "raw"))
"""
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,linkat,renameat,renameat2,execve",
                    sys.executable, "-c", script, str(tmp_path / "s")], check=True, cwd=ROOT)
    calls = [line.split(None, 1) for line in trace.read_text().splitlines()]
    main = calls[0][0]
    mine = [call for pid, call in calls if pid == main]
    changes = [i for i, call in enumerate(mine) if call.startswith(("linkat", "renameat"))]
    assert len(changes) == 3  # two volumes linked into place, one renamed into base/
    assert all(mine[i + 1].startswith("fsync") for i in changes), mine
    convert = next(i for i, (_, call) in enumerate(calls) if call.startswith("execve") and '"convert"' in call)
    assert any(pid == main and call.startswith("fsync") for pid, call in calls[convert:])


# ---- crashes right after each effect ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["create", "full_clone", "linked_clone"])
def test_a_crash_right_after_a_volume_is_made_leaves_no_orphan(client, vmid, faulty, kind):
    """Killed right after creating a disk: the redelivered step adopts that disk (claimed by
    its job) instead of making a second one; nothing is left that no guest names."""
    g, c = vmid(), vmid()
    if kind == "create":
        job = crash(client, faulty, "created", "create", vmid=c, node="crash",
                    disks={"scsi0": {"storage": "crash", "size": "1M"}})
    else:
        one_disk_guest(client, g, storage="crash", node="crash")
        if kind == "linked_clone":
            assert client.run("template", vmid=g).state == "succeeded"
        job = crash(client, faulty, "created", kind, vmid=g, newid=c)
    assert job.result["disks"] == {"scsi0": f"crash:{c}/vm-{c}-disk-0.{'qcow2' if kind == 'linked_clone' else 'raw'}"}
    assert orphans(client, "crash") == [] and client.guest(c).lock == ""


def test_a_crash_right_after_a_rename_into_base_completes_the_template(client, vmid, faulty):
    """Killed between the rename into base/ and the step's end: the template is made, its base read-only."""
    g = vmid()
    one_disk_guest(client, g, storage="crash", node="crash")
    crash(client, faulty, "based", "template", vmid=g)
    base = client.guest(g).disks["scsi0"]
    assert client.guest(g).template and volume_path(base).stat().st_mode & 0o777 == 0o444
    assert orphans(client, "crash") == []


@pytest.mark.parametrize("point", ["free_recorded", "freed"])
def test_a_crash_around_a_free_never_reports_a_free_that_did_not_happen(client, vmid, faulty, point):
    """Killed after the free is recorded (before it happens) or right after it: the
    redelivered step frees the volume if it is still there, and the job succeeds."""
    g = vmid()
    disk = one_disk_guest(client, g, storage="crash", node="crash")
    copy = client.run("copy", volid=disk, storage="crash", node="crash").result["volumes"]["copy"]
    crash(client, faulty, point, "free", volid=copy, node="crash")
    assert not volume_path(copy).exists() and volume_path(disk).exists()


def test_a_crash_in_the_middle_of_a_destroy_finishes_it(client, vmid, faulty):
    """Killed right after freeing a destroyed guest's first disk: the rest goes, then the config."""
    g = vmid()
    job = client.run("create", vmid=g, node="crash", disks={"scsi0": {"storage": "crash", "size": "1M"},
                                                            "scsi1": {"storage": "crash", "size": "1M"}})
    crash(client, faulty, "freed", "destroy", vmid=g)
    assert not client.guest_store.exists(g)
    assert not any(volume_path(v).exists() for v in job.result["disks"].values())


# ---- nothing left behind -----------------------------------------------------------------


def test_a_size_larger_than_the_file_system_allows_leaves_nothing(client, vmid):
    """A disk of 100000 TiB fails with the file system's reason and leaves no temp file, no
    guest folder and no guest config."""
    g = vmid()
    before = files_under(storage_path("local"))
    job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "100000T"}})
    assert job.state == "failed" and job.error.endswith("failed: File too large")
    assert files_under(storage_path("local")) == before
    assert not (storage_path("local") / str(g)).exists() and not client.guest_store.exists(g)


def test_basing_an_unused_volume_renames_its_unused_entry(client, vmid):
    """A disk kept as unused after a move, made a base: the guest's unused list follows it."""
    g = vmid()
    disk = one_disk_guest(client, g)
    assert client.run("move", vmid=g, disk="scsi0", storage="shared").state == "succeeded"
    assert client.guest(g).unused == (disk,)
    job = client.run("base", volid=disk, name=f"kept-{g}")
    assert job.state == "succeeded", job.error
    assert client.guest(g).unused == (f"local:base/kept-{g}.raw",)
    assert volume_path(f"local:base/kept-{g}.raw").exists()


def test_a_client_with_another_config_sends_its_steps_to_that_configs_redis(client, tmp_path):
    """One client, one Redis: the record and the steps both go to the Redis of the client's config."""
    from dataclasses import replace

    from producer.client import Client
    from worker.testing import RedisServer, free_port

    other = RedisServer(free_port(), tmp_path)
    try:
        mine = Client(replace(client.cfg, redis=replace(client.cfg.redis, url=f"redis://127.0.0.1:{other.port}/0")))
        job = mine.submit("ping", node="node2")
        assert other.client.exists(records.job_key(job.id)) and other.client.llen("shared") == 1
        assert not client.r.exists(records.job_key(job.id))
    finally:
        other.stop()


def test_a_volume_keeping_its_data_in_an_external_file_is_never_read_or_grown(client, stork, vmid, outside):
    """A qcow2 disk whose header names an outside data file: copy and resize are refused, and
    the outside file keeps its bytes and size (qemu would follow the header's path)."""
    g = vmid()
    one_disk_guest(client, g)
    disk = f"local:{g}/vm-{g}-disk-1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={outside / 'precious'}",
                    str(volume_path(disk)), "4096"], check=True)
    (outside / "precious").write_bytes(b"p" * 4096)
    for args in (["disk", "copy", disk, "shared"], ["disk", "resize", disk, "1M"]):
        code, _, err = stork(*args)
        assert code == 1 and f"{disk} keeps its data in an external file" in err, (args, err)
    assert untouched(outside)
    volume_path(disk).unlink()


def test_stale_temp_files_of_a_crashed_writer_are_swept(client, vmid):
    """A temp file left in a guest's folder by a writer that died goes when that folder is next
    written under the storage lock, and does not keep a destroyed guest's folder."""
    g = vmid()
    one_disk_guest(client, g)
    stale = storage_path("local") / str(g) / f".vm-{g}-disk-9.raw.0123456789abcdef.tmp"
    stale.write_bytes(b"half")
    assert client.run("destroy", vmid=g).state == "succeeded"
    assert not (storage_path("local") / str(g)).exists()


def test_without_the_immutable_capability_a_base_is_still_made(tmp_path):
    """Where the process may not set the immutable flag (no CAP_LINUX_IMMUTABLE), a base is
    made read-only (0444) and the driver only warns, as it does on tmpfs."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    script = """
import sys
from pathlib import Path
from drivers import driver_for
from drivers.config import StorageConfig
from drivers.names import VolName
d = driver_for(StorageConfig("s", "dir", options={"path": Path(sys.argv[1])}))
vol = VolName(100, "vm-100-disk-0", "raw")
d.allocate(vol, 1 << 20)
d.make_base(vol, VolName(None, "golden", "raw"))
"""
    subprocess.run(["setpriv", "--inh-caps=-linux_immutable", "--bounding-set=-linux_immutable", sys.executable,
                    "-c", script, str(tmp_path / "s")], check=True, cwd=ROOT)
    base = tmp_path / "s" / "base" / "golden.raw"
    assert base.stat().st_mode & 0o777 == 0o444
