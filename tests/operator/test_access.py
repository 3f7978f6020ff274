"""Who may talk to stork's Redis, with real Redis ACL users: the config names a user per role
(worker, producer, operator), `stork redis users` prints their ACL lines, and a Redis started
with them serves a worker and the CLI. A producer submits, reads and cancels, and cannot do
what a worker does (take a message, hold a lease, beat); the operator reads and cannot
submit, and Flower runs as the operator; nobody gets in without a password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import FLOWER_LOGIN, running_flower
from worker import testing
from worker.testing import ROOT, free_port

PASSWORDS = {"worker": "w-secret-1", "producer": "p-secret-2", "operator": "o-secret-3"}


class Secured:
    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        users = ""
        for role, password in PASSWORDS.items():
            (base / f"{role}.pass").write_text(password + "\n")
            (base / f"{role}.pass").chmod(0o600)
            users += f'[redis.users.{role}]\nuser = "stork-{role}"\npassword_file = "{role}.pass"\n'
        self.file = base / "stork.toml"
        self.file.write_text(f'[redis]\nurl = "redis://127.0.0.1:{self.port}/0"\n{users}'
                             '[paths]\nguests = "guests"\nlocks = "lock"\n'
                             '[storage.local]\ntype = "dir"\npath = "images"\n')
        self.env = {**os.environ, "STORK_CONFIG": str(self.file), "STORK_NODE": "acl1"}
        self.env.pop("STORK_REDIS_URL", None)
        lines = self.stork("redis", "users")["acl"]
        (base / "users.acl").write_text("\n".join(lines) + "\n")
        self.redis = testing.RedisServer(self.port, base, extra=("--aclfile", str(base / "users.acl")),
                                         username="stork-worker", password=PASSWORDS["worker"])
        try:
            self.worker = testing.Worker("acl1", base, concurrency=2, env=self.env)
        except BaseException:  # no Redis left running behind a fixture that failed to start
            self.redis.stop()
            raise

    def run(self, *args: str, role: str = "producer") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "--json", *args], cwd=ROOT,
                              env={**self.env, "STORK_ROLE": role}, capture_output=True, text=True, timeout=120,
                              check=False)

    def stork(self, *args: str, role: str = "producer") -> dict:
        done = self.run(*args, role=role)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def as_role(self, role: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=f"stork-{role}", password=PASSWORDS[role], decode_responses=True)

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[Secured]:
    cluster = Secured(tmp_path_factory.mktemp("acl"))
    yield cluster
    cluster.stop()


def test_the_acl_file_holds_no_password_and_switches_the_default_user_off(secured):
    text = (secured.base / "users.acl").read_text()
    assert not any(p in text for p in PASSWORDS.values())
    assert "user default off" in text and text.count("#") == 3


def test_a_producer_submits_reads_and_cancels_through_a_worker(secured):
    """The whole path under ACLs: the CLI (producer) creates a guest, a worker (worker user)
    runs it, the CLI lists and shows the job, clones, and cancels a job it queued for a node
    nobody serves."""
    secured.stork("guest", "create", "100", "--disk", "scsi0=local:16M")
    assert secured.stork("clone", "100", "101", "--full")["state"] == "succeeded"
    assert len(secured.stork("job", "list")) >= 2
    unserved = secured.run("ping", "--node", "nobody", "--timeout", "1")
    assert unserved.returncode == 1, unserved.stderr
    [answer] = json.loads(unserved.stdout)
    assert answer["queue"] == "node.nobody"  # withdrawn by the producer: it may take its own message back
    assert secured.stork("job", "show", answer["job"])["state"] == "cancelled"


def test_a_producer_cannot_do_what_a_worker_does(secured):
    """Taking a message from a queue (or dropping a queue), holding a storage lease, a worker's
    heartbeat, kombu's unacked messages, Celery's control channel, beat's schedule runs, and
    Redis's administration: each refused (NOPERM) to the producer."""
    producer = secured.as_role("producer")
    refused = [
        lambda: producer.brpop(["node.acl1"], timeout=1),
        lambda: producer.rpop("shared"),
        lambda: producer.lmove("node.acl1", "mine"),
        lambda: producer.set("stork:lock:local", "mine"),
        lambda: producer.set("stork:alive:host:1", ""),
        lambda: producer.hset("unacked", "tag", "x"),
        lambda: producer.delete("stork:dead"),
        lambda: producer.delete("node.acl1"),  # a queue: it may push and take back its own, nothing else
        lambda: producer.ltrim("node.acl1", 0, 0),
        lambda: producer.publish("/0.celery.pidbox", "shutdown"),  # Celery's control channel
        lambda: producer.set("stork:schedule:nightly:last", "x"),  # beat's
        lambda: producer.config_get("*"),
        lambda: producer.flushall(),
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert producer.lpush("node.acl1-test", "x") == 1  # what submitting does stays allowed


def test_the_operator_reads_and_cannot_submit(secured):
    assert isinstance(secured.stork("job", "list", role="operator"), list)
    done = secured.run("guest", "create", "102", "--disk", "scsi0=local:16M", role="operator")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "Redis refused it to the operator role's user" in done.stderr and "NOPERM" not in done.stdout
    operator = secured.as_role("operator")
    with pytest.raises(redis.exceptions.NoPermissionError):
        operator.hset("stork:job:x", "state", "succeeded")
    for binding in ("_kombu.binding.node.acl1", "_kombu.binding.shared"):  # where node queues' messages go
        with pytest.raises(redis.exceptions.NoPermissionError):
            operator.sadd(binding, "node.acl2\x06\x16\x06\x16node.acl2")


def test_the_worker_user_cannot_administer_redis(secured):
    worker = secured.as_role("worker")
    for attempt in (lambda: worker.config_set("appendonly", "no"), lambda: worker.flushall(),
                    lambda: worker.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_nobody_gets_in_without_a_password(secured):
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=secured.port).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=secured.port, username="stork-producer", password="guess").ping()


def test_flower_watches_as_the_operator(secured):
    """Flower runs as the operator's user (worker.run.flower's default role): it lists a job's
    tasks from the workers' events, and its inspect reaches the worker, with nothing refused."""
    port = free_port()
    conf = secured.base / "flower.toml"
    login = ":".join(FLOWER_LOGIN)
    conf.write_text(secured.file.read_text() + f'[flower]\nport = {port}\nbasic_auth = "{login}"\n')
    conf.chmod(0o600)
    env = {**secured.env, "STORK_CONFIG": str(conf)}
    env.pop("STORK_ROLE", None)
    with running_flower(port, env, secured.base / "flower.log") as flower:
        def lists_a_ping() -> bool:  # Flower misses the events sent before it subscribed: ping until one shows
            [answer] = secured.stork("ping", "--node", "acl1")
            try:
                testing.wait_for(lambda: flower.tasks(answer["job"]), 3)
            except AssertionError:
                return False
            return True
        testing.wait_for(lists_a_ping, 60, "Flower to list a ping's tasks")
        status, body = flower.get("/api/workers?refresh=1")
        assert status == 200 and any("acl1" in name for name in json.loads(body)), body
    log = (secured.base / "flower.log").read_text()
    assert "NOPERM" not in log and "NoPermission" not in log, log[-3000:]


def test_make_run_names_a_redis_that_refuses_the_workers_login(secured, tmp_path):
    """The launcher starts a Redis only where none answers: one that refuses the worker's
    password is an error saying so, and none is started beside it."""
    from drivers import config
    from drivers.errors import StorkError
    from worker.run import launch

    (tmp_path / "worker.pass").write_text("not-the-password\n")
    (tmp_path / "worker.pass").chmod(0o600)
    text = (f'[redis]\nurl = "redis://127.0.0.1:{secured.port}/0"\n'
            '[redis.users.worker]\nuser = "stork-worker"\npassword_file = "worker.pass"\n')
    with pytest.raises(StorkError, match=rf"Redis at redis://127.0.0.1:{secured.port}/0: .*(invalid|WRONGPASS)"):
        launch.redis_answers(config.parse(text, tmp_path / "stork.toml", {"STORK_NODE": "acl1"}))


def test_a_worker_and_the_cli_work_through_a_unix_socket(tmp_path):
    """A unix:// URL, which the config takes and redis-py speaks, left a worker unable to start:
    kombu has no unix:// transport (its name for a socket is redis+socket://). Its database
    (?db=3) is the worker's and the CLI's alike."""
    from drivers import config
    from producer.client import Client

    sock = tmp_path / "redis.sock"
    server = testing.RedisServer(free_port(), tmp_path, extra=("--unixsocket", str(sock), "--unixsocketperm", "700"))
    try:
        (tmp_path / "stork.toml").write_text(f'[redis]\nurl = "unix://{sock}?db=3"\n[paths]\nguests = "guests"\n'
                                             'locks = "lock"\n[storage.local]\ntype = "dir"\npath = "images"\n')
        env = {**os.environ, "STORK_CONFIG": str(tmp_path / "stork.toml"), "STORK_NODE": "sock1"}
        env.pop("STORK_REDIS_URL", None)
        env.pop("STORK_ROLE", None)
        worker = testing.Worker("sock1", tmp_path, concurrency=1, env=env)
        try:
            answers = Client(config.load(env)).ping(["sock1"], timeout=30)
            assert [a["ok"] for a in answers] == [True], answers
        finally:
            worker.stop()
        in_db = redis.Redis(unix_socket_path=str(sock), db=3)
        assert in_db.exists("stork:jobs") and not redis.Redis(unix_socket_path=str(sock)).exists("stork:jobs")
    finally:
        server.stop()

