"""`python -m worker.flower`: Flower on the configured address, 127.0.0.1 by default.

Flower shows every job's tasks and can revoke them, so it refuses to listen on any other
address unless basic auth is configured. The credentials go to Flower through its
environment (FLOWER_BASIC_AUTH), never on a command line that `ps` shows.

Flower 2 answers its REST API (`/api/...`) only when some authentication is configured:
with `flower.basic_auth`, the API takes the same user:password as the pages (HTTP basic
auth, e.g. `curl -u user:password`). Without it the API answers 401 naming
FLOWER_UNAUTHENTICATED_API, the opt-in to an open API, which also lets any web page the
operator's browser opens call it (Flower then allows every origin): stork does not set it.

The task list shows the columns that carry a stork task's job: `kwargs` (its label, from
`task_label`: kind, guests, disks, storages and job id; runner sends it with every task) and
`result` (a copy's progress while it runs, and why a step stopped; see worker/tasks.py).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from drivers import config
from drivers.config import Config
from drivers.errors import StorkError

if TYPE_CHECKING:
    from worker.records import JobRecord

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


def task_label(job: JobRecord) -> str:
    """The job in words for Flower's task list (each task's `label` kwarg, which the task
    ignores): kind, guests, disks, volume, storages (source->target for a copy) and the job
    id, e.g. "full_clone 100->101 scsi0 local->fast, job 3f2a9c1e0b12". Built from a record
    that may have been forged, so it never fails and stays short."""
    try:
        p = job.params if isinstance(job.params, dict) else {}
        guests = "->".join(dict.fromkeys(str(p[k]) for k in ("vmid", "lock_vmid", "new_vmid") if p.get(k) is not None))
        plans = {**(p.get("disks") or {}), **(p.get("bases") or {}), **(p.get("attach") or {})}
        disks = [str(k) for k in plans if k not in ("copy", "disk")] + ([str(p["disk"])] if p.get("disk") else [])
        volume = p.get("volid") or next((v.get("source") for k, v in plans.items()
                                         if k in ("copy", "disk") and isinstance(v, dict)), None)
        planned = [v for v in plans.values() if isinstance(v, dict)]
        targets = sorted({str(v["storage"]) for v in planned if v.get("storage")})
        sources = sorted({str(v.get("source") or v.get("base")).split(":")[0]
                          for v in planned if v.get("source") or v.get("base")} - set(targets))
        storages = ",".join(targets) if targets else ",".join(str(s) for s in p.get("storages") or [])
        if sources and targets:
            storages = f"{','.join(sources)}->{storages}"
        words = [str(job.kind), guests, ",".join(disks), str(volume or ""), storages]
        if not any(words[1:]):
            words.append(str(p.get("node") or ""))  # ping: which node is asked
        text = " ".join(w[:80] for w in words if w)
    except Exception:  # a label is never worth failing a send
        text = str(job.kind)[:80]
    return f"{text[:200]}, job {job.id}"


def main() -> None:
    try:
        cfg = config.load()
        argv = flower_argv(cfg)
    except (StorkError, ValueError) as e:
        sys.exit(f"stork flower: {e}")
    env = dict(os.environ)
    if cfg.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = cfg.flower_basic_auth
    print(api_note(cfg), file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
