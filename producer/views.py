"""What the CLI prints for people: each listing a table, each record a short summary. Only
text: `--json` prints the records themselves (bytes, epoch seconds), for scripts."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.config import StorageConfig
from drivers.guests import Guest
from producer import results
from producer.client import job_guests
from producer.tables import duration, size, table, text, when, when_text
from worker.records import JobRecord

if TYPE_CHECKING:  # read where they are shown: `stork job list` imports neither
    from drivers.backends.base import VolumeInfo
    from drivers.backup.records import Damaged, Snapshot


def storages(found: Iterable[StorageConfig]) -> str:
    def where(s: StorageConfig) -> str:
        """The path of a storage of files; the driver's options (a VG, a pool) of another."""
        return str(s.path) if s.path else " ".join(f"{k}={v}" for k, v in s.options.items())

    return table(["ID", "TYPE", "SHARED", "NODES", "CONTENT", "WHERE"],
                 [[s.id, s.type, s.shared, list(s.nodes) or "all", list(s.content), where(s)] for s in found])


def pings(answers: Iterable[Mapping[str, Any]]) -> str:
    def state(a: Mapping[str, Any]) -> str:
        return "ok" if a["ok"] else a["error"] or "failed"

    return table(["NODE", "ANSWER", "TIME", "JOB"],
                 [[a["node"], state(a), f"{1000 * a['seconds']:.0f} ms" if a["seconds"] is not None else "-", a["job"]]
                  for a in answers])


def storage_status(rows: Iterable[Mapping[str, Any]]) -> str:
    def percent(r: Mapping[str, Any]) -> str:
        return f"{100 * r['used'] / r['total']:.1f}%" if r["active"] and r["total"] else "-"

    return table(["NAME", "TYPE", "SHARED", "STATUS", "TOTAL", "USED", "AVAILABLE", "%"],
                 [[r["id"], r["type"], r["shared"], "active" if r["active"] else f"inactive: {r['error']}",
                   size(r["total"]), size(r["used"]), size(r["available"]), percent(r)] for r in rows],
                 right=["TOTAL", "USED", "AVAILABLE", "%"])


def volumes(found: Iterable[VolumeInfo]) -> str:
    def used_by(v: VolumeInfo) -> str:
        if v.problem:
            return f"NOT A VOLUME ({v.problem.rpartition(' is ')[2]})"
        return "ORPHAN" if v.orphan else text(list(v.users))

    def sizes(v: VolumeInfo) -> list[str]:
        return ["-", "-"] if v.problem else [size(v.virtual_size), size(v.allocated)]

    return table(["VOLID", "FORMAT", "SIZE", "ALLOCATED", "BASE", "PARENT", "CLONES", "USED BY"],
                 [[v.volid, v.fmt, *sizes(v), v.is_base, v.parent, len(v.clones) or "", used_by(v)] for v in found],
                 right=["SIZE", "ALLOCATED", "CLONES"])


def volume(v: VolumeInfo) -> str:
    return _fields([("volume", v.volid), ("format", v.fmt), ("size", size(v.virtual_size)),
                    ("allocated", size(v.allocated)), ("base", v.is_base), ("parent", v.parent),
                    ("clones", list(v.clones)), ("replicas", list(v.replicas)),
                    ("used by", "ORPHAN (no guest, job or job result names it)" if v.orphan else list(v.users))])


def replicas(rows: list[dict[str, str]]) -> str:
    """A template's replicas: each a read-only copy of one of its bases on another node."""
    return table(["REPLICA", "OF", "NODE"], [[r["replica"], r["of"], r["node"]] for r in rows])


def guests(found: Iterable[Guest], broken: Iterable[tuple[Path, str]]) -> str:
    """Guests by id; a config that cannot be read is a BROKEN row saying why."""
    broken = list(broken)
    extra = [""] if broken else []
    rows: list[tuple[tuple[int, str], list[object]]] = [
        ((g.vmid, ""), [g.vmid, g.name, g.node, "template" if g.template else "guest", g.lock,
                        len(g.disks), len(g.unused) or "", *extra]) for g in found]
    rows += [((int(f.stem) if f.stem.isdigit() else 1 << 62, f.stem), [f.stem, "", "", "BROKEN", "", "", "", why])
             for f, why in broken]
    return table(["VMID", "NAME", "NODE", "TYPE", "LOCK", "DISKS", "UNUSED", *(["PROBLEM"] if broken else [])],
                 [r for _, r in sorted(rows)], right=["DISKS", "UNUSED"])


def guest(g: Guest) -> str:
    return _fields([("guest", g.vmid), ("name", g.name), ("node", g.node), ("template", g.template),
                    ("lock", f"{g.lock} (job {g.lock_job})" if g.lock else ""),
                    ("notes", g.notes),
                    *g.disks.items(), *((f"unused{i}", v) for i, v in enumerate(g.unused)),
                    *((f"replica of {r['of']}", f"{v} (node {r['node']})") for v, r in sorted(g.replicas.items()))])


def _guests(job: JobRecord) -> str:
    ids = job_guests(job)
    if "new_vmid" in job.params and len(ids) > 1:
        return f"{'/'.join(map(str, ids[:-1]))} -> {ids[-1]}"
    return text([str(i) for i in ids]) if ids else text(job.params.get("volid"))


def _took(job: JobRecord) -> float | None:
    """How long the job has run (so far, if it has not ended)."""
    end = job.finished or (None if job.state.terminal else time.time())
    return end - (job.started or job.created) if end else None


def jobs(found: Iterable[JobRecord]) -> str:
    return table(["STARTED", "KIND", "GUESTS", "STATE", "DURATION", "NODE", "ID"],
                 [[when(j.started or j.created), j.kind, _guests(j), j.state, duration(_took(j)), j.node, j.id]
                  for j in found], right=["DURATION"])


def job(j: JobRecord, times: Mapping[str, Mapping[str, float]]) -> str:
    """A job as an operator reads it: what, when, each step's node, start, duration and
    outcome, then the result, the error and what the undo did."""
    head = _fields([("job", j.id), ("kind", j.kind), ("guests", _guests(j)), ("state", j.state),
                    ("node", j.node), ("created", when(j.created)), ("finished", when(j.finished)),
                    ("duration", duration(_took(j)))])
    steps = []
    for i, name in enumerate(j.steps):
        t = times.get(name, {})
        if i < j.done and name not in j.ran_on:
            outcome = "not needed"  # a step only a job between nodes runs (worker/jobs/kinds.py)
        elif i < j.done:
            outcome = "done"
        elif (j.current or {}).get("step") == i:
            outcome = "running"
        elif j.state in ("failed", "cancelled", "undoing") and t.get("start") and i == j.done:
            outcome = "failed"
        else:
            outcome = "-"
        if i in j.undone:
            outcome += ", undone"
        took = t["end"] - t["start"] if "end" in t and "start" in t else None
        steps.append([name, j.ran_on.get(name), when(t.get("start")), duration(took), outcome,
                      j.attempts.get(str(i), "")])
    parts = [head, "", table(["STEP", "NODE", "STARTED", "DURATION", "OUTCOME", "ATTEMPTS"], steps)]
    stands, removed = results.split_undone(j.result, not undone(j))
    if shown := [*results.render(stands, indent=""), *(["undone:", *results.render(removed)] if removed else [])]:
        parts += ["", *shown]
    if j.error:
        parts += ["", f"error: {j.error}"]
    if j.undo_errors:
        parts += [f"not undone: {'; '.join(j.undo_errors)}"]
    if j.undo_retry:
        parts += [f"undo retry: {j.undo_retry.get('error')} (again at {when(j.undo_retry.get('at'))})"]
    return "\n".join(parts)


def undone(job: JobRecord) -> bool:
    """Whether the job's undo removed what it had made: it failed or was cancelled before any
    commit step completed (after one, a job only goes forward, and what it made stands)."""
    if job.state not in ("failed", "cancelled"):
        return False
    from worker.jobs.kinds import KINDS  # the job catalogue: only for a job that did not succeed

    kind = KINDS.get(job.kind)
    return kind is None or not any(kind.steps[i].commit for i in range(min(job.done, len(kind.steps))))


def _fields(pairs: Iterable[tuple[str, object]]) -> str:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k + ':':<{width + 1}} {text(v)}" for k, v in pairs)


def _verified(s: Snapshot) -> str:
    return "-" if s.state.verify is None else f"{s.state.verify.state} {when_text(s.state.verify.time)}"


def backups(found: Iterable[tuple[str, Snapshot | Damaged]]) -> str:
    """Backups oldest first, as `proxmox-backup-client snapshot list`: one row each; one that
    cannot be read is DAMAGED, with the reason where the notes go."""
    return table(["ID", "STORAGE", "GUEST", "TIME", "SIZE", "NEW DATA", "PROTECTED", "VERIFIED", "NOTES"],
                 [_backup_row(sid, s) for sid, s in found], right=["SIZE", "NEW DATA"])


def _backup_row(sid: str, s: Snapshot | Damaged) -> list[object]:
    from drivers.backup.records import Damaged

    if isinstance(s, Damaged):
        return [str(s.id), sid, s.id.vmid, when_text(s.id.time_text), "-", "-", "?", "DAMAGED", s.reason]
    return [str(s.id), sid, s.id.vmid, when_text(s.id.time_text), size(s.manifest.size), size(s.manifest.written),
            s.state.protected, _verified(s), s.state.notes]


def backup(sid: str, s: Snapshot) -> str:
    """A backup: what it holds and its state, then a row per disk."""
    head = _fields([("backup", str(s.id)), ("storage", sid), ("guest", s.id.vmid),
                    ("started", when_text(s.manifest.started)), ("finished", when_text(s.manifest.finished)),
                    ("size", size(s.manifest.size)),
                    ("new data", size(s.manifest.written)), ("protected", s.state.protected),
                    ("verified", _verified(s)), ("notes", s.state.notes)])
    disks = table(["DISK", "FORMAT", "SIZE", "FROM"],
                  [[key, d.format, size(d.virtual_size), d.source] for key, d in s.manifest.disks.items()],
                  right=["SIZE"])
    problems = [f"problem: {p}" for p in (s.state.verify.problems if s.state.verify else ())]
    return "\n".join([head, "", disks, *(["", *problems] if problems else [])])


def prune_plan(decisions: Iterable[Mapping[str, Any]]) -> str:
    return "\n".join(results.render_value("decisions", list(decisions)))


def schedules(rows: Iterable[Mapping[str, Any]]) -> str:
    def guests(r: Mapping[str, Any]) -> str:
        chosen = "all" if r["guests"] == "all" else text(r["guests"])
        return f"{chosen} except {text(r['exclude'])}" if r.get("exclude") else chosen

    def keep(r: Mapping[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in r["keep"].items() if v) or "-"

    def storage(r: Mapping[str, Any]) -> str:
        where = r["storage"] or "default"
        return f"{where}->{r['target']}" if r.get("target") else where

    return table(["NAME", "SCHEDULE", "ACTION", "GUESTS", "STORAGE", "KEEP", "ENABLED", "LAST RUN", "OUTCOME",
                  "NEXT RUN"],
                 [[r["name"], r["schedule"], r["action"], guests(r), storage(r), keep(r), r["enabled"],
                   when_text(r["last"]) if r["last"] else "never", r["outcome"] or "-", when_text(r["next"])]
                  for r in rows])

