"""Storage backend benchmarks: stork's drivers, called in-process, next to the native tool doing
the same work on the same data in the same run.

    .venv/bin/python bench/backends.py          (as root: it makes loop filesystems)

It makes three filesystems on loop devices backed by sparse files in a temporary directory:
btrfs (a btrfs storage), XFS with reflink=1 and ext4 (each a dir storage; ext4 cannot share
extents); a zfs-fuse pool on a sparse file (a zfs storage; tests/storages.py starts the zfs-fuse
daemon if none answers) and a one-node Ceph cluster whose memstore OSD holds its data in RAM,
1 GiB at most (an rbd storage on its pool; tests/ceph.py). Whatever happens, also on Ctrl-C,
SIGTERM or a failure, it destroys the pool (and stops the daemon if it started it), stops the
cluster, unmounts the filesystems, detaches the loop devices it attached (by the paths
`losetup -f --show` gave it) and deletes its files. A storage that cannot be made here is
skipped with a one-line reason. Then:

1. linked clone latency from a 256 MiB base holding data, one clone at a time, stork and tool
   samples interleaved (p50 and p90 of 50 each, 20 on zfs and rbd, after one unmeasured warm-up
   each): btrfs: `BtrfsDriver.link_clone` (snapshot ioctl, rename, syncfs) next to
   `btrfs subvolume snapshot BASE NEW`; dir on XFS: `DirDriver.link_clone` (a copy of the
   base's blank qcow2 overlay, fsynced) next to `qemu-img create -f qcow2 -F raw -b BASE NEW`;
   zfs: `ZfsDriver.link_clone` next to `zfs clone BASE@__base__ NEW`; rbd: `RbdDriver.link_clone`
   next to `rbd clone BASE@__base__ NEW`. Each stork clone is a new guest's disk, so on zfs it
   includes making the guest's folder dataset; the tool clones into one existing dataset.
2. full copy of a raw image of non-zero data (best of 3, rows interleaved, each after a sync):
   2 GiB within each loop filesystem: stork `allocate` + `copy_from` (FICLONE where the
   filesystem shares extents, else qemu-img) next to `cp --reflink=always` and
   `qemu-img convert -n`; and stork's qemu-img path (`copy_in`) forced on the reflink
   filesystems, to show what sharing saves. 256 MiB on zfs (zfs-fuse is slow) into a file in a
   fresh dataset, stork's and the tool's alike; 256 MiB from a dir storage on ext4 into rbd
   (memstore holds it in RAM), next to `qemu-img convert -n` into an `rbd:` spec and
   `rbd import`; and 256 MiB within the pool, stork next to `rbd deep cp` and `qemu-img
   convert -n` from one `rbd:` spec to another. Stork flushes every copy before it
   returns, so the tools' rows flush too (`-t writeback` flushes on close; `sync FILE` after
   cp; `rbd import` flushes on close). The
   tools' rows include making their target (truncate; `zfs create`; `rbd create`). "space" is
   how much the storage's used space grew by the copy (zfs: the pool's `used`; rbd: `rbd du`).

The tools' rows include starting a process (a few ms); stork's rows are bare method calls (which
run zfs and rbd themselves, one process per step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drivers import driver_for
from drivers.backends.base import Driver
from drivers.backends.btrfs import IMAGE, BtrfsDriver
from drivers.backends.rbd import RbdDriver
from drivers.backends.zfs import SNAPSHOT, ZfsDriver
from drivers.names import VolName, flat_name
from drivers.storage import StorageConfig
from tests import ceph
from tests.storages import ZfsPool, zfs_pool

MIB, GIB = 1 << 20, 1 << 30
FS_SIZE = 8 * GIB  # sparse: only what is written takes space
BASE_SIZE = 256 * MIB
COPY_SIZE = 2 * GIB
SMALL_COPY_SIZE = 256 * MIB  # on zfs (zfs-fuse is slow) and rbd (the memstore OSD holds its data in RAM)
ZFS_POOL_MIB = 2048  # sparse, like the loop filesystems
CLONES = 50
SERVICE_CLONES = 20  # on zfs and rbd, where each step is a round trip to a daemon
COPY_RUNS = 3
MKFS = {
    "btrfs": ["mkfs.btrfs", "-q"],
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"],  # no background init
}


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored while cleaning up, so a second one cannot cut the cleanup short."""
    handlers = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("STORK_BENCH_DIR")))


# ---- loop filesystems ---------------------------------------------------------------------
@dataclass
class LoopFs:
    """A filesystem on a loop device backed by a sparse file, mounted in `where`."""

    kind: str
    where: Path
    device: str = ""  # the loop device losetup gave us; empty until then

    @property
    def image(self) -> Path:
        return self.where / f"{self.kind}.img"

    @property
    def mount(self) -> Path:
        return self.where / self.kind

    def make(self) -> None:
        with open(self.image, "xb") as f:
            f.truncate(FS_SIZE)
        self.mount.mkdir()
        self.device = run(["losetup", "-f", "--show", str(self.image)]).strip()
        run([*MKFS[self.kind], self.device])
        run(["mount", self.device, str(self.mount)])

    def close(self) -> bool:
        """Undo what `make` did, as far as it got, each step tried even if one before failed;
        True if nothing of it is left."""
        ok = True
        if self.mount.is_dir() and os.path.ismount(self.mount):
            ok &= _try(["umount", str(self.mount)])
        for device in [self.device] if self.device else self._attached():
            ok &= _try(["losetup", "-d", device])
        self.image.unlink(missing_ok=True)
        if self.mount.is_dir() and not os.path.ismount(self.mount):
            self.mount.rmdir()
        return ok

    def _attached(self) -> list[str]:
        """Loop devices backed by our image, for when losetup was interrupted before it told us
        which one it attached (no other loop device is ever backed by our own file)."""
        if not self.image.exists():
            return []
        out = subprocess.run(["losetup", "-j", str(self.image)], capture_output=True, text=True).stdout
        return [line.split(":", 1)[0] for line in out.splitlines() if line.startswith("/dev/")]


def _try(argv: list[str]) -> bool:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        print(f"cleanup: {' '.join(argv)} failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0


@contextmanager
def loop_filesystems(kinds: list[str]) -> Iterator[dict[str, LoopFs]]:
    """The filesystems, made in a fresh temporary directory, always removed with it."""
    where = scratch_dir("stork-backends-")
    made: dict[str, LoopFs] = {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up too
    try:
        for kind in kinds:
            made[kind] = LoopFs(kind, where)  # recorded before make(): close() undoes a partial one
            made[kind].make()
        yield made
    finally:
        with signals_held():
            if all([fs.close() for fs in made.values()]):
                where.rmdir()  # empty now; left in place (and named) if anything could not be undone
            else:
                print(f"cleanup incomplete: see {where} and `losetup -a`", file=sys.stderr)
        signal.signal(signal.SIGTERM, previous)


# ---- a zfs-fuse pool and a Ceph cluster -----------------------------------------------------
@contextmanager
def zfs_pool_made() -> Iterator[ZfsPool | str]:
    """A zfs-fuse pool on a sparse file in a fresh temporary directory, or why none could be made;
    destroyed at the end (with the daemon, if it was started for it) and the directory removed."""
    where = scratch_dir("stork-zfs-")
    pool: ZfsPool | str = "interrupted while it was being made"
    try:
        pool = zfs_pool(where, ZFS_POOL_MIB)
        yield pool
    finally:
        with signals_held():
            if isinstance(pool, ZfsPool):
                pool.close()
            else:
                _undo_zfs_pool(where)
            _remove(where, where / "zfs")


def _undo_zfs_pool(where: Path) -> None:
    """What an interrupted zfs_pool() left: its pool (named for this process) and the daemon it started
    (the pid file in `where` is written only by a daemon started for us)."""
    name, pidfile = f"stork{os.getpid()}", where / "zfs-fuse.pid"
    if subprocess.run(["zpool", "list", name], capture_output=True).returncode == 0:
        _try(["zpool", "destroy", "-f", name])
    pid = pidfile.read_text().strip() if pidfile.exists() else ""
    comm = Path(f"/proc/{pid}/comm")
    if pid.isdigit() and comm.exists() and comm.read_text().strip() == "zfs-fuse":
        os.kill(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while comm.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    (where / "zfs.vdev").unlink(missing_ok=True)


def _remove(where: Path, mount: Path) -> None:
    """Delete the temporary directory, unless something is still mounted in it."""
    if os.path.ismount(mount):
        print(f"cleanup incomplete: {mount} is still mounted", file=sys.stderr)
    else:
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def ceph_cluster() -> Iterator[ceph.CephCluster | str]:
    """A one-node Ceph cluster in a fresh temporary directory, or why none could be started; stopped
    at the end and the directory removed (ceph.start stops what it started if it fails or is
    interrupted)."""
    where = scratch_dir("stork-ceph-")
    cluster: ceph.CephCluster | str = "interrupted while it was starting"
    try:
        cluster = ceph.qemu_unavailable() or ceph.start(where)
        yield cluster
    finally:
        with signals_held():
            if isinstance(cluster, ceph.CephCluster):
                cluster.close()
            shutil.rmtree(where, ignore_errors=True)


def rbd_clear(cluster: ceph.CephCluster) -> None:
    """Remove every image in the pool, clones first (a base's snapshot stays protected while it has
    any): the memstore OSD holds all it stores in RAM."""
    entries = json.loads(cluster.rbd("ls", "-l", "--format", "json", cluster.pool) or "[]")
    images = {e["image"]: bool(e.get("parent")) for e in entries if "snapshot" not in e}
    for image in sorted(images, key=lambda name: not images[name]):
        spec = f"{cluster.pool}/{image}"
        snapshots = [e for e in entries if e["image"] == image and "snapshot" in e]
        for snap in snapshots:
            if str(snap.get("protected")).lower() == "true":
                cluster.rbd("snap", "unprotect", f"{spec}@{snap['snapshot']}")
        if snapshots:
            cluster.rbd("snap", "purge", "--no-progress", spec)
        cluster.rbd("rm", "--no-progress", spec, timeout=120)


# ---- storages -----------------------------------------------------------------------------
@dataclass
class Backend:
    label: str
    drv: Driver
    root: Path | None = None  # where a file storage's volumes are: a mounted filesystem or pool
    seed: Backend | None = None  # rbd: the dir storage its volumes' data is copied from
    cluster: ceph.CephCluster | None = None  # rbd: the cluster
    clones: int = CLONES
    copy_size: int = COPY_SIZE

    @property
    def where(self) -> Path:
        assert self.root is not None, f"{self.label} holds no files"
        return self.root

    def entry(self, vol: VolName) -> Path:
        """The volume's entry: a btrfs subvolume or ZFS dataset directory, or a dir storage's file."""
        return self.where / ("base" if vol.is_base else str(vol.owner)) / f"{vol.name}.{vol.fmt}"

    def file(self, vol: VolName) -> Path:
        """The file holding the volume's data."""
        return self.entry(vol) / IMAGE if isinstance(self.drv, BtrfsDriver | ZfsDriver) else self.entry(vol)

    def used(self) -> int:
        """Bytes in use, once everything written and freed has settled: btrfs drops a deleted
        subvolume and XFS frees an unlinked file's blocks in the background, after a while; ZFS
        counts flushed data and a destroyed dataset at once, and so does `rbd du`."""
        if isinstance(self.drv, ZfsDriver):
            return int(run(["zfs", "get", "-Hp", "-o", "value", "used", self.drv.pool]))
        if self.cluster is not None:
            du = self.cluster.rbd("du", "--format", "json", "--pool", self.cluster.pool)
            return int(json.loads(du)["total_used_size"])
        if isinstance(self.drv, BtrfsDriver):
            run(["btrfs", "subvolume", "sync", str(self.where)])  # deleted subvolumes really gone
        readings: list[int] = []
        for _ in range(50):  # until it reads the same three times running (10 s at most)
            os.sync()
            st = os.statvfs(self.where)
            readings.append((st.f_blocks - st.f_bfree) * st.f_frsize)
            if len(readings) >= 3 and len(set(readings[-3:])) == 1:
                break
            time.sleep(0.2)
        return readings[-1]


def backend(label: str, fs: LoopFs, storage_type: str) -> Backend:
    (fs.mount / "native").mkdir()  # where the tools' results go
    return Backend(label, driver_for(StorageConfig("s", storage_type, options={"path": fs.mount})), fs.mount)


def zfs_backend(pool: ZfsPool) -> Backend:
    run(["zfs", "create", f"{pool.name}/native"])  # where the tool's clones and copies go
    drv = driver_for(StorageConfig("s", "zfs", options={"pool": pool.name}))
    return Backend("zfs (zfs-fuse)", drv, pool.mount, clones=SERVICE_CLONES, copy_size=SMALL_COPY_SIZE)


def rbd_backend(cluster: ceph.CephCluster, seed: Backend) -> Backend:
    drv = driver_for(StorageConfig("s", "rbd", options={"pool": cluster.pool, "conf": cluster.conf,
                                                         "username": "admin"}))
    return Backend("rbd (memstore)", drv, seed=seed, cluster=cluster, clones=SERVICE_CLONES,
                   copy_size=SMALL_COPY_SIZE)


def disk(owner: int, fmt: str = "raw") -> VolName:
    return VolName(owner, f"vm-{owner}-disk-0", fmt)


def filled_volume(b: Backend, vol: VolName, size: int) -> None:
    """A new volume holding non-zero data throughout (nothing is skipped as zeros); on rbd, stork
    copies it in from a volume of the same name filled on the seed storage."""
    b.drv.allocate(vol, size)
    if b.seed is not None:
        filled_volume(b.seed, vol, size)
        b.drv.copy_from(b.seed.drv, vol, vol)
        return
    block = os.urandom(MIB) * 8
    with b.drv.image(vol, write=True) as image:
        for offset in range(0, size, len(block)):
            os.pwrite(image.fds[0], block, offset)


def timed(action: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    action(*args)
    return time.perf_counter() - start


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


def rbd_argv(b: Backend, *args: str) -> list[str]:
    """`rbd` on the backend's cluster, as an admin runs it."""
    assert b.cluster is not None
    return ["rbd", "--conf", str(b.cluster.conf), *args]


# ---- 1. linked clones ---------------------------------------------------------------------
def native_link(b: Backend, base: VolName) -> tuple[str, Callable[[int], list[str]]]:
    """The tool's label and its command line making the i-th clone of the base."""
    if isinstance(b.drv, BtrfsDriver):
        return "btrfs subvolume snapshot BASE NEW", lambda i: [
            "btrfs", "subvolume", "snapshot", str(b.entry(base)), str(b.where / "native" / str(i))]
    if isinstance(b.drv, ZfsDriver):
        return f"zfs clone BASE@{SNAPSHOT} NEW", lambda i: [
            "zfs", "clone", f"{b.drv.dataset(base)}@{SNAPSHOT}", f"{b.drv.pool}/native/{i}"]
    if isinstance(b.drv, RbdDriver):
        pool = b.drv.pool
        return f"rbd clone BASE@{SNAPSHOT} NEW", lambda i: rbd_argv(
            b, "clone", f"{pool}/{flat_name(base)}@{SNAPSHOT}", f"{pool}/native.{i}")
    return "qemu-img create -f qcow2 -F raw -b BASE NEW", lambda i: [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(b.file(base)),
        str(b.where / "native" / f"{i}.qcow2")]


def bench_links(b: Backend, owner: int) -> list[tuple[str, list[float]]]:
    """(label, seconds per clone) for stork's link_clone and the native tool, interleaved."""
    vol = disk(owner)
    filled_volume(b, vol, BASE_SIZE)
    base = b.drv.default_base_name(vol)
    b.drv.make_base(vol, base)
    label, argv = native_link(b, base)
    stork: list[float] = []
    native: list[float] = []
    for i in range(b.clones + 1):  # the first of each is a warm-up (stork makes its blank overlay then)
        clone = disk(owner + 1 + i, b.drv.linked_clone_format)
        stork_time = timed(b.drv.link_clone, base, clone)
        native_time = timed(run, argv(i))
        if i:
            stork.append(stork_time)
            native.append(native_time)
    if b.cluster is not None:
        rbd_clear(b.cluster)  # memstore: the base's 256 MiB would crowd out the copies' data
    return [(f"stork link_clone ({type(b.drv).__name__})", stork), (label, native)]


def print_links(results: list[tuple[Backend, list[tuple[str, list[float]]]]]) -> None:
    print(f"\n1. linked clone of a {BASE_SIZE // MIB} MiB base holding data, one at a time "
          f"({CLONES} each, {SERVICE_CLONES} on zfs and rbd; interleaved)")
    print(f"   {'storage':<18}{'':<46}{'p50':>10}{'p90':>10}{'p50 vs tool':>13}")
    for b, rows in results:
        tool_p50 = pct(rows[-1][1], 50)
        for n, (label, times) in enumerate(rows):
            print(f"   {b.label if n == 0 else '':<18}{label:<46}{pct(times, 50) * 1000:>7.1f} ms"
                  f"{pct(times, 90) * 1000:>7.1f} ms{pct(times, 50) / tool_p50 - 1:>+12.0%}")


# ---- 2. full copies -----------------------------------------------------------------------
@dataclass
class Copy:
    """One way of copying the source: `copy` is timed, `undo` removes what it made."""

    label: str
    copy: Callable[[], object]
    undo: Callable[[], object]


def qemu_img_convert(src: str, dst: str) -> None:
    run(["qemu-img", "convert", "-n", "-t", "writeback", "-f", "raw", "-O", "raw", src, dst])


def copies(b: Backend, owner: int, reflinks: bool) -> list[Copy]:
    """The ways of copying guest `owner`'s disk within a loop filesystem, each into a name of its
    own; fills the disk first."""
    src, dst, generic = disk(owner), disk(owner + 1), disk(owner + 2)
    filled_volume(b, src, b.copy_size)
    src_file, out = str(b.file(src)), b.where / "native" / "copy.raw"

    def stork_copy() -> None:
        b.drv.allocate(dst, b.copy_size)
        b.drv.copy_from(b.drv, src, dst)

    def stork_generic() -> None:
        b.drv.allocate(generic, b.copy_size)
        with b.drv.image(src) as image:
            b.drv.copy_in(image, b.copy_size, generic)

    def cp() -> None:
        run(["cp", "--reflink=always", src_file, str(out)])
        run(["sync", str(out)])

    def qemu_img() -> None:
        out.touch()
        os.truncate(out, b.copy_size)  # -n: into an existing (sparse) target, as stork does
        qemu_img_convert(src_file, str(out))

    stork_label = "stork allocate + copy_from" + (" (FICLONE)" if reflinks else " (qemu-img)")
    rows = [Copy(stork_label, stork_copy, lambda: b.drv.free(dst))]
    if reflinks:
        rows += [Copy("cp --reflink=always SRC DST; sync DST", cp, lambda: out.unlink()),
                 Copy("stork allocate + copy_in (qemu-img)", stork_generic, lambda: b.drv.free(generic))]
    rows.append(Copy("qemu-img convert -n -t writeback SRC DST", qemu_img, lambda: out.unlink()))
    return rows


def zfs_copies(b: Backend, owner: int) -> list[Copy]:
    """Copying guest `owner`'s disk within the pool, stork's and the tool's each into a file in a
    fresh dataset; fills the disk first."""
    assert isinstance(b.drv, ZfsDriver)
    src, dst = disk(owner), disk(owner + 1)
    filled_volume(b, src, b.copy_size)
    dataset = f"{b.drv.pool}/native/copy"
    out = b.where / "native" / "copy" / IMAGE

    def stork_copy() -> None:
        b.drv.allocate(dst, b.copy_size)
        b.drv.copy_from(b.drv, src, dst)

    def qemu_img() -> None:
        run(["zfs", "create", dataset])
        out.touch()
        os.truncate(out, b.copy_size)
        qemu_img_convert(str(b.file(src)), str(out))

    return [Copy("stork allocate + copy_from (qemu-img)", stork_copy, lambda: b.drv.free(dst)),
            Copy("zfs create; qemu-img convert -n -t writeback", qemu_img, lambda: zfs_destroy(dataset))]


def zfs_destroy(dataset: str) -> None:
    """Unmount and destroy a dataset (zfs-fuse destroys only unmounted ones), retried while it is
    busy: zfs-fuse hears of a closed file a moment after close(2) returns."""
    deadline = time.monotonic() + 10
    while True:
        subprocess.run(["zfs", "umount", dataset], capture_output=True)
        done = subprocess.run(["zfs", "destroy", dataset], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "busy" not in done.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"zfs destroy {dataset}: {done.stderr.strip()}")
        time.sleep(0.1)


def rbd_copies(b: Backend, owner: int) -> list[Copy]:
    """Copying guest `owner`'s disk from the seed dir storage into the pool: stork, qemu-img into
    an `rbd:` spec, `rbd import`; fills the disk first (on the seed only)."""
    assert b.seed is not None and b.cluster is not None
    src, dst = disk(owner), disk(owner + 1)
    filled_volume(b.seed, src, b.copy_size)
    src_file, pool, image = str(b.seed.file(src)), b.cluster.pool, "native.copy"

    def stork_copy() -> None:
        b.drv.allocate(dst, b.copy_size)
        b.drv.copy_from(b.seed.drv, src, dst)

    def qemu_img() -> None:
        run(rbd_argv(b, "create", "--size", f"{b.copy_size}B", f"{pool}/{image}"))
        qemu_img_convert(src_file, b.cluster.spec(image))

    def rbd_import() -> None:
        run(rbd_argv(b, "import", "--no-progress", src_file, f"{pool}/{image}"))

    def drop() -> None:
        run(rbd_argv(b, "rm", "--no-progress", f"{pool}/{image}"))

    return [Copy("stork allocate + copy_from (qemu-img)", stork_copy, lambda: b.drv.free(dst)),
            Copy("rbd create; qemu-img convert -n -t writeback", qemu_img, drop),
            Copy("rbd import SRC NEW", rbd_import, drop)]


def rbd_pool_copies(b: Backend, owner: int) -> list[Copy]:
    """Copying guest `owner`'s disk within the pool: stork (qemu-img through librbd), next to
    `rbd deep cp` and qemu-img run directly; fills the disk first."""
    assert b.cluster is not None
    src, dst = disk(owner), disk(owner + 1)
    filled_volume(b, src, b.copy_size)
    pool, image, src_image = b.cluster.pool, "native.copy", flat_name(src)

    def stork_copy() -> None:
        b.drv.allocate(dst, b.copy_size)
        b.drv.copy_from(b.drv, src, dst)

    def deep_cp() -> None:
        run(rbd_argv(b, "deep", "cp", "--no-progress", f"{pool}/{src_image}", f"{pool}/{image}"))

    def qemu_img() -> None:
        run(rbd_argv(b, "create", "--size", f"{b.copy_size}B", f"{pool}/{image}"))
        qemu_img_convert(b.cluster.spec(src_image), b.cluster.spec(image))

    def drop() -> None:
        run(rbd_argv(b, "rm", "--no-progress", f"{pool}/{image}"))

    return [Copy("stork allocate + copy_from (qemu-img)", stork_copy, lambda: b.drv.free(dst)),
            Copy("rbd deep cp SRC NEW", deep_cp, drop),
            Copy("rbd create; qemu-img convert -n -t writeback", qemu_img, drop)]


def bench_copies(b: Backend, rows: list[Copy]) -> list[tuple[str, float, int]]:
    """(label, best seconds, bytes of new space) per way of copying, runs interleaved."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(COPY_RUNS):
        for row in rows:
            before = b.used()
            seconds = timed(row.copy)
            grown = b.used() - before
            row.undo()
            best[row.label] = min(best.get(row.label, (seconds, grown)), (seconds, grown))
    return [(label, *best[label]) for label in best]


def print_copies(results: list[tuple[Backend, list[tuple[str, float, int]]]]) -> None:
    print(f"\n2. full copy of a raw image of non-zero data, within one storage (\"rbd from ext4\": from a dir "
          f"storage on ext4), flushed (best of {COPY_RUNS})")
    print(f"   {'storage':<18}{'':<46}{'size':>9}{'time':>9}{'MiB/s':>9}{'space':>10}")
    for b, rows in results:
        for n, (label, seconds, grown) in enumerate(rows):
            print(f"   {b.label if n == 0 else '':<18}{label:<46}{b.copy_size // MIB:>5} MiB{seconds:>8.3f}s"
                  f"{b.copy_size / MIB / seconds:>9.0f}{grown / MIB:>6.0f} MiB")


# ---- main ---------------------------------------------------------------------------------
def services(pool: ZfsPool | str, cluster: ceph.CephCluster | str, ext4: Backend) -> list[Backend]:
    """The zfs and rbd backends that could be made; a line for each that could not."""
    made: list[Backend] = []
    for kind, service in (("zfs", pool), ("rbd", cluster)):
        if isinstance(service, str):
            print(f"{kind}: skipped: {service}")
        elif isinstance(service, ZfsPool):
            made.append(zfs_backend(service))
        else:
            made.append(rbd_backend(service, ext4))
    return made


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/backends.py needs root (loop devices and mount)")
    with loop_filesystems(["btrfs", "xfs", "ext4"]) as fs, zfs_pool_made() as pool, ceph_cluster() as cluster:
        btrfs = backend("btrfs", fs["btrfs"], "btrfs")
        xfs = backend("dir on XFS", fs["xfs"], "dir")
        ext4 = backend("dir on ext4", fs["ext4"], "dir")
        print("stork backend benchmark: .venv/bin/python bench/backends.py")
        print(f"{os.cpu_count()} cores; loop filesystems ({FS_SIZE // GIB} GiB, sparse) in {fs['btrfs'].where}")
        more = services(pool, cluster, ext4)
        print_links([(b, bench_links(b, 1000)) for b in (btrfs, xfs, *more)])
        ways = [(btrfs, partial(copies, btrfs, 100, True)), (xfs, partial(copies, xfs, 100, True)),
                (ext4, partial(copies, ext4, 100, False))]
        for b in more:
            if isinstance(b.drv, ZfsDriver):
                ways.append((b, partial(zfs_copies, b, 500)))
            else:
                ways += [(replace(b, label="rbd from ext4"), partial(rbd_copies, b, 500)),
                         (replace(b, label="rbd within pool"), partial(rbd_pool_copies, b, 600))]
        print_copies([(b, bench_copies(b, rows())) for b, rows in ways])  # each source filled just before


if __name__ == "__main__":
    main()
