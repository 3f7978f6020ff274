"""`python -m worker.run.redis_server`: the Procfile's Redis, for a machine that has none.

Runs `redis-server` on the host and port of the configured URL (127.0.0.1 only), with the
settings stork needs (noeviction: a job record must never be evicted), data under ./var.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from drivers import config
from drivers.errors import StorkError
from drivers.redis_settings import redact

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def argv_for(url: str, data_dir: str) -> list[str]:
    """redis-server's command line; a password in the URL goes into a 0600 config file in
    `data_dir` (never onto the command line, which every local user can read)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if parsed.scheme == "unix":
        raise StorkError(f"Redis at {redact(url)} is not running: start it there, stork only starts one on a "
                         "local port")
    if host not in LOCAL_HOSTS:
        raise StorkError(f"Redis at {redact(url)} is not local: start it there, stork only starts a local one")
    exe = shutil.which("redis-server")
    if not exe:
        raise StorkError("redis-server is not installed (Debian: apt-get install redis-server)")
    conf = Path(data_dir) / "stork-redis.conf"
    # the password as redis-py sends it (decoded), each byte an escape in a quoted string: no
    # character of it can end the value or start another directive
    text = 'requirepass "' + "".join(f"\\x{b:02x}" for b in unquote(parsed.password).encode()) + '"\n' \
        if parsed.password else ""
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return [exe, str(conf), "--bind", host, "--port", str(port), "--dir", data_dir,
            "--maxmemory-policy", "noeviction", "--appendonly", "yes", "--save", ""]


def main() -> None:
    try:
        cfg = config.load()
        data_dir = cfg.file.parent / "var" / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = argv_for(cfg.redis_url, str(data_dir))
    except StorkError as e:
        sys.exit(f"stork redis: {e}")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
