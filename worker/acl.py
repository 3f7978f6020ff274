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

# Keys a producer writes (records.py lists every key stork uses), and kombu's: a queue is a list
# per priority level (`<queue>` and `<queue>\x06\x16<n>`), a binding the set `_kombu.binding.<exchange>`.
PRODUCER_WRITES = ("stork:job:*", "stork:jobs", "stork:jobs:*", "stork:metrics:jobs", "stork:claims:*",
                   "stork:schedule:*",
                   "node.*", "shared*", "_kombu.binding.*")
# A pop of any kind takes a message from a queue: a worker's act.
POPS = ("brpop", "blpop", "rpop", "lpop", "brpoplpush", "rpoplpush", "lmove", "blmove", "lmpop", "blmpop")
# Flower's inspect: it waits for the workers' replies on a queue of its own.
FLOWER_WRITES = ("_kombu.binding.*", "*.reply.celery.pidbox*")

RULES: dict[str, tuple[str, ...]] = {
    "worker": ("resetkeys", "~*", "resetchannels", "&*", "+@all", "-@dangerous", "+info"),
    # a key pattern grants its access whole: an update (a Lua transition, a pop) needs one that reads and
    # writes (~), not a read-everything pattern plus a write-only one
    "producer": ("resetkeys", "%R~*", *(f"~{pattern}" for pattern in PRODUCER_WRITES), "resetchannels", "&*",
                 "-@all", "+@read", "+@write", "+@connection", "+@pubsub", "+@scripting", "+@transaction",
                 "-@dangerous", *(f"-{cmd}" for cmd in POPS)),
    "operator": ("resetkeys", "%R~*", *(f"~{pattern}" for pattern in FLOWER_WRITES), "resetchannels", "&*",
                 "-@all", "+@read", "+@connection", "+@pubsub", "-@dangerous",
                 "+sadd", "+srem", "+brpop", "+lpush", "+del", "+expire"),
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
