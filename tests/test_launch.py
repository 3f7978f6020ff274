"""`make run`'s pieces: the launcher, the local Redis it may start, Flower's address rule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from drivers import config
from drivers.errors import StorkError
from worker import flower, redis_server
from worker.testing import ROOT, free_port, wait_for


def test_flower_refuses_a_public_address_without_basic_auth(tmp_path):
    """Flower listens on 127.0.0.1 by default and only elsewhere with basic auth set."""
    cfg = config.parse("[flower]\naddress = '0.0.0.0'\n", tmp_path / "stork.toml", {"STORK_NODE": "n"})
    message = r"flower.address = '0.0.0.0' is not a loopback address: set flower.basic_auth"
    with pytest.raises(StorkError, match=message):
        flower.flower_argv(cfg)
    argv = flower.flower_argv(replace(cfg, flower_basic_auth="admin:secret"))
    assert "--address=0.0.0.0" in argv and not any("secret" in a for a in argv)  # secret goes by env
    default = config.parse("", tmp_path / "stork.toml", {"STORK_NODE": "n"})
    assert "--address=127.0.0.1" in flower.flower_argv(default)


def test_the_local_redis_is_only_started_for_a_local_url(tmp_path):
    """stork starts redis-server on the configured loopback port, never for a remote URL."""
    argv = redis_server.argv_for("redis://127.0.0.1:6399/0", str(tmp_path))
    assert argv[2:6] == ["--bind", "127.0.0.1", "--port", "6399"]
    assert "noeviction" in argv
    with pytest.raises(StorkError, match=r"Redis at redis://:\*\*\*@10.1.2.3:6379/0 is not local"):
        redis_server.argv_for("redis://:hunter2@10.1.2.3:6379/0", str(tmp_path))


def test_a_redis_password_goes_to_a_private_file_not_the_command_line(tmp_path):
    """The local Redis gets the URL's password through a 0600 config file."""
    argv = redis_server.argv_for("redis://:hunter2@127.0.0.1:6399/0", str(tmp_path))
    conf = Path(argv[1])
    assert not any("hunter2" in a for a in argv)
    assert conf.read_text() == "requirepass hunter2\n" and conf.stat().st_mode & 0o777 == 0o600
    assert config.redact("redis://user:hunter2@host:1/0") == "redis://user:***@host:1/0"


def test_make_run_starts_a_working_system_from_nothing(tmp_path):
    """The launcher writes the default config, starts Redis, worker, beat and Flower, serves
    a clone through the CLI, and Ctrl-C stops everything it started."""
    cfg_file = tmp_path / "stork.toml"
    flower_port = free_port()
    cfg_file.write_text(config.DEFAULT_CONFIG.replace("6379", str(free_port()))
                        + f"\n[flower]\nport = {flower_port}\n")
    env = {**os.environ, "STORK_CONFIG": str(cfg_file), "STORK_NODE": "solo", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.launch"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "solo@" in log.read_text() and " ready." in log.read_text(), 60, "the worker")
        stork = [sys.executable, "-m", "producer.cli"]
        commands = (["guest", "create", "100", "--disk", "scsi0=local:64M"], ["template", "100"],
                    ["clone", "100", "101"])
        for args in commands:
            done = subprocess.run([*stork, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr + log.read_text()[-3000:]
        assert (tmp_path / "var/images/101/vm-101-disk-0.qcow2").exists()
        flower_up = lambda: urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/", timeout=2).status == 200  # noqa: E731
        wait_for(lambda: _quietly(flower_up), 30, "Flower to answer")
        assert (tmp_path / "var/celerybeat-schedule").exists() or list(tmp_path.glob("var/celerybeat-schedule*"))
        text = log.read_text()
        assert all(f"{name}.1 started" in text for name in ("redis", "worker", "beat", "flower"))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    group_left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True, check=False)
    assert group_left.stdout.strip() == ""
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True, check=False)


def _quietly(check) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def test_a_missing_config_is_one_line_for_every_entry_point(tmp_path):
    """Without a config file, the CLI and the worker say so in one line and exit non-zero."""
    env = {**os.environ, "STORK_CONFIG": str(tmp_path / "none.toml")}
    for argv in (["-m", "producer.cli", "guest", "list"], ["-m", "worker.main"]):
        done = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        assert done.returncode != 0
        assert "none.toml: config file not found" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["guest", "create", "100", "--disk", "scsi0=local:1G"], ["job", "list"],
                                  ["job", "show", "0123456789ab"], ["job", "cancel", "0123456789ab"]])
def test_an_unreachable_redis_is_one_clear_line(args):
    """Submitting or reading jobs while Redis does not answer: one line naming the address."""
    port = free_port()
    env = {**os.environ, "STORK_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in done.stderr


def test_paths_in_the_default_config_are_under_var(tmp_path: Path):
    """The embedded default keeps everything under ./var next to the config."""
    cfg = config.parse(config.DEFAULT_CONFIG, tmp_path / "stork.toml", {"STORK_NODE": "n"})
    assert cfg.storage("local").path == tmp_path / "var/images"
    assert cfg.guests_dir == tmp_path / "var/guests"
