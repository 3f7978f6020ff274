"""The [redis] section: where Redis is (one URL, or the sentinels that know its master), who
each role of stork is to it (a Redis ACL user and its password), and TLS. Checked at load;
worker/connect.py builds the clients from it. Nothing here opens a connection.

    [redis]
    sentinels = ["10.0.0.1:26379", "10.0.0.2:26379", "10.0.0.3:26379"]  # instead of url
    master_name = "stork"
    tls = true                         # TLS to the sentinels and the master (rediss:// for a url)
    ca_file = "redis-ca.pem"           # the CA that signed their certificates
    cert_file = "stork-client.pem"     # a client certificate, for a Redis that asks for one
    key_file = "stork-client.key"      # (tls-auth-clients yes, Redis's default) and its key
    wait_replicas = 2                  # the number of replicas: records a step acts on wait for them (WAIT)
    [redis.users.worker]               # one Redis ACL user per role: worker, producer, operator
    user = "stork-worker"
    password_file = "redis-worker.pass"

A password comes from `password_file` (a file no other user can read) or inline `password`,
which load() refuses in a config file that every user of the machine can read. A client
certificate's key file, too, must be one that not every user can read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

from drivers.errors import ConfigError

# worker: the worker processes and beat; producer: whoever submits, reads and cancels jobs (the
# CLI, the Python client); operator: a read-only view (`stork job list`, the metrics endpoint)
ROLES = ("worker", "producer", "operator")
DEFAULT_URL = "redis://127.0.0.1:6379/0"
PASSWORD_FILE_MAX = 4096
URL_EXPECTED = ("a redis://, rediss:// or unix:// URL (port 1-65535, database a number, unix:// with a path; "
                "no password in its query: [redis.users.<role>] with a password_file)")
_QUERY_SECRETS = ("password", "ssl_password")  # redis-py takes both from a URL's query, its keys decoded


def _query_secret(item: str) -> bool:
    return unquote_plus(item.partition("=")[0]).lower() in _QUERY_SECRETS


def url_ok(v: Any) -> bool:
    """A URL redis-py can connect to: a port from 1 to 65535, a database number, a socket path."""
    if not isinstance(v, str):
        return False
    try:
        parts = urlsplit(v)
        port = parts.port  # ValueError when not a number from 0 to 65535
    except ValueError:
        return False
    if any(_query_secret(item) for item in parts.query.split("&")):  # unchecked, unredacted, in every line
        return False
    if parts.scheme == "unix":  # its database in the query (?db=N), as redis-py reads it
        dbs = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "db"]
        return bool(parts.path) and all(v.isascii() and v.isdigit() for v in dbs)
    db = parts.path.lstrip("/")
    return parts.scheme in ("redis", "rediss") and port != 0 and (not db or (db.isascii() and db.isdigit()))


def redact(url: str) -> str:
    """A URL fit for messages and logs: any password (before its host, or in its query) replaced by ***."""
    before, mark, query = url.partition("?")
    url = before + mark + "&".join(f"{item.partition('=')[0]}=***" if _query_secret(item) else item
                                   for item in query.split("&"))
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _host_port(v: Any) -> bool:
    if not isinstance(v, str) or v.count(":") != 1:
        return False
    host, _, port = v.partition(":")
    return bool(host) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and \
        not any(c.isspace() or c in "/@;?#" for c in host)


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and v.isprintable() and "\n" not in v


Check = tuple[Callable[[Any], bool], str]
SCHEMA: dict[str, Check] = {
    "url": (url_ok, URL_EXPECTED),
    "sentinels": (lambda v: isinstance(v, list) and bool(v) and all(_host_port(x) for x in v) and
                  len(set(v)) == len(v), 'a non-empty list of distinct "host:port" sentinels'),
    "master_name": (lambda v: _text(v) and " " not in v, "the name the sentinels monitor the master by"),
    "db": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1023, "a database number"),
    "tls": (lambda v: isinstance(v, bool), "true or false"),
    "ca_file": (_text, "a file path (PEM certificates)"),
    "cert_file": (_text, "a file path (the PEM client certificate Redis checks)"),
    "key_file": (_text, "a file path (the client certificate's PEM private key)"),
    "sentinel_user": (_text, "a user name"),
    "sentinel_password": (_text, "a password"),
    "sentinel_password_file": (_text, "a file path"),
    "wait_replicas": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16,
                      "a number of replicas from 0 to 16"),
    "users": (lambda v: isinstance(v, dict), "[redis.users.<role>] tables"),
}
LOGIN_SCHEMA: dict[str, Check] = {
    "user": (lambda v: isinstance(v, str) and bool(v) and v.isascii() and all(c.isalnum() or c in "._@-" for c in v),
             "a Redis user name (letters, digits, . _ @ -)"),
    "password": (_text, "a password"),
    "password_file": (_text, "a file path"),
}
SECRET_KEYS = ("sentinel_password", "password")  # never echoed in an error


@dataclass(frozen=True)
class Login:
    """Who a role is to Redis: None, None is Redis's default user without a password."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RedisSettings:
    # the one Redis, when there are no sentinels; it may hold a password: no repr
    url: str = field(default=DEFAULT_URL, repr=False)
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    db: int = 0
    tls: bool = False  # sentinels: TLS to them and to the master (a url says so by rediss://)
    ca_file: Path | None = None
    cert_file: Path | None = None  # a client certificate and its key (read through client_certificate())
    key_file: Path | None = None
    logins: Mapping[str, Login] = field(default_factory=dict, repr=False)  # role -> login; empty: the url's
    sentinel_login: Login = field(default_factory=Login, repr=False)
    wait_replicas: int = 0
    inline_secrets: tuple[str, ...] = ()  # the keys that hold a password in the config file itself

    def where(self) -> str:
        """Where Redis is, for messages and logs (no password)."""
        if self.sentinels:
            listed = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"Redis master {self.master_name!r} (sentinels {listed})"
        return f"Redis at {redact(self.url)}"

    def login(self, role: str) -> Login:
        """The role's login: its [redis.users.<role>], or the url's when no users are configured.
        ConfigError when users are configured but not this role (never a fallback to another)."""
        if not self.logins:
            parts = urlsplit(self.url)  # percent-encoded there, as redis-py decodes it
            return Login(unquote(parts.username) if parts.username else None,
                         unquote(parts.password) if parts.password else None)
        if role not in self.logins:
            raise ConfigError(f"no Redis user for the {role} role: add [redis.users.{role}] "
                              f"(configured: {', '.join(sorted(self.logins))})")
        return self.logins[role]


def _shown(key: str, value: Any) -> str:
    """The value as an error shows it: passwords hidden, a URL without its password."""
    if key in SECRET_KEYS:
        return "'***'"
    if key == "url" and isinstance(value, str):
        try:
            return repr(redact(value))
        except ValueError:  # not even a URL: nothing to redact reliably
            return "'***'"
    return repr(value)


def _check(file: Path, prefix: str, table: Any, schema: Mapping[str, Check]) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: [{prefix}] must be a table")
    for key, value in table.items():
        if key not in schema:
            raise ConfigError(f"{file}: unknown key {prefix}.{key} (expected one of: {', '.join(schema)})")
        check, expected = schema[key]
        if not check(value):
            raise ConfigError(f"{file}: {prefix}.{key} = {_shown(key, value)}: expected {expected}")


def validate(file: Path, table: Any) -> None:
    """Every key of [redis] and [redis.users.*] known and well-formed, and the combinations sound."""
    _check(file, "redis", table, SCHEMA)
    for role, entry in table.get("users", {}).items():
        if role not in ROLES:
            raise ConfigError(f"{file}: [redis.users.{role}]: unknown role (expected one of: {', '.join(ROLES)})")
        _check(file, f"redis.users.{role}", entry, LOGIN_SCHEMA)
        if "password" in entry and "password_file" in entry:
            raise ConfigError(f"{file}: redis.users.{role}: password and password_file both set (keep one)")
    if "sentinel_password" in table and "sentinel_password_file" in table:
        raise ConfigError(f"{file}: redis: sentinel_password and sentinel_password_file both set (keep one)")
    if "sentinels" in table:
        if "url" in table:
            raise ConfigError(f"{file}: redis.url and redis.sentinels both set: Redis is one or the other")
        if "master_name" not in table:
            raise ConfigError(f"{file}: redis.master_name is missing (the sentinels need the master's name)")
        if "wait_replicas" not in table:  # 0 unsaid would let a failover take back what a step acts on
            raise ConfigError(f"{file}: redis.wait_replicas is missing: with sentinels, set it to the number of "
                              "replicas (0 accepts that a failover can lose a job, or what a step saved before it "
                              "made or freed a volume; docs/redis.md)")
    tls = table.get("tls", False) if "sentinels" in table else urlsplit(table.get("url", "")).scheme == "rediss"
    for key in ("ca_file", "cert_file", "key_file"):
        if key in table and not tls:
            raise ConfigError(f"{file}: redis.{key}: only with TLS (a rediss:// url, or tls = true beside sentinels)")
    if ("cert_file" in table) != ("key_file" in table):
        given, missing = ("cert_file", "key_file") if "cert_file" in table else ("key_file", "cert_file")
        raise ConfigError(f"{file}: redis.{given} without redis.{missing}: a client certificate needs both")
    if "sentinels" not in table:
        for key in ("master_name", "db", "tls", "sentinel_user", "sentinel_password", "sentinel_password_file"):
            if key in table:
                raise ConfigError(f"{file}: redis.{key}: only with redis.sentinels "
                                  "(a url carries its database, and rediss:// for TLS)")


def read_secret(file: Path, key: str, path: Path) -> str:
    """The password in `path`: its first line. Refused unless it is a regular file that no
    other user can read (the check and the read on one descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{file}: {key} = {str(path)!r}: cannot read it: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before open(), which refuses a folder with a traceback's words
        os.close(fd)
        raise ConfigError(f"{file}: {key} = {str(path)!r}: not a regular file")
    with open(fd, "rb") as f:
        if st.st_mode & stat.S_IROTH:
            raise ConfigError(f"{file}: {key} = {str(path)!r}: every user of this machine can read it "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod o-r it")
        data = f.read(PASSWORD_FILE_MAX + 1)
    line = data.decode("utf-8", "replace").split("\n", 1)[0].strip()
    if len(data) > PASSWORD_FILE_MAX or not line:
        raise ConfigError(f"{file}: {key} = {str(path)!r}: expected one line holding the password")
    return line


PINNED_MAX = 1 << 20  # a PEM certificate or key is a few KiB
# (a checked file's path, whether it had to be private) -> its descriptor, device and inode: one
# PEM file may hold both certificate and key, and its check as the key must not be skipped
_pinned: dict[tuple[Path, bool], tuple[int, int, int]] = {}


def pinned(path: Path, key: str, private: bool = False) -> str:
    """The file at `path` as the TLS library is to open it: /proc/self/fd/N of a descriptor
    opened and checked here (a regular file, not huge; `private`: one that not every user can
    read), so the library reads the file that was checked, wherever the name leads later. One
    descriptor per path, kept for the process's life (a worker's pool processes inherit it);
    one found closed or reused (a process that closes every descriptor as it daemonizes) is
    opened and checked again. So a process keeps the certificate and key it started with, a
    matching pair: new ones at those paths are taken at its next start."""
    held = _pinned.get((path, private))
    if held is not None:
        fd, device, inode = held
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (device, inode):
                return f"/proc/self/fd/{fd}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{key} = {str(path)!r}: cannot read it: {e.strerror or e}") from None
    st = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"every user of this machine can read it (mode {stat.S_IMODE(st.st_mode):04o}): chmod o-r it"
               if private and st.st_mode & stat.S_IROTH else
               f"larger than {PINNED_MAX >> 20} MiB: not a PEM file" if st.st_size > PINNED_MAX else "")
    if problem:
        os.close(fd)
        raise ConfigError(f"{key} = {str(path)!r}: {problem}")
    _pinned[(path, private)] = (fd, st.st_dev, st.st_ino)
    return f"/proc/self/fd/{fd}"


def client_certificate(settings: RedisSettings) -> tuple[str, str] | None:
    """The client certificate and its key as the TLS library is to open them (`pinned`), or
    None where none is configured."""
    if settings.cert_file is None or settings.key_file is None:
        return None
    return pinned(settings.cert_file, "redis.cert_file"), pinned(settings.key_file, "redis.key_file", private=True)


def _login(file: Path, prefix: str, entry: Mapping[str, Any], path: Callable[[str], Path],
           user_key: str = "user", password_key: str = "password") -> Login:
    password = entry.get(password_key)
    if f"{password_key}_file" in entry:
        password = read_secret(file, f"{prefix}.{password_key}_file", path(entry[f"{password_key}_file"]))
    return Login(entry.get(user_key), password)


def parse(file: Path, table: Mapping[str, Any], env: Mapping[str, str], path: Callable[[str], Path]) -> RedisSettings:
    """The settings of a validated [redis] table; STORK_REDIS_URL overrides the url."""
    url = env.get("STORK_REDIS_URL") or table.get("url", DEFAULT_URL)
    if not url_ok(url):  # the file's was checked; this one came from the environment
        raise ConfigError(f"STORK_REDIS_URL = {_shown('url', url)}: expected {URL_EXPECTED}")
    users = table.get("users", {})
    if users and (urlsplit(url).username or urlsplit(url).password):
        # redis-py takes the URL's login over any it is given: stork's own client would log in
        # as the URL's user, and Celery's as the role's
        where = "STORK_REDIS_URL" if env.get("STORK_REDIS_URL") else "redis.url"
        raise ConfigError(f"{file}: {where} holds a login and [redis.users] are configured: keep one")
    inline = [f"redis.users.{role}.password" for role, entry in users.items() if "password" in entry]
    inline += ["redis.sentinel_password"] if "sentinel_password" in table else []
    inline += ["redis.url"] if urlsplit(table.get("url", "")).password else []
    sentinels = tuple((h, int(p)) for h, _, p in (s.partition(":") for s in table.get("sentinels", ())))
    if env.get("STORK_REDIS_URL"):  # one Redis: its URL's scheme says whether it is TLS
        sentinels = ()
    tls = table.get("tls", False) if sentinels else urlsplit(url).scheme == "rediss"
    settings = RedisSettings(
        url=url, sentinels=sentinels, master_name=table.get("master_name", ""),
        db=table.get("db", 0), tls=tls,
        ca_file=path(table["ca_file"]) if "ca_file" in table and tls else None,
        cert_file=path(table["cert_file"]) if "cert_file" in table and tls else None,
        key_file=path(table["key_file"]) if "key_file" in table and tls else None,
        logins={role: _login(file, f"redis.users.{role}", entry, path) for role, entry in users.items()},
        sentinel_login=_login(file, "redis", table, path, "sentinel_user", "sentinel_password"),
        wait_replicas=table.get("wait_replicas", 0), inline_secrets=tuple(inline),
    )
    try:
        client_certificate(settings)  # checked (and held) at load: a bad file is the config's error
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    return settings
