"""Dead letters: a message on a task queue that the worker cannot turn into a task is
rejected (never redelivered) and kept in `stork:dead` for an operator, and the worker goes
on serving (DESIGN.md, "Celery settings").

Why the check sits where it does: kombu's Redis channel pops a queue entry with BRPOP and
parses it (JSON envelope, properties, base64 body) before Celery sees anything, so garbage
kills the consumer inside kombu, and only there is the raw text at hand. A consumer
bootstep (`DeadLetters`) therefore sets the task channel's BRPOP reader to `read_one`:
kombu 5.6's `Channel._brpop_read` with every entry checked (`check`) against everything
the consumer and the pool rely on (envelope, Celery protocol 2 headers, content type, a
registered task, the [args, kwargs, embed] body) before kombu and Celery get it. A check
cannot foresee every failure, so an exception while Celery turns a checked message into a
request dead-letters that message too (the backstop), instead of killing the worker.

An entry of `stork:dead` (newest first, capped at MAX_ENTRIES) is a JSON object:
    {"raw": str, "size": int, "reason": str, "queue": str, "node": str, "time": float}
`raw` is the queue entry as text (bytes that are not UTF-8 as backslash escapes), cut at
MAX_RAW characters; `size` its length in bytes; `reason` one line; `time` epoch seconds.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable, Container
from queue import Empty
from typing import Any

import redis
import structlog
from celery import bootsteps
from celery.utils.time import maybe_iso8601
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import loads as decode_body
from kombu.serialization import prepare_accept_content
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as kombu_json_loads

DEAD = "stork:dead"
MAX_RAW = 64 * 1024  # characters of a message kept
MAX_ENTRIES = 10_000  # dead letters kept
MAX_REASON = 500  # characters of a reason

log = structlog.get_logger("stork.worker")


class Malformed(ValueError):
    """The message cannot become a task; the text says why, in one line."""


# ---- the check -------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """The JSON name of a decoded value's type (kombu's JSON hooks may also make e.g. a
    datetime or UUID, shown by its Python name)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str,
         required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise Malformed(f"{where} has no {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        want = " or ".join(_kind(t()) for t in _as_tuple(types))
        raise Malformed(f"{where}.{key} is {_kind(value)}, not {want}")
    return value


_NONE = type(None)
# Celery protocol 2 headers the consumer or the pool reads, and the types they must have
# (absent is fine for these; `task` and `id` are required). Other headers are ignored.
_HEADERS: dict[str, tuple[type, ...]] = {
    "lang": (str,), "argsrepr": (str,), "kwargsrepr": (str,), "origin": (str, _NONE),
    "root_id": (str, _NONE), "parent_id": (str, _NONE), "group": (str, _NONE), "shadow": (str, _NONE),
    "eta": (str, _NONE), "expires": (str, _NONE), "retries": (int,), "group_index": (int, _NONE),
    "ignore_result": (bool, _NONE), "replaced_task_nesting": (int,), "stamped_headers": (list, _NONE),
    "stamps": (dict, _NONE), "timelimit": (list, _NONE), "compression": (_NONE,),
}


def _check_headers(headers: dict[str, Any], known: Container[str]) -> str:
    task = _get(headers, "task", str, "headers")
    if task not in known:
        raise Malformed(f"unknown task {task[:200]!r}")
    if not _get(headers, "id", str, "headers"):
        raise Malformed("headers.id is empty")
    for key, types in _HEADERS.items():
        _get(headers, key, types, "headers", required=False)
    limits = headers.get("timelimit")
    # [hard, soft] seconds, each a number or null: the pool arms timers with them later,
    # outside any handler, so a wrong shape has to be caught here
    if limits is not None and (len(limits) != 2 or not all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)
            for v in limits)):
        raise Malformed(f"headers.timelimit is {json.dumps(limits)[:200]}, not [hard, soft] seconds")
    for key in ("eta", "expires"):
        if headers.get(key):
            try:
                maybe_iso8601(headers[key])
            except (AttributeError, ValueError, TypeError, OverflowError):
                raise Malformed(f"headers.{key} {headers[key][:100]!r} is not an ISO 8601 time") from None
    return task


def _check_body(body: Any) -> None:
    if not isinstance(body, list | tuple) or len(body) != 3:
        shape = f"an array of {len(body)}" if isinstance(body, list | tuple) else _kind(body)
        raise Malformed(f"body is {shape}, not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise Malformed(f"body args is {_kind(args)}, not an array")
    if not isinstance(kwargs, dict):
        raise Malformed(f"body kwargs is {_kind(kwargs)}, not an object")
    if embed is None:
        return
    if not isinstance(embed, dict):
        raise Malformed(f"body embed is {_kind(embed)}, not an object")
    for key in ("callbacks", "errbacks", "chain"):
        value = _get(embed, key, (list, _NONE), "body embed", required=False)
        if value and not all(isinstance(s, dict) for s in value):
            raise Malformed(f"body embed.{key} holds something other than signatures (objects)")
    _get(embed, "chord", (dict, _NONE), "body embed", required=False)


def check(item: bytes, known: Container[str], accept: Container[str]) -> dict[str, Any]:
    """The envelope of a queue entry, as kombu parses it, when Celery can turn it into a
    task of one of the `known` names with a body of an `accept`ed content type; Malformed
    naming the first thing wrong otherwise. Nothing is unpickled or run."""
    try:
        text = item.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed(f"not UTF-8 text: {e}") from None
    try:
        envelope = kombu_json_loads(text)  # kombu's own parser and type hooks
    except Exception as e:  # JSONDecodeError, or a kombu type hook refusing its value
        raise Malformed(f"not JSON: {e}") from None
    if not isinstance(envelope, dict):
        raise Malformed(f"not a message envelope: {_kind(envelope)}, not an object")
    props = _get(envelope, "properties", dict, "envelope")
    _get(props, "delivery_tag", str, "properties")
    info = _get(props, "delivery_info", dict, "properties")
    _get(info, "exchange", str, "properties.delivery_info")
    _get(info, "routing_key", str, "properties.delivery_info")
    if _get(props, "body_encoding", (str, _NONE), "properties", required=False) not in (None, "base64"):
        raise Malformed(f"properties.body_encoding {props['body_encoding'][:50]!r} is not base64")
    body = _get(envelope, "body", str, "envelope")
    headers = _get(envelope, "headers", dict, "envelope")
    content_type = _get(envelope, "content-type", str, "envelope")
    if content_type not in accept:  # checked before decoding: a pickle is never loaded
        raise Malformed(f"content type {content_type[:100]!r} is not accepted ({', '.join(sorted(accept))} only)")
    encoding = _get(envelope, "content-encoding", str, "envelope")
    if encoding.lower() not in ("utf-8", "utf8"):
        raise Malformed(f"content encoding {encoding[:50]!r} is not utf-8")
    _check_headers(headers, known)
    try:
        data = base64.b64decode(body, validate=True) if props.get("body_encoding") else body.encode()
    except (binascii.Error, ValueError) as e:
        raise Malformed(f"body is not base64: {e}") from None
    try:
        decoded = decode_body(data, content_type, encoding, accept=accept)
    except (DecodeError, ContentDisallowed, ValueError, TypeError) as e:
        raise Malformed(f"body is not {content_type}: {e}") from None
    _check_body(decoded)
    return envelope


# ---- keeping them ------------------------------------------------------------------------


def one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_REASON]


def entry(item: bytes, reason: str, queue: str, node: str) -> dict[str, Any]:
    return {"raw": item[: MAX_RAW * 4].decode("utf-8", "backslashreplace")[:MAX_RAW], "size": len(item),
            "reason": one_line(reason), "queue": queue, "node": node, "time": time.time()}


def keep(r: redis.Redis, item: bytes, reason: str, queue: str, node: str) -> None:
    """Add a dead letter, log it, and never raise: the worker goes on if Redis fails here
    (the log line then carries the start of the message)."""
    dead = entry(item, reason, queue, node)
    try:
        with r.pipeline(transaction=True) as p:
            p.lpush(DEAD, json.dumps(dead))
            p.ltrim(DEAD, 0, MAX_ENTRIES - 1)
            p.execute()
    except redis.RedisError as e:
        log.error("message_dead_letter_lost", reason=dead["reason"], queue=queue, error=str(e),
                  raw=dead["raw"][:4096])
        return
    log.warning("message_dead_lettered", reason=dead["reason"], queue=queue, size=dead["size"])


def read(r: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` dead letters, newest first."""
    if limit < 1:
        return []
    found = []
    for text in r.lrange(DEAD, 0, limit - 1):
        try:
            dead = json.loads(text)
        except ValueError:
            dead = None
        # written by hand, perhaps: shown as it is rather than hidden
        found.append(dead if isinstance(dead, dict) else {"raw": text, "reason": "not a dead-letter entry"})
    return found


# ---- the consumer hook -------------------------------------------------------------------

Keep = Callable[[bytes, str, str], None]


def read_one(channel: kombu_redis.Channel, known: Container[str], accept: Container[str], dead: Keep,
             **options: Any) -> bool:
    """kombu 5.6's `Channel._brpop_read` (read the BRPOP reply, rotate the queue cycle,
    deliver), with the entry checked before kombu parses it; a malformed one is popped
    and kept, never delivered, so it is never redelivered either."""
    try:
        try:
            reply = channel.client.parse_response(channel.client.connection, "BRPOP", **options)
        except channel.connection_errors:
            channel.client.connection.disconnect()  # the next poll reconnects
            raise
        if not reply:
            raise Empty()
        dest, item = reply
        queue = bytes_to_str(dest).rsplit(channel.sep, 1)[0]
        channel._queue_cycle.rotate(queue)
        try:
            envelope = check(item, known, accept)
        except Exception as e:  # Malformed, or a check tripping over what it did not foresee: kept all the same
            reason = str(e) if isinstance(e, Malformed) else f"the check failed on it: {type(e).__name__}: {e}"
            dead(item, reason, queue)
            return True
        try:
            channel.connection._deliver(envelope, queue)
        except (*channel.connection.connection_errors, *channel.connection.channel_errors):
            raise  # Redis trouble, not the message's: the consumer reconnects as before
        except Exception as e:  # the backstop: a check that missed something must not kill the worker
            log.error("message_failed_in_consumer", queue=queue, exc_info=True)
            dead(item, f"the consumer failed on it: {type(e).__name__}: {e}", queue)
            channel.basic_reject(envelope["properties"]["delivery_tag"], requeue=False)  # out of `unacked`
        return True
    finally:
        channel._in_poll = None


class DeadLetters(bootsteps.StartStopStep):
    """Consumer bootstep: after the Tasks step has made the task consumer (on every
    (re)connection), route its channel's BRPOP replies through `read_one`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from worker.app import config, redis_client

        channel = c.task_consumer.channel
        current = channel.handlers.get("BRPOP")
        if not isinstance(channel, kombu_redis.Channel) or current is None:
            log.warning("dead_letters_off", reason=f"broker channel {type(channel).__name__} is not kombu's Redis")
            return
        if getattr(current, "stork_dead_letters", False):
            return  # already set on this channel
        node = config().node
        accept = prepare_accept_content(c.app.conf.accept_content)

        def dead(item: bytes, reason: str, queue: str) -> None:
            keep(redis_client(), item, reason, queue, node)

        def handler(**options: Any) -> bool:
            # c.strategies is Celery's own table of the tasks this consumer can run
            return read_one(channel, c.strategies, accept, dead, **options)

        handler.stork_dead_letters = True  # type: ignore[attr-defined]
        channel.handlers["BRPOP"] = handler
