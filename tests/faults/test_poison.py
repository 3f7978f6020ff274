"""Poison messages: whatever lands on a worker's queues, the worker survives it. A message the
consumer cannot turn into a task is rejected, never redelivered, and kept in `stork:dead`
with a one-line reason; the workers go on serving (DESIGN.md, "Celery settings")."""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from kombu.serialization import prepare_accept_content

from tests.conftest import BASE
from worker import deadletter
from worker.testing import Worker, wait_for

QUEUES = ("shared", "node.node1", "node.node2")
TEMPLATE_QUEUE = "poison-template"  # no worker consumes it: a real message is read from it


@pytest.fixture(scope="module")
def raw_redis(workers: dict[str, Worker], client: Any) -> redis.Redis:
    """Bytes in, bytes out: some poison is not UTF-8."""
    return redis.Redis.from_url(client.cfg.redis_url)


@pytest.fixture(scope="module")
def real(client: Any, raw_redis: redis.Redis) -> dict[str, Any]:
    """A real Celery message (stork.noop) as the Redis transport stores it."""
    client.app.send_task("stork.noop", args=[None], queue=TEMPLATE_QUEUE)
    raw = raw_redis.lpop(TEMPLATE_QUEUE)
    assert raw is not None
    return json.loads(raw)


@pytest.fixture(scope="module")
def known() -> set[str]:
    """The task names a worker registers (the client's app does not import the tasks)."""
    import worker.tasks

    return set(worker.tasks.app.tasks)


@pytest.fixture(scope="module")
def accept(client: Any) -> set[str]:
    return prepare_accept_content(client.app.conf.accept_content)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def message(real: dict[str, Any], marker: str, drop: tuple[str, ...] = (), body: Any = None,
            body_bytes: bytes | None = None, properties: dict[str, Any] | None = None, **headers: Any) -> str:
    """The real message with its id (and delivery tag) set to the marker, `headers` and
    `properties` changed, envelope keys dropped (`properties`, `headers.task`, ...), and
    another body."""
    m = json.loads(json.dumps(real))
    m["headers"]["id"] = m["properties"]["delivery_tag"] = marker
    m["headers"].update(headers)
    m["properties"].update(properties or {})
    for key in drop:
        if key.startswith("headers."):
            del m["headers"][key.split(".", 1)[1]]
        elif key.startswith("properties."):
            del m["properties"][key.split(".", 1)[1]]
        else:
            del m[key]
    if body is not None:
        m["body"] = b64(json.dumps(body).encode())
    if body_bytes is not None:
        m["body"] = b64(body_bytes)
    return json.dumps(m)


class Unpickled:
    """Loading this pickle makes a directory: it must never happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.path),)


def pickled(real: dict[str, Any], marker: str) -> str:
    m = json.loads(message(real, marker))
    m["content-type"] = "application/x-python-serialize"
    m["content-encoding"] = "binary"
    m["body"] = b64(pickle.dumps(((Unpickled(BASE / f"unpickled-{marker}"),), {}, {})))
    return json.dumps(m)


Make = Callable[[dict[str, Any], str], str | bytes]

# id, how to make it from (real message, marker), what its reason says
CASES: list[tuple[str, Make, str]] = [
    ("garbage text", lambda r, m: f"this is not a message {m}", "not JSON"),
    ("a JSON number", lambda r, m: str(int(m.replace("-", "")[:15], 16)), "not a message envelope: a number"),
    ("an empty object", lambda r, m: "{}", "envelope has no 'properties'"),
    ("an envelope without properties", lambda r, m: message(r, m, drop=("properties",)),
     "envelope has no 'properties'"),
    ("no delivery_info", lambda r, m: message(r, m, drop=("properties.delivery_info",)),
     "properties has no 'delivery_info'"),
    ("an unknown body encoding", lambda r, m: message(r, m, properties={"body_encoding": "rot13"}),
     "properties.body_encoding 'rot13' is not base64"),
    ("a base64 body that is not JSON", lambda r, m: message(r, m, body_bytes=b"not json at all"),
     "body is not application/json"),
    ("a sweep whose body is an object", lambda r, m: message(r, m, body={"x": 1}, task="stork.job.sweep"),
     "body is an object, not [args, kwargs, embed]"),
    ("a body of two", lambda r, m: message(r, m, body=[[], {}]), "body is an array of 2, not [args, kwargs, embed]"),
    ("timelimit of strings", lambda r, m: message(r, m, timelimit=["a", "b"]),
     'headers.timelimit is ["a", "b"], not [hard, soft] seconds'),
    ("an unknown task name", lambda r, m: message(r, m, task="stork.no.such.task"),
     "unknown task 'stork.no.such.task'"),
    ("a task name that is a list", lambda r, m: message(r, m, task=["stork.noop"]),
     "headers.task is an array, not a string"),
    ("argsrepr of the wrong type", lambda r, m: message(r, m, argsrepr={"a": 1}),
     "headers.argsrepr is an object, not a string"),
    ("headers without task", lambda r, m: message(r, m, drop=("headers.task",)), "headers has no 'task'"),
    ("headers that are a list", lambda r, m: json.dumps({**json.loads(message(r, m)), "headers": [m]}),
     "envelope.headers is an array, not an object"),
    ("an eta that is not a time", lambda r, m: message(r, m, eta="tomorrow"),
     "headers.eta 'tomorrow' is not an ISO 8601 time"),
    ("a pickle", pickled, "content type 'application/x-python-serialize' is not accepted"),
    ("bytes that are not UTF-8", lambda r, m: b"\xff\xfe" + m.encode(), "not UTF-8 text"),
]


def dead_letters(client: Any) -> list[dict[str, Any]]:
    return client.dead_letters(limit=deadletter.MAX_ENTRIES)


def process_ids(w: Worker) -> tuple[int, set[int]]:
    """The worker's main process and its pool processes."""
    assert w.proc.poll() is None, f"worker {w.node} died:\n{w.log.read_text()[-3000:]}"
    children = Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split()
    return w.proc.pid, {int(c) for c in children}


def push_everywhere(raw_redis: redis.Redis, real: dict[str, Any], make: Make) -> list[tuple[str, str | bytes, str]]:
    """Push one message per queue, each with its own marker: [(queue, raw, marker)]."""
    pushed = []
    for queue in QUEUES:
        marker = str(uuid.uuid4())
        raw = make(real, marker)
        raw_redis.lpush(queue, raw)
        pushed.append((queue, raw, marker))
    return pushed


def as_kept(raw: str | bytes) -> str:
    return raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw


def test_every_malformed_message_is_dead_lettered_and_the_workers_keep_serving(
        workers: dict[str, Worker], client: Any, raw_redis: redis.Redis, real: dict[str, Any]) -> None:
    """Each malformed message, on every queue, is kept with its reason; no worker restarts."""
    before = {node: process_ids(w) for node, w in workers.items()}
    start = time.time()
    pushed = {case: push_everywhere(raw_redis, real, make) for case, make, _ in CASES}
    expected = {(queue, as_kept(raw)) for sent in pushed.values() for queue, raw, _ in sent}

    def kept() -> dict[tuple[str, str], dict[str, Any]]:
        return {(d["queue"], d["raw"]): d for d in dead_letters(client) if d.get("time", 0) >= start - 1}

    found = wait_for(lambda: (k := kept()) and expected <= k.keys() and k, 20, "every message dead-lettered")
    for case, _, reason in CASES:
        for queue, raw, _ in pushed[case]:
            dead = found[(queue, as_kept(raw))]
            assert reason in dead["reason"], (case, dead["reason"])
            assert "\n" not in dead["reason"] and dead["node"] in ("node1", "node2"), dead
            assert queue != "node.node2" or dead["node"] == "node2", dead
            assert queue != "node.node1" or dead["node"] == "node1", dead
    for queue in QUEUES:  # rejected, never redelivered: nothing left on a queue or unacked
        assert raw_redis.llen(queue) == 0
    markers = [marker for sent in pushed.values() for _, _, marker in sent]
    unacked = b"".join(raw_redis.hvals("unacked"))
    assert not [m for m in markers if m.encode() in unacked]
    assert not list(BASE.glob("unpickled-*")), "a pickle was loaded"
    for node in ("node1", "node2"):
        job = client.run("ping", node=node, timeout=60)
        assert job.state == "succeeded", job.error
    assert {node: process_ids(w) for node, w in workers.items()} == before
    for w in workers.values():
        log = w.log.read_text()
        assert "Unrecoverable error" not in log
        assert '"event": "message_dead_lettered"' in log


def test_the_check_passes_a_real_task_message_unchanged(real: dict[str, Any], known: set[str],
                                                        accept: set[str]) -> None:
    """A message Celery itself sent passes the check, so normal tasks are unaffected."""
    assert deadletter.check(json.dumps(real).encode(), known, accept) == real


@pytest.mark.parametrize(("case", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_the_check_names_what_is_wrong_in_one_line(case: str, make: Make, reason: str, real: dict[str, Any],
                                                   known: set[str], accept: set[str]) -> None:
    """Each malformed message fails the check (in-process) with its one-line reason."""
    raw = make(real, str(uuid.uuid4()))
    with pytest.raises(deadletter.Malformed) as caught:
        deadletter.check(raw if isinstance(raw, bytes) else raw.encode(), known, accept)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_message_the_consumer_fails_on_is_dead_lettered_and_taken_out_of_unacked(
        client: Any, raw_redis: redis.Redis, real: dict[str, Any], known: set[str], accept: set[str]) -> None:
    """The backstop: a checked message whose delivery raises is kept and rejected, not raised."""
    queue = f"poison-backstop-{uuid.uuid4()}"
    marker = str(uuid.uuid4())
    raw = message(real, marker)
    kept: list[tuple[bytes, str, str]] = []

    def fail(message: Any) -> None:  # stands in for a Celery consumer that chokes on it
        raise RuntimeError("choked\non it")

    with Connection(client.cfg.redis_url) as conn:
        channel = conn.default_channel
        channel.basic_consume(queue, no_ack=False, callback=fail, consumer_tag="poison-test")
        raw_redis.lpush(queue, raw)
        channel.connection.cycle._register_BRPOP(channel)  # sends the BRPOP, as kombu's poller does
        assert deadletter.read_one(channel, known, accept, lambda item, reason, q: kept.append((item, reason, q)))
        channel.basic_cancel("poison-test")
    assert kept == [(raw.encode(), "the consumer failed on it: RuntimeError: choked\non it", queue)]
    assert deadletter.entry(*kept[0], "node1")["reason"] == "the consumer failed on it: RuntimeError: choked on it"
    assert marker.encode() not in raw_redis.hkeys("unacked")  # the delivery tag
    assert not [v for v in raw_redis.hvals("unacked") if marker.encode() in v]
    assert raw_redis.llen(queue) == 0


def test_job_dead_lists_dead_letters_newest_first_and_as_json(
        workers: dict[str, Worker], client: Any, raw_redis: redis.Redis, stork: Any) -> None:
    """`stork job dead` shows time, queue, reason and the start of raw; --json parses."""
    first, second = (f"garbage {uuid.uuid4()} " + "y" * 200 for _ in range(2))
    raw_redis.lpush("node.node2", first)
    wait_for(lambda: any(d["raw"] == first for d in dead_letters(client)), 10, "the first dead letter")
    raw_redis.lpush("shared", second)
    wait_for(lambda: any(d["raw"] == second for d in dead_letters(client)), 10, "the second dead letter")

    code, out, _ = stork("job", "dead", "--limit", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert second[:100] in lines[0] and first[:100] in lines[1]  # newest first
    assert second[:121] not in lines[0]  # the first 120 characters of raw
    assert " shared " in lines[0] and " node.node2 " in lines[1] and "not JSON" in lines[0]

    assert stork("job", "dead", "--limit", "0")[1] == "no dead letters\n"  # never a blank line
    code, out, _ = stork("job", "dead", "--json", "--limit", "2")
    assert code == 0
    found = json.loads(out)
    assert [d["raw"] for d in found] == [second, first]
    assert set(found[0]) == {"raw", "size", "reason", "queue", "node", "time"}
    assert found[1]["node"] == "node2" and found[1]["size"] == len(first)
