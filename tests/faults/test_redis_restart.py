"""Redis restarting under a running copy: the worker rides it out and the job completes.

A cluster of its own (a durable Redis, one worker, the CLI as a subprocess), since the
session's Redis keeps no data across a restart and serves every other test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from drivers import config
from producer.client import Client
from tests.helpers import held_copy
from worker import testing
from worker.testing import ROOT, free_port


def stork(env: dict[str, str], *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "producer.cli", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def redis_away_mid_copy(env: dict[str, str], redis_server: testing.RedisServer, job_id: str, down: float) -> None:
    """Stop Redis while the job's copy is held mid-way (whatever the machine's speed), let the
    copy run on without it for `down` seconds, then start Redis again."""
    with held_copy(Client(config.load(env)), job_id):
        redis_server.stop()
    time.sleep(down)
    redis_server.start()


def test_a_redis_restart_mid_copy_does_not_lose_the_job_or_the_worker(tmp_path: Path):
    """Redis goes down for a second while a full clone copies; the copy step waits for it,
    the worker reconnects, and the job ends succeeded with an identical copy."""
    port = free_port()
    (tmp_path / "stork.toml").write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\nlocks = "lock"\n'
        '[storage.local]\ntype = "dir"\npath = "images"\n')
    env = {**os.environ, "STORK_CONFIG": str(tmp_path / "stork.toml"), "STORK_NODE": "solo"}
    redis_server = testing.RedisServer(port, tmp_path, durable=True)
    worker = testing.Worker("solo", tmp_path, concurrency=2, env=env)
    try:
        stork(env, "guest", "create", "100", "--disk", "scsi0=local:512M")
        with open(tmp_path / "images/100/vm-100-disk-0.raw", "r+b") as f:
            for _ in range(512 // 8):
                f.write(b"\x5c" * (8 << 20))
        job_id = stork(env, "clone", "100", "101", "--full", "--no-wait")["job"]
        redis_away_mid_copy(env, redis_server, job_id, down=1.0)

        def ended() -> dict | None:
            assert worker.proc.poll() is None, "the worker died with Redis:\n" + worker.log.read_text()[-2000:]
            job = stork(env, "job", "show", job_id)
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = testing.wait_for(ended, 90, "the job to end", interval=0.5)
        assert job["state"] == "succeeded", job["error"]
        compare = subprocess.run(["qemu-img", "compare", "-q", str(tmp_path / "images/100/vm-100-disk-0.raw"),
                                  str(tmp_path / "images/101/vm-101-disk-0.raw")], check=False)
        assert compare.returncode == 0
    finally:
        worker.stop()
        redis_server.stop()


def test_redis_away_longer_than_the_workers_retries_still_ends_the_job(tmp_path: Path):
    """Redis down for 15 s during a copy, while the worker retries it for 4 s: the step gives
    up, its process lives on idle; once Redis is back the sweep sees the step abandoned, and
    the job ends failed and undone (no target left, both guests unlocked) without a restart."""
    port = free_port()
    (tmp_path / "stork.toml").write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\nlocks = "lock"\n'
        '[storage.local]\ntype = "dir"\npath = "images"\n')
    env = {**os.environ, "STORK_CONFIG": str(tmp_path / "stork.toml"), "STORK_NODE": "solo",
           "STORK_REDIS_OUTAGE": "4"}
    redis_server = testing.RedisServer(port, tmp_path, durable=True)
    worker = testing.Worker("solo", tmp_path, concurrency=2, env=env)
    try:
        stork(env, "guest", "create", "100", "--disk", "scsi0=local:1024M")
        with open(tmp_path / "images/100/vm-100-disk-0.raw", "r+b") as f:
            for _ in range(1024 // 8):
                f.write(b"\x5c" * (8 << 20))
        job_id = stork(env, "clone", "100", "101", "--full", "--no-wait")["job"]
        redis_away_mid_copy(env, redis_server, job_id, down=15.0)
        job = stork(env, "job", "show", job_id)
        if job["state"] == "running" and job["current"]:  # held by a process that gave up
            holder = job["current"]["worker"]
            testing.wait_for(lambda: redis_server.client.get(f"stork:alive:{holder}") == "", 30,
                             "the idle process's heartbeat")
            # the sweep a worker's main process or beat runs every minute, run now
            subprocess.run([sys.executable, "-c", "from worker import recovery; recovery.sweep()"],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=60)

        def ended() -> dict | None:
            assert worker.proc.poll() is None, "the worker died with Redis:\n" + worker.log.read_text()[-2000:]
            job = stork(env, "job", "show", job_id)
            return job if job["state"] in ("succeeded", "failed", "cancelled") else None

        job = testing.wait_for(ended, 90, "the job to end", interval=0.5)
        # recovered by a sweep ("gave it up"), or by the step's own undo if Redis was back in time for it;
        # on a loaded machine the copy may also not touch Redis while it is away (a long final flush),
        # and succeed: the promise is that it ends, which tests/faults/test_faults.py checks deterministically
        if job["state"] == "succeeded":
            assert (tmp_path / "guests/101.toml").exists()
        else:
            assert job["state"] == "failed" and ("gave it up" in job["error"] or "lost its connection to Redis"
                                                 in job["error"]), job["error"]
            assert not (tmp_path / "images/101").exists() and not (tmp_path / "guests/101.toml").exists()
        assert stork(env, "guest", "show", "100")["lock"] == ""
    finally:
        worker.stop()
        redis_server.stop()


def test_one_command_gives_up_within_the_outage_window_where_every_try_hangs(tmp_path: Path):
    """A Redis that takes connections and never answers (stopped by SIGSTOP, as one stuck on its
    disk, or a partition that drops packets): each try lasts its socket timeout and reconnects,
    and the command still gives up once the window has passed, not after a count of tries;
    the heartbeat outlives the longest command, so another host never takes a process that is
    only waiting for Redis for gone."""
    import signal

    import pytest
    import redis

    from worker import app, liveness

    port = free_port()
    server = testing.RedisServer(port, tmp_path)
    try:
        client = redis.Redis(port=port, socket_timeout=0.2, socket_connect_timeout=0.2,
                             retry=app.OutageRetry(1.0))
        assert client.ping()  # a pooled connection, open
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(redis.RedisError):
                client.get("anything")
            assert time.monotonic() - start < 1.0 + app.BACKOFF_CAP + 3 * 0.2 + 0.5
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        server.stop()
    assert liveness.ttl() >= app.COMMAND_LIMIT + liveness.HEARTBEAT


def test_a_command_that_got_through_leaves_no_clock_running_for_the_next():
    """Two commands, each failing once and then getting through, the second a while after the
    first: the window is each command's own, so a Redis that flaps never makes a working
    client give up early."""
    import redis

    from worker import app

    retry = app.OutageRetry(0.3)

    def once_then_through() -> callable:
        tries = []

        def do() -> str:
            tries.append(1)
            if len(tries) == 1:
                raise redis.ConnectionError("a blip")
            return "through"
        return do

    assert retry.call_with_retry(once_then_through(), lambda error: None) == "through"
    time.sleep(0.4)  # past the window, counted from the first command's failure
    assert retry.call_with_retry(once_then_through(), lambda error: None) == "through"


def test_a_step_does_not_begin_where_its_heartbeat_cannot_be_told():
    """A process names its job in its heartbeat before it records a step's start. Where Redis
    cannot be told then (away, here a port nothing listens on), the step does not begin: a start
    recorded once Redis is back, with the heartbeat still saying idle until its next beat, would
    let a cancel or the sweep take the step from a live process and undo it beside it."""
    import pytest
    import redis

    from worker import liveness

    away = redis.Redis(port=free_port(), socket_connect_timeout=1)
    ran = []
    with pytest.raises(redis.ConnectionError), liveness.working_on(away, "0123456789ab"):
        ran.append(True)
    assert ran == [] and liveness._working_on == ""
