"""Guest configs: one TOML file per guest (`<vmid>.toml`) in the configured directory.

Writes are atomic (temp file, fsync, rename); a new guest is created with link(2), which
fails if the id is taken, so two jobs can never both create guest 101. Every writer of a
guest's config (`create()`, `write()`, `editing()`) holds the flock on the guest's lock file,
which is also what makes it safe to sweep that guest's stale temp files (`sweep_temps`, run
by the cluster's periodic sweep, takes it before it removes one).

Reading is strict and listing fails closed: the in-use checks ("does any guest use volume
X?") are built on `list()`, so a config that cannot be read must stop them rather than make
its disks look free.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import secrets
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from drivers import names
from drivers.errors import AlreadyExists, ConfigError, InvalidName, LockTimeout, NotFound, Refused
from drivers.flock import file_lock, fsync_dir, open_making_dirs
from drivers.guest_index import CTIME_KEPT, LOCAL_FILE_SYSTEMS, WATCHED_FILE_SYSTEMS, VolumeIndex, file_system

KEYS = ("name", "node", "template", "lock", "lock_job", "rev", "notes", "unused", "disks", "replicas")
MAX_NOTES = 1024
MAX_CONFIG = 1 << 20  # a config is a few hundred bytes: a larger file is not one, and is not read whole
REPLICA_KEYS = ("of", "identity", "node")
# the replica's own identity token: recorded since 2026-12-08 (a replica recorded before has none)
REPLICA_OPTIONAL = ("own_identity",)


@dataclass(frozen=True)
class Guest:
    vmid: int
    node: str
    name: str = ""
    template: bool = False
    lock: str = ""  # the job kind holding the guest, "" when free
    lock_job: str = ""  # the id of the job holding the lock
    # renewed by the store at every change of `disks` and at create: a job submitted before
    # disks changed and changed back (one removed and added again under the same volume id, a
    # guest destroyed and made again alike) finds another rev, where `disks` alone match
    rev: str = ""
    notes: str = ""  # what an import read of the guest that stork does not use (CPUs, memory, networks)
    disks: dict[str, str] = field(default_factory=dict)  # disk key -> volume id
    unused: tuple[str, ...] = ()  # volumes kept after a move, no longer attached
    # a template's replicas: read-only copies of its bases on other nodes' storages, each
    # {"of": the base's volume id, "identity": that base's identity token, "node": where it is,
    # "own_identity": the replica's own, where recorded}
    replicas: dict[str, dict[str, str]] = field(default_factory=dict)

    def with_(self, **changes: object) -> Guest:
        return replace(self, **changes)  # type: ignore[arg-type]

    def volumes(self) -> set[str]:
        """Every volume id the config names: attached, kept as unused, recorded as a replica."""
        return {*self.disks.values(), *self.unused, *self.replicas}

    def require_unlocked(self) -> None:
        if self.lock:
            raise Refused(f"guest {self.vmid} is locked ({self.lock})")

    def require_not_template(self, doing: str) -> None:
        if self.template:
            raise Refused(f"guest {self.vmid} is a template: {doing} is not allowed")


def base_mismatch(is_base: bool, template: bool, guest: str = "the guest") -> str:
    """Why a disk does not fit as an attached disk of a guest ("" when it does): a template's
    disks are base images, and any other guest's are not."""
    if is_base == template:
        return ""
    return f"is {'not ' if template else ''}a base image, and {guest} is {'' if template else 'not '}a template"


_NEEDS_NO_ESCAPE = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII but the quote and the backslash: as it is


def _toml_string(text: str) -> str:
    """An ASCII TOML basic string; unlike JSON it spells non-BMP characters as one \\U escape."""
    if _NEEDS_NO_ESCAPE.fullmatch(text):  # nearly every name and volume id: no walk through its characters
        return f'"{text}"'
    return _escaped(text)


def _escaped(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:  # a lone surrogate comes out invalid: _write_temp's check refuses it
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a guest config")


def dumps(guest: Guest) -> str:
    lines = [
        f"name = {_toml_value(guest.name)}",
        f"node = {_toml_value(guest.node)}",
        f"template = {_toml_value(guest.template)}",
    ]
    if guest.lock or guest.lock_job:
        lines.append(f"lock = {_toml_value(guest.lock)}")
        lines.append(f"lock_job = {_toml_value(guest.lock_job)}")
    if guest.rev:
        lines.append(f"rev = {_toml_value(guest.rev)}")
    if guest.notes:
        lines.append(f"notes = {_toml_value(guest.notes)}")
    if guest.unused:
        lines.append(f"unused = {_toml_value(list(guest.unused))}")
    lines.append("")
    lines.append("[disks]")
    lines += [f"{key} = {_toml_value(vol)}" for key, vol in sorted(guest.disks.items())]
    for volid, replica in sorted(guest.replicas.items()):
        lines += ["", f"[replicas.{_toml_string(volid)}]"]
        lines += [f"{key} = {_toml_value(replica[key])}" for key in (*REPLICA_KEYS, *REPLICA_OPTIONAL)
                  if key in replica]
    return "\n".join(lines) + "\n"


class _Broken(ValueError):
    """What is wrong inside a config, one line; the caller adds the file."""


def _show(value: object) -> str:
    """A value as one short line (JSON spelling is close to TOML's) for an error message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(where: str, value: object, expected: str, check: Callable[[str], object] | None = None) -> str:
    if not isinstance(value, str):
        raise _Broken(f"{where} = {_show(value)}: expected {expected}")
    if check is not None:
        try:
            check(value)
        except InvalidName as e:
            raise _Broken(f"{where} = {_show(value)}: {e}") from None
    return value


_PLAIN = r'"[^"\\\x00-\x1f\x7f]*"'  # a basic string without escapes: its text is what it says
_LINE = re.compile(
    rf'(?P<key>[a-z0-9_]+) = (?:(?P<string>{_PLAIN})|(?P<boolean>true|false)|\[(?P<items>(?:{_PLAIN}(?:, )?)*)\])'
    rf'|\[(?P<table>disks|replicas\.(?P<replica>{_PLAIN}))\]|')


def _canonical(text: str) -> dict[str, object] | None:
    """The data of a config exactly as `dumps` writes it, read line by line without a TOML
    parser (several times faster, for listings of many guests); None for anything else, which
    tomllib then reads. The caller accepts the result only if `dumps` gives back the same text,
    so what this reads is always what tomllib would."""
    data: dict[str, object] = {}
    table = data
    for line in text.split("\n"):
        match = _LINE.fullmatch(line)
        if match is None:
            return None
        if match["table"] == "disks":
            table = data.setdefault("disks", {})  # type: ignore[assignment]
        elif match["table"]:
            replicas = data.setdefault("replicas", {})
            table = replicas.setdefault(match["replica"][1:-1], {}) if isinstance(replicas, dict) else None
        elif match["key"]:
            table[match["key"]] = _canonical_value(match)
        if not isinstance(table, dict):
            return None  # a table over a key of that name (`disks = "x"` then `[disks]`): tomllib says what is wrong
    return data


def _canonical_value(match: re.Match[str]) -> object:
    if match["string"] is not None:
        return match["string"][1:-1]
    if match["boolean"]:
        return match["boolean"] == "true"
    return [item[1:-1] for item in re.findall(_PLAIN, match["items"])]


def _parse(vmid: int, text: str) -> Guest:
    quick = _canonical(text)
    if quick is not None:
        try:
            guest = _checked(vmid, quick)
            if dumps(guest) == text:
                return guest
        except (_Broken, TypeError, ValueError):
            pass  # not canonical after all: tomllib reads it, and says what is wrong
    return _parse_toml(vmid, text)


def _parse_toml(vmid: int, text: str) -> Guest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _Broken(f"invalid TOML: {' '.join(str(e).split())}") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.set_int_max_str_digits)
        raise _Broken(f"not read: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:  # arrays or tables nested a thousand deep
        raise _Broken("not read: nested too deeply") from None
    return _checked(vmid, data)


def _checked(vmid: int, data: dict[str, object]) -> Guest:
    """A config's data as a Guest: known keys only, each of its type; else _Broken."""
    unknown = [key for key in data if key not in KEYS]
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        raise _Broken(f"unknown key{'s' if len(unknown) > 1 else ''} {listed} (expected one of: {', '.join(KEYS)})")
    if "node" not in data:
        raise _Broken("missing key 'node'")
    template = data.get("template", False)
    if not isinstance(template, bool):
        raise _Broken(f"template = {_show(template)}: expected true or false")
    disks = data.get("disks", {})
    if not isinstance(disks, dict):
        raise _Broken(f"disks = {_show(disks)}: expected a table of disk = volume id")
    for key, volid in disks.items():
        try:
            names.disk_key(key)
        except InvalidName as e:
            raise _Broken(f"disks: {e}") from None
        _text(f"disks.{key}", volid, "a volume id", names.stored_volid)
    unused = data.get("unused", [])
    if not isinstance(unused, list):
        raise _Broken(f"unused = {_show(unused)}: expected a list of volume ids")
    for i, volid in enumerate(unused):
        _text(f"unused[{i}]", volid, "a volume id", names.stored_volid)
    replicas = data.get("replicas", {})
    if not isinstance(replicas, dict):
        raise _Broken(f"replicas = {_show(replicas)}: expected tables of replicas")
    for volid, replica in replicas.items():
        _text(f"replicas key {_show(volid)}", volid, "a volume id", names.stored_volid)
        if not isinstance(replica, dict) or not set(REPLICA_KEYS) <= set(replica) <= {*REPLICA_KEYS, *REPLICA_OPTIONAL}:
            raise _Broken(f"replicas.{_show(volid)} = {_show(replica)}: expected {', '.join(REPLICA_KEYS)} "
                          f"(and {', '.join(REPLICA_OPTIONAL)})")
        _text(f"replicas.{_show(volid)}.of", replica["of"], "a volume id", names.stored_volid)
        _text(f"replicas.{_show(volid)}.node", replica["node"], "a node name", names.node)
        _text(f"replicas.{_show(volid)}.identity", replica["identity"], "an identity token")
        if "own_identity" in replica and not _text(f"replicas.{_show(volid)}.own_identity", replica["own_identity"],
                                                   "an identity token"):
            raise _Broken(f"replicas.{_show(volid)}.own_identity = \"\": expected an identity token")
    return Guest(
        vmid=vmid,
        node=_text("node", data["node"], "a node name", names.node),
        name=_text("name", data.get("name", ""), "a string"),
        template=template,
        lock=_text("lock", data.get("lock", ""), "a string"),
        lock_job=_text("lock_job", data.get("lock_job", ""), "a string"),
        rev=_text("rev", data.get("rev", ""), "a revision token", _rev),
        notes=_text("notes", data.get("notes", ""), f"one line of at most {MAX_NOTES} printable characters", _notes),
        disks=dict(disks),
        unused=tuple(unused),
        replicas={volid: dict(replica) for volid, replica in replicas.items()},
    )


REV = re.compile(r"[0-9a-f]{16}")


def new_rev() -> str:
    return secrets.token_hex(8)


def _rev(text: str) -> None:
    if text and not REV.fullmatch(text):
        raise InvalidName("expected 16 hexadecimal digits, as stork writes it")


def _notes(text: str) -> None:
    if len(text) > MAX_NOTES or not text.isprintable():
        raise InvalidName(f"expected one line of at most {MAX_NOTES} printable characters")


def loads(vmid: int, text: str, file: Path | str) -> Guest:
    """Parse a config strictly: known keys only, each of its type; else one-line ConfigError."""
    try:
        return _parse(vmid, text)
    except _Broken as e:
        raise ConfigError(f"{file}: broken guest config: {e}") from None


TEMP_NAME = re.compile(r"\.([0-9]+)\.toml\.[0-9a-f]+\.tmp")  # `_write_temp`'s names: .<vmid>.toml.<token>.tmp


def _fresh_stat(path: str) -> os.stat_result:
    """The file's status as it is now: through an open, which makes an NFS client ask its server
    (a stat may answer from its attribute cache, and a refresh that trusted a stale ctime would
    leave a changed config out of the index for good)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _seen(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a config file from one written since: a rename puts another inode at the
    name, a write in place moves its times."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _changed(path: Path, seen: tuple[int, int, int, int]) -> bool:
    """Is the file at `path` another than the one `seen`? Looked at through an open, which on
    NFS asks the server (a stat may answer from a cache another node's rename has not reached)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # gone, or a symlink or what cannot be opened: not the file read
    try:
        return _seen(os.fstat(fd)) != seen
    finally:
        os.close(fd)


def _misnamed(file: Path) -> str:
    return (f"{file}: broken guest config: file name {file.name!r} is not <vmid>.toml "
            f"(vmid a number from {names.VMID_MIN} to {names.VMID_MAX}, no leading zeros)")


def _vmid_of_file(name: str) -> int | None:
    return _vmid_of(name[:-5])  # <vmid>.toml


def _vmid_of(stem: str) -> int | None:
    """The guest id a config file name spells, None unless it is the one canonical spelling."""
    try:
        vmid = names.vmid(stem)
    except InvalidName:
        return None
    return vmid if stem == str(vmid) else None  # '0100.toml' would read as guest 100


class GuestStore:
    """The directory of guest configs."""

    def __init__(self, directory: Path, lock_timeout: float = 60.0) -> None:
        self.dir = directory
        self.lock_timeout = lock_timeout

    def path(self, vmid: int) -> Path:
        return self.dir / f"{names.vmid(vmid)}.toml"

    def exists(self, vmid: int) -> bool:
        return self.path(vmid).exists()

    def read(self, vmid: int) -> Guest:
        return self._read_file(vmid, self.path(vmid))

    @staticmethod
    def _read_file(vmid: int, file: Path | str) -> Guest:
        """The config at `file` (a path string is enough: a listing of 10,000 makes no Path of
        each), read by plain reads on one descriptor (a file object per config was a third of
        a listing's time)."""
        return GuestStore._read_seen(vmid, file)[0]

    @staticmethod
    def _read_seen(vmid: int, file: Path | str) -> tuple[Guest, tuple[int, int, int, int]]:
        """_read_file, and the file as read: (inode, size, mtime, ctime), from its descriptor."""
        try:
            # not through a symlink, and a FIFO planted as a config cannot block the read
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"unknown guest {vmid}") from None
        except OSError as e:
            raise ConfigError(f"{file}: broken guest config: cannot read it: {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{file}: broken guest config: not a regular file")
            chunks, size = [], 0
            while size <= MAX_CONFIG and (chunk := os.read(fd, MAX_CONFIG + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
            seen = _seen(os.fstat(fd))
        except OSError as e:
            raise ConfigError(f"{file}: broken guest config: cannot read it: {e.strerror or e}") from None
        finally:
            os.close(fd)
        if size > MAX_CONFIG:
            raise ConfigError(f"{file}: broken guest config: larger than {MAX_CONFIG >> 20} MiB, not a guest config")
        data = b"".join(chunks)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{file}: broken guest config: not UTF-8 text") from None
        return loads(vmid, text, file), seen

    def scan(self) -> tuple[builtins.list[Guest], builtins.list[tuple[Path, str]]]:
        """Every readable guest, and every config that cannot be read with its one-line error.

        For displays; anything deciding whether a volume is in use must call `list()` or
        `candidates()`.
        """
        guests: builtins.list[Guest] = []
        broken: builtins.list[tuple[Path, str]] = []
        folder = str(self.dir)
        for name, vmid, _ in sorted(self._entries()):
            if vmid is None:
                broken.append((self.dir / name, _misnamed(self.dir / name)))
                continue
            try:
                guests.append(self._read_file(vmid, f"{folder}/{name}"))
            except NotFound:
                continue  # deleted since the directory was listed: no longer a guest
            except ConfigError as e:
                broken.append((self.dir / name, str(e)))
        return sorted(guests, key=lambda g: g.vmid), broken

    def list(self) -> builtins.list[Guest]:
        """Every guest; ConfigError naming the first broken config, as its disks cannot be told free."""
        guests, broken = self.scan()
        if broken:
            raise ConfigError(broken[0][1])
        return guests

    def candidates(self, volid: str) -> builtins.list[Guest]:
        """Every guest whose config may name `volid` (a superset: callers test each guest): those
        the volume index marks, and every config changed since the index was refreshed; every
        guest where it never was (drivers/guest_index.py). ConfigError, as list(), naming a
        config that cannot be read, or a file name that is not a guest's."""
        index = VolumeIndex(self.dir)
        stamp = index.stamp()
        if not stamp or stamp["clock"] > time.time_ns():  # a refresh by a clock ahead of ours: trust none of it
            return self.list()
        if (kind := self._file_system()) not in CTIME_KEPT:  # a ctime that may be made up tells nothing
            return self.list()
        marked = index.marked(volid)
        changed = self._changed_since(stamp["since"], kind)
        wanted = marked | {vmid for vmid in map(_vmid_of_file, changed) if vmid is not None}
        found = []
        for vmid in sorted(wanted):
            try:
                found.append(self.read(vmid))
            except NotFound:
                # indexed (its record), yet gone: another tool took the file away (stork's delete
                # drops the record and markers); a marker without a record was left by a refresh
                # cut off, or raced by a delete, and names a guest gone
                if vmid in marked and index.indexed(vmid):
                    raise ConfigError(f"guest {vmid}'s config is missing, though the volume index says it names "
                                      f"{volid} (being replaced by an editor, or removed by hand: the next sweep "
                                      "forgets it)") from None
        return found

    def _changed_since(self, since: int, kind: str) -> set[str]:
        """The configs (file names) whose ctime is not older than `since`, on a file system of
        type `kind`: on a local one, those this process's watch names since it last stat'd them
        all (drivers/guest_watch.py); elsewhere, or when the watch cannot tell, a stat of each."""
        if kind not in WATCHED_FILE_SYSTEMS:
            return self._stat_every(since, fresh=kind not in LOCAL_FILE_SYSTEMS)
        from drivers import guest_watch  # here: ctypes only for the processes that check

        with guest_watch.lock:
            watch = guest_watch.watching(self.dir)
            names = watch.changed_since(since) if watch is not None else None
            if names is None:
                started = time.monotonic()
                changed = self._stat_every(since)
                if watch is not None:
                    watch.listed(since, changed, started)
                return changed
            folder = str(self.dir)
            changed = self._changed(since, ((n, lambda n=n: os.lstat(os.path.join(folder, n))) for n in names))
            watch.settled(since, names - changed)
            return changed

    def _file_system(self) -> str:
        try:
            return file_system(self.dir)
        except OSError as e:
            raise ConfigError(f"{self.dir}: cannot read the guest configs: {e.strerror or e}") from None

    def _stat_every(self, since: int, fresh: bool = False) -> set[str]:
        """`_changed` of every config; `fresh`: through an open of each (a network file system's
        client may answer a stat from its cache)."""
        if fresh:
            found = ((name, lambda e=entry: _fresh_stat(e.path)) for name, _, entry in self._entries())
        else:
            found = ((name, lambda e=entry: e.stat(follow_symlinks=False)) for name, _, entry in self._entries())
        return self._changed(since, found)

    def _changed(self, since: int, found: Iterable[tuple[str, Callable[[], os.stat_result]]]) -> set[str]:
        """Of these config files (each with how to stat it), those that may have changed since
        `since`: a ctime not older, more than one link (written through another name, no event
        tells the watch), or no status to be had (a FIFO planted as a config, say: read() names
        it). ConfigError for a name that is not a guest's; a file gone is no guest."""
        changed = set()
        for name, status in found:
            try:
                st = status()
            except FileNotFoundError:  # removed since the listing or the event
                continue
            except OSError:
                st = None
            if _vmid_of_file(name) is None:
                raise ConfigError(_misnamed(self.dir / name))
            if st is None or st.st_ctime_ns >= since or st.st_nlink > 1:
                changed.add(name)
        return changed

    def refresh_index(self) -> int | None:
        """Bring the volume index up to the configs (run by the cluster's periodic sweep): read
        each config changed since the last refresh and set its markers. How many were read;
        None when another process is refreshing. A config that cannot be read leaves `since`
        where it was, so the checks go on reading it (and refusing)."""
        index = VolumeIndex(self.dir)
        with index.refreshing() as refresh:
            if refresh is None:
                return None
            read, broken, present = 0, False, set()
            known, seen = index.ctimes(), {}  # each config's ctime as its markers stand
            for _, vmid, entry in self._entries():
                if vmid is None:
                    broken = True
                    continue
                present.add(vmid)
                try:
                    ctime = _fresh_stat(entry.path).st_ctime_ns
                    if refresh.unchanged_before is not None and ctime < refresh.unchanged_before \
                            and known.get(vmid) == ctime:
                        seen[vmid] = ctime
                        continue
                    guest = self._read_file(vmid, entry.path)
                except (NotFound, FileNotFoundError):
                    present.discard(vmid)
                    continue
                except (ConfigError, OSError):  # a symlink or FIFO planted as a config, say
                    broken = True
                    continue
                try:
                    refresh.set(vmid, guest.volumes())
                except OSError:  # the index cannot be written (a full disk): no commit, the guests gone still go
                    broken = True
                    continue
                seen[vmid] = ctime
                read += 1
            for vmid in index.indexed_guests() - present:
                refresh.set(vmid, ())
            if seen != known:
                refresh.record_ctimes(seen)
            if not broken:
                refresh.commit()
            return read

    def _entries(self) -> Iterator[tuple[str, int | None, os.DirEntry[str]]]:
        """Each config file in the directory: its name, the guest id it spells (None when it
        spells none), its directory entry. (No Path per file: that was half of a check's time.)"""
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    name = entry.name
                    if name.endswith(".toml") and not name.startswith("."):
                        yield name, _vmid_of(name[:-5]), entry
        except FileNotFoundError:
            return  # no guest created yet
        except OSError as e:
            raise ConfigError(f"{self.dir}: cannot list guest configs: {e.strerror or e}") from None

    def sweep_temps(self) -> int:
        """Remove the temp files crashed writers left, of each guest whose flock is free now (a
        live writer holds its guest's); how many. One listing of the directory, run by the
        cluster's periodic sweep: before every write, as it was, it cost each write a listing
        of every guest (7.6 ms with 10,000 guests, for a write of 0.9 ms)."""
        stale: dict[int, builtins.list[str]] = {}
        try:
            with os.scandir(self.dir) as entries:
                for entry in entries:
                    if (match := TEMP_NAME.fullmatch(entry.name)) and (vmid := _vmid_of(match[1])) is not None:
                        stale.setdefault(vmid, []).append(entry.name)
        except FileNotFoundError:
            return 0
        removed = 0
        for vmid, temps in stale.items():
            try:
                with file_lock(self._lock_path(vmid), 0, f"guest {vmid} config"):
                    for name in temps:  # gone already if its writer finished since the listing
                        with contextlib.suppress(FileNotFoundError):
                            (self.dir / name).unlink()
                            removed += 1
            except LockTimeout:
                continue  # its writer is at work: its temp file is not stale
        return removed

    def _write_temp(self, guest: Guest) -> Path:
        """Write the config to a new temp file and fsync it; nothing is left behind on failure."""
        final = self.path(guest.vmid)
        text = dumps(guest)
        try:
            _parse(guest.vmid, text)  # never write a config that list() would then refuse
        except _Broken as e:
            raise ConfigError(f"{final}: refusing to write a broken guest config: {e}") from None
        temp = self.dir / f".{guest.vmid}.toml.{secrets.token_hex(8)}.tmp"
        f = open_making_dirs(temp, "x")  # O_EXCL: never follows or reuses a planted file
        try:
            with f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        return temp

    def create(self, guest: Guest) -> None:
        """Write a new guest config; AlreadyExists if the id is taken (atomic, race-free)."""
        guest = guest.with_(rev=new_rev())  # another guest than any before under its id
        with self.locked(guest.vmid):
            temp = self._write_temp(guest)
            try:
                os.link(temp, self.path(guest.vmid))
            except FileExistsError:
                raise AlreadyExists(f"guest {guest.vmid} already exists") from None
            finally:
                temp.unlink()
            fsync_dir(self.dir)

    def write(self, guest: Guest) -> None:
        """Replace a guest config atomically, under the guest's flock, as given (its rev too:
        for tools and tests; a job edits through `editing()`, which renews the rev)."""
        with self.locked(guest.vmid):
            self._replace(guest)

    def _replace(self, guest: Guest, seen: tuple[int, int, int, int] | None = None) -> None:
        """write() for a caller that holds the guest's flock already (flock does not nest);
        with `seen` (the file as it was read), refused where the file is another by now (a hand
        edit takes no flock), looked at just before the rename."""
        temp = self._write_temp(guest)
        try:
            if seen is not None and _changed(self.path(guest.vmid), seen):
                raise ConfigError(f"{self.path(guest.vmid)}: changed by another hand while stork edited it: not "
                                  "written over (the job's step fails or is tried again)")
            os.replace(temp, self.path(guest.vmid))
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        fsync_dir(self.dir)

    def delete(self, vmid: int) -> None:
        """Remove a guest's config (under its flock; callers do not hold it)."""
        with self.locked(vmid):
            with contextlib.suppress(FileNotFoundError):
                self.path(vmid).unlink()
                fsync_dir(self.dir)
            with contextlib.suppress(OSError):  # a refresh drops them too
                VolumeIndex(self.dir).forget(vmid)

    def locked(self, vmid: int) -> contextlib.AbstractContextManager[None]:
        """Hold the guest's flock while its config is edited."""
        return file_lock(self._lock_path(vmid), self.lock_timeout, f"guest {vmid} config")

    def _lock_path(self, vmid: int) -> Path:
        return self.dir / ".locks" / f"{names.vmid(vmid)}.lock"

    @contextlib.contextmanager
    def editing(self, vmid: int) -> Iterator[builtins.list[Guest]]:
        """Read a guest under its flock; put a changed Guest into the list to write it back.

        Usage: `with store.editing(100) as box: box[0] = box[0].with_(lock="clone")`.
        """
        with self.locked(vmid):
            guest, seen = self._read_seen(vmid, self.path(vmid))
            box = [guest]
            yield box
            if box[0].disks != guest.disks:  # whatever rev the new Guest was given
                box[0] = box[0].with_(rev=new_rev())
            if box[0] != guest:
                self._replace(box[0], seen)  # not over a hand edit made meanwhile (sed -i, an editor)
