"""The alert for a guest whose newest backup is older than a target's `stale-after` hours (or
that has none): checked by the schedule tick at most once an hour (it reads every manifest of
every backup storage this node reaches, and what every node's backups recorded in Redis), and
said at most once a day per guest and target."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis
import structlog
from celery import Celery

from drivers import BACKUP_STORAGES, backup_storage
from drivers.config import Config
from drivers.errors import StorkError
from drivers.guests import GuestStore
from worker import notify
from worker.records import BACKUPS

log = structlog.get_logger("stork.stale")
CHECK_EVERY = 3600  # seconds between two looks at the backup storages
REPEAT = 86400  # seconds before a guest still stale is said again to a target


def stale_guests(guests: list[int], newest: dict[int, float], hours: int, now: float) -> list[int]:
    """The guests whose newest backup (epoch seconds; none: never) is older than `hours`."""
    return [g for g in guests if newest.get(g, 0.0) < now - hours * 3600]


def newest_backups(cfg: Config, r: redis.Redis) -> dict[int, float]:
    """Each guest's newest backup (epoch seconds): the last one that succeeded on any node (as
    the backup step records it for the metrics), and the newest readable one in the backup
    storages this node reaches (backups from before that record, or copied there by a sync);
    a storage that cannot be read is logged and left out."""
    newest: dict[int, float] = {int(vmid): json.loads(raw)["time"] for vmid, raw in r.hgetall(BACKUPS).items()}
    for storage in cfg.storages.values():
        if storage.type not in BACKUP_STORAGES or not storage.on_node(cfg.node):
            continue
        try:
            snapshots = backup_storage(storage).open().snapshots()
        except StorkError as e:
            log.warning("stale_check_storage_unread", storage=storage.id, error=str(e))
            continue
        for s in snapshots:
            newest[s.id.vmid] = max(newest.get(s.id.vmid, 0.0), s.id.time.timestamp())
    return newest


def check(cfg: Config, r: redis.Redis, sender: Celery, now: datetime) -> None:
    """Announce each stale guest to each target that takes backup-stale, if this hour's look is
    this tick's to take. Never raises: the tick's backups matter more."""
    targets = notify.targets_for(cfg, "backup-stale")
    if not targets or not notify.once(r, f"stale-check:{int(now.timestamp()) // CHECK_EVERY}", CHECK_EVERY):
        return
    try:
        guests, _broken = GuestStore(cfg.guests_dir, cfg.lock_timeout).scan()  # broken ones: `guest list`'s news
        newest = newest_backups(cfg, r)
    except (StorkError, OSError) as e:
        log.error("stale_check_failed", error=str(e))
        return
    for name in targets:
        hours = cfg.notify[name]["stale-after"]
        for vmid in stale_guests(sorted(g.vmid for g in guests), newest, hours, now.timestamp()):
            if notify.once(r, f"stale:{name}:{vmid}", REPEAT):
                when = f"its newest backup is from {datetime.fromtimestamp(newest[vmid], UTC).isoformat()}" \
                    if vmid in newest else "it has no backup"
                notify.announce(cfg, sender, notify.event(
                    "backup-stale", f"guest {vmid}: {when}, older than {hours} hours", vmid=vmid, hours=hours,
                    newest=newest.get(vmid)), only=[name])
