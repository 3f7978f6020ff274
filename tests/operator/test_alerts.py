"""Alerts (worker/notify.py) reaching the session's real webhook server and real SMTP server
(tests/alerts.py), sent by the real workers: a failed job within a minute, signed; damaged
backups found by verify; a schedule run that could not start a guest's backup; a guest
without a recent backup; and the refusals of [notify.<name>] tables."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from drivers import config
from drivers.errors import ConfigError
from tests.conftest import BASE, MAILBOX, WEBHOOK, WEBHOOK_SECRET, storage_path
from worker import notify
from worker.jobs import schedules, stale
from worker.testing import wait_for


def posted(kind: str, **match: object) -> list[dict]:
    return [e for e in WEBHOOK.events() if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


def failing_job(client, vmid, tmp_path) -> str:
    """A create job that fails (its guest folder is a symlink: never followed)."""
    g = vmid()
    storage_path("local").mkdir(parents=True, exist_ok=True)
    (storage_path("local") / str(g)).symlink_to(tmp_path)
    try:
        job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "1M"}})
    finally:
        (storage_path("local") / str(g)).unlink()
    assert job.state == "failed"
    return job.id


def test_a_failed_job_reaches_the_webhook_and_the_mailbox_within_a_minute(client, vmid, tmp_path):
    job = failing_job(client, vmid, tmp_path)
    [event] = wait_for(lambda: posted("job-failed", job=job), 60, "the webhook to get the failed job")
    assert event["kind"] == "create" and "not a directory" in event["error"]
    assert event["summary"].startswith(f"job {job} create")
    post = next(p for p in WEBHOOK.posts if json.loads(p["body"]).get("job") == job)
    signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), post["body"], hashlib.sha256).hexdigest()
    assert post["headers"]["X-Stork-Signature"] == signature and post["headers"]["X-Stork-Event"] == "job-failed"
    assert post["path"] == "/stork?token=not-for-logs"
    mail = wait_for(lambda: next((m for m in MAILBOX.mails if job in m["Subject"]), None), 60, "the mail")
    assert mail["To"] == "ops@cluster.test" and mail["Subject"].startswith(f"stork: job {job} create")
    body = mail.get_payload(decode=True).decode().replace("\r\n", "\n")
    assert body.startswith(f"job {job} create") and json.loads(body[body.index("\n{") + 1:])["job"] == job


def test_damaged_backups_found_by_verify_are_announced(client, vmid):
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(b"\x42" * 65536)
    backup = client.run("backup", vmid=g, storage="backup").result["backup"]
    digest = json.loads((BASE / "backup" / backup / "scsi0.index.json").read_bytes())["chunks"][0]
    chunk = BASE / "backup" / ".chunks" / digest[:4] / digest
    saved = chunk.read_bytes()
    chunk.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    try:
        job = client.run("verify", backup=backup)
        assert job.state == "failed"
        [event] = wait_for(lambda: posted("backup-damaged", job=job.id), 60, "the webhook to hear of the damage")
        assert event["storage"] == "backup" and backup in event["damaged"][0] and digest in event["summary"]
    finally:
        (chunk.parent / f"{digest}.bad").rename(chunk)  # verify moved it aside
        chunk.write_bytes(saved)


def test_a_schedule_run_that_could_not_start_a_backup_is_announced_once(client, vmid):
    g = vmid()  # no such guest: its backup is refused at submit
    name = f"alerting{g}"
    cfg = replace(client.cfg, schedules={name: {"schedule": "* * * * *", "guests": [g], "storage": "backup"}})
    now = datetime.now(UTC)
    assert schedules.tick(cfg, client.r, client.app, now) == [name]
    [event] = wait_for(lambda: posted("schedule-failed", schedule=name), 60, "the webhook to hear of the run")
    assert f"unknown guest {g}" in event["summary"] or str(g) in event["summary"]
    schedules._start(cfg, client.r, client.app, schedules.parse(cfg)[0], schedules._last(client.r, name), "again")
    assert len(posted("schedule-failed", schedule=name)) == 1  # a run resumed says it no second time


def test_a_guest_without_a_recent_backup_is_announced_once_a_day(client, vmid):
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    cfg = replace(client.cfg, notify={"hook": {**client.cfg.notify["hook"], "stale-after": 24}})
    now = datetime.now(UTC).replace(year=2031)  # an hour no earlier check took
    stale.check(cfg, client.r, client.app, now)
    event = wait_for(lambda: next(iter(posted("backup-stale", vmid=g)), None), 60, "the webhook to hear of it")
    assert event["summary"] == f"guest {g}: it has no backup, older than 24 hours" and event["hours"] == 24
    client.r.delete(f"stork:notify:stale-check:{int(now.timestamp()) // stale.CHECK_EVERY}")
    stale.check(cfg, client.r, client.app, now)  # looked again within the day: not said again
    assert len(posted("backup-stale", vmid=g)) == 1


@pytest.mark.parametrize(("guests", "newest", "hours", "stale_ones"), [
    pytest.param([100, 101, 102], {100: 1000.0, 101: 9000.0}, 1, [100, 102], id="old, recent, none"),
    pytest.param([100], {100: 10000 - 3600.0}, 1, [], id="just in time"),
    pytest.param([], {100: 0.0}, 1, [], id="a backup of a guest no longer there"),
])
def test_which_guests_are_stale(guests, newest, hours, stale_ones):
    assert stale.stale_guests(guests, newest, hours, now=10000.0) == stale_ones


def test_a_target_that_cannot_be_reached_is_one_line_without_its_path(client):
    cfg = replace(client.cfg, notify={"down": {"type": "webhook", "url": "http://127.0.0.1:9/secret/path?token=x"}})
    with pytest.raises(notify.DeliveryError, match=r"^webhook http://127\.0\.0\.1:9: ") as caught:
        notify.deliver(cfg, "down", notify.event("job-failed", "x"))
    assert "secret" not in str(caught.value) and "token" not in str(caught.value)


def test_a_url_that_http_cannot_even_parse_is_one_line_without_its_login():
    """Not through the config, which refuses a login before the host: urlopen's InvalidURL
    (no URLError, no OSError) quoted it, and went out whole as the task's failure."""
    with pytest.raises(notify.DeliveryError, match=r"^webhook https://hooks\.example: InvalidURL$") as caught:
        notify._post({"url": "https://u:tok3n@hooks.example/x"}, notify.event("job-failed", "x"))
    assert "tok3n" not in str(caught.value)


NOTIFY = "[notify.n]\n"


@pytest.mark.parametrize(("text", "message"), [
    (NOTIFY + "url = 'http://h/x'\n", r"notify.n.type is missing"),
    (NOTIFY + "type = 'pager'\n", r"notify.n.type = 'pager': expected \"webhook\" or \"smtp\""),
    (NOTIFY + "type = 'webhook'\n", r"notify.n.url is missing"),
    (NOTIFY + "type = 'webhook'\nurl = 'ftp://h/x'\n", r"notify.n.url = '\*\*\*': expected an http"),
    (NOTIFY + "type = 'webhook'\nurl = 'http://h/x'\nhost = 'h'\n", r"notify.n.host: not a key of a webhook target"),
    (NOTIFY + "type = 'smtp'\nhost = 'h'\nfrom = 'a@b'\n", r"notify.n.to is missing"),
    (NOTIFY + "type = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['not an address']\n",
     r"notify.n.to = .*: expected a list"),
    (NOTIFY + "type = 'webhook'\nurl = 'http://h/x'\nevents = ['job-failed', 'coffee']\n", r"notify.n.events = "),
    (NOTIFY + "type = 'webhook'\nurl = 'http://h/x'\nevents = ['backup-stale']\n", r"backup-stale needs stale-after"),
    ("[notify.N]\ntype = 'webhook'\nurl = 'http://h/x'\n", r"\[notify.N\]: invalid notify name"),
    # a login before the host: urlopen's error quoted it (a token) in the task's failure, and Flower
    (NOTIFY + "type = 'webhook'\nurl = 'https://u:tok3n@hooks.example/x'\n",
     r"notify.n.url = '\*\*\*': expected .*no login before its host"),
    # a mail login over plain TCP would send the password in the clear
    (NOTIFY + "type = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['o@p']\nusername = 'u'\npassword = 'p'\n",
     r"notify.n: a login is sent only over TLS: set starttls = true"),
])
def test_a_bad_notify_target_is_one_config_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(text, tmp_path / "stork.toml", {"STORK_NODE": "n"})


def test_a_notify_secret_is_never_echoed_in_a_config_error(tmp_path):
    for key, value in (("url", "'ftp://hooks.example/token-123'"), ("secret", "987654321"), ("password", "12345678")):
        rest = "url = 'http://h/x'\n" if key != "url" else ""
        kind = "type = 'smtp'\nhost = 'h'\nfrom = 'a@b'\nto = ['o@p']\n" if key == "password" else "type = 'webhook'\n"
        with pytest.raises(ConfigError) as caught:
            config.parse(NOTIFY + kind + (rest if key != "password" else "") + f"{key} = {value}\n",
                         tmp_path / "stork.toml", {"STORK_NODE": "n"})
        assert f"notify.n.{key} = '***'" in str(caught.value) and value.strip("'") not in str(caught.value)


def test_a_summary_with_line_breaks_still_makes_a_one_line_subject(client):
    ev = notify.event("job-failed", "job x failed:\nline two\r\nline three", job="multi-line")
    notify.deliver(client.cfg, "mail", ev)
    mail = wait_for(lambda: next((m for m in MAILBOX.mails if "line two" in m["Subject"]), None), 10, "the mail")
    assert mail["Subject"] == "stork: job x failed: line two line three"


def test_a_guest_backed_up_on_another_node_is_not_stale(client, vmid):
    """Its backup is in a storage this node does not reach, but its backup step recorded it
    (as every backup does, for the metrics): no alert."""
    import time as clock

    from worker.records import BACKUPS

    g, never = vmid(), vmid()
    for guest in (g, never):
        job = client.run("create", vmid=guest, disks={"scsi0": {"storage": "local", "size": "4M"}})
        assert job.state == "succeeded"
    client.r.hset(BACKUPS, str(g), json.dumps({"time": clock.time(), "storage": "elsewhere", "duration": 1.0,
                                               "size": 4 << 20, "written": 0}))
    cfg = replace(client.cfg, notify={"hook": {**client.cfg.notify["hook"], "stale-after": 24}})
    now = datetime.now(UTC)
    client.r.delete(f"stork:notify:stale-check:{int(now.timestamp()) // stale.CHECK_EVERY}")  # this hour's look: ours
    stale.check(cfg, client.r, client.app, now)
    wait_for(lambda: posted("backup-stale", vmid=never), 60, "the look to run: the guest never backed up is news")
    assert posted("backup-stale", vmid=g) == []  # the same look: its alert would have gone with the other
