"""One test cluster per session: a real redis-server on a free port, real `celery worker`
processes as nodes (node1, node2), dir storages in a temporary directory.

STORK_CONFIG is set before any stork module is imported, so the in-process client, the
CLI (in-process and as a subprocess) and the workers all share one config.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(tempfile.mkdtemp(prefix="stork-test-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REDIS_PORT = free_port()
CONFIG = BASE / "stork.toml"
CONFIG.write_text(f"""
[redis]
url = "redis://127.0.0.1:{REDIS_PORT}/0"
[paths]
guests = "guests"
locks = "lock"
[locks]
timeout = 30
[worker]
concurrency = 4
[storage.local]
type = "dir"
path = "images"
[storage.local1]
type = "dir"
path = "node1"
nodes = ["node1"]
[storage.local2]
type = "dir"
path = "node2"
nodes = ["node2"]
[storage.shared]
type = "dir"
path = "shared"
shared = true
[storage.crash]
type = "dir"
path = "crash"
nodes = ["crash"]
[storage.small]
type = "dir"
path = "small"
[storage.backup]
type = "dir"
path = "backup"
content = ["backup"]
""")
os.environ["STORK_CONFIG"] = str(CONFIG)
os.environ["STORK_NODE"] = "node1"
os.environ.pop("STORK_REDIS_URL", None)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Worker:
    """A real `celery worker` process group for one node."""

    def __init__(self, node: str, concurrency: int = 4) -> None:
        self.node = node
        self.log = BASE / f"worker-{node}-{time.monotonic_ns()}.log"
        env = {**os.environ, "STORK_NODE": node, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "worker.main", "--without-mingle", "--without-gossip",
                "-c", str(concurrency)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: '"worker_ready"' in self.log.read_text() or self.proc.poll() is not None,
                 60, f"worker {node} to start")
        assert self.proc.poll() is None, self.log.read_text()

    def kill(self) -> None:
        """SIGKILL the whole process group: the node dies with its step half done."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def redis_server():
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (Debian: apt-get install redis-server)"
    proc = subprocess.Popen(
        [exe, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory-policy", "noeviction", "--dir", str(BASE)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(port=REDIS_PORT, decode_responses=True)
    wait_for(lambda: _pings(r), 10, "redis-server")
    yield r
    proc.terminate()
    proc.wait(10)


def _pings(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def workers(redis_server):
    """Workers for node1 and node2, for the whole session."""
    started = {node: Worker(node) for node in ("node1", "node2")}
    yield started
    for w in started.values():
        w.stop()


@pytest.fixture(scope="session")
def client(workers):
    from producer.client import Client

    return Client()


_vmids = itertools.count(1000)


@pytest.fixture
def vmid():
    """A fresh guest id per call: tests share one cluster."""
    return lambda: next(_vmids)


@pytest.fixture
def stork(workers, capsys):
    """Run the CLI in-process: returns (exit status, stdout, stderr)."""
    from producer.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def storage_path(name: str) -> Path:
    return BASE / {"local": "images", "local1": "node1", "local2": "node2"}.get(name, name)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def pytest_sessionfinish(session, exitstatus):
    for mount in ("small",):
        subprocess.run(["umount", str(BASE / mount)], capture_output=True, check=False)
    subprocess.run(["chattr", "-R", "-i", str(BASE)], capture_output=True, check=False)
    shutil.rmtree(BASE, ignore_errors=True)
