"""A real one-node Ceph cluster on 127.0.0.1 for tests: one mon, one memstore OSD, auth none, no mgr.

`start(where)` builds the cluster under a fresh directory inside `where` and returns a `CephCluster`
(or a one-line reason when it could not); `CephCluster.close()` stops the daemons by the PIDs that
they wrote to their pid files and removes the directory. Every call here has a timeout: a full
memstore OSD hangs I/O instead of failing, so keep test data small (the OSD keeps about twice the
stored bytes in RAM, within `memstore_device_bytes`).

Clients use `--conf CephCluster.conf` (or CEPH_CONF), and qemu takes `rbd:POOL/IMAGE:conf=CONF`.
Run `python -m tests.ceph` for a self-check of the rbd and qemu-img operations a driver needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

MON_ID = "a"
OSD_ID = 0
STEP_TIMEOUT = 30.0  # seconds for one command (mkfs, a ceph call, a daemon's fork)
READY_TIMEOUT = 60.0  # seconds for the OSD to come up and the pool to be usable
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
MEMSTORE_BYTES = 1 << 30  # the OSD's capacity; memstore allocates only what is written
T = TypeVar("T")
TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")


class CephError(Exception):
    """A step of start() failed; the message is one line."""


@dataclass
class CephCluster:
    """A running cluster: point clients at `conf`, use `pool`; `close()` stops it."""

    conf: Path
    pool: str
    monhost: str
    pids: list[int] = field(default_factory=list)
    root: Path | None = None  # the directory holding everything (conf, mon and osd data, logs)

    def spec(self, image: str) -> str:
        """The qemu block spec of an image in the pool."""
        return f"rbd:{self.pool}/{image}:conf={self.conf}"

    def ceph(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        """Run `ceph ARGS` against this cluster and return its stdout (raises CephError)."""
        return _ceph(self.conf, *args, timeout=timeout)

    def rbd(self, *args: str, timeout: float = STEP_TIMEOUT) -> str:
        """Run `rbd ARGS` against this cluster and return its stdout (raises CephError)."""
        return _run(["rbd", "--conf", str(self.conf), *args], timeout)

    def close(self) -> None:
        """Stop the daemons (the OSD before the mon), then remove the cluster's directory."""
        _stop(self.pids, self.conf)
        self.pids.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def qemu_unavailable() -> str:
    """Why qemu-img cannot open rbd: images here, or "" if it can (Debian ships the driver in qemu-block-extra)."""
    if shutil.which("qemu-img") is None:
        return "missing qemu-img (apt-get install qemu-utils)"
    if not list(Path("/usr/lib").glob("*/qemu/block-rbd.so")):
        return "qemu-img has no rbd driver (apt-get install --no-install-recommends qemu-block-extra)"
    return ""


def unavailable() -> str:
    """Why no cluster can be started here, or "" if one can."""
    if os.geteuid() != 0:
        return "not root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common)"
    return ""


def start(where: Path, pool: str = "stork") -> CephCluster | str:
    """Start the cluster with its data and config under `where`; on failure, stop what was started and return why.

    The reason is one line. The cluster lives in a new directory inside `where`, so one `where` can hold several.
    """
    if why := unavailable():
        return why
    where.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ceph-", dir=where))
    v2, v1 = _free_port(), _free_port()
    cluster = CephCluster(conf=root / "ceph.conf", pool=pool, monhost=f"127.0.0.1:{v1}", root=root)
    try:
        _bootstrap(cluster, root, v2, v1)
    except BaseException as exc:  # stop what was started whatever went wrong (Ctrl-C included)
        _stop(_pids_in(root / "run"), cluster.conf)
        cluster.pids.clear()
        if not isinstance(exc, Exception):
            raise
        why = str(exc).strip().splitlines() or [type(exc).__name__]
        return f"{why[-1]} (logs in {root / 'log'})"
    return cluster


def _bootstrap(cluster: CephCluster, root: Path, v2: int, v1: int) -> None:
    """Write the config, make and start the mon and the OSD, then create the pool."""
    fsid = str(uuid.uuid4())
    for sub in ("mon", f"osd/{OSD_ID}", "run", "log"):
        (root / sub).mkdir(parents=True)
    cluster.conf.write_text(_conf_text(fsid, root, v2, v1))
    _mon_mkfs(cluster.conf, root, fsid, v2, v1)
    cluster.pids.append(_spawn(cluster.conf, "mon", MON_ID))
    cluster.ceph("health", "mute", "MGR_DOWN", "--sticky")
    osd_uuid = str(uuid.uuid4())
    cluster.ceph("osd", "new", osd_uuid, str(OSD_ID))
    _run(["ceph-osd", "--conf", str(cluster.conf), "-i", str(OSD_ID), "--mkfs", "--osd-uuid", osd_uuid], STEP_TIMEOUT)
    cluster.pids.append(_spawn(cluster.conf, "osd", str(OSD_ID)))
    _wait(lambda: _osd_up(cluster.conf), READY_TIMEOUT, "the OSD to be up and in")
    cluster.ceph("osd", "pool", "create", cluster.pool, "8", "8", "replicated")
    cluster.rbd("pool", "init", cluster.pool, timeout=READY_TIMEOUT)
    _wait_healthy(cluster.conf)


def _conf_text(fsid: str, root: Path, v2: int, v1: int) -> str:
    """ceph.conf for one mon and one memstore OSD on 127.0.0.1, auth none, size-1 pools, no mgr."""
    return f"""[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
run_dir = {root}/run
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
auth_allow_insecure_global_id_reclaim = false
client_mount_timeout = 30
rados_mon_op_timeout = 30
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0

[mon]
mon_data = {root}/mon/$id
pid_file = {root}/run/$name.pid
log_file = {root}/log/$name.log
admin_socket = {root}/run/$name.asok
paxos_propose_interval = 0.1
mon_data_avail_warn = 1
mon_data_avail_crit = 1
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false

[osd]
osd_data = {root}/osd/$id
pid_file = {root}/run/$name.pid
log_file = {root}/log/$name.log
admin_socket = {root}/run/$name.asok
osd_objectstore = memstore
memstore_device_bytes = {MEMSTORE_BYTES}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
"""


def _mon_mkfs(conf: Path, root: Path, fsid: str, v2: int, v1: int) -> None:
    """Build a one-mon monmap and the mon's store."""
    monmap = root / "monmap"
    addrs = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
    _run(["monmaptool", "--create", "--fsid", fsid, "--addv", MON_ID, addrs, "--enable-all-features",
          "--set-min-mon-release", "pacific", str(monmap)], STEP_TIMEOUT)
    _run(["ceph-mon", "--conf", str(conf), "--mkfs", "-i", MON_ID, "--monmap", str(monmap)], STEP_TIMEOUT)


def _spawn(conf: Path, kind: str, ident: str) -> int:
    """Start ceph-KIND, which forks away once it is up; return the PID it wrote to its pid file."""
    _run([f"ceph-{kind}", "--conf", str(conf), "-i", ident], STEP_TIMEOUT)
    pid_file = conf.parent / "run" / f"{kind}.{ident}.pid"
    return _wait(lambda: _read_pid(pid_file), STEP_TIMEOUT, pid_file.name)


def _read_pid(pid_file: Path) -> int:
    """The PID in a pid file, or 0 while it is missing or empty."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _pids_in(run_dir: Path) -> list[int]:
    """PIDs of the daemons that wrote pid files in run_dir, in start order (mon first)."""
    files = sorted(run_dir.glob("*.pid"), key=lambda p: not p.name.startswith("mon."))
    return [pid for pid in map(_read_pid, files) if pid]


def _osd_up(conf: Path) -> bool:
    """Whether `ceph osd stat` shows the OSD up and in."""
    stat = json.loads(_ceph(conf, "osd", "stat", "--format", "json"))
    stat = stat.get("osdmap", stat)  # older releases nest the counts
    return stat.get("num_up_osds") == 1 and stat.get("num_in_osds") == 1


def _wait_healthy(conf: Path) -> None:
    """Wait for HEALTH_OK (muted checks do not count); on timeout, say which checks are still raised."""
    last: dict = {}

    def healthy() -> bool:
        last.update(json.loads(_ceph(conf, "health", "--format", "json")))
        return last.get("status") == "HEALTH_OK"

    try:
        _wait(healthy, READY_TIMEOUT, "HEALTH_OK")
    except CephError as exc:
        raise CephError(f"{exc}; still raised: {', '.join(last.get('checks', {})) or last}") from None


def _ceph(conf: Path, *args: str, timeout: float = STEP_TIMEOUT) -> str:
    """Run the ceph CLI against conf and return its stdout."""
    return _run(["ceph", "--conf", str(conf), "--connect-timeout", str(int(timeout)), *args], timeout)


def _run(argv: list[str], timeout: float) -> str:
    """Run argv with a timeout; return stdout, raise CephError with one line on failure."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired:
        raise CephError(f"{' '.join(argv[:3])}... timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise CephError(f"{' '.join(argv)}: exit {proc.returncode}: {_last_words(argv[0], proc)}")
    return proc.stdout


def _last_words(tool: str, proc: subprocess.CompletedProcess[str]) -> str:
    """The tool's own last error line (librbd's timestamped log lines are skipped when there is one)."""
    lines = (proc.stderr or proc.stdout).strip().splitlines() or [""]
    own = [line for line in lines if line.startswith(f"{tool}:")]
    return (own or lines)[-1]


def _wait(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll predicate until it returns a truthy value; raise CephError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if value := predicate():
                return value
        except (CephError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise CephError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _stop(pids: list[int], conf: Path) -> None:
    """Stop our daemons in the reverse of their start order (the OSD reports to a live mon and exits fast)."""
    for pid in reversed(pids):
        if _is_ours(pid, conf):
            _stop_one(pid)


def _stop_one(pid: int) -> None:
    """SIGTERM pid, wait up to STOP_GRACE for it to exit, then SIGKILL it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal(pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while _alive(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


def _is_ours(pid: int, conf: Path) -> bool:
    """Whether pid is a live ceph daemon started with our conf (guards against recycled PIDs)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.path.basename(argv[0]).startswith(b"ceph-") and str(conf).encode() in argv


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (daemons are re-parented, so we cannot reap them)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    """Send sig to pid, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_check() -> None:
    """Start a cluster, exercise rbd and qemu-img against it, print the start time, close it."""
    if why := qemu_unavailable():
        raise SystemExit(f"qemu: {why}")
    with tempfile.TemporaryDirectory(prefix="stork-ceph-") as tmp:
        began = time.monotonic()
        cluster = start(Path(tmp))
        if isinstance(cluster, str):
            raise SystemExit(f"ceph: {cluster}")
        print(f"cluster up in {time.monotonic() - began:.1f}s: {cluster.monhost} pool {cluster.pool}")
        try:
            _check_rbd(cluster)
            _check_qemu(cluster, Path(tmp))
        finally:
            cluster.close()
        print("ok")


def _check_rbd(c: CephCluster) -> None:
    """create, snap create/protect, clone, children, info, ls -l, du, resize, deep cp, flatten, rename, rm."""
    p = c.pool
    c.rbd("create", "--size", "16M", f"{p}/base")
    c.rbd("snap", "create", f"{p}/base@s1")
    _expect_exit(c, 22, "clone", f"{p}/base@s1", f"{p}/early")  # clone v1: the snapshot must be protected
    c.rbd("snap", "protect", f"{p}/base@s1")
    c.rbd("clone", f"{p}/base@s1", f"{p}/child")
    children = c.rbd("children", f"{p}/base@s1").split()
    assert children == [f"{p}/child"], children
    info = json.loads(c.rbd("info", "--format", "json", f"{p}/child"))
    assert info["parent"]["image"] == "base", info
    print("ls -l:", c.rbd("ls", "-l", "--format", "json", p).strip())
    print("du:", c.rbd("du", "--format", "json", "--pool", p).strip())
    _expect_exit(c, 39, "rm", f"{p}/base")  # it has a snapshot
    _expect_exit(c, 16, "snap", "rm", f"{p}/base@s1")  # protected
    _expect_exit(c, 16, "snap", "unprotect", f"{p}/base@s1")  # it has a child
    c.rbd("resize", "--size", "32M", f"{p}/child")
    c.rbd("deep", "cp", f"{p}/child", f"{p}/copy")
    assert json.loads(c.rbd("info", "--format", "json", f"{p}/copy"))["parent"]["image"] == "base"
    c.rbd("rename", f"{p}/child", f"{p}/renamed")
    assert c.rbd("children", f"{p}/base@s1").split() == [f"{p}/copy", f"{p}/renamed"]
    for image in ("copy", "renamed"):
        c.rbd("flatten", f"{p}/{image}")
    assert c.rbd("children", f"{p}/base@s1").split() == []
    c.rbd("snap", "unprotect", f"{p}/base@s1")
    c.rbd("snap", "rm", f"{p}/base@s1")
    for image in ("base", "renamed", "copy"):
        c.rbd("rm", f"{p}/{image}")
    assert json.loads(c.rbd("ls", "--format", "json", p)) == []


def _expect_exit(c: CephCluster, code: int, *args: str) -> None:
    """Run `rbd ARGS`, which must fail with exit status `code` (rbd exits with the errno)."""
    proc = subprocess.run(["rbd", "--conf", str(c.conf), *args], capture_output=True, text=True,
                          timeout=STEP_TIMEOUT, check=False)
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)


def _check_qemu(c: CephCluster, tmp: Path) -> None:
    """qemu-img convert a small raw file into an rbd image, then info and compare it."""
    raw = tmp / "disk.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), c.spec("fromqemu")], STEP_TIMEOUT)
    info = json.loads(_run(["qemu-img", "info", "--output", "json", c.spec("fromqemu")], STEP_TIMEOUT))
    assert info["virtual-size"] == 4 << 20, info
    _run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), c.spec("fromqemu")], STEP_TIMEOUT)
    c.rbd("rm", f"{c.pool}/fromqemu")


if __name__ == "__main__":
    _self_check()
