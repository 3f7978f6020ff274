"""Redis over TLS: a redis-server that speaks only TLS, with a certificate from the suite's own
CA, and asks each client for a certificate that CA signed (Redis's default, tls-auth-clients
yes); the config names it by rediss://, the CA file and the client certificate. A worker and
the CLI run a job through it; a client that does not trust the CA, speaks plain Redis, or shows
no certificate gets nothing. The same through three sentinels and three members that speak
only TLS, across a failover."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker import records, testing
from worker.testing import ROOT, free_port


class TlsCluster:
    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.ca, cert, key = testing.make_tls(base, names=("localhost",), addresses=(), client=True)
        tls = ("--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
               "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes")
        self.redis = testing.RedisServer(self.port, base, extra=tls, ssl=True, ssl_ca_certs=str(self.ca),
                                         ssl_certfile=str(base / "client.pem"), ssl_keyfile=str(base / "client.key"))
        self.file = base / "stork.toml"
        self.file.write_text(self.config(cert_file="client.pem", key_file="client.key"))
        self.env = {**os.environ, "STORK_CONFIG": str(self.file), "STORK_NODE": "tls1"}
        self.env.pop("STORK_REDIS_URL", None)
        try:
            self.worker = testing.Worker("tls1", base, concurrency=2, env=self.env)
        except BaseException:  # no Redis left running behind a fixture that failed to start
            self.redis.stop()
            raise

    def config(self, **redis_keys: str) -> str:
        extra = "".join(f'{k} = "{v}"\n' for k, v in redis_keys.items())
        return (f'[redis]\nurl = "rediss://localhost:{self.port}/0"\nca_file = "ca.pem"\n{extra}'
                '[paths]\nguests = "guests"\nlocks = "lock"\n[storage.local]\ntype = "dir"\npath = "images"\n')

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", "--json", *args], cwd=ROOT, env=env or self.env,
                              capture_output=True, text=True, timeout=120, check=False)

    def stork(self, *args: str) -> dict:
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Iterator[TlsCluster]:
    cluster = TlsCluster(tmp_path_factory.mktemp("tls"))
    yield cluster
    cluster.stop()


def test_a_worker_and_the_cli_work_over_tls(tls):
    tls.stork("guest", "create", "100", "--disk", "scsi0=local:16M")
    assert tls.stork("clone", "100", "101", "--full")["state"] == "succeeded"
    assert [a["ok"] for a in tls.stork("ping")] == [True]


def test_a_client_that_does_not_trust_the_ca_or_speaks_plain_redis_gets_nothing(tls):
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis(host="localhost", port=tls.port, ssl=True, ssl_cert_reqs=ssl.CERT_REQUIRED).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="localhost", port=tls.port, socket_timeout=3).ping()


def test_a_client_without_a_certificate_gets_nothing(tls):
    """The CLI with a config that names no client certificate: one line naming Redis, exit 1;
    a client with the CA but no certificate of its own: refused in the handshake."""
    (tls.base / "nocert.toml").write_text(tls.config())
    done = tls.run("job", "list", env={**tls.env, "STORK_CONFIG": str(tls.base / "nocert.toml")})
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.startswith("stork: ") and f"localhost:{tls.port}" in done.stderr, done.stderr
    assert "set redis.cert_file and redis.key_file" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="localhost", port=tls.port, ssl=True, ssl_ca_certs=str(tls.ca), socket_timeout=3).ping()


def test_make_run_says_why_a_redis_that_wants_a_certificate_refused_it(tls):
    """The launcher starts a Redis only where none answers: one that cut the handshake for want
    of a certificate is named, with the keys to set, and none is started beside it."""
    from drivers import config
    from drivers.errors import StorkError
    from worker.run import launch

    env = {"STORK_NODE": "tls1"}
    assert launch.redis_answers(config.parse(tls.config(cert_file="client.pem", key_file="client.key"),
                                             tls.file, env))
    with pytest.raises(StorkError, match=rf"localhost:{tls.port}/0: .*set redis.cert_file and redis.key_file"):
        launch.redis_answers(config.parse(tls.config(), tls.file, env))
    nobody = tls.config().replace(f":{tls.port}/", f":{free_port()}/")
    assert not launch.redis_answers(config.parse(nobody, tls.file, env))


def test_a_wrong_host_name_is_refused(tls):
    """The certificate names localhost only: a client that asked for 127.0.0.1 stops."""
    with pytest.raises(redis.ConnectionError, match=r"match|mismatch|not valid"):
        redis.Redis(host="127.0.0.1", port=tls.port, ssl=True, ssl_ca_certs=str(tls.ca), ssl_check_hostname=True,
                    socket_timeout=3).ping()


class SentinelTlsCluster:
    """Three members and three sentinels that speak only TLS (replication too); a worker and
    the CLI find the master through the sentinels with `tls = true`, the CA file and a client
    certificate, which every member and sentinel asks for."""

    def __init__(self, base: Path) -> None:
        self.base = base
        # localhost and 127.0.0.1: the sentinels name members by IP
        self.ca, cert, key = testing.make_tls(base, client=True)
        self.group = testing.SentinelGroup(base / "redis", tls=(self.ca, cert, key))
        sentinels = ", ".join(f'"{a}"' for a in self.group.addresses)
        self.file = base / "stork.toml"
        self.file.write_text(f'[redis]\nsentinels = [{sentinels}]\nmaster_name = "{self.group.NAME}"\n'
                             'tls = true\nca_file = "ca.pem"\ncert_file = "client.pem"\nkey_file = "client.key"\n'
                             'wait_replicas = 2\n'
                             '[paths]\nguests = "guests"\nlocks = "lock"\n'
                             '[storage.local]\ntype = "dir"\npath = "images"\n')
        self.env = {**os.environ, "STORK_CONFIG": str(self.file), "STORK_NODE": "stls1"}
        self.env.pop("STORK_REDIS_URL", None)
        try:
            self.worker = testing.Worker("stls1", base, concurrency=2, env=self.env)
        except BaseException:
            self.group.stop()
            raise

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return TlsCluster.run(self, *args, env=env)  # type: ignore[arg-type]

    def stork(self, *args: str) -> dict:
        return TlsCluster.stork(self, *args)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.worker.stop()
        self.group.stop()


@pytest.fixture(scope="module")
def sentinel_tls(tmp_path_factory) -> Iterator[SentinelTlsCluster]:
    cluster = SentinelTlsCluster(tmp_path_factory.mktemp("sentinel-tls"))
    yield cluster
    cluster.stop()


def test_a_worker_and_the_cli_work_through_sentinels_over_tls_and_a_failover(sentinel_tls):
    """Jobs run with every connection (to the sentinels, the members, between members) over
    TLS, and again after the sentinels fail the master over."""
    s = sentinel_tls
    s.stork("guest", "create", "100", "--disk", "scsi0=local:16M")
    assert s.stork("clone", "100", "101", "--full")["state"] == "succeeded"
    old = s.group.master()
    s.group.failover()
    assert s.group.master() != old
    job = s.stork("clone", "100", "102", "--full")
    assert job["state"] == "succeeded"
    assert [a["ok"] for a in s.stork("ping")] == [True]
    for port, member in s.group.members.items():  # replicated to every member, over TLS
        testing.wait_for(lambda m=member: m.client.hget(records.job_key(job["id"]), "state") == "succeeded", 10,
                         f"member {port} to hold the job")
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=next(iter(s.group.sentinels)), socket_timeout=3).ping()  # a sentinel without TLS: nothing
