"""The Celery app, configured from the cluster config (STORK_CONFIG), and the config steps see.

The settings are the ones long storage jobs need (DESIGN.md "Celery settings"): JSON only,
late acks with one task prefetched, redelivery when a worker process is lost, a Redis
visibility timeout above the longest step (in all three places), time limits below it.

`config()` follows the file: when its stat (mtime, size, inode) changed since the last call,
it is read again, so each step sees the current storages, paths.guests, paths.locks and
locks.timeout without a restart. The Celery app and the Redis client are built at start from
redis.url, this node's name (STORK_NODE), worker.concurrency and worker.visibility_timeout, and
jobs.keep_days is written into Redis then: those keep their start values, and an edit of one
logs `config_needs_restart` naming the keys.
A changed file that does not load is not used: the last good config stays, and
`config_reload_failed` is logged once per change of the file (in each worker process).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import redis
import structlog
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from structlog.typing import FilteringBoundLogger

from drivers import config as config_module
from drivers.config import Config
from drivers.errors import ConfigError, StorkError
from worker import connect
from worker.queues import SHARED_QUEUE

log = structlog.get_logger("stork.config")

# what the Celery app, the Redis client and the worker's queues are built from at start, and
# how long jobs are kept (written into Redis at the worker's start)
FIXED_FIELDS = ("redis", "node", "worker_concurrency", "visibility_timeout", "job_keep_days")
RESTART_KEYS = ("redis.url", *(config_module.FIELD_KEYS[name] for name in FIXED_FIELDS))

Stamp = tuple[int, int, int] | None  # the file's (st_mtime_ns, st_size, st_ino); None: cannot stat it


def stamp(file: Path) -> Stamp:
    """What tells a changed file: a new inode (an editor's rename), another size, a later mtime. An
    in-place rewrite of the same size within one kernel clock tick (a few ms) shows at the next edit."""
    try:
        st = os.stat(file)
    except OSError:
        return None  # gone or unreadable: loading it says why
    return st.st_mtime_ns, st.st_size, st.st_ino


def needs_restart(changed: Iterable[str]) -> list[str]:
    """The changed keys that a running worker cannot take on."""
    return [key for key in changed if key in RESTART_KEYS]


def pinned(start: Config, loaded: Config) -> Config:
    """`loaded`, with what the process was built from kept at its start values."""
    return dataclasses.replace(loaded, **{name: getattr(start, name) for name in FIXED_FIELDS})


class LiveConfig:
    """The config file as it is now, minus what needs a restart (see the module docstring)."""

    def __init__(self, env: Mapping[str, str] | None = None, logger: FilteringBoundLogger = log) -> None:
        self.env, self.log = env, logger
        self.stamp = stamp(config_module.config_path(env))  # before the read: a later edit is seen next time
        self.start = self.loaded = self.serving = config_module.load(env)
        self.failing = False  # the file's last change did not load
        self.lock = threading.Lock()  # threads of one process reload and log once

    def get(self) -> Config:
        """The config to serve: one stat, and a reload only when the file changed."""
        with self.lock:
            now = stamp(self.start.file)
            if now != self.stamp:
                self.stamp = now  # one try per change of the file, good or bad
                self._reload()
            return self.serving

    def _reload(self) -> None:
        file = str(self.start.file)
        try:
            loaded = config_module.load(self.env)
        except StorkError as e:
            self.log.error("config_reload_failed", file=file, error=str(e), serving="the last good config")
            self.failing = True
            return
        changed = config_module.changed_keys(self.loaded, loaded)
        if changed or self.failing:  # a repaired file is news even when it says what the last good one did
            self.log.info("config_reloaded", file=file, changed=changed)
        self.failing = False
        pending = needs_restart(config_module.changed_keys(self.start, loaded))
        if pending and needs_restart(changed):  # said once, when an edit touches one of them
            self.log.warning("config_needs_restart", file=file, keys=pending)
        self.loaded, self.serving = loaded, pinned(self.start, loaded)


_live: LiveConfig | None = None


def config() -> Config:
    """This process's config, current as of this call (see the module docstring)."""
    global _live
    if _live is None:
        _live = LiveConfig()
        return _live.serving
    return _live.get()


def _redis_outage() -> float:
    """Seconds a worker keeps retrying Redis (e.g. while it restarts) before a step gives up:
    STORK_REDIS_OUTAGE, default 60. A step given up is recovered by the sweep once Redis is back."""
    text = os.environ.get("STORK_REDIS_OUTAGE") or "60"
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value <= 3600:
        raise ConfigError(f"STORK_REDIS_OUTAGE = {text!r}: expected a number of seconds from 1 to 3600")
    return value


REDIS_OUTAGE = _redis_outage()
BACKOFF_CAP = 2.0  # seconds between two tries of a command, at most
# The longest one command of a worker's lasts: tries for REDIS_OUTAGE, then one more (the wait
# before it, the sentinels asked, the connect, the reply), each bounded by connect.py's timeouts.
# A heartbeat outlives it (liveness.ttl).
COMMAND_LIMIT = REDIS_OUTAGE + BACKOFF_CAP + 3 * connect.SENTINEL_TIMEOUT + connect.CONNECT_TIMEOUT + \
    connect.SOCKET_TIMEOUT


class OutageRetry(Retry):
    """Retry that ends a command's tries once `window` seconds have passed since it began.
    Counting tries alone is not enough: a try may hang until a socket timeout rather than be
    refused at once, and 35 of them had outlasted the heartbeat, so that another host took a
    process for gone while it still ran its step. The clock starts with a thread's outermost
    command on this Retry (redis-py gives each connection a copy) and holds for the tries
    nested in it (a reconnect, the sentinels asked); a command that ends, in either way, stops it."""

    def __init__(self, window: float) -> None:
        super().__init__(ExponentialBackoff(cap=BACKOFF_CAP, base=0.05), retries=1 << 20)  # the window ends the tries
        self._window = window
        self._ends: dict[int, float] = {}  # thread -> when its command's tries end

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        me = threading.get_ident()
        outermost = me not in self._ends
        if outermost:
            self._ends[me] = time.monotonic() + self._window

        def failed(error: Exception, *count: Any) -> None:
            fail(error, *count)
            if time.monotonic() > self._ends[me]:  # raised here, before the wait for the next try
                raise redis.ConnectionError(f"Redis did not answer for {self._window:.0f} s: {error}") from error

        try:
            return super().call_with_retry(do, failed, *args, **kwargs)
        finally:
            if outermost:
                del self._ends[me]


@cache
def redis_client() -> redis.Redis:
    """This process's Redis client (worker/connect.py: one URL or the sentinels' master, as
    this process's role). It rides out a Redis restart or a failover: each command is tried
    again with backoff for REDIS_OUTAGE seconds (OutageRetry). A retried state change whose
    first try went through fails its guard; the runner then checks whether the change is
    already there. redis-py's pool notices a fork and reconnects, so one client per process is safe."""
    retry = OutageRetry(REDIS_OUTAGE)
    return connect.client(config().redis, connect.role("worker"), retry=retry)


def make_app(cfg: Config, role: str | None = None) -> Celery:
    """The Celery app for `cfg`, speaking to Redis as `role` (default: this process's, a worker's)."""
    app = Celery("stork", include=["worker.tasks", "worker.hooks"], amqp="worker.failover:AMQP")
    vt = cfg.visibility_timeout
    app.conf.update(
        **connect.celery_settings(cfg.redis, role or connect.role("worker"), vt),
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        visibility_timeout=vt,
        task_soft_time_limit=int(vt * 0.8),
        task_time_limit=int(vt * 0.9),
        # Cancelling on connection loss makes Celery 5.6 announce the cancel over the lost
        # connection and die. The step goes on instead; if its message comes back after the
        # visibility timeout, the step finds itself done and returns (see runner).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        # The job record in Redis is the truth: no result backend (Celery's results would only
        # cost writes, and one more connection to fail over).
        task_ignore_result=True,
        task_default_queue=SHARED_QUEUE,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # structlog writes JSON lines to stderr itself
    )
    return app


app = make_app(config())
