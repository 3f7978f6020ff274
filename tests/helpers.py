"""Small helpers for the end-to-end tests: images, checks, snapshots of what is on disk."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers import qemu, tools
from drivers.backends.base import Driver
from drivers.names import VolName
from tests.conftest import BASE, files_under, storage_path
from worker.testing import ROOT, wait_for

PATTERN_MIB = 1 << 20


def qemu_io_write(path: Path, fmt: str, offset: int, length: int, pattern: int) -> None:
    """Write through qemu (so qcow2 overlays get real guest writes)."""
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path)],
                   check=True, capture_output=True)


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache now (mincore(2) of a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, page = path.stat().st_size, mmap.PAGESIZE
    vector = (ctypes.c_ubyte * ((size + page - 1) // page))()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            failed = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vector)
            assert failed == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(b & 1 for b in vector)


def qemu_check(path: Path) -> None:
    if path.suffix == ".qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)


def qemu_same(a: Path, b: Path) -> bool:
    fmt = lambda p: "qcow2" if p.suffix == ".qcow2" else "raw"  # noqa: E731
    proc = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt(a), "-F", fmt(b), str(a), str(b)], check=False)
    return proc.returncode == 0


def guest_data_sha(path: Path) -> str:
    """SHA-256 of the guest-visible bytes (converted to raw), whatever the format."""
    fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(flat)], check=True)
        digest = hashlib.sha256()
        with open(flat, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
        return digest.hexdigest()


def volume_path(volid: str) -> Path:
    from tests.conftest import storage_path

    storage, volname = volid.split(":", 1)
    return storage_path(storage) / volname


def snapshot() -> dict[str, object]:
    """Everything a refused command must leave alone: files on storages and guest configs."""
    guests = BASE / "guests"
    return {
        "files": files_under(BASE / "images") + files_under(BASE / "node1") + files_under(BASE / "node2")
        + files_under(BASE / "shared"),
        "guests": {p.name: p.read_text() for p in sorted(guests.glob("*.toml"))} if guests.exists() else {},
    }


def fill(drv: Driver, vol: VolName, offset: int, data: bytes) -> None:
    """Write guest data into a volume through the driver's own image: the whole image read
    out, changed and written back by qemu-img (any volume, a file or not)."""
    size = drv.virtual_size(vol)
    with tempfile.TemporaryFile() as flat:
        flat.truncate(size)
        with drv.image(vol) as image:
            qemu.convert(image, qemu.Image.of_fd("raw", flat.fileno(), "flat"), size)
        os.pwrite(flat.fileno(), data, offset)
        with drv.image(vol, write=True) as image:
            qemu.convert(qemu.Image.of_fd("raw", flat.fileno(), "flat"), image, size, target_is_zero=False)


def read(drv: Driver, vol: VolName, offset: int, length: int) -> bytes:
    """Guest data as qemu-img reads it through the driver's image (a clone through its base)."""
    with tempfile.TemporaryFile() as flat, drv.image(vol) as image:
        size = drv.virtual_size(vol)
        flat.truncate(size)
        qemu.convert(image, qemu.Image.of_fd("raw", flat.fileno(), "flat"), size)
        return os.pread(flat.fileno(), length, offset)


def crash(client, armed: Path, point: str, kind: str, **options):
    armed.write_text(point)
    job = client.run(kind, timeout=120, **options)
    assert armed.read_text() == "", f"fault point {point} was not reached"
    assert job.state == "succeeded", job.error
    assert 2 in job.attempts.values()  # the step was run again after its process died
    return job


def orphans(client, storage: str) -> list[str]:
    """Files on a storage that no guest and no job result names (temp files included)."""
    named = {v for g in client.guests() for v in (*g.disks.values(), *g.unused)}
    for job in client.jobs(500):
        named |= {v for v in json.dumps(job.result).split('"') if v.startswith(f"{storage}:")}
    return [f for f in files_under(storage_path(storage)) if not f.startswith(".overlays/")
            and f"{storage}:{f}" not in named]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (a storage that runs out of space), unmounted after;
    the test skips where none can be mounted."""
    path.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def qemu_img_of(pid: int, command: str = "convert") -> int | None:
    """The `qemu-img <command>` process that process `pid` (a pool process running a step) runs,
    if any (a copy maps its source first: that one is not the copy)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (entry.name.isdigit() and (entry / "comm").read_text().strip() == "qemu-img"
                    and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid
                    and (entry / "cmdline").read_bytes().split(b"\0")[1] == command.encode()):
                return int(entry.name)
    return None


def _progress_seen(client, job_id: str) -> bool:
    from worker.records import events_key

    events = [json.loads(fields["event"]) for _, fields in client.r.xrange(events_key(job_id))]
    return any(e.get("phase") == "progress" and e.get("done", 0) > 0 for e in events)


@contextlib.contextmanager
def held_copy(client, job_id: str, timeout: float = 60.0) -> Iterator[int]:
    """Hold a job's copy mid-way, whatever the machine's speed: its qemu-img is stopped
    (SIGSTOP) the moment it appears, then let run in short slices until the job has sent a
    progress event with bytes done; yields the stopped qemu-img's pid and lets it go after
    (SIGCONT, if it still lives: the caller may have killed it)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    qemu = None
    while qemu is None:
        assert time.monotonic() < deadline, f"job {job_id}: no copy's qemu-img appeared"
        worker = (client.job(job_id).current or {}).get("worker", "")  # host:pid:...
        qemu = qemu_img_of(int(worker.split(":")[1])) if worker else None
        if qemu is None:
            time.sleep(0.001)
    os.kill(qemu, signal.SIGSTOP)
    try:
        while not _progress_seen(client, job_id):
            assert time.monotonic() < deadline, f"job {job_id}: no progress event while its copy ran"
            time.sleep(0.6)  # past the step's progress interval: the next line qemu-img prints goes out
            os.kill(qemu, signal.SIGCONT)
            time.sleep(0.02)
            os.kill(qemu, signal.SIGSTOP)
        yield qemu
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu, signal.SIGCONT)


def exports_running() -> list[str]:
    """qemu-nbd processes serving over TCP (the unix-socket ones of backups are not exports)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-nbd") and b"--tls-creds" in argv:
            found.append(pid)
    return found


# ---- a real Flower ---------------------------------------------------------------------

FLOWER_LOGIN = ("admin", "s3cret")  # the basic_auth the tests give Flower
CHROMIUM = shutil.which("chromium")


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, auth: tuple[str, str] | None = FLOWER_LOGIN) -> tuple[int, str]:
        headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def tasks(self, job_id: str) -> dict[str, dict[str, Any]]:
        """The job's tasks as Flower's API lists them (each task's kwargs name its job)."""
        status, body = self.get("/api/tasks")
        assert status == 200, body
        return {uuid: t for uuid, t in json.loads(body).items() if job_id in (t.get("kwargs") or "")}

    def task(self, job_id: str, name: str, state: str | None = None) -> dict[str, Any] | None:
        return next((t for t in self.tasks(job_id).values()
                     if t["name"] == name and (state is None or t["state"] == state)), None)

    def render(self, path: str) -> str:
        """The page as headless Chromium renders it (the task list fills in by script)."""
        assert CHROMIUM
        url = self.url.replace("://", "://{}:{}@".format(*FLOWER_LOGIN)) + path
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout



@contextlib.contextmanager
def running_flower(port: int, env: dict[str, str], log: Path) -> Iterator[Flower]:
    """`python -m worker.run.flower` (it execs Flower: one PID) with the config in `env`, which
    names `port`; stopped after."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.run.flower"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    f = Flower(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_for(lambda: _answers(f) or proc.poll() is not None, 30, "Flower")
        assert proc.poll() is None, log.read_text()
        yield f
    finally:
        tools.stop(proc)


def _answers(f: Flower) -> bool:
    try:
        return f.get("/healthcheck")[0] == 200
    except OSError:
        return False

