"""Submit-time checks: each job kind's `prepare` turns the user's options into the job's
params (normalized, with the node and the storages it uses) or refuses them with one clear
error, before anything is queued."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers import driver_for, names, qemu
from drivers.config import Config
from drivers.errors import AlreadyExists, InvalidName, NotFound, Refused
from drivers.guests import Guest, GuestStore
from drivers.names import VolName


def _only(options: dict[str, Any], allowed: set[str], kind: str) -> None:
    if unknown := set(options) - allowed:
        raise InvalidName(f"{kind}: unknown option(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _store(cfg: Config) -> GuestStore:
    return GuestStore(cfg.guests_dir, cfg.lock_timeout)


def _guest(cfg: Config, vmid: Any) -> Guest:
    return _store(cfg).read(names.vmid(vmid))


def _node(o: dict[str, Any], cfg: Config) -> str:
    """The node a job's node-local storages are on: the option, else this node."""
    return names.node(o["node"]) if o.get("node") else cfg.node


def _flag(o: dict[str, Any], key: str) -> bool:
    value = o.get(key, False)
    if not isinstance(value, bool):
        raise InvalidName(f"invalid {key} {value!r}: expected true or false")
    return value


def _name(o: dict[str, Any]) -> str:
    return names.image_name(o["name"], "guest name") if o.get("name") else ""


def _new_vmid(cfg: Config, vmid: Any) -> int:
    vmid = names.vmid(vmid)
    if _store(cfg).exists(vmid):
        raise AlreadyExists(f"guest {vmid} already exists")
    return vmid


def _check_nodes(cfg: Config, storages: set[str], node: str) -> list[str]:
    for sid in storages:
        storage = cfg.storage(sid)
        if not storage.on_node(node):
            raise Refused(f"storage {sid!r} is local to node(s) {', '.join(storage.nodes)}: "
                          f"it does not exist on node {node!r}")
    return sorted(storages)


def _volume(cfg: Config, volid: str) -> tuple[str, VolName]:
    vid = names.volume_id(volid)
    drv = driver_for(cfg.storage(vid.storage))
    return vid.storage, drv.parse_volname(vid.volname)


def _format(cfg: Config, storage: str, fmt: str | None, default: str | None = None) -> str:
    drv = driver_for(cfg.storage(storage))
    fmt = names.image_format(fmt) if fmt else (default or drv.default_format)
    if fmt not in drv.formats:
        raise Refused(f"storage {storage!r} cannot hold {fmt} volumes")
    return fmt


def _images_storage(cfg: Config, storage: str) -> str:
    if "images" not in cfg.storage(storage).content:
        raise Refused(f"storage {storage!r} does not hold disk images (content: images)")
    return storage


def _new_guest(o: dict[str, Any], cfg: Config, kind: str, disk_options: set[str],
               plan_disk: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Params of a job that makes a new guest, one planned disk per `disks` entry."""
    _only(o, {"vmid", "name", "disks", "node"}, kind)
    vmid = _new_vmid(cfg, o.get("vmid"))
    node = _node(o, cfg)
    disks: dict[str, dict[str, Any]] = {}
    for key, spec in (o.get("disks") or {}).items():
        _only(spec, disk_options, f"disk {key}")
        disks[names.disk_key(key)] = {**plan_disk(spec), "owner": vmid}
    storages = _check_nodes(cfg, {d["storage"] for d in disks.values()}, node)
    return {"new_vmid": vmid, "name": _name(o), "node": node, "disks": disks, "storages": storages}


def prepare_create(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    def plan(spec: dict[str, Any]) -> dict[str, Any]:
        storage = _images_storage(cfg, names.storage_id(spec.get("storage", "")))
        return {"storage": storage, "size": names.size(spec.get("size", "")),
                "format": _format(cfg, storage, spec.get("format"))}

    return _new_guest(o, cfg, "create", {"storage", "size", "format"}, plan)


def prepare_import(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    def plan(spec: dict[str, Any]) -> dict[str, Any]:
        path = Path(spec.get("path", "")).absolute()
        with qemu.open_import(path) as (image, size):  # checked again, on the same open file, as it is copied
            src_fmt = image.fmt
        storage = _images_storage(cfg, names.storage_id(spec.get("storage") or "local"))
        return {"storage": storage, "source_path": str(path), "size": size,
                "format": _format(cfg, storage, spec.get("format"), default=src_fmt)}

    # the source files are on this node: every step that reads them runs here
    return {**_new_guest(o, cfg, "import", {"path", "storage", "format"}, plan), "pinned": True}


def _clone_source(cfg: Config, o: dict[str, Any]) -> tuple[Guest, int]:
    source = _guest(cfg, o.get("vmid"))
    newid = _new_vmid(cfg, o.get("newid"))
    source.require_unlocked()
    return source, newid


def prepare_linked_clone(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "newid", "name", "storage", "format"}, "linked clone")
    source, newid = _clone_source(cfg, o)
    if not source.template:
        raise Refused(f"guest {source.vmid} is not a template: a linked clone needs one (use --full)")
    disks: dict[str, dict[str, Any]] = {}
    for key, volid in source.disks.items():
        storage, vol = _volume(cfg, volid)
        if o.get("storage") and o["storage"] != storage:
            raise Refused(f"a linked clone must be on the storage of its base: {volid} is on {storage!r}, "
                          f"not {o['storage']!r} (use --full)")
        drv = driver_for(cfg.storage(storage))
        if o.get("format") and o["format"] != drv.linked_clone_format:
            raise Refused(f"a linked clone on {storage!r} is {drv.linked_clone_format}, not {o['format']} "
                          "(use --full)")
        drv.require_feature("linked_clone", vol)
        disks[key] = {"source": volid, "storage": storage, "owner": newid}
    storages = _check_nodes(cfg, {d["storage"] for d in disks.values()}, source.node)
    return {"vmid": source.vmid, "new_vmid": newid, "name": _name(o), "node": source.node,
            "disks": disks, "storages": storages}


def prepare_full_clone(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "newid", "name", "storage", "format"}, "full clone")
    source, newid = _clone_source(cfg, o)
    target = names.storage_id(o["storage"]) if o.get("storage") else None
    disks, used = {}, set()
    for key, volid in source.disks.items():
        storage, vol = _volume(cfg, volid)
        dest = _images_storage(cfg, target or storage)
        disks[key] = {"source": volid, "storage": dest, "owner": newid,
                      "format": _format(cfg, dest, o.get("format"), default=vol.fmt)}
        used |= {storage, dest}
    storages = _check_nodes(cfg, used, source.node)
    return {"vmid": source.vmid, "new_vmid": newid, "name": _name(o), "node": source.node,
            "lock_vmid": None if source.template else source.vmid, "expect_disks": source.disks,
            "disks": disks, "storages": storages}


def _owner_of(cfg: Config, volid: str) -> Guest | None:
    """The guest that attaches the volume or keeps it as unused (fails closed: ConfigError
    naming a broken guest config, which might be the owner)."""
    return next((g for g in _store(cfg).list() if volid in (*g.disks.values(), *g.unused)), None)


def prepare_base(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "name", "node"}, "base")
    volid = str(o.get("volid"))
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("make_base", vol)
    name = names.image_name(o["name"], "base name") if o.get("name") else None
    owner = _owner_of(cfg, volid)
    node = owner.node if owner else _node(o, cfg)
    return {"lock_vmid": owner.vmid if owner else None, "refuse_template": "converting its disks",
            "expect_disks": owner.disks if owner else None,
            "bases": {"disk": {"source": volid, "name": name}}, "node": node,
            "storages": _check_nodes(cfg, {storage}, node)}


def prepare_template(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid"}, "template")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_not_template("making it a template again")
    guest.require_unlocked()
    bases, used = {}, set()
    for key, volid in guest.disks.items():
        storage, vol = _volume(cfg, volid)
        used.add(storage)
        if not vol.is_base:
            driver_for(cfg.storage(storage)).require_feature("make_base", vol)
            bases[key] = {"source": volid, "name": None}
    return {"lock_vmid": guest.vmid, "refuse_template": "making it a template again", "make_template": True,
            "expect_disks": guest.disks, "bases": bases, "node": guest.node,
            "storages": _check_nodes(cfg, used, guest.node)}


def prepare_copy(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "storage", "format", "vmid", "node"}, "copy")
    volid = str(o.get("volid"))
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("copy", vol)
    owner = names.vmid(o["vmid"]) if o.get("vmid") else vol.owner
    if owner is None:
        raise InvalidName(f"{volid} belongs to no guest: name the owner of the copy with --vmid")
    dest = _images_storage(cfg, names.storage_id(o.get("storage") or ""))
    node = _node(o, cfg)
    disk = {"source": volid, "storage": dest, "owner": owner, "format": _format(cfg, dest, o.get("format"), vol.fmt)}
    return {"disks": {"copy": disk}, "node": node, "storages": _check_nodes(cfg, {storage, dest}, node)}


def prepare_move(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "disk", "storage", "format", "delete_source"}, "move")
    guest = _guest(cfg, o.get("vmid"))
    key = names.disk_key(o.get("disk", ""))
    if key not in guest.disks:
        raise NotFound(f"guest {guest.vmid} has no disk {key} (disks: {', '.join(guest.disks) or 'none'})")
    guest.require_not_template("moving its disks")
    guest.require_unlocked()
    volid = guest.disks[key]
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("move", vol)
    dest = _images_storage(cfg, names.storage_id(o.get("storage") or ""))
    fmt = _format(cfg, dest, o.get("format"), vol.fmt)
    if dest == storage and fmt == vol.fmt:
        raise Refused(f"{volid} is already on {dest!r} as {fmt}")
    return {"lock_vmid": guest.vmid, "refuse_template": "moving its disks", "expect_disks": guest.disks,
            "disks": {key: {"source": volid, "storage": dest, "owner": guest.vmid, "format": fmt}},
            "delete_source": _flag(o, "delete_source"), "node": guest.node,
            "storages": _check_nodes(cfg, {storage, dest}, guest.node)}


def prepare_free(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "node"}, "free")
    volid = str(o.get("volid"))
    storage, _vol = _volume(cfg, volid)
    node = _node(o, cfg)
    return {"volid": volid, "node": node, "storages": _check_nodes(cfg, {storage}, node)}


def prepare_destroy(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid"}, "destroy")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_unlocked()
    used = {names.volume_id(v).storage for v in [*guest.disks.values(), *guest.unused]}
    return {"lock_vmid": guest.vmid, "node": guest.node, "expect_disks": guest.disks,
            "storages": _check_nodes(cfg, used, guest.node)}


def prepare_ping(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"node"}, "ping")
    node = _node(o, cfg)
    return {"node": node, "storages": [], "pinned": True}  # its storage step runs on the node


def prepare_resize(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "size", "node"}, "resize")
    volid = str(o.get("volid"))
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("resize", vol)
    owner = _owner_of(cfg, volid)
    node = owner.node if owner else _node(o, cfg)
    return {"volid": volid, "size": names.size(o.get("size", "")), "node": node,
            "lock_vmid": owner.vmid if owner else None, "refuse_template": "writing its disks",
            "expect_disks": owner.disks if owner else None,
            "storages": _check_nodes(cfg, {storage}, node)}


def prepare_unlock(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid"}, "unlock")
    guest = _guest(cfg, o.get("vmid"))
    if not guest.lock:
        raise Refused(f"guest {guest.vmid} is not locked")
    return {"vmid": guest.vmid, "node": guest.node, "storages": []}
