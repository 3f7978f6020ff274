"""`make run`: write the default config on first run, make sure a Redis answers, then run
the Procfile (worker, beat, Flower, the metrics endpoint, and Redis when none was running) with honcho.
Ctrl-C stops everything it started.

One launcher per node and config: it holds an flock on `<paths.locks>/launch-<node>.lock` for its
whole life (honcho runs in its process after exec, and honcho's per-process helpers inherit the lock),
so a second `make run` says who runs and exits before starting anything. The kernel drops the lock
when they die, so a crashed launcher never blocks the next start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from drivers import config
from drivers.config import Config
from drivers.errors import StorkError
from drivers.flock import open_making_dirs
from worker import connect
from worker.jobs.crontab import line_errors

ROOT = Path(__file__).resolve().parents[2]


def redis_answers(cfg: Config) -> bool:
    """Whether a Redis answers where the config says; False when none does (one to start). A
    Redis that answers but refuses this node (its login, its TLS handshake) is an error saying
    why: starting another one there would only fail to take its port."""
    try:
        once = Retry(NoBackoff(), 0)  # a probe: one try, no riding out of a failover
        return bool(connect.client(cfg.redis, connect.role("worker"), retry=once, socket_connect_timeout=1).ping())
    except redis.AuthenticationError as e:  # (a ConnectionError to redis-py)
        raise StorkError(connect.trouble(cfg.redis, e)) from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        if connect.tls_refusal(e):
            raise StorkError(connect.trouble(cfg.redis, e)) from None
        return False  # nothing listens there, or nothing answers
    except redis.RedisError as e:  # it answered, and refused: a user without the rights, say
        raise StorkError(connect.trouble(cfg.redis, e)) from None


def ensure_tool(tool: str, package: str, why: str) -> None:
    """Install a Debian package where its tool is missing and we may (root + apt-get)."""
    if shutil.which(tool):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"stork: installing {package} (apt-get)", file=sys.stderr)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
        if subprocess.run(install, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], check=False)
            subprocess.run(install, check=False)
    if not shutil.which(tool):
        raise StorkError(f"{tool} is not installed: {why} (Debian: apt-get install {package})")


def lock_path(cfg: Config) -> Path:
    return cfg.locks_dir / f"launch-{cfg.node}.lock"  # node names are checked: a plain file name


def _has_open(pid: int, st: os.stat_result) -> bool:
    """Does process `pid` have the file `st` open? (Not just "is it alive": a dead launcher's pid may
    have been reused.)"""
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:  # gone, or another user's
        return False
    for fd in fds:
        try:
            target = os.stat(fd.path)
        except OSError:
            continue
        if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _recorded_holder(path: Path) -> tuple[int, str] | None:
    """The pid and start time the holding launcher wrote, or None while it has not written them yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as f:
        pid, _, started = f.read(200).decode("ascii", "replace").strip().partition(" ")
    return (int(pid), started) if pid.isascii() and pid.isdigit() else None


def _already_running(path: Path, node: str) -> str | None:
    """What to tell the operator about the lock's holder; None when nothing holds the file any more."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    # The holder writes its pid right after taking the lock: give it a moment. Content left by a
    # launcher that died names a pid that does not hold the file, so it is never reported.
    deadline = time.monotonic() + 2
    while (holder := _recorded_holder(path)) is None or not _has_open(holder[0], st):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if holder and _has_open(holder[0], st):
        pid, started = holder
        return (f"already running on node {node} (launcher pid {pid}, started {started}); "
                "stop it first (Ctrl-C in its terminal)")
    # e.g. the launcher was SIGKILLed: honcho's helpers hold the lock while the processes they run live
    pids = [int(p.name) for p in os.scandir("/proc")
            if p.name.isdigit() and int(p.name) != os.getpid() and _has_open(int(p.name), st)]
    if not pids:
        return None
    return (f"already running on node {node}: its launcher is gone, but processes it started still run "
            f"(pids {' '.join(map(str, pids))} hold {path}); stop them first")


def hold_launch_lock(cfg: Config) -> int:
    """Take this node's launcher lock for `cfg` and write our pid and start time in it; returns the
    fd, to be kept open for the launcher's life. StorkError when another launcher holds it, or the
    lock file cannot be used."""
    path = lock_path(cfg)
    try:
        f = open_making_dirs(path, "a")  # O_NOFOLLOW, O_NONBLOCK, regular files only
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EINVAL):
            raise StorkError(f"lock file {path} is a symlink or not a regular file (never used); "
                             "remove it") from None
        raise StorkError(f"cannot open the lock file {path}: {e.strerror or e}") from None
    fd = os.dup(f.fileno())  # a bare fd, to hand to honcho across exec
    f.close()
    for attempt in (1, 2):  # a second try when the holder exited while we looked at it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            message = _already_running(path, cfg.node)
            if message or attempt == 2:
                os.close(fd)
                raise StorkError(message or f"already running on node {cfg.node} ({path} is locked)") from None
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)  # O_APPEND: the write lands at the new end, offset 0
    os.write(fd, f"{os.getpid()} {started}\n".encode())
    return fd


def main() -> None:
    file = config.config_path()
    # lexists: never write the default through a dangling symlink (it would create its target)
    if not os.path.lexists(file) and config.write_default(file):
        print(f"stork: wrote the default config to {file}", file=sys.stderr)
    try:
        cfg = config.load()
        lock = hold_launch_lock(cfg)  # before anything is installed or started
        ensure_tool("qemu-img", "qemu-utils", "stork creates and copies disk images with it")
        processes = ["worker", "beat", "flower", "metrics"]
        if not redis_answers(cfg):
            if cfg.redis.sentinels:  # a replicated Redis is the operator's to run: none is started here
                raise StorkError(f"{cfg.redis.where()} does not answer: start the sentinels and their Redis first")
            ensure_tool("redis-server", "redis-server", "no Redis answers; install one or set STORK_REDIS_URL")
            processes.insert(0, "redis")
        for storage in cfg.storages.values():
            # a directory storage: made on first run, unless it must be a mount (never beneath one)
            if storage.on_node(cfg.node) and storage.path and not storage.options.get("is_mountpoint"):
                storage.path.mkdir(parents=True, exist_ok=True)
        var = cfg.file.parent / "var"
        var.mkdir(exist_ok=True)
    except StorkError as e:
        sys.exit(f"stork: {e}")
    for error in line_errors(cfg).values():  # beat will skip it at every tick: say so before it starts
        print(f"stork: warning: {error} (that schedule will not run; the others will)", file=sys.stderr)
    env = {**os.environ, "STORK_CONFIG": str(cfg.file), "STORK_VAR": str(var),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    print(f"stork: node {cfg.node}, {cfg.redis.where()}, Flower http://{cfg.flower_address}:{cfg.flower_port}",
          file=sys.stderr)
    argv = [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start", *processes]
    # honcho runs as this pid and holds the lock until it exits; it starts its processes with
    # close_fds, so only it and its forked helpers (alive while their process is) hold it
    os.set_inheritable(lock, True)
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
