"""A job's result in text (producer/results.py), one table over what every kind of job records:
sizes human, lists and mappings a line each, prune decisions a table, nothing empty, never a
Python repr; and every key a step records is one the renderer knows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from producer import results
from worker.jobs.kinds import KINDS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kind", "result", "lines"),
    [
        ("backup", {"backup": "vm/200/2026-12-05T22:58:38Z", "storage": "backup", "size": 3221225472, "written": 456},
         ["backup:  vm/200/2026-12-05T22:58:38Z", "storage: backup", "size:    3.0 GiB", "written: 456 B"]),
        ("resize", {"volid": "local:100/vm-100-disk-0.raw", "size": 9663676416},
         ["volid: local:100/vm-100-disk-0.raw", "size:  9.0 GiB"]),
        ("prune", {"decisions": [{"id": "vm/1/a", "keep": True, "reason": "keep-last 1"},
                                 {"id": "vm/1/b", "keep": False, "reason": "older"}], "removed": 1, "dry_run": False},
         ["decisions:", "  ID      ACTION  WHY", "  vm/1/a  keep    keep-last 1", "  vm/1/b  remove  older",
          "removed: 1", "dry run: no"]),
        ("destroy", {"destroyed": 200, "freed": ["local:200/vm-200-disk-0.raw", "local:200/vm-200-disk-1.raw"]},
         ["destroyed: 200", "freed:     local:200/vm-200-disk-0.raw", "           local:200/vm-200-disk-1.raw"]),
        ("linked_clone", {"volumes": {"scsi0": "local:101/vm-101-disk-0.qcow2"}, "vmid": 101,
                          "disks": {"scsi0": "local:101/vm-101-disk-0.qcow2", "efidisk0": "local:101/e.qcow2"}},
         ["volumes: scsi0 = local:101/vm-101-disk-0.qcow2", "vmid:    101",
          "disks:   scsi0    = local:101/vm-101-disk-0.qcow2", "         efidisk0 = local:101/e.qcow2"]),
        ("move", {"vmid": 100, "disks": {"scsi0": "fast:100/vm-100-disk-0.raw"}, "bases": {}, "replaced": {}},
         ["vmid:  100", "disks: scsi0 = fast:100/vm-100-disk-0.raw"]),  # empty values are left out
        ("template", {"vmid": 9000, "template": True, "disks": {"scsi0": "local:base-9000-disk-0.raw"}},
         ["vmid:     9000", "template: yes", "disks:    scsi0 = local:base-9000-disk-0.raw"]),
        ("gc", {"chunks_removed": 3, "bytes_removed": 12582912, "chunks_kept": 10, "partials_removed": 0,
                "bad_chunks_removed": 0, "chunks_too_new": 0, "removable_after": None},
         ["chunks removed:     3", "bytes removed:      12.0 MiB", "chunks kept:        10", "partials removed:   0",
          "bad chunks removed: 0", "chunks too new:     0"]),
        ("sync", {"copied": ["vm/1/a"], "present": 2, "mended": ["vm/1/b"], "written": 2048},
         ["copied:  vm/1/a", "present: 2", "mended:  vm/1/b", "written: 2.0 KiB"]),
        ("verify", {"verified": {"vm/1/a": "ok", "vm/2/b": "damaged"}},
         ["verified: vm/1/a = ok", "          vm/2/b = damaged"]),
        ("migrate", {"vmid": 100, "node": "node2", "kept": {"node": "node1", "volumes": ["local:100/a.raw"]}},
         ["vmid: 100", "node: node2", "kept: node    = node1", "      volumes = local:100/a.raw"]),
        ("ping", {"pong_node": "node2", "pong_back": "node1"}, ["pong node: node2", "pong back: node1"]),
    ],
)
def test_every_kind_of_result_reads_as_text(kind, result, lines):
    assert results.render(result, indent="") == lines


REPR = re.compile(r"[\[\]{}']|\bTrue\b|\bFalse\b|\bNone\b")


@pytest.mark.parametrize("key", sorted(results.KNOWN))
@pytest.mark.parametrize("value", [3221225472, "local:1/a.raw", ["a", "b"], {"scsi0": "local:1/a.raw", "x": [1]},
                                   True, None, []])
def test_no_value_reads_as_a_python_repr(key, value):
    if key in results.TABLES:
        value = [{"id": "vm/1/a", "keep": True, "reason": "r"}]
    assert not [line for line in results.render({key: value}) if REPR.search(line)]


def _recorded_keys() -> set[str]:
    """Every result key a step names: set_result's keywords, and the keys of a dict literal
    spread into it (`**{"key": ...}`), read from worker/jobs with the ast module."""
    keys: set[str] = set()
    for path in (ROOT / "worker" / "jobs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "set_result":
                for kw in node.keywords:
                    if kw.arg is not None:
                        keys.add(kw.arg)
                    elif isinstance(kw.value, ast.IfExp | ast.Dict):
                        for found in ast.walk(kw.value):
                            if isinstance(found, ast.Dict):
                                keys |= {k.value for k in found.keys if isinstance(k, ast.Constant)}
    return keys


def test_every_key_a_step_records_is_one_the_renderer_knows():
    """A new result key without a rendering fails here, not in front of a user."""
    keys = _recorded_keys()
    keys |= {"decisions", "removed", "dry_run", "warning"}  # what backups._prune returns, spread into the result
    keys |= {step.name for kind in KINDS.values() for step in kind.steps if step.name.startswith("pong")}
    assert {"size", "freed", "disks", "kept", "verified"} <= keys  # the reader finds what steps record
    assert keys <= results.KNOWN, sorted(keys - results.KNOWN)


def test_a_failed_jobs_made_volumes_read_as_undone_and_its_findings_stand():
    result = {"volumes": {"scsi0": "local:1/a.raw"}, "verified": {"vm/1/a": "ok"}, "warning": "kept x"}
    assert results.split_undone(result, True) == (result, {})
    stands, undone = results.split_undone(result, False)
    assert undone == {"volumes": {"scsi0": "local:1/a.raw"}} and stands == {"verified": {"vm/1/a": "ok"},
                                                                             "warning": "kept x"}


def test_schedule_list_shows_times_in_the_local_zone(monkeypatch):
    import time

    from producer import views

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        row = {"name": "nightly", "schedule": "0 2 * * *", "action": "backup", "guests": "all", "exclude": [7],
               "storage": "backup", "target": None, "keep": {}, "enabled": True, "last": "2026-12-05T02:00:00+00:00",
               "outcome": "1 succeeded", "next": "2026-12-06T02:00:00+00:00"}
        text = views.schedules([row])
        assert "2026-12-05T11:00:00+09:00" in text and "2026-12-06T11:00:00+09:00" in text and "all except 7" in text
    finally:
        monkeypatch.undo()
        time.tzset()
