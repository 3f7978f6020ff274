"""Job records in Redis: the truth about a job (the Celery chain is only the transport).

Redis keys used by stork (all of them; keep this list true):
    stork:job:<id>            hash, one field per JobRecord attribute (JSON values; `state`
                              raw so a Lua compare-and-set can read it); `cancel` is
                              set to true by the producer when a user asks to cancel
    stork:job:<id>:events     stream of JSON events (capped), replayed by late watchers
                              (both expire after the job ends: the seconds in KEEP,
                              else RETENTION)
    stork:settings:keep       seconds a finished job is kept: jobs.keep_days of the config of the
                              worker that started last (each sets it at its start)
    stork:events              pub/sub channel announcing every event, for live listeners
    stork:jobs                sorted set of all job ids, scored by creation time
    stork:jobs:active         set of job ids not yet succeeded, failed or cancelled
    stork:jobs:ids            the same ids, all scored 0: ZRANGEBYLEX finds an id by its prefix
    stork:jobs:state:<state>  job ids by state, scored by creation time (moved by each transition)
    stork:jobs:kind:<kind>    job ids by kind, scored by creation time
    stork:jobs:guest:<vmid>   job ids by a guest they act on, scored by creation time
                              (the indexes lose ids with JOBS: trimmed at each create, RETENTION
                              after creation, and an id whose record expired is dropped when met)
    stork:jobs:indexed        set once every job on record is in the indexes above
    stork:jobs:volume:<volid> set of ids of jobs that name the volume (read, make or rename it):
                              every job that has not ended is in the set of each volume its
                              params and ctx name, added by the same Lua script that writes them
                              and taken out when it ends; an id found there of a job that ended
                              is dropped when met (worker/jobs/usage.py asks it "who uses X?");
                              a backup a job reads is named so too, as backup@<store>:<id>
                              (a forget or prune asks "who reads it?")
    stork:job:<id>:volumes    set of the volume ids the job was added under (so its end takes it out)
    stork:jobs:volumes-indexed set once every job that has not ended is in the volume sets
    stork:claims:<storage>    hash volname -> job id: names a job is making, claimed before they
                              are created and until the job ends (worker/jobs/usage.py)
    stork:lock:<name>         lease of a shared-storage lock (redis-py Lock; value: its holder's token)
    stork:lock:<name>:fence   counter handing out fencing tokens: the latest one granted (worker/locks.py)
    stork:alive:<holder>      a worker process's heartbeat (worker/liveness.py), expiring; value: the
                              job it works on, "" when idle
    stork:noop:<token>        list a `stork.noop` task pushes to (benchmark reference chains)
    stork:dead                list of JSON dead letters, newest first, capped: queue messages no
                              worker could turn into a task, kept for an operator (worker/deadletter.py)
    stork:sweep               set for a minute by whoever swept last (worker/recovery.py)
    stork:metrics:jobs        hash "<kind>|<state>" -> jobs that ended so, counted by the transition that
                              ended them (worker/metrics.py)
    stork:metrics:backups     hash vmid -> JSON of the guest's last backup that succeeded: time, storage,
                              duration, size, bytes written
    stork:notify:<what>       set once, expiring: an alert already said (worker/notify.py)
    stork:schedule:<name>:... a backup schedule's runs (worker/jobs/schedules.py), each expiring:
        :last                 the newest slot run (an ISO time)
        :slot:<slot>          the slot claimed (SET NX: run once)
        :run:<slot>           JSON record of that slot's run: its line, prune, whether it is starting
        :run:<slot>:jobs      hash guest (or action) -> the job the run submitted for it
        :run:<slot>:refused   hash guest -> why its job was refused at submit
        :starting:<slot>      the lease of the tick submitting its jobs (value: that tick's token)
        :prune:<slot>         the run's prune claimed
        :skipped:<line>       the newest slot passed while the schedule was disabled
Celery's own keys (queues `node.<name>` and `shared`, unacked, results) live in the same DB.
State machine: queued -> running -> succeeded, or running -> undoing -> failed | cancelled
(queued -> undoing when a job is cancelled before its first step).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

import redis

from drivers.errors import NotFound, StorkError

JOBS = "stork:jobs"
ACTIVE = "stork:jobs:active"
IDS = "stork:jobs:ids"
INDEXED = "stork:jobs:indexed"
VOLUMES_INDEXED = "stork:jobs:volumes-indexed"
_VOLUME_PREFIX = "stork:jobs:volume:"
ENDED = "stork:metrics:jobs"  # jobs that ended, counted by kind and state (worker/metrics.py)
BACKUPS = "stork:metrics:backups"  # each guest's last backup that succeeded (worker/metrics.py)
CHANNEL = "stork:events"
STREAM_MAXLEN = 20000  # events kept per job (approximately): some 2.7 hours of copy progress
RETENTION = 30 * 86400  # seconds a finished job's record and events are kept, where KEEP is not set
KEEP = "stork:settings:keep"
# Lua: the seconds a finished job is kept (KEEP, read where it is used, so a change reaches every
# producer and worker at once); RETENTION where it is not set, or not a whole day or more (a value
# written by hand: an expiry of 0 would drop a record the moment its job ends)
_KEPT = f"""
local function kept()
  local keep = tonumber(redis.call('GET', '{KEEP}'))
  if keep and keep >= 86400 then return keep end
  return {RETENTION}
end
"""


def state_index(state: str) -> str:
    return f"stork:jobs:state:{state}"


def kind_index(kind: str) -> str:
    return f"stork:jobs:kind:{kind}"


def guest_index(vmid: int) -> str:
    return f"stork:jobs:guest:{vmid}"


def guests_of(params: dict[str, Any]) -> list[int]:
    """The guests a job acts on, from its params (source first)."""
    found = [v for v in (params.get("vmid"), params.get("lock_vmid"), params.get("new_vmid")) if isinstance(v, int)]
    owners = {plan.get("owner") for plan in (params.get("disks") or {}).values() if isinstance(plan, dict)}
    return list(dict.fromkeys(found)) or sorted(v for v in owners if isinstance(v, int))


def indexes_of(record: JobRecord) -> list[str]:
    """The index sets a job is in besides its state's: its kind's and its guests'."""
    params = record.params if isinstance(record.params, dict) else {}
    return [kind_index(record.kind), *(guest_index(v) for v in guests_of(params))]


def job_key(job_id: str) -> str:
    return f"stork:job:{job_id}"


def volume_index(volid: str) -> str:
    return f"{_VOLUME_PREFIX}{volid}"


def volumes_key(job_id: str) -> str:
    return f"{job_key(job_id)}:volumes"


def backup_ref(store: str, backup: str) -> str:
    """A backup a job reads, as its volume index names it (`@` is in no volume id): a forget
    finds the live jobs reading it as a free finds a volume's."""
    return f"backup@{store}:{backup}"


def params_volumes(params: dict[str, Any]) -> set[str]:
    """Every volume id a job's params name: the volume it acts on, the sources and bases of its
    disk plans, what it attaches, its replicas; and the backup it reads (backup_ref)."""
    found = {params["volid"]} if params.get("volid") else set()
    if params.get("store") and params.get("backup"):
        found.add(backup_ref(params["store"], params["backup"]))
    for plans in (params.get("disks"), params.get("bases")):
        found |= {plan[k] for plan in (plans or {}).values() for k in ("source", "base") if k in plan}
    found |= set((params.get("attach") or {}).values()) | set(params.get("attach_unused") or ())
    found |= {plan["replica"] for plan in (params.get("links") or {}).values() if "replica" in plan}
    return found


def ctx_volumes(ctx: dict[str, Any]) -> set[str]:
    """Every volume id a job's steps recorded: made, pending, replaced, linked, renamed into base/."""
    found: set[str] = set()
    for table in ("made", "pending", "replaced", "linked"):
        found |= set((ctx.get(table) or {}).values())
    for pair in (ctx.get("based") or {}).values():
        found |= set(pair)
    return found


def events_key(job_id: str) -> str:
    return f"stork:job:{job_id}:events"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    UNDOING = "undoing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class StateConflict(StorkError):
    """The job is not in a state that allows this transition (someone else moved it)."""


@dataclass
class JobRecord:
    id: str
    kind: str
    params: dict[str, Any]
    node: str  # the node whose node-local storages the job uses
    steps: list[str]
    queues: list[str]  # the queue of each step
    state: JobState = JobState.QUEUED
    done: int = 0  # steps completed
    current: dict[str, Any] | None = None  # the step in progress: index, node, worker, attempt
    attempts: dict[str, int] = field(default_factory=dict)  # step index -> times started
    ran_on: dict[str, str] = field(default_factory=dict)  # step name -> node that ran it
    ctx: dict[str, Any] = field(default_factory=dict)  # what the steps made, for undo
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    final: str = ""  # the state an undo ends in: failed or cancelled
    undo: list[int] = field(default_factory=list)  # step indexes to undo, in order
    undone: list[int] = field(default_factory=list)
    undo_errors: list[str] = field(default_factory=list)
    created: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    cancel: bool = False  # a user asked to cancel (written by the producer)
    updated: float = 0.0  # time of the last state change
    resends: int = 0  # times the sweep sent the next step again (no worker had taken it)
    undo_retry: dict[str, Any] = field(default_factory=dict)  # a failed undo: index, attempts, at, error

    def as_dict(self) -> dict[str, Any]:
        """The fields by name; their values as they are (shared, not copied: asdict's deep copy
        cost a submit 0.6 ms, and every caller only encodes them)."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}


_FIELD_NAMES = tuple(f.name for f in fields(JobRecord))
_FIELDS = set(_FIELD_NAMES)


def _encode(values: dict[str, Any]) -> dict[str, str]:
    return {k: (str(v) if k == "state" else json.dumps(v)) for k, v in values.items()}


ID_LENGTH = 12


def new_id() -> str:
    return uuid.uuid4().hex[:ID_LENGTH]


# Lua: put job `id` (its hash `record`) into the set of each volume of the JSON list `volumes`,
# and remember them under the job (its end takes it out of those sets again, see _CAS).
_NAME_VOLUMES = """
local function name_volumes(record, id, volumes)
  local found = cjson.decode(volumes)
  for _, volid in ipairs(found) do redis.call('SADD', '""" + _VOLUME_PREFIX + """' .. volid, id) end
  if #found > 0 then redis.call('SADD', record .. ':volumes', unpack(found)) end
end
"""

# KEYS: job hash, event stream, JOBS, IDS, ACTIVE, then the indexes the job is in (its state's
# first), then the other states' (trimmed only). ARGV: job id, created, event, stream cap, the
# volumes it names (JSON), how many indexes the job is in, then the record's fields. Ids older
# than `created` less the seconds jobs are kept leave the lists. Nothing happens where the
# record exists already: writing it again is a no-op.
_CREATE = _NAME_VOLUMES + _KEPT + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local cutoff = tostring(tonumber(ARGV[2]) - kept())
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', cutoff, 'LIMIT', 0, 1000)
if #expired > 0 then redis.call('ZREM', KEYS[4], unpack(expired)) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', cutoff)
for i = 6, #KEYS do redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', cutoff) end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
name_volumes(KEYS[1], ARGV[1], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
for i = 6, 5 + tonumber(ARGV[6]) do redis.call('ZADD', KEYS[i], ARGV[2], ARGV[1]) end
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
redis.call('PUBLISH', '""" + CHANNEL + """', ARGV[3])
return 1
"""


def create(r: redis.Redis, record: JobRecord, event: dict[str, Any]) -> None:
    """Store a new job with its first event and its index entries: one Lua script, so one
    command (what `WAIT` after it covers) and one round trip, and a no-op where the record
    exists already."""
    record.created = record.created or time.time()
    record.updated = record.updated or record.created  # a new job is not stale at birth
    # the job's state index first, then its kind's and guests', then the other states' (trimmed only)
    own = [state_index(record.state), *indexes_of(record)]
    others = [state_index(s) for s in JobState if s != record.state]
    keys = [job_key(record.id), events_key(record.id), JOBS, IDS, ACTIVE, *own, *others]
    pairs = [x for kv in _encode(record.as_dict()).items() for x in kv]
    volumes = json.dumps(sorted(params_volumes(record.params) | ctx_volumes(record.ctx)))
    args = [record.id, record.created, json.dumps(event), STREAM_MAXLEN, volumes, len(own), *pairs]
    script(r, "_stork_create", _CREATE)(keys=keys, args=args)


def load(r: redis.Redis, job_id: str) -> JobRecord:
    raw = r.hgetall(job_key(job_id))
    if not raw:
        raise NotFound(f"unknown job {job_id!r}")
    return _decode(raw)


def load_many(r: redis.Redis, job_ids: list[str]) -> list[JobRecord]:
    """The records of these jobs in one round trip; ones that expired meanwhile are skipped,
    one that cannot be decoded raises StorkError (callers deciding what is safe fail closed)."""
    with r.pipeline(transaction=False) as p:
        for job_id in job_ids:
            p.hgetall(job_key(job_id))
        raws = p.execute()
    found = []
    for job_id, raw in zip(job_ids, raws, strict=True):
        if raw:
            try:
                found.append(_decode(raw))
            except (ValueError, TypeError, KeyError) as e:
                raise StorkError(f"job record {job_id} cannot be read: {e}") from None
    return found


def states_and_nodes(r: redis.Redis, job_ids: list[str]) -> dict[str, tuple[JobState, str]]:
    """Each job's state and node, two fields per job in one round trip (a schedule's run of
    10,000 backups is counted without loading 10,000 records); an expired or unreadable one is
    left out."""
    with r.pipeline(transaction=False) as p:
        for job_id in job_ids:
            p.hmget(job_key(job_id), "state", "node")
        found = p.execute()
    out = {}
    for job_id, (state, node) in zip(job_ids, found, strict=True):
        try:
            out[job_id] = (JobState(state), json.loads(node))
        except (ValueError, TypeError):  # expired (None), or not a record stork wrote
            continue
    return out


def _decode(raw: dict[str, str]) -> JobRecord:
    values = {k: (v if k == "state" else json.loads(v)) for k, v in raw.items() if k in _FIELDS}
    values["state"] = JobState(values["state"])
    return JobRecord(**values)


def resolve(r: redis.Redis, prefix: str) -> str:
    """A full job id from a unique prefix, as users type ids by hand."""
    if not prefix.isascii() or not prefix.isalnum():
        raise NotFound(f"unknown job {prefix!r}")  # e.g. '<id>:events' would name another key
    if len(prefix) == ID_LENGTH or r.exists(job_key(prefix)):
        return prefix  # a whole id: load() says if it is unknown
    matches = r.zrangebylex(IDS, f"[{prefix}", f"[{prefix}\xff", start=0, num=2)
    if len(matches) != 1:
        raise NotFound(f"unknown job {prefix!r}" if not matches else f"job id {prefix!r} is ambiguous")
    return matches[0]


# KEYS: job hash, ACTIVE. ARGV: the volumes (JSON). The job is put into those volumes' sets
# only while it has not ended (its end took it out of them).
_NAME_IF_ACTIVE = _NAME_VOLUMES + """
local id = string.sub(KEYS[1], """ + str(len(job_key("")) + 1) + """)
if redis.call('SISMEMBER', KEYS[2], id) == 1 then name_volumes(KEYS[1], id, ARGV[1]) end
"""
# as _NAME_IF_ACTIVE, ARGV then the fields to set first
_UPDATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
""" + _NAME_IF_ACTIVE

# KEYS: a volume's set, ACTIVE, VOLUMES_INDEXED. The ids in the set of jobs that have not ended
# (those that ended leave it), or nil where the sets are not built yet.
_NAMING = """
if redis.call('EXISTS', KEYS[3]) == 0 then return false end
local found = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('SISMEMBER', KEYS[2], id) == 1 then table.insert(found, id) else redis.call('SREM', KEYS[1], id) end
end
return found
"""


def candidates(r: redis.Redis, volid: str) -> list[str]:
    """Ids of the jobs that have not ended and may name `volid` (their records say for sure),
    read from the volume's set: O(its users), not O(jobs). Every job that has not ended where
    the sets are not built yet (a cluster before `index_volumes` ran)."""
    found = script(r, "_stork_naming", _NAMING)(keys=[volume_index(volid), ACTIVE, VOLUMES_INDEXED])
    return active_ids(r) if found is None else sorted(found)


def index_volumes(r: redis.Redis, page: int = 500) -> int:
    """Put every job that has not ended into the sets of the volumes it names (jobs recorded
    before the sets existed); once, then VOLUMES_INDEXED says so, and `candidates` reads the sets.
    A record that cannot be read leaves the sets unused: `candidates` then answers every job, and
    the check reading their records refuses, naming it. How many jobs were indexed."""
    if r.exists(VOLUMES_INDEXED):
        return 0
    ids = active_ids(r)
    name = script(r, "_stork_name_if_active", _NAME_IF_ACTIVE)
    for start in range(0, len(ids), page):
        for job in load_many(r, ids[start:start + page]):
            try:
                volumes = sorted(params_volumes(job.params) | ctx_volumes(job.ctx))
            except (AttributeError, TypeError, KeyError) as e:  # not a record stork wrote
                raise StorkError(f"job record {job.id} cannot be read: {e!r}") from None
            name(keys=[job_key(job.id), ACTIVE], args=[json.dumps(volumes)])
    r.set(VOLUMES_INDEXED, "1")
    return len(ids)


def update(r: redis.Redis, job_id: str, **values: Any) -> None:
    """Set fields of a job that only its running step writes (ctx, result, ran_on)."""
    volumes = json.dumps(sorted(ctx_volumes(values["ctx"]))) if "ctx" in values else "[]"
    pairs = [x for kv in _encode(values).items() for x in kv]
    script(r, "_stork_update", _UPDATE)(keys=[job_key(job_id), ACTIVE], args=[volumes, *pairs])


# KEYS: job hash, active set, event stream, ended counts (every KEYS entry a key: ACLs check
# them). The job id is the hash's name after "stork:job:". ARGV: allowed states (JSON), "1" when
# the new state is terminal, events (JSON list of JSON strings), stream cap, guard (JSON,
# see transition), the new state ("" to keep it; its index, stork:jobs:state:<state>, moves
# with it), the volumes the fields name (JSON), then the fields to set.
_CAS = _NAME_VOLUMES + _KEPT + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
local guard = cjson.decode(ARGV[5])
local current = redis.call('HGET', KEYS[1], 'current')
if guard.idle and current ~= 'null' then return 0 end
if guard.done and tonumber(redis.call('HGET', KEYS[1], 'done')) ~= guard.done then return 0 end
if guard.undone and #cjson.decode(redis.call('HGET', KEYS[1], 'undone')) ~= guard.undone then return 0 end
if guard.undos and #cjson.decode(redis.call('HGET', KEYS[1], 'undo')) ~= guard.undos then return 0 end
if guard.owner and (current == 'null' or cjson.decode(current).worker ~= guard.owner) then return 0 end
if guard.since and (current == 'null' or cjson.decode(current).since ~= guard.since) then return 0 end
if guard.uncancelled and redis.call('HGET', KEYS[1], 'cancel') == 'true' then return 0 end
for _, allowed in ipairs(cjson.decode(ARGV[1])) do
  if allowed == state then
    local id = string.sub(KEYS[1], """ + str(len(job_key("")) + 1) + """)
    if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
    name_volumes(KEYS[1], id, ARGV[7])
    if ARGV[6] ~= '' and ARGV[6] ~= state then
      local created = tonumber(redis.call('HGET', KEYS[1], 'created')) or 0
      redis.call('ZREM', '""" + state_index("") + """' .. state, id)
      redis.call('ZADD', '""" + state_index("") + """' .. ARGV[6], created, id)
    end
    if ARGV[2] == '1' then
      redis.call('SREM', KEYS[2], id)
      for _, volid in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':volumes')) do
        redis.call('SREM', '""" + _VOLUME_PREFIX + """' .. volid, id)
      end
      redis.call('DEL', KEYS[1] .. ':volumes')
      local ok, kind = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'kind') or 'null')
      if ok and type(kind) == 'string' then  -- a forged record's kind, or a broken count, never stops its end
        redis.pcall('HINCRBY', KEYS[4], kind .. '|' .. redis.call('HGET', KEYS[1], 'state'), 1)
      end
      local keep = kept()
      redis.call('EXPIRE', KEYS[1], keep)
      redis.call('EXPIRE', KEYS[3], keep)
    end
    for _, event in ipairs(cjson.decode(ARGV[3])) do
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', event)
      redis.call('PUBLISH', '""" + CHANNEL + """', event)
    end
    return 1
  end
end
return 0
"""


def transition(
    r: redis.Redis,
    job_id: str,
    allowed: tuple[JobState, ...],
    to: JobState | None = None,
    events: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (),
    guard: dict[str, Any] | None = None,
    volumes: set[str] | frozenset[str] = frozenset(),
    **values: Any,
) -> None:
    """Atomically set fields (and the state) if the job is in one of `allowed` states and
    passes the guard, publishing `events` with the change (no watcher sees one without the
    other). Guard keys: `idle` (no step in progress), `done` (exactly that many steps done),
    `undone` (exactly that many undos done), `undos` (exactly that many undos planned: a plan
    an operator shortened since, job abandon, is seen), `owner` (the step in progress is this
    worker's), `since` (the step or undo in progress is the very start read: its `since`;
    one process's next undo has the same owner), `uncancelled` (no cancel asked for).
    The job is put into the volume sets of `volumes` and of those a `ctx` field names.

    A terminal state also takes the job out of the active set. StateConflict when the job
    has moved on (e.g. reconciliation failed it while a late redelivery ran).
    """
    if to is not None:
        values["state"] = to
    values["updated"] = time.time()
    pairs = [x for kv in _encode(values).items() for x in kv]
    args = [
        json.dumps([str(s) for s in allowed]),
        "1" if to is not None and to.terminal else "0",
        json.dumps([json.dumps(e) for e in events]),
        STREAM_MAXLEN,
        json.dumps(guard or {}),
        str(to) if to is not None else "",
        json.dumps(sorted(volumes | (ctx_volumes(values["ctx"]) if "ctx" in values else set()))),
        *pairs,
    ]
    keys = [job_key(job_id), ACTIVE, events_key(job_id), ENDED]
    result = script(r, "_stork_cas", _CAS)(keys=keys, args=args)
    if result == -1:
        raise NotFound(f"unknown job {job_id!r}")
    if result == 0:
        raise StateConflict(f"job {job_id} is no longer {' or '.join(allowed)}" + (f" ({guard})" if guard else ""))


def script(r: redis.Redis, name: str, source: str) -> Any:
    """A Lua script registered once per client (kept on it as `name`): run by EVALSHA, its
    text sent again only when Redis has not seen it (NOSCRIPT)."""
    registered = getattr(r, name, None)
    if registered is None:
        registered = r.register_script(source)
        setattr(r, name, registered)
    return registered


def request_cancel(r: redis.Redis, job_id: str) -> None:
    r.hset(job_key(job_id), "cancel", "true")


def cancel_requested(r: redis.Redis, job_id: str) -> bool:
    return r.hget(job_key(job_id), "cancel") == "true"


def active_ids(r: redis.Redis) -> list[str]:
    return sorted(r.smembers(ACTIVE))


def recent_ids(r: redis.Redis, limit: int = 50) -> list[str]:
    return list(reversed(r.zrange(JOBS, -limit, -1)))


def newest(r: redis.Redis, index: str = JOBS, since: float | None = None, page: int = 200) -> Iterator[JobRecord]:
    """The records of an index's jobs (JOBS, or a state, kind or guest index), newest first,
    created at `since` or later, read a page at a time; an id whose record expired is dropped."""
    low = since if since is not None else "-inf"
    offset = 0
    while ids := r.zrevrangebyscore(index, "+inf", low, start=offset, num=page):
        offset += len(ids)
        found = load_many(r, ids)
        if len(found) < len(ids):
            gone = set(ids) - {job.id for job in found}
            r.zrem(index, *gone)
            offset -= len(gone)
        yield from found


def set_keep(r: redis.Redis, days: int) -> None:
    """Keep the jobs that end from now on this many days (KEEP; each worker sets its config's
    jobs.keep_days at its start). Jobs ended before keep the time they were given."""
    r.set(KEEP, days * 86400)


def index_all(r: redis.Redis, page: int = 500) -> int:
    """Put every job on record into the indexes (those made before the indexes existed); once,
    then INDEXED says so. How many were indexed."""
    if r.exists(INDEXED):
        return 0
    count = 0
    for offset in range(0, r.zcard(JOBS), page):
        jobs = load_many(r, r.zrange(JOBS, offset, offset + page - 1))
        with r.pipeline(transaction=False) as p:
            for job in jobs:
                for key in (*indexes_of(job), state_index(job.state)):
                    p.zadd(key, {job.id: job.created})
                p.zadd(IDS, {job.id: 0})
            p.execute()
        count += len(jobs)
    r.set(INDEXED, "1")
    return count


def task_label(job: JobRecord) -> str:
    """The job in words for Flower's task list (each task's `label` kwarg, which the task
    ignores): the job id first (what an operator searches for, and Flower cuts a long cell
    at its end), then kind, guests, disks, volume, storages (source->target for a copy), e.g.
    "job 3f2a9c1e0b12: full_clone 100->101 scsi0 local->fast". Built from a record that may
    have been forged, so it never fails and stays short."""
    try:
        p = job.params if isinstance(job.params, dict) else {}
        guests = "->".join(dict.fromkeys(str(p[k]) for k in ("vmid", "lock_vmid", "new_vmid") if p.get(k) is not None))
        plans = {**(p.get("disks") or {}), **(p.get("bases") or {}), **(p.get("attach") or {})}
        disks = [str(k) for k in plans if k not in ("copy", "disk")] + ([str(p["disk"])] if p.get("disk") else [])
        volume = p.get("volid") or next((v.get("source") for k, v in plans.items()
                                         if k in ("copy", "disk") and isinstance(v, dict)), None)
        planned = [v for v in plans.values() if isinstance(v, dict)]
        targets = sorted({str(v["storage"]) for v in planned if v.get("storage")})
        sources = sorted({str(v.get("source") or v.get("base")).split(":")[0]
                          for v in planned if v.get("source") or v.get("base")} - set(targets))
        storages = ",".join(targets) if targets else ",".join(str(s) for s in p.get("storages") or [])
        if sources and targets:
            storages = f"{','.join(sources)}->{storages}"
        words = [str(job.kind), guests, ",".join(disks), str(volume or ""), storages]
        if not any(words[1:]):
            words.append(str(p.get("node") or ""))  # ping: which node is asked
        text = " ".join(w[:80] for w in words if w)
    except Exception:  # a label is never worth failing a send
        text = str(job.kind)[:80]
    return f"job {job.id}: {text[:200]}"
