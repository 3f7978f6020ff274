"""`python -m worker.run.main`: a Celery worker for this node (STORK_NODE), consuming the node's
queue and the shared queue. Extra arguments go to `celery worker`."""

from __future__ import annotations

import os
import sys

from drivers.errors import StorkError
from worker.queues import SHARED_QUEUE, node_queue


def main() -> None:
    from drivers import config

    try:
        cfg = config.load()
    except StorkError as e:
        sys.exit(f"stork worker: {e}")
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "-Q", f"{node_queue(cfg.node)},{SHARED_QUEUE}",
        "-n", f"{cfg.node}@%h",
        "-c", str(cfg.worker_concurrency),
        "-E", "--loglevel", "INFO", *sys.argv[1:],
    ]  # fmt: skip
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
