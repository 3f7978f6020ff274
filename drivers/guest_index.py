"""Which guest configs name which volume: "is this volume in use?" reads the configs of that
volume's users and of the guests changed lately, not every config.

The index lives beside the configs, in the guests directory (shared like them):

    .index/volumes/<h>/<vmid>   a marker: guest <vmid> names the volume whose id hashes to <h>
    .index/guests/<vmid>        JSON list of the volume ids guest <vmid> has markers for
    .index/clock                written to read the file system's own time (its ctime)
    .index/ctimes               JSON {vmid: ctime ns} of each config as its markers were set: a
                                refresh reads a config again whose ctime is another, however
                                old (a clock set back gives an edit a ctime below `since`)
    .index/since                JSON {"clock": ..., "since": ...} (ns): every config whose ctime
                                is older than `since` had its markers made durable before this
                                file was written
    .index/lock                 flock of whoever refreshes the index

Only a refresh writes it (the cluster's periodic sweep, GuestStore.refresh_index), never a
config write, so a write pays nothing. The kernel sets a file's ctime on every change to it,
by stork or by hand (an editor, a restore that sets its mtime back, a rename into place on the
local file systems Linux has), and nothing can set it back; a network file system's server
does the same. A user-space file system may make a ctime up (sshfs gives the mtime): on one,
and on a type not known (CTIME_KEPT), the index is not used at all. So a check reads the markers of the
volume plus every config whose ctime is not older than `since`: a read of few, found by a stat
of each config, or on a local file system by a stat of the few the process's watch names as
changed since it stat'd them all (drivers/guest_watch.py). `since` is the refresh's clock less
MARGIN, and never past the refresh before's clock, so a config changed shortly before a refresh
stays read by the checks until a later one, and only markers an earlier refresh made are
trusted: that covers the clocks of nodes that set ctime themselves (cluster file systems) and
what a network file system's client cached, within MARGIN and a sweep's interval. A clock that
went back since the last refresh (its `clock` ahead of the checking node's) makes the checks
read every config until a refresh has read them all again. Without `since` (never refreshed,
or a refresh met a config it could not read) a check reads every config, as before the index.
Two refreshes never run at once: they hold the flock, as every writer of a guest config
already does on this directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from drivers.errors import ConfigError, LockTimeout
from drivers.flock import file_lock, fsync_dir, open_making_dirs

MARGIN = 120 * 10**9  # ns a refresh leaves to the checks: configs changed this long before it
# file systems whose stat(2) answers from the inode itself; on any other (NFS, CIFS, FUSE) a
# check opens each config to read its ctime, which makes a network client ask its server
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "overlay"})
# where every change to a config reaches a watch in this kernel (drivers/guest_watch.py); not an
# overlay, whose layers can be written beneath it
WATCHED_FILE_SYSTEMS = LOCAL_FILE_SYSTEMS - {"overlay"}
# where a config's ctime is its inode's own, set by the kernel or the server at every change:
# the index is trusted only there. A user-space file system may make it up (sshfs, rclone and
# s3fs give the mtime, which `cp -p`, `rsync -a` or `tar x` set back): there every check reads
# every config, as where the type is unknown
CTIME_KEPT = LOCAL_FILE_SYSTEMS | {"nfs", "nfs4", "cifs", "smb3", "ceph", "fuse.ceph-fuse", "ocfs2", "gfs2", "virtiofs"}


def _key(volid: str) -> str:
    return hashlib.sha256(volid.encode()).hexdigest()[:32]


class VolumeIndex:
    def __init__(self, guests_dir: Path) -> None:
        self.root = guests_dir / ".index"

    # ---- read by the checks ------------------------------------------------------------

    def since(self) -> int | None:
        """The ctime (ns) before which every config is in the index; None: trust none of it."""
        return self.stamp().get("since")

    def stamp(self) -> dict[str, int]:
        """The last committed refresh: its `clock` and `since` (ns); empty when there is none."""
        try:
            stamp = json.loads((self.root / "since").read_text())
            return {"clock": int(stamp["clock"]), "since": int(stamp["since"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def indexed(self, vmid: int) -> bool:
        """Whether a refresh recorded guest `vmid` (its record of the volumes it has markers for)."""
        return (self.root / "guests" / str(vmid)).exists()

    def marked(self, volid: str) -> set[int]:
        """Guests the markers say name `volid` (as of `since`)."""
        try:
            names = os.listdir(self.root / "volumes" / _key(volid))
        except FileNotFoundError:
            return set()
        except OSError as e:
            raise ConfigError(f"{self.root}: cannot read the guest volume index: {e.strerror or e}") from None
        return {int(name) for name in names if _guest_id(name)}

    # ---- written by stork's own delete of a config ---------------------------------------

    def forget(self, vmid: int) -> None:
        """Drop the markers of a guest whose config stork removed: a check then never meets a
        marker of a guest gone, and takes a missing config a marker names for one being
        replaced (refused). Not under the refresh's lock: one that read the config before it
        went may set its markers again, which the next refresh drops (meanwhile a check of
        those volumes refuses)."""
        record = self.root / "guests" / str(vmid)
        try:
            had = json.loads(record.read_text())
        except (OSError, ValueError):
            return
        for volid in had if isinstance(had, list) else ():
            with contextlib.suppress(FileNotFoundError):
                (self.root / "volumes" / _key(str(volid)) / str(vmid)).unlink()
        with contextlib.suppress(FileNotFoundError):
            record.unlink()

    # ---- written by a refresh ----------------------------------------------------------

    @contextlib.contextmanager
    def refreshing(self) -> Iterator[Refresh | None]:
        """A refresh under the index's lock; None when another process holds it."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(self.root / "lock", 0, "guest volume index"))
            except LockTimeout:
                yield None
                return
            yield Refresh(self, self.stamp())

    def ctimes(self) -> dict[int, int]:
        """Each config's ctime (ns) when a refresh last set its markers; empty where unknown."""
        try:
            found = json.loads((self.root / "ctimes").read_text())
            return {int(vmid): int(ctime) for vmid, ctime in found.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def indexed_guests(self) -> set[int]:
        try:
            return {int(name) for name in os.listdir(self.root / "guests") if _guest_id(name)}
        except FileNotFoundError:
            return set()


def _guest_id(name: str) -> bool:
    """A marker's or record's name as a refresh writes it: a guest id (anything else is not ours)."""
    return name.isascii() and name.isdigit() and not name.startswith("0")


class Refresh:
    """One refresh: the file system's time read first, then each changed guest's markers set
    (`set`), made durable, and `since` moved (`commit`)."""

    def __init__(self, index: VolumeIndex, last: dict[str, int]) -> None:
        self.index = index
        self.touched: set[Path] = set()
        self.clock = self._clock()
        went_back = bool(last) and self.clock < last["clock"]
        if went_back:  # configs changed since have ctimes below `since`: trust none until this commits
            with contextlib.suppress(FileNotFoundError):
                (index.root / "since").unlink()
            fsync_dir(index.root)
        # configs older than this are in the index already; None: read them all (never refreshed,
        # or the clock went back since the last refresh)
        self.unchanged_before = last["since"] if last and not went_back else None
        # what this refresh may commit: MARGIN before its clock, and never past the last refresh's
        # clock, so only markers an earlier refresh made are trusted (a network file system's
        # client may remember for a while that a marker folder made just now did not exist)
        self.since = self.clock - MARGIN if not last or went_back else min(self.clock - MARGIN, last["clock"])

    def _clock(self) -> int:
        with open_making_dirs(self.index.root / "clock", "a") as f:
            f.write("t")
            f.flush()
            os.ftruncate(f.fileno(), 0)
            return os.fstat(f.fileno()).st_ctime_ns

    def set(self, vmid: int, volumes: Iterable[str]) -> None:
        """Guest `vmid` names exactly `volumes` now (none: it is gone). Every marker it needs is
        made (again: one left by a refresh that never committed may not be durable)."""
        wanted = set(volumes)
        record = self.index.root / "guests" / str(vmid)
        try:
            had = set(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            had = set()  # none yet, or unreadable: stale markers stay, which only makes a check read more
        for volid in wanted:
            folder = self.index.root / "volumes" / _key(volid)
            open_making_dirs(folder / str(vmid), "a").close()
            self.touched |= {folder, folder.parent}
        for volid in had - wanted:
            with contextlib.suppress(FileNotFoundError):
                (self.index.root / "volumes" / _key(volid) / str(vmid)).unlink()
        if wanted:
            self._replace(record, json.dumps(sorted(wanted)))
        else:
            with contextlib.suppress(FileNotFoundError):
                record.unlink()
        self.touched.add(record.parent)

    def record_ctimes(self, ctimes: dict[int, int]) -> None:
        """Each config's ctime as its markers now stand: a refresh rereads a config whose ctime
        differs, however old (a clock stepped back since gives a hand edit a ctime below `since`,
        which no comparison with `since` tells). Lost in a crash: every config is read once."""
        self._replace(self.index.root / "ctimes", json.dumps({str(k): v for k, v in sorted(ctimes.items())}))

    def commit(self) -> None:
        """Every marker set is durable, then configs older than `since` are trusted to the markers."""
        for folder in sorted(self.touched, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(folder)
        self._replace(self.index.root / "since", json.dumps({"clock": self.clock, "since": self.since}))
        fsync_dir(self.index.root)

    @staticmethod
    def _replace(path: Path, text: str) -> None:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            with open_making_dirs(temp, "x") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise


_file_systems: dict[int, str] = {}


def file_system(path: Path) -> str:
    """The type of the file system `path` is on ("ext4", "nfs4", ...; "" when unknown)."""
    device = os.stat(path).st_dev
    if device not in _file_systems:
        _file_systems[device] = _file_system_type(device)
    return _file_systems[device]


def _file_system_type(device: int) -> str:
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields, _, rest = line.partition(" - ")
                if fields.split()[2] == wanted:
                    return rest.split()[0]
    except (OSError, IndexError):
        pass
    return ""
