"""`make run`'s pieces: the launcher, the local Redis it may start, Flower's address rule."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from drivers import config, redis_settings
from drivers.errors import StorkError
from worker.run import flower, launch, redis_server
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
    with pytest.raises(StorkError, match=r"Redis at unix:///run/r.sock is not running: start it there"):
        redis_server.argv_for("unix:///run/r.sock", str(tmp_path))  # not a TCP Redis on 6379 in its place


def test_a_redis_password_goes_to_a_private_file_not_the_command_line(tmp_path):
    """The local Redis gets the URL's password through a 0600 config file: decoded, as redis-py
    sends it (a percent-encoded one was written encoded, and no login matched), and quoted, so
    that no character of it (a quote, a line break) ends it or starts another directive."""
    import subprocess

    import redis

    from worker.testing import free_port, wait_for

    port = free_port()
    url = f"redis://:p%40ss%20w%22rd%0Areplicaof%20127.0.0.1%201@127.0.0.1:{port}/0"
    argv = redis_server.argv_for(url, str(tmp_path))
    conf = Path(argv[1])
    assert not any("p@ss" in a or "%40" in a for a in argv)
    assert conf.stat().st_mode & 0o777 == 0o600 and "replicaof" not in conf.read_text()
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(url)
        wait_for(lambda: _answers(client), 10, "the local Redis to answer")
        assert client.info("replication")["role"] == "master"  # the password's "line" is no directive
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="p@ss").ping()
    finally:
        server.kill()
        server.wait()
    assert redis_settings.redact("redis://user:hunter2@host:1/0") == "redis://user:***@host:1/0"


def _answers(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_make_run_starts_a_working_system_from_nothing(tmp_path):
    """The launcher writes the default config, starts Redis, worker, beat, Flower and the
    metrics endpoint, serves a clone through the CLI (counted there), and Ctrl-C stops
    everything it started."""
    cfg_file = tmp_path / "stork.toml"
    flower_port, metrics_port = free_port(), free_port()
    cfg_file.write_text(config.DEFAULT_CONFIG.replace("6379", str(free_port()))
                        + f"\n[flower]\nport = {flower_port}\n[metrics]\nport = {metrics_port}\n")
    env = {**os.environ, "STORK_CONFIG": str(cfg_file), "STORK_NODE": "solo", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.run.launch"], cwd=ROOT, env=env, stdout=out,
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
        wait_for(lambda: "beat: Starting" in log.read_text(), 30, "beat to start")
        assert not list(tmp_path.glob("var/celerybeat-schedule*"))  # kept in memory: no pickle (shelve) file to load
        metrics = lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()  # noqa: E731
        wait_for(lambda: _quietly(metrics), 30, "the metrics endpoint to answer")
        scraped = metrics().decode()
        assert 'stork_jobs_ended_total{kind="linked_clone",state="succeeded"} 1.0' in scraped, scraped
        text = log.read_text()
        assert all(f"{name}.1 started" in text for name in ("redis", "worker", "beat", "flower", "metrics"))
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
    for argv in (["-m", "producer.cli", "guest", "list"], ["-m", "worker.run.main"]):
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


def _launcher_env(tmp_path: Path) -> tuple[dict[str, str], int]:
    """A config with its own Redis and Flower ports, and the environment that names it; and Flower's port."""
    cfg_file = tmp_path / "stork.toml"
    flower_port, metrics_port = free_port(), free_port()
    cfg_file.write_text(config.DEFAULT_CONFIG.replace("6379", str(free_port()))
                        + f"\n[flower]\nport = {flower_port}\n[metrics]\nport = {metrics_port}\n")
    env = {**os.environ, "STORK_CONFIG": str(cfg_file), "STORK_NODE": "solo", "PYTHONUNBUFFERED": "1"}
    return env, flower_port


def _start_launcher(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`make run` in its own session, its output in `log`; returns once the worker is ready."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.run.launch"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: ("solo@" in log.read_text() and " ready." in log.read_text()) or proc.poll() is not None,
             60, "the worker")
    assert proc.poll() is None, log.read_text()
    return proc


def _stop_launcher(proc: subprocess.Popen) -> None:
    """Ctrl-C, as in its terminal."""
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(60)


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (honcho starts its processes in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(parents.get(found[-1], []))
    return found


def _ping(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer.cli", "ping"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def _second_launcher(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.run.launch"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


RUNNING = r"stork: already running on node solo \(launcher pid {pid}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\); stop it first \(Ctrl-C in its terminal\)"  # noqa: E501


def test_a_second_make_run_on_the_node_says_so_and_starts_nothing(tmp_path):
    """A second launcher with the same config and node exits 1 with one line naming the first's pid,
    before starting anything; the first serves on (ping, Flower); once it is stopped, a new one starts."""
    env, flower_port = _launcher_env(tmp_path)
    first = _start_launcher(env, tmp_path / "first.log")
    third = None
    try:
        lock = tmp_path / "var/lock/launch-solo.lock"
        assert lock.read_text().startswith(f"{first.pid} ")
        second = _second_launcher(env)
        assert second.returncode == 1 and second.stdout == ""
        assert re.fullmatch(RUNNING.format(pid=first.pid), second.stderr.strip()), second.stderr
        assert len(second.stderr.splitlines()) == 1
        assert lock.read_text().startswith(f"{first.pid} ")  # the second wrote nothing there
        done = _ping(env)
        assert done.returncode == 0 and re.search(r"^solo +ok ", done.stdout, re.M), done.stderr
        flower_up = lambda: urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/", timeout=2).status == 200  # noqa: E731
        wait_for(lambda: _quietly(flower_up), 30, "Flower to answer")
        assert (tmp_path / "first.log").read_text().count("worker.1 started") == 1
        _stop_launcher(first)
        third = _start_launcher(env, tmp_path / "third.log")
        assert lock.read_text().startswith(f"{third.pid} ")
        done = _ping(env)
        assert done.returncode == 0 and re.search(r"^solo +ok ", done.stdout, re.M), done.stderr
    finally:
        for proc in (first, third):
            if proc is not None and proc.poll() is None:
                _stop_launcher(proc)


def test_a_killed_launcher_blocks_only_while_its_processes_run(tmp_path):
    """SIGKILL of the launcher alone: its processes still run, so a new one is refused, naming the pids
    that hold the lock. Once all of them are killed too, the kernel has dropped the lock: a new one starts."""
    env, _ = _launcher_env(tmp_path)
    first = _start_launcher(env, tmp_path / "first.log")
    tree = _descendants(first.pid)
    again = None
    try:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        second = _second_launcher(env)
        assert second.returncode == 1 and len(second.stderr.splitlines()) == 1, second.stderr
        assert second.stderr.startswith("stork: already running on node solo: its launcher is gone, but "
                                        "processes it started still run (pids "), second.stderr
        assert second.stderr.rstrip().endswith("launch-solo.lock); stop them first")
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(_alive(pid) for pid in tree), 30, "the first run's processes to die")
        again = _start_launcher(env, tmp_path / "again.log")
        done = _ping(env)
        assert done.returncode == 0 and re.search(r"^solo +ok ", done.stdout, re.M), done.stderr
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if again is not None:
            _stop_launcher(again)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_the_launch_lock_ignores_a_dead_holder_and_never_follows_a_symlink(tmp_path):
    """A lock file left by a launcher that died does not block; one held by a live process names it;
    a symlink planted at the lock file's name is refused, its target untouched."""
    (tmp_path / "stork.toml").write_text(config.DEFAULT_CONFIG)
    cfg = config.load({"STORK_CONFIG": str(tmp_path / "stork.toml"), "STORK_NODE": "solo"})
    path = launch.lock_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text("999999999 2020-01-01T00:00:00+00:00\n")  # no such pid, and nobody holds the flock
    fd = launch.hold_launch_lock(cfg)
    try:
        assert path.read_text().startswith(f"{os.getpid()} ")
        code = ("from drivers import config\nfrom worker.run import launch\n"
                "try:\n    launch.hold_launch_lock(config.load())\nexcept Exception as e:\n    print(e)\n")
        other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                               env={**os.environ, "STORK_CONFIG": str(cfg.file), "STORK_NODE": "solo"})
        assert re.fullmatch(RUNNING.format(pid=os.getpid()).removeprefix("stork: "), other.stdout.strip()), other
    finally:
        os.close(fd)
    fd = launch.hold_launch_lock(cfg)  # closed: free again
    os.close(fd)
    path.unlink()
    target = tmp_path / "target"
    target.write_text("keep")
    path.symlink_to(target)
    with pytest.raises(StorkError, match=rf"lock file {re.escape(str(path))} is a symlink or not a regular file"):
        launch.hold_launch_lock(cfg)
    assert target.read_text() == "keep"


def test_make_run_with_sentinels_that_do_not_answer_starts_nothing(tmp_path):
    """A replicated Redis is the operator's: with sentinels configured and none answering, the
    launcher says so in one line and starts no local Redis (nor anything else)."""
    file = tmp_path / "stork.toml"
    file.write_text(f'[redis]\nsentinels = ["127.0.0.1:{free_port()}"]\nmaster_name = "stork"\nwait_replicas = 0\n'
                    '[paths]\nguests = "guests"\nlocks = "lock"\n')
    env = {**os.environ, "STORK_CONFIG": str(file), "STORK_NODE": "solo"}
    env.pop("STORK_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "worker.run.launch"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Redis master 'stork' (sentinels 127.0.0.1:" in done.stderr and "does not answer" in done.stderr
    assert not (tmp_path / "var" / "redis").exists()
