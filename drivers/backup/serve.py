"""One backed-up disk served read-only over NBD, straight from the chunk store, so files come out
of a backup without restoring the disk (`stork backup serve`): mount it with `nbdfuse` and a
loop device, or open it with `guestfish --ro`, `qemu-img` or `qemu-nbd --connect`.

A small server of the NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/
proto.md), as drivers/nbd.py is a small client: the fixed-newstyle handshake with
NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_LIST and NBD_OPT_ABORT (any other option
is answered unsupported, so a client falls back to simple replies), then simple replies to
reads; a write, trim or write-zeroes is refused (EPERM), the export being read-only. A chunk
that cannot be read (damaged, missing) fails that read with EIO, and the client reads on.
Each client has a thread of its own.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable

import structlog

from drivers.backup.datapath import DiskReader
from drivers.errors import StorkError
from drivers.nbd import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_GO,
    REP_ACK,
    REP_ERROR_BIT,
    REP_INFO,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
)

log = structlog.get_logger("stork.serve")
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO = 1, 2, 3, 6
REP_SERVER = 2
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = REP_ERROR_BIT | 1, REP_ERROR_BIT | 3, REP_ERROR_BIT | 6
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_CAN_MULTI_CONN = 1, 2, 256
MAX_OPTION = 4096
MAX_READ = 32 << 20  # what one read (or refused write) may carry, as qemu-nbd allows
MAX_CLIENTS = 16  # more at once are turned away: each holds a thread and a descriptor
IDLE = 600.0  # seconds a client may stay silent before its connection ends


class _Closed(Exception):
    """The client went away, or broke the protocol: its connection ends."""


class Export:
    """A disk under a name, served to each client that connects to `listener` until `stop`."""

    def __init__(self, name: str, reader: DiskReader, listener: socket.socket) -> None:
        self.name, self.reader, self.listener = name, reader, listener
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def serve(self, accepted: Callable[[str], None] | None = None) -> None:
        """Accept clients until `stop` (each in a thread of its own); `accepted` hears each peer."""
        while not self._stopping.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            if not self._slots.acquire(blocking=False):
                conn.close()  # too many at once: this one is turned away
                continue
            if accepted:
                accepted(str(peer))
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    # ---- one client ---------------------------------------------------------------------------
    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE)
        with conn, contextlib.ExitStack() as stack:
            stack.callback(self._slots.release)
            try:
                if self._handshake(conn) is not None:
                    self._transmit(conn)
            except (_Closed, OSError) as e:
                log.info("nbd_client_gone", reason=str(e) or type(e).__name__)

    def _handshake(self, conn: socket.socket) -> int | None:
        """Option haggling; the client's flags once it asked for the export, None if it aborted."""
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv(conn, 4))
        while True:
            magic, option, length = struct.unpack(">QII", _recv(conn, 16))
            if magic != IHAVEOPT or length > MAX_OPTION:
                raise _Closed("a malformed option")
            data = _recv(conn, length)
            if option == OPT_EXPORT_NAME:
                if data.decode(errors="replace") != self.name:
                    raise _Closed(f"no export {data!r}")
                conn.sendall(struct.pack(">QH", self.reader.size, self._flags()) +
                             (b"" if client_flags & FLAG_NO_ZEROES else bytes(124)))
                return client_flags
            if option in (OPT_GO, OPT_INFO):
                if self._info(conn, option, data) and option == OPT_GO:
                    return client_flags
            elif option == OPT_LIST:
                name = self.name.encode()
                _reply(conn, option, REP_SERVER, struct.pack(">I", len(name)) + name)
                _reply(conn, option, REP_ACK)
            elif option == OPT_ABORT:
                with contextlib.suppress(OSError):
                    _reply(conn, option, REP_ACK)
                return None
            else:
                _reply(conn, option, REP_ERR_UNSUP)

    def _info(self, conn: socket.socket, option: int, data: bytes) -> bool:
        """Answer NBD_OPT_INFO or NBD_OPT_GO; whether the export named is this one."""
        if len(data) < 6:
            _reply(conn, option, REP_ERR_INVALID)
            return False
        (size,) = struct.unpack(">I", data[:4])
        if 4 + size + 2 > len(data):
            _reply(conn, option, REP_ERR_INVALID)
            return False
        name = data[4:4 + size].decode(errors="replace")
        if name not in (self.name, ""):  # "" is the default export
            _reply(conn, option, REP_ERR_UNKNOWN)
            return False
        _reply(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.reader.size, self._flags()))
        _reply(conn, option, REP_ACK)
        return True

    @staticmethod
    def _flags() -> int:
        return FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN

    def _transmit(self, conn: socket.socket) -> None:
        while True:
            magic, _flags, kind, handle, offset, length = struct.unpack(">IHHQQI", _recv(conn, 28))
            if magic != REQUEST_MAGIC:
                raise _Closed("a malformed request")
            if kind == CMD_DISC:
                return
            if kind == CMD_READ:
                self._read(conn, handle, offset, length)
            elif kind == CMD_FLUSH:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle))
            else:  # a write carries its data: read it off the wire before refusing
                if kind == CMD_WRITE:
                    if length > MAX_READ:
                        raise _Closed("a write larger than any request may be")
                    _recv(conn, length)
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EPERM, handle))

    def _read(self, conn: socket.socket, handle: int, offset: int, length: int) -> None:
        if length > MAX_READ or offset + length > self.reader.size:
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EINVAL, handle))
            return
        try:
            data = self.reader.read(offset, length)
        except StorkError as e:  # a damaged or missing chunk: this read fails, the next may not
            log.warning("nbd_read_failed", offset=offset, length=length, error=str(e))
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EIO, handle))
            return
        conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle) + data)


def _reply(conn: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
    conn.sendall(struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data)


def _recv(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise _Closed("the client closed the connection")
        out += got
    return bytes(out)


def listen(address: str, port: int) -> socket.socket:
    """A listening socket on address:port (port 0: any free one); one line where it cannot be had."""
    try:
        return socket.create_server((address, port), reuse_port=False)
    except OSError as e:
        raise StorkError(f"cannot serve on {address}:{port}: {e.strerror or e}") from None
