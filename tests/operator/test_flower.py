"""What an operator sees in Flower: a real Flower process (`python -m worker.run.flower`, with
basic auth) on the session's Redis and workers, read through its REST API and its pages, and
rendered by headless Chromium where Debian's `chromium` is installed.

A copy is held mid-way (its qemu-img stopped with SIGSTOP, resumed after) so that what
Flower shows of a running copy is checked without racing the copy."""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import BASE, CONFIG, _vmids, storage_path
from tests.helpers import CHROMIUM, FLOWER_LOGIN, PATTERN_MIB, Flower, held_copy, running_flower
from worker.testing import free_port, wait_for

USER, PASSWORD = FLOWER_LOGIN
FINAL = {"SUCCESS", "FAILURE", "CANCELLED", "IGNORED"}


# ---- without a cluster ---------------------------------------------------------------


def _job(kind: str, params: Any, job_id: str = "0123456789ab") -> Any:
    from worker.records import JobRecord

    return JobRecord(id=job_id, kind=kind, params=params, node="node1", steps=[], queues=[])


@pytest.mark.parametrize(("kind", "params", "label"), [
    ("full_clone", {"vmid": 100, "new_vmid": 101, "disks": {"scsi0": {"storage": "local", "source": "local:100/a.raw"}},
                    "storages": ["local"]}, "full_clone 100->101 scsi0 local"),
    ("full_clone", {"vmid": 100, "new_vmid": 101, "storages": ["fast", "local"],
                    "disks": {"scsi0": {"storage": "fast", "source": "local:100/a.raw"},
                              "virtio1": {"storage": "fast", "source": "local:100/b.raw"}}},
     "full_clone 100->101 scsi0,virtio1 local->fast"),
    ("linked_clone", {"vmid": 100, "new_vmid": 102, "storages": ["local"],
                      "disks": {"scsi0": {"storage": "local", "base": "local:base/base-100-disk-0.raw"}}},
     "linked_clone 100->102 scsi0 local"),
    ("move", {"lock_vmid": 7, "storages": ["local", "shared"],
              "disks": {"scsi0": {"storage": "shared", "source": "local:7/vm-7-disk-0.raw"}}},
     "move 7 scsi0 local->shared"),
    ("copy", {"storages": ["local", "shared"], "disks": {"copy": {"storage": "shared", "source": "local:7/d.raw"}}},
     "copy local:7/d.raw local->shared"),
    ("base", {"lock_vmid": None, "storages": ["local"], "bases": {"disk": {"source": "local:7/d.raw", "name": None}}},
     "base local:7/d.raw local"),
    ("detach", {"lock_vmid": 7, "disk": "scsi1", "storages": ["local"]}, "detach 7 scsi1 local"),
    ("resize", {"volid": "local:7/d.raw", "size": 1, "storages": ["local"]}, "resize local:7/d.raw local"),
    ("ping", {"node": "node2", "storages": []}, "ping node2"),
    ("create", {"new_vmid": 5, "disks": "forged", "storages": ["local"]}, "create"),  # never fails
    ("create", ["not", "a", "table"], "create"),
])
def test_a_task_label_names_the_job_in_words(kind, params, label):
    """Each task's label: the job id first, then kind, guests, disks, volume, storages (source->target)."""
    from worker.records import task_label

    assert task_label(_job(kind, params)) == f"job 0123456789ab: {label}"


def test_a_progress_event_carries_a_line_flower_shows():
    """Percent first (the task list cuts long cells), then bytes and rate."""
    from worker.tasks import progress_text

    fields = {"done": 3 << 29, "total": 4 << 30, "rate": 120 << 20, "step": "copy_data", "message": "scsi0: local:1/a"}
    assert progress_text(fields) == "37.5% 1.5 GiB of 4.0 GiB, 120.0 MiB/s (scsi0: local:1/a)"
    assert progress_text({"done": 0, "total": 0, "rate": 0}) == "0 B of 0 B, 0 B/s"
    assert progress_text({"done": 8 << 30, "total": 16 << 30, "rate": 1 << 30, "data_done": 1 << 30,
                          "data_total": 3 << 30}) == "50.0% 8.0 GiB of 16.0 GiB (data 1.0 GiB of 3.0 GiB), 1.0 GiB/s"
    assert progress_text({"done": "x"}) == ""


def test_flower_gets_its_columns_and_says_how_to_reach_its_api(tmp_path):
    """The task list shows the label (kwargs) and progress (result) columns; the start line
    says the REST API takes the basic-auth credentials, or needs them configured."""
    from drivers import config
    from worker.run import flower

    cfg = config.parse("", tmp_path / "stork.toml", {"STORK_NODE": "n"})
    assert "--tasks_columns=name,uuid,state,kwargs,result,received,runtime,worker" in flower.flower_argv(cfg, {})
    assert not any("tasks_columns" in a for a in flower.flower_argv(cfg, {"FLOWER_TASKS_COLUMNS": "name,state"}))
    assert "needs flower.basic_auth" in flower.api_note(cfg)
    cfg = config.parse("[flower]\nbasic_auth = 'a:b'\n", tmp_path / "stork.toml", {"STORK_NODE": "n"})
    assert "curl -u USER:PASSWORD http://127.0.0.1:5555/api/tasks" in flower.api_note(cfg)
    assert not any("a:b" in a for a in flower.flower_argv(cfg))


# ---- a task that raises Ignore gets an end event ---------------------------------------


@contextlib.contextmanager
def _scratch_job(r: Any, job: Any) -> Iterator[None]:
    """A job record that no sweep may act on: gone again (active set included) at the end."""
    from worker import events, records

    records.create(r, job, events.make(job.id, job.kind, "queued"))
    try:
        yield
    finally:
        r.srem(records.ACTIVE, job.id)
        r.zrem(records.JOBS, job.id)
        r.delete(records.job_key(job.id), records.events_key(job.id))


LATER = 4e9  # a retry time no sweep reaches


@pytest.mark.parametrize(("state", "final", "undo", "retried_since_start", "event", "text"), [
    ("undoing", "cancelled", None, False, "task-cancelled", "cancelled by user at 12.0% 1 B of 8 B, 1 B/s"),
    ("cancelled", "cancelled", None, False, "task-cancelled", "cancelled by user at 12.0% 1 B of 8 B, 1 B/s"),
    ("undoing", "failed", None, False, "task-failed", "job failed: it broke"),
    ("failed", "failed", None, False, "task-failed", "job failed: it broke"),
    ("running", "", None, False, "task-ignored", "not run: job {id} is running with 1 of 2 steps done"),
    ("succeeded", "", None, False, "task-ignored", "not run: job {id} is succeeded with 1 of 2 steps done"),
    ("undoing", "failed", 1, True, "task-failed", "undo of b: disk on fire (tried again later)"),
    ("undoing", "failed", 1, False, "task-ignored", "not run: job {id} is undoing, this undo is not due here"),
    ("undoing", "failed", 0, True, "task-ignored", "not run: job {id} is undoing, this undo is not due here"),
], ids=["cancel-undoing", "cancelled", "failed-undoing", "failed", "duplicate", "late-duplicate", "undo-failed",
        "undo-waiting", "undo-not-its-turn"])
def test_a_stopped_task_gets_a_final_state_from_its_job(redis_server, state, final, undo, retried_since_start,
                                                         event, text):
    """Celery sends no event for Ignore: the task sends one naming why, from the job record
    (an undo failed only if its retry was recorded while this task ran)."""
    from worker import records
    from worker.tasks import _why_stopped

    r = redis_server
    job = _job("full_clone", {}, records.new_id())
    job.steps, job.queues = ["a", "b"], ["shared", "shared"]
    with _scratch_job(r, job):
        error = "cancelled by user" if final == "cancelled" else "it broke"
        retry = {"index": 1, "attempts": 1, "at": LATER, "error": "undo of b: disk on fire"} if undo is not None else {}
        records.update(r, job.id, state=state, final=final, error=error, done=1, undo_retry=retry)
        started = 0.0 if retried_since_start else LATER
        task = SimpleNamespace(request=SimpleNamespace(stork_progress="12.0% 1 B of 8 B, 1 B/s"))
        got_event, fields = _why_stopped(task, job.id, undo, started)
        assert got_event == event and text.format(id=job.id) in " ".join(fields.values())
    assert _why_stopped(task, job.id, None, 0.0) == ("task-ignored", {"result": f"not run: unknown job {job.id!r}"})


# ---- the messages still read as ours ---------------------------------------------------


def test_labelled_messages_pass_the_dead_letter_check_and_recovery_reads_their_job(redis_server):
    """The label travels as a kwarg (its text also the kwargs' display form); the job id
    stays args[0], where recovery and the dead-letter check read it, and a fused run's last
    step as `through`, which recovery reads too."""
    from kombu.serialization import prepare_accept_content

    from worker import broker, deadletter, records, runner
    from worker.app import app

    r, queue = redis_server, f"flower-test-{os.getpid()}"
    job = _job("full_clone", {"vmid": 1, "new_vmid": 2, "storages": ["local"]}, records.new_id())
    job.steps = [s.name for s in runner.KINDS["full_clone"].steps]
    job.queues, job.undo = [queue] * len(job.steps), [3, 1, 0]  # allocate, reserve_guest, lock_guest
    with _scratch_job(r, job):
        try:
            runner.send_steps(job, job.steps.index("copy_data"))
            runner.dispatch_undo(job)
            runner.send_steps(job, 0)  # lock_guest, reserve_guest and allocate: one task (export is skipped)
            raws = r.lrange(queue, 0, -1)
            assert len(raws) == 3
            label = f"job {job.id}: full_clone 1->2 local"
            fused = f"{label} (steps lock_guest, reserve_guest, allocate)"
            seen = []
            for raw in raws:
                envelope = deadletter.check(raw.encode(), app.tasks, prepare_accept_content(["json"]))
                args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
                assert args[0] == job.id and envelope["headers"]["kwargsrepr"] == kwargs["label"]
                seen.append(kwargs)
            assert sorted(seen, key=len) == [{"label": label}, {"label": label}, {"label": fused, "through": 3}]
            pending = broker.pending_messages(r, {queue})[job.id]
            assert sorted((p.task, p.through) for p in pending) == [
                ("stork.full_clone.copy_data", None), ("stork.full_clone.lock_guest", 3),
                ("stork.full_clone.undo_allocate", None)]
        finally:
            r.delete(queue, f"_kombu.binding.{queue}")


# ---- a real Flower ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flower(workers, client) -> Iterator[Flower]:
    """`python -m worker.run.flower` with basic auth on a free port (it execs Flower: one PID)."""
    port = free_port()
    conf = BASE / f"flower-{port}.toml"
    conf.write_text(CONFIG.read_text() + f'\n[flower]\nport = {port}\nbasic_auth = "{USER}:{PASSWORD}"\n')
    conf.chmod(0o600)
    with running_flower(port, {**os.environ, "STORK_CONFIG": str(conf)}, BASE / f"flower-{port}.log") as f:
        wait_for(lambda: _lists_a_ping(f, client), 30, "Flower to list a ping's tasks")
        yield f


def _lists_a_ping(f: Flower, client: Any) -> bool:
    """Flower's event receiver is up once it lists a job sent after it started (it misses
    the events sent before it connected)."""
    ping = client.run("ping", node="node1")
    try:
        wait_for(lambda: len(f.tasks(ping.id)) == 3, 3)
    except AssertionError:
        return False
    return True


def test_the_rest_api_takes_the_configured_basic_auth(flower):
    """With flower.basic_auth the API answers the same credentials as the pages (and only those)."""
    assert flower.get("/api/tasks", auth=None)[0] == 401
    assert flower.get("/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/tasks", auth=None)[0] == 401
    status, body = flower.get("/api/task/types")
    assert status == 200 and "stork.ping.pong_node" in json.loads(body)["task-types"]
    assert flower.get("/tasks")[0] == 200
    assert "REST API with the flower.basic_auth credentials" in flower.log.read_text()


@dataclass
class CopyStory:
    job: Any = None
    running: dict[str, Any] = field(default_factory=dict)  # the copy task while its qemu-img was stopped
    running_page: str = ""
    rendered: dict[str, str] = field(default_factory=dict)  # page -> DOM from Chromium
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # the job's tasks once it ended
    final_page: str = ""


@pytest.fixture(scope="module")
def cancelled_copy(flower, client) -> CopyStory:
    """A full clone copying 1 GiB of data: held mid-copy (qemu-img stopped) while Flower is
    read, then cancelled and let go."""
    story = CopyStory()
    g, c = next(_vmids), next(_vmids)
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "2G"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        for i in range(0, 2048, 2):
            f.seek(i * PATTERN_MIB)
            f.write(b"\x6b" * PATTERN_MIB)
    job = client.submit("full_clone", vmid=g, newid=c)
    with held_copy(client, job.id):
        story.running = wait_for(lambda: flower.task(job.id, "stork.full_clone.copy_data", "PROGRESS"), 10,
                                 "Flower to show the copy in progress")
        story.running_page = flower.get(f"/task/{story.running['uuid']}")[1]
        if CHROMIUM:
            story.rendered["tasks-running"] = flower.render("/tasks")
        client.cancel(job.id)
    story.job = client.wait(job.id, timeout=60)
    wait_for(lambda: {t["state"] for t in flower.tasks(job.id).values()} <= FINAL, 10, "every task to end")
    story.final = flower.tasks(job.id)
    story.final_page = flower.get(f"/task/{story.running['uuid']}")[1]
    if CHROMIUM:
        story.rendered["task-cancelled"] = flower.render(f"/task/{story.running['uuid']}")
    return story


PROGRESS = re.compile(r"^\d+\.\d% [\d.]+ (B|KiB|MiB|GiB) of 2\.0 GiB \(data [\d.]+ (B|KiB|MiB|GiB) of [\d.]+ GiB\), "
                      r"[\d.]+ (B|KiB|MiB|GiB)/s \(scsi0: local:\d+/")


def test_a_running_copy_shows_its_label_and_progress(cancelled_copy):
    """The copy task is PROGRESS with percent, bytes and rate in its result, and its label
    (kind, guests, disk, storage, job id) as its kwargs: in the API and on its task page."""
    task, job = cancelled_copy.running, cancelled_copy.job
    label = f"job {job.id}: full_clone {job.params['vmid']}->{job.params['new_vmid']} scsi0 local"
    assert task["state"] == "PROGRESS" and task["kwargs"] == label and task["args"] == f"['{job.id}']"
    assert PROGRESS.match(task["result"]), task["result"]
    page = cancelled_copy.running_page  # read a moment later: the copy may have sent one more event
    assert html.escape(label) in page and ">PROGRESS<" in page
    assert PROGRESS.match(html.unescape(re.search(r"<dt>Result</dt>\s*<dd><pre[^>]*><code>(.*?)</code>", page)[1]))


def test_a_cancelled_copy_ends_cancelled_and_says_where(cancelled_copy):
    """No task of a cancelled job stays STARTED or PROGRESS: the copy ends CANCELLED with where
    it stopped, the undos and finalize SUCCESS, all with the job's label (the steps before the
    copy ran as one task, which names them)."""
    assert cancelled_copy.job.state == "cancelled"
    states = {t["name"].rpartition(".")[2]: t["state"] for t in cancelled_copy.final.values()}
    assert states == {"lock_guest": "SUCCESS", "copy_data": "CANCELLED", "undo_allocate": "SUCCESS",
                      "undo_reserve_guest": "SUCCESS", "undo_lock_guest": "SUCCESS", "finalize": "SUCCESS"}
    copy = next(t for t in cancelled_copy.final.values() if t["name"].endswith("copy_data"))
    assert PROGRESS.match(copy["result"].removeprefix("cancelled by user at ")), copy["result"]
    label = cancelled_copy.running["kwargs"]
    assert {t["kwargs"] for t in cancelled_copy.final.values()} == {
        label, f"{label} (steps lock_guest, reserve_guest, allocate)"}
    assert "CANCELLED" in cancelled_copy.final_page and "cancelled by user at" in cancelled_copy.final_page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_headless_chromium_shows_the_label_progress_and_final_state(cancelled_copy):
    """The pages as a browser renders them: the task list (filled in by script) with the copy
    in PROGRESS, its label and its percent; the task page once it was cancelled."""
    job, running = cancelled_copy.job, cancelled_copy.running
    tasks = cancelled_copy.rendered["tasks-running"]
    row = next(r for r in tasks.split("<tr") if running["uuid"] in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert ">PROGRESS<" in cells[2] and html.unescape(cells[3]) == running["kwargs"] and PROGRESS.match(cells[4]), row
    page = cancelled_copy.rendered["task-cancelled"]
    assert "CANCELLED" in page and f"job {job.id}" in page and "cancelled by user at" in page


def test_a_clone_lists_every_task_succeeded_and_a_duplicate_ends_ignored(flower, client):
    """Each task of a finished clone is SUCCESS with the job's label, a task that ran several
    steps naming them; a duplicate message of a done step ends IGNORED, saying why, instead of
    STARTED for ever."""
    from worker import runner

    g, c = next(_vmids), next(_vmids)
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    job = client.run("full_clone", vmid=g, newid=c, storage="shared")
    assert job.state == "succeeded"
    done = wait_for(lambda: (t := flower.tasks(job.id)) and sorted(x["state"] for x in t.values()) == ["SUCCESS"] * 3
                    and t, 10, "the clone's tasks")
    label = f"job {job.id}: full_clone {g}->{c} scsi0 local->shared"
    assert {t["name"]: t["kwargs"] for t in done.values()} == {
        "stork.full_clone.lock_guest": f"{label} (steps lock_guest, reserve_guest, allocate)",
        "stork.full_clone.copy_data": label, "stork.full_clone.commit_guest": label}
    runner.send_steps(client.job(job.id), 0)
    again = wait_for(lambda: flower.task(job.id, "stork.full_clone.lock_guest", "IGNORED"), 10, "the duplicate")
    assert again["result"] == f"not run: job {job.id} is succeeded with 8 of 8 steps done " \
                              "(a duplicate, or the step runs elsewhere)"


def test_a_failing_step_ends_failed(flower, client, tmp_path):
    """A step that fails (here: a guest folder that is a symlink) is FAILURE with the reason,
    in its exception and in the RESULT column."""
    g = next(_vmids)
    storage_path("local").mkdir(parents=True, exist_ok=True)
    (storage_path("local") / str(g)).symlink_to(tmp_path)
    try:
        job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "1M"}})
    finally:
        (storage_path("local") / str(g)).unlink()
    assert job.state == "failed"
    # the create's steps run as one task on node1 (worker/jobs/kinds.py: fuse), which ends FAILURE
    failed = wait_for(lambda: flower.task(job.id, "stork.create.reserve_guest", "FAILURE"), 10, "the failed step")
    assert "not a directory" in failed["exception"]
    # its RESULT column says the error, not a progress line
    wait_for(lambda: "not a directory" in (flower.task(job.id, "stork.create.reserve_guest")["result"] or ""), 10,
             "the error in the result column")
    wait_for(lambda: {t["state"] for t in flower.tasks(job.id).values()} <= FINAL, 10, "every task to end")


def test_a_step_whose_whole_worker_was_killed_ends_failed_in_flower(flower, client):
    """SIGKILL to a node's whole worker mid-copy: no process is left to end the copy task, so
    the restarted worker's recovery does, as FAILURE saying what happened; the undos it sends
    end too."""
    from tests.conftest import Worker
    from worker.recovery import SWEEP_KEY

    worker = Worker("crash", concurrency=1)
    try:
        g, c = next(_vmids), next(_vmids)
        client.run("create", vmid=g, node="crash", disks={"scsi0": {"storage": "crash", "size": "1G"}})
        with open(storage_path("crash") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
            for i in range(0, 1024, 4):
                f.seek(i * PATTERN_MIB)
                f.write(b"\x5a" * PATTERN_MIB)
        job = client.submit("full_clone", vmid=g, newid=c)
        with held_copy(client, job.id):
            running = wait_for(lambda: flower.task(job.id, "stork.full_clone.copy_data", "PROGRESS"), 10,
                               "Flower to show the copy in progress")
            # the other nodes' periodic sweep would find the dead process too, saying so in its own
            # words: held off for a minute, the restarted worker's own recovery is what this test sees
            client.r.set(SWEEP_KEY, "held off by the test", ex=60)
            worker.kill()  # the stopped qemu-img is in the group: it dies too
        worker = Worker("crash", concurrency=1)  # reconciles at start
        assert client.wait(job.id, timeout=60).state == "failed"
        ended = wait_for(lambda: flower.task(job.id, "stork.full_clone.copy_data", "FAILURE"), 10,
                         "Flower to end the copy")
        assert ended["uuid"] == running["uuid"]
        assert ended["exception"] == "the worker on node crash died during step copy_data"
        wait_for(lambda: {t["state"] for t in flower.tasks(job.id).values()} <= FINAL, 10, "every task to end")
    finally:
        client.r.delete(SWEEP_KEY)  # the sweep as it was
        worker.stop()
