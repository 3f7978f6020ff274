"""Storage backend benchmarks: stork's drivers, called in-process, next to the native tool doing
the same work on the same data in the same run.

    .venv/bin/python bench/backends.py          (as root: it makes loop filesystems)

It makes three filesystems on loop devices backed by sparse files in a temporary directory:
btrfs (a btrfs storage), XFS with reflink=1 and ext4 (each a dir storage; ext4 cannot share
extents). Whatever happens, also on Ctrl-C or a failure, it unmounts them, detaches the loop
devices it attached (by the paths `losetup -f --show` gave it) and deletes its files. Then:

1. linked clone latency from a 256 MiB base holding data, one clone at a time, stork and tool
   samples interleaved (p50 and p90 of 50 each, after one unmeasured warm-up each):
   btrfs: `BtrfsDriver.link_clone` (snapshot ioctl, rename, syncfs) next to
   `btrfs subvolume snapshot BASE NEW`; dir on XFS: `DirDriver.link_clone` (a copy of the
   base's blank qcow2 overlay, fsynced) next to `qemu-img create -f qcow2 -F raw -b BASE NEW`.
2. full copy of a 2 GiB raw image of non-zero data (best of 3, rows interleaved, each after a
   sync): stork `allocate` + `copy_from` (FICLONE where the filesystem shares extents, else
   qemu-img) next to `cp --reflink=always` and `qemu-img convert -n`; and stork's qemu-img path
   (`copy_in`) forced on the reflink filesystems, to show what sharing saves. Stork flushes
   every copy before it returns, so the tools' rows flush too (`-t writeback` flushes on close;
   `sync FILE` after cp). "space" is how much the filesystem's used space grew by the copy.

The tools' rows include starting a process (a few ms); stork's rows are bare method calls.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drivers import driver_for
from drivers.base import Driver
from drivers.btrfs import IMAGE, BtrfsDriver
from drivers.names import VolName
from drivers.storage import StorageConfig

MIB, GIB = 1 << 20, 1 << 30
FS_SIZE = 8 * GIB  # sparse: only what is written takes space
BASE_SIZE = 256 * MIB
COPY_SIZE = 2 * GIB
CLONES = 50
COPY_RUNS = 3
MKFS = {
    "btrfs": ["mkfs.btrfs", "-q"],
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"],  # no background init
}


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


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
    where = Path(tempfile.mkdtemp(prefix="stork-backends-", dir=os.environ.get("STORK_BENCH_DIR")))
    made: dict[str, LoopFs] = {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up too
    try:
        for kind in kinds:
            made[kind] = LoopFs(kind, where)  # recorded before make(): close() undoes a partial one
            made[kind].make()
        yield made
    finally:
        handlers = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if all([fs.close() for fs in made.values()]):
            where.rmdir()  # empty now; left in place (and named) if anything could not be undone
        else:
            print(f"cleanup incomplete: see {where} and `losetup -a`", file=sys.stderr)
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, previous)


# ---- storages -----------------------------------------------------------------------------
@dataclass
class Backend:
    label: str
    fs: LoopFs
    drv: Driver

    @property
    def root(self) -> Path:
        return self.fs.mount

    def entry(self, vol: VolName) -> Path:
        """The volume's entry: a btrfs subvolume directory, or a dir storage's file."""
        return self.root / ("base" if vol.is_base else str(vol.owner)) / f"{vol.name}.{vol.fmt}"

    def file(self, vol: VolName) -> Path:
        """The file holding the volume's data."""
        return self.entry(vol) / IMAGE if isinstance(self.drv, BtrfsDriver) else self.entry(vol)

    def used(self) -> int:
        """Bytes in use, once everything written and freed has settled: btrfs drops a deleted
        subvolume and XFS frees an unlinked file's blocks in the background, after a while."""
        if isinstance(self.drv, BtrfsDriver):
            run(["btrfs", "subvolume", "sync", str(self.root)])  # deleted subvolumes really gone
        readings: list[int] = []
        for _ in range(50):  # until it reads the same three times running (10 s at most)
            os.sync()
            st = os.statvfs(self.root)
            readings.append((st.f_blocks - st.f_bfree) * st.f_frsize)
            if len(readings) >= 3 and len(set(readings[-3:])) == 1:
                break
            time.sleep(0.2)
        return readings[-1]


def backend(label: str, fs: LoopFs, storage_type: str) -> Backend:
    (fs.mount / "native").mkdir()  # where the tools' results go
    return Backend(label, fs, driver_for(StorageConfig("s", storage_type, options={"path": fs.mount})))


def disk(owner: int, fmt: str = "raw") -> VolName:
    return VolName(owner, f"vm-{owner}-disk-0", fmt)


def filled_volume(b: Backend, vol: VolName, size: int) -> None:
    """A new volume holding non-zero data throughout (nothing is skipped as zeros)."""
    b.drv.allocate(vol, size)
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


# ---- 1. linked clones ---------------------------------------------------------------------
def bench_links(b: Backend, owner: int) -> list[tuple[str, list[float]]]:
    """(label, seconds per clone) for stork's link_clone and the native tool, interleaved."""
    vol = disk(owner)
    filled_volume(b, vol, BASE_SIZE)
    base = b.drv.default_base_name(vol)
    b.drv.make_base(vol, base)
    if isinstance(b.drv, BtrfsDriver):
        label = "btrfs subvolume snapshot BASE NEW"
        argv = ["btrfs", "subvolume", "snapshot", str(b.entry(base))]
        suffix = ""
    else:
        label = "qemu-img create -f qcow2 -F raw -b BASE NEW"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(b.file(base))]
        suffix = ".qcow2"
    stork: list[float] = []
    native: list[float] = []
    for i in range(CLONES + 1):  # the first of each is a warm-up (stork makes its blank overlay then)
        clone = disk(owner + 1 + i, b.drv.linked_clone_format)
        stork_time = timed(b.drv.link_clone, base, clone)
        native_time = timed(run, [*argv, str(b.root / "native" / f"{i}{suffix}")])
        if i:
            stork.append(stork_time)
            native.append(native_time)
    return [(f"stork link_clone ({type(b.drv).__name__})", stork), (label, native)]


def print_links(results: list[tuple[Backend, list[tuple[str, list[float]]]]]) -> None:
    print(f"\n1. linked clone of a {BASE_SIZE // MIB} MiB base holding data, one at a time "
          f"({CLONES} each, interleaved)")
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


def copies(b: Backend, owner: int, reflinks: bool) -> list[Copy]:
    """The ways of copying guest `owner`'s disk, each into a name of its own."""
    src, dst, generic = disk(owner), disk(owner + 1), disk(owner + 2)
    src_file, out = str(b.file(src)), b.root / "native" / "copy.raw"

    def stork_copy() -> None:
        b.drv.allocate(dst, COPY_SIZE)
        b.drv.copy_from(b.drv, src, dst)

    def stork_generic() -> None:
        b.drv.allocate(generic, COPY_SIZE)
        with b.drv.image(src) as image:
            b.drv.copy_in(image, COPY_SIZE, generic)

    def cp() -> None:
        run(["cp", "--reflink=always", src_file, str(out)])
        run(["sync", str(out)])

    def qemu_img() -> None:
        out.touch()
        os.truncate(out, COPY_SIZE)  # -n: into an existing (sparse) target, as stork does
        run(["qemu-img", "convert", "-n", "-t", "writeback", "-f", "raw", "-O", "raw", src_file, str(out)])

    stork_label = "stork allocate + copy_from" + (" (FICLONE)" if reflinks else " (qemu-img)")
    rows = [Copy(stork_label, stork_copy, lambda: b.drv.free(dst))]
    if reflinks:
        rows += [Copy("cp --reflink=always SRC DST; sync DST", cp, lambda: out.unlink()),
                 Copy("stork allocate + copy_in (qemu-img)", stork_generic, lambda: b.drv.free(generic))]
    rows.append(Copy("qemu-img convert -n -t writeback SRC DST", qemu_img, lambda: out.unlink()))
    return rows


def bench_copies(b: Backend, owner: int, reflinks: bool) -> list[tuple[str, float, int]]:
    """(label, best seconds, bytes of new space) per way of copying, runs interleaved."""
    src = disk(owner)
    filled_volume(b, src, COPY_SIZE)
    rows = copies(b, owner, reflinks)
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
    print(f"\n2. full copy of a {COPY_SIZE // GIB} GiB raw image of non-zero data, within one filesystem, "
          f"flushed (best of {COPY_RUNS})")
    print(f"   {'storage':<18}{'':<46}{'time':>9}{'MiB/s':>9}{'space':>10}")
    for b, rows in results:
        for n, (label, seconds, grown) in enumerate(rows):
            print(f"   {b.label if n == 0 else '':<18}{label:<46}{seconds:>8.3f}s"
                  f"{COPY_SIZE / MIB / seconds:>9.0f}{grown / MIB:>6.0f} MiB")


# ---- main ---------------------------------------------------------------------------------
def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/backends.py needs root (loop devices and mount)")
    with loop_filesystems(["btrfs", "xfs", "ext4"]) as fs:
        btrfs = backend("btrfs", fs["btrfs"], "btrfs")
        xfs = backend("dir on XFS", fs["xfs"], "dir")
        ext4 = backend("dir on ext4", fs["ext4"], "dir")
        print("stork backend benchmark: .venv/bin/python bench/backends.py")
        print(f"{os.cpu_count()} cores; loop filesystems ({FS_SIZE // GIB} GiB, sparse) in {fs['btrfs'].where}")
        print_links([(b, bench_links(b, 1000)) for b in (btrfs, xfs)])
        print_copies([(b, bench_copies(b, 100, reflinks)) for b, reflinks in ((btrfs, True), (xfs, True),
                                                                               (ext4, False))])


if __name__ == "__main__":
    main()
