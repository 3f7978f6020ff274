"""Scheduled backups (worker/jobs/schedules.py): the slot arithmetic as table tests, the config's
refusals, and ticks against the real Redis and workers: a slot enqueued once by two ticks at
once, one catch-up after missed slots, the prune after the backups, `stork schedule list`."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from celery.schedules import crontab

from drivers import config
from drivers.errors import ConfigError
from tests.conftest import BASE
from worker.jobs import schedules
from worker.testing import wait_for


def cron(line: str) -> crontab:
    m, h, dom, mon, dow = line.split()
    return crontab(minute=m, hour=h, day_of_month=dom, month_of_year=mon, day_of_week=dow)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("line", "now", "latest", "following"),
    [
        ("* * * * *", "2026-11-26 13:37:42", "2026-11-26 13:37", "2026-11-26 13:38"),
        ("0 2 * * *", "2026-11-26 13:37:00", "2026-11-26 02:00", "2026-11-27 02:00"),
        ("0 2 * * *", "2026-11-26 02:00:59", "2026-11-26 02:00", "2026-11-27 02:00"),
        ("0 2 * * *", "2026-11-26 01:59:59", "2026-11-25 02:00", "2026-11-26 02:00"),
        ("*/15 9-17 * * 1-5", "2026-11-28 12:00:00", "2026-11-27 17:45", "2026-11-30 09:00"),  # a Saturday
        ("30 4 1 * *", "2026-11-26 00:00:00", "2026-11-01 04:30", "2026-12-01 04:30"),
        ("0 0 1 1 *", "2026-11-26 00:00:00", "2026-01-01 00:00", "2027-01-01 00:00"),
        ("0 12 * * 0", "2026-11-29 12:00:00", "2026-11-29 12:00", "2026-12-06 12:00"),  # Sunday is 0
        ("0 0 29 2 *", "2026-11-26 00:00:00", "2024-02-29 00:00", "2028-02-29 00:00"),  # leap days
    ],
)
def test_latest_and_next_slot(line, now, latest, following):
    assert schedules.latest_slot(cron(line), at(now)) == at(latest)
    assert schedules.next_slot(cron(line), at(now)) == at(following)


def test_a_crontab_that_never_matches_has_no_slot():
    assert schedules.latest_slot(cron("0 0 30 2 *"), at("2026-11-26 00:00:00")) is None
    assert schedules.next_slot(cron("0 0 30 2 *"), at("2026-11-26 00:00:00")) is None


@pytest.mark.parametrize(
    ("last", "now", "due"),
    [
        pytest.param(None, "2026-11-26 02:03:00", "2026-11-26 02:00", id="never run: a recent slot runs"),
        pytest.param(None, "2026-11-26 13:00:00", None, id="never run: an old slot does not"),
        pytest.param("2026-11-26 02:00", "2026-11-26 13:00:00", None, id="this slot ran"),
        pytest.param("2026-11-25 02:00", "2026-11-26 13:00:00", "2026-11-26 02:00", id="the next slot is due"),
        pytest.param("2026-11-20 02:00", "2026-11-26 13:00:00", "2026-11-26 02:00",
                     id="five slots missed: one catch-up, the latest"),
    ],
)
def test_due_slot(last, now, due):
    found = schedules.due_slot(cron("0 2 * * *"), at(last) if last else None, at(now))
    assert found == (at(due) if due else None)


SCHEDULE = "[schedule.s]\nschedule = '0 2 * * *'\nguests = 'all'\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[schedule.s]\nguests = 'all'\n", r"schedule.s.schedule is missing"),
        ("[schedule.s]\nschedule = '0 2 * *'\nguests = 'all'\n",
         r"schedule.s.schedule = '0 2 \* \*': expected a crontab"),
        ("[schedule.s]\nschedule = '0 2 * * *'\nguests = [5]\n", r"schedule.s.guests = \[5\]: expected \"all\""),
        ("[schedule.s]\nschedule = '0 2 * * *'\nguests = []\n", r"schedule.s.guests = \[\]: expected"),
        (SCHEDULE + "keep-daily = -1\n", r"schedule.s.keep-daily = -1: expected a whole number"),
        (SCHEDULE + "keep-often = 1\n", r"unknown key schedule.s.keep-often"),
        (SCHEDULE + "storage = 'local'\n", r"schedule.s.storage = 'local': expected a backup storage"),
        ("[schedule.s]\nschedule = '0 2 * * *'\nguests = [100]\nexclude = [101]\n",
         r"schedule.s.exclude: only with guests = \"all\""),
        ("[schedule.Bad]\nschedule = '0 2 * * *'\nguests = 'all'\n", r"\[schedule.Bad\]: invalid schedule name"),
        ("[schedule.v]\nschedule = '0 2 * * *'\naction = 'dance'\n",
         r"schedule.v.action = 'dance': expected \"backup\" or \"verify\" or \"gc\""),
        ("[schedule.v]\nschedule = '0 2 * * *'\naction = 'verify'\nguests = [500]\n",
         r"schedule.v.guests: only with action = \"backup\" \(this one is 'verify'\)"),
        ("[schedule.v]\nschedule = '0 2 * * *'\naction = 'gc'\nkeep-last = 3\n", r"schedule.v.keep-last: only with"),
        (SCHEDULE + "reverify-after = 30\n", r"schedule.s.reverify-after: only with action = \"verify\""),
        ("[schedule.v]\nschedule = '0 2 * * *'\naction = 'verify'\nreverify-after = -1\n",
         r"schedule.v.reverify-after = -1: expected a whole number of days"),
        ("[sync.o]\nschedule = '0 3 * * *'\nfrom = 'b'\n", r"sync.o.to is missing"),
        ("[sync.o]\nschedule = '0 3 * * *'\nfrom = 'local'\nto = 'b'\n",
         r"sync.o.from = 'local': expected a backup storage"),
        ("[sync.o]\nschedule = '0 3 * * *'\nfrom = 'b'\nto = 'b'\n", r"sync.o: from and to name the same storage 'b'"),
        ("[sync.o]\nschedule = '0 3 * * *'\nfrom = 'b'\nto = 'c'\nexclude = [1]\n", r"unknown key sync.o.exclude"),
    ],
)
def test_a_bad_schedule_is_one_config_error_naming_the_key(tmp_path, text, message):
    base = "[storage.local]\ntype = 'dir'\npath = 'images'\n[storage.b]\ntype = 'chunkstore'\npath = 'b'\n"
    with pytest.raises(ConfigError, match=message):
        config.parse(base + text, tmp_path / "stork.toml", {"STORK_NODE": "n"})


@pytest.mark.parametrize(("line", "message"), [
    pytest.param("61 2 * * *", "Invalid end range", id="out-of-range (ValueError)"),
    pytest.param("0,,30 3 * * *", "empty part", id="empty-part (ParseException)"),
    pytest.param("*/ 2 * * *", "empty filter", id="empty-filter (ParseException)"),
])
def test_a_crontab_celery_cannot_parse_names_the_key(tmp_path, line, message):
    cfg = config.parse(f"[schedule.s]\nschedule = '{line}'\nguests = 'all'\n", tmp_path / "stork.toml",
                       {"STORK_NODE": "n"})
    with pytest.raises(ConfigError, match=rf"stork.toml: schedule.s.schedule = '{re.escape(line)}': {message}"):
        schedules.parse(cfg)


# ---- ticks against the real Redis and workers -------------------------------------------------


def with_schedule(client, name: str, guests: list[int], **more) -> config.Config:
    entry = {"schedule": "* * * * *", "guests": guests, "storage": "backup", **more}
    return replace(client.cfg, schedules={name: entry})


def ended(client, job_ids) -> bool:
    return all(client.job(j).state.terminal for j in job_ids)


def test_two_ticks_at_once_enqueue_a_slot_once_and_the_prune_follows_the_backups(client, vmid):
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    cfg = with_schedule(client, f"once{g}", [g], **{"keep-last": 1})
    now = datetime.now(UTC)
    threads = [threading.Thread(target=schedules.tick, args=(cfg, client.r, client.app, now)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    [row] = schedules.status(cfg, client.r, now)
    run = schedules._last(client.r, f"once{g}")
    assert run is not None and list(run["jobs"]) == [str(g)]  # one backup job, not two
    wait_for(lambda: ended(client, run["jobs"].values()), 120)
    assert client.job(run["jobs"][str(g)]).state == "succeeded"
    # the next slot (a minute on): a second backup, then the prune keeps only the newest
    later = now + timedelta(minutes=1)
    schedules.tick(cfg, client.r, client.app, later)  # prunes the first run, starts the second
    second = schedules._last(client.r, f"once{g}")
    wait_for(lambda: ended(client, second["jobs"].values()), 120)
    schedules.tick(cfg, client.r, client.app, later)
    pruned = schedules._last(client.r, f"once{g}")
    assert pruned["pruned"] and len(pruned["prune_jobs"]) == 1
    wait_for(lambda: ended(client, pruned["prune_jobs"]), 120)
    assert [s.id.vmid for _, s in client.backups(vmid=g)] == [g]  # keep-last 1
    [row] = schedules.status(cfg, client.r, later)
    assert row["last"] == schedules.latest_slot(cron("* * * * *"), later).isoformat()
    assert row["outcome"] == "1 succeeded" and row["next"] > row["last"]


def test_after_missed_slots_a_tick_runs_one_catch_up(client, vmid):
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    name = f"late{g}"
    cfg = replace(client.cfg, schedules={name: {"schedule": "0 * * * *", "guests": [g], "storage": "backup"}})
    # ten past the hour: 30 s on is the same slot (a run in the last 30 s of an hour met the next one's)
    now = datetime.now(UTC).replace(minute=10, second=0, microsecond=0)
    hours_ago = schedules.latest_slot(cron("0 * * * *"), now - timedelta(hours=5))
    client.r.set(f"stork:schedule:{name}:last", hours_ago.isoformat())
    client.r.set(f"stork:schedule:{name}:run:{hours_ago.isoformat()}",
                 json.dumps({"slot": hours_ago.isoformat(), "jobs": {}, "refused": {}, "pruned": True}))
    assert schedules.tick(cfg, client.r, client.app, now) == [name]
    assert schedules.tick(cfg, client.r, client.app, now + timedelta(seconds=30)) == []  # ran: not again
    run = schedules._last(client.r, name)
    assert run["slot"] == schedules.latest_slot(cron("0 * * * *"), now).isoformat() and len(run["jobs"]) == 1
    wait_for(lambda: ended(client, run["jobs"].values()), 120)


def test_schedule_list_shows_each_schedule(stork):
    code, out, err = stork("schedule", "list")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:4] == ["NAME", "SCHEDULE", "ACTION", "GUESTS"]
    assert row.split()[0] == "nightly" and "0 2 * * *" in row and "keep-daily=7 keep-weekly=4" in row
    assert "never" in row and " no " in f" {row} "  # disabled, never run


def test_a_schedule_with_a_bad_crontab_does_not_stop_the_others(client, vmid):
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    good = f"good{g}"
    cfg = replace(client.cfg, schedules={
        "bad": {"schedule": "61 2 * * *", "guests": [g], "storage": "backup"},
        "worse": {"schedule": "0,,30 3 * * *", "guests": [g], "storage": "backup"},  # Celery's ParseException
        good: {"schedule": "* * * * *", "guests": [g], "storage": "backup"}})
    now = datetime.now(UTC)
    assert schedules.tick(cfg, client.r, client.app, now) == [good]
    rows = {row["name"]: row for row in schedules.status(cfg, client.r, now)}
    assert rows["bad"]["outcome"].startswith("not run: ") and "Invalid end range" in rows["bad"]["outcome"]
    assert rows["worse"]["outcome"].startswith("not run: ") and "empty part" in rows["worse"]["outcome"]
    run = schedules._last(client.r, good)
    wait_for(lambda: ended(client, run["jobs"].values()), 120)
    # its crontab broken later: not run now, its history still shown, enabled as configured
    broken = replace(cfg, schedules={good: {**cfg.schedules[good], "schedule": "61 * * * *", "exclude": [7]}})
    [row] = schedules.status(broken, client.r, now)
    assert row["enabled"] and row["last"] == run["slot"] and "(last run: 1 succeeded)" in row["outcome"]
    from producer import views

    assert f"{g} except 7" in views.schedules([row])


def test_a_run_whose_starter_died_is_resumed_once_its_lease_lapses(client, vmid):
    """A tick killed after submitting the first guest's backup: the run record holds that job
    and says starting; while its lease lasts nothing else starts it, then a tick submits only
    the guests not yet recorded."""
    g1, g2 = vmid(), vmid()
    for g in (g1, g2):
        assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    name = f"resume{g1}"
    cfg = replace(client.cfg, schedules={name: {"schedule": "* * * * *", "guests": [g1, g2], "storage": "backup"}})
    now = datetime.now(UTC)
    slot = schedules.latest_slot(cron("* * * * *"), now).isoformat()
    first = client.submit("backup", vmid=g1, storage="backup")
    client.r.set(f"stork:schedule:{name}:slot:{slot}", "1")
    client.r.set(f"stork:schedule:{name}:last", slot)
    client.r.set(f"stork:schedule:{name}:starting:{slot}", "1", ex=60)  # the dead starter's lease
    client.r.set(f"stork:schedule:{name}:run:{slot}", json.dumps(
        {"slot": slot, "jobs": {str(g1): first.id}, "refused": {}, "pruned": False, "starting": True}))
    assert schedules.tick(cfg, client.r, client.app, now) == []  # the lease holds
    client.r.delete(f"stork:schedule:{name}:starting:{slot}")  # as when it lapses
    assert schedules.tick(cfg, client.r, client.app, now) == [name]
    run = schedules._last(client.r, name)
    assert run["jobs"][str(g1)] == first.id and list(run["jobs"]) == [str(g1), str(g2)] and not run["starting"]
    # a guest's job is a field of its own (a run of 10,000 guests rewrites no record 10,000 times)
    assert "jobs" not in json.loads(client.r.get(f"stork:schedule:{name}:run:{slot}"))
    assert client.r.hgetall(f"stork:schedule:{name}:run:{slot}:jobs") == run["jobs"]
    wait_for(lambda: ended(client, run["jobs"].values()), 120)


def test_an_edited_crontab_runs_no_old_slot_at_once(client, vmid):
    """Edited from 02:00 to 03:00 at 10:00: today's 03:00 slot is newer than the last run, but
    the edit makes it a new schedule, which runs only a recent slot."""
    g = vmid()
    name = f"edited{g}"
    at_ten = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    ran = (at_ten - timedelta(hours=8)).isoformat()  # 02:00 today
    client.r.set(f"stork:schedule:{name}:last", ran)
    client.r.set(f"stork:schedule:{name}:run:{ran}", json.dumps(
        {"slot": ran, "line": "0 2 * * *", "jobs": {}, "refused": {}, "pruned": True}))
    cfg = replace(client.cfg, schedules={name: {"schedule": "0 3 * * *", "guests": [g], "storage": "backup"}})
    assert schedules.tick(cfg, client.r, client.app, at_ten) == []
    unedited = replace(client.cfg, schedules={name: {"schedule": "0 2 * * *", "guests": [g], "storage": "backup"}})
    assert schedules.tick(unedited, client.r, client.app, at_ten + timedelta(days=1)) == [name]  # the next 02:00
    client.r.delete(f"stork:schedule:{name}:last")


def test_a_re_enabled_schedule_runs_no_slot_that_passed_while_it_was_off(client, vmid):
    """Disabled over its 02:00 slot with an older run on record: enabled again at 10:00, it
    does not run that 02:00 slot at once, but the next day's."""
    g = vmid()
    name = f"paused{g}"
    at_ten = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    ran = (at_ten - timedelta(days=3, hours=8)).isoformat()  # 02:00 three days ago
    client.r.set(f"stork:schedule:{name}:last", ran)
    client.r.set(f"stork:schedule:{name}:run:{ran}", json.dumps(
        {"slot": ran, "line": "0 2 * * *", "jobs": {}, "refused": {}, "pruned": True}))
    entry = {"schedule": "0 2 * * *", "guests": [g], "storage": "backup"}
    off = replace(client.cfg, schedules={name: {**entry, "enabled": False}})
    on = replace(client.cfg, schedules={name: entry})
    assert schedules.tick(off, client.r, client.app, at_ten - timedelta(minutes=5)) == []
    assert client.r.ttl(f"stork:schedule:{name}:skipped:0 2 * * *") > 0
    assert schedules.tick(on, client.r, client.app, at_ten) == []  # today's 02:00 passed while off
    assert schedules._last(client.r, name)["slot"] == ran
    assert schedules.tick(on, client.r, client.app, at_ten + timedelta(days=1)) == [name]  # the next 02:00
    assert schedules._last(client.r, name)["slot"] == (at_ten + timedelta(hours=16)).isoformat()
    for key in client.r.scan_iter(f"stork:schedule:{name}:*"):
        client.r.delete(key)


def test_a_tick_on_a_node_whose_clock_runs_ahead_claims_no_slot_ahead(client, vmid, monkeypatch):
    """Ticks go to whichever worker takes them. One on a node three days ahead (booted before NTP
    set its clock) claimed the slot of three days on, and no tick of the other nodes ran a slot
    before it: three nights without backups. A tick takes Redis's time, one clock for all."""
    g = vmid()
    name = f"ahead{g}"
    cfg = replace(client.cfg, schedules={name: {"schedule": "* * * * *", "guests": [g], "storage": "backup",
                                                "enabled": False}})

    class AheadClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(days=3)

    monkeypatch.setattr(schedules, "datetime", AheadClock)
    before = schedules.cluster_now(client.r)
    schedules.tick(cfg, client.r, client.app)  # disabled: it marks the slots passed, by its clock
    skipped = datetime.fromisoformat(client.r.get(f"stork:schedule:{name}:skipped:* * * * *"))
    assert before - timedelta(minutes=1) <= skipped <= schedules.cluster_now(client.r)
    for key in client.r.scan_iter(f"stork:schedule:{name}:*"):
        client.r.delete(key)


def test_a_skip_mark_set_ahead_moves_back_while_the_schedule_is_off(client, vmid):
    """A disabled schedule's ticks mark the slots that pass; one marked days ahead (a clock that
    ran ahead) is moved back to the real one, so enabling it at 10:00 runs no 02:00 at once."""
    name = f"skipahead{vmid()}"
    at_ten = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    mark = f"stork:schedule:{name}:skipped:0 2 * * *"
    client.r.set(mark, (at_ten + timedelta(days=3)).isoformat())
    off = replace(client.cfg, schedules={name: {"schedule": "0 2 * * *", "guests": [1], "storage": "backup",
                                                "enabled": False}})
    schedules.tick(off, client.r, client.app, at_ten)
    assert client.r.get(mark) == (at_ten - timedelta(hours=8)).isoformat()
    for key in client.r.scan_iter(f"stork:schedule:{name}:*"):
        client.r.delete(key)


def test_a_starters_lease_is_renewed_only_by_its_holder(client, vmid):
    """A starter that stalled past its lease cannot renew it once another tick took the run
    over: two starters never submit side by side."""
    name, slot = f"lease{vmid()}", "2026-11-26T02:00:00+00:00"
    assert schedules._lease(client.r, name, slot, "a") and not schedules._lease(client.r, name, slot, "b")
    assert schedules._renew(client.r, name, slot, "a") and not schedules._renew(client.r, name, slot, "b")
    client.r.delete(f"stork:schedule:{name}:starting:{slot}")  # as when it lapses
    assert schedules._lease(client.r, name, slot, "b")
    assert not schedules._renew(client.r, name, slot, "a")


def test_a_starter_that_lost_its_lease_submits_nothing_more(client, vmid):
    g = vmid()
    name = f"stalled{g}"
    cfg = replace(client.cfg, schedules={name: {"schedule": "* * * * *", "guests": [g], "storage": "backup"}})
    schedule = schedules.parse(cfg)[0]
    slot = "2026-11-26T02:00:00+00:00"
    run = {"slot": slot, "line": schedule.line, "jobs": {}, "refused": {}, "pruned": False, "starting": True}
    schedules._lease(client.r, name, slot, "the-other-starter")
    schedules._start(cfg, client.r, client.app, schedule, run, "me")
    assert run["jobs"] == {} and run["starting"] and client.r.get(f"stork:schedule:{name}:run:{slot}") is None
    jobs = f"stork:schedule:{name}:run:{slot}:jobs"
    assert not schedules._record_held(client.r, name, slot, "me", "jobs", str(g), "job-of-me")  # not its lease
    assert not client.r.exists(jobs)
    assert schedules._record_held(client.r, name, slot, "the-other-starter", "jobs", str(g), "job-of-other")
    assert client.r.hgetall(jobs) == {str(g): "job-of-other"} and client.r.ttl(jobs) > 0


def test_a_claimed_slot_is_recorded_with_its_run_and_lease_at_once(client, vmid):
    """Claiming a slot writes its run record, the starter's lease and the last-slot pointer in
    the same step: a starter dying right after leaves a run to resume, never a lost slot."""
    name = f"claim{vmid()}"
    slot = "2026-11-26T02:00:00+00:00"
    run = {"slot": slot, "line": "0 2 * * *", "jobs": {}, "refused": {}, "pruned": False, "starting": True}
    now = datetime.fromisoformat(slot)
    assert schedules._claim(client.r, name, run, "me", now)
    assert schedules._last(client.r, name) == run
    assert client.r.get(f"stork:schedule:{name}:starting:{slot}") == "me"
    assert not schedules._claim(client.r, name, {**run, "line": "other"}, "you", now)  # claimed once
    assert schedules._last(client.r, name) == run
    client.r.delete(f"stork:schedule:{name}:last")


def test_a_slot_claimed_days_ahead_by_a_clock_that_ran_ahead_stops_no_slot_before_it(client, vmid):
    """Claimed (before ticks took Redis's time) by a tick on a node three days ahead: the slot of
    three days on counts for nothing until its time, today's slot runs at its time, the
    last-slot pointer moves back to it, and the slot ahead, its claim dropped, runs in its time."""
    g = vmid()
    name = f"poisoned{g}"
    at_two = datetime.now(UTC).replace(hour=2, minute=0, second=0, microsecond=0)
    ahead = (at_two + timedelta(days=3)).isoformat()
    client.r.set(f"stork:schedule:{name}:last", ahead)
    client.r.set(f"stork:schedule:{name}:slot:{ahead}", "1")
    client.r.set(f"stork:schedule:{name}:run:{ahead}", json.dumps(
        {"slot": ahead, "line": "0 2 * * *", "jobs": {}, "refused": {}, "pruned": True}))
    cfg = replace(client.cfg, schedules={name: {"schedule": "0 2 * * *", "guests": [g], "storage": "backup"}})
    assert schedules.tick(cfg, client.r, client.app, at_two + timedelta(minutes=1)) == [name]
    assert schedules._last(client.r, name)["slot"] == at_two.isoformat()
    assert not client.r.exists(f"stork:schedule:{name}:slot:{ahead}")  # its claim dropped: it runs in its time
    assert schedules.tick(cfg, client.r, client.app, at_two + timedelta(days=3, minutes=1)) == [name]
    assert schedules._last(client.r, name)["slot"] == ahead
    for key in client.r.scan_iter(f"stork:schedule:{name}:*"):
        client.r.delete(key)


@pytest.mark.parametrize(("verified", "days", "due"), [
    pytest.param(None, 30, True, id="never verified"),
    pytest.param(("ok", 10), 30, False, id="sound 10 days ago, re-verify after 30"),
    pytest.param(("ok", 40), 30, True, id="sound 40 days ago"),
    pytest.param(("failed", 1), 30, True, id="failed yesterday: again"),
    pytest.param(("ok", 1), 0, True, id="re-verify after 0 days: every time"),
    pytest.param(("ok", 1), None, True, id="no re-verify window: all"),
])
def test_which_backups_a_verify_with_reverify_after_reads(verified, days, due):
    from drivers.backup.records import BackupId, Manifest, Snapshot, State, VerifyResult, format_time
    from worker.jobs.backups import _due

    now = at("2026-11-26 12:00:00")
    result = VerifyResult(verified[0], format_time(now - timedelta(days=verified[1])), ()) if verified else None
    snap = Snapshot(BackupId(100, now - timedelta(days=50)), Manifest({}, {}, 0, 0, "2026-10-07T12:00:00Z",
                                                                      "2026-10-07T12:00:00Z"), State(verify=result))
    assert _due([snap], days, now) == ([snap] if due else [])


def test_verify_gc_and_sync_schedules_each_run_their_one_job(client, vmid):
    """A verify schedule (re-verifying what was not verified within a day), a gc schedule and a
    [sync.<name>] copying one guest's backups into offsite, all due now: one tick submits the
    three jobs, each recorded as its run's one job, and they do their work."""
    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    backup = client.run("backup", vmid=g, storage="backup").result["backup"]
    (BASE / "offsite").mkdir(exist_ok=True)  # gc of a store that is not there yet fails: it may be a NAS unmounted
    every = "* * * * *"
    names = {"verify": f"verify{g}", "gc": f"gc{g}", "sync": f"sync.off{g}"}
    cfg = replace(client.cfg, schedules={
        names["verify"]: {"schedule": every, "action": "verify", "storage": "offsite", "reverify-after": 1},
        names["gc"]: {"schedule": every, "action": "gc", "storage": "offsite"},
        names["sync"]: {"schedule": every, "action": "sync", "storage": "backup", "target": "offsite",
                        "guests": [g], "keep-last": 1}})
    now = datetime.now(UTC)
    assert sorted(schedules.tick(cfg, client.r, client.app, now)) == sorted(names.values())
    runs = {action: schedules._last(client.r, name) for action, name in names.items()}
    assert {action: list(run["jobs"]) for action, run in runs.items()} == {a: [a] for a in names}
    jobs = {action: client.wait(run["jobs"][action], timeout=120) for action, run in runs.items()}
    assert {action: str(job.state) for action, job in jobs.items()} == dict.fromkeys(names, "succeeded")
    assert jobs["sync"].result["copied"] == [backup]
    assert jobs["verify"].params["reverify_after"] == 1
    from producer.views import schedules as view

    out = view(schedules.status(cfg, client.r, now))
    row = next(line for line in out.splitlines() if line.startswith(names["sync"]))
    assert " sync " in row and "backup->offsite" in row and "1 succeeded" in row


def test_a_broken_guest_config_stops_only_its_own_guests_scheduled_backup(tmp_path):
    """A config that does not read (a hand edit saved halfway) is its own guest's backup,
    refused at submit naming it, and a file that names no guest (`cp 100.toml 100-old.toml`)
    is refused by name: every other guest of an "all" schedule is backed up. (Before, the run
    refused "all" and submitted nothing: one such file left the cluster without backups.)"""
    from drivers.guests import Guest, GuestStore

    cfg = config.parse(SCHEDULE, tmp_path / "stork.toml", {"STORK_NODE": "n"})
    store = GuestStore(cfg.guests_dir)
    for g in (101, 103):
        store.create(Guest(vmid=g, node="n"))
    (cfg.guests_dir / "102.toml").write_text("node = 'n'\n[disk]\n")
    (cfg.guests_dir / "101-old.toml").write_text("node = 'n'\n")
    (cfg.guests_dir / os.fsdecode(b"\xff.toml")).write_text("node = 'n'\n")  # a name that is not UTF-8
    [schedule] = schedules.parse(cfg)
    submissions, refused = schedules._submissions(cfg, schedule)
    assert sorted(submissions) == ["101", "102", "103"]
    assert sorted(refused) == ["101-old.toml", os.fsdecode(b"\xff.toml")] and "101-old.toml" in refused["101-old.toml"]
    assert schedules._printable(os.fsdecode(b"\xff.toml")) == "\\xff.toml"  # as Redis takes it
    excluded = replace(schedule, exclude=frozenset({102}))
    assert sorted(schedules._submissions(cfg, excluded)[0]) == ["101", "103"]


@pytest.mark.parametrize(("storages", "home"), [
    pytest.param({"b": {"shared": True}}, {}, id="a shared store: anywhere"),
    pytest.param({"b": {"nodes": ("node2",)}}, {"node": "node2"}, id="local to one node: there"),
    pytest.param({"b": {"nodes": ("node1", "node2")}}, {}, id="on two nodes: where the tick is"),
    pytest.param({"b": {}}, {}, id="on every node: where the tick is"),
])
def test_where_a_scheduled_verify_gc_or_sync_runs(storages, home):
    from drivers.storage import StorageConfig

    cfg = replace(config.parse("", BASE / "x.toml", {"STORK_NODE": "node1"}),
                  storages={sid: StorageConfig(sid, "chunkstore", **opts) for sid, opts in storages.items()})
    assert schedules._home(cfg, [None, "b"]) == home


def test_a_schedule_whose_job_cannot_be_submitted_stops_no_other(client, vmid, tmp_path):
    """A sync schedule from a storage whose key file is gone: its run records the refusal,
    and the backup schedule beside it runs."""
    from drivers.storage import StorageConfig

    g = vmid()
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "4M"}}).state == "succeeded"
    gone = StorageConfig("gone", "chunkstore", content=("backup",), shared=True,
                         options={"path": tmp_path / "gone", "keyfile": tmp_path / "no.key"})
    broken, good = f"sync.broken{g}", f"fine{g}"
    cfg = replace(client.cfg, storages={**client.cfg.storages, "gone": gone}, schedules={
        broken: {"schedule": "* * * * *", "action": "sync", "storage": "gone", "target": "offsite", "guests": "all"},
        good: {"schedule": "* * * * *", "guests": [g], "storage": "backup"}})
    assert sorted(schedules.tick(cfg, client.r, client.app, datetime.now(UTC))) == sorted([broken, good])
    assert "no.key" in schedules._last(client.r, broken)["refused"]["sync"]
    run = schedules._last(client.r, good)
    wait_for(lambda: ended(client, run["jobs"].values()), 120)


def test_a_run_recorded_inline_keeps_its_jobs_when_pruned(client, vmid):
    """A run recorded before runs kept their jobs in hashes (inline in its record), pruned after
    the upgrade: its jobs move to the hash and `schedule list` still counts them."""
    g = vmid()
    name = f"inline{g}"
    now = datetime.now(UTC)
    slot = schedules.latest_slot(cron("* * * * *"), now).isoformat()
    done = client.run("ping", node="node1")
    client.r.set(f"stork:schedule:{name}:slot:{slot}", "1")
    client.r.set(f"stork:schedule:{name}:last", slot)
    client.r.set(f"stork:schedule:{name}:run:{slot}", json.dumps(
        {"slot": slot, "line": "* * * * *", "jobs": {str(g): done.id}, "refused": {}, "pruned": False}))
    cfg = replace(client.cfg, schedules={name: {"schedule": "* * * * *", "guests": [g], "storage": "backup",
                                                "keep-last": 1}})
    assert schedules.tick(cfg, client.r, client.app, now) == [name]  # it prunes
    run = schedules._last(client.r, name)
    assert run["pruned"] and run["jobs"] == {str(g): done.id}
    assert "jobs" not in json.loads(client.r.get(f"stork:schedule:{name}:run:{slot}"))
    [row] = [r for r in schedules.status(cfg, client.r, now) if r["name"] == name]
    assert row["outcome"].startswith("1 succeeded")
    for key in client.r.scan_iter(f"stork:schedule:{name}:*"):
        client.r.delete(key)
