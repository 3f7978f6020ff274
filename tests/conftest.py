"""One test cluster per session: a real redis-server on a free port, real `celery worker`
processes as nodes (node1, node2), dir storages in a temporary directory.

STORK_CONFIG is set before any stork module is imported, so the in-process client, the
CLI (in-process and as a subprocess) and the workers all share one config.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from drivers.backup.crypt import create_key
from drivers.transfer import make_key as make_cluster_key
from tests import alerts, ceph, netns, storages
from worker import testing
from worker.testing import free_port

BASE = Path(tempfile.mkdtemp(prefix="stork-test-"))
# the cluster-key folders that were there before the session (drivers/transfer._key_dir keeps
# one per key path, for good): those made since for the session's own keys are removed at its end
PSK_FOLDERS = set(Path(tempfile.gettempdir()).glob(f"stork-psk-{os.getuid()}-*"))
SESSION_DIRS: list[Path] = [BASE]  # and pytest's base temp dir, once known


REDIS_PORT = free_port()
CONFIG = BASE / "stork.toml"
# Real filesystems on loop devices where this machine can make them, else the reason, with
# which their tests skip; detached in pytest_sessionfinish. Storage `bt` is a btrfs storage;
# `xfs` a dir storage on an XFS with reflinks; `zfs` a pool in zfs-fuse; `ceph` an RBD
# pool of a one-node Ceph cluster (tests/ceph.py).
BTRFS = storages.make("btrfs", BASE)
NO_BTRFS = BTRFS if isinstance(BTRFS, str) else ""
XFS = storages.make("xfs", BASE, size_mib=512)
NO_XFS = XFS if isinstance(XFS, str) else ""
ZFS = storages.zfs_pool(BASE)
NO_ZFS = ZFS if isinstance(ZFS, str) else ""
CEPH = ceph.qemu_unavailable() or ceph.start(BASE)  # the rbd tests copy through qemu-img's rbd driver
NO_CEPH = CEPH if isinstance(CEPH, str) else ""
LOOP_STORAGES = ("" if NO_BTRFS else f"""
[storage.bt]
type = "btrfs"
path = "{BTRFS.mount}"
""") + ("" if NO_XFS else f"""
[storage.xfs]
type = "dir"
path = "{XFS.mount}"
""") + ("" if NO_ZFS else f"""
[storage.zfs]
type = "zfs"
pool = "{ZFS.name}"
""") + ("" if NO_CEPH else f"""
[storage.ceph]
type = "rbd"
pool = "{CEPH.pool}"
conf = "{CEPH.conf}"
shared = true
""")
# node `far` in a network namespace of its own, over a veth pair (tests/netns.py): node1's
# exports listen on the host end, far's inside; without one, every node is on 127.0.0.1
NETNS = netns.make()
NO_NETNS = NETNS if isinstance(NETNS, str) else ""
NODE_ADDRESSES = "" if NO_NETNS else f"""
[nodes.node1]
address = "{netns.HOST_IP}"
[nodes.far]
address = "{netns.NS_IP}"
"""
# Proxmox VE's /etc/pve for storage `pve` (a dir storage of its layout, `tank` in its storage.cfg):
# guest configs the tests write name volumes stork must leave alone
PVE_ETC = BASE / "pve-etc"
(PVE_ETC / "nodes" / "node1" / "qemu-server").mkdir(parents=True)
(PVE_ETC / "storage.cfg").write_text(f"dir: tank\n\tpath {BASE / 'pve'}\n\tcontent images,rootdir\n\n"
                                     "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent images\n")
create_key(BASE / "secret.key")  # the encrypted backup storage `secret`'s key
make_cluster_key(BASE / "cluster.psk")  # authenticates and encrypts copies between node1 and node2
WEBHOOK, MAILBOX = alerts.Webhook(), alerts.Mailbox()  # where the session's alerts go (tests/alerts.py)
WEBHOOK_SECRET = "the webhook's shared secret"
CONFIG.write_text(f"""
[redis]
url = "redis://127.0.0.1:{REDIS_PORT}/0"
[paths]
guests = "guests"
locks = "lock"
[locks]
timeout = 30
[cluster]
tls_psk_file = "{BASE / 'cluster.psk'}"
[worker]
concurrency = 4
[storage.local]
type = "dir"
path = "images"
[storage.local1]
type = "dir"
path = "node1"
nodes = ["node1"]
[storage.local2]
type = "dir"
path = "node2"
nodes = ["node2"]
[storage.shared]
type = "dir"
path = "shared"
shared = true
[storage.crash]
type = "dir"
path = "crash"
nodes = ["crash"]
[storage.far]
type = "dir"
path = "far"
nodes = ["far"]
[storage.small]
type = "dir"
path = "small"
[storage.pve]
type = "dir"
path = "pve"
layout = "pve"
pve_config = "{PVE_ETC}"
pve_locks = "{BASE / 'pve-locks'}"
[storage.backup]
type = "chunkstore"
path = "backup"
shared = true
[storage.tiny]
type = "chunkstore"
path = "tiny"
shared = true
[storage.offsite]
type = "chunkstore"
path = "offsite"
shared = true
[storage.secret]
type = "chunkstore"
path = "secret"
keyfile = "{BASE / 'secret.key'}"
shared = true
[notify.hook]
type = "webhook"
url = "http://127.0.0.1:{WEBHOOK.port}/stork?token=not-for-logs"
secret = "{WEBHOOK_SECRET}"
[notify.mail]
type = "smtp"
host = "127.0.0.1"
port = {MAILBOX.port}
from = "stork@cluster.test"
to = ["ops@cluster.test"]
events = ["job-failed", "schedule-failed", "backup-damaged"]
[schedule.nightly]
schedule = "0 2 * * *"
guests = "all"
exclude = [100]
storage = "backup"
keep-daily = 7
keep-weekly = 4
enabled = false
{LOOP_STORAGES}{NODE_ADDRESSES}""")
_released: list[bool] = []
atexit.register(lambda: _release())  # what the session made goes even when pytest stops before it starts
CONFIG.chmod(0o600)  # it holds the webhook's secret: stork refuses a world-readable one
os.environ["STORK_CONFIG"] = str(CONFIG)
os.environ["STORK_NODE"] = "node1"
os.environ.pop("STORK_REDIS_URL", None)


def Worker(node: str, concurrency: int = 4, env: dict[str, str] | None = None,
           prefix: tuple[str, ...] = ()) -> testing.Worker:
    return testing.Worker(node, BASE, concurrency, env, prefix)


@pytest.fixture(scope="session", autouse=True)
def _session_dirs(tmp_path_factory):
    SESSION_DIRS.append(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def redis_server():
    server = testing.RedisServer(REDIS_PORT, BASE, also_on=() if NO_NETNS else (netns.HOST_IP,))
    yield server.client
    server.stop()


@pytest.fixture(scope="session")
def workers(redis_server):
    """Workers for node1 and node2, for the whole session."""
    started = {node: Worker(node) for node in ("node1", "node2")}
    yield started
    for w in started.values():
        w.stop()


@pytest.fixture(scope="session")
def client(workers):
    from producer.client import Client

    return Client()


_vmids = itertools.count(1000)


@pytest.fixture
def faulty(workers, tmp_path):
    """A one-process worker for node `crash` whose fault points (drivers/faults.py) the test
    arms by writing their names into the returned file."""
    armed = tmp_path / "faults"
    armed.write_text("")
    worker = Worker("crash", concurrency=1, env={"STORK_FAULTS": str(armed)})
    yield armed
    worker.stop()


@pytest.fixture
def vmid():
    """A fresh guest id per call: tests share one cluster."""
    return lambda: next(_vmids)


@pytest.fixture
def stork(workers, capsys):
    """Run the CLI in-process: returns (exit status, stdout, stderr)."""
    from producer.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def storage_path(name: str) -> Path:
    return BASE / {"local": "images", "local1": "node1", "local2": "node2", "bt": "btrfs"}.get(name, name)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def pytest_sessionfinish(session, exitstatus):
    _release()


def _release(owner: int = os.getpid()) -> None:
    """Stop and remove what the session made, once: at its end, or at exit when pytest stops
    before it has a session (a usage error after this module was imported) — never in a
    forked child (its exit would take the session's storages from under it)."""
    if os.getpid() != owner or _released:
        return
    _released.append(True)
    WEBHOOK.close()
    MAILBOX.close()
    if isinstance(NETNS, netns.Netns):
        NETNS.close()
    for fs in (BTRFS, XFS, ZFS, CEPH):
        if isinstance(fs, storages.LoopFs | storages.ZfsPool | ceph.CephCluster):
            fs.close()  # unmounted and detached before the directory holding it goes
    for mount in ("small", "tiny"):
        subprocess.run(["umount", str(BASE / mount)], capture_output=True, check=False)
    subprocess.run(["chattr", "-R", "-i", str(BASE)], capture_output=True, check=False)
    shutil.rmtree(BASE, ignore_errors=True)
    for folder in set(Path(tempfile.gettempdir()).glob(f"stork-psk-{os.getuid()}-*")) - PSK_FOLDERS:
        try:
            key = Path(os.readlink(folder / "keys.psk"))
        except OSError:
            continue
        if any(key.is_relative_to(d) for d in SESSION_DIRS):  # never another session's, or a worker's
            shutil.rmtree(folder, ignore_errors=True)
