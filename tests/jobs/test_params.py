"""The worker's check of job parameters read back from Redis: a described table of records."""

from __future__ import annotations

import pytest

from drivers.errors import InvalidName
from worker.jobs import params

GOOD = {"new_vmid": 101, "name": "", "node": "node1", "storages": ["local"],
        "disks": {"scsi0": {"storage": "local", "size": 1 << 20, "format": "raw", "owner": 101}}}

def disk(**changes: object) -> dict:
    """GOOD with its one planned disk changed."""
    return {**GOOD, "disks": {"scsi0": {**GOOD["disks"]["scsi0"], **changes}}}


BAD = [
    # (what, params, the one-line refusal)
    ("owner escaping the storage", disk(owner="../../v/x"),
     "params.disks.scsi0.owner: '../../v/x': expected a guest id"),
    ("owner as a string of digits", disk(owner="101"),
     "params.disks.scsi0.owner: '101': expected a guest id"),
    ("a size of zero", disk(size=0),
     "params.disks.scsi0.size: 0: expected a whole number > 0"),
    ("a format qemu would probe", disk(format="vmdk"),
     "params.disks.scsi0.format: invalid format 'vmdk'"),
    ("a relative import path", disk(source_path="x.raw"),
     "params.disks.scsi0.source_path: 'x.raw': expected an absolute path"),
    ("a source volume with ..", disk(source="local:base/../x.raw"),
     "params.disks.scsi0.source: invalid volume name 'base/../x.raw'"),
    ("an unknown disk key", {**GOOD, "disks": {"floppy0": GOOD["disks"]["scsi0"]}},
     "params.disks.floppy0: invalid disk 'floppy0'"),
    ("an unknown plan key", disk(path="/etc"),
     "params.disks.scsi0.path: unknown key"),
    ("an unknown top-level key", {**GOOD, "exec": "rm -rf /"}, "params.exec: unknown key"),
    ("a bad node name", {**GOOD, "node": "N1!"}, "params.node: invalid node name 'N1!'"),
    ("a bad storage id", {**GOOD, "storages": ["../x"]}, "params.storages: invalid storage id '../x'"),
    ("a flag that is not a bool", {**GOOD, "pinned": "yes"}, "params.pinned: 'yes': expected true or false"),
    ("a base name with a slash", {**GOOD, "bases": {"disk": {"source": "local:100/vm-100-disk-0.raw", "name": "a/b"}}},
     "params.bases.disk.name: invalid base name 'a/b'"),
    ("not a table at all", ["x"], "params: ['x']: expected a table"),
    ("a guest config rev that is none", {**GOOD, "expect_rev": "0123"},
     "params.expect_rev: '0123': expected a guest config's rev"),
]


@pytest.mark.parametrize(("what", "record", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_record_is_refused_naming_the_key(what, record, message):
    """Each bad value is refused with one line naming where it sits in the record."""
    with pytest.raises(InvalidName) as refused:
        params.check(record)
    assert str(refused.value).startswith(f"job record refused: {message}")


def test_a_well_formed_record_passes():
    """What prepare makes for a create job passes the check unchanged."""
    params.check(GOOD)


BAD_CTX = [
    ("a made volume that is not a volume id", {"made": {"scsi0": "../../etc/passwd"}}, "ctx.made.scsi0: invalid"),
    ("a base pair of the wrong shape", {"based": {"disk": 5}}, "ctx.based.disk: 5: expected [volume id, base"),
    ("an unknown key", {"exec": 1}, "ctx.exec: unknown key"),
    ("a guest id that is not one", {"destroying": "100; rm"}, "ctx.destroying: '100; rm': expected a guest id"),
]


@pytest.mark.parametrize(("what", "ctx", "message"), BAD_CTX, ids=[b[0] for b in BAD_CTX])
def test_what_steps_saved_in_a_record_is_checked_too(what, ctx, message):
    """The data steps save for later steps and undos (`ctx`) is input as well, checked the same way."""
    from worker.records import JobRecord

    job = JobRecord(id="j", kind="create", params=GOOD, node="node1", steps=[], queues=[], ctx=ctx)
    with pytest.raises(InvalidName) as refused:
        params.check_record(job)
    assert str(refused.value).startswith(f"job record refused: {message}")


def test_a_volume_is_checked_at_submit_only_where_this_node_sees_the_jobs_storage(tmp_path):
    """A node-local storage of the same name on another node holds other volumes: a command on
    node2 for node1's guest leaves the check to the step, on node1 (it never looks, or makes
    a directory, on node2); on node1 the same command checks at once."""
    from drivers import config
    from drivers.errors import NotFound
    from drivers.guests import Guest, GuestStore
    from worker.jobs import prepare

    text = '[paths]\nguests = "g"\nlocks = "l"\n[storage.loc]\ntype = "dir"\npath = "images"\n'
    (tmp_path / "stork.toml").write_text(text)
    on = {node: config.parse(text, tmp_path / "stork.toml", {"STORK_NODE": node}) for node in ("node1", "node2")}
    GuestStore(on["node1"].guests_dir).create(Guest(100, "node1", disks={"scsi0": "loc:100/vm-100-disk-0.raw"}))
    options = {"volid": "loc:100/vm-100-disk-0.raw", "size": "1G"}
    assert prepare.prepare_resize(dict(options), on["node2"])["node"] == "node1"
    assert not (tmp_path / "images").exists()
    with pytest.raises(NotFound, match=r"unknown volume loc:100/vm-100-disk-0.raw"):
        prepare.prepare_resize(dict(options), on["node1"])
