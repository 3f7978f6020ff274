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


def main() -> None:
    file = config.config_path()
    if config.write_default(file):
        print(f"stork: wrote the default config to {file}", file=sys.stderr)
    try:
        cfg = config.load()
        ensure_tool("qemu-img", "qemu-utils", "stork creates and copies disk images with it")
        processes = ["worker", "beat", "flower"]
        if not redis_answers(cfg.redis_url):
            ensure_tool("redis-server", "redis-server", "no Redis answers; install one or set STORK_REDIS_URL")
            processes.insert(0, "redis")
        for storage in cfg.storages.values():
            if storage.on_node(cfg.node):
                storage.path.mkdir(parents=True, exist_ok=True)
        var = cfg.file.parent / "var"
        var.mkdir(exist_ok=True)
    except StorkError as e:
        sys.exit(f"stork: {e}")
    env = {**os.environ, "STORK_CONFIG": str(cfg.file), "STORK_VAR": str(var),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    print(f"stork: node {cfg.node}, Redis {config.redact(cfg.redis_url)}, Flower http://{cfg.flower_address}:{cfg.flower_port}",
          file=sys.stderr)
    argv = [sys.executable, "-m", "honcho", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start", *processes]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
