"""The cluster config: one TOML file, found through STORK_CONFIG (default ./stork.toml).

Every key is declared below with its type; an unknown key, a wrong type or a bad value is a
ConfigError naming the file, the key and what was expected. Relative paths are relative to
the config file. STORK_REDIS_URL and STORK_NODE override the Redis URL and this node's name.
No two storages may share a directory (equal or nested), nor share one with paths.guests or paths.locks.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from drivers import names
from drivers.errors import ConfigError, InvalidName, NotFound

DEFAULT_PATH = "stork.toml"

DEFAULT_CONFIG = """\
# stork cluster config; see README.md "Configuration".
[redis]
url = "redis://127.0.0.1:6379/0"

[paths]
guests = "var/guests"   # guest configs; a shared directory in a cluster
locks = "var/lock"      # node-local lock files

[storage.local]
type = "dir"
path = "var/images"
content = ["images"]
"""


@dataclass(frozen=True)
class StorageConfig:
    id: str
    type: str
    path: Path
    content: tuple[str, ...] = ("images",)
    shared: bool = False
    nodes: tuple[str, ...] = ()  # empty: the storage exists on every node

    def on_node(self, node: str) -> bool:
        return self.shared or not self.nodes or node in self.nodes


@dataclass(frozen=True)
class Config:
    file: Path
    redis_url: str
    guests_dir: Path
    locks_dir: Path
    lock_timeout: float
    node: str
    storages: dict[str, StorageConfig]
    worker_concurrency: int = 4
    visibility_timeout: int = 43200
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    flower_basic_auth: str = field(default="", repr=False)

    def storage(self, storage_id: str) -> StorageConfig:
        names.storage_id(storage_id)
        try:
            return self.storages[storage_id]
        except KeyError:
            known = ", ".join(sorted(self.storages)) or "none"
            raise NotFound(f"unknown storage {storage_id!r} (configured: {known})") from None


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _pos_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _redis_url(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(("redis://", "rediss://", "unix://"))


def _port(v: Any) -> bool:
    return _pos_int(v) and v <= 65535


def _ip_address(v: Any) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return v == "localhost"


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_str(x) for x in v)


# section -> key -> (check, what was expected)
Check = tuple[Callable[[Any], bool], str]
SCHEMA: dict[str, dict[str, Check]] = {
    "redis": {"url": (_redis_url, "a redis://, rediss:// or unix:// URL")},
    "paths": {"guests": (_str, "a directory path"), "locks": (_str, "a directory path")},
    "locks": {"timeout": (_pos_num, "a number of seconds > 0")},
    "worker": {
        "concurrency": (_pos_int, "a whole number > 0"),
        "visibility_timeout": (_pos_int, "a whole number of seconds > 0"),
    },
    "flower": {
        "address": (_ip_address, "an IP address or localhost"),
        "port": (_port, "a port number (1-65535)"),
        "basic_auth": (_str, "user:password[,user:password...]"),
    },
}
STORAGE_TYPES = ("dir",)
STORAGE_SCHEMA: dict[str, Check] = {
    "type": (lambda v: v in STORAGE_TYPES, "one of: dir"),
    "path": (_str, "a directory path"),
    "content": (lambda v: _str_list(v) and set(v) <= {"images", "backup"}, 'a list of "images", "backup"'),
    "shared": (lambda v: isinstance(v, bool), "true or false"),
    "nodes": (lambda v: _str_list(v) and bool(v), "a non-empty list of node names"),
}
REQUIRED_STORAGE_KEYS = ("type", "path")


def _check_table(file: Path, prefix: str, table: Any, schema: dict[str, Check]) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: [{prefix}] must be a table")
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(
                f"{file}: unknown key {prefix}.{key} (expected one of: {', '.join(schema)})"
            )
        check, expected = schema[key]
        if not check(value):
            raise ConfigError(f"{file}: {prefix}.{key} = {value!r}: expected {expected}")


def _validate(file: Path, data: dict[str, Any]) -> None:
    for section, table in data.items():
        if section == "storage":
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [storage] must hold [storage.<id>] tables")
            for sid, entry in table.items():
                try:
                    names.storage_id(sid)
                except InvalidName as e:
                    raise ConfigError(f"{file}: [storage.{sid}]: {e}") from None
                _check_table(file, f"storage.{sid}", entry, STORAGE_SCHEMA)
                for key in REQUIRED_STORAGE_KEYS:
                    if key not in entry:
                        raise ConfigError(f"{file}: storage.{sid}.{key} is missing")
        elif section in SCHEMA:
            _check_table(file, section, table, SCHEMA[section])
        else:
            known = ", ".join([*SCHEMA, "storage"])
            raise ConfigError(f"{file}: unknown section [{section}] (expected one of: {known})")


def _overlaps(paths: Mapping[str, Path]) -> tuple[str, str] | None:
    """The first two names, in the given order, whose resolved paths are equal or one inside the other."""
    items = list(paths.items())
    for i, (a, path_a) in enumerate(items):
        for b, path_b in items[i + 1 :]:
            if path_a.is_relative_to(path_b) or path_b.is_relative_to(path_a):
                return a, b
    return None


# what a storage overlapping these directories would list or free
DIR_CONTENTS = {"paths.guests": "the guest configs", "paths.locks": "the lock files"}


def _overlap_error(file: Path, storages: Mapping[str, Path], dirs: Mapping[str, Path]) -> str | None:
    """The error for storages sharing a directory with each other or with `dirs` (key -> path), or None.

    The in-use checks compare volume ids, so one file reachable through two storage ids looks unused
    through the second one, and a free there deletes it.
    """
    if pair := _overlaps(storages):
        a, b = pair
        return (
            f"{file}: storages {a!r} and {b!r} overlap: {storages[a]} and {storages[b]} "
            "(a volume would have two ids; give each storage its own directory)"
        )
    for key, directory in dirs.items():
        for sid, path in storages.items():
            if _overlaps({sid: path, key: directory}):
                return (
                    f"{file}: storage {sid!r} and {key} overlap: {path} and {directory} "
                    f"(the storage could list or free {DIR_CONTENTS.get(key, key)}; "
                    "give each storage its own directory)"
                )
    return None


def parse(text: str, file: Path, env: Mapping[str, str] | None = None) -> Config:
    """Parse config text; `file` names it in errors and anchors relative paths."""
    env = os.environ if env is None else env
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}") from None
    _validate(file, data)
    base = file.parent

    def path(value: str) -> Path:
        return (base / value).resolve()

    storages = {
        sid: StorageConfig(
            id=sid,
            type=entry["type"],
            path=path(entry["path"]),
            content=tuple(entry.get("content", ["images"])),
            shared=entry.get("shared", False),
            nodes=tuple(entry.get("nodes", ())),
        )
        for sid, entry in data.get("storage", {}).items()
    }
    section = lambda name: data.get(name, {})  # noqa: E731
    node = env.get("STORK_NODE") or socket.gethostname().split(".")[0].lower()
    try:
        names.node(node)
    except InvalidName as e:
        raise ConfigError(f"{e} (from STORK_NODE or the host name)") from None
    flower = section("flower")
    guests_dir = path(section("paths").get("guests", "var/guests"))
    locks_dir = path(section("paths").get("locks", "var/lock"))
    # a storage type without a directory (none yet) has nothing to overlap
    storage_paths = {sid: p for sid, s in storages.items() if (p := getattr(s, "path", None)) is not None}
    error = _overlap_error(file, storage_paths, {"paths.guests": guests_dir, "paths.locks": locks_dir})
    if error:
        raise ConfigError(error)
    return Config(
        file=file,
        redis_url=env.get("STORK_REDIS_URL") or section("redis").get("url", "redis://127.0.0.1:6379/0"),
        guests_dir=guests_dir,
        locks_dir=locks_dir,
        lock_timeout=float(section("locks").get("timeout", 60)),
        node=node,
        storages=storages,
        worker_concurrency=section("worker").get("concurrency", 4),
        visibility_timeout=section("worker").get("visibility_timeout", 43200),
        flower_address=flower.get("address", "127.0.0.1"),
        flower_port=flower.get("port", 5555),
        flower_basic_auth=flower.get("basic_auth", ""),
    )


def redact(url: str) -> str:
    """A URL fit for messages and logs: any password replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("STORK_CONFIG") or DEFAULT_PATH).absolute()


def load(env: Mapping[str, str] | None = None) -> Config:
    """Load the config named by STORK_CONFIG (default ./stork.toml)."""
    file = config_path(env)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: config file not found (set STORK_CONFIG, or run 'make run' once to "
            "write the default)"
        ) from None
    return parse(text, file, env)


def write_default(file: Path) -> bool:
    """Write the default config (a `local` dir storage under ./var/) unless one exists."""
    if file.exists():
        return False
    file.write_text(DEFAULT_CONFIG)
    return True
