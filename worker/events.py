"""Job events: JSON in a capped Redis Stream per job (the record a late watcher replays),
announced on one pub/sub channel for live listeners (pub/sub alone drops messages nobody
is subscribed to, so it is only a wake-up).

An event: {"job", "kind", "step", "phase", "state", "done", "total", "rate", "message",
"node", "time"}; phases: queued, start, progress, done, failed, undo, abandon (an operator gave up a
node's undos: `stork job abandon`), not_begun (a step's start its Redis replicas did not
confirm: given back, sent again by the sweep), finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from worker.records import CHANNEL, STREAM_MAXLEN, events_key

FINISHED = "finished"


def make(job_id: str, kind: str, phase: str, **fields: Any) -> dict[str, Any]:
    return {"job": job_id, "kind": kind, "phase": phase, "time": time.time(), **fields}


def emit(r: redis.Redis, job_id: str, kind: str, phase: str, **fields: Any) -> dict[str, Any]:
    """Publish an event that goes with no state change (e.g. progress); state changes
    publish theirs through records.transition."""
    event = make(job_id, kind, phase, **fields)
    data = json.dumps(event)
    with r.pipeline(transaction=False) as p:
        p.xadd(events_key(job_id), {"event": data}, maxlen=STREAM_MAXLEN, approximate=True)
        p.publish(CHANNEL, data)
        p.execute()
    return event


def follow(r: redis.Redis, job_id: str, block_ms: int = 1000, start: str = "0-0") -> Iterator[dict[str, Any] | None]:
    """Yield every event of a job from the beginning, then live ones; None when idle for
    `block_ms` (so callers can check the record or a deadline). Ends after `finished`."""
    last = start
    while True:
        batch = r.xread({events_key(job_id): last}, block=block_ms, count=500)
        if not batch:
            yield None
            continue
        for entry_id, values in batch[0][1]:
            last = entry_id
            event = json.loads(values["event"])
            yield event
            if event.get("phase") == FINISHED:
                return
