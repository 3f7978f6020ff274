"""What an operator reads: tables with a header row, sizes and times for people, filters, a
job's summary, storage status, orphans flagged; `--json` keeps bytes and the records."""

from __future__ import annotations

import json
import re

from tests.conftest import storage_path
from tests.helpers import volume_path

PYTHON_REPRS = re.compile(r"\[\'|\bNone\b|\bTrue\b|\bFalse\b|\{\'")


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def test_storage_status_shows_size_use_and_state_of_each_storage(stork, vmid):
    """As `pvesm status`: every storage, with total/used/available for people; one this node
    cannot read is listed inactive, saying why; --json has the bytes."""
    assert stork("guest", "create", vmid(), "--disk", "scsi0=local:8M")[0] == 0  # the storage's directory exists
    code, out, err = stork("storage", "status")
    assert code == 0, err
    table = rows(out)
    assert table[0] == ["NAME", "TYPE", "SHARED", "STATUS", "TOTAL", "USED", "AVAILABLE", "%"]
    by_name = {r[0]: r for r in table[1:]}
    assert by_name["local"][3] == "active" and by_name["local"][5] in ("GiB", "TiB", "MiB")
    assert "inactive: not on node node1" in out.splitlines()[[r[0] for r in table].index("local2")]
    code, out, _ = stork("--json", "storage", "status")
    local = next(r for r in json.loads(out) if r["id"] == "local")
    assert local["active"] and local["total"] > local["available"] > 0 and isinstance(local["used"], int)


def test_listings_are_tables_without_python_reprs(stork, vmid):
    """storage, volume, guest and job lists have a header row and no Python reprs."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:1", "--name", "sized")[0] == 0  # a bare number: GiB
    for args, header in ((["storage", "list"], "ID"), (["volume", "list", "local"], "VOLID"),
                         (["guest", "list"], "VMID"), (["job", "list"], "STARTED")):
        code, out, err = stork(*args)
        assert code == 0, err
        assert out.split()[0] == header and not PYTHON_REPRS.search(out), out[:400]
    code, out, _ = stork("volume", "list", "local")
    [row] = [r for r in rows(out) if r and r[0] == f"local:{g}/vm-{g}-disk-0.raw"]
    assert row[2:4] == ["1.0", "GiB"] and row[-1] == f"{g}:scsi0"


def test_job_list_filters_and_job_show_reads_as_a_summary(stork, client, vmid):
    """`job list --kind --vmid --state` narrows the list; `job show` has the steps with node,
    start, duration and outcome, the result, and no raw record."""
    g = vmid()
    job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    code, out, _ = stork("job", "list", "--kind", "create", "--vmid", str(g), "--state", "succeeded", "--since", "1h")
    assert code == 0 and [r[-1] for r in rows(out)[1:]] == [job.id]
    assert stork("job", "list", "--vmid", str(g), "--kind", "destroy")[1].count("\n") == 1  # the header only
    code, _, err = stork("job", "list", "--kind", "clone")  # a kind no job has: not an empty list, as if none ran
    assert code == 2 and err.startswith("stork: unknown job kind 'clone' (known: ") and err.count("\n") == 1
    code, out, _ = stork("job", "show", job.id)
    assert code == 0 and not PYTHON_REPRS.search(out)
    assert re.search(rf"^job: +{job.id}$", out, re.M) and re.search(r"^state: +succeeded$", out, re.M)
    steps = {r[0]: r for r in rows(out) if r and r[0] in job.steps}
    assert set(steps) == set(job.steps) and all("done" in r for r in steps.values())
    assert {r[1] for r in steps.values()} <= {"node1", "node2"}  # shared-queue steps run anywhere
    code, out, _ = stork("--json", "job", "show", job.id)
    assert json.loads(out)["id"] == job.id


def test_a_volume_no_guest_or_job_names_is_flagged_as_an_orphan(stork, vmid):
    """A leftover volume (made by hand, named by nothing) shows as ORPHAN; a disk does not."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    stray = storage_path("local") / str(g) / f"vm-{g}-disk-5.raw"
    stray.write_bytes(b"\0" * (1 << 20))
    try:
        _, out, _ = stork("volume", "list", "local")
        by_id = {r[0]: r for r in rows(out) if r}
        assert by_id[f"local:{g}/vm-{g}-disk-5.raw"][-1] == "ORPHAN"
        assert by_id[f"local:{g}/vm-{g}-disk-0.raw"][-1] == f"{g}:scsi0"
        _, out, _ = stork("--json", "volume", "info", f"local:{g}/vm-{g}-disk-5.raw")
        assert json.loads(out)["orphan"] is True
    finally:
        stray.unlink()


def test_disk_resize_takes_a_guest_disk_and_a_size_to_grow_by(stork, client, vmid):
    """`disk resize VMID DISK +SIZE` grows the disk by SIZE, as `qm disk resize`."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    code, _, err = stork("disk", "resize", g, "scsi0", "+4M")
    assert code == 0, err
    assert client.volume(f"local:{g}/vm-{g}-disk-0.raw").virtual_size == 12 << 20
    assert volume_path(f"local:{g}/vm-{g}-disk-0.raw").stat().st_size == 12 << 20
    code, _, err = stork("disk", "resize", g, "scsi9", "+4M")
    assert (code, err) == (2, f"stork: guest {g} has no disk scsi9\n")


def test_global_flags_work_before_or_after_the_subcommand(stork, client, vmid, tmp_path):
    """--json, --no-wait and --config FILE: before the subcommand as after it."""
    g = vmid()
    code, out, _ = stork("--no-wait", "--json", "guest", "create", g, "--disk", "scsi0=local:8M")
    assert code == 0 and set(json.loads(out)) == {"job"}
    client.wait(json.loads(out)["job"], timeout=60)
    code, out, _ = stork("guest", "show", g, "--json", "--config", str(client.cfg.file))
    assert code == 0 and json.loads(out)["vmid"] == g
    code, _, err = stork("--config", str(tmp_path / "none.toml"), "storage", "list")
    assert code == 1 and "none.toml: config file not found" in err


def test_refusals_that_need_no_other_node_come_before_a_job_exists(stork, client, vmid):
    """Freeing a disk in use, a shrink and a base of an unknown volume are refused at submit:
    one line, and no job is made."""
    g = vmid()
    assert stork("guest", "create", g, "--disk", "scsi0=local:8M")[0] == 0
    disk = f"local:{g}/vm-{g}-disk-0.raw"
    before = len(client.jobs(1000))
    for args, message in ((["volume", "free", disk], f"{disk} is in use by guest {g} (scsi0)"),
                          (["disk", "resize", disk, "4M"], f"{disk}: shrinking is not supported"),
                          (["base", f"local:{g}/vm-{g}-disk-7.raw"], f"unknown volume local:{g}/vm-{g}-disk-7.raw")):
        code, out, err = stork(*args)
        assert (code, out) == (1, "") and err.startswith(f"stork: {message}") and err.count("\n") == 1, err
    assert len(client.jobs(1000)) == before


def test_job_show_of_a_copy_on_one_node_says_its_export_steps_were_not_needed(stork, client, vmid):
    """A disk copy on one node goes without the steps only a copy between nodes runs: they
    are listed `not needed`, with no node, and every other step `done`."""
    g = vmid()
    job = client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}})
    copy = client.run("copy", volid=job.result["disks"]["scsi0"], storage="local")
    assert copy.state == "succeeded", copy.error
    code, out, _ = stork("job", "show", copy.id)
    outcome = {r[0]: " ".join(r[1:]) for r in rows(out) if r and r[0] in copy.steps}
    assert code == 0 and set(outcome) == {"export", "allocate", "copy_data", "verify_copy", "end_export"}
    for skipped in ("export", "verify_copy", "end_export"):
        assert "not needed" in outcome[skipped] and "node" not in outcome[skipped], outcome
    assert all("done" in outcome[s].split() for s in ("allocate", "copy_data")), outcome


def test_results_read_as_text_and_times_are_local_everywhere(stork, vmid, monkeypatch):
    """A backup's result in KiB/MiB/GiB, a destroy's freed volumes a line each, and backup
    list's TIME and VERIFIED in the local time zone, as job list's (TZ honoured); no reprs."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        g = vmid()
        assert stork("guest", "create", g, "--disk", "scsi0=local:16M", "--disk", "scsi1=local:16M")[0] == 0
        code, out, err = stork("backup", g, "--storage", "backup")
        assert code == 0, err
        assert re.search(r"^  size: +32\.0 MiB$", out, re.M) and not PYTHON_REPRS.search(out), out
        backup_id = re.search(r"^  backup: +(\S+)$", out, re.M).group(1)
        assert stork("verify", backup_id, "--storage", "backup")[0] == 0
        code, out, _ = stork("backup", "list", g, "--storage", "backup")
        [row] = [r for r in rows(out) if r and r[0] == backup_id]
        assert row[3].endswith("+09:00") and row[-1].endswith("+09:00"), row  # TIME and VERIFIED
        code, out, err = stork("guest", "destroy", g)
        assert code == 0, err
        freed = re.search(r"^  freed: +(\S+)\n +(\S+)$", out, re.M)
        assert freed and {freed.group(1), freed.group(2)} == {f"local:{g}/vm-{g}-disk-0.raw",
                                                              f"local:{g}/vm-{g}-disk-1.raw"}, out
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_command_imports_only_the_backends_its_config_names(redis_server, tmp_path):
    """A config's storages import their own backends only: with a dir storage and a plain
    chunk store, `job list` loads no other backend, nor the ciphers (an encrypted store's).
    (Redis's client imports cryptography's top module, to know whether it is there.)"""
    import os
    import subprocess
    import sys

    from tests.conftest import REDIS_PORT

    config = tmp_path / "stork.toml"
    config.write_text(f'[redis]\nurl = "redis://127.0.0.1:{REDIS_PORT}/0"\n[paths]\nguests = "{tmp_path}/guests"\n'
                      f'locks = "{tmp_path}/locks"\n[storage.local]\ntype = "dir"\npath = "{tmp_path}/images"\n'
                      f'[storage.backup]\ntype = "chunkstore"\npath = "{tmp_path}/backup"\n')
    probe = ("import sys, contextlib\nfrom producer import cli\nwith contextlib.suppress(SystemExit):\n"
             "    code = cli.main(['job', 'list', '--limit', '3'])\n"
             "print(code, sorted(m for m in sys.modules if m.startswith('drivers.backends.')),"
             " 'cryptography.hazmat.primitives.ciphers.aead' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "STORK_CONFIG": str(config)})
    assert done.stderr.strip().splitlines()[-1] == "0 ['drivers.backends.base', 'drivers.backends.dir'] False", \
        done.stderr[-2000:]
    probe = ("import sys, contextlib\nfrom producer import cli\nwith contextlib.suppress(SystemExit):\n"
             "    code = cli.main(['job', 'list', '--limit', '3'])\n"
             "print(code, 'drivers.backup.records' in sys.modules, file=sys.stderr)")
    config.write_text(config.read_text().split("[storage.backup]")[0])  # no backup storage: no backup code
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "STORK_CONFIG": str(config)})
    assert done.stderr.strip().splitlines()[-1] == "0 False", done.stderr[-2000:]


def test_job_list_reads_jobs_without_celery(redis_server):
    """Reading jobs needs no Celery: the client builds its app only to send one; nor kombu (its
    transports are named where an app is made) or the OVA and VMDK readers."""
    import os
    import subprocess
    import sys

    from tests.conftest import CONFIG

    unneeded = ["celery", "worker.app", "kombu", "drivers.ova", "drivers.vmdk"]
    probe = ("import sys, contextlib\nfrom producer import cli\nwith contextlib.suppress(SystemExit):\n"
             "    code = cli.main(['job', 'list', '--limit', '3'])\n"
             f"print(code, [m for m in {unneeded!r} if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "STORK_CONFIG": str(CONFIG)})
    assert done.stderr.strip().splitlines()[-1] == "0 []", done.stderr[-2000:]
