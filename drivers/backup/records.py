"""Backup ids and times, the names a backup may hold, and the records the chunk store keeps.

A backup is `vm/<vmid>/<UTC time>`. Its manifest.json (written once, at commit), state.json
(what may change) and one <disk>.index.json per disk are parsed and checked here; each carries
a format version, and a reader refuses one it does not know (Refused), or data that does not
parse (Corrupt). No file-system code lives here: the store moves the bytes, these records say
what the bytes mean.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drivers import names
from drivers.backup.codec import CHUNK, MAX_CHUNK, MIN_CHUNK
from drivers.errors import Corrupt, InvalidName, UnknownFormat

VERSION = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
MANIFEST, STATE, INDEX_SUFFIX = "manifest.json", "state.json", ".index.json"

DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
TIME_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_BACKUP_ID = re.compile(r"vm/([0-9]{1,10})/([^/]*)")
_DISK_KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_BLOB = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(conf|log|txt)")
_ID_SHAPE = "vm/<guest id>/<UTC time like 2026-11-26T12:00:00Z>"


# ---- names ------------------------------------------------------------------------------------


def format_time(when: datetime) -> str:
    """A backup time as it appears in ids and folder names (UTC, whole seconds)."""
    if when.tzinfo is None:
        raise InvalidName(f"backup time {when.isoformat()} has no time zone: give a UTC time")
    return when.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    bad = InvalidName(f"invalid backup time {text!r}: expected a UTC time like 2026-11-26T12:00:00Z")
    if not isinstance(text, str) or not TIME_PATTERN.fullmatch(text):
        raise bad
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise bad from None


@dataclass(frozen=True, order=True)
class BackupId:
    """`vm/<vmid>/<time>`: one snapshot of one guest."""

    vmid: int
    time: datetime

    @property
    def time_text(self) -> str:
        return format_time(self.time)

    def __str__(self) -> str:
        return f"vm/{self.vmid}/{self.time_text}"


def backup_id(text: str) -> BackupId:
    """Parse a backup id given by a user; InvalidName says what is wrong with it."""
    match = _BACKUP_ID.fullmatch(text) if isinstance(text, str) else None
    if not match or match[1] != str(int(match[1])):
        raise InvalidName(f"invalid backup id {text!r}: expected {_ID_SHAPE}")
    try:
        return BackupId(names.vmid(match[1]), parse_time(match[2]))
    except InvalidName as e:
        raise InvalidName(f"invalid backup id {text!r}: {e}") from None


def disk_key(text: str) -> str:
    if not isinstance(text, str) or not _DISK_KEY.fullmatch(text):
        raise InvalidName(f"invalid disk key {text!r}: expected 1-64 of a-z 0-9 _ - starting with a letter or digit")
    return text


def blob_name(text: str) -> str:
    if not isinstance(text, str) or not _BLOB.fullmatch(text):
        raise InvalidName(f"invalid blob name {text!r}: expected <a-z 0-9 _ -, up to 64>.conf, .log or .txt")
    return text


def check_digest(text: str) -> str:
    if not isinstance(text, str) or not DIGEST_PATTERN.fullmatch(text):
        raise InvalidName(f"invalid chunk digest {text!r}: expected 64 lower-case hex digits")
    return text


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST_PATTERN.fullmatch(value) is not None


def _check_int(value: object, what: str, minimum: int = 0, maximum: int = names.MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{what} {value!r} is not a whole number from {minimum} to {maximum}")
    return value


MAX_NOTES = 1024


def check_notes(text: object) -> str:
    """A backup's notes, as every writer of them checks them (submit, the worker, the store):
    one line of printable text of at most MAX_NOTES characters."""
    if not isinstance(text, str) or len(text) > MAX_NOTES or not text.isprintable():
        raise InvalidName(f"invalid notes: expected one line of printable text of at most {MAX_NOTES} characters")
    return text


def check_chunk_size(size: int) -> int:
    _check_int(size, "chunk size", MIN_CHUNK, MAX_CHUNK)
    if size & (size - 1):
        raise ValueError(f"chunk size {size} is not a power of two")
    return size


# ---- indexes, manifests, state ------------------------------------------------------------------


@dataclass(frozen=True)
class BaseRef:
    """The backed-up disk a linked clone's disk was cloned from."""

    backup: str
    disk: str
    digest: str  # the content digest of the base's index

    def __post_init__(self) -> None:
        backup_id(self.backup)
        disk_key(self.disk)
        if not _is_digest(self.digest):
            raise ValueError(f"base digest {self.digest!r} is not 64 hex digits")


@dataclass(frozen=True)
class Patch:
    """A chunk that is mostly an earlier one: a whole chunk of an earlier backup (a linked
    clone's base's, or the same disk's previous one; None: zeros) with runs laid over it, their
    bytes one after another in the chunk `own` names (None: the runs are zeros). A clone, or an
    incremental backup, that changed 1 MiB here stores that 1 MiB, not a whole chunk."""

    base: str | None
    own: str | None
    runs: tuple[tuple[int, int], ...]  # (offset in the chunk, length): ascending, disjoint

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple(tuple(r) for r in self.runs))
        for digest in (self.base, self.own):
            if digest is not None and not _is_digest(digest):
                raise ValueError(f"chunk digest {digest!r} is not 64 hex digits")
        end = 0
        for run in self.runs:
            if len(run) != 2:
                raise ValueError(f"patch run {list(run)!r} is not an offset and a length")
            offset, length = run
            _check_int(offset, "patch run offset", end, MAX_CHUNK)
            _check_int(length, "patch run length", 1, MAX_CHUNK)
            end = offset + length
        if not self.runs:
            raise ValueError("a patch without runs")

    @property
    def own_size(self) -> int:
        return sum(length for _, length in self.runs)

    @property
    def digests(self) -> tuple[str, ...]:
        return tuple(d for d in (self.base, self.own) if d is not None)

    def apply(self, under: bytes, own: bytes) -> bytes:
        """The chunk: `under` (the base's data here) with the runs of `own` laid over it."""
        if len(own) != self.own_size or self.runs[-1][0] + self.runs[-1][1] > len(under):
            raise ValueError(f"a patch of {self.own_size} bytes in runs up to "
                             f"{self.runs[-1][0] + self.runs[-1][1]} does not fit {len(own)} bytes over {len(under)}")
        out, at = bytearray(under), 0
        for offset, length in self.runs:
            out[offset:offset + length] = own[at:at + length]
            at += length
        return bytes(out)

    def to_doc(self) -> dict[str, Any]:
        return {"base": self.base, "own": self.own, "runs": [list(r) for r in self.runs]}

    def __str__(self) -> str:
        return f"{self.base or 'zero'}+{self.own or 'zero'}@{';'.join(f'{o},{n}' for o, n in self.runs)}"


Entry = str | Patch | None  # an index's chunk: its digest, a patch over the base's, or None for zeros


def entry_digests(entry: Entry) -> tuple[str, ...]:
    """The stored chunks an index entry names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else entry.digests


def _entry(value: object) -> Entry:
    if isinstance(value, dict):
        if set(value) != {"base", "own", "runs"} or not isinstance(value["runs"], list) or \
                not all(isinstance(r, list) and len(r) == 2 for r in value["runs"]):
            raise ValueError(f"patch entry {value!r} is not base, own and runs")
        return Patch(value["base"], value["own"], tuple(tuple(r) for r in value["runs"]))
    return value  # type: ignore[return-value]  # checked by Index


@dataclass(frozen=True)
class Index:
    """One disk of a snapshot: its chunks in order, each a digest, a Patch over an earlier
    backup's chunk, or None for an all-zero chunk."""

    format: str
    virtual_size: int
    chunks: Sequence[Entry]  # kept as a tuple
    chunk_size: int = CHUNK
    base: BaseRef | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(self.chunks))
        if self.format not in names.FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(names.FORMATS)}")
        check_chunk_size(self.chunk_size)
        _check_int(self.virtual_size, "virtual size", 1)
        expected = -(-self.virtual_size // self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(f"{len(self.chunks)} chunks for {self.virtual_size} bytes, expected {expected}")
        for n, c in enumerate(self.chunks):
            if isinstance(c, Patch):
                end = c.runs[-1][0] + c.runs[-1][1]
                if end > min(self.chunk_size, self.virtual_size - n * self.chunk_size):
                    raise ValueError(f"chunk {n}: a patch run ends at {end}, past the chunk")
            elif c is not None and not _is_digest(c):
                raise ValueError(f"chunk digest {c!r} is not 64 hex digits")

    def digests(self) -> Iterator[tuple[int, str]]:
        """(position, digest) of every stored chunk the index names, a patch's two included."""
        for n, entry in enumerate(self.chunks):
            for digest in entry_digests(entry):
                yield n, digest

    @functools.cached_property
    def content(self) -> str:
        """A digest of the disk's data: two indexes that are equal have the same data. The
        sizes go in too: a disk that ends in zeros differs from a shorter one."""
        h = hashlib.sha256(f"{self.chunk_size} {self.virtual_size}\n".encode())
        for entry in self.chunks:
            h.update(f"{entry or 'zero'}\n".encode())
        return h.hexdigest()

    def to_json(self) -> bytes:
        base = None if self.base is None else vars(self.base)
        return _dump({"version": VERSION, "format": self.format, "virtual_size": self.virtual_size,
                      "chunk_size": self.chunk_size, "base": base, "content": self.content,
                      "chunks": [c.to_doc() if isinstance(c, Patch) else c for c in self.chunks]})

    @classmethod
    def from_json(cls, raw: bytes, what: str) -> Index:
        """Parse and check an index read from storage; Corrupt names `what` and the problem."""
        doc = _load(raw, what)
        with _parsing(what):
            base = doc["base"]
            index = cls(doc["format"], doc["virtual_size"], tuple(_entry(c) for c in doc["chunks"]),
                        doc["chunk_size"], None if base is None else BaseRef(**base))
            if index.content != doc["content"]:
                raise ValueError("its content digest does not match its chunks")
        return index


@dataclass(frozen=True)
class FileSum:
    size: int
    sha256: str

    def __post_init__(self) -> None:
        _check_int(self.size, "file size")
        if not _is_digest(self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 hex digits")

    @classmethod
    def of(cls, data: bytes) -> FileSum:
        return cls(len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class DiskSummary:
    format: str
    virtual_size: int
    content: str
    source: str = ""  # the volume id it was read from
    identity: str = ""  # that volume's identity token (Driver.identity): never another volume's

    def __post_init__(self) -> None:
        if self.format not in names.FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(names.FORMATS)}")
        _check_int(self.virtual_size, "virtual size", 1)
        if not _is_digest(self.content):
            raise ValueError(f"content digest {self.content!r} is not 64 hex digits")
        if not (isinstance(self.source, str) and isinstance(self.identity, str)):
            raise ValueError("source and identity must be text")


@dataclass(frozen=True)
class Manifest:
    """What a committed snapshot holds; written once, at commit."""

    files: Mapping[str, FileSum]
    disks: Mapping[str, DiskSummary]
    size: int  # the disks' virtual sizes added up
    written: int  # bytes of new chunk files this backup wrote
    started: str
    finished: str
    sealed_state: bool = False  # its state.json carries a MAC (an encrypted store's, since they do)

    def __post_init__(self) -> None:
        for name in self.files:
            if not _BLOB.fullmatch(name) and index_key(name) is None:
                raise ValueError(f"file name {name!r} is neither a blob nor an index")
        for key in self.disks:
            if index_file(disk_key(key)) not in self.files:
                raise ValueError(f"disk {key} has no index file")
        _check_int(self.size, "size")
        _check_int(self.written, "written")
        parse_time(self.started)
        parse_time(self.finished)

    def to_json(self, id: BackupId) -> bytes:
        return _dump({"version": VERSION, "id": str(id), "vmid": id.vmid, "time": id.time_text,
                      "files": {name: vars(s) for name, s in self.files.items()},
                      "disks": {key: vars(d) for key, d in self.disks.items()},
                      "size": self.size, "written": self.written, "started": self.started, "finished": self.finished,
                      **({"sealed_state": True} if self.sealed_state else {})})

    @classmethod
    def from_json(cls, raw: bytes, id: BackupId) -> Manifest:
        what = f"backup {id}: {MANIFEST}"
        doc = _load(raw, what)
        with _parsing(what):
            if doc["id"] != str(id):
                raise ValueError(f"it describes {doc['id']!r}")
            files = {name: FileSum(**s) for name, s in doc["files"].items()}
            disks = {key: DiskSummary(**d) for key, d in doc["disks"].items()}
            sealed = doc.get("sealed_state", False)
            if not isinstance(sealed, bool):
                raise ValueError(f"sealed_state {sealed!r} is not true or false")
            return cls(files, disks, doc["size"], doc["written"], doc["started"], doc["finished"], sealed)


@dataclass(frozen=True)
class Problem:
    """What verify found wrong: a chunk (with where each disk uses it) or a file (digest None)."""

    digest: str | None
    error: str
    places: tuple[tuple[str, int], ...] = ()  # (disk key, byte offset in that disk)

    def __str__(self) -> str:
        if not self.places:
            return self.error
        where = "; ".join(f"{key} at byte {offset}" for key, offset in self.places)
        return f"{self.error} (used by {where})"


@dataclass(frozen=True)
class VerifyResult:
    state: str  # "ok" or "failed"
    time: str
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def to_doc(self) -> dict[str, Any]:
        return {"state": self.state, "time": self.time,
                "problems": [{"digest": p.digest, "error": p.error, "places": [list(w) for w in p.places]}
                             for p in self.problems]}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> VerifyResult:
        problems = tuple(Problem(p["digest"], str(p["error"]), tuple((str(k), int(o)) for k, o in p["places"]))
                         for p in doc["problems"])
        if any(p.digest is not None and not _is_digest(p.digest) for p in problems):
            raise ValueError("a problem names a chunk digest that is not 64 hex digits")
        if doc["state"] not in ("ok", "failed"):
            raise ValueError(f"verify state {doc['state']!r} is neither ok nor failed")
        return cls(doc["state"], format_time(parse_time(doc["time"])), problems)


@dataclass(frozen=True)
class State:
    """What may change about a committed snapshot: kept in state.json, replaced atomically."""

    notes: str = ""
    protected: bool = False
    verify: VerifyResult | None = None

    def to_json(self, mac: str | None = None) -> bytes:
        """The state as stored; with `mac` (an encrypted store's, over to_json() itself)."""
        verify = None if self.verify is None else self.verify.to_doc()
        doc = {"version": VERSION, "notes": self.notes, "protected": self.protected, "verify": verify}
        return _dump({**doc, "mac": mac} if mac is not None else doc)

    @staticmethod
    def stated_mac(raw: bytes) -> str | None:
        """The MAC a state file carries (read after from_json accepted the file)."""
        mac = json.loads(raw).get("mac")
        return mac if isinstance(mac, str) else None

    @classmethod
    def from_json(cls, raw: bytes, what: str) -> State:
        doc = _load(raw, what)
        with _parsing(what):
            if not isinstance(doc["notes"], str) or not isinstance(doc["protected"], bool):
                raise ValueError("notes must be text and protected true or false")
            verify = None if doc["verify"] is None else VerifyResult.from_doc(doc["verify"])
            return cls(doc["notes"], doc["protected"], verify)


@dataclass(frozen=True)
class Snapshot:
    id: BackupId
    manifest: Manifest
    state: State


@dataclass(frozen=True)
class Damaged:
    """A committed snapshot that cannot be read (its manifest or state damaged, tampered with or
    missing): listed apart, so one damaged backup never stops the reading of the others."""

    id: BackupId
    reason: str


@dataclass(frozen=True)
class Listing:
    """What a store holds: the snapshots it can read, and those it cannot, each oldest first."""

    snapshots: list[Snapshot]
    damaged: list[Damaged]

    @property
    def ids(self) -> list[BackupId]:
        """Every committed snapshot's id, readable or not."""
        return sorted([s.id for s in self.snapshots] + [d.id for d in self.damaged])


@dataclass(frozen=True)
class GcResult:
    chunks_removed: int
    bytes_removed: int
    chunks_kept: int
    partials_removed: int
    bad_chunks_removed: int = 0  # damaged chunks verify moved aside, kept for a look until QUARANTINE passed
    bad_chunks_restored: int = 0  # of those, sound when read again (a passing read error), put back
    chunks_too_new: int = 0  # of those kept, named by no backup but newer than the margin (a writer may name them)
    removable_after: float | None = None  # when a gc will remove those of them no backup names by then


def index_file(key: str) -> str:
    return f"{key}{INDEX_SUFFIX}"


def index_key(name: str) -> str | None:
    key = name.removesuffix(INDEX_SUFFIX)
    return key if key != name and _DISK_KEY.fullmatch(key) else None


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1) + "\n").encode()


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise Corrupt(f"{what}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise Corrupt(f"{what}: not a JSON object")
    version = doc.get("version")
    if version != VERSION:
        damaged = not isinstance(version, int) or isinstance(version, bool) or version < 1
        raise (Corrupt if damaged else UnknownFormat)(f"{what}: format version {version!r}; this stork reads "
                                                      f"version {VERSION}")
    return doc


@contextlib.contextmanager
def _parsing(what: str) -> Iterator[None]:
    """Turn any problem met while reading a stored document into one Corrupt naming it."""
    try:
        yield
    except KeyError as e:
        raise Corrupt(f"{what}: field {e} is missing") from None
    except (TypeError, ValueError, AttributeError, InvalidName) as e:
        raise Corrupt(f"{what}: {e}") from None
