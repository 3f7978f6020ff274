"""`stork`: the command line. Every change is a job: by default the command waits and shows
progress; --no-wait prints the job id, --json prints machine-readable output. Exit status:
0 success, 1 refused or failed, 2 bad usage, 130 interrupted (the job goes on)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from drivers.errors import StorkError

TYPE_CHECKING = False  # as typing's, whose import is a tenth of `stork --help`; type checkers take it as true
if TYPE_CHECKING:
    from typing import Any

    from producer.client import Client  # imported for real in main(), once the config is known to load
    from worker.records import JobRecord

# What a command needs beyond argparse (json, logging, datetime, the name checks, the retention
# periods) is imported where it is used: `stork --help` and a usage mistake start without it.

Handler = Callable[[argparse.Namespace, "Client"], int]


class UsageError(StorkError):
    """The command line itself is wrong (exit status 2, like argparse's own errors)."""


def _views() -> Any:
    """producer.views, imported once the config is known to load (it imports the client)."""
    from producer import views

    return views


def _emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    """`data` as JSON with --json, else the text for people (made only then: a table of
    10,000 rows is not free)."""
    import json

    print(json.dumps(data, indent=2, default=str) if args.json else text() if callable(text) else text)


def _record_dict(job: JobRecord) -> dict[str, Any]:
    data = job.as_dict()
    data["state"] = str(job.state)
    return data


def _job_line(job: JobRecord) -> str:
    line = f"job {job.id} {job.kind}: {job.state}"
    if job.error:
        line += f": {job.error}"
    if job.undo_errors:
        line += f" (not undone: {'; '.join(job.undo_errors)})"
    return line


def _result_text(job: JobRecord) -> str:
    from producer import results

    return "\n".join([_job_line(job), *results.render(job.result)])


def submit_and_wait(args: argparse.Namespace, client: Client, kind: str, collect: list[Any] | None = None,
                    **options: Any) -> int:
    """Submit a job and wait for it (not with --no-wait), saying how it ended; with `collect`
    and --json, its JSON goes there, for one document of several jobs."""
    from producer.progress import ProgressView

    def emit(data: Any, text: str | Callable[[], str]) -> None:
        if collect is not None and args.json:
            collect.append(data)
        else:
            _emit(args, data, text)

    options = {k: v for k, v in options.items() if v is not None}
    job = client.submit(kind, **options)
    if args.no_wait:
        emit({"job": job.id}, job.id)
        return 0
    try:
        job = client.wait(job.id, on_event=None if args.json else ProgressView())
    except KeyboardInterrupt:
        print(f"\nstork: stopped waiting; job {job.id} goes on (stork job watch {job.id})", file=sys.stderr)
        return 130
    if str(job.state) == "succeeded" or args.json:
        emit(_record_dict(job), lambda: _result_text(job))
    if str(job.state) == "succeeded":
        return 0
    from producer import results, views

    stands = results.split_undone(job.result, not views.undone(job))[0]
    if not args.json and (found := results.render(stands)):  # e.g. each backup a verify read
        print("\n".join(found))
    print(f"stork: {_job_line(job)}", file=sys.stderr)  # the one line saying what went wrong
    return 1


# ---- argument parsing helpers --------------------------------------------------------


def _seconds(text: str) -> float:
    """A positive number of seconds, for argparse (its error names the option and the value)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected seconds, above 0 and at most 3600")
    return value


def _whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (its error names the option and the value)."""
    def parse(text: str) -> int:
        try:
            value: int | None = int(text) if len(text) < 20 else None
        except ValueError:  # not digits (and '²', which isdigit() takes for one)
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what} from {low} to {high}")
        return value
    return parse


def _given(what: str) -> Callable[[str], str]:
    """An argparse type: a value that is not empty (an empty one, an unset variable in a script,
    would quietly mean the default: another cluster's config, every interface)."""
    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"invalid value '': expected {what}")
        return text
    return parse


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"invalid option {item!r}: expected key=value")
        if key in out:  # the last would win, without a word
            raise UsageError(f"invalid option {text!r}: {key} is given twice")
        out[key] = value
    return out


def _import_source(a: argparse.Namespace) -> dict[str, Any]:
    """`--disk` image files, or one `--ova` or `--ovf` (with the storage and format of all its disks)."""
    if [bool(a.disk), bool(a.ova), bool(a.ovf)].count(True) != 1:
        raise UsageError("guest import: give --disk DISK=PATH (one or more), --ova FILE or --ovf FILE: one of them")
    if a.disk:
        if a.storage or a.format:
            raise UsageError("guest import: --storage and --format go with --ova or --ovf; with --disk: "
                             "DISK=PATH,storage=S")
        return {"disks": _disk_specs(a.disk, "path")}
    source = {"ova": a.ova} if a.ova else {"ovf": a.ovf}
    return {**source, **({"storage": a.storage} if a.storage else {}), **({"format": a.format} if a.format else {})}


def _disk_specs(values: list[str], first: str) -> dict[str, dict[str, str]]:
    """`scsi0=local:8G,format=qcow2` -> {"scsi0": {"storage": "local", "size": "8G", ...}}."""
    disks = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not rest:
            raise UsageError(f"invalid --disk {value!r}: expected DISK={first.upper()}[,key=value...]")
        head, *more = rest.split(",")
        if not head:  # an empty path would be the working directory
            raise UsageError(f"invalid --disk {value!r}: expected DISK={first.upper()}[,key=value...]")
        spec = _pairs(",".join(more)) if more else {}
        if first == "storage:size":
            storage, colon, size = head.partition(":")
            if not colon:
                raise UsageError(f"invalid --disk {value!r}: expected DISK=STORAGE:SIZE[,format=F] or DISK=BASE")
            # a volume name (base/<name>.<fmt>) where a size would be: a disk from that base image
            given = {"base": head} if "/" in size else {"storage": storage, "size": size}
        else:
            given = {"path": head}
        if twice := sorted(set(given) & set(spec)):  # the head's would win, without a word
            raise UsageError(f"invalid --disk {value!r}: {twice[0]} is given by DISK={first.upper()} already")
        spec |= given
        if key in disks:
            raise UsageError(f"disk {key} is given twice")
        from drivers import names

        _usage(names.disk_key, key)  # a typo in a slot or a size is the command line's: exit 2
        if "size" in spec:
            _usage(names.size, spec["size"])
        disks[key] = spec
    if not disks:
        raise UsageError("at least one --disk is needed")
    return disks


# ---- commands --------------------------------------------------------------------------


def cmd_storage_list(args: argparse.Namespace, client: Client) -> int:
    found = client.storages()
    rows = [{"id": s.id, "type": s.type, **{k: str(v) for k, v in s.options.items()}, "content": list(s.content),
             "shared": s.shared, "nodes": list(s.nodes) or "all"} for s in found]
    _emit(args, rows, lambda: _views().storages(found))
    return 0


def cmd_storage_status(args: argparse.Namespace, client: Client) -> int:
    rows = client.storage_status()
    _emit(args, rows, lambda: _views().storage_status(rows))
    return 0


def cmd_ping(args: argparse.Namespace, client: Client) -> int:
    answers = client.ping(args.node, args.timeout)
    _emit(args, answers, lambda: _views().pings(answers))
    if silent := [a["node"] for a in answers if not a["ok"]]:
        print(f"stork: no answer from {len(silent)} of {len(answers)} node(s): {', '.join(silent)}", file=sys.stderr)
        return 1
    return 0


def cmd_volume_list(args: argparse.Namespace, client: Client) -> int:
    vols = client.volumes(args.storage)
    _emit(args, [v.as_dict() for v in vols], lambda: _views().volumes(vols))
    return 0


def cmd_volume_info(args: argparse.Namespace, client: Client) -> int:
    v = client.volume(args.volid)
    _emit(args, v.as_dict(), lambda: _views().volume(v))
    return 0


def _guest_dict(g: Any) -> dict[str, Any]:
    return {"vmid": g.vmid, "name": g.name, "node": g.node, "template": g.template, "lock": g.lock,
            "disks": g.disks, "unused": list(g.unused), "replicas": g.replicas, "notes": g.notes}


def cmd_template_replicas(args: argparse.Namespace, client: Client) -> int:
    g = client.guest(args.vmid)
    rows = [{"replica": volid, **replica} for volid, replica in sorted(g.replicas.items())]
    _emit(args, rows, lambda: _views().replicas(rows))
    return 0


def cmd_guest_list(args: argparse.Namespace, client: Client) -> int:
    # scan(), not list(): a broken config is shown as a row instead of hiding every guest
    guests, broken = client.guest_store.scan()
    data = [_guest_dict(g) for g in guests] + [
        {"vmid": int(f.stem) if f.stem.isdigit() and f.stem == str(int(f.stem)) else f.stem, "broken": why}
        for f, why in broken]
    _emit(args, data, lambda: _views().guests(guests, broken))
    return 0


def cmd_guest_show(args: argparse.Namespace, client: Client) -> int:
    g = client.guest(args.vmid)
    _emit(args, _guest_dict(g), lambda: _views().guest(g))
    return 0


def _since(text: str | None) -> float | None:
    """`--since` as an ISO date or time, or a duration ago: 30m, 2h, 3d."""
    if not text:
        return None
    import datetime
    import time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[:-1].isdigit() and text[-1] in units:
            return time.time() - int(text[:-1]) * units[text[-1]]
        return datetime.datetime.fromisoformat(text).astimezone().timestamp()
    except (ValueError, OverflowError, OSError):  # an age of 300 digits; a year 1 before the epoch's range
        raise UsageError(f"invalid --since {text!r}: expected an ISO date or time, or 30m, 2h, 3d") from None


def cmd_job_list(args: argparse.Namespace, client: Client) -> int:
    vmid = _vmid(args.vmid) if args.vmid else None
    jobs = client.jobs(args.limit, state=args.state, kind=args.kind, vmid=vmid, since=_since(args.since))
    # no job of that kind: a kind there is none of? (else an empty list, as if none had run; the kinds are only
    # imported then)
    if args.kind and not jobs and args.kind not in (kinds := client.kinds()):
        raise UsageError(f"unknown job kind {args.kind!r} (known: {', '.join(sorted(kinds))})")
    _emit(args, [_record_dict(j) for j in jobs], lambda: _views().jobs(jobs))
    return 0


def cmd_job_show(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.id)
    _emit(args, _record_dict(job), lambda: _views().job(job, client.step_times(job.id)))
    return 0


def cmd_job_watch(args: argparse.Namespace, client: Client) -> int:
    import json

    from producer.progress import ProgressView

    view = ProgressView()
    for event in client.events(args.id):
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            view(event)
    job = client.job(args.id)
    if not args.json:
        print(_result_text(job))
    return 0 if str(job.state) == "succeeded" else 1


def _dead_line(dead: dict[str, Any]) -> str:
    import json
    import time

    when = dead.get("time")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if isinstance(when, int | float) else "-"
    raw = json.dumps(str(dead.get("raw", ""))[:120], ensure_ascii=False)  # quoted: control characters escaped
    return f"{stamp}  {dead.get('queue') or '-':<12}  {dead.get('reason')}  raw: {raw}"


def cmd_job_dead(args: argparse.Namespace, client: Client) -> int:
    found = client.dead_letters(args.limit)
    _emit(args, found, "\n".join(_dead_line(d) for d in found) or "no dead letters")
    return 0


def cmd_job_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.id)
    _emit(args, {"job": job.id, "cancel": "requested"}, f"job {job.id}: cancel requested")
    return 0


def cmd_job_abandon(args: argparse.Namespace, client: Client) -> int:
    job = client.abandon(args.id, args.node)
    # steps past its commit, or undos; or steps any node runs, taken out of that node's queue
    note = job.result.get("not_run") or (job.undo_errors[-1] if job.undo_errors else
                                         f"its steps left were sent again, out of node {args.node}'s queue")
    _emit(args, {"job": job.id, "state": str(job.state), "undo_errors": job.undo_errors, "note": note},
          f"job {job.id}: {job.state}; {note}")
    return 0


def cmd_backup_run(args: argparse.Namespace, client: Client) -> int:
    """One backup job per guest, one after another: a guest that is refused or fails does
    not stop the others' backups."""
    if args.all == bool(args.vmids):
        raise UsageError("name the guests to back up, or give --all")
    if args.exclude and not args.all:
        raise UsageError("--exclude goes with --all")
    excluded = {_vmid(v) for v in (args.exclude or "").split(",") if v}
    vmids = sorted(g.vmid for g in client.guests() if g.vmid not in excluded) if args.all else \
        [_vmid(v) for v in args.vmids]
    if not vmids:
        raise UsageError("no guest to back up")
    if len(set(vmids)) < len(vmids):
        raise UsageError(f"guest {next(v for v in vmids if vmids.count(v) > 1)} is named twice")
    status, collected = 0, ([] if args.json and len(vmids) > 1 else None)  # --json: one list, a job each
    for vmid in vmids:
        try:
            status = max(status, submit_and_wait(args, client, "backup", collected, vmid=vmid, storage=args.storage,
                                                 notes=args.notes))
        except StorkError as e:  # refused at submit: said, and the next guest is backed up all the same
            if len(vmids) == 1:
                raise
            print(f"stork: guest {vmid}: {e}", file=sys.stderr)
            if collected is not None:
                collected.append({"vmid": vmid, "error": str(e)})
            status = 1
    if collected is not None:
        _emit(args, collected, "")
    return status


def cmd_backup_list(args: argparse.Namespace, client: Client) -> int:
    found, unreadable = client.backup_listing(args.storage, _vmid(args.vmid) if args.vmid else None)
    for sid, error in unreadable.items():  # the others are listed all the same
        print(f"stork: warning: backup storage {sid!r} not listed: {error}", file=sys.stderr)
    _emit(args, [_backup_dict(sid, s) for sid, s in found], lambda: _views().backups(found))
    return 0


def _backup_dict(sid: str, s: Any) -> dict[str, Any]:
    from drivers.backup.records import Damaged

    if isinstance(s, Damaged):
        return {"id": str(s.id), "storage": sid, "vmid": s.id.vmid, "time": s.id.time_text, "damaged": s.reason}
    verify = s.state.verify.to_doc() if s.state.verify else None
    return {"id": str(s.id), "storage": sid, "vmid": s.id.vmid, "time": s.id.time_text, "size": s.manifest.size,
            "written": s.manifest.written, "protected": s.state.protected, "verify": verify, "notes": s.state.notes,
            "disks": {k: vars(d) for k, d in s.manifest.disks.items()}}


def cmd_backup_show(args: argparse.Namespace, client: Client) -> int:
    sid, snap = client.backup(args.id)
    _emit(args, _backup_dict(sid, snap), lambda: _views().backup(sid, snap))
    return 0


def cmd_backup_protect(args: argparse.Namespace, client: Client) -> int:
    protected = args.action == "protect"
    client.protect_backup(args.id, protected)
    _emit(args, {"id": args.id, "protected": protected}, f"backup {args.id}: {'' if protected else 'un'}protected")
    return 0


def cmd_backup_forget(args: argparse.Namespace, client: Client) -> int:
    reason = client.forget_backup(args.id, damaged=args.damaged)
    if reason:  # whatever its state said, protected or not, it is gone: say so where a person reads
        print(f"stork: warning: backup {args.id} could not be read ({reason}); forgotten whether or not it "
              "was protected", file=sys.stderr)
    _emit(args, {"id": args.id, "forgotten": True, **({"damaged": reason} if reason else {})},
          f"backup {args.id}: forgotten (its chunks go at the next gc)")
    return 0


def cmd_backup_serve(args: argparse.Namespace, client: Client) -> int:
    """Serve one disk of a backup read-only over NBD until Ctrl-C (or SIGTERM)."""
    import signal

    export = client.serve_backup(args.id, args.disk, args.address, args.port)
    signal.signal(signal.SIGTERM, lambda *_: export.stop())  # before the URL is out: whoever read it may stop us
    host, port = export.listener.getsockname()[:2]
    url = f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{args.disk}"
    _emit(args, {"url": url, "size": export.reader.size}, url)  # what a script reads, on stdout
    sys.stdout.flush()
    print(f"stork: serving backup {args.id} disk {args.disk} read-only at {url}; Ctrl-C stops", file=sys.stderr,
          flush=True)
    try:
        export.serve()
    except KeyboardInterrupt:  # Ctrl-C is how a serve ends
        pass
    finally:
        export.stop()
    return 0


def cmd_backup_key(args: argparse.Namespace, client: Client) -> int:
    from pathlib import Path

    from drivers.backup.crypt import create_key

    path = Path(args.file).absolute()
    fingerprint = create_key(path)
    _emit(args, {"file": str(path), "fingerprint": fingerprint},
          f"key file {path} made (mode 0600), fingerprint {fingerprint}: keep a copy apart from the backups, "
          "they cannot be read without it")
    return 0


def cmd_redis_users(args: argparse.Namespace, client: Client) -> int:
    from worker import acl

    lines = acl.user_lines(client.cfg.redis)
    _emit(args, {"acl": lines}, "\n".join(lines))
    return 0


def cmd_cluster_key(args: argparse.Namespace, client: Client) -> int:
    from pathlib import Path

    from drivers.transfer import make_key

    path = Path(args.file).absolute()
    try:
        make_key(path)
    except FileExistsError:
        raise StorkError(f"{path} exists already: a new key would lock out the nodes that hold the old one") from None
    except OSError as e:
        raise StorkError(f"{path}: cannot be written: {e.strerror}") from None
    _emit(args, {"file": str(path)}, f"cluster key {path} made (mode 0600): copy it to every node, name it in "
          "[cluster] tls_psk_file")
    return 0


def cmd_verify(args: argparse.Namespace, client: Client) -> int:
    if args.all == bool(args.id):
        raise UsageError("name a backup to verify, or give --all")
    if args.reverify_after is not None and not args.all:
        raise UsageError("--reverify-after goes with --all")
    return submit_and_wait(args, client, "verify", backup=args.id, storage=args.storage,
                           reverify_after=args.reverify_after)


def _keep(args: argparse.Namespace) -> dict[str, int]:
    """The retention the --keep-PERIOD options give (`stork prune`, `backup sync`)."""
    from drivers.backup.retention import OPTIONS

    return {f"keep-{period}": n for period in OPTIONS if (n := getattr(args, f"keep_{period}")) is not None}


def cmd_prune(args: argparse.Namespace, client: Client) -> int:
    keep = _keep(args)
    if not args.dry_run or args.json or args.no_wait:
        return submit_and_wait(args, client, "prune", storage=args.storage, vmid=args.vmid, keep=keep,
                               dry_run=args.dry_run)
    job = client.run("prune", storage=args.storage, vmid=args.vmid, keep=keep, dry_run=True)
    if str(job.state) != "succeeded":
        print(f"stork: {_job_line(job)}", file=sys.stderr)
        return 1
    print(_views().prune_plan(job.result["decisions"]))
    return 0




def cmd_backup_sync(args: argparse.Namespace, client: Client) -> int:
    return submit_and_wait(args, client, "sync", source=args.source, target=args.target,
                           vmids=[_vmid(v) for v in args.vmids], keep=_keep(args), node=args.node,
                           reencrypt=args.reencrypt)


def cmd_schedule_list(args: argparse.Namespace, client: Client) -> int:
    rows = client.schedules()
    _emit(args, rows, lambda: _views().schedules(rows))
    return 0


SUBMITTERS: dict[str, Callable[[argparse.Namespace], tuple[str, dict[str, Any]]]] = {
    "guest.create": lambda a: ("create", {"vmid": a.vmid, "name": a.name,
                                          "disks": _disk_specs(a.disk, "storage:size")}),
    "guest.import": lambda a: ("import", {"vmid": a.vmid, "name": a.name, **_import_source(a),
                                          **({"as_template": True} if a.as_template else {})}),
    "guest.import-pve": lambda a: ("import_pve", {"config": a.guest_config, "vmid": a.vmid}),
    "guest.destroy": lambda a: ("destroy", {"vmid": a.vmid, **({"forget": True} if a.forget else {})}),
    "guest.unlock": lambda a: ("unlock", {"vmid": a.vmid}),
    "guest.migrate": lambda a: ("migrate", {"vmid": a.vmid, "node": a.node, "storage": a.storage,
                                            "storage_map": a.storage_map, "keep_source": a.keep_source}),
    "base": lambda a: ("base", {"volid": a.volid, "name": a.name}),
    "template": lambda a: ("template", {"vmid": a.vmid}),
    "template.assemble": lambda a: ("assemble", {"vmid": a.vmid, "name": a.name, "disks": _bases(a.disk)}),
    "template.copy": lambda a: ("template_copy", {"vmid": a.vmid, "newid": a.newid, "name": a.name,
                                                  "storage": a.storage, "format": a.format}),
    "disk.add": lambda a: ("add_disk", {"vmid": a.vmid, "disks": _disk_specs(a.specs, "storage:size")}),
    "disk.detach": lambda a: ("detach", {"vmid": a.vmid, "disk": a.disk}),
    "disk.remove": lambda a: ("remove_disk",
                              {"vmid": a.vmid, "disk": a.disk, **({"forget": True} if a.forget else {})}),
    "clone": lambda a: ("full_clone" if a.full else "linked_clone",
                        {"vmid": a.vmid, "newid": a.newid, "name": a.name, "storage": a.storage, "format": a.format}),
    "disk.copy": lambda a: ("copy", {"volid": a.volid, "storage": a.storage, "format": a.format, "vmid": a.vmid}),
    "disk.move": lambda a: ("move", {"vmid": a.vmid, "disk": a.disk, "storage": a.storage, "format": a.format,
                                     "delete_source": a.delete_source}),
    "disk.resize": lambda a: ("resize", _resize_options(a)),
    "volume.free": lambda a: ("free", {"volid": a.volid, **({"forget": True} if a.forget else {})}),
    "restore": lambda a: ("restore", {"backup": a.id, "newid": a.newid, "storage": a.storage, "format": a.format,
                                      "name": a.name, "force": a.force or None}),
    "gc": lambda a: ("gc", {"storage": a.storage}),
}


def _submitter(name: str) -> Handler:
    def handler(args: argparse.Namespace, client: Client) -> int:
        kind, options = SUBMITTERS[name](args)
        return submit_and_wait(args, client, kind, **options)

    return handler


# each command's help ends with these (`stork COMMAND --help`), as `qm help` shows a command's use
EXAMPLES: dict[str, tuple[str, ...]] = {
    "storage list": ("stork storage list",),
    "storage status": ("stork storage status",),
    "volume list": ("stork volume list local",),
    "volume info": ("stork volume info local:100/vm-100-disk-0.raw",),
    "volume free": ("stork volume free local:100/vm-100-disk-1.raw",),
    "guest create": ("stork guest create 100 --disk scsi0=local:8G --disk efidisk0=local:4M --name web",),
    "guest import": ("stork guest import 100 --disk scsi0=/srv/images/debian.qcow2,storage=local",),
    "guest import-pve": ("stork guest import-pve /etc/pve/qemu-server/9000.conf",),
    "guest list": ("stork guest list",),
    "guest show": ("stork guest show 100",),
    "guest destroy": ("stork guest destroy 100",),
    "guest unlock": ("stork guest unlock 100",),
    "guest migrate": ("stork guest migrate 100 node2", "stork guest migrate 100 node2 --storage-map local=fast"),
    "redis users": ("stork redis users > /etc/redis/users.acl",),
    "cluster key": ("stork cluster key /etc/stork/cluster.psk",),
    "base": ("stork base local:100/vm-100-disk-0.raw --name debian-12",),
    "template": ("stork template 9000",),
    "template assemble": ("stork template assemble 9001 --disk scsi0=local:base/debian-12.raw",),
    "template replicas": ("stork template replicas 9000",),
    "template copy": ("stork template copy 9000 9002 --storage fast",),
    "clone": ("stork clone 9000 101            (a template: a linked clone)",
              "stork clone 100 102 --full --storage fast"),
    "disk copy": ("stork disk copy local:100/vm-100-disk-0.raw fast --format qcow2",),
    "disk move": ("stork disk move 100 scsi0 fast --delete-source",),
    "disk add": ("stork disk add 100 scsi1=local:16G scsi2=local:base/data.raw",),
    "disk detach": ("stork disk detach 100 scsi1",),
    "disk remove": ("stork disk remove 100 scsi1",),
    "disk resize": ("stork disk resize 100 scsi0 +4G", "stork disk resize local:100/vm-100-disk-0.raw 16G"),
    "ping": ("stork ping --node node2",),
    "backup run": ("stork backup 100 101 --storage backup --notes 'before the upgrade'",
                   "stork backup --all --exclude 9000"),
    "backup list": ("stork backup list 100",),
    "backup show": ("stork backup show backup:vm/100/2026-12-06T02:00:00Z",),
    "backup protect": ("stork backup protect vm/100/2026-12-06T02:00:00Z",),
    "backup unprotect": ("stork backup unprotect vm/100/2026-12-06T02:00:00Z",),
    "backup forget": ("stork backup forget vm/100/2026-12-06T02:00:00Z",),
    "backup sync": ("stork backup sync --from backup --to offsite --keep-daily 7",),
    "backup serve": ("stork backup serve vm/100/2026-12-06T02:00:00Z scsi0 --port 10809",),
    "backup key": ("stork backup key create /etc/stork/backup.key",),
    "restore": ("stork restore vm/100/2026-12-06T02:00:00Z 200 --storage fast",),
    "verify": ("stork verify vm/100/2026-12-06T02:00:00Z", "stork verify --all --storage backup --reverify-after 30"),
    "prune": ("stork prune 100 --keep-daily 7 --keep-weekly 4 --dry-run",),
    "gc": ("stork gc --storage backup",),
    "schedule list": ("stork schedule list",),
    "job list": ("stork job list --state failed --since 1d",),
    "job show": ("stork job show 3f2a9c",),
    "job watch": ("stork job watch 3f2a9c",),
    "job cancel": ("stork job cancel 3f2a9c",),
    "job abandon": ("stork job abandon 3f2a9c --node node2",),
    "job dead": ("stork job dead --limit 10",),
}


class _Unbuilt:
    """Stands for the parser (or group of commands) of a command this command line does not
    name: what is added to it is dropped. Only the named command's parser is built, as parsing
    the line and printing its help need no other; all 70 cost a third of the CLI's start."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        return None

    def add_mutually_exclusive_group(self, **kwargs: Any) -> _Unbuilt:
        return self


UNBUILT = _Unbuilt()
EVERY = "*"  # build_parser's `only` for every command's parser


def build_parser(only: str | None = EVERY) -> argparse.ArgumentParser:
    """The command line's parser. `only`: the command word the line names, whose parser is
    built; the others are listed, not built (None: none named; EVERY: all built, as the help
    tests read them)."""
    parser = argparse.ArgumentParser(prog="stork", description="VM disk images: bases, templates, clones, backups.",
                                     epilog="`stork COMMAND --help` shows a command's forms, with an example.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-wait", action="store_true", help="for a command that submits a job: print its id, return")
    parser.add_argument("--config", metavar="FILE", type=_given("a config file"),
                        help="the cluster config (default: STORK_CONFIG, ./stork.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def unbuilt(name: str, help_: str, listed: bool = True) -> Any:
        """A top-level command the line does not name: listed in the help, not built."""
        if listed:  # no -h of its own: `COMMAND -h` is left over, and the whole parser answers it
            sub.add_parser(name, help=help_, add_help=False)
        return UNBUILT

    def command(parent: Any, name: str, handler: Handler, help_: str, submit: bool = False,
                description: str | None = None) -> Any:
        """A command; its help ends with its example (EXAMPLES). One whose name holds a dash is
        the second word of another (`template copy` is template-copy): shown as such, not listed.
        (Only at the top: in a group, `guest import-pve` is the command's own name.)"""
        if parent is UNBUILT:
            return UNBUILT
        internal = "-" in name and not parent_name(parent)  # `guest import-pve` is a command of its own
        if parent is sub and only not in (EVERY, name):
            return unbuilt(name, help_, listed=not internal)
        shown_as = f"{parent_name(parent)} {name}".strip()
        if internal:
            shown_as = name.replace("-", " ")
        p = parent.add_parser(name, **({} if internal else {"help": help_}), description=description or help_,
                              prog=f"stork {shown_as.removesuffix(' run')}",
                              epilog="example:\n  " + "\n  ".join(EXAMPLES[shown_as]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        # the global flags work after the subcommand too (SUPPRESS: not given here keeps the global value)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, type=_given("a config file"),
                       help="the cluster config")
        if submit:
            p.add_argument("--no-wait", action="store_true", default=argparse.SUPPRESS,
                           help="print the job id and return")
        return p

    def group(name: str, help_: str, description: str | None = None, usage: str | None = None) -> Any:
        if only not in (EVERY, name):
            return unbuilt(name, help_)
        p = sub.add_parser(name, help=help_, description=description or help_, usage=usage,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
        actions.stork_name = name  # type: ignore[attr-defined]
        return actions

    def parent_name(parent: Any) -> str:
        return getattr(parent, "stork_name", "")

    def keep_options(p: Any) -> None:
        """--keep-PERIOD, one per retention period (`prune`, `backup sync`)."""
        if p is not UNBUILT:
            from drivers.backup.retention import OPTIONS

            for period in OPTIONS:
                p.add_argument(f"--keep-{period}", type=int, metavar="N")

    storage = group("storage", "storages")
    command(storage, "list", cmd_storage_list, "list configured storages")
    command(storage, "status", cmd_storage_status, "size, use and state of each storage (as pvesm status)")

    volume = group("volume", "volumes")
    command(volume, "list", cmd_volume_list, "list volumes").add_argument("storage", nargs="?")
    command(volume, "info", cmd_volume_info, "show a volume").add_argument("volid", type=_volid)
    p = command(volume, "free", _submitter("volume.free"), "free a volume", True)
    p.add_argument("volid", type=_volid)
    p.add_argument("--forget", action="store_true",
                   help="the volume is gone already: drop it from the guests that list it as unused or as a replica")

    guest = group("guest", "guests")
    p = command(guest, "create", _submitter("guest.create"), "create a guest with new disks", True)
    p.add_argument("vmid")
    p.add_argument("--disk", action="append", help="DISK=STORAGE:SIZE[,format=raw|qcow2], e.g. scsi0=local:8G")
    p.add_argument("--name")
    p = command(guest, "import", _submitter("guest.import"), "create a guest from image files", True)
    p.add_argument("vmid")
    p.add_argument("--disk", action="append", help="DISK=PATH[,storage=S][,format=F]")
    p.add_argument("--ova", help="an OVA archive: the guest it describes, its disks in their slots")
    p.add_argument("--ovf", help="an OVF file, its disk files beside it: the guest it describes")
    p.add_argument("--storage", help="with --ova or --ovf: the storage of its disks (default local)")
    p.add_argument("--format", help="with --ova or --ovf: the format of its disks (default: the storage's)")
    p.add_argument("--name")
    p.add_argument("--as-template", action="store_true", help="make the new guest a template (every disk a base)")
    p = command(guest, "import-pve", _submitter("guest.import-pve"),
                "adopt a Proxmox VE guest: its disks attached where they are (a storage of layout pve)", True)
    p.add_argument("guest_config", metavar="CONF", help="its config, /etc/pve/qemu-server/<vmid>.conf")
    p.add_argument("--vmid", help="the guest's id in stork (default: the one the file name says)")
    command(guest, "list", cmd_guest_list, "list guests")
    command(guest, "show", cmd_guest_show, "show a guest").add_argument("vmid")
    p = command(guest, "destroy", _submitter("guest.destroy"), "destroy a guest and its disks", True)
    p.add_argument("vmid")
    p.add_argument("--forget", action="store_true",
                   help="volumes of the guest that are gone already are dropped with it (else refused)")
    command(guest, "unlock", _submitter("guest.unlock"), "clear a lock left by a job that is no longer live",
            True).add_argument("vmid")
    p = command(guest, "migrate", _submitter("guest.migrate"), "move a guest and its node-local disks to another node",
                True)
    p.add_argument("vmid")
    p.add_argument("node")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--storage", help="every moved disk to this storage of NODE (default: one of the same name)")
    where.add_argument("--storage-map", metavar="OLD=NEW,...", help="disks on OLD go to NEW")
    p.add_argument("--keep-source", action="store_true", help="keep the old volumes on the source node")

    redis_group = group("redis", "what stork is to Redis")
    command(redis_group, "users", cmd_redis_users,
            "print the Redis ACL users of [redis.users.*] (ACL file lines, passwords as SHA-256)")
    cluster = group("cluster", "what the nodes share")
    command(cluster, "key", cmd_cluster_key, "make the cluster key ([cluster] tls_psk_file)").add_argument(
        "file", type=_given("a file to make"))

    p = command(sub, "base", _submitter("base"), "turn a volume into a read-only base image", True)
    p.add_argument("volid", type=_volid)
    p.add_argument("--name", help="base name (default: base-<vmid>-disk-<n>)")
    command(sub, "template", _submitter("template"), "turn a guest into a template; also template assemble, copy, "
            "replicas", True, "turn a guest into a template (its disks become read-only base images); also:\n"
            "  stork template assemble VMID --disk DISK=BASE...  a new template of existing base images\n"
            "  stork template copy VMID NEWID [--storage S]       a new template of full copies of the bases\n"
            "  stork template replicas VMID                       its replicas on other nodes"
            ).add_argument("vmid")
    p = command(sub, "template-assemble", _submitter("template.assemble"),
                "a new template of existing base images", True)
    p.add_argument("vmid")
    p.add_argument("--disk", action="append", help="DISK=BASE, e.g. scsi0=local:base/os.raw")
    p.add_argument("--name")
    command(sub, "template-replicas", cmd_template_replicas,
            "the template's replicas on other nodes").add_argument("vmid")
    p = command(sub, "template-copy", _submitter("template.copy"),
                "a new template of full copies of the bases", True)
    p.add_argument("vmid")
    p.add_argument("newid")
    p.add_argument("--storage")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--name")
    p = command(sub, "clone", _submitter("clone"), "clone a guest (linked for a template)", True)
    p.add_argument("vmid")
    p.add_argument("newid")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="full copy (the default for a non-template)")
    kind.add_argument("--linked", action="store_true", help="linked clone (the default for a template)")
    p.add_argument("--storage")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--name")

    disk = group("disk", "disks")
    p = command(disk, "copy", _submitter("disk.copy"), "copy a volume to a storage", True)
    p.add_argument("volid", type=_volid)
    p.add_argument("storage")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--vmid", help="owner of the copy (default: the source's)")
    p = command(disk, "move", _submitter("disk.move"), "move a guest's disk to a storage", True)
    p.add_argument("vmid")
    p.add_argument("disk")
    p.add_argument("storage")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--delete-source", action="store_true", help="free the old volume once the copy is verified")
    p = command(disk, "add", _submitter("disk.add"), "add disks: empty, or linked clones of base images", True)
    p.add_argument("vmid")
    p.add_argument("specs", nargs="+", metavar="DISK=SPEC", help="scsi1=local:8G[,format=F] or scsi1=local:base/os.raw")
    for action, help_ in (("detach", "keep a disk as unused instead of attached"),
                          ("remove", "free a disk and drop it from the guest")):
        p = command(disk, action, _submitter(f"disk.{action}"), help_, True)
        p.add_argument("vmid")
        p.add_argument("disk")
    p.add_argument("--forget", action="store_true",
                   help="the volume is gone already: drop the disk from the guest (else refused)")
    p = command(disk, "resize", _submitter("disk.resize"), "grow a volume: VOLID SIZE, or VMID DISK [+]SIZE", True)
    p.add_argument("target", metavar="VOLID|VMID")
    p.add_argument("disk_or_size", metavar="SIZE|DISK")
    p.add_argument("size", nargs="?", metavar="[+]SIZE", help="with VMID DISK: the new size, or +SIZE to grow by")

    p = command(sub, "ping", cmd_ping, "check that nodes' workers serve jobs")
    p.add_argument("--node", action="append", help="a node to reach (repeatable; default: every node the config names)")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for the answers (default 5)")

    p = command(sub, "backup-run", cmd_backup_run, "back up guests (one job each)", True)
    p.add_argument("vmids", nargs="*", metavar="VMID")
    p.add_argument("--all", action="store_true", help="every guest")
    p.add_argument("--exclude", metavar="VMID,...", help="with --all: guests to leave out")
    p.add_argument("--storage", help="the backup storage (default: the only one)")
    p.add_argument("--notes", help="a line kept with each backup")
    backup = group("backup", "back up guests, and the backups: list, show, protect, forget, sync, serve, key",
                   "  stork backup VMID... [--storage B] [--notes T]   back up guests (one job each)\n"
                   "  stork backup --all [--exclude VMID,...]          back up every guest\n"
                   "  stork backup ACTION ...                          the backups (below)\n\n"
                   "example:\n  stork backup 100 101 --storage backup\n  stork backup list 100",
                   "stork backup VMID... | --all | ACTION ...")
    p = command(backup, "list", cmd_backup_list, "backups, oldest first")
    p.add_argument("vmid", nargs="?")
    p.add_argument("--storage")
    command(backup, "show", cmd_backup_show, "show a backup: [STORAGE:]vm/VMID/TIME").add_argument("id")
    for action, help_ in (("protect", "keep a backup from prune and forget"), ("unprotect", "undo protect")):
        command(backup, action, cmd_backup_protect, help_).add_argument("id")
    p = command(backup, "forget", cmd_backup_forget, "remove a backup (refused while protected)")
    p.add_argument("id")
    p.add_argument("--damaged", action="store_true",
                   help="remove a backup that cannot be read (its manifest or state damaged), protected or not; "
                        "refused for one that can be read")
    p = command(backup, "sync", cmd_backup_sync, "copy backups to another backup storage (an offsite copy)", True)
    p.add_argument("vmids", nargs="*", metavar="VMID", help="these guests' backups (default: all)")
    p.add_argument("--from", dest="source", required=True, metavar="STORAGE", help="the backup storage copied from")
    p.add_argument("--to", dest="target", required=True, metavar="STORAGE", help="the backup storage copied to")
    keep_options(p)  # then the target is pruned, as `stork prune` does
    p.add_argument("--node", help="where both storages are (default: this node)")
    p.add_argument("--reencrypt", action="store_true",
                   help="between storages of other keys: read each chunk under the source's key, seal it under the "
                        "target's (never into a storage without a key)")
    p = command(backup, "serve", cmd_backup_serve, "serve one disk of a backup read-only over NBD (files out "
                "of a backup without a restore), until Ctrl-C")
    p.add_argument("id", metavar="BACKUP")
    p.add_argument("disk", metavar="DISK", help="e.g. scsi0")
    p.add_argument("--address", default="127.0.0.1", type=_given("an address to listen on (0.0.0.0: every one)"),
                   help="where to listen (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=_whole_number(0, 65535, "a port"), default=10809,
                   help="default 10809, NBD's; 0: any free port")
    p = command(backup, "key", cmd_backup_key, "key create FILE: a key file for an encrypted backup storage")
    p.add_argument("create", choices=["create"])
    p.add_argument("file", type=_given("a file to make"))
    p = command(sub, "restore", _submitter("restore"), "restore a backup as a new guest", True)
    p.add_argument("id", metavar="BACKUP")
    p.add_argument("newid")
    p.add_argument("--storage", help="the image storage of every disk (default: each disk's own)")
    p.add_argument("--format", choices=["raw", "qcow2"])
    p.add_argument("--name")
    p.add_argument("--force", action="store_true",
                   help="replace the existing, unlocked guest NEWID once the restore has succeeded")
    p = command(sub, "verify", cmd_verify, "read back backups and check every chunk", True)
    p.add_argument("id", nargs="?", metavar="BACKUP")
    p.add_argument("--all", action="store_true", help="every backup of the storage")
    p.add_argument("--storage")
    p.add_argument("--reverify-after", type=_whole_number(0, 36500, "a number of days"), metavar="DAYS",
                   help="with --all: skip backups verified sound within DAYS days")
    p = command(sub, "prune", cmd_prune, "forget the backups a retention does not keep", True)
    p.add_argument("vmid", nargs="?")
    p.add_argument("--storage")
    keep_options(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be kept and removed, and why")
    command(sub, "gc", _submitter("gc"), "remove chunks no backup refers to", True).add_argument("--storage")

    schedule = group("schedule", "backup schedules ([schedule.<name>] in the config, run by beat)")
    command(schedule, "list", cmd_schedule_list, "each schedule: its last run and outcome, its next run")

    job = group("job", "jobs")
    p = command(job, "list", cmd_job_list, "recent jobs, newest first")
    p.add_argument("--limit", type=_whole_number(1, 100_000, "a number of jobs"), default=50,
                   help="at most this many (default 50)")
    p.add_argument("--state", choices=["queued", "running", "undoing", "succeeded", "failed", "cancelled"])
    p.add_argument("--kind", help="e.g. full_clone, linked_clone, move")
    p.add_argument("--vmid", help="jobs acting on this guest")
    p.add_argument("--since", help="an ISO date or time, or 30m, 2h, 3d ago")
    command(job, "show", cmd_job_show, "show a job record").add_argument("id")
    command(job, "watch", cmd_job_watch, "follow a job's events from its start").add_argument("id")
    command(job, "cancel", cmd_job_cancel, "cancel a job (its undo runs)").add_argument("id")
    p = command(job, "abandon", cmd_job_abandon, "give up a node gone for good for an undoing job (its undos "
                "there are not run, the rest are), or a job past its commit whose steps left all wait there")
    p.add_argument("id")
    p.add_argument("--node", required=True, help="the node that is gone for good")
    command(job, "dead", cmd_job_dead, "messages no worker could turn into a task, newest first").add_argument(
        "--limit", type=_whole_number(0, 100_000, "a number of messages"), default=50)
    _name_positionals(parser)
    return parser


def _name_positionals(parser: argparse.ArgumentParser) -> None:
    """Positional arguments as help shows them: VMID, NEWID, VOLID (as `qm help` does)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_positionals(child)
        elif not action.option_strings and action.metavar is None and not action.choices:  # a literal word stays
            action.metavar = action.dest.upper()


def _vmid(text: str) -> int:
    """A guest id on the command line: a mistake in it is a command-line mistake (exit 2)."""
    from drivers import names

    return _usage(names.vmid, text)


def _volid(text: str) -> str:
    """A volume id on the command line; a linked clone's long form, as Proxmox VE shows it
    (`local:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2`), is read as its short form."""
    from drivers import names

    try:
        return names.short_volid(text)
    except StorkError:
        return text  # the job's own checks name what is wrong with it


def _usage(check: Callable[[Any], Any], value: Any) -> Any:
    """`check(value)`, a refusal of it being a command-line mistake (exit 2)."""
    try:
        return check(value)
    except StorkError as e:
        raise UsageError(str(e)) from None


def _resize_options(a: argparse.Namespace) -> dict[str, Any]:
    """`disk resize VOLID SIZE`, or `disk resize VMID DISK [+]SIZE` as `qm disk resize`."""
    from drivers import names

    if a.size is None:
        volid = _volid(a.target)  # `disk resize 100 scsi0`, its size forgotten: no volume id, said first
        if a.disk_or_size.startswith("+"):
            raise UsageError(f"invalid size {a.disk_or_size!r}: +SIZE (grow by SIZE) goes with VMID DISK, not with "
                             "a volume id")
        _usage(names.size, a.disk_or_size)  # a typo in a size is the command line's: exit 2, as at create
        return {"volid": volid, "size": a.disk_or_size}
    from producer.client import Client

    client = Client()
    guest = client.guest(_vmid(a.target))
    if a.disk_or_size not in guest.disks:
        raise UsageError(f"guest {guest.vmid} has no disk {a.disk_or_size}")
    volid = guest.disks[a.disk_or_size]
    if a.size.startswith("+"):
        return {"volid": volid, "size": client.volume(volid).virtual_size + _usage(names.size, a.size[1:])}
    _usage(names.size, a.size)
    return {"volid": volid, "size": a.size}


def _bases(values: list[str] | None) -> dict[str, str]:
    """`scsi0=local:base/os.raw` -> {"scsi0": "local:base/os.raw"}: base images to attach."""
    bases = {}
    for disk, spec in _disk_specs(values or [], "storage:size").items():
        if set(spec) != {"base"}:
            raise UsageError(f"invalid --disk {disk}=...: expected DISK=BASE, a base image such as local:base/os.raw")
        bases[disk] = spec["base"]
    return bases


BACKUP_ACTIONS = ("list", "show", "protect", "unprotect", "forget", "sync", "serve", "key", "-h", "--help")


def _command_at(argv: list[str]) -> int:
    """Where the command word is: after the global flags (--config, or as argparse takes it
    abbreviated, --conf, takes the next word as its value)."""
    at = 0
    while at < len(argv) and argv[at].startswith("-"):
        takes_value = len(argv[at]) > 2 and "--config".startswith(argv[at])
        at += 2 if takes_value else 1
    return at


def _command_word(argv: list[str]) -> str | None:
    """The command a (spelled-out) command line names, if any: the one parser to build."""
    at = _command_at(argv)
    return argv[at] if at < len(argv) else None


def _spelled_out(argv: list[str]) -> list[str]:
    """`template copy ...` as template-copy (beside `template VMID`), and `backup VMID...` as
    backup-run (beside `backup list`), wherever the global flags put the command word."""
    at = _command_at(argv)
    word, following = argv[at:at + 1], argv[at + 1:at + 2]
    if word == ["template"] and following in (["assemble"], ["copy"], ["replicas"]):
        return [*argv[:at], f"template-{following[0]}", *argv[at + 2:]]
    if word == ["backup"] and not (following and following[0] in BACKUP_ACTIONS):
        return [*argv[:at], "backup-run", *argv[at + 1:]]
    return argv


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line, parsed by the parser of the command it names alone. Where argparse
    finds another command there (the word was misread), or anything is left over, the whole
    parser parses it again: the same result, the same errors and help as always."""
    only = _command_word(argv)
    args, left = build_parser(only).parse_known_args(argv)
    if left or args.command != only:
        return build_parser().parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = _spelled_out(argv)
    args = _parse(argv)  # --help and usage mistakes end here
    import logging
    from pathlib import Path

    from worker import logs

    logs.configure(logging.WARNING)  # stdout carries only the result; warnings go to stderr
    before = os.environ.get("STORK_CONFIG")
    if args.config:
        os.environ["STORK_CONFIG"] = str(Path(args.config).absolute())
    try:
        return _run(args)
    finally:  # main() may run in-process (tests, a Python caller): leave the environment as it was
        if before is None:
            os.environ.pop("STORK_CONFIG", None)
        else:
            os.environ["STORK_CONFIG"] = before


def _run(args: argparse.Namespace) -> int:
    import redis

    client = None
    try:
        from producer.client import Client  # imports the config: errors are reported below

        for given in (getattr(args, "vmid", None), getattr(args, "newid", None), *(getattr(args, "vmids", None) or [])):
            if given is not None:
                _vmid(given)  # a bad guest id is a command-line mistake: exit 2
        client = Client()
        if args.command == "clone" and not (args.full or args.linked):
            args.full = not client.guest(args.vmid).template
        return args.handler(args, client)
    except UsageError as e:
        print(f"stork: {e}", file=sys.stderr)
        return 2
    except StorkError as e:
        print(f"stork: {e}", file=sys.stderr)
        return 1
    except redis.exceptions.NoPermissionError as e:  # an ACL user asked for what its role may not do
        from worker.connect import role

        print(f"stork: Redis refused it to the {role('producer')} role's user: {e}", file=sys.stderr)
        return 1
    except redis.RedisError as e:  # Redis went away after the first contact, or never answered
        from worker.connect import trouble

        print(f"stork: {trouble(client.cfg.redis, e) if client else f'Redis error: {e}'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `stork job list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
