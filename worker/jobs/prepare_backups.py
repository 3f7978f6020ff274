"""Submit-time checks of the backup and restore jobs (as worker/jobs/prepare.py does for the rest):
the user's options become the job's params, or one clear refusal before anything is queued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers import BACKUP_STORAGES, backup_storage, driver_for, guests, names
from drivers.backup.records import backup_id, check_notes
from drivers.backup.retention import Keep
from drivers.backup.store import ChunkStore
from drivers.backup.sync import check_pair
from drivers.config import Config
from drivers.errors import AlreadyExists, Corrupt, InvalidName, NotFound, Refused, StorkError
from drivers.guests import Guest
from drivers.names import VolName
from worker.jobs.prepare import (
    _check_nodes,
    _flag,
    _format,
    _guest,
    _images_storage,
    _name,
    _node,
    _only,
    _store,
    _volume,
    as_seen,
)


def backup_storage_id(cfg: Config, given: Any) -> str:
    """The backup storage named, or the only one configured."""
    if given:
        sid = names.storage_id(str(given))
        backup_storage(cfg.storage(sid))  # refused, naming it, if it holds images
        return sid
    found = sorted(s.id for s in cfg.storages.values() if s.type in BACKUP_STORAGES)
    if not found:
        raise Refused('no backup storage is configured (add a storage with type = "chunkstore")')
    if len(found) > 1:
        raise Refused(f"several backup storages ({', '.join(found)}): name one with --storage")
    return found[0]


def prepare_backup(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Every disk of one guest (a template, a linked clone: any guest) and its config."""
    _only(o, {"vmid", "storage", "notes"}, "backup")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_unlocked()
    store = backup_storage_id(cfg, o.get("storage"))
    used = {names.volume_id(v).storage for v in guest.disks.values()} | {store}
    return {"vmid": guest.vmid, "lock_vmid": guest.vmid, **as_seen(guest),
            "volumes": dict(guest.disks),
            "store": store, "notes": check_notes(o.get("notes") or ""), "node": guest.node,
            "storages": _check_nodes(cfg, used, guest.node)}


def find_backup(cfg: Config, text: Any) -> tuple[str, ChunkStore, str]:
    """(backup storage id, its store, backup id) of `[STORAGE:]vm/VMID/TIME`, searched in every
    backup storage where no storage is named."""
    text = str(text or "")
    sid, _, bid = text.partition(":") if text.count(":") == 3 else ("", "", text)  # a time holds two colons
    bid = str(backup_id(bid))
    candidates = [backup_storage_id(cfg, sid)] if sid else sorted(
        s.id for s in cfg.storages.values() if s.type in BACKUP_STORAGES and s.on_node(cfg.node))
    holding, errors = [], []
    for c in candidates:
        try:
            store = backup_storage(cfg.storage(c)).open()
            if store.exists(bid):
                holding.append((c, store))
        except StorkError as e:  # a storage that cannot be opened (its key file missing, say) hides no other
            if sid:
                raise
            errors.append(f"backup storage {c!r}: {e}")
    if not holding:
        raise NotFound(f"unknown backup {bid}" + (f" (not searched: {'; '.join(errors)})" if errors else ""))
    if len(holding) > 1:
        listed = ", ".join(f"{c}:{bid}" for c, _ in holding)
        raise Refused(f"backup {bid} is in several backup storages: name one ({listed})")
    return holding[0][0], holding[0][1], bid


def prepare_restore(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A backup as a new guest: each disk on the named storage (else where it was), in the
    format named (else its own where the storage holds it); a template as a template."""
    _only(o, {"backup", "newid", "storage", "format", "name", "node", "force"}, "restore")
    sid, store, bid = find_backup(cfg, o.get("backup"))
    newid = names.vmid(o.get("newid"))
    replaced = _replaced(cfg, newid, _flag(o, "force"))
    manifest = store.snapshot(bid).manifest
    original = guests.loads(newid, store.read_blob(bid, "guest.conf").decode(), Path(f"backup {bid}: guest.conf"))
    target = names.storage_id(o["storage"]) if o.get("storage") else None
    disks: dict[str, dict[str, Any]] = {}
    node = replaced.node if replaced else _node(o, cfg)
    for key, disk in manifest.disks.items():
        relink = None if original.template or node != cfg.node else \
            _relinkable(cfg, store, bid, key, target, o.get("format"))  # checked here: on this node only
        if relink:
            base, identity = relink
            storage = names.volume_id(base).storage
            disks[key] = {"storage": storage, "owner": newid, "base": base, "base_identity": identity,
                          "size": disk.virtual_size, "format": driver_for(cfg.storage(storage)).linked_clone_format}
            continue
        storage = _images_storage(cfg, target or _original_storage(cfg, original.disks.get(key, ""), key))
        drv = driver_for(cfg.storage(storage))
        fmt = _format(cfg, storage, o.get("format"), default=disk.format if disk.format in drv.formats else None)
        if original.template and not drv.has_feature("make_base", VolName(newid, key, fmt)):
            raise Refused(f"backup {bid} is of a template: storage {storage!r} cannot hold {fmt} base images")
        disks[key] = {"storage": storage, "owner": newid, "format": fmt, "size": disk.virtual_size}
    replacing = {"replace": True, "lock_vmid": newid, **as_seen(replaced)} if replaced else {}
    return {"store": sid, "backup": bid, "new_vmid": newid, "name": _name(o) or original.name, "node": node,
            "template": original.template, "disks": disks, **replacing,
            "storages": _check_nodes(cfg, {d["storage"] for d in disks.values()} | {sid}, node)}


def _replaced(cfg: Config, vmid: int, force: bool) -> Guest | None:
    """The guest a forced restore replaces (unlocked, no template whose bases have linked
    clones), None where the id is free; AlreadyExists without force."""
    if not _store(cfg).exists(vmid):
        return None
    if not force:
        raise AlreadyExists(f"guest {vmid} already exists (restore with --force to replace it)")
    guest = _store(cfg).read(vmid)
    guest.require_unlocked()
    if guest.replicas:  # they copy its bases: a restore over it would leave them copies of nothing
        raise Refused(f"guest {vmid} has replicas of its bases on other nodes: {', '.join(sorted(guest.replicas))} "
                      "(free them with 'stork volume free VOLID' first)")
    for volid in guest.disks.values():
        storage, vol = _volume(cfg, volid)
        if vol.is_base and cfg.storage(storage).on_node(cfg.node):
            drv = driver_for(cfg.storage(storage))
            if readers := drv.readers_of(vol):
                raise Refused(f"guest {vmid} cannot be replaced: its base {volid} has {len(readers)} linked "
                              f"clone(s): {', '.join(readers)}")
    return guest


def _relinkable(cfg: Config, store: ChunkStore, bid: str, key: str, target: str | None,
                fmt: str | None) -> tuple[str, str] | None:
    """The base a linked clone's disk can be restored onto as a linked clone again: the very
    volume its backup's base was read from (same id, same identity token: a base never changes),
    still a base, on the target storage (or any, where none is named), in the clone format.
    None: the disk comes back whole."""
    index = store.index(bid, key)
    ref = index.base
    if ref is None or not store.exists(ref.backup):
        return None
    try:
        disk = store.snapshot(ref.backup).manifest.disks.get(ref.disk)
    except (Corrupt, NotFound, Refused):
        return None  # the base's backup damaged: the clone's own backup holds every chunk it needs
    if disk is None or not disk.source or disk.virtual_size != index.virtual_size:
        return None
    try:
        storage, vol = _volume(cfg, disk.source)
    except StorkError:
        return None  # its storage is gone from the config
    config = cfg.storage(storage)
    if (target and target != storage) or not config.on_node(cfg.node) or "images" not in config.content:
        return None
    drv = driver_for(config)
    if not vol.is_base or not drv.exists(vol) or drv.identity(vol) != disk.identity or \
            (fmt and fmt != drv.linked_clone_format) or not drv.has_feature("linked_clone", vol):
        return None
    return disk.source, disk.identity


def _original_storage(cfg: Config, volid: str, key: str) -> str:
    storage = names.volume_id(volid).storage if volid else ""
    if storage not in cfg.storages:
        raise Refused(f"disk {key} was on storage {storage or '?'!r}, which is not configured: name a target "
                      "storage with --storage")
    return storage


def _backup_storage_here(cfg: Config, o: dict[str, Any]) -> dict[str, Any]:
    sid = backup_storage_id(cfg, o.get("storage"))
    return {"store": sid, "node": _node(o, cfg), "storages": _check_nodes(cfg, {sid}, _node(o, cfg))}


def prepare_verify(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """One backup, or all of a storage; with `reverify_after` (days), all but those verified
    sound within that many days (as Proxmox Backup Server's re-verify after)."""
    _only(o, {"backup", "storage", "node", "reverify_after"}, "verify")
    if o.get("backup"):
        if o.get("reverify_after") is not None:
            raise InvalidName("verify: reverify_after goes with all of a storage's backups, not one")
        sid, _, bid = find_backup(cfg, o["backup"])
        return {**_backup_storage_here(cfg, {**o, "storage": sid}), "backups": [bid]}
    days = o.get("reverify_after")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or not 0 <= days <= 36500):
        raise InvalidName(f"verify: invalid reverify_after {days!r}: expected a whole number of days from 0")
    return {**_backup_storage_here(cfg, o), "backups": None,
            **({"reverify_after": days} if days is not None else {})}


def prepare_prune(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"storage", "vmid", "keep", "dry_run", "node"}, "prune")  # node: where a node-local store is
    try:
        keep = Keep.from_options(o.get("keep") or {})
    except (ValueError, TypeError) as e:
        raise InvalidName(f"prune: {e}") from None
    if not keep.keeps_something:
        raise InvalidName("prune: give at least one keep option above 0 (--keep-last, --keep-daily, ...): without "
                          "one every backup would be kept")
    vmid = {"vmid": names.vmid(o["vmid"])} if o.get("vmid") is not None else {}
    return {**_backup_storage_here(cfg, o), **vmid, "keep": vars(keep), "dry_run": bool(o.get("dry_run"))}


def prepare_gc(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"storage", "node"}, "gc")
    return _backup_storage_here(cfg, o)


def prepare_sync(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Copies of one backup storage's backups (of the guests named, or all) in another, run
    where both are (the node named, or this one); with a retention, the target is pruned after."""
    _only(o, {"source", "target", "vmids", "keep", "node", "reencrypt"}, "sync")
    if not o.get("source") or not o.get("target"):
        raise InvalidName("sync: name the backup storage to copy from (--from) and the one to copy to (--to)")
    source, target = backup_storage_id(cfg, o["source"]), backup_storage_id(cfg, o["target"])
    if source == target:
        raise Refused(f"sync: {source!r} is both the source and the target")
    reencrypt = _flag(o, "reencrypt")
    check_pair(backup_storage(cfg.storage(source)).open(), backup_storage(cfg.storage(target)).open(), reencrypt)
    try:
        keep = Keep.from_options(o.get("keep") or {})
    except (ValueError, TypeError) as e:
        raise InvalidName(f"sync: {e}") from None
    node = _node(o, cfg)
    return {"store": source, "target": target, "vmids": sorted({names.vmid(v) for v in o.get("vmids") or []}),
            "keep": vars(keep), "reencrypt": reencrypt, "node": node, **({"pinned": True} if o.get("node") else {}),
            "storages": _check_nodes(cfg, {source, target}, node)}
