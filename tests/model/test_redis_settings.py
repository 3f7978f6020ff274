"""[redis]: sentinels, users per role, TLS, and what each process makes of them (tables of
config text and of the URLs and options worker/connect.py derives; no Redis needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kombu.transport import resolve_transport

from drivers import config
from drivers.errors import ConfigError
from worker import acl, connect, failover

FILE = Path("/etc/stork/stork.toml")
BARE_SENTINELS = '[redis]\nsentinels = ["10.0.0.1:26379", "10.0.0.2:26379"]\nmaster_name = "stork"\n'
SENTINELS = BARE_SENTINELS + "wait_replicas = 0\n"  # said outright: a failover may lose what a step saved


def parse(text: str, env: dict[str, str] | None = None) -> config.Config:
    return config.parse(text, FILE, env or {"STORK_NODE": "node1"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[redis]\nsentinels = []\nmaster_name = 'm'\n", r"redis.sentinels = \[\]: expected a non-empty list"),
        ("[redis]\nsentinels = ['h']\nmaster_name = 'm'\n", r"redis.sentinels = \['h'\]: expected .*\"host:port\""),
        ("[redis]\nsentinels = ['h:0']\nmaster_name = 'm'\n", r"redis.sentinels = \['h:0'\]"),
        ("[redis]\nsentinels = ['h:1', 'h:1']\nmaster_name = 'm'\n", r"expected a non-empty list of distinct"),
        ("[redis]\nsentinels = ['h:1']\n", r"redis.master_name is missing"),
        ("[redis]\nsentinels = ['h:1']\nmaster_name = 'm'\nurl = 'redis://h:1/0'\n",
         r"redis.url and redis.sentinels both set"),
        ("[redis]\nmaster_name = 'm'\n", r"redis.master_name: only with redis.sentinels"),
        ("[redis]\ntls = true\n", r"redis.tls: only with redis.sentinels \(.*rediss:// for TLS\)"),
        (SENTINELS + "db = -1\n", r"redis.db = -1: expected a database number"),
        (BARE_SENTINELS + "wait_replicas = 17\n", r"redis.wait_replicas = 17: expected a number of replicas"),
        (BARE_SENTINELS, r"redis.wait_replicas is missing: with sentinels, set it to the number of replicas \(0 "),
        (SENTINELS + "sentinel_password = 5\n", r"redis.sentinel_password = '\*\*\*': expected a password"),
        (SENTINELS + "sentinel_password = 'a'\nsentinel_password_file = 'f'\n", r"both set \(keep one\)"),
        # redis-py would log stork's own client in as the URL's user, and Celery as the role's
        ("[redis]\nurl = 'redis://u:p@127.0.0.1:1/0'\n[redis.users.worker]\nuser = 'w'\npassword = 'x'\n",
         r"redis.url holds a login and \[redis.users\] are configured: keep one"),
        ("[redis]\nbogus = 1\n", r"unknown key redis.bogus \(expected one of: url, sentinels"),
        ("[redis.users.admin]\nuser = 'x'\n", r"\[redis.users.admin\]: unknown role \(expected one of: worker, "),
        ("[redis.users.worker]\nuser = 'x'\nrole = 'y'\n", r"unknown key redis.users.worker.role"),
        ("[redis.users.worker]\npassword = ''\n", r"redis.users.worker.password = '\*\*\*': expected a password"),
        ("[redis.users.worker]\npassword = 'a'\npassword_file = 'f'\n", r"password and password_file both set"),
        ("[redis.users.worker]\npassword_file = '/nonexistent/pass'\n",
         r"redis.users.worker.password_file = '/nonexistent/pass': cannot read it: No such file"),
        ("[redis.users.worker]\npassword_file = '/tmp'\n",
         r"redis.users.worker.password_file = '/tmp': not a regular file"),
    ],
)
def test_redis_settings_refused_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(text)
    assert str(FILE) in str(err.value) and "'a'" not in str(err.value)


def test_sentinels_users_and_tls_parse(tmp_path):
    secret = tmp_path / "worker.pass"
    secret.write_text("s3cret\nignored\n")
    secret.chmod(0o600)
    cfg = config.parse(BARE_SENTINELS + f'tls = true\nca_file = "ca.pem"\nwait_replicas = 1\ndb = 2\n'
                       f'[redis.users.worker]\nuser = "w"\npassword_file = "{secret}"\n', tmp_path / "stork.toml",
                       {"STORK_NODE": "node1"})
    settings = cfg.redis
    assert settings.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379)) and settings.db == 2
    assert settings.ca_file == tmp_path / "ca.pem" and settings.tls and settings.wait_replicas == 1
    assert settings.login("worker").password == "s3cret" and "s3cret" not in repr(cfg)
    with pytest.raises(ConfigError, match=r"no Redis user for the producer role: add \[redis.users.producer\]"):
        settings.login("producer")
    assert settings.where() == "Redis master 'stork' (sentinels 10.0.0.1:26379, 10.0.0.2:26379)"


def test_a_workers_stats_reply_shows_no_password(tmp_path):
    """Celery's `inspect stats` reply, which Flower shows on a worker's Broker tab, carries the
    broker connection's parameters with only `password` dropped: stork's sentinel URLs (kombu's
    alternates) and sentinel login (transport options) held the worker's and the sentinels'
    passwords, for anyone who reaches Flower or may send inspect (the operator's user)."""
    import json

    from celery.worker.consumer.connection import Connection as ConnectionStep
    from kombu import Connection

    import worker.hooks  # noqa: F401  (installs the censored reply, as a worker's start does)

    for name, word in (("worker.pass", "w-SECRET"), ("sentinel.pass", "s-SECRET")):
        (tmp_path / name).write_text(word + "\n")
        (tmp_path / name).chmod(0o600)
    cfg = config.parse(SENTINELS.replace('"10.0.0.2:26379"]', '"10.0.0.2:26379", "10.0.0.3:26379"]') +
                       f'sentinel_password_file = "{tmp_path / "sentinel.pass"}"\n'
                       f'[redis.users.worker]\nuser = "w"\npassword_file = "{tmp_path / "worker.pass"}"\n',
                       tmp_path / "stork.toml", {"STORK_NODE": "node1"})
    options = connect.celery_settings(cfg.redis, "worker", 60)
    broker = Connection(options["broker_url"], transport_options=options["broker_transport_options"])
    shown = json.dumps(ConnectionStep.info(None, type("Consumer", (), {"connection": broker})()), default=str)
    assert "10.0.0.1" in shown and "SECRET" not in shown, shown


def test_a_percent_encoded_url_password_is_the_one_redis_py_sends():
    """redis-py decodes a URL's password: the broker's URL had it encoded twice (p%2540ss), and
    kombu logged in with another password than stork's own client."""
    cfg = parse("", {"STORK_NODE": "n", "STORK_REDIS_URL": "redis://u%2F1:p%40ss@127.0.0.1:7/0"})
    assert cfg.redis.login("worker").user == "u/1" and cfg.redis.login("worker").password == "p@ss"
    assert connect.celery_settings(cfg.redis, "worker", 60)["broker_url"] == "redis://u%2F1:p%40ss@127.0.0.1:7/0"


def test_stork_redis_url_in_the_environment_wins_over_sentinels():
    cfg = parse(SENTINELS, {"STORK_NODE": "n", "STORK_REDIS_URL": "redis://127.0.0.1:7/0"})
    assert not cfg.redis.sentinels and cfg.redis.url == "redis://127.0.0.1:7/0"


@pytest.mark.parametrize("mode", [0o644, 0o604])
def test_a_password_file_others_can_read_is_refused(tmp_path, mode):
    secret = tmp_path / "p"
    secret.write_text("x\n")
    secret.chmod(mode)
    with pytest.raises(ConfigError, match=r"password_file = .*every user of this machine can read it \(mode 0"):
        config.parse(f'[redis.users.worker]\npassword_file = "{secret}"\n', tmp_path / "s.toml", {"STORK_NODE": "n"})


@pytest.mark.parametrize("secret", [
    '[redis]\nurl = "redis://:pw@127.0.0.1:6379/0"\n',
    '[redis.users.producer]\nuser = "p"\npassword = "pw"\n',
    '[redis]\nsentinels = ["h:1"]\nmaster_name = "m"\nwait_replicas = 0\nsentinel_password = "pw"\n',
    '[flower]\nbasic_auth = "a:pw"\n',
])
def test_a_config_holding_a_password_is_refused_when_world_readable(tmp_path, secret):
    """load() refuses it with the key and the mode; the same file at 0600 loads."""
    file = tmp_path / "stork.toml"
    file.write_text(secret)
    file.chmod(0o644)
    env = {"STORK_CONFIG": str(file), "STORK_NODE": "n"}
    with pytest.raises(ConfigError, match=r"holds .* but every user of this machine can read it \(mode 0644\)"):
        config.load(env)
    file.chmod(0o600)
    config.load(env)


@pytest.mark.parametrize(
    ("text", "role", "url"),
    [
        ("", "producer", "redis://127.0.0.1:6379/0"),
        ('[redis]\nurl = "redis://:pw@10.0.0.5:6380/3"\n', "worker", "redis://:pw@10.0.0.5:6380/3"),
        ('[redis]\nurl = "rediss://10.0.0.5/1"\n[redis.users.producer]\nuser = "p"\npassword = "a b/@:"\n',
         "producer", "rediss://p:a%20b%2F%40%3A@10.0.0.5/1"),
        (SENTINELS + "db = 2\n[redis.users.worker]\nuser = \"w\"\npassword = \"x\"\n", "worker",
         "sentinel://w:x@10.0.0.1:26379/2;sentinel://w:x@10.0.0.2:26379/2"),
    ],
)
def test_the_broker_url_carries_the_roles_login(text, role, url):
    settings = parse(text).redis
    options = connect.celery_settings(settings, role, 3600)
    assert options["broker_url"] == url
    assert options["broker_channel_error_retry"] and options["broker_transport_options"]["socket_timeout"]
    if settings.sentinels:
        assert options["broker_transport_options"]["master_name"] == "stork"


def test_tls_checks_the_servers_certificate_against_the_ca_file(tmp_path):
    settings = config.parse('[redis]\nurl = "rediss://h:1/0"\nca_file = "ca.pem"\n', tmp_path / "s.toml",
                            {"STORK_NODE": "n"}).redis
    assert connect.client_options(settings)["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert connect.client_options(settings)["ssl_cert_reqs"] == "required"
    broker_tls = connect.celery_settings(settings, "worker", 3600)["broker_use_ssl"]
    assert broker_tls["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert "ssl" not in connect.client_options(parse("").redis)


CLIENT_CERT = '[redis]\nurl = "rediss://h:1/0"\ncert_file = "client.pem"\nkey_file = "client.key"\n'
SENTINEL_CERT = SENTINELS + 'tls = true\ncert_file = "client.pem"\nkey_file = "client.key"\n'


def _certificate(where: Path, key: str = "KEY", mode: int = 0o600) -> None:
    (where / "client.pem").write_text("CERT")
    (where / "client.key").touch(mode=mode)
    (where / "client.key").chmod(mode)
    (where / "client.key").write_text(key)


def _parse(text: str, where: Path) -> config.Config:
    return config.parse(text, where / "s.toml", {"STORK_NODE": "n"})


@pytest.mark.parametrize("text", [CLIENT_CERT, SENTINEL_CERT], ids=["url", "sentinels"])
def test_a_client_certificate_goes_to_every_connection(tmp_path, text):
    """stork's client, the sentinels' connections and Celery's broker (its sentinels too) show
    the certificate and its key, each read from the descriptor the check at load opened."""
    _certificate(tmp_path)
    settings = _parse(text, tmp_path).redis
    options = connect.client_options(settings)
    with open(options["ssl_certfile"]) as cert, open(options["ssl_keyfile"]) as key:
        assert (cert.read(), key.read()) == ("CERT", "KEY")
    assert options["ssl_keyfile"].startswith("/proc/self/fd/")
    assert connect.sentinel_kwargs(settings)["ssl_keyfile"] == options["ssl_keyfile"]
    celery = connect.celery_settings(settings, "worker", 3600)
    shown = (celery["broker_use_ssl"]["ssl_certfile"], celery["broker_use_ssl"]["ssl_keyfile"])
    assert shown == (options["ssl_certfile"], options["ssl_keyfile"])
    if settings.sentinels:
        assert celery["broker_transport_options"]["sentinel_kwargs"]["ssl_certfile"] == options["ssl_certfile"]


def test_the_tls_library_reads_the_files_that_were_checked(tmp_path):
    """Certificate and key replaced after the check (the key by a link to a file every user
    can read): what a connection opens is still the pair that was checked, as it was. A reload
    of the config naming the same paths keeps that pair (a new one is taken at the next start)."""
    _certificate(tmp_path, "CHECKED")
    settings = _parse(CLIENT_CERT, tmp_path).redis
    (tmp_path / "client.key").rename(tmp_path / "old.key")
    (tmp_path / "other").write_text("OTHER")
    (tmp_path / "client.key").symlink_to(tmp_path / "other")
    (tmp_path / "client.pem").unlink()
    (tmp_path / "client.pem").write_text("NEW CERT")

    def pair(settings: config.RedisSettings) -> tuple[str, str]:
        options = connect.client_options(settings)
        with open(options["ssl_certfile"]) as c, open(options["ssl_keyfile"]) as k:
            return c.read(), k.read()

    assert pair(settings) == ("CERT", "CHECKED")
    (tmp_path / "client.key").unlink()
    (tmp_path / "client.key").touch(mode=0o600)
    (tmp_path / "client.key").write_text("NEW KEY")
    assert pair(_parse(CLIENT_CERT, tmp_path).redis) == ("CERT", "CHECKED")


def test_a_descriptor_closed_behind_stork_is_opened_and_checked_again(tmp_path):
    """A process that closes every descriptor (as one does when it daemonizes) leaves no
    /proc/self/fd path naming another file: the next connection opens the key again, checked."""
    _certificate(tmp_path)
    settings = _parse(CLIENT_CERT, tmp_path).redis
    held = connect.client_options(settings)["ssl_keyfile"]
    os.close(int(held.rsplit("/", 1)[1]))
    again = connect.client_options(settings)["ssl_keyfile"]
    with open(again) as key:
        assert key.read() == "KEY"
    os.close(int(again.rsplit("/", 1)[1]))
    (tmp_path / "client.key").chmod(0o644)  # the file now open to all: the new open refuses it
    with pytest.raises(ConfigError, match=r"redis.key_file = .*every user of this machine can read it"):
        connect.client_options(settings)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: (p.touch(mode=0o644), p.chmod(0o644)),
     r"every user of this machine can read it \(mode 0644\): chmod o-r"),
    (lambda p: p.mkdir(), r"not a regular file"),
    (lambda p: os.mkfifo(p, 0o600), r"not a regular file"),
    (lambda p: None, r"cannot read it: No such file or directory"),
    (lambda p: (p.touch(mode=0o600), os.truncate(p, (1 << 20) + 1)), r"larger than 1 MiB: not a PEM file"),
])
def test_a_key_file_that_is_not_a_private_file_is_refused(tmp_path, make, message):
    (tmp_path / "client.pem").write_text("CERT")
    make(tmp_path / "client.key")
    with pytest.raises(ConfigError, match=rf"s.toml: redis.key_file = '.*client.key': {message}"):
        _parse(CLIENT_CERT, tmp_path)


def test_one_pem_file_holding_certificate_and_key_is_checked_as_the_key(tmp_path):
    """cert_file and key_file may name one file: read first as the certificate, it is still
    refused as the key when every user can read it."""
    (tmp_path / "both.pem").write_text("CERT\nKEY\n")
    (tmp_path / "both.pem").chmod(0o644)
    text = '[redis]\nurl = "rediss://h:1/0"\ncert_file = "both.pem"\nkey_file = "both.pem"\n'
    with pytest.raises(ConfigError, match=r"redis.key_file = '.*both.pem': every user of this machine can read it"):
        _parse(text, tmp_path)


def test_a_key_file_its_group_can_read_is_taken(tmp_path):
    """As for password files: refused when every user can read it (a group may: root:ssl-cert 0640)."""
    _certificate(tmp_path, mode=0o640)
    assert _parse(CLIENT_CERT, tmp_path).redis.key_file == tmp_path / "client.key"


def test_a_missing_certificate_file_is_refused(tmp_path):
    (tmp_path / "client.key").touch(mode=0o600)
    with pytest.raises(ConfigError, match=r"s.toml: redis.cert_file = '.*client.pem': cannot read it"):
        _parse(CLIENT_CERT, tmp_path)


@pytest.mark.parametrize(("text", "error", "hinted"), [
    ('[redis]\nurl = "rediss://h:1/0"\n', "EOF occurred in violation of protocol (_ssl.c:2427)", True),
    ('[redis]\nurl = "rediss://h:1/0"\n', "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
     True),
    ('[redis]\nurl = "rediss://h:1/0"\n', "[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] sslv3 alert handshake failure", True),
    ('[redis]\nurl = "rediss://h:1/0"\n', "Connection refused", False),  # nothing listens: no handshake
    ('[redis]\nurl = "rediss://h:1/0"\n', "Connection reset by peer", False),  # a restart, say: no sign of a want
    ('[redis]\nurl = "redis://h:1/0"\n', "EOF occurred in violation of protocol", False),  # no TLS: no certificate
])
def test_a_tls_handshake_cut_short_names_the_client_certificate_keys(text, error, hinted):
    import redis

    line = connect.trouble(parse(text).redis, redis.ConnectionError(error))
    assert line.startswith("Redis at redis") and error in line
    assert ("set redis.cert_file and redis.key_file" in line) == hinted


def test_a_client_with_a_certificate_is_not_told_to_get_one(tmp_path):
    import redis

    _certificate(tmp_path)
    settings = _parse(CLIENT_CERT, tmp_path).redis
    assert "cert_file" not in connect.trouble(settings, redis.ConnectionError("EOF occurred in violation of protocol"))


def test_the_role_comes_from_stork_role(monkeypatch):
    monkeypatch.setenv("STORK_ROLE", "operator")
    assert connect.role("producer") == "operator"
    monkeypatch.setenv("STORK_ROLE", "root")
    with pytest.raises(ConfigError, match=r"STORK_ROLE = 'root': expected one of: worker, producer, operator"):
        connect.role("producer")
    monkeypatch.delenv("STORK_ROLE")
    assert connect.role("worker") == "worker"


def test_acl_lines_need_users_and_hold_only_hashes():
    with pytest.raises(ConfigError, match=r"no \[redis.users.<role>\] in the config"):
        acl.user_lines(parse("").redis)
    with pytest.raises(ConfigError, match=r"redis.users.worker: a user and a password are needed"):
        acl.user_lines(parse('[redis.users.worker]\nuser = "w"\n').redis)
    lines = acl.user_lines(parse('[redis.users.producer]\nuser = "p"\npassword = "pw"\n').redis)
    assert lines[0].startswith("user p on #") and "pw " not in lines[0] and lines[-1] == "user default off"
    assert all(os.linesep not in line for line in lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[redis]\nurl = "redis://h:1/0"\nca_file = "ca.pem"\n', r"redis.ca_file: only with TLS \(a rediss:// url"),
        (SENTINELS + 'ca_file = "ca.pem"\n', r"redis.ca_file: only with TLS"),
        ('[redis]\nurl = "redis://h:1/0"\ncert_file = "c.pem"\nkey_file = "c.key"\n',
         r"redis.cert_file: only with TLS"),
        (SENTINELS + 'key_file = "c.key"\n', r"redis.key_file: only with TLS"),
        ('[redis]\nurl = "rediss://h:1/0"\ncert_file = "c.pem"\n',
         r"redis.cert_file without redis.key_file: a client certificate needs both"),
        (SENTINELS + 'tls = true\nkey_file = "c.key"\n', r"redis.key_file without redis.cert_file"),
        ('[redis]\nurl = "rediss://h:1/0"\ncert_file = ""\nkey_file = "c.key"\n',
         r"redis.cert_file = '': expected a file"),
        ('[redis.users.worker]\nuser = "x nopass ~* +@all"\n',
         r"redis.users.worker.user = .*expected a Redis user name"),
    ],
)
def test_settings_that_would_be_ignored_or_inject_acl_rules_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_the_environments_url_takes_tls_from_its_scheme_and_the_url_stays_out_of_repr():
    text = SENTINELS + 'tls = true\nca_file = "ca.pem"\n'
    plain = parse(text, {"STORK_NODE": "n", "STORK_REDIS_URL": "redis://:pw@127.0.0.1:7/0"})
    assert not plain.redis.tls and plain.redis.ca_file is None and "ssl" not in connect.client_options(plain.redis)
    assert "pw" not in repr(plain.redis) and "broker_use_ssl" not in connect.celery_settings(plain.redis, "worker", 600)
    secure = parse(text, {"STORK_NODE": "n", "STORK_REDIS_URL": "rediss://127.0.0.1:7/0"})
    assert secure.redis.tls and connect.client_options(secure.redis)["ssl_ca_certs"].endswith("ca.pem")


def _replica(port: int, *flags: str) -> dict:
    return {"ip": "10.0.0.9", "port": port, "is_sdown": "s_down" in flags, "is_odown": "o_down" in flags}


@pytest.mark.parametrize(
    ("views", "count"),
    [
        ([[_replica(1), _replica(2)]], 2),
        ([[_replica(1), _replica(2, "s_down")]], 1),  # down: the sentinels never promote it
        ([[_replica(1), _replica(2, "o_down")]], 1),
        ([[_replica(1), _replica(2, "s_down")], [_replica(1), _replica(2)]], 2),  # one sentinel still sees it
        ([[_replica(1), _replica(2, "s_down")], [_replica(1), _replica(2, "s_down")]], 1),
        ([[_replica(1)], [_replica(1), _replica(2)]], 2),  # one sentinel does not know it yet
        ([[_replica(1, "s_down"), _replica(2, "s_down")]], 0),  # none to promote: nothing to wait for
        ([[]], 0),
    ],
)
def test_a_write_waits_for_every_replica_a_sentinel_could_promote(views, count):
    assert connect.promotable(views) == count


def test_sends_are_replicated_only_where_replicas_are_waited_for():
    assert "wait_replicas" not in connect.celery_settings(parse(SENTINELS).redis, "worker", 60)[
        "broker_transport_options"]
    waited = connect.celery_settings(parse(BARE_SENTINELS + "wait_replicas = 2\n").redis, "worker", 60)
    assert waited["broker_transport_options"]["wait_replicas"] == 2


def test_kombus_schemes_name_storks_transports():
    """Each URL kombu switches to after a lost connection picks its transport by scheme again."""
    assert resolve_transport("sentinel") is failover.SentinelTransport
    assert resolve_transport("redis") is resolve_transport("rediss") is failover.Transport
