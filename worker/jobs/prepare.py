"""Submit-time checks: each job kind's `prepare` turns the user's options into the job's
params (normalized, with the node and the storages it uses) or refuses them with one clear
error, before anything is queued."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers import driver_for, names, ova, pve, qemu, transfer
from drivers.backends.base import Driver
from drivers.config import Config
from drivers.errors import AlreadyExists, ConfigError, InvalidName, NotFound, Refused, StorkError
from drivers.guests import Guest, GuestStore, base_mismatch
from drivers.names import VolName
from worker.jobs import usage


def _only(options: dict[str, Any], allowed: set[str], kind: str) -> None:
    if unknown := set(options) - allowed:
        raise InvalidName(f"{kind}: unknown option(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(allowed))})")


def _store(cfg: Config) -> GuestStore:
    return GuestStore(cfg.guests_dir, cfg.lock_timeout)


def _guest(cfg: Config, vmid: Any) -> Guest:
    return _store(cfg).read(names.vmid(vmid))


def as_seen(guest: Guest | None) -> dict[str, Any]:
    """What a job's lock step checks its guest against (None: no guest): the disks, the
    config's rev (renewed at every change of the disks) and the node it had at submit."""
    return {"expect_disks": guest.disks if guest else None, "expect_rev": guest.rev if guest else None,
            "expect_node": guest.node if guest else None}


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


def refuse_foreign_folders(params: dict[str, Any], cfg: Config) -> None:
    """Refuse a job that would make a volume of guest N in a folder another manager of the
    storage counts as its own guest N's (Proxmox VE's `images/N/`: its destroy would take the
    volume along), where this node sees the storage; the step checks again on its node."""
    for plan in (params.get("disks") or {}).values():
        sid, owner = plan.get("storage"), plan.get("owner")
        if sid is None or owner is None or not cfg.storage(sid).on_node(cfg.node):
            continue
        if whose := driver_for(cfg.storage(sid)).foreign_guest(owner):
            raise Refused(usage.foreign_folder(sid, owner, whose))


def _check_nodes(cfg: Config, storages: set[str], node: str) -> list[str]:
    for sid in storages:
        storage = cfg.storage(sid)
        if not storage.on_node(node):
            raise Refused(f"storage {sid!r} is local to node(s) {', '.join(storage.nodes)}: "
                          f"it does not exist on node {node!r}")
    return sorted(storages)


def _volume(cfg: Config, volid: str) -> tuple[str, VolName]:
    vid = names.stored_volid(volid)
    drv = driver_for(cfg.storage(vid.storage))
    return vid.storage, drv.parse_volname(vid.volname)


def _format(cfg: Config, storage: str, fmt: str | None, default: str | None = None) -> str:
    drv = driver_for(cfg.storage(storage))
    fmt = names.image_format(fmt) if fmt else (default or drv.preferred_format)
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


DISK_OPTIONS = {"storage", "size", "format", "base"}


def _base_here(cfg: Config, volid: str, node: str) -> tuple[str, VolName]:
    """A base image named by the user for a job on `node`: refused unless it is one (and,
    where this node is that one or the storage is shared, unless it exists)."""
    storage, vol = _volume(cfg, volid)
    if not vol.is_base:
        raise Refused(f"{volid} is not a base image (make one with 'stork base' or 'stork template')")
    if drv := _existing_here(cfg, storage, vol, node):
        drv.identity(vol)  # a link or a folder at the name is no volume: refused now
    return storage, vol


def _disk_plan(cfg: Config, spec: dict[str, Any], node: str) -> dict[str, Any]:
    """A new disk: a linked clone of a base image (`base`), or an empty one of a size."""
    if spec.get("base"):
        if extra := set(spec) - {"base"}:
            raise InvalidName(f"a disk from a base image takes no {', '.join(sorted(extra))}: it is a linked clone")
        storage, vol = _base_here(cfg, str(spec["base"]), node)
        drv = driver_for(cfg.storage(storage))
        drv.require_feature("linked_clone", vol)
        return {"storage": _images_storage(cfg, storage), "base": str(spec["base"]),
                "format": drv.linked_clone_format}
    storage = _images_storage(cfg, names.storage_id(spec.get("storage", "")))
    return {"storage": storage, "size": names.size(spec.get("size", "")),
            "format": _format(cfg, storage, spec.get("format"))}


def prepare_create(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return _new_guest(o, cfg, "create", DISK_OPTIONS, lambda spec: _disk_plan(cfg, spec, _node(o, cfg)))


def prepare_add_disk(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "disks"}, "disk add")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_not_template("adding disks")
    guest.require_unlocked()
    disks: dict[str, dict[str, Any]] = {}
    for key, spec in (o.get("disks") or {}).items():
        key = names.disk_key(key)
        if key in guest.disks:
            raise AlreadyExists(f"guest {guest.vmid} has a disk {key} already ({guest.disks[key]})")
        _only(spec, DISK_OPTIONS, f"disk {key}")
        disks[key] = {**_disk_plan(cfg, spec, guest.node), "owner": guest.vmid}
    if not disks:
        raise InvalidName("disk add: name at least one disk")
    return {"lock_vmid": guest.vmid, "refuse_template": "adding disks", **as_seen(guest),
            "disks": disks, "node": guest.node,
            "storages": _check_nodes(cfg, {d["storage"] for d in disks.values()}, guest.node)}


def _guest_disk(o: dict[str, Any], cfg: Config, kind: str, doing: str,
                options: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Params of a job acting on one disk of a guest (not of a template)."""
    _only(o, {"vmid", "disk", *options}, kind)
    guest = _guest(cfg, o.get("vmid"))
    key = names.disk_key(o.get("disk", ""))
    if key not in guest.disks:
        raise NotFound(f"guest {guest.vmid} has no disk {key} (disks: {', '.join(guest.disks) or 'none'})")
    guest.require_not_template(doing)
    guest.require_unlocked()
    storage, _vol = _volume(cfg, guest.disks[key])
    return {"lock_vmid": guest.vmid, "refuse_template": doing, **as_seen(guest), "disk": key,
            "node": guest.node, "storages": _check_nodes(cfg, {storage}, guest.node)}


def prepare_detach(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return _guest_disk(o, cfg, "disk detach", "detaching its disks")


def prepare_remove_disk(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    params = _guest_disk(o, cfg, "disk remove", "removing its disks", frozenset({"forget"}))
    guest, key = _guest(cfg, params["lock_vmid"]), params["disk"]
    usage.require_named_once(guest, guest.disks[key], key)
    forget = _forget(o, "disk remove")
    if not forget and (gone := _not_there_here(cfg, guest, [guest.disks[key]])):  # the step checks again
        raise usage.not_there(gone, "removed", f"'stork disk remove {guest.vmid} {key} --forget'")
    return params | forget


def _not_there_here(cfg: Config, guest: Guest, volids: list[str]) -> list[str]:
    """Those of `volids` (the guest's) with no volume, where this node sees their storage (a
    storage of the guest's node, or shared); the step decides where it does not, or cannot look."""
    gone = []
    for volid in volids:
        storage, vol = _volume(cfg, volid)
        sc = cfg.storage(storage)
        if sc.shared or (guest.node == cfg.node and sc.on_node(cfg.node)):
            with contextlib.suppress(OSError, StorkError):
                if not driver_for(sc).exists(vol):
                    gone.append(volid)
    return gone


def _forget(o: dict[str, Any], kind: str) -> dict[str, Any]:
    """{"forget": True} where asked: volumes gone already are dropped, not refused."""
    if o.get("forget") not in (None, False, True):
        raise InvalidName(f"{kind}: forget must be true or false, not {o['forget']!r}")
    return {"forget": True} if o.get("forget") else {}


def prepare_assemble(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A new template whose disks are existing base images, attached as they are."""
    _only(o, {"vmid", "name", "disks", "node"}, "template assemble")
    vmid = _new_vmid(cfg, o.get("vmid"))
    node = _node(o, cfg)
    attach, storages = {}, set()
    for key, volid in (o.get("disks") or {}).items():
        storage, _vol = _base_here(cfg, str(volid), node)
        attach[names.disk_key(key)] = str(volid)
        storages.add(storage)
    if not attach:
        raise InvalidName("template assemble: name at least one base image as a disk")
    return {"new_vmid": vmid, "name": _name(o), "node": node, "attach": attach,
            "storages": _check_nodes(cfg, storages, node)}


def prepare_import(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A new guest of copies of image files; with `as_template`, a template of them, each made
    a base (it runs as an `import_template`)."""
    if o.get("as_template") not in (None, False, True):
        raise InvalidName(f"import: as_template must be true or false, not {o['as_template']!r}")
    params = _import({k: v for k, v in o.items() if k != "as_template"}, cfg)
    return {**params, "runs_as": "import_template"} if o.get("as_template") else params


def prepare_import_template(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    return _import(o, cfg)


def _import(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Image files as a new guest's disks: named one by one (`disks`), or the guest an OVA or
    OVF describes (`ova`, `ovf`: its disks in their slots, its name, notes on what stork does
    not use)."""
    notes, described = "", o.get("ova") is not None or o.get("ovf") is not None
    if described:
        o, notes = _from_ovf(o)
    data: dict[str, int] = {}  # bytes of data each target storage is to take

    def plan(spec: dict[str, Any]) -> dict[str, Any]:
        path = Path(spec.get("path", "")).absolute()
        member = spec.get("member")  # a disk in an OVA
        # checked again by the copy, on the same open file
        with qemu.open_import(path, member) as (image, size, src_fmt):
            if spec.get("capacity", size) != size:
                raise InvalidName(f"{image.label}: the OVF says the disk holds {spec['capacity']} bytes, "
                                  f"the image {size}")
            storage = _images_storage(cfg, names.storage_id(spec.get("storage") or "local"))
            data[storage] = data.get(storage, 0) + _data_of(image)
        kept = src_fmt if src_fmt in driver_for(cfg.storage(storage)).formats else None  # else the storage's own
        return {"storage": storage, "source_path": str(path), **({"member": member} if member else {}),
                "size": size, "format": _format(cfg, storage, spec.get("format"), default=kept)}

    # the source files are on this node: every step that reads them runs here
    options = {"path", "storage", "format"} | ({"member", "capacity"} if described else set())
    params = _new_guest(o, cfg, "import", options, plan)
    for storage, needed in data.items():
        _require_room(cfg, storage, params["node"], needed)
    return {**params, "pinned": True, **({"notes": notes} if notes else {})}


def _from_ovf(o: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The options of an import of the guest an OVA (`ova`), or an OVF with its disk files
    beside it (`ovf`), describes, and the notes it leaves."""
    _only(o, {"vmid", "name", "node", "ova", "ovf", "storage", "format"}, "import")
    if o.get("disks") or (o.get("ova") is not None and o.get("ovf") is not None):
        raise InvalidName("import: name disks, an OVA or an OVF, one of them")
    target = {k: o[k] for k in ("storage", "format") if o.get(k)}
    if o.get("ova") is not None:
        path = Path(str(o["ova"])).absolute()
        with qemu.opened_input(path) as fd:
            table = ova.members(fd, str(path))
            descriptors = [m for m in table.values() if m.name.lower().endswith(".ovf")]
            if len(descriptors) != 1:
                raise InvalidName(f"{path}: an OVA holds one .ovf, this one {len(descriptors)}")
            described = ova.parse(ova.read_member(fd, descriptors[0], ova.MAX_OVF, str(path)),
                                  f"{path}:{descriptors[0].name}")
        disks = {d.key: {"path": str(path), "member": d.href, "capacity": d.capacity, **target}
                 for d in described.disks}
    else:
        path = Path(str(o["ovf"])).absolute()
        with qemu.opened_input(path) as fd:
            described = ova.parse(os.pread(fd, ova.MAX_OVF + 1, 0), str(path))
        # each disk a file beside the OVF, named plainly (no folder, no ..): opened as any import is
        disks = {d.key: {"path": str(path.parent / ova.plain_name(d.href, str(path))), "capacity": d.capacity,
                         **target} for d in described.disks}
    chosen = {k: o[k] for k in ("vmid", "node") if k in o}
    return {**chosen, "name": o.get("name") or described.name, "disks": disks}, described.notes


def prepare_import_pve(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A guest adopted from a Proxmox VE config (`config`, read here, where it was named): its
    disks attached where they are, on storages of Proxmox VE's layout, no copy; a template when
    it says `template: 1`; its other keys kept as notes."""
    _only(o, {"config", "vmid", "node"}, "import-pve")
    path = Path(str(o.get("config") or "")).absolute()
    described = pve.read(path, names.vmid(o["vmid"]) if o.get("vmid") is not None else None)
    if described.devices:
        slot, value = next(iter(described.devices.items()))
        raise Refused(f"{path}: {slot} = {value.split(',', 1)[0]} is no volume (a host device or path): stork "
                      "adopts a guest with every disk")
    if lock := described.notes.get("lock"):  # Proxmox VE is at its disks (a migration, a restore, qm template)
        raise Refused(f"{path}: the guest is locked by Proxmox VE ({lock}): adopt it once that has ended")
    vmid = _new_vmid(cfg, described.vmid)
    node = _node(o, cfg)
    storages = _adopting_storages(cfg, node)
    adopted: dict[str, Any] = {"disks": {}, "unused": []}
    for where, volid in [*described.disks.items(), *(("unused", v) for v in described.unused)]:
        ours = _adopted_volid(storages, path, where, volid)
        storage, vol = _volume(cfg, ours)
        if drv := _existing_here(cfg, storage, vol, node):
            drv.identity(vol)  # a link or a folder at the name is no volume: refused now, not once adopted
        if where != "unused" and (mismatch := base_mismatch(vol.is_base, described.template)):
            raise Refused(f"{path}: {where} = {volid} {mismatch}")
        if ours in (*adopted["disks"].values(), *adopted["unused"]):
            raise Refused(f"{path}: {volid} is named twice")
        if where == "unused":
            adopted["unused"].append(ours)
        else:
            adopted["disks"][names.disk_key(where)] = ours
    if not adopted["disks"]:
        raise InvalidName(f"{path}: the guest has no disk on a storage stork adopts")
    notes = pve.notes_text(described.notes)
    # read again at the commit where it runs here: a config changed meanwhile (a qm move-disk) is not adopted stale
    again = {"config": str(path), "config_digest": described.digest} if node == cfg.node else {}
    return {"new_vmid": vmid, "name": _pve_name(described.name), "node": node, "attach": adopted["disks"], **again,
            "attach_unused": adopted["unused"], "template": described.template, **({"notes": notes} if notes else {}),
            "storages": _check_nodes(cfg, {names.volume_id(v).storage for v in [*adopted["disks"].values(),
                                                                                 *adopted["unused"]]}, node)}


def _adopting_storages(cfg: Config, node: str) -> dict[str, str]:
    """Proxmox VE's storage ids -> the storage of stork on `node` that is that storage (a dir
    storage of its layout whose path Proxmox VE's storage.cfg gives that id)."""
    found: dict[str, str] = {}
    for sid, s in sorted(cfg.storages.items()):
        if "images" not in s.content or not s.on_node(node):
            continue
        for theirs in driver_for(s).foreign_ids():
            if theirs in found:
                raise Refused(f"storages {found[theirs]!r} and {sid!r} are both Proxmox VE's {theirs!r} "
                              f"on node {node!r}")
            found[theirs] = sid
    return found


def _adopted_volid(storages: dict[str, str], path: Path, where: str, volid: str) -> str:
    """A Proxmox VE volume id as stork's: its storage the one that adopts it."""
    vid = names.volume_id(volid)
    if vid.storage not in storages:
        raise Refused(f"{path}: {where} = {volid} is on storage {vid.storage!r}, which no storage of stork adopts "
                      "(a dir storage with layout = \"pve\" at the path Proxmox VE's storage.cfg gives it)")
    return f"{storages[vid.storage]}:{vid.volname}"


def _pve_name(name: str) -> str:
    """The guest's name where stork takes it (else none: Proxmox VE allows DNS names with dots)."""
    try:
        return names.image_name(name, "guest name") if name else ""
    except InvalidName:
        return ""


def _data_of(image: qemu.Image) -> int:
    """Bytes of data of an image to import; 0 where qemu-img map cannot tell in time (the
    room is then not checked: the copy itself fails cleanly if it runs out)."""
    try:
        return qemu.data_bytes(image)
    except StorkError:
        return 0


def _require_room(cfg: Config, storage: str, node: str, needed: int) -> None:
    """Refuse a copy of `needed` bytes of data into a storage that has less room, where this
    process sees the storage the job on `node` writes (elsewhere the copy's own ENOSPC says
    so, and its undo frees what it made). The data, not the virtual size: a copy stays sparse."""
    here = cfg.storage(storage)
    if not here.on_node(cfg.node) or not (here.shared or node == cfg.node):
        return
    try:
        available = driver_for(here).status()[2]
    except (StorkError, OSError):
        return  # cannot tell now: the copy itself fails cleanly if it runs out
    if needed > available:
        raise Refused(f"storage {storage!r} has {available >> 20} MiB free: the image(s) to import hold "
                      f"{needed >> 20} MiB of data")


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
    if o.get("storage") and target_node(cfg, {names.storage_id(o["storage"])}, source.node):
        return _onto_replicas(o, cfg, source, newid)
    disks: dict[str, dict[str, Any]] = {}
    for key, volid in source.disks.items():
        storage, vol = _volume(cfg, volid)
        if o.get("storage") and o["storage"] != storage:
            raise Refused(f"a linked clone must be on the storage of its base: {volid} is on {storage!r}, "
                          f"not {o['storage']!r} (use --full, or a storage of another node: a replica is made there)")
        drv = driver_for(cfg.storage(storage))
        if o.get("format") and o["format"] != drv.linked_clone_format:
            raise Refused(f"a linked clone on {storage!r} is {drv.linked_clone_format}, not {o['format']} "
                          "(use --full)")
        drv.require_feature("linked_clone", vol)
        disks[key] = {"source": volid, "storage": storage, "owner": newid}
    storages = _check_nodes(cfg, {d["storage"] for d in disks.values()}, source.node)
    return {"vmid": source.vmid, "new_vmid": newid, "name": _name(o), "node": source.node, "expect_node": source.node,
            "disks": disks, "storages": storages}


def prepare_replica_clone(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A linked clone onto a storage of another node than the template's bases (what
    prepare_linked_clone hands on to)."""
    _only(o, {"vmid", "newid", "name", "storage", "format"}, "linked clone")
    source, newid = _clone_source(cfg, o)
    if not source.template or not o.get("storage"):
        raise Refused("a replica clone is a linked clone of a template onto a storage of another node")
    return _onto_replicas(o, cfg, source, newid)


def replicas_on(guests: list[Guest], storage: str) -> dict[str, tuple[str, dict[str, str]]]:
    """The replicas on `storage` that templates record: base volume id -> (replica volume id, record)."""
    return {r["of"]: (volid, r) for g in guests for volid, r in g.replicas.items()
            if names.volume_id(volid).storage == storage}


def _onto_replicas(o: dict[str, Any], cfg: Config, template: Guest, newid: int) -> dict[str, Any]:
    """A linked clone of `template` on another node's storage S: each disk a linked clone of
    its base's replica on S, the replicas that are missing first copied there (a replica_clone
    job, locking the template meanwhile), else an ordinary linked clone there."""
    target = _images_storage(cfg, names.storage_id(o["storage"]))
    drv = driver_for(cfg.storage(target))
    if o.get("format") and o["format"] != drv.linked_clone_format:
        raise Refused(f"a linked clone on {target!r} is {drv.linked_clone_format}, not {o['format']} (use --full)")
    found = replicas_on([template], target)  # its own: another template's base may have the same id elsewhere
    copies: dict[str, dict[str, Any]] = {}
    links: dict[str, dict[str, Any]] = {}
    for key, volid in template.disks.items():
        storage, vol = _volume(cfg, volid)
        if volid in found:
            replica, record = found[volid]
            here = _existing_here(cfg, storage, vol, template.node)  # the very base, where this node sees it
            if here and here.identity(vol) != record["identity"]:
                raise Refused(f"replica {replica} was made from an earlier volume named {volid}: free it "
                              f"('stork volume free {replica}') and clone again")
            # the very replica made (a volume its name came to hold since is not the template's)
            links[key] = {"storage": target, "replica": replica,
                          **({"base_identity": record["own_identity"]} if "own_identity" in record else {})}
            continue
        fmt = _format(cfg, target, None, vol.fmt)
        drv.require_feature("linked_clone", VolName(None, vol.name, fmt))
        copies[key] = {"source": volid, "storage": target, "owner": template.vmid, "format": fmt, "as_base": True}
        _base_lands(cfg, copies[key], vol)
        links[key] = {"storage": target}
    common = {"vmid": template.vmid, "new_vmid": newid, "name": _name(o)}
    node = target_node(cfg, {target}, template.node)
    if node is None:
        raise Refused(f"storage {target!r} is on node {template.node!r}, where the template's bases are: a linked "
                      "clone there needs no replica")
    if not copies:  # every replica is there: a linked clone on that node like any other
        disks = {key: {"source": link["replica"], "storage": target, "owner": newid,
                       **({"base_identity": link["base_identity"]} if "base_identity" in link else {})}
                 for key, link in links.items()}
        return {**common, "runs_as": "linked_clone", "disks": disks, "node": node,
                "storages": _check_nodes(cfg, {target}, node)}
    return {**common, "runs_as": "replica_clone", "lock_vmid": template.vmid, **as_seen(template),
            "disks": copies, "links": links, **_placed(cfg, copies, template.node)}


def prepare_full_clone(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "newid", "name", "storage", "format"}, "full clone")
    source, newid = _clone_source(cfg, o)
    target = names.storage_id(o["storage"]) if o.get("storage") else None
    disks = {}
    for key, volid in source.disks.items():
        storage, vol = _volume(cfg, volid)
        dest = _images_storage(cfg, target or storage)
        disks[key] = {"source": volid, "storage": dest, "owner": newid,
                      "format": _format(cfg, dest, o.get("format"), default=vol.fmt)}
    return {"vmid": source.vmid, "new_vmid": newid, "name": _name(o),
            "lock_vmid": None if source.template else source.vmid, **as_seen(source),
            "disks": disks, **_placed(cfg, disks, source.node)}


# ---- between nodes -------------------------------------------------------------------


def target_node(cfg: Config, targets: set[str], source_node: str) -> str | None:
    """The node a copy's targets are made on when that is not `source_node` (the copy crosses
    nodes: the source node exports, the target node copies), else None. Refused when no one
    node holds every target storage."""
    if all(cfg.storage(t).on_node(source_node) for t in targets):
        return None
    nodes = [n for n in cfg.known_nodes() if all(cfg.storage(t).on_node(n) for t in targets)]
    if len(nodes) != 1:
        where = f"node(s) {', '.join(nodes)}" if nodes else "no one node"
        raise Refused(f"storage(s) {', '.join(sorted(targets))} are on {where}, not on node {source_node!r} of "
                      "the source: copy to storages of one other node")
    return nodes[0]


def _placed(cfg: Config, disks: dict[str, dict[str, Any]], source_node: str) -> dict[str, Any]:
    """Where a copying job runs: on `source_node`, or, where its targets are on another node,
    between the two (each disk whose source that node cannot read marked `across`)."""
    sources = {names.volume_id(d["source"]).storage for d in disks.values()}
    targets = {d["storage"] for d in disks.values()}
    target = target_node(cfg, targets, source_node)
    if target is None:
        return {"node": source_node, "storages": _check_nodes(cfg, sources | targets, source_node)}
    for plan in disks.values():  # a node-local storage's volume is read on its own node, whatever its name
        plan["across"] = not cfg.storage(names.volume_id(plan["source"]).storage).shared
    return {"node": target, **_between(cfg, disks, source_node, target)}


def _between(cfg: Config, disks: dict[str, dict[str, Any]], source_node: str, target: str) -> dict[str, Any]:
    """The params of a job between two nodes: its sources on `source_node`, the cluster key
    there to copy any of them."""
    sources = {names.volume_id(d["source"]).storage for d in disks.values()}
    if disks and cfg.cluster_key is None:
        raise Refused(transfer.NO_KEY)
    _check_nodes(cfg, sources, source_node)
    return {"source_node": source_node, "target_node": target,
            "storages": sorted(sources | {d["storage"] for d in disks.values()})}


def _source_node(cfg: Config, storage: str, node: str) -> str:
    """The node to read a volume of `storage` on: `node` where it can, else the storage's one node."""
    config = cfg.storage(storage)
    if config.on_node(node):
        return node
    if len(config.nodes) != 1:
        raise Refused(f"storage {storage!r} is local to node(s) {', '.join(config.nodes)}: name the node "
                      "to read it on with --node")
    return config.nodes[0]


def _storage_map(o: dict[str, Any]) -> dict[str, str]:
    """--storage-map OLD=NEW,...: where each storage's disks go."""
    text = o.get("storage_map") or ""
    if not isinstance(text, str):
        raise InvalidName(f"invalid storage map {text!r}: expected OLD=NEW,...")
    mapping = {}
    for pair in filter(None, text.split(",")):
        old, sep, new = pair.partition("=")
        if not sep:
            raise InvalidName(f"invalid storage map entry {pair!r}: expected OLD=NEW")
        if (source := names.storage_id(old.strip())) in mapping:  # the last would win, without a word
            raise InvalidName(f"invalid storage map {text!r}: {source} is mapped twice")
        mapping[source] = names.storage_id(new.strip())
    return mapping


def prepare_migrate(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A guest to another node: each disk on a node-local storage copied to a storage of that
    node (--storage, else --storage-map's, else one of the same name), verified, then the
    guest moved there at one commit and the originals freed (kept with --keep-source)."""
    _only(o, {"vmid", "node", "storage", "storage_map", "keep_source"}, "migrate")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_unlocked()
    target = names.node(o.get("node") or "")
    if target == guest.node:
        raise Refused(f"guest {guest.vmid} is on node {target!r} already")
    if target not in cfg.known_nodes():
        raise NotFound(f"unknown node {target!r} (known: {', '.join(cfg.known_nodes())})")
    if o.get("storage") and o.get("storage_map"):
        raise InvalidName("migrate: give --storage or --storage-map, not both")
    mapping = _storage_map(o)
    if unused := [v for v in guest.unused if not cfg.storage(names.volume_id(v).storage).shared]:
        raise Refused(f"guest {guest.vmid} keeps unused volumes on node {guest.node}: {', '.join(unused)} "
                      "(free them with 'stork volume free', or attach them, first)")
    disks: dict[str, dict[str, Any]] = {}
    for key, volid in guest.disks.items():
        storage, vol = _volume(cfg, volid)
        if cfg.storage(storage).shared:
            continue  # seen from every node: it stays
        if vol.owner is not None and vol.owner != guest.vmid:
            raise Refused(f"guest {guest.vmid}'s disk {key} is {volid}, which belongs to guest {vol.owner}")
        if (drv := _existing_here(cfg, storage, vol, guest.node)) and drv.parent_of(vol) is not None:
            raise Refused(f"guest {guest.vmid}'s disk {key} ({volid}) is a linked clone of "
                          f"{drv.volid(drv.parent_of(vol))}, a base on node {guest.node}: it cannot move without it "
                          "(clone it with --full first)")
        dest = names.storage_id(o["storage"]) if o.get("storage") else mapping.get(storage, storage)
        dest = _images_storage(cfg, dest)
        if not cfg.storage(dest).on_node(target):
            raise Refused(f"storage {dest!r} does not exist on node {target!r} (map {storage} to one that does with "
                          f"--storage-map {storage}=STORAGE)")
        if drv:  # checked again on its node, by the export
            _refuse_foreign_users(drv, vol, volid)
        disks[key] = {"source": volid, "storage": dest, "owner": guest.vmid,
                      "format": _format(cfg, dest, None, vol.fmt), "across": True, "moves": True,
                      **({"as_base": True} if vol.is_base else {})}
        if vol.is_base:
            _base_lands(cfg, disks[key], vol)
    return {"lock_vmid": guest.vmid, **as_seen(guest), "disks": disks,
            "node": guest.node, "delete_source": not _flag(o, "keep_source"),
            **_between(cfg, disks, guest.node, target)}


def prepare_template_copy(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A new template of full copies of a template's bases, made bases on the target storage."""
    source = _guest(cfg, o.get("vmid"))
    if not source.template:
        raise Refused(f"guest {source.vmid} is not a template (copy a guest with 'stork clone --full')")
    return prepare_full_clone(o, cfg)


def _owner_of(cfg: Config, volid: str) -> Guest | None:
    """The guest that attaches the volume or keeps it as unused (fails closed: ConfigError
    naming a broken guest config, which might be the owner)."""
    return next((g for g in _store(cfg).candidates(volid) if volid in (*g.disks.values(), *g.unused)), None)


def prepare_base(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "name", "node"}, "base")
    volid = str(o.get("volid"))
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("make_base", vol)
    name = names.volume_stem(o["name"], "base name") if o.get("name") else None
    if name:
        driver_for(cfg.storage(storage)).named_base(vol, name)  # a name the storage cannot give: refused now
    owner = _owner_of(cfg, volid)
    node = owner.node if owner else _node(o, cfg)
    _existing_here(cfg, storage, vol, node)
    # a guest that runs from the disk keeps running: its slot gets a writable linked clone of the
    # new base (a template's disks are bases already; an unused volume has no slot)
    link: dict[str, str] = {}
    if owner and not owner.template:
        link = {slot: "disk" for slot, v in owner.disks.items() if v == volid}
        if len(link) > 1:  # one clone for two slots would diverge from the volume they shared
            raise Refused(f"guest {owner.vmid} attaches {volid} twice ({', '.join(link)}): detach one first")
        if link and not driver_for(cfg.storage(storage)).has_feature("linked_clone", VolName(None, vol.name, vol.fmt)):
            raise Refused(f"guest {owner.vmid} runs from {volid}, and storage {storage!r} cannot give it a linked "
                          f"clone of a base to run from: make the guest a template ('stork template {owner.vmid}'), "
                          "or detach the disk first")
    return {"lock_vmid": owner.vmid if owner else None, "refuse_template": "converting its disks",
            **as_seen(owner),
            "bases": {"disk": {"source": volid, "name": name}}, "link_owner": link, "node": node,
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
            **as_seen(guest), "bases": bases, "node": guest.node,
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
    disk = {"source": volid, "storage": dest, "owner": owner, "format": _format(cfg, dest, o.get("format"), vol.fmt)}
    disks = {"copy": disk}
    return {"disks": disks, **_placed(cfg, disks, _source_node(cfg, storage, _node(o, cfg)))}


def prepare_move(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid", "disk", "storage", "format", "delete_source"}, "move")
    guest = _guest(cfg, o.get("vmid"))
    key = names.disk_key(o.get("disk", ""))
    if key not in guest.disks:
        raise NotFound(f"guest {guest.vmid} has no disk {key} (disks: {', '.join(guest.disks) or 'none'})")
    guest.require_unlocked()
    volid = guest.disks[key]
    storage, vol = _volume(cfg, volid)
    drv = driver_for(cfg.storage(storage))
    drv.require_feature("move", vol)
    if vol.is_base and _existing_here(cfg, storage, vol, guest.node):
        _require_no_clones(drv, vol)  # checked again by the step, on the storage's node
    dest = _images_storage(cfg, names.storage_id(o.get("storage") or ""))
    fmt = _format(cfg, dest, o.get("format"), vol.fmt)
    if dest == storage and fmt == vol.fmt:
        raise Refused(f"{volid} is already on {dest!r} as {fmt}")
    if target_node(cfg, {dest}, guest.node) is not None:
        raise Refused(f"storage {dest!r} is not on node {guest.node!r}, where guest {guest.vmid} is: a guest's disks "
                      f"stay on its node (move the guest with 'stork guest migrate {guest.vmid} NODE')")
    if _existing_here(cfg, storage, vol, guest.node):  # checked again on its node, before the copy
        _refuse_foreign_users(drv, vol, volid)
    plan = {"source": volid, "storage": dest, "owner": guest.vmid, "format": fmt, "moves": True}
    if vol.is_base:
        plan["as_base"] = True  # the verified copy becomes a base on the target
        _base_lands(cfg, plan, vol)
    return {"lock_vmid": guest.vmid, **as_seen(guest), "disks": {key: plan},
            "delete_source": _flag(o, "delete_source"), "node": guest.node,
            "storages": _check_nodes(cfg, {storage, dest}, guest.node)}


def _refuse_foreign_users(drv: Driver, vol: VolName, volid: str) -> None:
    """A volume another manager's guest names (Proxmox VE's) is not moved: that guest goes on
    writing the original, and the copy would miss what it writes."""
    if found := drv.foreign_users(vol):
        raise Refused(f"{volid} is in use by {', '.join(found)}: not moved (its writes would miss the copy)")


def _base_lands(cfg: Config, plan: dict[str, Any], base: VolName) -> None:
    """Refuse now a base whose copy cannot be a base of its name on the target (a base named
    other than base-<vmid>-... onto a storage of Proxmox VE's layout), not after the copy."""
    owner = plan["owner"]
    copy = VolName(owner, f"vm-{owner}-disk-0", plan["format"])
    driver_for(cfg.storage(plan["storage"])).named_base(copy, base.name)


def _require_no_clones(drv: Driver, base: VolName) -> None:
    """A base that linked clones read through cannot move: their backing paths name it."""
    if readers := drv.readers_of(base):
        raise Refused(f"{drv.volid(base)} is a base with {len(readers)} linked clone(s), which read through it where "
                      f"it is: {', '.join(readers)} (move or destroy them first)")


def _existing_here(cfg: Config, storage: str, vol: VolName, node: str) -> Driver | None:
    """The volume's driver once the volume is known to exist, where this process sees the
    storage the job on `node` uses (_here). Elsewhere None: the step checks, on its node."""
    if (drv := _here(cfg, storage, node)) is not None:
        drv.require_existing(vol)
    return drv


def _here(cfg: Config, storage: str, node: str) -> Driver | None:
    """The storage's driver where this process sees the storage the job on `node` uses: a
    shared one, or a node-local one when this node is `node` (another node's storage of the
    same name holds other volumes); else None."""
    here = cfg.storage(storage)
    if not here.on_node(cfg.node) or not (here.shared or node == cfg.node):
        return None
    return driver_for(here)


def prepare_free(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A volume to free; with `forget`, one gone already (removed by hand, say) that guests
    still list as unused or as a replica: they drop it."""
    _only(o, {"volid", "node", "forget"}, "free")
    volid, forget = str(o.get("volid")), bool(_forget(o, "free"))
    storage, vol = _volume(cfg, volid)
    node = _source_node(cfg, storage, _node(o, cfg))
    # refused before a job exists; the step checks again, under the storage lock, with live jobs too
    try:
        guests = _store(cfg).candidates(volid)
    except ConfigError as e:  # a config that cannot be read might attach it: fail closed
        raise Refused(f"cannot tell whether {volid} is in use: {e}") from None
    if users := [f"guest {g.vmid} ({key})" for g in guests for key, v in g.disks.items() if v == volid]:
        raise Refused(f"{volid} is in use by {', '.join(users)}")
    shared = cfg.storage(storage).shared  # else each node has its own volume of that id
    listing = [g.vmid for g in guests if {"unused", "replica"} & set(usage.named_here(g, volid, node, shared))]
    if forget and not listing:
        raise NotFound(f"unknown volume {volid}: no guest of node {node} lists it")
    if (drv := _here(cfg, storage, node)) is not None:
        drv.status()  # an unmounted storage has no volume to show: it is refused, not taken for gone
        exists = drv.exists(vol)
        stale = usage.stale_replica_records(guests, volid, node, shared, drv.identity(vol)) if exists else []
        if forget and exists and not stale:
            raise Refused(f"{volid} exists: free it (--forget is for a volume gone already)")
        if not forget and stale:
            raise Refused(usage.not_the_replica(volid, stale[0]))
        if not forget and not exists:
            raise NotFound(f"unknown volume {volid}" + (
                f" (guest {', '.join(map(str, listing))} still lists it: 'stork volume free --forget {volid}' "
                "drops it)" if listing else ""))
    return {"volid": volid, "node": node, "storages": _check_nodes(cfg, {storage}, node),
            **({"forget": True} if forget else {})}


def prepare_destroy(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A guest and its disks; a template's replicas too (on one other node at most: the job's
    target side), refused while one has linked clones (checked there, by check_replicas)."""
    _only(o, {"vmid", "forget"}, "destroy")
    guest = _guest(cfg, o.get("vmid"))
    guest.require_unlocked()
    used = {names.volume_id(v).storage for v in [*guest.disks.values(), *guest.unused]}
    for volid in [*guest.disks.values(), *guest.unused]:  # before a job exists, where this node sees that storage
        storage, vol = _volume(cfg, volid)
        here = cfg.storage(storage).shared or (guest.node == cfg.node and cfg.storage(storage).on_node(cfg.node))
        if vol.is_base and here:
            try:
                usage.require_base_unread(driver_for(cfg.storage(storage)), vol, guest.vmid)
            except OSError:  # this process cannot look: the step, which decides under the lock, will
                continue
    forget = _forget(o, "destroy")
    volumes = [v for v in [*guest.disks.values(), *guest.unused] if not _volume(cfg, v)[1].is_base]  # bases: the
    if not forget and (gone := _not_there_here(cfg, guest, volumes)):  # step decides (another template may keep one)
        raise usage.not_there(gone, f"destroyed (guest {guest.vmid})", f"'stork guest destroy {guest.vmid} --forget'")
    params = {"lock_vmid": guest.vmid, "node": guest.node, **as_seen(guest),
              "storages": _check_nodes(cfg, used, guest.node), **forget}
    nodes = sorted({r["node"] for r in guest.replicas.values()})
    if len(nodes) > 1:
        listed = ", ".join(f"{v} (node {r['node']})" for v, r in sorted(guest.replicas.items()))
        raise Refused(f"guest {guest.vmid} has replicas on {len(nodes)} nodes: {listed} (free those of all but one "
                      "node with 'stork volume free VOLID' first)")
    if nodes:
        replica_storages = {names.volume_id(v).storage for v in guest.replicas}
        params |= {"source_node": guest.node, "target_node": nodes[0],
                   "storages": sorted({*params["storages"], *replica_storages})}
    return params


def prepare_ping(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"node"}, "ping")
    node = _node(o, cfg)
    return {"node": node, "storages": [], "pinned": True}  # its storage step runs on the node


def prepare_resize(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"volid", "size", "node"}, "resize")
    volid = str(o.get("volid"))
    storage, vol = _volume(cfg, volid)
    driver_for(cfg.storage(storage)).require_feature("resize", vol)
    size = names.size(o.get("size", ""))
    owner = _owner_of(cfg, volid)
    node = owner.node if owner else _node(o, cfg)
    if (drv := _existing_here(cfg, storage, vol, node)) and drv.virtual_size(vol) > size:
        raise Refused(f"{volid}: shrinking is not supported (would lose data)")
    return {"volid": volid, "size": size, "node": node,
            "lock_vmid": owner.vmid if owner else None, "refuse_template": "writing its disks",
            **as_seen(owner),
            "storages": _check_nodes(cfg, {storage}, node)}


def prepare_unlock(o: dict[str, Any], cfg: Config) -> dict[str, Any]:
    _only(o, {"vmid"}, "unlock")
    guest = _guest(cfg, o.get("vmid"))
    if not guest.lock:
        raise Refused(f"guest {guest.vmid} is not locked")
    return {"vmid": guest.vmid, "node": guest.node, "storages": []}
