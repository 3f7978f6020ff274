"""Guest configs: one TOML file per guest (`<vmid>.toml`) in the configured directory.

Writes are atomic (temp file, fsync, rename); a new guest is created with link(2), which
fails if the id is taken, so two jobs can never both create guest 101. `editing()` holds an
flock on the guest's lock file while a config is read, changed and written back.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from drivers import names
from drivers.errors import AlreadyExists, ConfigError, NotFound, Refused
from drivers.flock import file_lock, open_making_dirs


@dataclass(frozen=True)
class Guest:
    vmid: int
    node: str
    name: str = ""
    template: bool = False
    lock: str = ""  # the job kind holding the guest, "" when free
    lock_job: str = ""  # the id of the job holding the lock
    disks: dict[str, str] = field(default_factory=dict)  # disk key -> volume id
    unused: tuple[str, ...] = ()  # volumes kept after a move, no longer attached

    def with_(self, **changes: object) -> Guest:
        return replace(self, **changes)  # type: ignore[arg-type]

    def require_unlocked(self) -> None:
        if self.lock:
            raise Refused(f"guest {self.vmid} is locked ({self.lock})")

    def require_not_template(self, doing: str) -> None:
        if self.template:
            raise Refused(f"guest {self.vmid} is a template: {doing} is not allowed")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of ASCII is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a guest config")


def dumps(guest: Guest) -> str:
    lines = [
        f"name = {_toml_value(guest.name)}",
        f"node = {_toml_value(guest.node)}",
        f"template = {_toml_value(guest.template)}",
    ]
    if guest.lock:
        lines.append(f"lock = {_toml_value(guest.lock)}")
        lines.append(f"lock_job = {_toml_value(guest.lock_job)}")
    if guest.unused:
        lines.append(f"unused = {_toml_value(list(guest.unused))}")
    lines.append("")
    lines.append("[disks]")
    lines += [f"{key} = {_toml_value(vol)}" for key, vol in sorted(guest.disks.items())]
    return "\n".join(lines) + "\n"


def loads(vmid: int, text: str, file: Path) -> Guest:
    try:
        data = tomllib.loads(text)
        return Guest(
            vmid=vmid,
            node=str(data["node"]),
            name=str(data.get("name", "")),
            template=bool(data.get("template", False)),
            lock=str(data.get("lock", "")),
            lock_job=str(data.get("lock_job", "")),
            disks={names.disk_key(k): str(v) for k, v in data.get("disks", {}).items()},
            unused=tuple(str(v) for v in data.get("unused", ())),
        )
    except (tomllib.TOMLDecodeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{file}: broken guest config: {e}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        file = self.path(vmid)
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise NotFound(f"unknown guest {vmid}") from None
        return loads(vmid, text, file)

    def list(self) -> list[Guest]:
        if not self.dir.is_dir():
            return []
        found = []
        for file in sorted(self.dir.glob("*.toml")):
            with contextlib.suppress(Exception):
                found.append(self.read(names.vmid(file.stem)))
        return sorted(found, key=lambda g: g.vmid)

    def _write_temp(self, guest: Guest) -> Path:
        temp = self.dir / f".{guest.vmid}.toml.{os.getpid()}.{time.monotonic_ns()}.tmp"
        with open_making_dirs(temp, "w") as f:
            f.write(dumps(guest))
            f.flush()
            os.fsync(f.fileno())
        return temp

    def create(self, guest: Guest) -> None:
        """Write a new guest config; AlreadyExists if the id is taken (atomic, race-free)."""
        temp = self._write_temp(guest)
        try:
            os.link(temp, self.path(guest.vmid))
        except FileExistsError:
            raise AlreadyExists(f"guest {guest.vmid} already exists") from None
        finally:
            temp.unlink()
        _fsync_dir(self.dir)

    def write(self, guest: Guest) -> None:
        """Replace a guest config atomically."""
        os.replace(self._write_temp(guest), self.path(guest.vmid))
        _fsync_dir(self.dir)

    def delete(self, vmid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(vmid).unlink()
            _fsync_dir(self.dir)

    def locked(self, vmid: int) -> contextlib.AbstractContextManager[None]:
        """Hold the guest's flock while its config is edited."""
        lock = self.dir / ".locks" / f"{names.vmid(vmid)}.lock"
        return file_lock(lock, self.lock_timeout, f"guest {vmid} config")

    @contextlib.contextmanager
    def editing(self, vmid: int) -> Iterator[builtins.list[Guest]]:
        """Read a guest under its flock; put a changed Guest into the list to write it back.

        Usage: `with store.editing(100) as box: box[0] = box[0].with_(lock="clone")`.
        """
        with self.locked(vmid):
            box = [self.read(vmid)]
            original = box[0]
            yield box
            if box[0] != original:
                self.write(box[0])
