"""`python -m worker.run.flower`: Flower on the configured address, 127.0.0.1 by default.

Flower shows every job's tasks and can revoke them, so it refuses to listen on any other
address unless basic auth is configured. The credentials go to Flower through its
environment (FLOWER_BASIC_AUTH), never on a command line that `ps` shows.

Flower 2 answers its REST API (`/api/...`) only when some authentication is configured:
with `flower.basic_auth`, the API takes the same user:password as the pages (HTTP basic
auth, e.g. `curl -u user:password`). Without it the API answers 401 naming
FLOWER_UNAUTHENTICATED_API, the opt-in to an open API, which also lets any web page the
operator's browser opens call it (Flower then allows every origin): stork does not set it.

The task list shows the columns that carry a stork task's job: `kwargs` (its label, from
`worker.records.task_label`: kind, guests, disks, storages and job id; runner sends it with every task) and
`result` (a copy's progress while it runs, and why a step stopped; see worker/tasks.py).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping

from drivers import config
from drivers.config import Config
from drivers.errors import StorkError

TASK_COLUMNS = "name,uuid,state,kwargs,result,received,runtime,worker"


def flower_argv(cfg: Config, env: Mapping[str, str] = os.environ) -> list[str]:
    address = cfg.flower_address
    loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    if not loopback and not cfg.flower_basic_auth:
        raise StorkError(f"{cfg.file}: flower.address = {address!r} is not a loopback address: "
                         "set flower.basic_auth (user:password) to expose Flower")
    # an operator's own FLOWER_TASKS_COLUMNS wins (Flower lets the command line override it)
    columns = [] if "FLOWER_TASKS_COLUMNS" in env else [f"--tasks_columns={TASK_COLUMNS}"]
    return [sys.executable, "-m", "celery", "-A", "worker.app", "flower",
            f"--address={address}", f"--port={cfg.flower_port}", *columns]


def api_note(cfg: Config) -> str:
    """One line at start: how to reach Flower's REST API with this config."""
    url = f"http://{cfg.flower_address}:{cfg.flower_port}/api/tasks"
    if cfg.flower_basic_auth:
        return f"stork flower: REST API with the flower.basic_auth credentials: curl -u USER:PASSWORD {url}"
    return f"stork flower: the REST API ({url}) needs flower.basic_auth in {cfg.file}; the pages work without"


def main() -> None:
    try:
        cfg = config.load()
        argv = flower_argv(cfg)
    except (StorkError, ValueError) as e:
        sys.exit(f"stork flower: {e}")
    env = {"STORK_ROLE": "operator", **os.environ}  # Flower watches: the operator's Redis user where there are users
    if cfg.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = cfg.flower_basic_auth
    print(api_note(cfg), file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
