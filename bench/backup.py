"""Backup benchmark: stork's chunk store next to restic and borg, on the same image in one run.

    .venv/bin/python bench/backup.py          (needs restic and borg: apt-get install restic borgbackup)

The image: 2 GiB raw, deterministic (seeded), in 4 MiB regions: about 40% zeros, 25% random
bytes, 35% text-like (words drawn from a small vocabulary: compressible). The "1% changed"
image has 1% of it overwritten with new random bytes, in 1 MiB runs at random places. Every
row runs as a child process of its own, timed by wall clock, its peak RSS from GNU time
(stork reads these files directly; the bitmap row's qemu-nbd, which maps the dirty bitmap, is
a grandchild and not counted); each store's size is `du` of its directory. Each row starts
with nothing dirty and, run as root, nothing in the page cache: every tool reads its source
and its store from disk, as a nightly backup does.
Rows: first backup, unchanged re-backup, 1%-changed re-backup, restore into a new file
(stork's flushed with fsync, as its restore job does; restic and borg leave theirs in the page
cache); a start-up row (stork's imports alone, which every stork row pays); for stork also a
template and ten linked clones (qcow2 overlays, 1% changed each) backed up after the template:
time and store growth. Baselines: `qemu-img convert` and `cp --sparse=always` of the image.
restic runs encrypted (its only mode: RESTIC_PASSWORD); borg unencrypted (`-e none`), once with
its defaults and once as `--chunker-params fixed,4194304 -C zstd,1`; stork both ways (a first
backup and a restore into an encrypted store, beside the plain rows). A qcow2 copy of the
image, backed up once with a dirty bitmap and 1% rewritten, shows the incremental read.
Everything lives in one temp directory, removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB, GIB = 1 << 20, 1 << 30
SIZE = 2 * GIB
REGION = 4 * MIB
SEED = 20261126
VOCABULARY = ("the quick brown fox jumps over lazy dog disk image chunk store backup restore template clone base "
              "volume guest node storage job step worker queue redis celery qemu")
WORDS = [w.encode() for w in VOCABULARY.split(" ")]


# ---- the data ----------------------------------------------------------------------------------
def make_image(path: Path) -> None:
    rnd = random.Random(SEED)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, REGION):
            kind = rnd.random()
            if kind < 0.40:
                continue  # zeros: a hole
            f.seek(offset)
            f.write(rnd.randbytes(REGION) if kind < 0.65 else _text(rnd))


def _text(rnd: random.Random) -> bytes:
    return b" ".join(rnd.choices(WORDS, k=REGION // 5))[:REGION].ljust(REGION, b" ")


RUN = 1 * MIB  # a changed area: guests write files and extents, not scattered blocks


def changes(seed: int) -> list[tuple[int, bytes]]:
    """1% of the image as new random bytes in 1 MiB runs at random 64 KiB-aligned offsets."""
    rnd = random.Random(seed)
    return [(rnd.randrange(0, SIZE - RUN, 64 << 10), rnd.randbytes(RUN)) for _ in range(SIZE // 100 // RUN)]


def change_one_percent(path: Path) -> None:
    with open(path, "r+b") as f:
        for offset, data in changes(SEED + 1):
            f.seek(offset)
            f.write(data)


# ---- running a row -----------------------------------------------------------------------------
@dataclass
class Row:
    tool: str
    what: str
    seconds: float
    rss_mib: float
    store_mib: float | None
    cpu_seconds: float = 0.0  # user + system, of the process and the children it waited for


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds) of one child process, which must succeed. GNU
    time runs it and reports its peak RSS and CPU time: a child forked from this (large)
    process directly would count this process's pages too. Each row starts with nothing dirty
    in the page cache, and as root with nothing cached at all."""
    os.sync()  # no row pays for writing back what an earlier one left dirty
    drop_caches()
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", report.name, *argv],
                              env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              cwd=cwd, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:3])}...: exit {proc.returncode}: {proc.stderr.decode()[-500:]}")
        rss_kib, user, system = report.read().split()[-3:]
        return seconds, int(rss_kib) / 1024, float(user) + float(system)


def drop_caches() -> None:
    """Empty the page cache (as root), so that each row reads its source and store from disk,
    as a nightly backup or a restore on a busy host does; elsewhere rows read what is cached."""
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def du_mib(path: Path) -> float:
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0]) / MIB


STORK = [sys.executable, str(Path(__file__).resolve())]


# ---- stork's rows, each in a child process (`bench/backup.py --stork ...`) ----------------------
KEY = Path(tempfile.gettempdir()) / "stork-backup-bench.key"  # made per run, removed at its end


def stork_child(action: str, store_dir: str, image: str, *rest: str) -> None:
    """One stork row: `backup IMAGE VMID [BASE]`, `bitmap-backup IMAGE VMID` (a qcow2 image
    read through its dirty bitmap, as the backup job does), `restore OUT VMID`, or `start-up`
    (the imports alone: what every row pays before its work, and a worker pays once)."""
    from drivers import nbd, qemu
    from drivers.backup import datapath
    from drivers.backup.crypt import EncryptedCodec, load_key
    from drivers.backup.store import ChunkStore

    if action == "start-up":
        return

    codec = EncryptedCodec(load_key(KEY)) if store_dir.endswith("-encrypted") else None
    store = ChunkStore(Path(store_dir), codec=codec)
    fmt = "qcow2" if image.endswith(".qcow2") else "raw"
    if action in ("backup", "bitmap-backup"):
        vmid, base = int(rest[0]), rest[1] if len(rest) > 1 else ""
        known = store.snapshots()
        found = datapath.find_base(store, known, base, "bench") if base else None
        previous = datapath.find_base(store, known, image, "bench") if action == "bitmap-backup" else None
        fd = os.open(image, os.O_RDWR)
        backing = qemu.Image.of_fd("raw", os.open(base, os.O_RDONLY), base) if base else None
        disk = qemu.Image.of_fd(fmt, fd, image, backing)
        marked = action == "bitmap-backup" and "bench" in (qemu.bitmaps(disk) or {})
        dirty = nbd.dirty_extents(disk, "bench") if previous and marked else None
        if action == "bitmap-backup":
            if marked:
                qemu.remove_bitmap(disk, "bench")
            qemu.add_bitmap(disk, "bench")  # before the read: every later write is in it
        with store.begin(vmid) as writer:
            index = datapath.back_up(disk, fmt, writer, *(found or (None, None)),
                                   previous=previous[1] if previous and dirty else None, dirty=dirty)
            writer.add_index("scsi0", index, source=image, identity="bench")
            writer.commit()
    elif action == "restore":
        snap = store.snapshots(int(rest[0]))[-1]
        index = store.index(str(snap.id), "scsi0")
        with open(image, "wb") as f:
            f.truncate(index.virtual_size)
        fd = os.open(image, os.O_RDWR)
        datapath.restore(store, index, qemu.Image.of_fd("raw", fd, image), reads_zero=True)
        os.fsync(fd)  # as the restore job does; restic and borg do not


def stork_rows(work: Path, image: Path, changed: Path) -> list[Row]:
    store = work / "stork"
    store.mkdir()
    seconds, rss, cpu = timed([*STORK, "--stork", "start-up", "-", "-"])
    rows = [Row("stork", "start-up alone (Python, imports)", seconds, rss, None, cpu),
            *encrypted_rows(work, image), *bitmap_rows(work, image)]
    for what, source, vmid in (("first backup", image, 100), ("unchanged re-backup", image, 101),
                               ("1%-changed re-backup (raw)", changed, 102)):
        before = du_mib(store)
        seconds, rss, cpu = timed([*STORK, "--stork", "backup", str(store), str(source), str(vmid)])
        rows.append(Row("stork", what, seconds, rss, du_mib(store) - before, cpu))
    out = work / "stork-restored.raw"
    seconds, rss, cpu = timed([*STORK, "--stork", "restore", str(store), str(out), "100"])
    _check_equal(image, out)
    rows.append(Row("stork", "restore (flushed)", seconds, rss, None, cpu))
    out.unlink()
    rows += clone_rows(work, store, image)
    return rows


def encrypted_rows(work: Path, image: Path) -> list[Row]:
    """A first backup and a restore into an encrypted store (AES-256-GCM, HMAC names)."""
    from drivers.backup.crypt import create_key

    store = work / "stork-encrypted"
    store.mkdir()
    create_key(KEY)
    seconds, rss, cpu = timed([*STORK, "--stork", "backup", str(store), str(image), "100"])
    rows = [Row("stork, encrypted", "first backup", seconds, rss, du_mib(store), cpu)]
    out = work / "stork-restored.raw"
    seconds, rss, cpu = timed([*STORK, "--stork", "restore", str(store), str(out), "100"])
    _check_equal(image, out)
    out.unlink()
    return [*rows, Row("stork, encrypted", "restore (flushed)", seconds, rss, None, cpu)]


def bitmap_rows(work: Path, image: Path) -> list[Row]:
    """The image as qcow2: a full backup that adds a dirty bitmap, 1% rewritten through qemu,
    then the backup that reads only what the bitmap shows written."""
    store, disk = work / "stork-qcow2", work / "disk.qcow2"
    store.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(disk)], check=True)
    timed([*STORK, "--stork", "bitmap-backup", str(store), str(disk), "100"])
    for offset, data in changes(SEED + 1):
        piece = work / "piece"
        piece.write_bytes(data)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {piece} {offset} {len(data)}", str(disk)],
                       check=True, capture_output=True)
    before = du_mib(store)
    seconds, rss, cpu = timed([*STORK, "--stork", "bitmap-backup", str(store), str(disk), "101"])
    disk.unlink()
    return [Row("stork", "1%-changed re-backup (qcow2, bitmap)", seconds, rss, du_mib(store) - before, cpu)]


def clone_rows(work: Path, store: Path, image: Path) -> list[Row]:
    """The image as a template's base, backed up as such (its chunks are in the store already:
    a template's base holds what its disk held), then ten qcow2 linked clones of it, 1% of
    each rewritten through qemu, each backed up reading only its own clusters."""
    base = work / "base.raw"
    os.link(image, base)
    before = du_mib(store)
    seconds, rss, cpu = timed([*STORK, "--stork", "backup", str(store), str(base), "200"])
    rows = [Row("stork", "template (base) backup", seconds, rss, du_mib(store) - before, cpu)]
    before, total, peak, cpus = du_mib(store), 0.0, 0.0, 0.0
    for n in range(10):
        clone = work / f"clone{n}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(clone)],
                       check=True)
        for offset, data in changes(SEED + 10 + n):  # through qemu, into the overlay
            piece = work / "piece"
            piece.write_bytes(data)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {piece} {offset} {len(data)}", str(clone)],
                           check=True, capture_output=True)
        seconds, rss, cpu = timed([*STORK, "--stork", "backup", str(store), str(clone), str(300 + n), str(base)])
        total, peak, cpus = total + seconds, max(peak, rss), cpus + cpu
    rows.append(Row("stork", "10 linked clones, 1% changed each", total, peak, du_mib(store) - before, cpus))
    return rows


def _check_equal(a: Path, b: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], check=True)


# ---- the peers ---------------------------------------------------------------------------------
def restic_rows(work: Path, image: Path, changed: Path) -> list[Row]:
    repo = work / "restic"
    env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(repo), "RESTIC_CACHE_DIR": str(work / "rcache")}
    timed(["restic", "init", "-q"], env)
    rows = []
    for what, source in (("first backup", image), ("unchanged re-backup", image),
                         ("1%-changed re-backup (raw)", changed)):
        staged = work / "restic-src" / "disk.raw"  # one path, so restic sees one file changing
        staged.parent.mkdir(exist_ok=True)
        staged.unlink(missing_ok=True)
        os.link(source, staged)
        before = du_mib(repo)
        seconds, rss, cpu = timed(["restic", "backup", "-q", str(staged)], env)
        rows.append(Row("restic", what, seconds, rss, du_mib(repo) - before, cpu))
    target = work / "restic-restored"
    seconds, rss, cpu = timed(["restic", "restore", "-q", "latest", "--target", str(target)], env)
    rows.append(Row("restic", "restore", seconds, rss, None, cpu))
    shutil.rmtree(target)
    return rows


def borg_rows(work: Path, image: Path, changed: Path, label: str, create_args: list[str]) -> list[Row]:
    repo = work / f"borg-{len(create_args)}"
    env = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": str(work / "borg-base")}
    timed(["borg", "init", "-e", "none", str(repo)], env)
    staged = work / "borg-src" / "disk.raw"
    staged.parent.mkdir(exist_ok=True)
    rows = []
    for n, (what, source) in enumerate((("first backup", image), ("unchanged re-backup", image),
                                        ("1%-changed re-backup (raw)", changed))):
        staged.unlink(missing_ok=True)
        os.link(source, staged)
        before = du_mib(repo)
        seconds, rss, cpu = timed(["borg", "create", *create_args, f"{repo}::a{n}", str(staged)], env)
        rows.append(Row(label, what, seconds, rss, du_mib(repo) - before, cpu))
    target = work / "borg-restored"
    target.mkdir()
    seconds, rss, cpu = timed(["borg", "extract", "--sparse", f"{repo}::a0"], env, cwd=target)
    rows.append(Row(label, "restore", seconds, rss, None, cpu))
    shutil.rmtree(target)
    return rows


def baseline_rows(work: Path, image: Path) -> list[Row]:
    out = work / "copy.raw"
    seconds, rss, cpu = timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(image), str(out)])
    rows = [Row("qemu-img convert", "copy", seconds, rss, du_mib(out), cpu)]
    out.unlink()
    seconds, rss, cpu = timed(["cp", "--sparse=always", str(image), str(out)])
    rows.append(Row("cp --sparse=always", "copy", seconds, rss, du_mib(out), cpu))
    out.unlink()
    return rows


# ---- what stork is held to, and what the machine allows ---------------------------------------
GOALS = (  # (stork's row, restic's row, at least this many times restic's speed)
    (("stork, encrypted", "first backup"), ("restic", "first backup"), 2.5),
    (("stork", "first backup"), ("restic", "first backup"), 3.0),
    (("stork", "restore (flushed)"), ("restic", "restore"), 2.0),
    (("stork", "unchanged re-backup"), ("restic", "unchanged re-backup"), 4.0),
)


def print_against_restic(rows: list[Row]) -> None:
    by = {(r.tool, r.what): r for r in rows}
    print("\n   against restic (same run)                  speed    goal   peak RSS (goal 200 MiB)")
    for ours, theirs, goal in GOALS:
        mine, peer = by[ours], by[theirs]
        ratio = peer.seconds / mine.seconds
        print(f"   {ours[0] + ' ' + ours[1]:<40}{ratio:>7.2f}x{goal:>7.1f}x{mine.rss_mib:>8.0f} MiB")


def _per_second(work: Callable[[], int], at_least: float = 1.0) -> float:
    """MB/s of `work` (which returns the bytes it did), run for at least `at_least` seconds on one core."""
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < at_least:
        done += work()
    return done / 1e6 / elapsed


def print_limits(work: Path, image: Path) -> None:
    """What one core does of each part of a first backup, on this image's own data, and what
    the disk reads: the distance from each stork row to what this machine can do."""
    import hashlib

    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    with open(image, "rb") as f:  # a 64 MiB sample of the data a backup reads (holes left out)
        sample = b"".join(block for block in iter(lambda: f.read(4 * MIB), b"") if any(block))[:64 * MIB]
    blocks = [sample[i:i + 4 * MIB] for i in range(0, len(sample), 4 * MIB)]
    compressor, aead = zstandard.ZstdCompressor(level=1), AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    sha = _per_second(lambda: sum(len(b) for b in blocks if hashlib.sha256(b).digest()))
    zstd = _per_second(lambda: sum(len(b) for b in blocks if compressor.compress(b) is not None))
    aes = _per_second(lambda: sum(len(b) for b in blocks if aead.encrypt(nonce, b, None)))
    probe = work / "disk-read.probe"  # the disk itself: written, flushed, dropped from the cache, read direct
    with open(probe, "wb") as f:
        for _ in range(512 // 4):
            f.write(os.urandom(4 * MIB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    start = time.perf_counter()
    subprocess.run(["dd", f"if={probe}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"], check=True)
    disk = 512 * MIB / 1e6 / (time.perf_counter() - start)
    probe.unlink()
    cores, allocated = os.cpu_count() or 1, du_mib(image) * MIB
    plain = cores / (1 / sha + 1 / zstd)  # every core hashing and compressing, all of the time
    limit_plain = min(plain, disk) * SIZE / allocated  # in the table's unit: MB/s of the whole image
    limit_encrypted = min(cores / (1 / sha + 1 / zstd + 1 / aes), disk) * SIZE / allocated
    print(f"\n   this machine, on the image's data: one core SHA-256 {sha:.0f} MB/s, zstd level 1 {zstd:.0f} MB/s, "
          f"AES-256-GCM {aes:.0f} MB/s; the disk reads {disk:.0f} MB/s (O_DIRECT)")
    print(f"   so a first backup can go at most {limit_plain:.0f} MB/s plain, {limit_encrypted:.0f} MB/s encrypted "
          f"({cores} cores, {allocated / SIZE:.0%} of the image allocated)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stork":
        stork_child(*sys.argv[2:])
        return
    missing = [t for t in ("restic", "borg", "qemu-img", "qemu-nbd", "qemu-io", "/usr/bin/time") if not shutil.which(t)]
    if missing:
        sys.exit(f"bench/backup.py needs {', '.join(missing)} (apt-get install restic borgbackup qemu-utils)")
    work = Path(tempfile.mkdtemp(prefix="stork-backup-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    try:
        image, changed = work / "disk.raw", work / "changed.raw"
        make_image(image)
        shutil.copyfile(image, changed)
        subprocess.run(["fallocate", "--dig-holes", str(changed)], check=True)
        change_one_percent(changed)
        print("stork backup benchmark: .venv/bin/python bench/backup.py")
        print(f"{os.cpu_count()} cores; a {SIZE // GIB} GiB raw image ({du_mib(image):.0f} MiB of it allocated) "
              f"in {work}")
        rows = [*baseline_rows(work, image), *stork_rows(work, image, changed), *restic_rows(work, image, changed),
                *borg_rows(work, image, changed, "borg (defaults)", []),
                *borg_rows(work, image, changed, "borg (fixed 4M, zstd 1)",
                           ["--chunker-params", "fixed,4194304", "-C", "zstd,1"])]
        print(f"\n   {'tool':<26}{'what':<36}{'time':>9}{'MB/s':>8}{'cores':>7}{'peak RSS':>10}{'store +':>11}")
        for r in rows:
            rate = SIZE / 1e6 / r.seconds if "clones" not in r.what else 10 * SIZE / 1e6 / r.seconds
            rate_text = "-" if "start-up" in r.what else f"{rate:.0f}"
            store = f"{r.store_mib:.0f} MiB" if r.store_mib is not None else "-"
            rss = f"{r.rss_mib:.0f} MiB" if r.rss_mib else "-"
            print(f"   {r.tool:<26}{r.what:<36}{r.seconds:>8.2f}s{rate_text:>8}{r.cpu_seconds / r.seconds:>7.2f}"
                  f"{rss:>10}{store:>11}")
        print_against_restic(rows)
        print_limits(work, image)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        KEY.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
