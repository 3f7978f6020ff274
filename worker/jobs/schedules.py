"""Schedules: `[schedule.<name>]` tables of the config (backups of guests, or a backup storage's
verify or gc, by their `action`) and `[sync.<name>]` ones (offsite copies), run by Celery beat.

Beat sends `stork.schedule.tick` every minute (worker/tasks.py); any worker runs it. A tick
finds, for each enabled schedule, its latest slot (the newest minute at or before now that
the crontab matches, Celery's crontab parsing the line) and runs the schedule once for it if
that slot is newer than the last one run: one backup job per guest, then, once they have all
ended, one prune job with the schedule's retention (or its one verify, gc or sync job). Each
slot is claimed with SET NX on its own key, so two beat processes (two ticks a minute)
enqueue it once; after beat was down for several slots, only the latest one runs (one
catch-up, not one per missed slot). A
schedule never run before runs only a slot of the last `FIRST_RUN_GRACE` seconds, so adding
one at noon does not start a 02:00 backup at once; so does one whose crontab line was
edited. A disabled schedule's slots are recorded as skipped, so enabling it again runs its
next slot, not one that passed while it was off.

Slot arithmetic is pure (`latest_slot`, `due_slot`) and table-tested; times are UTC.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import structlog
from celery import Celery
from celery.schedules import crontab

from drivers import names
from drivers.config import Config
from drivers.errors import ConfigError, InvalidName, StorkError
from drivers.guests import GuestStore
from worker import notify, records
from worker.jobs import stale
from worker.jobs.crontab import line_errors, parse_line
from worker.runner import submit

log = structlog.get_logger("stork.schedules")
FIRST_RUN_GRACE = 300.0
START_LEASE = 60.0
SLOT_KEY_TTL = 90 * 86400  # a claimed slot's key outlives any catch-up
SEARCH_DAYS = 4 * 366  # a crontab matching no minute in this long never runs (e.g. 30 Feb)


@dataclass(frozen=True)
class Schedule:
    name: str  # [schedule.<name>]'s name, or "sync.<name>" for a [sync.<name>]
    line: str
    cron: crontab
    guests: str | tuple[int, ...]  # "all" or guest ids
    exclude: frozenset[int]
    storage: str | None  # the backup storage (a sync's source)
    keep: dict[str, int]  # keep-<period> -> count
    enabled: bool
    action: str = "backup"  # or verify, gc, sync
    target: str | None = None  # a sync's target storage
    reverify_after: int | None = None  # verify: days a sound result stands
    reencrypt: bool = False  # sync: between stores of other keys


def parse(cfg: Config) -> list[Schedule]:
    """The config's schedules; a crontab Celery cannot parse is a ConfigError naming the key."""
    found, errors = parse_each(cfg)
    if errors:
        raise next(iter(errors.values()))
    return found


def parse_each(cfg: Config) -> tuple[list[Schedule], dict[str, ConfigError]]:
    """The schedules that parse, and for each that does not, its error: one mistyped crontab
    must not stop the others."""
    found, errors = [], line_errors(cfg)
    for name, entry in sorted(cfg.schedules.items()):
        if name in errors:
            continue
        line, guests = entry["schedule"], entry.get("guests", "all")
        found.append(Schedule(name, line, parse_line(line), guests if guests == "all" else tuple(guests),
                              frozenset(entry.get("exclude", ())), entry.get("storage"),
                              {k: v for k, v in entry.items() if k.startswith("keep-")}, entry.get("enabled", True),
                              entry.get("action", "backup"), entry.get("target"), entry.get("reverify-after"),
                              entry.get("reencrypt", False)))
    return found, errors


# ---- slots: pure -----------------------------------------------------------------------------


def _matches_day(cron: crontab, day: datetime) -> bool:
    # Celery's crontab counts weekdays from Sunday = 0; Python's isoweekday() has Sunday = 7
    return day.month in cron.month_of_year and day.day in cron.day_of_month and \
        day.isoweekday() % 7 in cron.day_of_week


def latest_slot(cron: crontab, now: datetime) -> datetime | None:
    """The newest minute at or before `now` (UTC) that the crontab matches; None if none in
    the last four years (a crontab that can never match)."""
    now = now.astimezone(UTC).replace(second=0, microsecond=0)
    day = now.replace(hour=0, minute=0)
    for back in range(SEARCH_DAYS):
        if _matches_day(cron, day):
            last_hour = now.hour if back == 0 else 23
            for hour in sorted((h for h in cron.hour if h <= last_hour), reverse=True):
                last_minute = now.minute if back == 0 and hour == now.hour else 59
                minutes = [m for m in cron.minute if m <= last_minute]
                if minutes:
                    return day.replace(hour=hour, minute=max(minutes))
        day -= timedelta(days=1)
    return None


def due_slot(cron: crontab, last_run: datetime | None, now: datetime,
             grace: float = FIRST_RUN_GRACE) -> datetime | None:
    """The slot to run now: the latest one, if it is newer than the last slot run (however
    many were missed: one catch-up), or, for a schedule never run, if it is recent."""
    slot = latest_slot(cron, now)
    if slot is None:
        return None
    if last_run is None:
        return slot if (now - slot).total_seconds() <= grace else None
    return slot if slot > last_run else None


def next_slot(cron: crontab, now: datetime) -> datetime | None:
    """The first minute after `now` that the crontab matches (for `stork schedule list`)."""
    start = now.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    for ahead in range(SEARCH_DAYS):
        if _matches_day(cron, day):
            first_hour = start.hour if ahead == 0 else 0
            for hour in sorted(h for h in cron.hour if h >= first_hour):
                first_minute = start.minute if ahead == 0 and hour == start.hour else 0
                minutes = [m for m in cron.minute if m >= first_minute]
                if minutes:
                    return day.replace(hour=hour, minute=min(minutes))
        day += timedelta(days=1)
    return None


# ---- running: a tick -------------------------------------------------------------------------


def _key(name: str, what: str) -> str:
    return f"stork:schedule:{name}:{what}"


# Move the schedule's "last slot" pointer forward only (two ticks at a minute's turn may claim
# two slots; the older must not overwrite the newer). Slots are UTC ISO strings: they sort.
_ADVANCE = """
local current = redis.call('GET', KEYS[1])
if (not current) or current < ARGV[1] or current > ARGV[2] then redis.call('SET', KEYS[1], ARGV[1]) end
"""


# Claim a slot and record its run in one step: the slot key (SET NX), the run's record, its
# starter's lease and the "last slot" pointer. A tick that dies right after leaves a run that a
# later tick resumes once the lease lapses, never a claimed slot without a record (lost).
# The pointer moves forward only, but from a slot past the latest sane one (claimed by a clock
# that ran ahead, before ticks took Redis's time) it moves back.
# KEYS: slot, run, lease, last; ARGV: run JSON, slot, key TTL, lease seconds, holder, latest sane slot.
_CLAIM = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[4])
local current = redis.call('GET', KEYS[4])
if (not current) or current < ARGV[2] or current > ARGV[6] then redis.call('SET', KEYS[4], ARGV[2]) end
return 1
"""
AHEAD = timedelta(minutes=1)  # a slot run or skipped this far past now was claimed by a clock that ran ahead

# Save a run's record only while its starter's lease is `holder`'s: a starter that stalled past its
# lease never overwrites the record of the tick that took the run over.
# KEYS: lease, run; ARGV: holder, run JSON, key TTL.
_SAVE_HELD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# Record one guest's job (or refusal) in its run, on the same terms. One field per guest: a run
# of 10,000 guests writes 10,000 small fields, not its whole record once per guest (quadratic).
# KEYS: lease, the run's jobs or refused hash; ARGV: holder, guest key, job id or reason, key TTL.
_RECORD_HELD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""
LISTED = ("jobs", "refused")  # the parts of a run kept as hashes beside its record

# Renew a starter's lease only while it is still that starter's (KEYS: lease; ARGV: holder, seconds).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def _last(r: redis.Redis, name: str) -> dict[str, Any] | None:
    """The record of the schedule's newest run: its slot, jobs, refusals, prune."""
    slot = r.get(_key(name, "last"))
    raw = r.get(_key(name, f"run:{slot}")) if slot else None
    if not raw:
        return None
    run = json.loads(raw)
    with r.pipeline(transaction=False) as p:
        for part in LISTED:
            p.hgetall(_key(name, f"run:{slot}:{part}"))
        listed = p.execute()
    for part, entries in zip(LISTED, listed, strict=True):  # (a record saved before the hashes holds them inline)
        run[part] = {**run.get(part, {}), **entries}
    return run


def _record_only(run: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in run.items() if k not in LISTED})


def _save_held(r: redis.Redis, name: str, run: dict[str, Any], holder: str) -> bool:
    """Save the run's record (not its jobs: `_record_held`) if `holder` still holds its lease."""
    keys = [_key(name, f"starting:{run['slot']}"), _key(name, f"run:{run['slot']}")]
    return bool(r.eval(_SAVE_HELD, 2, *keys, holder, _record_only(run), SLOT_KEY_TTL))


def _record_held(r: redis.Redis, name: str, slot: str, holder: str, part: str, key: str, value: str) -> bool:
    """Record a guest's job or refusal in the run if `holder` still holds its lease."""
    keys = [_key(name, f"starting:{slot}"), _key(name, f"run:{slot}:{part}")]
    return bool(r.eval(_RECORD_HELD, 2, *keys, holder, key, value, SLOT_KEY_TTL))


def _save(r: redis.Redis, name: str, run: dict[str, Any]) -> None:
    """Save the run's record, and its jobs and refusals with it (a run recorded before they had
    hashes of their own holds them inline: they move there)."""
    with r.pipeline(transaction=False) as p:
        for part in LISTED:
            if run.get(part):
                p.hset(_key(name, f"run:{run['slot']}:{part}"), mapping=run[part])
                p.expire(_key(name, f"run:{run['slot']}:{part}"), SLOT_KEY_TTL)
        p.set(_key(name, f"run:{run['slot']}"), _record_only(run), ex=SLOT_KEY_TTL)
        p.execute()


def _submitted_order(key: str) -> tuple[int, str]:
    """A run's guest key in the order its jobs were submitted (guest ids ascending)."""
    return (int(key), "") if key.isdigit() else (-1, key)


def _jobs_of(r: redis.Redis, job_ids: list[str], page: int = 500) -> Iterator[dict[str, tuple[records.JobState, str]]]:
    """The state and node of a run's jobs by id, a page per round trip; an expired one is left out."""
    for start in range(0, len(job_ids), page):
        yield records.states_and_nodes(r, job_ids[start:start + page])


def tick(cfg: Config, r: redis.Redis, sender: Celery, now: datetime | None = None) -> list[str]:
    """Run what is due; the names of the schedules this tick started or pruned. The time is
    Redis's, one clock for every node: a tick goes to whichever worker takes it, and one whose
    clock ran ahead (a node booted before NTP set it) claimed a slot days ahead, which no tick
    of the others could then run, nor any slot before it."""
    now = now or cluster_now(r)
    acted = []
    schedules, errors = parse_each(cfg)
    for name, error in errors.items():
        log.error("schedule not run", error=str(error))
        if notify.once(r, f"schedule-invalid:{name}:{cfg.schedules[name]['schedule']}", 86400):  # daily, not each tick
            notify.announce(cfg, sender, notify.event("schedule-failed", f"schedule {name} does not run: {error}",
                                                      schedule=name, error=str(error)))
    stale.check(cfg, r, sender, now)
    for schedule in schedules:
        try:
            if _tick_one(cfg, r, sender, schedule, now):
                acted.append(schedule.name)
        except redis.RedisError:
            raise  # Redis away: no schedule can run; beat's next tick tries again
        except Exception as e:  # one schedule's trouble (an unreadable store, say) stops no other
            log.exception("schedule_failed", schedule=schedule.name)
            if notify.once(r, f"schedule-error:{schedule.name}:{type(e).__name__}", 3600):
                notify.announce(cfg, sender, notify.event(
                    "schedule-failed", f"schedule {schedule.name} failed: {e}"[:300], schedule=schedule.name,
                    error=str(e)))
    return acted


def cluster_now(r: redis.Redis) -> datetime:
    """The time by Redis's clock (TIME)."""
    seconds, micros = r.time()
    return datetime.fromtimestamp(seconds + micros / 1e6, UTC)


def _tick_one(cfg: Config, r: redis.Redis, sender: Celery, schedule: Schedule, now: datetime) -> bool:
    """Run what is due of one schedule; whether this tick started or pruned something of it."""
    if not schedule.enabled:
        _skip_passed_slots(r, schedule, now)
        return False
    last = _last(r, schedule.name)
    holder = secrets.token_hex(8)  # this tick, as the starter of a run
    if last and last.get("starting"):
        if _lease(r, schedule.name, last["slot"], holder):  # its starter died: submit the rest
            _start(cfg, r, sender, schedule, last, holder)
            return True
        return False
    pruned = bool(last and not last.get("pruned") and _prune_when_done(cfg, r, sender, schedule, last))
    slot = due_slot(schedule.cron, _since(r, schedule, last, now), now)
    if slot is None:
        return pruned
    run = {"slot": slot.isoformat(), "line": schedule.line, "jobs": {}, "refused": {}, "pruned": False,
           "starting": True}
    if not _claim(r, schedule.name, run, holder, now):
        return pruned  # another tick claimed this slot
    _start(cfg, r, sender, schedule, run, holder)
    return True


def _claim(r: redis.Redis, name: str, run: dict[str, Any], holder: str, now: datetime) -> bool:
    """Claim the run's slot for `holder`, with the run's record and the starter's lease (_CLAIM)."""
    slot = run["slot"]
    keys = [_key(name, f"slot:{slot}"), _key(name, f"run:{slot}"), _key(name, f"starting:{slot}"), _key(name, "last")]
    return bool(r.eval(_CLAIM, 4, *keys, _record_only(run), slot, SLOT_KEY_TTL, int(START_LEASE), holder,
                       (now + AHEAD).isoformat()))


def _skip_passed_slots(r: redis.Redis, schedule: Schedule, now: datetime) -> None:
    """A disabled schedule's slots pass without a run: once enabled again, it runs the next
    slot, not one that came while it was off."""
    if (slot := latest_slot(schedule.cron, now)) is not None:
        key = _key(schedule.name, f"skipped:{schedule.line}")
        r.eval(_ADVANCE, 1, key, slot.isoformat(), (now + AHEAD).isoformat())  # (back from one marked ahead)
        r.expire(key, SLOT_KEY_TTL)  # gone some time after the schedule or its line is


def _since(r: redis.Redis, schedule: Schedule, last: dict[str, Any] | None, now: datetime) -> datetime | None:
    """The slot a run must be newer than: the last run's or the newest one skipped while the
    schedule was disabled, of its current crontab line only (an edited line is a new schedule:
    with neither, only a recent slot runs). One past now (a clock that ran ahead claimed it)
    does not count: else no slot before it would run."""
    marks = [last["slot"]] if last and last.get("line", schedule.line) == schedule.line else []
    if skipped := r.get(_key(schedule.name, f"skipped:{schedule.line}")):
        marks.append(skipped)
    times = [when for when in map(datetime.fromisoformat, marks) if when <= now + AHEAD]
    if len(times) < len(marks):
        log.warning("schedule_slot_ahead", schedule=schedule.name, marks=marks)
        _forget_ahead(r, schedule.name, now)
    return max(times, default=None)


def _forget_ahead(r: redis.Redis, name: str, now: datetime) -> None:
    """Drop the claims and runs of slots past now (a clock that ran ahead made them): else each
    such slot, claimed already, would not run when its time comes."""
    for key in r.scan_iter(match=_key(name, "slot:*")):
        slot = key.rsplit(":slot:", 1)[1]
        with contextlib.suppress(ValueError):
            if datetime.fromisoformat(slot) > now + AHEAD:
                r.delete(key, _key(name, f"run:{slot}"), _key(name, f"starting:{slot}"),
                         *(_key(name, f"run:{slot}:{part}") for part in LISTED))


def _lease(r: redis.Redis, name: str, slot: str, holder: str) -> bool:
    """The right to submit a run's jobs, for START_LEASE seconds (renewed per guest): a run
    whose starter died is resumed by a later tick once the lease has lapsed, never beside it."""
    return bool(r.set(_key(name, f"starting:{slot}"), holder, ex=int(START_LEASE), nx=True))


def _renew(r: redis.Redis, name: str, slot: str, holder: str) -> bool:
    """Renew `holder`'s lease; False if it lapsed and is another starter's now (or no one's)."""
    return bool(r.eval(_RENEW, 1, _key(name, f"starting:{slot}"), holder, int(START_LEASE)))


def _guests(cfg: Config, schedule: Schedule) -> tuple[list[int], dict[str, str]]:
    """The guests a run backs up, in id order (the prune check reads the last first); and, for
    "all", the files in the guests folder that spell no guest id, each by name with its error.
    A config that cannot be read stops only its own guest's backup (refused at submit, naming
    it), not every guest's: a copy left as `100-old.toml`, a hand edit saved halfway, would
    otherwise leave the whole cluster without backups."""
    if schedule.guests != "all":
        return sorted(schedule.guests), {}
    guests, broken = GuestStore(cfg.guests_dir, cfg.lock_timeout).scan()
    vmids, misnamed = {g.vmid for g in guests}, {}
    for path, error in broken:
        stem = path.name.removesuffix(".toml")
        try:
            vmid = names.vmid(stem)
        except InvalidName:
            vmid = None
        if vmid is not None and str(vmid) == stem:
            vmids.add(vmid)  # its submit is refused, naming its error
        else:
            misnamed[path.name] = error
    return sorted(vmids - set(schedule.exclude)), misnamed


def _start(cfg: Config, r: redis.Redis, sender: Celery, schedule: Schedule, run: dict[str, Any],
           holder: str) -> None:
    """The run's jobs (one backup per guest, or one verify, gc or sync) not yet in the run, each
    recorded as it is submitted (one refused at submit with the reason), so a starter that dies
    leaves a run to resume. A starter whose lease another took over (it stalled past it) stops:
    that one goes on."""
    for part in LISTED:  # resumed: what it holds goes on (a record saved before the hashes held it inline)
        for key, value in run[part].items():
            if not _record_held(r, schedule.name, run["slot"], holder, part, key, value):
                return
    try:
        submissions, misnamed = _submissions(cfg, schedule)
    except StorkError as e:  # the guests folder cannot be listed: nothing to back up this time
        submissions, misnamed = {}, {"all": str(e)}
    for key, (kind, options) in submissions.items():
        if key in run["jobs"] or key in run["refused"]:
            continue
        if not _renew(r, schedule.name, run["slot"], holder):
            log.warning("schedule_lease_lost", schedule=schedule.name, slot=run["slot"])
            return
        try:
            part, run["jobs"][key] = "jobs", submit(kind, options, cfg, r, sender).id
        except redis.RedisError:
            raise
        except Exception as e:  # refused, or its storage unreadable (an OSError of an NFS mount, say)
            part, run["refused"][key] = "refused", str(e) or type(e).__name__
        if not _record_held(r, schedule.name, run["slot"], holder, part, key, run[part][key]):
            log.warning("schedule_lease_lost", schedule=schedule.name, slot=run["slot"])
            return
    for key, error in misnamed.items():  # after the guests' backups: nothing of a stray file stops one
        key, error = _printable(key), _printable(error)  # a file name need not be UTF-8
        if key not in run["refused"]:
            run["refused"][key] = error
            if not _record_held(r, schedule.name, run["slot"], holder, "refused", key, error):
                return
    # a backup run's prune follows its backups; a sync prunes its target itself
    run.update(starting=False, pruned=schedule.action != "backup" or not any(schedule.keep.values()))
    if not _save_held(r, schedule.name, run, holder):
        return
    if run["refused"] and notify.once(r, f"schedule-refused:{schedule.name}:{run['slot']}", SLOT_KEY_TTL):
        first = next(iter(run["refused"].items()))
        notify.announce(cfg, sender, notify.event(
            "schedule-failed", f"schedule {schedule.name}: {len(run['refused'])} refused at {run['slot']}: "
            f"{first[0]}: {first[1]}"[:300], schedule=schedule.name, slot=run["slot"], refused=run["refused"]))


def _printable(text: str) -> str:
    """`text` as UTF-8 can carry it: the bytes of a file name that is not UTF-8 as escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _submissions(cfg: Config, schedule: Schedule) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, str]]:
    """The jobs a run of the schedule submits, by the key its run records each under: a guest
    id per backup, else the action's name; and what it refuses before any submit (a file in the
    guests folder that names no guest), by name."""
    storage = {"storage": schedule.storage} if schedule.storage else {}
    if schedule.action == "backup":
        vmids, misnamed = _guests(cfg, schedule)
        return {str(vmid): ("backup", {"vmid": vmid, "notes": f"schedule {schedule.name}", **storage})
                for vmid in vmids}, misnamed
    node = _home(cfg, [schedule.storage, schedule.target])
    if schedule.action == "verify":
        days = {"reverify_after": schedule.reverify_after} if schedule.reverify_after is not None else {}
        return {"verify": ("verify", {**storage, **days, **node})}, {}
    if schedule.action == "gc":
        return {"gc": ("gc", {**storage, **node})}, {}
    keep = {k: v for k, v in schedule.keep.items() if v}
    vmids = [] if schedule.guests == "all" else list(schedule.guests)
    reencrypt = {"reencrypt": True} if schedule.reencrypt else {}
    return {"sync": ("sync", {"source": schedule.storage, "target": schedule.target, "vmids": vmids, "keep": keep,
                              **reencrypt, **node})}, {}


def _home(cfg: Config, storage_ids: list[str | None]) -> dict[str, str]:
    """{"node": N} where a storage named is local to the one node N (its job must run there,
    whichever node's tick submits it); else nothing: the job runs where the tick is."""
    for sid in storage_ids:
        if sid and sid in cfg.storages and len(cfg.storages[sid].nodes) == 1 and not cfg.storages[sid].shared:
            return {"node": cfg.storages[sid].nodes[0]}
    return {}


def _prune_when_done(cfg: Config, r: redis.Redis, sender: Celery, schedule: Schedule,
                     last: dict[str, Any]) -> bool:
    """Once every backup job of the last run has ended, prune each guest it backed up (one job,
    claimed with SET NX so two ticks do not both submit it)."""
    guest_of = {job_id: vmid for vmid, job_id in last["jobs"].items()}
    nodes = {}
    # the last submitted first (guests go in id order): while the run goes on, they are the ones
    # not ended, found in the first page read
    for found in _jobs_of(r, sorted(guest_of, key=lambda job_id: _submitted_order(guest_of[job_id]), reverse=True)):
        if any(not state.terminal for state, _ in found.values()):
            return False
        nodes.update((guest_of[job_id], node) for job_id, (_, node) in found.items())  # an expired one: long over
    if not r.set(_key(schedule.name, f"prune:{last['slot']}"), "1", nx=True, ex=SLOT_KEY_TTL):
        return False
    keep = {k: v for k, v in schedule.keep.items() if v}
    prune_jobs, refused = [], {}
    for vmid in last["jobs"]:
        # on the node its backup ran on: a node-local backup storage is there
        options = {"vmid": int(vmid), "keep": keep, **({"node": nodes[vmid]} if vmid in nodes else {}),
                   **({"storage": schedule.storage} if schedule.storage else {})}
        try:
            prune_jobs.append(submit("prune", options, cfg, r, sender).id)
        except StorkError as e:  # e.g. the storage is gone from the config: said, and the next run prunes again
            refused[vmid] = str(e)
    _save(r, schedule.name, {**last, "pruned": True, "prune_jobs": prune_jobs, "prune_refused": refused})
    return True


# ---- reading: stork schedule list ------------------------------------------------------------


def status(cfg: Config, r: redis.Redis, now: datetime | None = None) -> list[dict[str, Any]]:
    """Per schedule: its line, guests, storage, retention, whether enabled, the last slot run
    and its outcome (each job's state, refusals), and the next slot."""
    now = now or cluster_now(r)
    schedules, errors = parse_each(cfg)
    rows = []
    for name, error in errors.items():  # not run now, but its history stands
        entry, last = cfg.schedules[name], _last(r, name)
        rows.append({"name": name, "schedule": entry.get("schedule"), "action": entry.get("action", "backup"),
                     "guests": entry.get("guests", "all"), "exclude": entry.get("exclude", []),
                     "storage": entry.get("storage"), "target": entry.get("target"), "keep": {},
                     "enabled": entry.get("enabled", True), "last": last["slot"] if last else None,
                     "outcome": f"not run: {error}" + (f" (last run: {_outcome(r, last)})" if last else ""),
                     "next": None})
    for s in schedules:
        last = _last(r, s.name)
        nxt = next_slot(s.cron, now)
        rows.append({"name": s.name, "schedule": s.line, "action": s.action,
                     "guests": s.guests if s.guests == "all" else list(s.guests), "exclude": sorted(s.exclude),
                     "storage": s.storage, "target": s.target, "keep": s.keep, "enabled": s.enabled,
                     "last": last["slot"] if last else None, "outcome": _outcome(r, last),
                     "next": nxt.isoformat() if nxt and s.enabled else None})
    return rows


def _outcome(r: redis.Redis, last: dict[str, Any] | None) -> str:
    if not last:
        return ""
    states: dict[str, int] = {}
    found = {job_id: known for page in _jobs_of(r, list(last["jobs"].values())) for job_id, known in page.items()}
    for job_id in last["jobs"].values():
        state = str(found[job_id][0]) if job_id in found else "expired"
        states[state] = states.get(state, 0) + 1
    if last["refused"]:
        states["refused"] = len(last["refused"])
    if last.get("prune_refused"):
        states["prune refused"] = len(last["prune_refused"])
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no guest"

