"""Who may do what in stork's Redis: the Redis ACL rules of each role, as data.

- worker: the worker processes and beat. Every key and command stork and Celery use, none of
  Redis's administration (`@dangerous`: CONFIG, FLUSHALL, KEYS, DEBUG, REPLICAOF, ...).
- producer: the CLI and the Python client. It reads everything and writes what submitting,
  cancelling and withdrawing a job write: job records and their events, the names a job
  claims, a schedule's runs, and messages pushed onto the queues. It cannot take a message
  from a queue (no pop of any kind), hold a storage lease, beat for a worker process, or
  touch kombu's unacked messages: what a worker does.
- operator: a read-only view (job list and show, the metrics endpoint) plus what Flower needs
  to show the workers (events, and its inspect replies).

`stork redis users` prints them as ACL file lines, each password as its SHA-256 (Redis's
`#<hash>` form): the file never holds a password.
"""

from __future__ import annotations

import hashlib

from drivers.errors import ConfigError
from drivers.redis_settings import ROLES, RedisSettings

# Keys a producer writes (records.py lists every key stork uses). A key pattern grants its access
# whole: an update (a Lua transition) needs one that reads and writes (~), not a read-everything
# pattern plus a write-only one.
PRODUCER_WRITES = ("stork:job:*", "stork:jobs", "stork:jobs:*", "stork:metrics:jobs", "stork:claims:*")
# kombu's keys: a queue is a list per priority level (`<queue>` and `<queue>\x06\x16<n>`), a binding
# the set `_kombu.binding.<exchange>`. A producer pushes a message, takes its own back (withdraw)
# and declares a binding: nothing else, by a selector of its own (no DEL, LTRIM, RENAME, pop).
QUEUE_SELECTOR = "(~node.* ~shared* ~_kombu.binding.* +lpush +lrem +sadd)"
# A pop of any kind takes a message from a queue: a worker's act.
POPS = ("brpop", "blpop", "rpop", "lpop", "brpoplpush", "rpoplpush", "lmove", "blmove", "lmpop", "blmpop")
# Channels a producer publishes or listens on: stork's events and Celery's task events, never
# Celery's control channel (pidbox: shutdown, revoke, pool restarts).
PRODUCER_CHANNELS = ("stork:events", "/*.celeryev/*")
# Flower's inspect waits for the workers' replies on a queue of its own (bound to the reply
# exchange), its events arrive on a queue bound to celeryev, and kombu takes its restore mutex; a
# restore of old unacked messages beyond that is refused to it (and only logged). No other
# binding: one of a node's queue (`_kombu.binding.node.<name>`) routes that node's steps.
FLOWER_WRITES = ("_kombu.binding.reply.celery.pidbox", "_kombu.binding.celeryev", "*.reply.celery.pidbox*",
                 "unacked_mutex")

RULES: dict[str, tuple[str, ...]] = {
    "worker": ("resetkeys", "~*", "resetchannels", "&*", "+@all", "-@dangerous", "+info"),
    "producer": ("resetkeys", "%R~*", *(f"~{pattern}" for pattern in PRODUCER_WRITES), "resetchannels",
                 *(f"&{channel}" for channel in PRODUCER_CHANNELS), "-@all", "+@read", "+@write", "+@connection",
                 "+@pubsub", "+@scripting", "+@transaction", "-@dangerous", *(f"-{cmd}" for cmd in POPS),
                 QUEUE_SELECTOR),
    # Flower's inspect and its control commands share one channel: the operator's Flower can send both
    "operator": ("resetkeys", "%R~*", *(f"~{pattern}" for pattern in FLOWER_WRITES), "resetchannels", "&*",
                 "-@all", "+@read", "+@connection", "+@pubsub", "+@transaction", "-@dangerous",
                 "+sadd", "+srem", "+brpop", "+lpush", "+del", "+expire", "+set"),
}


def user_line(role: str, settings: RedisSettings) -> str:
    """The ACL file line of a role's user: `user <name> on #<sha256> <rules>`."""
    login = settings.login(role)
    if not login.user or not login.password:
        raise ConfigError(f"redis.users.{role}: a user and a password are needed for an ACL user")
    digest = hashlib.sha256(login.password.encode()).hexdigest()
    return " ".join(["user", login.user, "on", f"#{digest}", *RULES[role]])


def user_lines(settings: RedisSettings) -> list[str]:
    """One ACL line per configured role, and the default user switched off."""
    if not settings.logins:
        raise ConfigError("no [redis.users.<role>] in the config: name a user for each role "
                          f"({', '.join(ROLES)}) first")
    return [user_line(role, settings) for role in ROLES if role in settings.logins] + ["user default off"]
