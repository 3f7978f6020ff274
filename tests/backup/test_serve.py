"""`stork backup serve` (drivers/backup/serve.py) as a real process: a backed-up disk served
read-only over NBD straight from the chunk store, read by the real qemu-img and qemu-io: equal
to the disk it was read from (a linked clone's too, patches laid over its base's chunks), never
written, a damaged chunk failing only the reads that need it, and stopped by SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.backup.test_backups import STORE, backed_up, guest_with_data
from tests.helpers import PATTERN_MIB, qemu_io_write, volume_path
from worker.testing import ROOT


@contextmanager
def served(backup: str, disk: str = "scsi0") -> Iterator[str]:
    """The CLI serving the disk on a free port: its nbd:// URL, until SIGTERM after the block."""
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "backup", "serve", backup, disk, "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("nbd://127.0.0.1:") and url.endswith(f"/{disk}"), proc.stderr.read()
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()


def qemu_io(url: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", command, url], capture_output=True, text=True,
                          check=False, timeout=60)


def test_a_served_disk_reads_as_the_disk_it_was_read_from(stork, client, vmid):
    g = vmid()
    disk = guest_with_data(stork, g, "qcow2")
    backup = backed_up(stork, g)["backup"]
    with served(backup) as url:
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", url, str(volume_path(disk))],
                              capture_output=True, text=True, check=False)
        assert same.returncode == 0, same.stdout + same.stderr
        written = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", url], capture_output=True,
                                 text=True, check=False)
        assert written.returncode == 1 and "Permission denied" in written.stderr  # a read-only export


def test_a_linked_clones_served_disk_lays_its_own_data_over_its_bases(stork, client, vmid):
    t, c = vmid(), vmid()
    guest_with_data(stork, t)
    assert stork("template", t)[0] == 0
    backed_up(stork, t)
    assert stork("clone", t, c)[0] == 0
    clone = client.guest(c).disks["scsi0"]
    qemu_io_write(volume_path(clone), "qcow2", 5 * PATTERN_MIB + 4096, 8192, 0x6c)  # a patch over the base's chunk
    backup = backed_up(stork, c)["backup"]
    with served(backup) as url:
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", url, str(volume_path(clone))],
                              capture_output=True, text=True, check=False)
        assert same.returncode == 0, same.stdout + same.stderr


def test_a_damaged_chunk_fails_only_the_reads_that_need_it(stork, vmid):
    g = vmid()
    guest_with_data(stork, g)  # data in its second and sixth MiB: both in the first 4 MiB chunk and the second
    backup = backed_up(stork, g)["backup"]
    first = json.loads((STORE / backup / "scsi0.index.json").read_bytes())["chunks"][0]
    chunk = STORE / ".chunks" / first[:4] / first
    saved = chunk.read_bytes()
    chunk.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    try:
        with served(backup) as url:
            bad, good = qemu_io(url, "read 0 4M"), qemu_io(url, "read 4M 4M")
            assert bad.returncode == 1 and "read failed: Input/output error" in bad.stdout
            assert good.returncode == 0 and "read 4194304/4194304 bytes at offset 4194304" in good.stdout
    finally:
        chunk.write_bytes(saved)


def test_serving_a_disk_the_backup_does_not_have_is_one_line(stork, vmid):
    g = vmid()
    guest_with_data(stork, g)
    backup = backed_up(stork, g)["backup"]
    code, out, err = stork("backup", "serve", backup, "virtio7", "--port", "0")
    assert (code, out) == (1, "") and err == f"stork: backup {backup} has no disk 'virtio7' (it has: scsi0)\n"


def test_a_file_comes_out_of_a_served_disk(stork, client, vmid, tmp_path):
    """An ext4 file system on the guest's disk, a file written into it; from the served backup
    its file system reads back whole and the file comes out (debugfs reads the image qemu-img
    takes off the served disk)."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:64M")[0] == 0
    image = volume_path(client.guest(g).disks["scsi0"])
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    (tmp_path / "notes.txt").write_text("what the guest wrote before its backup\n" * 100)
    subprocess.run(["debugfs", "-w", "-R", f"write {tmp_path / 'notes.txt'} notes.txt", str(image)], check=True,
                   capture_output=True)
    backup = backed_up(stork, g)["backup"]
    with served(backup) as url:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(tmp_path / "served.raw")],
                       check=True, capture_output=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(tmp_path / "served.raw")], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = subprocess.run(["debugfs", "-R", "cat notes.txt", str(tmp_path / "served.raw")], capture_output=True,
                         text=True, check=True).stdout
    assert out == (tmp_path / "notes.txt").read_text()


def test_hostile_clients_end_only_their_own_connections(tmp_path):
    """An export in this process on a small store: garbage options, a write claiming 4 GiB and
    a crowd beyond MAX_CLIENTS each end only their own connection; a polite client reads on."""
    import socket
    import struct
    import threading
    import time

    from drivers import nbd
    from drivers.backup import serve
    from drivers.backup.datapath import DiskReader
    from drivers.backup.store import ChunkStore
    from tests.backup.test_chunkstore import CS, T0, back_up, noise

    (tmp_path / "store").mkdir()
    store = ChunkStore(tmp_path / "store", chunk_size=CS)
    data = noise(3 * CS)
    snap = back_up(store, 100, T0, {"scsi0": data})
    export = serve.Export("scsi0", DiskReader(store, store.index(str(snap.id), "scsi0"), "t"),
                          serve.listen("127.0.0.1", 0))
    threading.Thread(target=export.serve, daemon=True).start()
    port = export.listener.getsockname()[1]

    def handshake() -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert len(conn.recv(18)) == 18  # magic, IHAVEOPT, flags
        conn.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        return conn

    def closed(conn: socket.socket) -> bool:
        try:
            return conn.recv(1) == b""
        except ConnectionResetError:
            return True

    try:
        bad = handshake()
        bad.sendall(b"not an option at all!")
        assert closed(bad)
        huge = handshake()
        huge.sendall(struct.pack(">QII", nbd.IHAVEOPT, serve.OPT_EXPORT_NAME, 5) + b"scsi0")
        assert struct.unpack(">QH", huge.recv(10))[0] == len(data)
        huge.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 0xFFFFFFFF))
        assert closed(huge)
        crowd = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(serve.MAX_CLIENTS)]
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert closed(extra)
        for conn in crowd:
            conn.close()
        polite = None
        for _ in range(50):  # the crowd's slots come back as their threads see them go
            try:
                polite = handshake()
                polite.sendall(struct.pack(">QII", nbd.IHAVEOPT, serve.OPT_EXPORT_NAME, 5) + b"scsi0")
                if len(polite.recv(10)) == 10:
                    break
            except (AssertionError, OSError):
                time.sleep(0.1)
        polite.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 7, CS, CS))
        reply = b""
        while len(reply) < 16 + CS:
            reply += polite.recv(16 + CS - len(reply))
        assert struct.unpack(">IIQ", reply[:16]) == (nbd.SIMPLE_REPLY_MAGIC, 0, 7) and reply[16:] == data[CS:2 * CS]
    finally:
        export.stop()
