"""Job kinds, declared as data: each is a list of steps (each with its undo) and a `prepare`
that checks and normalizes the user's options when the job is submitted.

A step with `storage=True` touches volumes: it runs on the job node's queue when the job
uses a node-local storage, else anywhere (the shared queue). Guest-config steps run
anywhere, as guest configs live in a shared directory. A job between nodes (its params name
a `source_node` and a `target_node`) runs each storage step on its side's node: the source
node exports what the target node copies (drivers/transfer.py).

Consecutive steps that can run on one queue are sent as one task (`runs`): a guest-config step
(shared queue) joins the node steps beside it, so a linked clone on a node-local storage is one
task on that node's queue. Each step is still started, recorded, evented and undone on its own;
a step that runs `alone` (a copy, which is long; a ping, whose queue is the point) is a task of
its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drivers.config import Config
from worker.context import StepContext
from worker.jobs import backups, steps
from worker.jobs.prepare import (
    prepare_add_disk,
    prepare_assemble,
    prepare_base,
    prepare_copy,
    prepare_create,
    prepare_destroy,
    prepare_detach,
    prepare_free,
    prepare_full_clone,
    prepare_import,
    prepare_import_pve,
    prepare_import_template,
    prepare_linked_clone,
    prepare_migrate,
    prepare_move,
    prepare_ping,
    prepare_remove_disk,
    prepare_replica_clone,
    prepare_resize,
    prepare_template,
    prepare_template_copy,
    prepare_unlock,
)
from worker.jobs.prepare_backups import (
    prepare_backup,
    prepare_gc,
    prepare_prune,
    prepare_restore,
    prepare_sync,
    prepare_verify,
)
from worker.queues import SHARED_QUEUE, node_queue

StepFn = Callable[[StepContext], None]


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn
    undo: StepFn | None = None
    storage: bool = True
    commit: bool = False  # once done, the job's effect stands: later failures undo nothing before it
    release: bool = False  # its undo releases what the job holds (a guest lock): run at any failure, even past a commit
    side: str = ""  # "source" or "target": in a job between nodes, the node it runs on (else the job's node)
    across_only: bool = False  # needed only by a job between nodes: one on one node goes without it
    alone: bool = False  # sent as a task of its own, never with the steps beside it: long, or its queue is the point


@dataclass(frozen=True)
class JobKind:
    name: str
    summary: str
    steps: tuple[Step, ...]
    prepare: Callable[[dict[str, Any], Config], dict[str, Any]]

    def __post_init__(self) -> None:
        names_ = [s.name for s in self.steps]
        assert len(set(names_)) == len(names_), f"{self.name}: step names must be unique"

    def committed(self, done: int) -> bool:
        """Has a commit step completed, once `done` steps are? From then on the job only goes forward."""
        return any(step.commit for step in self.steps[:done])

    def skipped(self, params: dict[str, Any]) -> frozenset[int]:
        """The steps this job goes without (never sent, never undone): those only a job
        between nodes needs, in a job on one node."""
        if not isinstance(params, dict) or params.get("target_node"):
            return frozenset()  # (a record that is not fit to act on skips nothing: every undo checks it)
        return frozenset(i for i, step in enumerate(self.steps) if step.across_only)

    def next_step(self, params: dict[str, Any], after: int) -> int:
        """The index of the job's first step after `after` (-1: its first step; len(steps): none left)."""
        skipped = self.skipped(params)
        index = after + 1
        while index in skipped:
            index += 1
        return index

    def queues(self, params: dict[str, Any], cfg: Config) -> list[str]:
        local = params.get("pinned") or any(not cfg.storage(s).shared for s in params["storages"])
        return [_queue(step, params, local) for step in self.steps]

    def runs(self, params: dict[str, Any], queues: list[str], start: int) -> list[tuple[list[int], str]]:
        """The job's steps from `start` on (those it does not go without), as the tasks that
        run them: each a run of steps and the queue it is sent to."""
        skipped = self.skipped(params)
        wanted = [i for i in range(start, len(self.steps)) if i not in skipped]
        return fuse(wanted, queues, frozenset(i for i, step in enumerate(self.steps) if step.alone))


def fuse(indexes: list[int], queues: list[str], alone: frozenset[int]) -> list[tuple[list[int], str]]:
    """Group consecutive steps into runs that one worker can do in one go: steps on the same
    queue, and shared-queue steps with the node steps beside them (any node may run those),
    but never two nodes' steps, nor a step that runs alone. A run is sent to its node's queue
    if it has node steps, else to the shared queue."""
    runs: list[tuple[list[int], str]] = []
    for index in indexes:
        queue = queues[index]
        if runs and index not in alone and runs[-1][0][-1] not in alone:
            steps, run_queue = runs[-1]
            if SHARED_QUEUE in (queue, run_queue) or queue == run_queue:
                runs[-1] = ([*steps, index], run_queue if queue == SHARED_QUEUE else queue)
                continue
        runs.append(([index], queue))
    return runs


def _queue(step: Step, params: dict[str, Any], local: bool) -> str:
    if not step.storage:
        return SHARED_QUEUE
    if step.side and (node := params.get(f"{step.side}_node")):
        return node_queue(node)
    return node_queue(params["node"]) if local else SHARED_QUEUE


LOCK_GUEST = Step("lock_guest", steps.lock_guest, steps.unlock_guest, storage=False, release=True)
RESERVE_GUEST = Step("reserve_guest", steps.reserve_guest, steps.unreserve_guest, storage=False)
ALLOCATE = Step("allocate", steps.allocate_disks, steps.free_made, side="target")
LINK = Step("link_disks", steps.link_disks, steps.free_made)
# a copy between nodes: the source node exports, the target node copies, the export ends
EXPORT = Step("export", steps.export_sources, steps.end_exports, side="source", across_only=True)
COPY = Step("copy_data", steps.copy_data, side="target", alone=True)  # its target is freed by ALLOCATE's undo
VERIFY = Step("verify_copy", steps.verify_copy, side="target", alone=True)
# a copy from another node
VERIFY_ACROSS = Step("verify_copy", steps.verify_copy, side="target", across_only=True, alone=True)
END_EXPORT = Step("end_export", steps.end_exports, side="source", across_only=True)
MAKE_MOVED_BASES = Step("make_bases", steps.make_moved_bases, steps.unmake_bases, side="target")  # a moved base
COMMIT_NEW = Step("commit_guest", steps.commit_new_guest, storage=False, commit=True)
# a linked clone on another node: the bases copied there once, as replicas (their record is a commit: they stand)
RECORD_REPLICAS = Step("record_replicas", steps.record_replicas, storage=False, commit=True)
LINK_REPLICAS = Step("link_disks", steps.link_replicas, steps.free_linked, side="target")
COMMIT_LINKED = Step("commit_guest", steps.commit_linked, storage=False, commit=True)
CHECK_REPLICAS = Step("check_replicas", steps.check_replicas, side="target", across_only=True)
FREE_REPLICAS = Step("free_replicas", steps.free_replicas, side="target", across_only=True)
# a replica clone's new guest: reserved first, and removed at any failure while still the job's, even past its commit
RESERVE_NEW = Step("reserve_guest", steps.reserve_guest, steps.unreserve_guest, storage=False, release=True)
MAKE_BASES = Step("make_bases", steps.make_bases, steps.unmake_bases)
COMMIT_BASES = Step("commit_guest", steps.commit_bases, storage=False, commit=True)
LINK_OWNER = Step("link_owner", steps.link_owner, steps.free_made)
SWITCH = Step("switch_disks", steps.switch_disks, steps.unswitch_disks, storage=False, commit=True)
SWITCH_NODE = Step("switch_node", steps.switch_node, storage=False, commit=True)
FREE_SOURCES = Step("free_sources", steps.free_sources, steps.forget_freed_sources, side="source")
# idempotent, and their effect is the user's intent: an interrupted one is carried forward
FREE = Step("free_volume", steps.free_volume, steps.forget_free, commit=True)
DESTROY = Step("destroy", steps.destroy_guest, steps.forget_freed, commit=True)
RESIZE = Step("resize", steps.resize_volume, commit=True)
UNLOCK_GUEST = Step("unlock_guest", steps.unlock_guest, storage=False)
PING_SHARED = Step("pong_shared", steps.pong, storage=False, alone=True)
PING_NODE = Step("pong_node", steps.pong, alone=True)
PING_BACK = Step("pong_back", steps.pong, storage=False, alone=True)
FORCE_UNLOCK = Step("unlock", steps.force_unlock, storage=False, commit=True)
ATTACH = Step("attach_disks", steps.attach_disks, storage=False, commit=True)
DETACH = Step("detach_disk", steps.detach_disk, storage=False, commit=True)
REMOVE_DISK = Step("remove_disk", steps.remove_disk, steps.forget_freed, commit=True)
COMMIT_ASSEMBLED = Step("commit_guest", steps.commit_assembled, commit=True)  # reads the bases: on their node
COMMIT_ADOPTED = Step("commit_guest", steps.commit_adopted, commit=True)  # reads the volumes: on their node
MAKE_COPY_BASES = Step("make_bases", steps.make_copies_bases, steps.unmake_bases, side="target")
COMMIT_TEMPLATE_COPY = Step("commit_guest", steps.commit_template_copy, storage=False, commit=True)
BACKUP = Step("backup", backups.backup_guest, commit=True, alone=True)  # a snapshot appears whole or not at all
RESTORE_DATA = Step("restore_data", backups.restore_data, alone=True)  # its targets are freed by ALLOCATE's undo
RESERVE_RESTORED = Step("reserve_guest", backups.reserve_restored, backups.unreserve_restored, storage=False)
MAKE_RESTORED_BASES = Step("make_bases", backups.make_restored_bases, steps.unmake_bases)  # for a template
COMMIT_RESTORED = Step("commit_guest", backups.commit_restored, storage=False, commit=True)
FREE_REPLACED = Step("free_replaced", backups.free_replaced, steps.forget_freed_sources)  # --force: the old disks
VERIFY_BACKUPS = Step("verify", backups.verify_backups, alone=True)
PRUNE = Step("prune", backups.prune_backups, commit=True, alone=True)  # what it forgot stays forgotten
GC = Step("gc", backups.collect_garbage, commit=True, alone=True)
SYNC = Step("sync", backups.sync_backups, commit=True, alone=True)  # what it copied stands, each snapshot whole


KINDS: dict[str, JobKind] = {k.name: k for k in [
    JobKind("create", "create a guest with new empty disks",
            (RESERVE_GUEST, ALLOCATE, COMMIT_NEW), prepare_create),
    JobKind("import", "create a guest from existing image files",
            (RESERVE_GUEST, ALLOCATE, COPY, VERIFY, COMMIT_NEW), prepare_import),
    JobKind("import_template", "create a template from existing image files, each copy made a base",
            (RESERVE_GUEST, ALLOCATE, COPY, VERIFY, MAKE_COPY_BASES, COMMIT_TEMPLATE_COPY), prepare_import_template),
    JobKind("linked_clone", "clone a template, sharing its bases",
            (RESERVE_GUEST, LINK, COMMIT_NEW), prepare_linked_clone),
    JobKind("replica_clone", "a linked clone on another node: each base copied there once, as a replica, then cloned",
            (RESERVE_NEW, LOCK_GUEST, EXPORT, ALLOCATE, COPY, VERIFY, END_EXPORT, MAKE_MOVED_BASES, RECORD_REPLICAS,
             LINK_REPLICAS, COMMIT_LINKED), prepare_replica_clone),
    JobKind("full_clone", "clone a guest or template with full copies of its disks",
            (LOCK_GUEST, RESERVE_GUEST, EXPORT, ALLOCATE, COPY, VERIFY_ACROSS, END_EXPORT, COMMIT_NEW),
            prepare_full_clone),
    JobKind("base", "turn a volume into a read-only base image (a guest running from it keeps a linked clone)",
            (LOCK_GUEST, MAKE_BASES, LINK_OWNER, COMMIT_BASES), prepare_base),
    JobKind("template", "turn a guest into a template (every disk a base)",
            (LOCK_GUEST, MAKE_BASES, COMMIT_BASES), prepare_template),
    JobKind("copy", "copy a volume to a storage",
            (EXPORT, ALLOCATE, COPY, VERIFY_ACROSS, END_EXPORT), prepare_copy),
    JobKind("move", "move a guest's disk to a storage",
            (LOCK_GUEST, ALLOCATE, COPY, VERIFY, MAKE_MOVED_BASES, SWITCH, FREE_SOURCES), prepare_move),
    JobKind("migrate", "move a guest to another node: its disks on node-local storages copied there, verified",
            (LOCK_GUEST, EXPORT, ALLOCATE, COPY, VERIFY, END_EXPORT, MAKE_MOVED_BASES, SWITCH_NODE, FREE_SOURCES),
            prepare_migrate),
    JobKind("free", "free a volume",
            (FREE,), prepare_free),
    JobKind("destroy", "destroy a guest and free its disks",
            (LOCK_GUEST, CHECK_REPLICAS, DESTROY, FREE_REPLICAS), prepare_destroy),
    JobKind("ping", "check that a node's worker serves its queue (and the shared one)",
            (PING_SHARED, PING_NODE, PING_BACK), prepare_ping),
    JobKind("resize", "grow a volume",
            (LOCK_GUEST, RESIZE, UNLOCK_GUEST), prepare_resize),
    JobKind("unlock", "clear a guest's lock left by a job that is no longer live",
            (FORCE_UNLOCK,), prepare_unlock),
    JobKind("add_disk", "add disks to a guest: empty ones, or linked clones of base images",
            (LOCK_GUEST, ALLOCATE, ATTACH), prepare_add_disk),
    JobKind("detach", "keep a guest's disk as unused instead of attached",
            (LOCK_GUEST, DETACH), prepare_detach),
    JobKind("remove_disk", "free a guest's disk and drop it from the guest",
            (LOCK_GUEST, REMOVE_DISK), prepare_remove_disk),
    JobKind("assemble", "a new template whose disks are existing base images",
            (RESERVE_GUEST, COMMIT_ASSEMBLED), prepare_assemble),
    JobKind("import_pve", "adopt a Proxmox VE guest: its disks attached where they are, on a storage of its layout",
            (RESERVE_GUEST, COMMIT_ADOPTED), prepare_import_pve),
    JobKind("template_copy", "copy a template: full copies of its bases, made bases on the target",
            (RESERVE_GUEST, EXPORT, ALLOCATE, COPY, VERIFY_ACROSS, END_EXPORT, MAKE_COPY_BASES, COMMIT_TEMPLATE_COPY),
            prepare_template_copy),
    JobKind("backup", "back up a guest's config and disks into a backup storage",
            (LOCK_GUEST, BACKUP, UNLOCK_GUEST), prepare_backup),
    JobKind("restore", "restore a backup as a new guest, or over one with force (a template as a template)",
            (LOCK_GUEST, RESERVE_RESTORED, ALLOCATE, RESTORE_DATA, MAKE_RESTORED_BASES, COMMIT_RESTORED,
             FREE_REPLACED), prepare_restore),
    JobKind("verify", "read back every chunk of backups and check their digests", (VERIFY_BACKUPS,), prepare_verify),
    JobKind("prune", "forget the backups a retention does not keep", (PRUNE,), prepare_prune),
    JobKind("gc", "remove the chunks no backup refers to", (GC,), prepare_gc),
    JobKind("sync", "copy backups to another backup storage, only the chunks it lacks", (SYNC,), prepare_sync),
]}
