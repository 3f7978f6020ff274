"""A volume from one node to another: the source node's `qemu-nbd` exports it read-only over
TCP, authenticated and encrypted with TLS (a pre-shared key, the cluster key), and the
target node's `qemu-img` reads it from there as it reads any image. No data protocol of
stork's own, no ssh.

An export serves one client at a time and stays up until stopped (`--persistent`: the
target reads it twice when it verifies the copy). Its process dies with the process that
started it (parent-death signal), so a worker that dies takes its exports along; `stop` ends
one from any process of the node, acting only on the very process that was started (its pid
opened as a pidfd, then its start time and export name checked), never on a reused pid.

The key file holds one line `stork:<hex key>` (qemu's `keys.psk` format, identity `stork`);
qemu reads it as `keys.psk` in a directory, so each process links it into a private one.
The key never travels: not in a job, not on a command line, not in a log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drivers import qemu
from drivers.errors import Refused
from drivers.nbd import QEMU_NBD
from drivers.tools import ToolError, dying_with_caller, process_start

IDENTITY = "stork"
KEY_LINE = re.compile(rf"{IDENTITY}:[0-9a-fA-F]{{32,256}}\n?")
START_TIMEOUT = 30.0
STOP_WAIT = 10.0  # seconds an export gets to end on SIGTERM, then on SIGKILL
PORT_TRIES = 5  # a port picked free may be taken before qemu-nbd binds it: pick another
CREDS = "stork-tls"  # the id of the TLS credentials object on qemu's command lines
# AEAD suites with hardware or fast software paths, TLS 1.2 or 1.3: GnuTLS's default for a PSK
# session copied 1 GiB over loopback in 5.7 s, this in 1.6-2.3 s (no TLS: 0.9 s; bench/nodes.py)
PRIORITY = "NORMAL:-CIPHER-ALL:+AES-128-GCM:+CHACHA20-POLY1305"
NO_KEY = ("copying between nodes needs the cluster key: set [cluster] tls_psk_file "
          "('stork cluster key FILE' makes one)")


@dataclass(frozen=True)
class Export:
    """A running export, as the job records it (no secret in it: the key authenticates)."""

    host: str
    port: int
    name: str  # random: names the export on the server and finds its process again
    pid: int
    started: str  # the process's start time (clock ticks since boot): tells it from a reused pid
    size: int  # the volume's virtual size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Export:
        return cls(str(data["host"]), int(data["port"]), str(data["name"]), int(data["pid"]), str(data["started"]),
                   int(data["size"]))


def make_key(path: Path) -> None:
    """Write a new cluster key to `path` (which must not exist), readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{IDENTITY}:{secrets.token_hex(32)}\n")
        f.flush()
        os.fsync(f.fileno())


def check_key(path: Path) -> None:
    """Refuse a key file that is missing, not a regular file, readable by others than its
    owner, in a folder others may replace it in, or not one `stork:<hex>` line: a transfer
    never starts on a key it cannot trust. (qemu reads the key by its name later: the folder
    rule keeps what it reads the file checked here.)"""
    try:
        folder = os.stat(path.parent)
    except OSError as e:
        raise Refused(f"cluster key {path}: cannot be read: {e.strerror}") from None
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        raise Refused(f"cluster key {path}: its folder is writable by others than its owner, who could replace it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"cluster key {path}: cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"cluster key {path}: not a regular file")
        if st.st_mode & 0o077:
            raise Refused(f"cluster key {path}: readable by others than its owner (chmod 600 it)")
        text = os.read(fd, 1024).decode("ascii", "replace")
    finally:
        os.close(fd)
    if not KEY_LINE.fullmatch(text):
        raise Refused(f"cluster key {path}: expected one line {IDENTITY}:<hex digits> ('stork cluster key' makes one)")


@functools.cache
def _key_dir(key: Path) -> str:
    """A private directory holding `keys.psk`, a link to the key (the link only points: the
    key stays where it is), which qemu reads the key through. One per user and key, made once
    and used again by every process: a Celery pool process ends with os._exit and a killed one
    with nothing, so a directory per process (removed at exit) was left behind by nearly all.
    One that is not this user's own private directory is refused, never used."""
    digest = hashlib.sha256(str(key).encode()).hexdigest()[:16]
    where = Path(tempfile.gettempdir()) / f"stork-psk-{os.getuid()}-{digest}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(where, 0o700)
    st = os.lstat(where)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise Refused(f"{where}: not a private directory of this user: not used for the cluster key")
    link = where / "keys.psk"
    try:
        if os.readlink(link) == str(key):
            return str(where)
    except OSError:
        pass  # none yet (or not a link): made below
    temp = where / f".keys.psk.{secrets.token_hex(8)}"
    os.symlink(key, temp)
    os.replace(temp, link)  # whole, for a process reading it meanwhile
    return str(where)


def _creds(key: Path, endpoint: str) -> str:
    check_key(key)
    user = f",username={IDENTITY}" if endpoint == "client" else ""
    return f"tls-creds-psk,id={CREDS},endpoint={endpoint},dir={_key_dir(key)}{user},priority={PRIORITY}"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:  # the config names an address this machine does not have
            raise Refused(f"cannot serve on {host}, this node's [nodes.<name>] address: {e.strerror}") from None
        return int(s.getsockname()[1])


def start(image: qemu.Image, size: int, host: str, key: Path) -> Export:
    """Export `image` read-only on `host` (a free port), for clients holding the key."""
    _reap()
    name = secrets.token_hex(16)
    creds = _creds(key, "server")
    for _ in range(PORT_TRIES):
        port = _free_port(host)
        try:
            return _start(image, size, host, port, name, creds)
        except ToolError as e:
            if "in use" not in e.stderr:
                raise
    raise ToolError(f"exporting {image.label}", [QEMU_NBD], -1, f"no free port on {host} after {PORT_TRIES} tries")


def _start(image: qemu.Image, size: int, host: str, port: int, name: str, creds: str) -> Export:
    with tempfile.TemporaryDirectory(prefix="stork-export-") as where:
        pid_file, errors = Path(where) / "pid", Path(where) / "stderr"
        argv = [QEMU_NBD, "--read-only", "--persistent", "--shared", "1", "--bind", host, "--port", str(port),
                "--export-name", name, "--object", creds, "--tls-creds", CREDS, "--pid-file", str(pid_file),
                "--", image.spec]
        with open(errors, "wb") as err:
            # TERM: the export ends with the process that started it (the step's worker process)
            proc = subprocess.Popen(dying_with_caller(argv, "TERM"), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, pass_fds=image.all_fds)
        deadline = time.monotonic() + START_TIMEOUT
        while not pid_file.exists():  # written once the export listens
            if proc.poll() is not None:
                said = (errors.read_text(errors="replace").strip().splitlines() or ["no message"])[-1]
                raise ToolError(f"exporting {image.label}", argv, proc.returncode, said)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise ToolError(f"exporting {image.label}", argv, -1, f"qemu-nbd did not listen in {START_TIMEOUT:g} s")
            time.sleep(0.01)
    started = process_start(proc.pid)
    if started is None:
        raise ToolError(f"exporting {image.label}", argv, -1, "qemu-nbd ended as it started")
    _children[name] = proc  # reaped when stopped from this process
    return Export(host, port, name, proc.pid, started, size)


_children: dict[str, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    """Collect this process's exports that ended (stopped from another process of the node)."""
    for name, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[name]


def running(export: Export) -> bool:
    """Is the export's own process still running (not a process that got its pid since)?"""
    return process_start(export.pid) == export.started and _is_export(export)


def _is_export(export: Export) -> bool:
    try:
        argv = Path(f"/proc/{export.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    named = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == b"--export-name"]
    return bool(argv) and Path(argv[0].decode(errors="replace")).name == QEMU_NBD and named == [export.name.encode()]


def stop(export: Export) -> None:
    """End the export if it still runs; idempotent, from any process of its node."""
    proc = _children.pop(export.name, None)
    try:
        pidfd = os.pidfd_open(export.pid)
    except ProcessLookupError:
        pidfd = None
    if pidfd is not None:
        try:
            if running(export):  # checked after opening: the pidfd is the process checked, or a dead one
                for sig in (signal.SIGTERM, signal.SIGKILL):  # KILL: one that does not end on TERM
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, sig)
                    if _gone(export):
                        break
                else:
                    raise ToolError(f"stopping export {export.name}", [QEMU_NBD], -1,
                                    f"qemu-nbd (pid {export.pid}) did not end on SIGKILL")
        finally:
            os.close(pidfd)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _gone(export: Export) -> bool:
    deadline = time.monotonic() + STOP_WAIT
    while running(export):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def source(export: Export, key: Path, label: str) -> qemu.Image:
    """The export as qemu-img reads it: raw guest data over NBD, with TLS."""
    server = {"type": "inet", "host": export.host, "port": str(export.port)}
    return qemu.Image("raw", {"driver": "nbd", "server": server, "export": export.name, "tls-creds": CREDS},
                      label, objects=(_creds(key, "client"),))
