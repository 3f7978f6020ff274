"""Is the process that a job record names as running a step still alive?

On its own host the kernel says (/proc). Across hosts, each worker process keeps a Redis key
`stork:alive:<host>:<pid>` fresh from a daemon thread (HEARTBEAT seconds, expiring after
3x that); the key's absence means the process is gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import redis
import structlog

HEARTBEAT = 10
log = structlog.get_logger("stork.liveness")


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _key(holder: str) -> str:
    return f"stork:alive:{holder}"


def start_heartbeat(r: redis.Redis) -> None:
    """Keep this process's alive key fresh, for as long as the process lives."""
    me = process_id()

    def beat() -> None:
        while True:
            try:
                r.set(_key(me), 1, ex=3 * HEARTBEAT)
            except redis.RedisError as e:
                log.warning("heartbeat_failed", error=str(e))
            time.sleep(HEARTBEAT)

    threading.Thread(target=beat, name="stork-heartbeat", daemon=True).start()


def holder_alive(r: redis.Redis, holder: str | None) -> bool:
    """True if `holder` (host:pid) is another live stork worker process."""
    if not holder or holder == process_id():
        return False
    host, _, pid = holder.rpartition(":")
    if host == socket.gethostname():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"celery" in f.read()
        except OSError:
            return False
    return bool(r.exists(_key(holder)))
