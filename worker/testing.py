"""A throw-away local cluster for tests and benchmarks: a real redis-server on a free port
and real `celery worker` processes, one per node, all in their own process groups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _group_running(pgid: int) -> bool:
    """Does any process of the group still run (zombies do not)?"""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class RedisServer:
    """redis-server on 127.0.0.1:`port` (and the addresses `also_on`); with `durable`, an
    append-only file in `data_dir` keeps its data across `restart()`."""

    def __init__(self, port: int, data_dir: Path, durable: bool = False, also_on: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port
        # off the loopback only on a test's own link (a veth pair to a namespace): no password needed
        protected = ["--protected-mode", "no"] if also_on else []
        self.argv = [exe, "--port", str(port), "--bind", "127.0.0.1", *also_on, *protected, "--save", "",
                     "--appendonly", "yes" if durable else "no", "--maxmemory-policy", "noeviction",
                     "--dir", str(data_dir)]
        import redis

        self.client = redis.Redis(port=port, decode_responses=True)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._pings, 10, "redis-server")

    def restart(self, down: float = 0.0) -> None:
        self.stop()
        time.sleep(down)
        self.start()

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return self.proc.poll() is not None  # stop waiting if it died

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Worker:
    """A real `celery worker` process group for one node."""

    def __init__(self, node: str, log_dir: Path, concurrency: int = 4, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """`prefix` runs it through another command (`ip netns exec NS`: a node of its own network)."""
        self.node = node
        self.log = log_dir / f"worker-{node}-{time.monotonic_ns()}.log"
        env = {**os.environ, **(env or {}), "STORK_NODE": node, "PYTHONUNBUFFERED": "1"}
        argv = [*prefix, sys.executable, "-m", "worker.run.main", "--without-mingle", "--without-gossip",
                "-c", str(concurrency)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: '"worker_ready"' in self.log.read_text() or self.proc.poll() is not None,
                 60, f"worker {node} to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {node} died at start:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the node dies with its step half done. Returns
        once no process of the group runs any more (a pool process can outlive the main one
        by a moment)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        wait_for(lambda: not _group_running(self.proc.pid), 10, f"worker {self.node}'s processes to die")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
