"""Job parameters as the worker reads them back from Redis: checked again before a step acts.

`prepare` normalizes a user's options at submit, but a job record in Redis is input, not
truth: anyone who can write to Redis can write one. So every key a step may read is declared
here with its check, one table for all kinds; an unknown key or a bad value refuses the
whole record before anything touches a storage.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from drivers import names
from drivers.backup import retention
from drivers.backup.records import backup_id, check_notes
from drivers.errors import InvalidName

Check = Callable[[Any], object]  # raises InvalidName when the value is bad


def _bool(value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidName(f"{value!r}: expected true or false")


def _vmid(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidName(f"{value!r}: expected a guest id")
    names.vmid(value)


def _positive_int(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidName(f"{value!r}: expected a whole number > 0")


def _text(value: Any) -> None:
    if not isinstance(value, str) or not value.isprintable() or len(value) > 200:
        raise InvalidName(f"{value!r}: expected a short line of text")


def _guest_name(value: Any) -> None:
    if value != "":
        names.image_name(value, "name")


def _volid(value: Any) -> None:
    vid = names.stored_volid(value)
    names.any_volname(vid.volname)


def _absolute_path(value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise InvalidName(f"{value!r}: expected an absolute path")


def _backup_id(value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidName(f"{value!r}: expected a backup id")
    backup_id(value)


def _count(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidName(f"{value!r}: expected a whole number >= 0")


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _list_of(check: Check) -> Check:
    def run(value: Any) -> None:
        if not isinstance(value, list):
            raise InvalidName(f"{value!r}: expected a list")
        for item in value:
            check(item)

    return run


def _ip(value: Any) -> None:
    try:
        if not isinstance(value, str):  # ip_address(5) is 0.0.0.5
            raise ValueError
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidName(f"{value!r}: expected an IP address") from None


def _port(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise InvalidName(f"{value!r}: expected a port number")


def _matching(pattern: str, what: str) -> Check:
    def run(value: Any) -> None:
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise InvalidName(f"{value!r}: expected {what}")

    return run


class _Bad(Exception):
    """A bad value and the keys leading to it (outermost first)."""

    def __init__(self, path: list[str], message: str) -> None:
        self.path, self.message = path, message


def _at(key: str, check: Check, value: Any) -> None:
    """Run a check, adding `key` to the path of the value that fails."""
    try:
        check(value)
    except InvalidName as e:
        raise _Bad([key], str(e)) from None
    except _Bad as bad:
        bad.path.insert(0, key)
        raise


def _table(schema: Mapping[str, Check]) -> Check:
    """A dict whose keys are all in `schema`, each value passing its check."""

    def run(value: Any) -> None:
        if not isinstance(value, dict):
            raise InvalidName(f"{value!r}: expected a table")
        for key, item in value.items():
            if key not in schema:
                raise _Bad([str(key)], "unknown key")
            _at(key, schema[key], item)

    return run


def _map_of(key_check: Check, value_check: Check) -> Check:
    def run(value: Any) -> None:
        if not isinstance(value, dict):
            raise InvalidName(f"{value!r}: expected a table")
        for key, item in value.items():
            _at(str(key), key_check, key)
            _at(str(key), value_check, item)

    return run


def _disk_key(value: Any) -> None:
    if value not in ("copy", "disk"):  # the one planned volume of a copy or a base job
        names.disk_key(value)


def _member(value: Any) -> None:
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") or not value.isprintable():
        raise InvalidName(f"{value!r}: expected a file name in an archive")


def _str(value: Any) -> None:
    if not isinstance(value, str):
        raise InvalidName(f"{value!r}: expected a string")


PLAN: dict[str, Check] = {
    "storage": names.storage_id,
    "size": _positive_int,
    "format": names.image_format,
    "owner": _vmid,
    "source": _volid,
    "source_path": _absolute_path,
    "member": _member,  # the disk is this member of the archive at source_path (an OVA)
    "base": _volid,  # a disk from a base image: a linked clone of it
    "base_identity": _str,  # a relinked restore: the base must still be this very volume
    "as_base": _bool,  # a moved base: its copy is made a base on the target
    "across": _bool,  # its source is on another node than its target: copied through an export
    "moves": _bool,  # its source is the guest's own disk, which the copy replaces (a move, a migration)
}
BASE_PLAN: dict[str, Check] = {"source": _volid, "name": _optional(lambda v: names.volume_stem(v, "base name"))}

PARAMS: dict[str, Check] = {
    "vmid": _vmid,
    "new_vmid": _vmid,
    "lock_vmid": _optional(_vmid),
    "name": _guest_name,
    "node": names.node,
    "source_node": names.node,  # a job between nodes: where its sources are read (and exported)
    "target_node": names.node,  # ... and where its targets are made
    "storages": _list_of(names.storage_id),
    "pinned": _bool,
    "make_template": _bool,
    "delete_source": _bool,
    "forget": _bool,  # free, disk remove, destroy: volumes gone already, dropped from the guests that list them
    "refuse_template": _text,
    "expect_disks": _optional(_map_of(names.disk_key, _volid)),
    "expect_rev": _optional(_matching(r"(?:[0-9a-f]{16})?", "a guest config's rev")),  # the guest's rev at submit
    "expect_node": _optional(names.node),  # the node of the guest it locks or reads (a template) at submit
    "config": _absolute_path,  # import-pve: the Proxmox VE config read at submit, on the job's node
    "config_digest": _matching(r"[0-9a-f]{64}", "a SHA-256 digest"),  # ... its text's then
    "disks": _map_of(_disk_key, _table(PLAN)),
    # a replica clone: each disk linked to a replica there (with its own identity, where recorded) or made
    "links": _map_of(names.disk_key, _table({"storage": names.storage_id, "replica": _volid, "base_identity": _str})),
    "bases": _map_of(_disk_key, _table(BASE_PLAN)),
    "link_owner": _map_of(names.disk_key, _disk_key),  # base: the owner's slot -> the base it gets a clone of
    "volid": _volid,
    "size": _positive_int,
    "disk": names.disk_key,
    "attach": _map_of(names.disk_key, _volid),
    "attach_unused": _list_of(_volid),  # import-pve: volumes the adopted guest keeps as unused
    # backups (worker/jobs/backups.py)
    "volumes": _map_of(names.disk_key, _volid),  # a backup's disks
    "store": names.storage_id,  # the backup storage
    "notes": check_notes,
    "backup": _backup_id,
    "backups": _optional(_list_of(_backup_id)),  # verify: these, or all
    "template": _bool,
    "keep": _table({period: _count for period in retention.OPTIONS}),
    "dry_run": _bool,
    "replace": _bool,  # restore --force: over an existing guest
    "reverify_after": _count,  # verify: days a sound verify result stands
    "target": names.storage_id,  # sync: the backup storage copied to
    "vmids": _list_of(_vmid),  # sync: these guests' backups (none: all)
    "reencrypt": _bool,  # sync: between stores of other keys, each chunk sealed anew
}


def _pair_of_volids(value: Any) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise InvalidName(f"{value!r}: expected [volume id, base volume id]")
    for volid in value:
        _volid(volid)


# A running export as the source node records it: where the target connects, and what `stop` checks.
EXPORT: dict[str, Check] = {
    "host": _ip,
    "port": _port,
    "name": _matching("[0-9a-f]{32}", "an export name"),
    "pid": _positive_int,
    "started": _matching("[0-9]{1,20}", "a process start time"),
    "size": _positive_int,
}

# What steps save in the record (`ctx`) for later steps and undos: read back as input too.
CTX: dict[str, Check] = {
    "pending": _map_of(_disk_key, _volid),
    "made": _map_of(_disk_key, _volid),
    "linked": _map_of(_disk_key, _volid),  # a replica clone's linked clones
    "identities": _map_of(_disk_key, _str),  # the identity of each base a job copied whole
    "base_identities": _map_of(_disk_key, _str),  # the identity of each base a job made of a copy (a replica)
    "replicas": _map_of(_volid, _str),  # a destroyed template's replicas, each with its identity
    "replaced": _map_of(_disk_key, _volid),
    "based": _map_of(_disk_key, _pair_of_volids),
    "copied": _list_of(_disk_key),
    "copying": _disk_key,
    "freeing": _str,  # a volume's identity token
    "freed": _map_of(_disk_key, _str),  # the identity of each replaced disk's volume, saved before it is freed
    "destroying": _vmid,
    "resized_from": _count,  # a volume's size before a resize grew it (an empty one: 0)
    "freed_volumes": _map_of(_volid, _str),  # volumes a destroy or remove_disk frees, each with its identity ("" none)
    "forgetting": _bool,  # volume free --forget: dropping a volume gone from the guests that list it
    "backup": _backup_id,  # the snapshot a backup step is writing or wrote
    "time": _str,  # its time (parsed again where used)
    "restored": _list_of(_disk_key),
    "restoring": _disk_key,
    "exports": _map_of(_disk_key, _table(EXPORT)),  # a source node's exports (drivers/transfer.py)
}


def _refuse(where: str, schema: Mapping[str, Check], value: Any) -> None:
    try:
        _at(where, _table(schema), value)
    except _Bad as bad:
        raise InvalidName(f"job record refused: {'.'.join(bad.path)}: {bad.message}") from None


def check(params: Any) -> None:
    """Refuse a job's params unless every key is known and every value is valid."""
    _refuse("params", PARAMS, params)


def check_record(job: Any) -> None:
    """Refuse a job record whose params or saved step data (`ctx`) do not check out."""
    check(job.params)
    _refuse("ctx", CTX, job.ctx)
