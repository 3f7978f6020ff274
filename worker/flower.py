"""`python -m worker.flower`: Flower on the configured address, 127.0.0.1 by default.

Flower shows every job's tasks and can revoke them, so it refuses to listen on any other
address unless basic auth is configured. The credentials go to Flower through its
environment (FLOWER_BASIC_AUTH), never on a command line that `ps` shows.
"""

from __future__ import annotations

import ipaddress
import os
import sys

from drivers import config
from drivers.config import Config
from drivers.errors import StorkError


def flower_argv(cfg: Config) -> list[str]:
    address = cfg.flower_address
    loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    if not loopback and not cfg.flower_basic_auth:
        raise StorkError(f"{cfg.file}: flower.address = {address!r} is not a loopback address: "
                         "set flower.basic_auth (user:password) to expose Flower")
    return [sys.executable, "-m", "celery", "-A", "worker.app", "flower",
            f"--address={address}", f"--port={cfg.flower_port}"]


def main() -> None:
    try:
        cfg = config.load()
        argv = flower_argv(cfg)
    except (StorkError, ValueError) as e:
        sys.exit(f"stork flower: {e}")
    env = dict(os.environ)
    if cfg.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = cfg.flower_basic_auth
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
