"""qemu-img, always as an argv list, plus a direct reader for the qcow2 header.

Reading the header in Python (magic, backing file, virtual size) lets a storage list its
volumes and find a base's clones without starting one qemu-img per file.
"""

from __future__ import annotations

import json
import os
import re
import select
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drivers.errors import InvalidName, ToolFailed

QEMU_IMG = "qemu-img"
QCOW2_MAGIC = b"QFI\xfb"
_PROGRESS = re.compile(rb"\(\s*([0-9.]+)/100%\)")

# progress(bytes_done, bytes_total); may raise (e.g. JobCancelled) to stop the copy.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int
    backing_file: str | None


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """Return the qcow2 header of `path`, or None if the file is not qcow2."""
    with open(path, "rb") as f:
        head = f.read(32)
        if len(head) < 32 or head[:4] != QCOW2_MAGIC:
            return None
        backing_offset, backing_size = struct.unpack(">QI", head[8:20])
        virtual_size = struct.unpack(">Q", head[24:32])[0]
        backing = None
        if backing_offset and backing_size:
            f.seek(backing_offset)
            backing = f.read(backing_size).decode("utf-8", "replace")
        return Qcow2Header(virtual_size, backing)


def run(argv: list[str], what: str) -> str:
    """Run a tool; a non-zero exit becomes ToolFailed with its last stderr line."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ToolFailed(f"{what} failed: {last}")
    return proc.stdout


def info(path: Path) -> dict:
    """`qemu-img info` as a dict; ToolFailed when qemu-img cannot read the file."""
    out = run([QEMU_IMG, "info", "--output=json", "--", str(path)], f"reading {path.name}")
    return json.loads(out)


def detect_image(path: Path) -> tuple[str, int]:
    """Return (format, virtual size) of a file that must be a raw or qcow2 disk image.

    A raw image has no header, so qemu-img calls any file raw; a raw image must at least
    be non-empty and a whole number of 512-byte sectors.
    """
    if not path.is_file():
        raise InvalidName(f"{path}: not a regular file")
    data = info(path)
    fmt, vsize = data.get("format"), int(data.get("virtual-size", 0))
    if fmt == "raw":
        vsize = path.stat().st_size  # qemu-img rounds a raw file's size up to a sector
    if fmt == "raw" and (vsize == 0 or vsize % 512):
        raise InvalidName(f"{path}: not a disk image (size {vsize} is not a multiple of 512 bytes)")
    if fmt not in ("raw", "qcow2"):
        raise InvalidName(f"{path}: unsupported image format {fmt!r} (expected raw or qcow2)")
    # An image that reads another file would let its author copy that file (any the worker
    # can read) into a guest disk.
    if data.get("backing-filename") or data.get("format-specific", {}).get("data", {}).get("data-file"):
        raise InvalidName(f"{path}: images with a backing or data file cannot be imported")
    return fmt, vsize


def create(path: Path, fmt: str, size: int, backing: str | None = None, backing_fmt: str = "") -> None:
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        argv += ["-o", "lazy_refcounts=on"]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    argv += ["--", str(path)]
    if not backing:
        argv.append(str(size))
    run(argv, f"creating {path.name}")


def resize(path: Path, fmt: str, size: int) -> None:
    run([QEMU_IMG, "resize", "-q", "-f", fmt, "--", str(path), str(size)], f"resizing {path.name}")


def check(path: Path, fmt: str) -> None:
    if fmt == "qcow2":
        run([QEMU_IMG, "check", "-q", "-f", fmt, "--", str(path)], f"checking {path.name}")


def compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> None:
    """Raise ToolFailed unless the two images hold the same guest-visible data."""
    run(
        [QEMU_IMG, "compare", "-q", "-f", a_fmt, "-F", b_fmt, "--", str(a), str(b)],
        f"comparing {a.name} with {b.name}",
    )


def convert(
    src: Path,
    src_fmt: str,
    dst: Path,
    dst_fmt: str,
    size: int,
    progress: Progress | None = None,
    interval: float = 0.25,
) -> None:
    """Copy src into the existing, zero-filled dst with `qemu-img convert -p -n`.

    Zero areas are skipped (--target-is-zero), so a sparse target stays sparse. Progress
    lines are parsed into progress(done, total) at most every `interval` seconds; if the
    callback raises, qemu-img is stopped and the exception propagates.
    """
    argv = [
        QEMU_IMG, "convert", "-p", "-n", "--target-is-zero", "-W",
        "-f", src_fmt, "-O", dst_fmt, "--", str(src), str(dst),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    last_report, done = 0.0, 0
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], interval)
            chunk = proc.stdout.read() if ready else b""
            if ready and not chunk:
                break  # EOF: qemu-img closed stdout
            if matches := _PROGRESS.findall(chunk or b""):
                done = min(int(float(matches[-1]) / 100 * size), size)
            now = time.monotonic()
            if progress and now - last_report >= interval:
                progress(done, size)
                last_report = now
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        last = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise ToolFailed(f"copying {src.name} to {dst.name} failed: {last}")
    if progress:
        progress(size, size)
