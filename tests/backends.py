"""Real filesystems on loop devices for the storage tests. Each is made when this machine can
(root, the mkfs tool, the kernel's filesystem); otherwise the reason why is kept, and the tests
that need it skip with it. The session detaches what it made at its end, also when tests fail."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoopFs:
    kind: str
    image: Path
    device: str
    mount: Path

    def close(self) -> None:
        """Unmount, detach and delete, each step attempted even if one before it failed."""
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["umount", str(self.mount)])
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["losetup", "-d", self.device])
        self.image.unlink(missing_ok=True)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def unavailable(kind: str) -> str:
    """Why a `kind` filesystem cannot be made here ("" if it can)."""
    if os.geteuid() != 0:
        return "needs root (loop devices and mount)"
    if not shutil.which(f"mkfs.{kind}"):
        return f"mkfs.{kind} is not installed (.ci/run installs it)"
    if not shutil.which("losetup"):
        return "losetup is not installed"
    with open("/proc/filesystems") as f:
        if kind not in f.read().split():
            return f"this kernel has no {kind} filesystem"
    return ""


def make(kind: str, where: Path, size_mib: int = 1024) -> LoopFs | str:
    """A fresh `kind` filesystem on a sparse file in `where`, mounted at `where/<kind>`;
    or why none could be made."""
    if why := unavailable(kind):
        return why
    image, mount = where / f"{kind}.img", where / kind
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    mount.mkdir()
    try:
        device = _run(["losetup", "-f", "--show", str(image)]).strip()
    except subprocess.CalledProcessError as e:
        image.unlink()
        return f"no loop device: {e.stderr.strip()}"
    fs = LoopFs(kind, image, device, mount)
    try:
        _run([f"mkfs.{kind}", "-q", *(["-m", "reflink=1"] if kind == "xfs" else []), device])
        _run(["mount", device, str(mount)])
    except subprocess.CalledProcessError as e:
        fs.close()
        return f"cannot make a {kind} filesystem: {e.stderr.strip()}"
    return fs
