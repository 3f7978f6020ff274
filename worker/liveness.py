"""Is the process that a job record names as running a step still alive, and still at it?

A holder id names one process start: `<host>:<pid>:<start>:<boot>:<pidns>`, with the
process's start time (clock ticks since boot, from /proc), the first 8 characters of the
kernel's boot id and its pid namespace.
A worker restarted in a fresh PID namespace (a container restart) or after a reboot that gets
the same pid is a different holder, so a dead holder never looks alive.

On its own host the kernel says whether the holder lives (/proc/<pid>/stat with that start
time). Each worker process also keeps a heartbeat key `stork:alive:<holder>` fresh from a
daemon thread (every HEARTBEAT seconds, expiring after the Redis retry window plus 3 beats, so
a process cut off from Redis but still working never looks gone); across hosts, its absence
means the process is gone. The key's value names the job whose step or undo the process is working on
("" when idle): set before the step's start is recorded and cleared after its end is, so a
live process whose heartbeat names another job (or none) has abandoned the step, e.g. after
giving up on Redis during an outage, and the job can be recovered without a restart.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import redis
import structlog

from drivers.tools import process_start

HEARTBEAT = 10
log = structlog.get_logger("stork.liveness")


def ttl() -> int:
    """How long a heartbeat key outlives its last beat: longer than a process keeps working
    without Redis (the longest one command lasts, app.COMMAND_LIMIT, after which its step
    stops), so a live process that is only cut off from Redis never looks dead to another host."""
    from worker.app import COMMAND_LIMIT

    return int(COMMAND_LIMIT + 3 * HEARTBEAT)

_me: tuple[int, str] | None = None  # (pid, holder id) of this process
_working_on = ""  # the job this process runs a step or undo of
_beat_lock = threading.Lock()  # the value read and the value written are one


def _after_fork() -> None:
    """A pool process forked while the main process's heartbeat held the lock gets a free one."""
    global _beat_lock, _working_on
    _beat_lock, _working_on = threading.Lock(), ""


os.register_at_fork(after_in_child=_after_fork)


def _pid_namespace() -> str:
    """Two containers on one kernel (host networking: same host name and boot id) have their
    own pids; /proc answers only for the namespace it shows."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "nons"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return "noboot"


def process_id() -> str:
    """This process's holder id (worked out once per process, also in a forked child)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        _me = (pid, f"{socket.gethostname()}:{pid}:{process_start(pid)}:{_boot_id()}:{_pid_namespace()}")
    return _me[1]


def parent_id() -> str:
    """The holder id of this process's parent: for a pool process, its worker's main process,
    which holds the step's message and puts it back in its queue if this process dies."""
    ppid = os.getppid()
    return f"{socket.gethostname()}:{ppid}:{process_start(ppid)}:{_boot_id()}:{_pid_namespace()}"


def _key(holder: str) -> str:
    return f"stork:alive:{holder}"


def _beat(r: redis.Redis, me: str) -> None:
    with _beat_lock:
        r.set(_key(me), _working_on, ex=ttl())


def start_heartbeat(r: redis.Redis) -> None:
    """Keep this process's alive key fresh, for as long as the process lives."""
    me = process_id()

    def beat() -> None:
        while True:
            try:
                _beat(r, me)
            except Exception as e:  # the heartbeat must outlive anything
                log.warning("heartbeat_failed", error=str(e))
            time.sleep(HEARTBEAT)

    threading.Thread(target=beat, name="stork-heartbeat", daemon=True).start()


@contextlib.contextmanager
def working_on(r: redis.Redis, job_id: str) -> Iterator[None]:
    """Name `job_id` in this process's heartbeat while the block runs. Enter it before the
    step's start is recorded and leave it after its end is: the heartbeat never says idle while
    the record says this process holds the job. Where Redis cannot be told on the way in, the
    block does not run (RedisError): a start recorded once Redis is back, with the heartbeat
    still saying idle until its next beat, would let a cancel or the sweep take the step from
    this live process. On the way out, the heartbeat thread tells it when Redis is back."""
    _tell(r, job_id, must=True)
    try:
        yield
    finally:
        _tell(r, "")


def _tell(r: redis.Redis, job_id: str, must: bool = False) -> None:
    global _working_on
    with _beat_lock:
        _working_on = job_id
        try:
            r.set(_key(process_id()), job_id, ex=ttl())
        except redis.RedisError:
            if must:
                _working_on = ""
                raise


def _alive_here(holder: str) -> bool | None:
    """The kernel's word on a holder of this host (None: not of this host)."""
    host, pid, start, boot, ns = [*holder.split(":"), "", "", "", ""][:5]
    if host != socket.gethostname() or boot != _boot_id() or ns != _pid_namespace():
        return None
    return start == process_start(pid)


def holder_alive(r: redis.Redis, holder: str | None) -> bool:
    """True if `holder` is another stork worker process that is still running."""
    if not holder or holder == process_id():
        return False
    here = _alive_here(holder)
    return here if here is not None else bool(r.exists(_key(holder)))


def process_alive(r: redis.Redis, holder: str | None) -> bool:
    """True if `holder` is this process or another stork worker process still running."""
    return holder == process_id() or holder_alive(r, holder)


def holding(r: redis.Redis, holder: str | None, job_id: str) -> bool:
    """True if `holder` is alive and still working on `job_id`. A live holder whose heartbeat
    names no job or another one has abandoned it; one whose heartbeat cannot be read (its key
    expired while Redis was away and is not yet refreshed) is taken to hold it."""
    if not holder_alive(r, holder):
        return False
    assert holder is not None
    value = r.get(_key(holder))
    return value is None or value == job_id
