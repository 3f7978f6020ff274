"""What stork reads of kombu's Redis transport: a queue is a list (one per priority level), a
message taken by a consumer and not yet acknowledged sits in the `unacked` hash, with the time
it was taken in the `unacked_index` sorted set. The sweep reads them to tell a lost message
from one on its way; a ping nobody answered takes its message back out of the queue."""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

PRIORITY_SEP = "\x06\x16"  # kombu keeps a queue's priority levels in lists <queue><sep><n>


@dataclass(frozen=True)
class Pending:
    """A step, undo or finalize message the broker holds for a job."""

    task: str
    since: float | None  # None: in a queue, waiting for a worker; else taken then, not yet acknowledged
    through: int | None = None  # a fused run (worker.runner.send_steps): its last step's index


def _queue_keys(queues: Iterable[str]) -> Iterator[str]:
    for queue in queues:
        yield queue
        yield from (f"{queue}{PRIORITY_SEP}{n}" for n in range(1, 10))


def pending_messages(r: redis.Redis, queues: set[str]) -> dict[str, list[Pending]]:
    """stork's messages in the broker, by job id: queued in these queues' lists, or taken by
    a consumer and not yet acknowledged (kombu's `unacked` hash and its `unacked_index`)."""
    found: dict[str, list[Pending]] = defaultdict(list)
    for key in _queue_keys(queues):
        for raw in r.lrange(key, 0, -1):
            _note(found, raw, None)
    taken = dict(r.zrange("unacked_index", 0, -1, withscores=True))
    for tag, raw in r.hgetall("unacked").items():
        try:
            message = json.loads(raw)[0]  # [message, exchange, routing key]
        except (ValueError, IndexError, TypeError):
            continue
        _note(found, message, taken.get(tag, 0.0))
    return found


def _note(found: dict[str, list[Pending]], message: Any, since: float | None) -> None:
    """Add a message of ours (first argument: the job id); skip anything else."""
    try:
        if isinstance(message, str):
            message = json.loads(message)
        task = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _ = json.loads(body)
        job_id, through = args[0], kwargs.get("through")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return
    if isinstance(task, str) and task.startswith("stork.") and isinstance(job_id, str):
        found[job_id].append(Pending(task, since, through if type(through) is int else None))


def drop_queued(r: redis.Redis, queues: Iterable[str], job_id: str) -> int:
    """Take the job's messages out of these queues (not those a consumer has taken); how many."""
    dropped = 0
    for key in _queue_keys(queues):
        for raw in r.lrange(key, 0, -1):
            found: dict[str, list[Pending]] = defaultdict(list)
            _note(found, raw, None)
            if job_id in found:
                dropped += int(r.lrem(key, 0, raw))
    return dropped
