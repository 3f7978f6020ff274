"""Ceph RBD storage: each volume an RBD image in one pool.

    <pool>/<vmid>.vm-<vmid>-disk-<n>.raw    a guest's disk
    <pool>/base.<name>.raw                  a base, with the protected snapshot @__base__

A storage is a pool, or one RBD namespace of it (option `namespace`). RBD image names are
flat, so a volume `<folder>/<name>.<fmt>` is the image `<folder>.<name>.<fmt>`: the folder
(`base` or a guest id) holds no dot, so the first dot splits it off again, and a base and a
guest's disk never share an image name. A base is the image renamed, with the snapshot
`__base__` made and protected; a linked clone is `rbd clone <base>@__base__`, and Ceph itself
keeps the link (the clone's parent): `volume info` lists a base's clones from one `rbd ls -l`,
stork refuses to free a base with clones, and Ceph refuses too (a protected snapshot with
children cannot be removed), turned into stork's refusal. Every image is created whole by one
`rbd` call (`create`, `clone`), so no half-made image shows under a name.

qemu-img reads and writes an image through librbd (Debian's `qemu-block-extra`), given as a
`json:` spec with the pool, image, ceph.conf and user — never a key: the monitors and the
keyring come from the ceph.conf (`conf`), which the rbd tool reads too. A base is read from
its snapshot, what its clones are made of.

Full copies, within the cluster too, go through qemu-img, not `rbd deep cp`: measured here,
deep cp copied 256 MiB in 0.84 s against 1.0 s for qemu-img, but it makes its target itself,
so it would have to replace the image the job allocated (remove it, rename a temp copy into
place) under the storage lock and fence, and it carries snapshots and a clone's parent link
along; the calls around it cost more than it saved at that size (1.7 s in all).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drivers import faults, names, qemu
from drivers.backends.base import RAW_WITH_CLONES, Driver
from drivers.errors import AlreadyExists, NotFound, Refused
from drivers.names import VolName
from drivers.storage import Option, StorageConfig, is_path_text
from drivers.tools import ToolError, run

RBD = "rbd"
SNAPSHOT = "__base__"
TIMEOUT = 300.0  # seconds for one rbd call: a cluster that stops answering must not hang a step

_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

OPTIONS = {
    "pool": Option(lambda v: isinstance(v, str) and bool(_POOL.fullmatch(v)) and ".." not in v,
                   "an RBD pool name (letters, digits, _ . -)", required=True),
    "namespace": Option(lambda v: isinstance(v, str) and bool(_POOL.fullmatch(v)) and ".." not in v,
                        "an RBD namespace in the pool (letters, digits, _ . -)"),
    # the cluster: its monitors and the user's keyring are named in this ceph.conf, which both
    # the rbd tool and qemu-img (librbd) read; no key ever goes on a command line
    "conf": Option(is_path_text, "the path of a ceph.conf", default="/etc/ceph/ceph.conf", is_path=True),
    "username": Option(lambda v: isinstance(v, str) and bool(_USER.fullmatch(v)),
                       "a Ceph user name without the client. prefix", default="admin"),
}
# rbd's own client timeouts for the metadata calls stork makes, so an unreachable cluster
# fails a call in seconds instead of holding the storage lease
CLIENT_TIMEOUTS = ["--client_mount_timeout", "30", "--rados_mon_op_timeout", "30", "--rados_osd_op_timeout", "60"]


def _said(stderr: str) -> str:
    """rbd's own message: its last line starting `rbd:` (librbd logs timestamped lines too)."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("rbd:")]
    return (lines or stderr.strip().splitlines() or ["no message"])[-1].removeprefix("rbd: ")


def cluster_of(conf: Path) -> str:
    """Which cluster a ceph.conf names, as far as the file says: its `fsid`, else its monitors
    (`mon_host`, in any order), else the file's path (not readable here). Two storages reaching
    one pool through two files of one cluster are then one place."""
    try:  # read as the config's own files are: a FIFO or a device there must not hang a command
        fd = os.open(conf, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return str(conf)
            text = os.read(fd, 1 << 20).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return str(conf)
    section, found = "global", {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
        elif "=" in line and section == "global":
            key, value = (part.strip() for part in line.split("=", 1))
            found[re.sub(r"[ -]+", "_", key.lower())] = value
    if found.get("fsid"):
        return f"fsid {found['fsid'].lower()}"
    if mons := sorted(filter(None, re.split(r"[\s,;]+", found.get("mon_host", "")))):
        return f"monitors {','.join(mons)}"
    return str(conf)


class RbdDriver(Driver):
    type_name = "rbd"
    formats = ("raw",)
    default_format = "raw"
    linked_clone_format = "raw"
    FEATURES = RAW_WITH_CLONES
    OPTIONS = OPTIONS

    always_shared = True  # every node reaches the cluster

    @classmethod
    def place(cls, config: StorageConfig) -> str | None:
        o = config.options  # a namespace holds only its own images
        return f"rbd:{cluster_of(Path(o['conf']))}:{o['pool']}:{o.get('namespace', '')}"

    def __init__(self, config: StorageConfig) -> None:
        super().__init__(config)
        self.pool: str = config.options["pool"]
        self.namespace: str = config.options.get("namespace", "")
        self.conf: Path = config.options["conf"]
        self.where = f"{self.pool}/{self.namespace}" if self.namespace else self.pool  # rbd's pool[/namespace]

    # ---- the tool ------------------------------------------------------------------------
    def _cluster_args(self) -> list[str]:
        return ["--conf", str(self.conf), "--id", self.storage.options["username"], *CLIENT_TIMEOUTS]

    def _rbd(self, *args: str, what: str, busy: str = "it has linked clones or snapshots") -> str:
        """Run `rbd` on this storage's cluster. rbd exits with the errno: ENOENT is NotFound,
        EEXIST AlreadyExists, EBUSY (`busy` says what it means for this call) and ENOTEMPTY
        (an image with snapshots) Refused."""
        try:
            return run([RBD, *self._cluster_args(), *args], what, timeout=TIMEOUT)
        except ToolError as e:
            said = _said(e.stderr)
            if e.status == errno.ENOENT:
                raise NotFound(f"{what} failed: {said}") from None
            if e.status == errno.EEXIST:
                raise AlreadyExists(f"{what} failed: {said}") from None
            if e.status == errno.EBUSY:
                raise Refused(f"{what} failed: {busy} (Ceph: {said})") from None
            if e.status == errno.ENOTEMPTY:
                raise Refused(f"{what} failed: it has snapshots (Ceph: {said})") from None
            raise ToolError(what, e.argv, e.status, said) from None

    def _json(self, *args: str, what: str) -> Any:
        """An rbd command's JSON answer; one that does not parse is a one-line error."""
        out = self._rbd(*args, "--format", "json", what=what)
        try:
            return json.loads(out or "null")
        except ValueError:
            raise ToolError(what, [RBD, *args], 0, f"rbd answered something that is not JSON: {out[:80]!r}") from None

    def _spec(self, vol: VolName) -> str:
        return f"{self.where}/{names.flat_name(vol)}"

    def _images(self) -> list[dict[str, Any]]:
        """Every image and snapshot of the pool, with parents, from one `rbd ls -l`."""
        found = self._json("ls", "-l", self.where, what=f"listing pool {self.where}")
        return found if isinstance(found, list) else []

    # ---- opening -------------------------------------------------------------------------
    @contextlib.contextmanager
    def image(self, vol: VolName, write: bool = False) -> Iterator[qemu.Image]:
        """The image through librbd: qemu-img gets pool, image, conf and user, no key. A base
        is read from its snapshot __base__, what its linked clones are made of, so a full
        clone of a template equals a linked one. librbd flushes when qemu-img closes it."""
        self.require_existing(vol)
        spec: dict[str, Any] = {"driver": "rbd", "pool": self.pool, "image": names.flat_name(vol),
                                "conf": str(self.conf), "user": self.storage.options["username"]}
        if self.namespace:
            spec["namespace"] = self.namespace
        if vol.is_base and not write:
            spec["snapshot"] = SNAPSHOT
        yield qemu.Image("raw", spec, self.volid(vol))

    # ---- reading -------------------------------------------------------------------------
    def list_volumes(self, owner: int | None = None) -> list[VolName]:
        found = {v for entry in self._images() if "snapshot" not in entry
                 and (v := names.from_flat_name(str(entry.get("image", "")))) is not None and v.fmt in self.formats}
        return sorted((v for v in found if owner is None or v.owner == owner), key=str)

    def exists(self, vol: VolName) -> bool:
        """Asked of the image itself (`rbd info`), never of a listing: `rbd ls -l` leaves out an
        image it cannot open (a timeout, a permission), saying so on stderr only, and exits 0,
        which would read as gone (an undo then skips its rename back, a free its volume).
        Where the image is not found, the pool's listing tells a missing pool (NotFound)."""
        try:
            self._info(vol)
            return True
        except NotFound:
            self._images()  # NotFound where the pool itself is not there
            return False

    def _info(self, vol: VolName) -> dict[str, Any]:
        try:
            return self._json("info", self._spec(vol), what=f"reading {self.volid(vol)}")
        except NotFound:
            raise NotFound(f"unknown volume {self.volid(vol)}") from None

    def identity(self, vol: VolName) -> str:
        return str(self._info(vol).get("id", ""))  # Ceph's image id: never reused

    def virtual_size(self, vol: VolName) -> int:
        return int(self._info(vol).get("size", 0))

    def allocated_size(self, vol: VolName) -> int:
        where = ["--pool", self.pool, *(["--namespace", self.namespace] if self.namespace else [])]
        what = f"reading {self.volid(vol)}"
        out = self._json("du", *where, names.flat_name(vol), what=what) or {}
        return sum(int(i.get("used_size", 0)) for i in out.get("images", []) if i.get("name") == names.flat_name(vol)
                   and "snapshot" not in i)

    def parent_of(self, vol: VolName) -> VolName | None:
        return self._base_of(self._info(vol).get("parent"))

    def _base_of(self, parent: dict[str, Any] | None) -> VolName | None:
        if not parent or parent.get("snapshot") != SNAPSHOT or parent.get("pool") != self.pool \
                or (parent.get("pool_namespace") or "") != self.namespace:
            return None
        base = names.from_flat_name(parent.get("image", ""))
        return base if base is not None and base.is_base else None

    def clones_of(self, base: VolName) -> list[VolName]:
        """From one listing: the images whose parent is the base's snapshot."""
        return sorted((v for entry in self._images() if "snapshot" not in entry
                       and self._base_of(entry.get("parent")) == base
                       and (v := names.from_flat_name(str(entry.get("image", "")))) is not None), key=str)

    def status(self) -> tuple[int, int, int]:
        what = f"reading the usage of pool {self.pool}"
        try:
            out = json.loads(run(["ceph", *self._cluster_args(), "df", "--format", "json"], what, timeout=TIMEOUT))
        except ValueError:
            raise ToolError(what, ["ceph", "df"], 0, "ceph answered something that is not JSON") from None
        pool = next((p for p in out.get("pools", []) if p.get("name") == self.pool), None)
        if pool is None:  # the usage of pools comes from ceph-mgr
            raise NotFound(f"storage {self.storage.id!r}: the cluster reports no usage of pool {self.pool} "
                           "(no ceph-mgr running?)")
        stats = pool.get("stats", {})
        used, avail = int(stats.get("bytes_used", 0)), int(stats.get("max_avail", 0))
        return used + avail, used, avail

    # ---- making and freeing ----------------------------------------------------------------
    def allocate(self, vol: VolName, size: int) -> None:
        """One `rbd create`: the image exists whole, thin (it reads as zeros), or not at all."""
        self._rbd("create", "--size", f"{size}B", self._spec(vol), what=f"creating {self.volid(vol)}")
        faults.point("created")

    def recreate(self, vol: VolName, size: int) -> None:
        """Empty the image in place (shrunk to nothing, grown back): its name and id stay."""
        what = f"emptying {self.volid(vol)}"
        self._rbd("resize", "--no-progress", "--allow-shrink", "--size", "0B", self._spec(vol), what=what)
        self._rbd("resize", "--no-progress", "--size", f"{size}B", self._spec(vol), what=what)

    def link_clone(self, base: VolName, vol: VolName) -> None:
        self._rbd("clone", f"{self._spec(base)}@{SNAPSHOT}", self._spec(vol), what=f"cloning {self.volid(base)}")
        faults.point("created")

    def free(self, vol: VolName) -> None:
        """Remove the image (a base's snapshot first, which Ceph refuses while clones depend
        on it); absent already: nothing to do."""
        if not self.exists(vol):
            return
        what = f"freeing {self.volid(vol)}"
        if vol.is_base:
            self._drop_snapshot(vol, what)
        try:
            self._rbd("rm", "--no-progress", self._spec(vol), what=what, busy="it is open by a client")
        except BaseException:
            if vol.is_base and self.exists(vol):
                self.protect_base(vol)  # still a base: clonable again
            raise
        faults.point("freed")

    def _drop_snapshot(self, base: VolName, what: str) -> None:
        snap = f"{self._spec(base)}@{SNAPSHOT}"
        with contextlib.suppress(NotFound):
            snaps = self._json("snap", "ls", self._spec(base), what=what) or []
            if not any(s.get("name") == SNAPSHOT for s in snaps):
                return
            if (self._json("info", snap, what=what) or {}).get("protected") == "true":
                self._rbd("snap", "unprotect", snap, what=what)  # refused while clones depend on it
            self._rbd("snap", "rm", "--no-progress", snap, what=what)

    def free_partial(self, vol: VolName) -> None:
        """Nothing: an image is created whole by one call."""

    def make_base(self, vol: VolName, base: VolName) -> None:
        if self.exists(base):
            raise Refused(f"base image {self.volid(base)} already exists")
        self._rbd("rename", self._spec(vol), self._spec(base), what=f"making base {self.volid(base)}")
        faults.point("based")
        self.protect_base(base)

    def protect_base(self, base: VolName) -> None:
        """The snapshot clones are made of, protected; idempotent."""
        what, snap = f"protecting {self.volid(base)}", f"{self._spec(base)}@{SNAPSHOT}"
        snaps = self._json("snap", "ls", self._spec(base), what=what) or []
        if not any(s.get("name") == SNAPSHOT for s in snaps):
            self._rbd("snap", "create", "--no-progress", snap, what=what)
        if (self._json("info", snap, what=what) or {}).get("protected") != "true":
            self._rbd("snap", "protect", snap, what=what)

    def unmake_base(self, base: VolName, vol: VolName) -> None:
        what = f"turning {self.volid(base)} back into {self.volid(vol)}"
        if self.exists(vol):
            raise Refused(f"volume {self.volid(vol)} already exists")
        self._drop_snapshot(base, what)
        try:
            self._rbd("rename", self._spec(base), self._spec(vol), what=what)
        except BaseException:
            self.protect_base(base)
            raise
        faults.point("unbased")

    def resize(self, vol: VolName, size: int) -> None:
        self._rbd("resize", "--no-progress", "--size", f"{size}B", self._spec(vol), what=f"resizing {self.volid(vol)}")
