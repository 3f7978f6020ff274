"""`python -m worker.run.metrics`: the node's Prometheus endpoint, on metrics.address and
metrics.port (127.0.0.1:9840 by default); what it says is worker/metrics.py's. It reads and
never writes, so an address other than loopback exposes guest ids and storage names only:
put it where your Prometheus alone reaches it."""

from __future__ import annotations

import os
import signal
import sys

from prometheus_client import CollectorRegistry, start_http_server

from drivers import config
from drivers.errors import StorkError


def main() -> None:
    try:
        cfg = config.load()
    except StorkError as e:
        sys.exit(f"stork metrics: {e}")
    os.environ.setdefault("STORK_ROLE", "operator")  # it only reads: the read-only Redis user where there are users
    from worker.app import config as live_config  # the app loads the config: after the check above
    from worker.app import redis_client
    from worker.jobs import schedules
    from worker.metrics import Collector

    registry = CollectorRegistry(auto_describe=True)
    registry.register(Collector(live_config, redis_client, lambda: schedules.status(live_config(), redis_client())))
    try:
        start_http_server(cfg.metrics_port, cfg.metrics_address, registry=registry)
    except OSError as e:
        sys.exit(f"stork metrics: cannot listen on {cfg.metrics_address}:{cfg.metrics_port}: {e.strerror}")
    print(f"stork metrics: http://{cfg.metrics_address}:{cfg.metrics_port}/metrics", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
