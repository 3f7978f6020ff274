"""Guest-visible data of any volume, through `qemu-nbd` and a small NBD client.

A volume is not always a file (an RBD image, an LV), and a qcow2 file's bytes are not the
guest's data; qemu reads every kind the same way. So a backup reads, and a restore writes,
what drivers/backup/datapath.py cannot reach as plain files (raw, plain qcow2) through `qemu-nbd`
serving the volume's `qemu.Image` on a unix socket in a private temp directory (the image's
descriptors passed along, as qemu-img gets them). The client speaks
the fixed-newstyle handshake with NBD_OPT_GO and simple replies, nothing more
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md); requests are sent
one at a time, each at most 32 MiB, what qemu-nbd accepts.

Which areas hold data comes from `qemu-img map --output=json` of the same image: zero areas
and holes are never read, and `depth` tells a linked clone's own data (depth 0) from what it
reads through its base.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drivers import qemu
from drivers.errors import StorkError
from drivers.tools import Reader, ToolError, dying_with_caller, process_start, run, stop

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 30.0
IO_TIMEOUT = 300.0  # one request: a qemu-nbd that stops answering fails the step, not hangs it
MAX_REQUEST = 32 << 20
MAX_OPTION_REPLY = 64 << 10

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
REP_ERROR_BIT = 1 << 31


class NbdError(StorkError):
    """The NBD server answered something other than what was asked, or an error."""


@dataclass(frozen=True)
class Extent:
    start: int
    length: int
    data: bool  # holds data (not a hole, not known zeros)
    zero: bool  # reads as zeros
    depth: int  # 0: the image's own; 1: its backing image's; ...
    offset: int | None = None  # where a file at that depth holds it (uncompressed data, raw areas)


def extents(image: qemu.Image) -> list[Extent]:
    """The image's areas from `qemu-img map` (one call, the image's descriptors passed)."""
    out = run([qemu.QEMU_IMG, "map", "--output=json", image.spec], f"mapping {image.label}", image.all_fds)
    return _parse_map(out, f"mapping {image.label}")


def _parse_map(out: str, what: str) -> list[Extent]:
    try:
        return [Extent(int(e["start"]), int(e["length"]), bool(e["data"]), bool(e["zero"]), int(e.get("depth", 0)),
                       int(e["offset"]) if e.get("offset") is not None else None)
                for e in json.loads(out)]
    except (ValueError, KeyError, TypeError):
        raise NbdError(f"{what}: qemu-img map answered something unexpected") from None


class Client:
    """One NBD connection to an export: read, write, flush."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self.sock, self.label = sock, label
        sock.settimeout(IO_TIMEOUT)
        self.size, self.writable = self._handshake()
        self._cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise NbdError(f"{self.label}: the NBD server closed the connection")
            got += k
        return bytes(buf)

    def _handshake(self) -> tuple[int, bool]:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if (magic, opt) != (NBDMAGIC, IHAVEOPT) or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.label}: not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = b""  # qemu-nbd's default export
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
        size, tflags = -1, 0
        while True:
            magic, option, reply, length = struct.unpack(">QIII", self._recv(20))
            if magic != REPLY_MAGIC or option != OPT_GO or length > MAX_OPTION_REPLY:
                raise NbdError(f"{self.label}: the NBD server's answer to the export request is malformed")
            data = self._recv(length)
            if reply & REP_ERROR_BIT:
                raise NbdError(f"{self.label}: the NBD server refused the export ({reply:#x})")
            if reply == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, tflags = struct.unpack(">QH", data[2:12])
            elif reply == REP_ACK:
                break
        if size < 0:
            raise NbdError(f"{self.label}: the NBD server did not say the export's size")
        self._flushes = bool(tflags & 4)  # NBD_FLAG_SEND_FLUSH
        return size, not tflags & 2  # NBD_FLAG_READ_ONLY

    def _request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self._cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._cookie, offset, length) + data)
        magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or cookie != self._cookie:
            raise NbdError(f"{self.label}: the NBD server's reply is out of order")
        if error:
            raise NbdError(f"{self.label}: NBD request failed at offset {offset}: {os.strerror(error)}")
        return self._recv(length) if cmd == CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        parts = [self._request(CMD_READ, at, min(MAX_REQUEST, offset + length - at))
                 for at in range(offset, offset + length, MAX_REQUEST)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise NbdError(f"{self.label}: the export is read-only")
        for at in range(0, len(data), MAX_REQUEST):
            piece = data[at:at + MAX_REQUEST]
            self._request(CMD_WRITE, offset + at, len(piece), piece)

    def flush(self) -> None:
        if not self._flushes:
            raise NbdError(f"{self.label}: the NBD server cannot flush, so writes cannot be made durable")
        self._request(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()


@contextlib.contextmanager
def _qemu_nbd(image: qemu.Image, write: bool, *extra: str) -> Iterator[tuple[Path, subprocess.Popen[bytes], list[str]]]:
    """qemu-nbd serving `image` on a socket in a private temp directory, for one connection."""
    with tempfile.TemporaryDirectory(prefix=_folder_prefix()) as where:
        path = Path(where) / "sock"
        # writeback, not none (O_DIRECT): with none, qemu-nbd's start takes longer after its
        # socket exists, and a TERM from the parent-death signal in that window was lost (2 of
        # 40 tries here: it then served on, holding the volume open). The NBD flush, then the
        # driver's own fsync, make a restore durable. qemu-nbd exits when its one client goes;
        # should this process die before a client connects, the parent-death signal ends it
        # instead (it follows the starting thread: a step starts it from its own)
        argv = dying_with_caller([QEMU_NBD, "--socket", str(path), "--shared", "1", "--cache", "writeback",
                                  "--discard", "unmap", *([] if write else ["--read-only"]), *extra, image.spec],
                                 "TERM")  # TERM: qemu-nbd removes its socket
        with _running(argv, image.all_fds) as proc:
            yield path, proc, argv


@contextlib.contextmanager
def _running(argv: list[str], fds: tuple[int, ...]) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-nbd started with `argv`, stopped (and reaped) when done."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            pass_fds=fds)
    try:
        yield proc
    finally:
        stop(proc)
        assert proc.stderr is not None
        proc.stderr.close()


@contextlib.contextmanager
def read_as(image: qemu.Image, reader: Reader) -> Iterator[qemu.Image]:
    """`image` served read-only by a qemu-nbd run as `reader`, with that user's rights alone:
    the raw image it serves, which any number of qemu-img of this process then read (map, copy,
    compare) without opening a file the image's header names. An import's owner could rewrite
    that header after stork's checks; what it names is then read with the owner's rights.

    qemu-nbd makes its socket in a folder that is the reader's only until the socket is there;
    then it is this process's again, mode 0700, so nobody can change what is in it, and the
    socket found there must be qemu-nbd's own: a probe connection's peer is its very process
    (SO_PEERCRED), not a socket the reader bound and renamed into place. The reader is given no
    descriptor but the image's, which are its own files (reader_for); qemu-img reaches the
    socket through the opened folder (`/proc/self/fd/N`), so a folder renamed meanwhile
    changes nothing."""
    where = Path(tempfile.mkdtemp(prefix=_folder_prefix()))
    folder = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(folder, reader.uid, reader.gid)
        argv = dying_with_caller([QEMU_NBD, "--socket", str(where / "sock"), "--persistent", "--shared", "0",
                                  "--read-only", image.spec], "TERM", reader)
        with _running(argv, image.all_fds) as proc:
            path = Path(f"/proc/self/fd/{folder}/sock")
            _wait_listening(path, proc, image.label, argv)
            _take_back(folder)
            _require_served_by(path, proc, reader, image.label, argv)
            yield qemu.Image("raw", {"driver": "nbd", "server": {"type": "unix", "path": str(path)}}, image.label,
                             (folder,))
    finally:
        with contextlib.suppress(OSError):
            _take_back(folder)
        os.close(folder)
        with contextlib.suppress(OSError):
            _remove_private_folder(str(where.parent), where.name)


def _take_back(folder: int) -> None:
    os.fchown(folder, os.geteuid(), os.getegid())
    os.fchmod(folder, 0o700)


def _require_served_by(path: Path, proc: subprocess.Popen[bytes], reader: Reader, label: str,
                       argv: list[str]) -> None:
    """The socket at `path` (in a folder nobody else can change now) is `proc`'s, run as `reader`."""
    with _connect(path, proc, label, argv) as probe:
        pid, uid, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                           struct.calcsize("3i")))
    if (pid, uid) != (proc.pid, reader.uid):  # setpriv execs qemu-nbd: the same pid
        raise NbdError(f"serving {label}: the socket is not qemu-nbd's (its peer is pid {pid}, uid {uid})")


_FOLDER = "stork-nbd-"  # then the pid and start time of the process that serves from it
_FOLDER_NAME = re.compile(_FOLDER + r"(\d+)-(\d+)-[A-Za-z0-9_]+\Z")


def _folder_prefix() -> str:
    pid = os.getpid()
    return f"{_FOLDER}{pid}-{process_start(pid)}-"


def remove_stale_folders(where: str | None = None) -> int:
    """Remove this user's qemu-nbd socket folders (in the temp folder) whose process is gone:
    a step killed while it served never ran its cleanup. One whose process lives (the same pid
    and start time) is left, and so is anything not a private folder of this user's, never
    followed. How many were removed; a folder that cannot be removed now is tried next time."""
    where = where or tempfile.gettempdir()
    removed = 0
    for name in os.listdir(where):
        found = _FOLDER_NAME.match(name)
        if found and process_start(found[1]) != found[2]:
            with contextlib.suppress(OSError):
                removed += _remove_private_folder(where, name)
    return removed


def _remove_private_folder(parent: str, name: str) -> int:
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                return 0  # not what TemporaryDirectory made for this user
            for entry in os.listdir(fd):
                os.unlink(entry, dir_fd=fd)  # the socket; never a folder's contents elsewhere
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)
        return 1
    finally:
        os.close(parent_fd)


def dirty_extents(image: qemu.Image, bitmap: str) -> list[Extent]:
    """The image's areas as its persistent dirty bitmap `bitmap` sees them: `data` is False
    where the area was written since the bitmap was added (qemu reports dirty areas so when a
    bitmap stands in for block status), True where it was not."""
    with _qemu_nbd(image, False, "--bitmap", bitmap) as (path, proc, argv):
        _wait_listening(path, proc, image.label, argv)  # qemu-img map is its one connection
        spec = f"driver=nbd,server.type=unix,server.path={path},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
        out = run([qemu.QEMU_IMG, "map", "--output=json", "--image-opts", spec], f"mapping {image.label}'s changes")
    return _parse_map(out, f"mapping {image.label}'s changes")


@contextlib.contextmanager
def served(image: qemu.Image, write: bool = False) -> Iterator[Client]:
    """`image` served by a qemu-nbd of its own, and a client connected to it. On a clean exit
    from a writable export, what was written is flushed before qemu-nbd stops. qemu-nbd serves
    one connection and exits when it closes, also when the process holding it dies, so no
    server outlives its step holding the volume open."""
    with _qemu_nbd(image, write) as (path, proc, argv):
        client = Client(_connect(path, proc, image.label, argv), image.label)
        try:
            yield client
            if write:
                client.flush()
        finally:
            client.close()


def _wait_listening(path: Path, proc: subprocess.Popen[bytes], label: str, argv: list[str]) -> None:
    """Until qemu-nbd's socket exists (without connecting: it serves one connection)."""
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        _still_starting(proc, label, argv, deadline)


def _still_starting(proc: subprocess.Popen[bytes], label: str, argv: list[str], deadline: float) -> None:
    """Wait a moment for qemu-nbd; its own words if it exited, a timeout past the deadline."""
    if proc.poll() is not None:
        assert proc.stderr is not None
        said = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise ToolError(f"serving {label}", argv, proc.returncode, said)
    if time.monotonic() > deadline:
        raise ToolError(f"serving {label}", argv, -1, f"qemu-nbd did not listen within {START_TIMEOUT:g} s")
    time.sleep(0.02)


def _connect(path: Path, proc: subprocess.Popen[bytes], label: str, argv: list[str]) -> socket.socket:
    """A connection to qemu-nbd's socket, once it listens; its own words if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
        _still_starting(proc, label, argv, deadline)
