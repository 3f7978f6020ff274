"""Imports from other hypervisors next to a plain `qemu-img convert` of the same file, in one run.

    .venv/bin/python bench/imports.py

Starts its own redis-server and one worker in a temporary directory, makes a 1 GiB image of
data (no zeros: a third random, the rest text-like) and from it a streamOptimized VMDK (what
VMware exports and OVAs carry), a twoGbMaxExtentFlat VMDK and a VHDX, and an OVA holding the
VMDK. Each is imported as a guest's raw disk (`stork guest import`, submit -> finished: the
checks of the file, the copy flushed to disk, and its comparison with the file), next to
`qemu-img convert -t writeback -O raw` of the same file into the same storage directory
(flushed on close, as stork flushes) alone and followed by `qemu-img compare` (the same work
as stork's), best of RUNS, each after a `sync`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import testing
from worker.testing import ovf_text

MIB = 1 << 20
SIZE_MIB = 1024
RUNS = 3


def source_images(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file to import, its qemu-img input options)."""
    raw = folder / "source.raw"
    rng = random.Random(7)
    words = b"the quick brown fox jumps over the lazy dog and stork copies disks " * 16
    with open(raw, "wb") as f:
        for mib in range(SIZE_MIB):
            f.write(rng.randbytes(MIB) if mib % 3 == 0 else (words * (MIB // len(words) + 1))[:MIB])
    made: dict[str, tuple[Path, list[str]]] = {}
    for name, fmt, options in (("vmdk streamOptimized", "vmdk", ["-o", "subformat=streamOptimized"]),
                               ("vmdk twoGbMaxExtentFlat", "vmdk", ["-o", "subformat=twoGbMaxExtentFlat"]),
                               ("vhdx", "vhdx", [])):
        path = folder / f"{name.replace(' ', '-')}.{fmt}"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(raw), str(path)], check=True)
        made[name] = (path, ["-f", fmt])
    raw.unlink()
    ova = folder / "appliance.ova"
    ovf = folder / "appliance.ovf"
    ovf.write_text(ovf_text([("disk.vmdk", SIZE_MIB * MIB, "6", "0")]))
    disk = made["vmdk streamOptimized"][0]
    subprocess.run(["tar", "-cf", str(ova), "--transform", "s/.*vmdk$/disk.vmdk/", "-C", str(folder), ovf.name,
                    disk.name], check=True)
    made["OVA (the streamOptimized VMDK)"] = (ova, [])
    return made


def direct(path: Path, options: list[str], target: Path) -> tuple[float, float]:
    """Seconds of `qemu-img convert` (flushed), and of it followed by `qemu-img compare` of the
    copy with the file (what stork's import does: copy, then verify)."""
    target.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-t", "writeback", *options, "-O", "raw", str(path), str(target)],
                   check=True)
    converted = time.perf_counter() - start
    subprocess.run(["qemu-img", "compare", "-q", *options, "-F", "raw", str(path), str(target)], check=True)
    compared = time.perf_counter() - start
    target.unlink()
    return converted, compared


def via_stork(client, path: Path, vmid: int) -> float:  # type: ignore[no-untyped-def]
    options = {"ova": str(path)} if path.suffix == ".ova" else {"disks": {"scsi0": {"path": str(path)}}}
    start = time.perf_counter()
    job = client.run("import", vmid=vmid, **options, timeout=600)
    elapsed = time.perf_counter() - start
    assert job.state == "succeeded", job.error
    assert client.run("destroy", vmid=vmid).state == "succeeded"
    return elapsed


def main() -> None:
    with testing.bench_node('[storage.local]\ntype = "dir"\npath = "images"\n', concurrency=2) as (base, _):
        from producer.client import Client

        client = Client()
        images = source_images(base)
        target = base / "images" / "direct.raw"
        target.parent.mkdir(exist_ok=True)
        print(f"stork imports next to qemu-img convert: {os.cpu_count()} cores, a {SIZE_MIB} MiB disk of data, "
              f"best of {RUNS}, each after a sync")
        heads = f"{'convert':>9}{'convert + compare':>19}{'stork import':>14}{'vs convert + compare':>22}"
        print(f"   {'source':<34}{heads}")
        vmid = 1000
        for name, (path, options) in images.items():
            times, stork_times = [], []
            for _ in range(RUNS):
                os.sync()
                if path.suffix == ".ova":
                    times.append(direct(images["vmdk streamOptimized"][0], ["-f", "vmdk"], target))
                else:
                    times.append(direct(path, options, target))
                os.sync()
                vmid += 1
                stork_times.append(via_stork(client, path, vmid))
            best, verified, mine = min(t[0] for t in times), min(t[1] for t in times), min(stork_times)
            print(f"   {name:<34}{best:>8.2f}s{verified:>18.2f}s{mine:>13.2f}s{verified / mine:>21.2f}x")
        print("   (qemu-img of the OVA row: of the loose VMDK it holds; stork reads it from the archive in place)")

if __name__ == "__main__":
    main()
