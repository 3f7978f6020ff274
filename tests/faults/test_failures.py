"""A job failing halfway undoes what it made: no orphan volume, no guest left locked, no
half-written config."""

from __future__ import annotations

import os

import pytest

from tests.conftest import BASE, storage_path
from tests.helpers import PATTERN_MIB, snapshot, tmpfs


@pytest.fixture(scope="module")
def small_fs():
    """A 16 MiB tmpfs as the `small` storage, so that a copy runs out of space."""
    with tmpfs(BASE / "small", "16m") as path:
        yield path


def test_a_copy_that_runs_out_of_space_fails_and_frees_its_target(client, vmid, small_fs):
    """A full clone onto a full file system fails with the tool's reason; all of it is undone."""
    g, c = vmid(), vmid()
    job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "64M"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(os.urandom(48 * PATTERN_MIB))
    before = snapshot()
    job = client.run("full_clone", vmid=g, newid=c, storage="small")
    assert job.state == "failed"
    assert job.error.startswith(f"copying local:{g}/vm-{g}-disk-0.raw to small:") and "No space left" in job.error
    assert [i for i in job.undone] == job.undo and not job.undo_errors
    assert list(small_fs.iterdir()) == []
    assert not client.guest_store.exists(c)
    assert client.guest(g).lock == ""
    assert snapshot() == before


def test_a_failed_job_lists_what_it_undid_in_its_events(client, vmid, small_fs):
    """The event stream of a failed job shows the failure, each undo, and the end."""
    g, c = vmid(), vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "64M"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(os.urandom(48 * PATTERN_MIB))
    seen = []
    job = client.run("full_clone", vmid=g, newid=c, storage="small", on_event=seen.append)
    phases = [(e["phase"], e.get("step")) for e in seen]
    assert ("failed", None) in phases
    assert [s for p, s in phases if p == "undo"] == ["allocate", "reserve_guest", "lock_guest"]
    assert seen[-1]["phase"] == "finished" and seen[-1]["state"] == "failed" == job.state


def test_worker_logs_are_json_lines_bound_to_job_step_node_and_storage(client, vmid, small_fs):
    """A failing job's log lines name its job id, step, node and storage."""
    import json

    g, c = vmid(), vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "64M"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(os.urandom(48 * PATTERN_MIB))
    job = client.run("full_clone", vmid=g, newid=c, storage="small")
    lines = [json.loads(line) for log in BASE.glob("worker-node*.log") for line in log.read_text().splitlines()
             if line.startswith("{") and job.id in line]
    undo = next(line for line in lines if line["event"] == "job_undo")
    assert undo["job_id"] == job.id and undo["step"] == "copy_data" and undo["storage"] in ("local", "small")
    assert undo["node"] in ("node1", "node2") and undo["level"] == "info" and "timestamp" in undo


def test_a_failed_step_is_logged_in_one_line_without_a_traceback(client, workers, vmid, small_fs):
    """A failure stork explains (here: no space left) is a structured warning and Celery's one
    'raised expected' line; tracebacks are kept for bugs."""
    g, c = vmid(), vmid()
    client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "64M"}})
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(os.urandom(48 * PATTERN_MIB))
    job = client.run("full_clone", vmid=g, newid=c, storage="small")
    assert job.state == "failed"
    lines = [line for w in workers.values() for line in w.log.read_text().splitlines() if f"local:{g}/" in line]
    assert any('"step_failed"' in line and job.id in line and "No space left" in line for line in lines), lines
    assert any("raised expected" in line for line in lines), lines
    assert not any("raised unexpected" in line for line in lines), lines


def test_an_import_whose_data_does_not_fit_its_storage_is_refused_at_submit(client, stork, vmid, small_fs,
                                                                           tmp_path):
    """48 MiB of data into the 16 MiB `small` storage: refused before a job exists, naming the
    room there is; a sparse image of a larger virtual size but little data goes in."""
    g = vmid()
    image = tmp_path / "full.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(48 * PATTERN_MIB))
    before = snapshot()
    code, _, err = stork("guest", "import", g, "--disk", f"scsi0={image},storage=small")
    assert code == 1 and err.count("\n") == 1
    assert "storage 'small' has 1" in err and "MiB free: the image(s) to import hold 48 MiB of data" in err
    assert snapshot() == before and not client.guest_store.exists(g)
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(256 * PATTERN_MIB)
        f.write(os.urandom(PATTERN_MIB))
    code, _, err = stork("guest", "import", g, "--disk", f"scsi0={sparse},storage=small")
    assert code == 0, err
    assert client.run("destroy", vmid=g).state == "succeeded"
