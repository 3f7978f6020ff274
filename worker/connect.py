"""How every stork process reaches Redis: one URL, or the master its sentinels name; as the
Redis user of the process's role; over TLS where configured (drivers/redis_settings.py).

Two kinds of client come out of one config, and both fail over the same way:
- stork's own (job records, Lua transitions, events, leases, schedules): redis-py; with
  sentinels, `Sentinel(...).master_for(...)`, whose connections ask the sentinels for the
  master each time they connect, and drop a connection that finds a demoted master
  (READONLY) so the retry reaches the new one;
- Celery's broker: kombu's `sentinel://` transport (stork's subclass, worker/failover.py)
  with `master_name`. Its channels retry on the same errors (`broker_channel_error_retry`,
  celery#7946), and socket timeouts and TCP keepalive make a master that stopped answering
  (a hung host, no RST) an error within seconds instead of a hang (celery#6348: a lost
  connection is not a refused one).

A process's role comes from STORK_ROLE, else from what the process is: a worker or beat is
`worker`, the CLI and the Python client `producer`.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import redis
import structlog
from redis._parsers.base import BaseParser
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from drivers.errors import ConfigError
from drivers.redis_settings import ROLES, Login, RedisSettings, client_certificate


class NoReplicasError(redis.ConnectionError):
    """NOREPLICAS: the master refuses writes until a replica is with it (min-replicas-to-write),
    as a new master does for a moment after a failover. Nothing was written: like a lost
    connection, it is retried (redis-py and kombu retry connection errors), not a failure."""


def _master_state_usable(self: Sentinel, state: dict[str, Any], service_name: str) -> bool:
    """redis-py's check, and not a master whose failover is in progress: the sentinel leading
    a failover names the old master in SENTINEL MASTERS until every replica follows the new
    one (seconds to tens of seconds), and a client sent there meets NOREPLICAS, then READONLY,
    for that long. The other sentinels name the new master meanwhile."""
    return _redis_check_master_state(self, state, service_name) and "failover_in_progress" not in state["flags"]


# Two corrections to redis-py, for every client in the process, kombu's included (it builds its
# own Sentinel and pools, with no hook for either): the error class of NOREPLICAS (redis-py
# picks a class by an error's first word, from its parser's table), and the master check.
BaseParser.EXCEPTION_CLASSES["NOREPLICAS"] = NoReplicasError
_redis_check_master_state = Sentinel.check_master_state
Sentinel.check_master_state = _master_state_usable  # type: ignore[method-assign]


class MasterConnection(SentinelManagedConnection):
    """A connection to the master the sentinels name *now*, on every (re)connect. redis-py's
    own asks them only for a connection new to the pool: a command retried after a failover
    reconnects to the host it had, the old master, and fails there until its retries run out."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self._sock:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class MasterSSLConnection(MasterConnection, SSLConnection):
    pass


class MasterPool(SentinelConnectionPool):
    """A pool that asks the sentinels who the master is at most once per DISCOVERY_INTERVAL as
    it hands out a connection, and drops connections to any other host. A demoted master still
    answers reads (as a replica, a step behind): without this a client that only reads would
    be served from it until its first write meets READONLY."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asked = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._asked > DISCOVERY_INTERVAL:
            self._asked = now
            try:
                self.get_master_address()  # a new master: idle connections are dropped
            except redis.RedisError:  # none named a master now: the connect says so if it matters
                if time.monotonic() - now > SENTINEL_TIMEOUT:  # they did not even answer: do not
                    self._asked = now + SENTINELS_AWAY  # stall every command on them, ask in a while
        connection = super().get_connection(*args, **kwargs)
        if self.master_address and (connection.host, connection.port) != self.master_address:
            connection.disconnect()  # reconnects to the master on its first command
        return connection


log = structlog.get_logger("stork.connect")
SENTINELS_AWAY = 10.0  # seconds before a client that found no sentinel asks again while it runs
SENTINEL_TIMEOUT = 1.0  # a sentinel answers from memory: one that takes longer is away
DISCOVERY_INTERVAL = 1.0  # seconds a client goes on with the master it knows before asking the sentinels again
SOCKET_TIMEOUT = 10.0  # above any blocking read stork or kombu makes (1-2 s), far below a step
CONNECT_TIMEOUT = 5.0
HEALTH_CHECK = 10  # seconds a pooled connection may sit idle before a PING checks it
WAIT_TIMEOUT_MS = 2000  # how long one WAIT waits for the replicas
REPLICATION_PATIENCE = 60.0  # seconds a write is made again until the replicas hold it


def role(default: str) -> str:
    """This process's role: STORK_ROLE, else `default`."""
    name = os.environ.get("STORK_ROLE") or default
    if name not in ROLES:
        raise ConfigError(f"STORK_ROLE = {name!r}: expected one of: {', '.join(ROLES)}")
    return name


def _keepalive() -> dict[int, int]:
    """TCP keepalive that notices a dead peer within about 10 s of silence (Linux)."""
    options = {}
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def _tls(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's TLS arguments: the server's certificate checked against the CA file (or the
    system's CAs), and its host name; this client's certificate where one is configured."""
    if not (settings.tls if settings.sentinels else urlsplit(settings.url).scheme == "rediss"):
        return {}
    found: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.ca_file:
        found["ssl_ca_certs"] = str(settings.ca_file)
    if (certificate := client_certificate(settings)) is not None:
        found["ssl_certfile"], found["ssl_keyfile"] = certificate
    return found


def _auth(login: Login) -> dict[str, Any]:
    return {k: v for k, v in (("username", login.user), ("password", login.password)) if v is not None}


def sentinel_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """How every client talks to the sentinels themselves: their login (redis.sentinel_user /
    sentinel_password), TLS as for the members, and short timeouts (a sentinel answers from
    memory: one that takes longer is away, and the next is asked)."""
    options = {k: v for k, v in client_options(settings).items() if k != "health_check_interval"}
    return {**options, "socket_timeout": SENTINEL_TIMEOUT, "socket_connect_timeout": SENTINEL_TIMEOUT,
            **_auth(settings.sentinel_login)}


def client_options(settings: RedisSettings) -> dict[str, Any]:
    """Socket behaviour every connection of stork's own client gets."""
    return {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_keepalive": True, "socket_keepalive_options": _keepalive(),
            "health_check_interval": HEALTH_CHECK, **_tls(settings)}


def client(settings: RedisSettings, role_name: str, retry: Retry | None = None, **extra: Any) -> redis.Redis:
    """A client of stork's own keys, as `role_name`, retrying connection errors and timeouts
    with `retry`. The default suits a command line: a few quick tries at one Redis, and some
    15 s (a failover's length) where sentinels name the master."""
    if retry is None:
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=12 if settings.sentinels else 3)
    options: dict[str, Any] = {
        **client_options(settings), **_auth(settings.login(role_name)), "decode_responses": True, "retry": retry,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError], **extra,
    }
    if not settings.sentinels:
        options.pop("ssl", None)  # rediss:// says so, and picks the connection class
        if urlsplit(settings.url).scheme == "unix":  # a socket has no TCP keepalive (redis-py refuses the options)
            options.pop("socket_keepalive")
            options.pop("socket_keepalive_options")
        return redis.Redis.from_url(settings.url, **options)
    sentinels = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_kwargs(settings),
                         **{k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))})
    connection_class = MasterSSLConnection if options.pop("ssl", False) else MasterConnection
    return sentinels.master_for(settings.master_name, connection_pool_class=MasterPool, db=settings.db,
                                connection_class=connection_class, **options)


def _url(settings: RedisSettings, login: Login) -> str:
    """kombu's URL: the url with the role's login, or one sentinel:// per sentinel."""
    auth = ""
    if login.user or login.password:
        auth = f"{quote(login.user or '', safe='')}{':' + quote(login.password, safe='') if login.password else ''}@"
    if settings.sentinels:
        return ";".join(f"sentinel://{auth}{host}:{port}/{settings.db}" for host, port in settings.sentinels)
    parts = urlsplit(settings.url)
    if parts.scheme == "unix":  # kombu has no unix://: its name is redis+socket://, the database its virtual host
        db = next((v for k, v in parse_qsl(parts.query) if k == "db"), "0")
        return f"redis+socket://{auth}{parts.path}?virtual_host={db}"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or "127.0.0.1"
    netloc = f"{auth}{host}{':' + str(parts.port) if parts.port else ''}"
    return urlunsplit(parts._replace(netloc=netloc))


def _use_stork_transports() -> None:
    """kombu picks a connection's transport by its URL's scheme, and again on each switch to the
    next sentinel's URL after a lost connection: its schemes name stork's transports
    (worker/failover.py) in a process that makes a Celery app, or the first failover would hand
    a worker back to kombu's own. (The schemes stay kombu's: its Sentinel channel reads the
    sentinels from URLs named sentinel://, and Flower knows brokers by them.) Done here, where
    every app's settings are made, not on import: a client that only reads needs no kombu."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES.update({"redis": "worker.failover:Transport", "rediss": "worker.failover:Transport",
                              "sentinel": "worker.failover:SentinelTransport"})


def celery_settings(settings: RedisSettings, role_name: str, visibility_timeout: int) -> dict[str, Any]:
    """The Celery app's broker settings for this Redis and role."""
    _use_stork_transports()
    options: dict[str, Any] = {
        "visibility_timeout": visibility_timeout, "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT, "socket_keepalive": True,
        "socket_keepalive_options": _keepalive(), "health_check_interval": HEALTH_CHECK,
        "retry_on_timeout": True,
    }
    if settings.sentinels:
        options["master_name"] = settings.master_name
        options["sentinel_kwargs"] = sentinel_kwargs(settings)
    found: dict[str, Any] = {
        "broker_url": _url(settings, settings.login(role_name)),
        "broker_transport_options": options,
        "broker_channel_error_retry": True,  # a READONLY (demoted master) reconnects instead of killing the consumer
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker outlives any outage; the sweep catches up after
        # a message sent while the master fails over is sent again for some 15 s, then the send fails
        "task_publish_retry_policy": {"max_retries": 12, "interval_start": 0.1, "interval_step": 0.5,
                                      "interval_max": 2.0},
    }
    if settings.wait_replicas:
        options["wait_replicas"] = settings.wait_replicas
    tls = _tls(settings)
    if tls:
        files = {k: tls[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if k in tls}
        found["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, **files}
    return found


# how a TLS handshake ends that a server cut for want of a client certificate: TLS 1.3's alert,
# TLS 1.2's, or (the alert unread, as a first write meets the closed connection) an EOF
TLS_REFUSALS = ("alert certificate required", "alert handshake failure", "EOF occurred in violation of protocol")


def tls_refusal(error: redis.RedisError) -> bool:
    """Whether `error` reads as a TLS handshake that the server cut (TLS_REFUSALS)."""
    return any(text in str(error) for text in TLS_REFUSALS)


def trouble(settings: RedisSettings, error: redis.RedisError) -> str:
    """A Redis error as one line for a user: where Redis is and what went wrong; and where a
    TLS connection of a client that shows no certificate was cut as a Redis that asks for one
    cuts it (tls-auth-clients yes, its default), the keys that would give it one."""
    line = f"{settings.where()}: {error}"
    if not settings.cert_file and _tls(settings) and tls_refusal(error):
        line += " (if this Redis asks for client certificates: set redis.cert_file and redis.key_file)"
    return line


def fails_over(r: redis.Redis) -> bool:
    """Whether `r` finds its master through sentinels (and may meet one that just took over)."""
    return isinstance(r.connection_pool, SentinelConnectionPool)


def replicas_to_wait_for(pool: Any, wanted: int) -> int:
    """How many replicas a write must reach: `wanted` (redis.wait_replicas), less the replicas
    every sentinel that answers calls down (s_down, o_down), when a majority of the sentinels
    answer. The sentinels never promote one of those, so waiting for it would only stall each
    write until it came back, while one they may promote is always waited for. Without
    sentinels, or without a majority's answer, `wanted`. Asked at most once per
    DISCOVERY_INTERVAL per pool."""
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None or not wanted:
        return wanted
    now = time.monotonic()
    asked, count = getattr(pool, "_stork_replicas", (-DISCOVERY_INTERVAL, wanted))
    if now - asked < DISCOVERY_INTERVAL:
        return count
    views = []
    for sentinel in manager.sentinels:
        try:
            views.append(sentinel.sentinel_slaves(pool.service_name))
        except redis.RedisError:
            continue
    # only a majority's word lowers it: a client cut off with one sentinel would hear that every
    # replica is down while the others promote one
    count = min(wanted, promotable(views)) if 2 * len(views) > len(manager.sentinels) else wanted
    pool._stork_replicas = (now if views else now + SENTINELS_AWAY, count)  # none answered: ask in a while
    return count


def promotable(views: list[list[dict[str, Any]]]) -> int:
    """How many replicas some sentinel could promote, from each answering sentinel's SENTINEL
    REPLICAS: all they know of, but those every one of them calls down (s_down or o_down)."""
    known = {(r["ip"], r["port"]) for view in views for r in view}
    down = set.intersection(*({(r["ip"], r["port"]) for r in view if r["is_sdown"] or r["is_odown"]}
                              for view in views))
    return len(known - down)


class NotReplicated(redis.RedisError):
    """A write the replicas did not confirm in time: it stands on the master it reached, and a
    failover may still take it back (a master cut off from its replicas and sentinels)."""


def require_replicated(r: redis.Redis, wanted: int, write: Callable[[redis.Redis], object], what: str) -> None:
    """`write_replicated`, or NotReplicated naming `what`: for a record that what follows acts
    on (a step's start, what it saves before it makes or renames a volume, its end before the
    next step). Going on unconfirmed would let a failover take the record back from under an
    action already taken: the step run again from an older record, over what it did."""
    if (missing := _write_and_wait(r, wanted, write, REPLICATION_PATIENCE)) is not None:
        raise NotReplicated(f"{what} was not confirmed by Redis's replicas within {REPLICATION_PATIENCE:g} s "
                            f"({missing}): a failover now would lose it")


def write_replicated(r: redis.Redis, wanted: int, write: Callable[[redis.Redis], object],
                     patience: float | None = None) -> bool:
    """Do `write` so that a failover does not take it back. Redis replicates asynchronously,
    and a master being replaced still takes writes until it is demoted: what it took then is
    lost. So `write` is sent on a connection of its own, then WAIT on that same connection
    (WAIT counts only the writes of its connection), until the replicas the sentinels may
    promote hold it (`replicas_to_wait_for`, at most `wanted`: redis.wait_replicas). While the
    connection lives and leads to the master, only WAIT is repeated; when it breaks or the
    sentinels name another master, `write` is made again there, so it must be harmless twice
    (a Lua script that is a no-op the second time, or a message: a step runs once at its turn).
    False (and logged) when `patience` ran out first; the write stands on the master it
    reached, if it reached one."""
    return _write_and_wait(r, wanted, write, REPLICATION_PATIENCE if patience is None else patience) is None


def _write_and_wait(r: redis.Redis, wanted: int, write: Callable[[redis.Redis], object],
                    patience: float) -> str | None:
    """write_replicated's work: None once confirmed, else what was missing (logged)."""
    if not wanted:
        write(r)
        return None
    pool = r.connection_pool
    deadline = time.monotonic() + patience
    acked: int | None = None
    needed, error, written = wanted, "", False
    while time.monotonic() < deadline:
        pinned = None
        try:  # the client connects as it is made (to the master the sentinels name): inside the retry
            pinned = redis.Redis(connection_pool=pool, single_connection_client=True)
            write(pinned)
            written = True
            connection = pinned.connection
            while time.monotonic() < deadline:
                needed = replicas_to_wait_for(pool, wanted)
                connection.send_command("WAIT", needed, WAIT_TIMEOUT_MS)
                try:
                    acked = int(connection.read_response())
                except redis.ResponseError as e:  # WAIT on a replica: the master was demoted
                    raise redis.ConnectionError(str(e)) from e
                if acked >= needed:
                    return None
                if _master_moved(pool, connection):
                    break
        except (redis.ConnectionError, redis.TimeoutError) as e:  # lost, demoted or NOREPLICAS: write again
            error = str(e)
            time.sleep(0.5)
        finally:
            if pinned is not None:
                pinned.close()
    log.warning("write_not_replicated", replicas=acked, wanted=wanted, error=error)
    if not written:
        return f"not written: {error or 'no master answered'}"
    return f"held by {acked or 0} of {needed} replicas" + (f"; then {error}" if error else "")


def _master_moved(pool: Any, connection: Any) -> bool:
    """Whether the sentinels now name a master other than the one `connection` leads to."""
    if not hasattr(pool, "get_master_address"):
        return False
    try:
        return tuple(pool.get_master_address()) != (connection.host, connection.port)
    except redis.RedisError:
        return False
