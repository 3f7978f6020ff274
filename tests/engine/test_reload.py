"""A running worker follows its config file: a storage added to it serves the next job, a broken
edit keeps the last good config (logged once), and what the worker was built from needs a restart.

The real-process tests run a worker of their own (node `reload`, one pool process, so "once" is
one line in its log) on a Redis database of their own, so the session's workers, which read
another config, never take their steps from the shared queue.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest
import redis

from drivers import config
from drivers.config import Config, StorageConfig
from producer.client import Client
from tests.conftest import CONFIG, REDIS_PORT
from worker import testing
from worker.app import RESTART_KEYS, LiveConfig, needs_restart, pinned

NODE = "reload"
_dbs = itertools.count(9)  # one Redis database per test, away from the session's 0


def own_config(tmp_path: Path, db: int) -> Path:
    """The session's config text on Redis database `db`, its paths made absolute under tmp_path."""
    text = CONFIG.read_text().replace(f"{REDIS_PORT}/0", f"{REDIS_PORT}/{db}")
    text = re.sub(r'^(path|guests|locks) = "(?!all")([^"/]+)"$', lambda m: f'{m[1]} = "{tmp_path / m[2]}"', text,
                  flags=re.MULTILINE)
    file = tmp_path / "stork.toml"
    file.write_text(text)
    file.chmod(0o600)  # it holds a secret
    return file


def fast_storage(tmp_path: Path) -> str:
    """A node-local storage on node `reload`: its steps go to the queue node.reload."""
    return f'[storage.fast]\ntype = "dir"\npath = "{tmp_path / "fast"}"\nnodes = ["{NODE}"]\n'


@dataclass
class Node:
    file: Path
    db: int
    worker: testing.Worker

    def client(self) -> Client:
        """A producer for node `reload` on the file as it is now (as the CLI reads it)."""
        return Client(config.load({"STORK_CONFIG": str(self.file), "STORK_NODE": NODE}))

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The worker's JSON log lines for `event`."""
        lines = [line for line in self.worker.log.read_text().splitlines() if line.startswith("{")]
        return [record for record in map(json.loads, lines) if record.get("event") == event]


@pytest.fixture
def node(redis_server: redis.Redis, tmp_path: Path) -> Iterator[Node]:
    """A worker for node `reload` with a config file of its own, stopped after the test."""
    db = next(_dbs)
    redis.Redis(port=REDIS_PORT, db=db).flushdb()
    file = own_config(tmp_path, db)
    worker = testing.Worker(NODE, tmp_path, concurrency=1, env={"STORK_CONFIG": str(file)})
    try:
        yield Node(file, db, worker)
    finally:
        worker.stop()


# ---- against a real worker ---------------------------------------------------------------


def test_a_storage_added_while_the_worker_runs_serves_a_job_without_a_restart(node: Node, tmp_path: Path):
    """`fast` is added to the file after the worker started; a create on it succeeds on that same worker."""
    with node.file.open("a") as f:
        f.write(fast_storage(tmp_path))
    job = node.client().run("create", vmid=100, node=NODE, disks={"scsi0": {"storage": "fast", "size": "8M"}},
                            timeout=60)
    assert job.state == "succeeded", job.error
    volid = job.result["disks"]["scsi0"]
    assert volid.startswith("fast:") and (tmp_path / "fast" / volid.split(":", 1)[1]).is_file()
    assert f"node.{NODE}" in job.queues and set(job.ran_on.values()) == {NODE}
    assert [line["changed"] for line in node.logged("config_reloaded")] == [["storage.fast"]]
    assert node.worker.proc.poll() is None and len(node.logged("worker_ready")) == 1  # never restarted


def test_a_broken_edit_keeps_the_worker_serving_and_is_logged_once(node: Node, tmp_path: Path):
    """After an edit that does not load, pings still succeed and the log has one config_reload_failed line."""
    stork = node.client()
    good = node.file.read_text()
    node.file.write_text(good + '[storage.bad]\ntype = "dir"\npath = "bad"\nnodes = ["N1!"]\n')
    for _ in range(2):  # six steps, each calling config(): still one line
        job = stork.run("ping", node=NODE, timeout=60)
        assert job.state == "succeeded", job.error
    failed = node.logged("config_reload_failed")
    assert len(failed) == 1 and "storage.bad.nodes = ['N1!']: expected" in failed[0]["error"]
    node.file.write_text(good + fast_storage(tmp_path))  # the next good edit is taken up
    job = node.client().run("create", vmid=100, node=NODE, disks={"scsi0": {"storage": "fast", "size": "8M"}},
                            timeout=60)
    assert job.state == "succeeded", job.error
    assert len(node.logged("config_reload_failed")) == 1


def test_a_changed_redis_url_is_logged_as_needing_a_restart_and_not_applied(node: Node):
    """The worker keeps the Redis it started on (pings through it succeed) and logs config_needs_restart once."""
    stork = node.client()  # on the Redis database the worker started with
    other = 15  # never connected to: the worker keeps its start URL
    text = node.file.read_text()
    node.file.write_text(text.replace(f"{REDIS_PORT}/{node.db}", f"{REDIS_PORT}/{other}")
                         .replace("concurrency = 4", "concurrency = 2"))
    for _ in range(2):
        job = stork.run("ping", node=NODE, timeout=60)
        assert job.state == "succeeded", job.error
    assert [line["keys"] for line in node.logged("config_needs_restart")] == [["redis.url", "worker.concurrency"]]


# ---- the decisions, in-process -------------------------------------------------------------

BASE = """
[redis]
url = "redis://127.0.0.1:6399/0"
[paths]
guests = "g"
locks = "l"
[storage.local]
type = "dir"
path = "images"
"""


def parsed(text: str, node: str = "node1") -> Config:
    return config.parse(text, Path("/etc/stork/stork.toml"), {"STORK_NODE": node})


@pytest.mark.parametrize(
    ("new", "keys"),
    [
        pytest.param(BASE, [], id="same-text"),
        pytest.param(BASE + "# a comment\n", [], id="only-a-comment"),
        pytest.param(BASE + '[storage.fast]\ntype = "dir"\npath = "fast"\n', ["storage.fast"], id="storage-added"),
        pytest.param(BASE.split("[storage.local]")[0], ["storage.local"], id="storage-removed"),
        pytest.param(BASE.replace('"images"', '"img"'), ["storage.local"], id="storage-path-changed"),
        pytest.param(BASE + "[locks]\ntimeout = 5\n", ["locks.timeout"], id="lock-timeout"),
        pytest.param(BASE.replace('"g"', '"guests"'), ["paths.guests"], id="guests-dir"),
        pytest.param(BASE.replace("6399/0", "6399/1"), ["redis.url"], id="redis-url"),
        pytest.param(BASE + "[worker]\nconcurrency = 2\nvisibility_timeout = 600\n",
                     ["worker.concurrency", "worker.visibility_timeout"], id="worker-settings"),
        pytest.param(BASE + "[flower]\nbasic_auth = 'a:b'\n", ["flower.basic_auth"], id="flower-auth"),
        pytest.param(BASE + "[notify.ops]\ntype = 'webhook'\nurl = 'http://h/x'\n", ["notify.ops"], id="alert-target"),
        pytest.param(BASE + "[storage.b]\ntype = 'chunkstore'\npath = 'b'\n"
                     "[storage.c]\ntype = 'chunkstore'\npath = 'c'\n"
                     "[sync.off]\nschedule = '0 3 * * *'\nfrom = 'b'\nto = 'c'\n",
                     ["storage.b", "storage.c", "sync.off"], id="sync-schedule"),
        pytest.param(BASE + "[schedule.nightly]\nschedule = '0 2 * * *'\nguests = 'all'\n", ["schedule.nightly"],
                     id="schedule-added"),
    ],
)
def test_changed_keys_names_every_key_whose_value_differs(new: str, keys: list[str]):
    """The pure decision: which keys an edit changed, storages as storage.<id>, comments ignored."""
    assert config.changed_keys(parsed(BASE), parsed(new)) == keys


@pytest.mark.parametrize(
    ("changed", "restart"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param(["storage.fast", "paths.guests", "paths.locks", "locks.timeout"], [], id="all-reloadable"),
        pytest.param(["redis.url", "storage.fast"], ["redis.url"], id="redis-url"),
        pytest.param(["worker.concurrency", "worker.visibility_timeout"],
                     ["worker.concurrency", "worker.visibility_timeout"], id="worker-settings"),
        pytest.param(["STORK_NODE"], ["STORK_NODE"], id="node-name"),
        pytest.param(["jobs.keep_days"], ["jobs.keep_days"], id="keep-days-set-at-start"),
        pytest.param(["flower.port"], [], id="flower-is-not-the-workers"),
    ],
)
def test_needs_restart_picks_the_keys_a_running_worker_cannot_take_on(changed: list[str], restart: list[str]):
    """The pure decision: redis.url, the node's name, concurrency, visibility timeout and the days
    jobs are kept need a restart."""
    assert needs_restart(changed) == restart


def test_every_config_field_is_named_by_a_key():
    """A new Config field cannot be forgotten by changed_keys (file is where, not what; storages,
    schedules and alert targets are named one by one)."""
    # redis_url is [redis]'s url, named on its own: the part of [redis] an operator changes most
    assert {f.name for f in fields(Config)} - {"file", "storages", "schedules", "notify"} == \
        set(config.FIELD_KEYS) - {"redis_url"}
    assert set(RESTART_KEYS) <= set(config.FIELD_KEYS.values())


def test_pinned_keeps_the_start_values_of_what_needs_a_restart():
    """The served config has the file's storages and lock timeout, and the start Redis, node and worker settings."""
    start = parsed(BASE)
    loaded = replace(parsed(BASE.replace("6399/0", "6399/1") + "[locks]\ntimeout = 5\n", node="other"),
                     worker_concurrency=9, visibility_timeout=900, job_keep_days=7,
                     storages={"fast": StorageConfig("fast", "dir", options={"path": Path("/fast")})})
    served = pinned(start, loaded)
    assert (served.redis_url, served.node, served.worker_concurrency, served.visibility_timeout,
            served.job_keep_days) == (start.redis_url, start.node, start.worker_concurrency,
                                      start.visibility_timeout, start.job_keep_days)
    assert served.storages == loaded.storages and served.lock_timeout == 5


class Recorder:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def error(self, event: str, **kw: Any) -> None:
        self.lines.append(("error", event, kw))

    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


def test_live_config_stats_once_per_call_and_reloads_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Unchanged: one stat and the same config; broken: last good kept, one line; fixed: the new storage served."""
    file = tmp_path / "stork.toml"
    file.write_text(BASE)
    log = Recorder()
    live = LiveConfig({"STORK_CONFIG": str(file), "STORK_NODE": NODE}, log)
    first = live.get()
    stats: list[Any] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **kw: stats.append(a) or real_stat(*a, **kw))
    assert all(live.get() is first for _ in range(5)) and len(stats) == 5
    monkeypatch.undo()
    file.write_text(BASE + '[storage.fast]\ntype = "dir"\npath = "fast"\nnodes = ["N1!"]\n')
    assert all(live.get() is first for _ in range(3))
    assert log.events() == ["config_reload_failed"] and "storage.fast.nodes" in log.lines[0][2]["error"]
    file.write_text(BASE + '[storage.fast]\ntype = "dir"\npath = "fast"\n')
    assert live.get().storage("fast").path == tmp_path / "fast"
    assert log.events() == ["config_reload_failed", "config_reloaded"]
    assert log.lines[1][2]["changed"] == ["storage.fast"]


def test_live_config_says_needs_restart_once_per_edit_of_a_fixed_key(tmp_path: Path):
    """An edit of redis.url logs it; a later unrelated edit does not repeat it; the start URL is still served."""
    file = tmp_path / "stork.toml"
    file.write_text(BASE)
    log = Recorder()
    live = LiveConfig({"STORK_CONFIG": str(file), "STORK_NODE": NODE}, log)
    file.write_text(BASE.replace("6399/0", "6399/10"))  # each edit changes the size: see stamp()
    assert live.get().redis_url == "redis://127.0.0.1:6399/0"
    file.write_text(BASE.replace("6399/0", "6399/10") + "[locks]\ntimeout = 5\n")
    assert live.get().lock_timeout == 5
    assert [kw["keys"] for _, event, kw in log.lines if event == "config_needs_restart"] == [["redis.url"]]
