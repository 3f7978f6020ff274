"""`make run`: write the default config on first run, make sure a Redis answers, then run
the Procfile (worker, beat, Flower, and Redis when none was running) with honcho.
Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import redis

from drivers import config
from drivers.errors import StorkError

ROOT = Path(__file__).resolve().parent.parent


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis_server() -> None:
    """Install Debian's redis-server where it is missing and we may (root + apt-get)."""
    if shutil.which("redis-server"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("stork: installing redis-server (apt-get)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server"], check=False)
    if not shutil.which("redis-server"):
        raise StorkError("no Redis answers and redis-server is not installed: "
                         "install it (Debian: apt-get install redis-server) or set STORK_REDIS_URL")


def main() -> None:
    file = config.config_path()
    if config.write_default(file):
        print(f"stork: wrote the default config to {file}", file=sys.stderr)
    try:
        cfg = config.load()
        processes = ["worker", "beat", "flower"]
        if not redis_answers(cfg.redis_url):
            ensure_redis_server()
            processes.insert(0, "redis")
        for storage in cfg.storages.values():
            if storage.on_node(cfg.node):
                storage.path.mkdir(parents=True, exist_ok=True)
        (ROOT / "var").mkdir(exist_ok=True)
    except StorkError as e:
        sys.exit(f"stork: {e}")
    env = {**os.environ, "STORK_CONFIG": str(cfg.file), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    print(f"stork: node {cfg.node}, Redis {config.redact(cfg.redis_url)}, Flower http://{cfg.flower_address}:{cfg.flower_port}",
          file=sys.stderr)
    argv = [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start", *processes]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
