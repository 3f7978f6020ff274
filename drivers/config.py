"""The cluster config: one TOML file, found through STORK_CONFIG (default ./stork.toml).

Every key is declared below with its type; an unknown key, a wrong type or a bad value is a
ConfigError naming the file, the key and what was expected. Relative paths are relative to
the config file. STORK_REDIS_URL and STORK_NODE override the Redis URL and this node's name.
No two storages may share a directory (equal or nested), nor share one with paths.guests or paths.locks.
Values that parse but cannot work are refused too: the bounds below say why.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from drivers import BACKUP_STORAGES, STORAGE_TYPES, names, redis_settings
from drivers.backup import retention
from drivers.errors import ConfigError, InvalidName, NotFound
from drivers.redis_settings import RedisSettings
from drivers.safedir import kind_of
from drivers.storage import Option, StorageConfig, is_path_text

DEFAULT_PATH = "stork.toml"

DEFAULT_CONFIG = """\
# stork cluster config; see docs/configuration.md.
[redis]
url = "redis://127.0.0.1:6379/0"

[paths]
guests = "var/guests"   # guest configs; a shared directory in a cluster
locks = "var/lock"      # node-local lock files

[storage.local]
type = "dir"
path = "var/images"
content = ["images"]

[storage.backup]
type = "chunkstore"     # deduplicated backups; usually a shared directory in a cluster
path = "var/backup"
content = ["backup"]
"""


@dataclass(frozen=True)
class Config:
    file: Path
    guests_dir: Path
    locks_dir: Path
    lock_timeout: float
    node: str
    storages: dict[str, StorageConfig]
    worker_concurrency: int = 4
    visibility_timeout: int = 43200
    job_keep_days: int = 30  # [jobs] keep_days: how long a finished job's record and events stay
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9840
    flower_basic_auth: str = field(default="", repr=False)
    # [redis]: its url, or sentinels; a Redis user per role; TLS (drivers/redis_settings.py)
    redis: RedisSettings = field(default_factory=RedisSettings)

    @property
    def redis_url(self) -> str:
        """The one Redis's URL (redis.url, or STORK_REDIS_URL); unused where sentinels are named."""
        return self.redis.url
    # [schedule.<name>] tables as checked here, each with its action ("backup" where none is given),
    # and [sync.<name>] ones as "sync.<name>" (action "sync", storage: from, target: to); their
    # crontab lines are parsed by worker/jobs/schedules.py
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    # [notify.<name>] alert targets as checked here (worker/notify.py); they hold secrets
    notify: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    # [nodes.<name>] address: where the node serves volumes to the others (drivers/transfer.py)
    node_addresses: dict[str, str] = field(default_factory=dict)
    # [cluster] tls_psk_file: the cluster key that authenticates and encrypts transfers between nodes
    cluster_key: Path | None = None

    def address_of(self, node: str) -> str:
        """The address `node` serves volumes on: its [nodes.<name>] address, else 127.0.0.1
        (every node on one machine)."""
        return self.node_addresses.get(node, "127.0.0.1")

    def known_nodes(self) -> list[str]:
        """This node and every node a storage names: the cluster as the config knows it."""
        return sorted({self.node, *self.node_addresses, *(n for s in self.storages.values() for n in s.nodes)})

    def storage(self, storage_id: str) -> StorageConfig:
        names.storage_id(storage_id)
        try:
            return self.storages[storage_id]
        except KeyError:
            known = ", ".join(sorted(self.storages)) or "none"
            raise NotFound(f"unknown storage {storage_id!r} (configured: {known})") from None


# Bounds of values that parse but cannot work.
# A storage or guest-config lock is held for moments (never around a copy): waiting longer than
# an hour means a stuck holder, and the step should fail rather than hang.
LOCK_TIMEOUT_MAX = 3600
# Worker processes per node: each is a whole Python process with its Redis connections.
CONCURRENCY_MAX = 256
# The steps' time limits are 0.8x / 0.9x of the visibility timeout, and the longest step (a copy)
# must fit in them; above a week, a step whose worker died waits that long to be redelivered.
VISIBILITY_TIMEOUT_MIN = 600
VISIBILITY_TIMEOUT_MAX = 7 * 86400
# Finished jobs kept: each costs Redis about 5 KiB (docs/benchmarks.md); ten years is a bound, not advice.
KEEP_DAYS_MAX = 3650


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: _int(v) and low <= v <= high


def _lock_timeout(v: Any) -> bool:
    number = isinstance(v, int | float) and not isinstance(v, bool)
    return number and 0 < v <= LOCK_TIMEOUT_MAX  # NaN fails the range (math.isfinite overflows on a huge int)


def _ip_address(v: Any) -> bool:
    if not isinstance(v, str):  # ip_address(5) is 0.0.0.5: an integer is no address written in a config
        return False
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return v == "localhost"


def _basic_auth(v: Any) -> bool:
    """Flower compares "user:password" as a whole: an entry without both logs nobody in."""
    return _str(v) and all(user and password for user, _, password in (e.partition(":") for e in v.split(",")))


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_str(x) for x in v)


def _named(check: Callable[[Any], object], v: Any) -> bool:
    """Whether a names.* check takes `v` (it raises InvalidName where it does not)."""
    try:
        check(v)
        return True
    except InvalidName:
        return False


def _node_names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_named(names.node, x) for x in v) and len(set(v)) == len(v)


# section -> key -> (check, what was expected)
Check = tuple[Callable[[Any], bool], str]
SCHEMA: dict[str, dict[str, Check]] = {
    "paths": {"guests": (is_path_text, "a directory path"), "locks": (is_path_text, "a directory path")},
    "locks": {"timeout": (_lock_timeout, f"a number of seconds > 0 and <= {LOCK_TIMEOUT_MAX}")},
    "worker": {
        "concurrency": (_int_in(1, CONCURRENCY_MAX), f"a whole number from 1 to {CONCURRENCY_MAX}"),
        "visibility_timeout": (
            _int_in(VISIBILITY_TIMEOUT_MIN, VISIBILITY_TIMEOUT_MAX),
            f"a whole number of seconds from {VISIBILITY_TIMEOUT_MIN} (a task must fit in 0.8x of it) "
            f"to {VISIBILITY_TIMEOUT_MAX} (7 days)",
        ),
    },
    "jobs": {"keep_days": (_int_in(1, KEEP_DAYS_MAX), f"a whole number of days from 1 to {KEEP_DAYS_MAX}")},
    "flower": {
        "address": (_ip_address, "an IP address or localhost"),
        "port": (_int_in(1, 65535), "a port number (1-65535)"),
        "basic_auth": (_basic_auth, "user:password[,user:password...], each with a user and a password"),
    },
    # the node's Prometheus endpoint (worker/run/metrics.py)
    "metrics": {
        "address": (_ip_address, "an IP address or localhost"),
        "port": (_int_in(1, 65535), "a port number (1-65535)"),
    },
    # what the nodes share to move volumes between them (drivers/transfer.py)
    "cluster": {"tls_psk_file": (is_path_text, "a file path (the cluster key, 'stork cluster key' makes one)")},
}
# [nodes.<name>]: where each node is reached by the others
NODE_SCHEMA: dict[str, Check] = {"address": (lambda v: _ip_address(v) and v != "localhost", "an IP address")}
SECRET_KEYS = ("flower.basic_auth",)  # never echoed in an error


def _guest_list(v: Any) -> bool:
    return isinstance(v, list) and all(_int(x) and names.VMID_MIN <= x <= names.VMID_MAX for x in v) and \
        len(set(v)) == len(v)


# A schedule (run by Celery beat, worker/jobs/schedules.py); `schedule` is a crontab line of five
# fields (minute hour day-of-month month day-of-week), parsed by Celery's crontab. Its `action`
# backs up guests (the default), verifies or collects the garbage of a backup storage.
ACTIONS = ("backup", "verify", "gc")
_COMMON: dict[str, Check] = {
    "schedule": (lambda v: _str(v) and len(v.split()) == 5, 'a crontab line of five fields, e.g. "0 2 * * *"'),
    "guests": (lambda v: v == "all" or (_guest_list(v) and bool(v)), '"all" or a non-empty list of guest ids'),
    "exclude": (_guest_list, "a list of guest ids"),
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
    **{f"keep-{period}": (_int_in(0, 1_000_000), "a whole number from 0")
       for period in retention.OPTIONS},
}
_STORAGE_ID: Check = (lambda v: _str(v) and _named(names.storage_id, v), "a storage id")
SCHEDULE_SCHEMA: dict[str, Check] = {
    **_COMMON,
    "action": (lambda v: v in ACTIONS, " or ".join(f'"{a}"' for a in ACTIONS)),
    "storage": _STORAGE_ID,
    "reverify-after": (_int_in(0, 36500), "a whole number of days from 0"),
}
# An offsite copy on a schedule: [sync.<name>], `from` one backup storage `to` another, kept in
# Config.schedules as "sync.<name>" with action "sync", storage (from) and target (to).
SYNC_SCHEMA: dict[str, Check] = {**{k: c for k, c in _COMMON.items() if k != "exclude"},
                                 "from": _STORAGE_ID, "to": _STORAGE_ID,
                                 "reencrypt": (lambda v: isinstance(v, bool), "true or false")}
_BACKUP_ONLY = ("guests", "exclude", *(f"keep-{period}" for period in retention.OPTIONS))

# Where alerts go (worker/notify.py): [notify.<name>], a webhook (a JSON POST signed with the
# shared secret) or a mailbox through SMTP, for the events it lists (default: all).
NOTIFY_EVENTS = ("job-failed", "schedule-failed", "backup-damaged", "backup-stale")


def _http_url(v: Any) -> bool:
    if not _str(v):
        return False
    try:
        parts = urlsplit(v)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0 and \
            "@" not in parts.netloc  # a login before the host would be shown where the URL is
    except ValueError:
        return False


def _address(v: Any) -> bool:
    return _str(v) and v.count("@") == 1 and not any(c.isspace() or c in "<>,;" for c in v)


NOTIFY_SCHEMA: dict[str, Check] = {
    "type": (lambda v: v in ("webhook", "smtp"), '"webhook" or "smtp"'),
    "events": (lambda v: isinstance(v, list) and bool(v) and all(e in NOTIFY_EVENTS for e in v),
               f"a list of events from: {', '.join(NOTIFY_EVENTS)}"),
    "stale-after": (_int_in(1, 24 * 366), "a whole number of hours: a guest whose newest backup is older is news"),
    "url": (_http_url, "an http:// or https:// URL, with no login before its host (secret signs each request)"),
    "secret": (_str, "the shared secret the signature header is made with"),
    "host": (lambda v: _str(v) and not any(c.isspace() for c in v), "a host name or address"),
    "port": (_int_in(1, 65535), "a port number"),
    "from": (_address, "a mail address"),
    "to": (lambda v: isinstance(v, list) and bool(v) and all(_address(a) for a in v), "a list of mail addresses"),
    "username": (_str, "a user name"),
    "password": (_str, "a password"),
    "starttls": (lambda v: isinstance(v, bool), "true or false"),
}
_NOTIFY_KEYS = {"webhook": ("url",), "smtp": ("host", "from", "to")}  # required, beside type
_NOTIFY_ONLY = {"webhook": ("url", "secret"), "smtp": ("host", "port", "from", "to", "username", "password",
                                                       "starttls")}


def _check_notify(file: Path, name: str, entry: Any) -> None:
    prefix = f"notify.{name}"
    if not _named(names.storage_id, name):
        raise ConfigError(f"{file}: [{prefix}]: invalid notify name (a lower-case letter, then a-z 0-9 _ -)")
    _check_table(file, prefix, entry, NOTIFY_SCHEMA)
    if "type" not in entry:
        raise ConfigError(f"{file}: {prefix}.type is missing ({NOTIFY_SCHEMA['type'][1]})")
    kind = entry["type"]
    for key in _NOTIFY_KEYS[kind]:
        if key not in entry:
            raise ConfigError(f"{file}: {prefix}.{key} is missing ({NOTIFY_SCHEMA[key][1]})")
    other = next((k for k in entry if k not in ("type", "events", "stale-after", *_NOTIFY_ONLY[kind])), None)
    if other:
        raise ConfigError(f"{file}: {prefix}.{other}: not a key of a {kind} target")
    if "backup-stale" in entry.get("events", ()) and "stale-after" not in entry:
        raise ConfigError(f"{file}: {prefix}: the event backup-stale needs stale-after (hours)")
    if kind == "smtp" and ("username" in entry or "password" in entry) and not entry.get("starttls"):
        raise ConfigError(f"{file}: {prefix}: a login is sent only over TLS: set starttls = true")


# The keys every storage has; its driver's own (Driver.OPTIONS) come on top.
STORAGE_SCHEMA: dict[str, Check] = {
    "type": (lambda v: isinstance(v, str) and v in STORAGE_TYPES, ""),  # message: _check_storage
    "content": (
        lambda v: _str_list(v) and bool(v) and set(v) <= {"images", "backup"},
        'a non-empty list of "images", "backup"',
    ),
    "shared": (lambda v: isinstance(v, bool), "true or false"),
    "nodes": (
        _node_names,
        "a non-empty list of distinct node names (a lower-case letter, then up to 39 of a-z 0-9 _ -)",
    ),
}


def _options(type_name: str) -> Mapping[str, Option]:
    """A storage type's own options, from the driver registry (importing that backend only)."""
    return STORAGE_TYPES[type_name].OPTIONS  # type: ignore[no-any-return]




def _shown(key: str, value: Any) -> str:
    """The value as an error shows it: secrets hidden, a Redis URL without its password."""
    if key in SECRET_KEYS or (key.startswith("notify.") and key.rpartition(".")[2] in ("secret", "password", "url")):
        return "'***'"  # an alert target's URL may carry a token in its path or query
    return repr(value)


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
            raise ConfigError(f"{file}: {prefix}.{key} = {_shown(f'{prefix}.{key}', value)}: expected {expected}")


def _check_storage(file: Path, sid: str, entry: Any) -> None:
    try:
        names.storage_id(sid)
    except InvalidName as e:
        raise ConfigError(f"{file}: [storage.{sid}]: {e}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{file}: [storage.{sid}] must be a table")
    if "type" not in entry:
        raise ConfigError(f"{file}: storage.{sid}.type is missing")
    if not STORAGE_SCHEMA["type"][0](entry["type"]):
        raise ConfigError(f"{file}: storage.{sid}.type = {entry['type']!r}: expected one of: "
                          f"{', '.join(STORAGE_TYPES)}")
    kind = entry["type"]
    options = _options(kind)
    schema = {**STORAGE_SCHEMA, **{key: (o.check, o.expected) for key, o in options.items()}}
    _check_table(file, f"storage.{sid}", entry, schema)
    for key, option in options.items():
        if option.required and key not in entry:
            kind = entry["type"]
            raise ConfigError(f"{file}: storage.{sid}.{key} is missing ({kind} storage needs {option.expected})")
    if not set(entry.get("content", ())) <= STORAGE_TYPES[kind].CONTENT:
        holds = ", ".join(sorted(STORAGE_TYPES[kind].CONTENT))
        raise ConfigError(f"{file}: storage.{sid}.content = {entry['content']!r}: a {kind} storage holds {holds} "
                          '(backups go to a storage of type = "chunkstore", images to the others)')
    if STORAGE_TYPES[kind].always_shared and entry.get("shared") is False:
        raise ConfigError(f"{file}: storage.{sid}.shared = false: {kind} storage is seen by every node "
                          "(leave shared out, or set it true)")
    if (entry.get("shared") or STORAGE_TYPES[kind].always_shared) and "nodes" in entry:
        # on_node() ignores nodes for a shared storage: it would be used where the list says it is not
        raise ConfigError(
            f"{file}: storage.{sid}.nodes: expected no nodes on a shared storage "
            "(it exists on every node; nodes is for shared = false)"
        )


def _check_schedule(file: Path, section: str, name: str, entry: Any) -> None:
    prefix = f"{section}.{name}"
    if not _named(names.storage_id, name):
        raise ConfigError(f"{file}: [{prefix}]: invalid {section} name (a lower-case letter, then a-z 0-9 _ -)")
    schema = SYNC_SCHEMA if section == "sync" else SCHEDULE_SCHEMA
    _check_table(file, prefix, entry, schema)
    action = entry.get("action", "backup")
    required = ("schedule", "from", "to") if section == "sync" else \
        ("schedule", "guests") if action == "backup" else ("schedule",)
    for key in required:
        if key not in entry:
            raise ConfigError(f"{file}: {prefix}.{key} is missing ({schema[key][1]})")
    if section == "schedule" and action != "backup" and (key := next((k for k in _BACKUP_ONLY if k in entry), None)):
        raise ConfigError(f"{file}: {prefix}.{key}: only with action = \"backup\" (this one is {action!r})")
    if "reverify-after" in entry and action != "verify":
        raise ConfigError(f"{file}: {prefix}.reverify-after: only with action = \"verify\"")
    if "exclude" in entry and entry.get("guests", "all") != "all":
        raise ConfigError(f"{file}: {prefix}.exclude: only with guests = \"all\"")


def _storage(sid: str, entry: dict[str, Any], path: Callable[[str], Path]) -> StorageConfig:
    """A checked [storage.<id>] table as a StorageConfig: its driver's options with defaults."""
    options = {}
    for key, option in _options(entry["type"]).items():
        value = entry.get(key, option.default)
        if value is not None:
            options[key] = path(value) if option.is_path else value
    kind = STORAGE_TYPES[entry["type"]]
    return StorageConfig(id=sid, type=entry["type"], content=tuple(entry.get("content", sorted(kind.CONTENT))),
                         shared=entry.get("shared", kind.always_shared),
                         nodes=tuple(entry.get("nodes", ())), options=options)


def _validate(file: Path, data: dict[str, Any]) -> None:
    for section, table in data.items():
        if section == "storage":
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [storage] must hold [storage.<id>] tables")
            for sid, entry in table.items():
                _check_storage(file, sid, entry)
        elif section == "notify":
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [notify] must hold [notify.<name>] tables")
            for name, entry in table.items():
                _check_notify(file, name, entry)
        elif section == "nodes":
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [nodes] must hold [nodes.<name>] tables")
            for name, entry in table.items():
                if not _named(names.node, name):
                    raise ConfigError(f"{file}: [nodes.{name}]: invalid node name (a lower-case letter, then up to "
                                      "39 of a-z 0-9 _ -)")
                _check_table(file, f"nodes.{name}", entry, NODE_SCHEMA)
        elif section in ("schedule", "sync"):
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [{section}] must hold [{section}.<name>] tables")
            for name, entry in table.items():
                _check_schedule(file, section, name, entry)
        elif section == "redis":
            redis_settings.validate(file, table)
        elif section in SCHEMA:
            _check_table(file, section, table, SCHEMA[section])
        else:
            known = ", ".join(["redis", *SCHEMA, "storage", "nodes", "schedule", "sync", "notify"])
            raise ConfigError(f"{file}: unknown section [{section}] (expected one of: {known})")


def _overlaps(paths: Mapping[str, Path]) -> tuple[str, str] | None:
    """The first two names, in the given order, whose resolved paths are equal or one inside the
    other, by name or as the file system sees them (a bind mount: another path, one directory)."""
    items = list(paths.items())
    chains = {name: _identities(path) for name, path in items}  # each path's and its parents', once
    for i, (a, path_a) in enumerate(items):
        for b, path_b in items[i + 1 :]:
            if path_a.is_relative_to(path_b) or path_b.is_relative_to(path_a) \
                    or _inside(chains[a], chains[b]) or _inside(chains[b], chains[a]):
                return a, b
    return None


def _identities(path: Path) -> list[tuple[int, int] | None]:
    """(device, inode) of the path and of each directory above it; None for one not there yet
    (only its name can overlap)."""
    found: list[tuple[int, int] | None] = []
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino))
    return found


def _inside(inner: list[tuple[int, int] | None], outer: list[tuple[int, int] | None]) -> bool:
    """Whether the first path, or a directory above it, is the second one (device and inode)."""
    return outer[0] is not None and outer[0] in inner


def _nested(places: Mapping[str, str]) -> tuple[str, str] | None:
    """The first two storages whose places (Driver.place) are equal or one inside the other."""
    items = list(places.items())
    for i, (a, place_a) in enumerate(items):
        for b, place_b in items[i + 1:]:
            if place_a == place_b or place_a.startswith(place_b + "/") or place_b.startswith(place_a + "/"):
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
    except ValueError as e:  # an integer of more digits than Python converts
        raise ConfigError(f"{file}: not read: {str(e)[:200]}") from None
    except RecursionError:
        raise ConfigError(f"{file}: not read: nested too deeply") from None
    _validate(file, data)
    base = file.parent

    def path(value: str) -> Path:
        return (base / value).resolve()

    storages = {sid: _storage(sid, entry, path) for sid, entry in data.get("storage", {}).items()}
    section = lambda name: data.get(name, {})  # noqa: E731
    node = env.get("STORK_NODE") or socket.gethostname().split(".")[0].lower()
    try:
        names.node(node)
    except InvalidName as e:
        raise ConfigError(f"{e} (from STORK_NODE or the host name)") from None
    redis = redis_settings.parse(file, section("redis"), env, path)
    flower = section("flower")
    guests_dir = path(section("paths").get("guests", "var/guests"))
    locks_dir = path(section("paths").get("locks", "var/lock"))
    # a storage type without a directory (a VG, a pool) has nothing to overlap
    storage_paths = {sid: p for sid, s in storages.items() if (p := s.path) is not None}
    error = _overlap_error(file, storage_paths, {"paths.guests": guests_dir, "paths.locks": locks_dir})
    if error:
        raise ConfigError(error)
    schedules = {name: {"action": "backup", **entry} for name, entry in section("schedule").items()}
    for name, entry in section("sync").items():
        rest = {k: v for k, v in entry.items() if k not in ("from", "to")}
        schedules[f"sync.{name}"] = {"action": "sync", "guests": "all", "storage": entry["from"], "target": entry["to"],
                                     **rest}
    for name, schedule in schedules.items():
        for key, sid in (("storage", schedule.get("storage")), ("target", schedule.get("target"))):
            if sid is not None and (sid not in storages or storages[sid].type not in BACKUP_STORAGES):
                shown = f"sync.{name[5:]}.{'from' if key == 'storage' else 'to'}" if schedule["action"] == "sync" \
                    else f"schedule.{name}.{key}"
                raise ConfigError(f"{file}: {shown} = {sid!r}: expected a backup storage "
                                  f"(type = \"chunkstore\") of this config")
        if schedule["action"] == "sync" and schedule["storage"] == schedule["target"]:
            raise ConfigError(f"{file}: {name}: from and to name the same storage {schedule['storage']!r}")
    places = {sid: place for sid, s in storages.items() if (place := STORAGE_TYPES[s.type].place(s))}
    if pair := _nested(places):
        a, b = pair
        raise ConfigError(f"{file}: storages {a!r} and {b!r} overlap: {places[a]} and {places[b]} "
                          "(a volume would have two ids; give each storage its own pool or namespace)")
    return Config(
        file=file,
        redis=redis,
        guests_dir=guests_dir,
        locks_dir=locks_dir,
        lock_timeout=float(section("locks").get("timeout", 60)),
        node=node,
        storages=storages,
        worker_concurrency=section("worker").get("concurrency", 4),
        visibility_timeout=section("worker").get("visibility_timeout", 43200),
        job_keep_days=section("jobs").get("keep_days", 30),
        flower_address=flower.get("address", "127.0.0.1"),
        flower_port=flower.get("port", 5555),
        metrics_address=section("metrics").get("address", "127.0.0.1"),
        metrics_port=section("metrics").get("port", 9840),
        flower_basic_auth=flower.get("basic_auth", ""),
        schedules=schedules,
        notify=dict(section("notify")),
        node_addresses={name: entry["address"] for name, entry in section("nodes").items() if "address" in entry},
        cluster_key=path(key) if (key := section("cluster").get("tls_psk_file")) else None,
    )


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("STORK_CONFIG") or DEFAULT_PATH).absolute()


def load(env: Mapping[str, str] | None = None) -> Config:
    """Load the config named by STORK_CONFIG (default ./stork.toml)."""
    file = config_path(env)
    limit = 1 << 20  # a config is a few KiB: more is some other file, not read whole into memory
    # O_NONBLOCK: a FIFO at the name must not hang a command, nor a worker's step that reloads the file.
    # A symlink is followed (a config may be linked from a shared place); the opened file is what is checked.
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(file):
            raise ConfigError(
                f"{file}: config file not found: it is a symlink to {os.readlink(file)}, which does not exist"
            ) from None
        raise ConfigError(
            f"{file}: config file not found (set STORK_CONFIG, or run 'make run' once to "
            "write the default)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{file}: cannot read the config file: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        # a directory, FIFO or device reads as an error, as empty or without end: never taken for a config
        raise ConfigError(f"{file}: cannot read the config file: it is {kind_of(mode)}, not a regular file")
    with open(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise ConfigError(f"{file}: cannot read the config file: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{file}: cannot read the config file: larger than {limit >> 20} MiB, not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not valid TOML: not UTF-8 text") from None
    cfg = parse(text, file, env)
    if mode & stat.S_IROTH and (secrets := inline_secrets(cfg)):
        raise ConfigError(f"{file}: holds {', '.join(secrets)} but every user of this machine can read it "
                          f"(mode {stat.S_IMODE(mode):04o}): chmod o-r it")
    return cfg


def inline_secrets(cfg: Config) -> list[str]:
    """The keys of the config file that hold a password or a shared secret themselves."""
    found = list(cfg.redis.inline_secrets) + (["flower.basic_auth"] if cfg.flower_basic_auth else [])
    return found + [f"notify.{name}.{key}" for name, entry in cfg.notify.items()
                    for key in ("secret", "password") if key in entry]


# Config field -> the key it comes from, as an operator names it (storages are storage.<id>)
FIELD_KEYS = {
    "redis_url": "redis.url",
    "redis": "redis",
    "node": "STORK_NODE",
    "guests_dir": "paths.guests",
    "locks_dir": "paths.locks",
    "lock_timeout": "locks.timeout",
    "worker_concurrency": "worker.concurrency",
    "visibility_timeout": "worker.visibility_timeout",
    "job_keep_days": "jobs.keep_days",
    "flower_address": "flower.address",
    "flower_port": "flower.port",
    "metrics_address": "metrics.address",
    "metrics_port": "metrics.port",
    "flower_basic_auth": "flower.basic_auth",
    "node_addresses": "nodes",
    "cluster_key": "cluster.tls_psk_file",
}


def _compared(cfg: Config, name: str) -> Any:
    """The field as changed_keys compares it: [redis] without its url, which redis.url names."""
    value = getattr(cfg, name)
    return dataclasses.replace(value, url="") if name == "redis" else value


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose values differ between two configs, in FIELD_KEYS order, then storage.<id>,
    schedule.<name> (sync.<name>) and notify.<name> by id."""
    keys = [key for name, key in FIELD_KEYS.items() if _compared(old, name) != _compared(new, name)]
    ids = sorted(old.storages.keys() | new.storages.keys())
    names_ = sorted(old.schedules.keys() | new.schedules.keys())
    return keys + [f"storage.{sid}" for sid in ids if old.storages.get(sid) != new.storages.get(sid)] + \
        [n if n.startswith("sync.") else f"schedule.{n}"
         for n in names_ if old.schedules.get(n) != new.schedules.get(n)] + \
        [f"notify.{n}" for n in sorted(old.notify.keys() | new.notify.keys()) if old.notify.get(n) != new.notify.get(n)]


def write_default(file: Path) -> bool:
    """Write the default config (a `local` dir storage under ./var/) unless one exists."""
    if file.exists():
        return False
    file.write_text(DEFAULT_CONFIG)
    return True
