"""Serve benchmark: a backed-up disk served over NBD by `stork backup serve` (straight from the
chunk store), next to `qemu-nbd` serving the same data as a plain raw file, in one run.

    .venv/bin/python bench/serve.py

The image: 1 GiB raw, deterministic (seeded), in 4 MiB regions: about 40% zeros, 30% random
bytes, 30% text-like. It is backed up once into a temp chunk store; then each server runs as a
process of its own on a loopback port, and `qemu-img convert` reads the whole disk from it
into a file (in the page cache: the network read is what is timed), best of three, the
servers started afresh for each read. The first read of the chunk store decodes each chunk
(zstd), as a user copying a file out would. Everything lives in one temp directory, removed
at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import testing

MIB, GIB = 1 << 20, 1 << 30
SIZE = GIB
REGION = 4 * MIB
SEED = 20261206
REPEATS = 3


def make_image(path: Path) -> None:
    rnd = random.Random(SEED)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, REGION):
            kind = rnd.random()
            if kind < 0.40:
                continue
            f.seek(offset)
            f.write(rnd.randbytes(REGION) if kind < 0.70 else (b"stork serves a backup " * REGION)[:REGION])


def back_up(store_dir: Path, image: Path) -> str:
    from drivers import qemu
    from drivers.backup import datapath
    from drivers.backup.store import ChunkStore

    store = ChunkStore(store_dir)
    with store.begin(100) as writer:
        disk = qemu.Image.of_fd("raw", os.open(image, os.O_RDONLY), str(image))
        writer.add_index("scsi0", datapath.back_up(disk, "raw", writer), source=str(image), identity="bench")
        return str(writer.commit().id)


def serve_child(store_dir: str, backup: str, port: str) -> None:
    """`bench/serve.py --serve STORE ID PORT`: what `stork backup serve` runs, without a config."""
    from drivers.backup.datapath import DiskReader
    from drivers.backup.serve import Export, listen
    from drivers.backup.store import ChunkStore

    store = ChunkStore(Path(store_dir))
    Export("scsi0", DiskReader(store, store.index(backup, "scsi0"), backup), listen("127.0.0.1", int(port))).serve()


def timed_read(server: list[str], port: int, export: str, out: Path) -> float:
    proc = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nbd://127.0.0.1:{port}/{export}"
        deadline = time.monotonic() + 30
        while subprocess.run(["qemu-img", "info", url], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{server[0]} did not start")
            time.sleep(0.1)
        began = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out)], check=True)
        return time.monotonic() - began
    finally:
        from drivers.tools import stop

        stop(proc)  # SIGTERM, SIGKILL if it lingers: no server outlives its row
        out.unlink(missing_ok=True)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve_child(*sys.argv[2:5])
        return
    work = Path(tempfile.mkdtemp(prefix="stork-serve-bench-"))
    try:
        image, store = work / "disk.raw", work / "store"
        store.mkdir()
        make_image(image)
        backup = back_up(store, image)
        servers = {
            "stork backup serve (the chunk store)": lambda port: [sys.executable, __file__, "--serve", str(store),
                                                                 backup, str(port)],
            "qemu-nbd --read-only (the raw file)": lambda port: ["qemu-nbd", "--read-only", "--persistent", "-f",
                                                                "raw", "-x", "scsi0", "-b", "127.0.0.1", "-p",
                                                                str(port), str(image)],
        }
        rows = []
        for name, argv in servers.items():
            ports = testing.free_ports(REPEATS)
            rows.append((name, min(timed_read(argv(port), port, "scsi0", work / "out.raw") for port in ports)))
        print(f"stork serve benchmark: {SIZE // MIB} MiB raw disk (40% zeros), {os.cpu_count()} cores; "
              "qemu-img convert reading the whole disk over NBD on loopback, best of 3")
        print(f"   {'server':<40} {'time':>8} {'MiB/s':>8} {'vs qemu-nbd':>12}")
        peer = rows[-1][1]
        for name, seconds in rows:
            print(f"   {name:<40} {seconds:>7.2f}s {SIZE / MIB / seconds:>8.0f} {peer / seconds:>11.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
