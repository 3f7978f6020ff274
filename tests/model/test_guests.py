"""Guest configs: one file per guest, atomic writes, exclusive creation, flock while editing."""

import argparse
import contextlib
import errno
import json
import mmap
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import guest_index, guest_watch, guests
from drivers.errors import AlreadyExists, ConfigError, LockTimeout, NotFound, Refused
from drivers.guest_index import VolumeIndex
from drivers.guests import Guest, GuestStore, dumps, loads
from producer.cli import cmd_guest_list


@pytest.fixture
def store(tmp_path):
    return GuestStore(tmp_path / "guests", lock_timeout=0.3)


def test_a_guest_round_trips_through_its_file(store):
    """Everything written is read back the same."""
    guest = Guest(100, "node1", name="web", template=True, lock="clone",
                  disks={"scsi0": "local:base/base-100-disk-0.raw"}, unused=("local:100/vm-100-disk-1.raw",))
    store.create(guest)
    read = store.read(100)
    assert read == guest.with_(rev=read.rev) and len(read.rev) == 16  # a new guest's rev, made at create
    assert [g.vmid for g in store.list()] == [100]


def test_creating_an_existing_guest_is_refused_and_keeps_the_old_config(store):
    """create() never overwrites: the second create of an id fails, the first stays."""
    store.create(Guest(100, "node1", name="first"))
    with pytest.raises(AlreadyExists, match="guest 100 already exists"):
        store.create(Guest(100, "node1", name="second"))
    assert store.read(100).name == "first"
    assert not [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]


def test_unknown_guest_is_not_found(store):
    """Reading a guest that has no file names the id."""
    with pytest.raises(NotFound, match="unknown guest 123"):
        store.read(123)


def test_editing_writes_back_only_a_changed_config(store):
    """editing() writes the new Guest atomically when it was changed."""
    store.create(Guest(100, "node1"))
    with store.editing(100) as box:
        box[0] = box[0].with_(lock="backup")
    assert store.read(100).lock == "backup"
    with pytest.raises(Refused, match=r"guest 100 is locked \(backup\)"):
        store.read(100).require_unlocked()


def test_the_rev_is_renewed_by_every_change_of_the_disks_and_by_create_only(store):
    """A job checks the rev it saw at submit: disks changed and changed back, or a guest made
    again alike, give another rev (the volume ids alone would match); a lock does not."""
    disks = {"scsi0": "local:100/vm-100-disk-0.raw", "scsi1": "local:100/vm-100-disk-1.raw"}
    store.create(Guest(100, "node1", disks=disks))
    made = store.read(100).rev
    with store.editing(100) as box:
        box[0] = box[0].with_(lock="backup", lock_job="j-1", unused=("local:100/vm-100-disk-2.raw",))
    assert store.read(100).rev == made
    with store.editing(100) as box:
        box[0] = box[0].with_(disks={"scsi0": disks["scsi0"]})
    removed = store.read(100).rev
    with store.editing(100) as box:
        box[0] = box[0].with_(disks=disks, rev=made)  # whatever rev the new Guest carries
    again = store.read(100)
    assert again.disks == disks and len({made, removed, again.rev}) == 3
    store.delete(100)
    store.create(Guest(100, "node1", disks=disks))
    assert store.read(100).rev not in {made, removed, again.rev}


def test_the_config_flock_times_out_while_another_holder_edits(store):
    """A second editor waits for the flock and gives up with LockTimeout."""
    store.create(Guest(100, "node1"))
    held, release = threading.Event(), threading.Event()

    def holder():
        with store.locked(100):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(LockTimeout, match="guest 100"), store.locked(100):
            pass
    finally:
        release.set()
        t.join()


# ---- strict reading, fail-closed listing, no temp files left behind --------------------

GOOD = 'name = "web"\nnode = "node1"\ntemplate = false\n\n[disks]\nscsi0 = "local:101/vm-101-disk-0.raw"\n'


@pytest.mark.parametrize(("text", "problem"), [
    ('node = "node1"\n[disks\n', "invalid TOML"),
    ('node = "node1"\n[disk]\nscsi0 = "local:101/vm-101-disk-0.raw"\n', "unknown key 'disk' (expected one of: "),
    ('name = "web"\n', "missing key 'node'"),
    ('node = ""\n', 'node = "": invalid node name'),
    ('node = "Node 1"\n', "invalid node name"),
    ('node = "node1"\nname = 5\n', "name = 5: expected a string"),
    ('node = "node1"\ntemplate = "yes"\n', 'template = "yes": expected true or false'),
    ('node = "node1"\nlock = 1\n', "lock = 1: expected a string"),
    ('node = "node1"\nlock_job = false\n', "lock_job = false: expected a string"),
    ('node = "node1"\nrev = "x1"\n', 'rev = "x1": expected 16 hexadecimal digits'),
    ('node = "node1"\nrev = 7\n', "rev = 7: expected a revision token"),
    ('node = "node1"\ndisks = "local:x"\n', 'disks = "local:x": expected a table'),
    ('node = "node1"\n[disks]\nscsi0 = 5\n', "disks.scsi0 = 5: expected a volume id"),
    ('node = "node1"\n[disks]\nscsi0 = "nocolon"\n', "disks.scsi0 = \"nocolon\": invalid volume id"),
    ('node = "node1"\n[disks]\nfloppy0 = "local:101/vm-101-disk-0.raw"\n', "disks: invalid disk 'floppy0'"),
    ('node = "node1"\nunused = "local:101/vm-101-disk-1.raw"\n', "expected a list of volume ids"),
    ('node = "node1"\nunused = ["local:101/vm-101-disk-1.raw", ":x"]\n', 'unused[1] = ":x": invalid'),
    ('node = "node1"\nnotes = "a\\nb"\n', 'notes = "a\\nb": expected one line of at most 1024 printable'),
    ('node = "node1"\n[disks]\nscsi0 = "pve:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2"\n',
     "the long form of a linked clone's volume id: write it pve:101/vm-101-disk-0.qcow2"),
])
def test_a_broken_config_makes_read_raise_one_line_naming_the_file(store, text, problem):
    """Invalid TOML, an unknown key, a wrong type or a bad volume id is a ConfigError naming the file."""
    store.dir.mkdir(parents=True)
    file = store.dir / "101.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        store.read(101)
    message = str(caught.value)
    assert message.startswith(f"{file}: broken guest config: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "problem"), [
    ('node = "node1"\nx = ' + "1" * 5000 + "\n", "not read: Exceeds the limit (4300 digits)"),
    ('node = "node1"\nx = ' + "[" * 1000 + "]" * 1000 + "\n", "not read: nested too deeply"),
], ids=["huge integer", "deep nesting"])
def test_a_config_tomllib_cannot_read_is_a_config_error_not_a_crash(store, text, problem):
    """tomllib raises ValueError or RecursionError, not its decode error, for these: taken for a
    crash, one such file stopped every sweep's recovery of jobs across the cluster."""
    store.dir.mkdir(parents=True)
    (store.dir / "101.toml").write_text(text)
    with pytest.raises(ConfigError, match=rf"101\.toml: broken guest config: {re.escape(problem)}"):
        store.read(101)
    assert [f.name for f, _ in store.scan()[1]] == ["101.toml"]


@pytest.mark.parametrize("how", ["renamed over (sed -i)", "rewritten in place"])
def test_a_hand_edit_made_while_stork_edits_a_config_is_not_written_over(store, how):
    """A hand edit takes no flock: one that lands between stork's read and its write (here, a
    disk attached from unused) would be undone without a word, the disk unused again, and
    `volume free` would take it. stork's write is refused instead, the hand edit kept."""
    disk = "local:101/vm-101-disk-1.raw"
    store.create(Guest(101, "node1", unused=(disk,)))
    file = store.path(101)
    by_hand = file.read_text().replace("unused = [", "unused = [] # ").replace("[disks]", "") + \
        f'[disks]\nscsi1 = "{disk}"\n'
    with pytest.raises(ConfigError, match=rf"{file}: changed by another hand while stork edited it"), \
            store.editing(101) as box:
        if how == "rewritten in place":
            time.sleep(0.01)  # a later mtime, on file systems that keep coarse times too
            with open(file, "r+") as f:
                f.write(by_hand)
                f.truncate()
        else:
            (file.parent / "101.toml.sed").write_text(by_hand)
            os.replace(file.parent / "101.toml.sed", file)
        box[0] = box[0].with_(lock="backup")
    kept = store.read(101)
    assert (kept.disks, kept.unused, kept.lock) == ({"scsi1": disk}, (), "")
    with store.editing(101) as box:  # the next edit reads it anew, and writes
        box[0] = box[0].with_(lock="backup")
    assert store.read(101).disks == {"scsi1": disk}


def test_a_config_that_is_not_utf8_is_a_config_error(store):
    """Bytes that are not UTF-8 are reported like any broken config, not as a decode traceback."""
    store.dir.mkdir(parents=True)
    (store.dir / "101.toml").write_bytes(b'node = "\xff"\n')
    with pytest.raises(ConfigError, match=r"101\.toml: broken guest config: not UTF-8 text"):
        store.read(101)


def test_every_field_round_trips_including_awkward_strings(store):
    """dumps() writes what loads() reads back, for quotes, control and non-BMP characters too."""
    guest = Guest(101, "node-1", name='a "q" \\ \t \U0001f642 é', lock="move", lock_job="j-1",
                  rev="0123456789abcdef",
                  disks={"scsi0": "local:101/vm-101-disk-0.raw", "virtio1": "other:base/b.qcow2"},
                  unused=("local:101/vm-101-disk-1.raw",))
    assert loads(101, dumps(guest), store.path(101)) == guest
    store.create(guest)
    read = store.read(101)
    assert read == guest.with_(rev=read.rev) and read.rev != guest.rev


def test_list_fails_closed_while_scan_reports_the_broken_config(store):
    """list() raises ConfigError naming the broken file; scan() returns good guests and the broken one."""
    store.create(Guest(100, "node1", disks={"scsi0": "local:100/vm-100-disk-0.raw"}))
    store.create(Guest(102, "node1"))
    broken = store.dir / "101.toml"
    broken.write_text(GOOD.replace("[disks]", "[disk]"))
    with pytest.raises(ConfigError, match=rf"^{broken}: broken guest config: unknown key 'disk'"):
        store.list()
    guests, bad = store.scan()
    assert [g.vmid for g in guests] == [100, 102]
    assert len(bad) == 1 and bad[0][0] == broken
    assert bad[0][1].startswith(f"{broken}: broken guest config: unknown key 'disk'")


@pytest.mark.parametrize("name", ["abc.toml", "0101.toml", "99.toml"])
def test_a_toml_file_not_named_by_a_guest_id_counts_as_broken(store, name):
    """`abc.toml` or `0101.toml` cannot be told apart from a guest by a user, so it is broken, not skipped."""
    store.create(Guest(100, "node1"))
    (store.dir / name).write_text(GOOD)
    with pytest.raises(ConfigError, match=rf"{name}: broken guest config: file name '{name}' is not <vmid>\.toml"):
        store.list()
    guests, bad = store.scan()
    assert [g.vmid for g in guests] == [100] and [f.name for f, _ in bad] == [name]


def test_hidden_temp_files_are_not_configs(store):
    """A temp file such as `.101.toml.x.tmp` (even with a broken body) is ignored by list()."""
    store.create(Guest(100, "node1"))
    (store.dir / ".101.toml.x.tmp").write_text("not toml [")
    (store.dir / ".hidden.toml").write_text("not toml [")
    assert [g.vmid for g in store.list()] == [100]
    assert store.scan()[1] == []


def test_a_missing_directory_lists_no_guests(tmp_path):
    """Before the first guest is created there is nothing to list and nothing broken."""
    store = GuestStore(tmp_path / "nowhere")
    assert store.list() == [] and store.scan() == ([], [])


def _temps(store):
    return sorted(p.name for p in store.dir.iterdir() if p.name.endswith(".tmp"))


def test_a_write_failing_at_fsync_leaves_no_temp_file_and_keeps_the_old_config(store, monkeypatch):
    """ENOSPC while the temp file is synced removes the temp file and re-raises; the config is unchanged."""
    store.create(Guest(101, "node1", name="old"))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        store.write(Guest(101, "node1", name="new"))
    with pytest.raises(OSError, match="No space left"), store.editing(101) as box:
        box[0] = box[0].with_(name="new")
    with pytest.raises(OSError, match="No space left"):
        store.create(Guest(102, "node1"))
    monkeypatch.undo()
    assert _temps(store) == []
    assert store.read(101).name == "old" and not store.exists(102)


def test_a_guest_that_cannot_be_written_leaves_no_file(store):
    """A Guest whose disks dumps() cannot write, or that would read back broken, is refused before any file."""
    store.create(Guest(101, "node1", name="old"))
    with pytest.raises(TypeError):
        store.write(Guest(101, "node1", disks={"scsi0": object()}))  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"101\.toml: refusing to write a broken guest config: disks\.scsi0 = 5"):
        store.write(Guest(101, "node1", disks={"scsi0": 5}))  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="refusing to write a broken guest config: disks: invalid disk 'disk0'"):
        store.create(Guest(102, "node1", disks={"disk0": "local:102/vm-102-disk-0.raw"}))
    assert _temps(store) == [] and not store.exists(102)
    assert store.read(101).name == "old"


def test_stale_temp_files_are_swept_unless_their_guests_writer_is_at_work(store):
    """`.101.toml.deadbeef.tmp` left by a crashed writer goes at the sweep; one of a guest whose
    flock is held (a live writer's) stays; a write lists no directory (one listing per sweep)."""
    store.create(Guest(101, "node1"))
    store.create(Guest(102, "node1"))
    (store.dir / ".101.toml.deadbeef.tmp").write_text("half a config")
    (store.dir / ".1010.toml.0123abcd.tmp").write_text("another guest's")
    (store.dir / ".0101.toml.deadbeef.tmp").write_text("not a name stork writes: left alone")
    store.write(Guest(101, "node1", name="other"))
    assert _temps(store) == [".0101.toml.deadbeef.tmp", ".101.toml.deadbeef.tmp", ".1010.toml.0123abcd.tmp"]
    with store.locked(1010):
        assert store.sweep_temps() == 1
        assert _temps(store) == [".0101.toml.deadbeef.tmp", ".1010.toml.0123abcd.tmp"]
    assert store.sweep_temps() == 1 and _temps(store) == [".0101.toml.deadbeef.tmp"]
    assert store.read(101).name == "other" and store.sweep_temps() == 0


def test_a_sweep_of_a_missing_directory_removes_nothing(tmp_path):
    assert GuestStore(tmp_path / "nowhere").sweep_temps() == 0


def test_create_waits_for_the_guest_flock(store):
    """create() takes the guest's flock, so it cannot race an editor of the same id."""
    with store.locked(101), pytest.raises(LockTimeout, match="guest 101"):
        store.create(Guest(101, "node1"))
    assert not store.exists(101) and _temps(store) == []


def test_temp_file_names_are_unpredictable_and_never_reused(store, monkeypatch):
    """The temp name carries a random token, and an existing file at that name is never opened."""
    store.create(Guest(101, "node1"))
    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * (2 * n))
    planted = store.dir / f".101.toml.{'0' * 16}.tmp"
    with store.locked(101):  # plant it after the sweep could run: the exclusive open must refuse it
        planted.write_text("planted")
        with pytest.raises(FileExistsError):
            store._write_temp(Guest(101, "node1", name="new"))
    assert planted.read_text() == "planted" and store.read(101).name == ""


def test_guest_list_shows_a_broken_config_as_a_row(store, capsys):
    """`stork guest list` shows readable guests and a BROKEN row (text and --json) and exits 0."""
    store.create(Guest(100, "node1", name="web"))
    broken = store.dir / "101.toml"
    broken.write_text('node = "node1"\nbogus = 1\n')
    (store.dir / "abc.toml").write_text(GOOD)
    client = SimpleNamespace(guest_store=store)

    assert cmd_guest_list(argparse.Namespace(json=False), client) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["VMID", "NAME", "NODE", "TYPE", "LOCK", "DISKS", "UNUSED", "PROBLEM"]
    assert lines[1].split()[:5] == ["100", "web", "node1", "guest", "0"]
    assert lines[2].split()[:2] == ["101", "BROKEN"] and lines[2].endswith(
        f"{broken}: broken guest config: unknown key 'bogus' (expected one of: "
        "name, node, template, lock, lock_job, rev, notes, unused, disks, replicas)")
    assert lines[3].split()[:2] == ["abc", "BROKEN"]
    assert f"{store.dir / 'abc.toml'}: broken guest config: file name" in lines[3]

    assert cmd_guest_list(argparse.Namespace(json=True), client) == 0  # type: ignore[arg-type]
    rows = json.loads(capsys.readouterr().out)
    assert [r["vmid"] for r in rows] == [100, 101, "abc"]
    assert rows[0]["name"] == "web"
    assert rows[1] == {"vmid": 101, "broken": f"{broken}: broken guest config: unknown key 'bogus' (expected one "
                                              "of: name, node, template, lock, lock_job, rev, notes, unused, disks, "
                                              "replicas)"}


def test_a_config_larger_than_any_is_broken_and_not_read_whole(tmp_path):
    """A config of MAX_CONFIG bytes is read (padded by a TOML comment); one byte more is broken."""
    store = GuestStore(tmp_path / "guests", lock_timeout=1)
    head = 'node = "node1"\n# '
    for vmid, size in ((101, guests.MAX_CONFIG), (102, guests.MAX_CONFIG + 1)):
        store.path(vmid).parent.mkdir(exist_ok=True)
        store.path(vmid).write_text(head + "x" * (size - len(head) - 1) + "\n")
        assert store.path(vmid).stat().st_size == size
    found, broken = store.scan()
    assert [g.vmid for g in found] == [101]
    assert broken == [(store.path(102), f"{store.path(102)}: broken guest config: larger than 1 MiB, "
                                         "not a guest config")]


def test_a_config_or_lock_file_that_is_a_symlink_or_fifo_is_never_followed(tmp_path):
    """A guest config that is a FIFO is broken (not a hang); a lock file planted as a symlink
    to a missing file is refused, and its target is not created."""
    import os

    from drivers.errors import Refused

    store = GuestStore(tmp_path / "guests", lock_timeout=1)
    store.create(Guest(101, "node1"))
    os.mkfifo(store.path(102))
    _, broken = store.scan()
    assert [str(path) for path, _ in broken] == [str(store.path(102))]
    assert "not a regular file" in broken[0][1]
    target = tmp_path / "created-through-the-link"
    (tmp_path / "guests" / ".locks" / "103.lock").symlink_to(target)
    with pytest.raises(Refused, match=r"guest 103 config: lock file .*103.lock is a symlink or not a regular"), \
            store.locked(103):
        pass
    assert not target.exists()


def test_a_fifo_at_a_lock_files_name_is_refused_at_once(tmp_path):
    """A FIFO planted where a guest's lock file goes cannot block the lock: it is refused."""
    import os
    import time

    from drivers.errors import Refused

    store = GuestStore(tmp_path / "guests", lock_timeout=5)
    store.create(Guest(101, "node1"))
    os.mkfifo(tmp_path / "guests" / ".locks" / "104.lock")
    started = time.monotonic()
    with pytest.raises(Refused, match=r"lock file .*104.lock is a symlink or not a regular file"), store.locked(104):
        pass
    assert time.monotonic() - started < 1


def test_a_templates_replicas_are_written_and_read_back():


    guest = Guest(100, "node1", template=True, disks={"scsi0": "local1:base/base-100-disk-0.raw"},
                  replicas={"local2:base/base-100-disk-0.raw": {"of": "local1:base/base-100-disk-0.raw",
                                                                "identity": "2049:12", "node": "node2"},
                            "local3:base/base-100-disk-0.raw": {"of": "local1:base/base-100-disk-0.raw",
                                                                "identity": "2049:12", "node": "node3",
                                                                "own_identity": "2050:7:1"}})
    assert loads(100, dumps(guest), Path("100.toml")) == guest  # recorded before own_identity was, and since


@pytest.mark.parametrize(("table", "message"), [
    ('[replicas."local2:base/b.raw"]\nof = "local1:base/b.raw"\nnode = "node2"',
     'replicas."local2:base/b.raw" = {"of": "local1:base/b.raw", "node": "node2"}: expected of, identity, node'),
    ('[replicas."local2:base/b.raw"]\nof = "local1:base/b.raw"\nidentity = "1"\nnode = "node2"\nsize = "2"',
     ': expected of, identity, node (and own_identity)'),
    ('[replicas."local2:base/b.raw"]\nof = "local1:base/b.raw"\nidentity = "1"\nnode = "node2"\nown_identity = 2',
     'replicas."local2:base/b.raw".own_identity = 2: expected an identity token'),
    ('[replicas."local2:base/b.raw"]\nof = "local1:base/b.raw"\nidentity = "1"\nnode = "node2"\nown_identity = ""',
     'replicas."local2:base/b.raw".own_identity = "": expected an identity token'),
    ('[replicas."local2:base/b.raw"]\nof = "local1:base/b.raw"\nidentity = "1"\nnode = "Node 2"',
     'replicas."local2:base/b.raw".node = "Node 2": invalid node name'),
    ('[replicas."not a volume"]\nof = "local1:base/b.raw"\nidentity = "1"\nnode = "node2"',
     'replicas key "not a volume" = "not a volume": invalid volume id'),
])
def test_a_broken_replica_record_is_a_broken_config(table, message):


    with pytest.raises(ConfigError) as broken:
        loads(100, f'node = "node1"\ntemplate = true\n{table}\n', Path("100.toml"))
    assert message in str(broken.value)


# ---- the quick reading of configs as stork writes them (guests._canonical) -----------------

_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_volids = st.builds(lambda s, v, n: f"{s}:{v}/vm-{v}-disk-{n}.raw", st.sampled_from(["local", "s-2"]),
                    st.integers(100, 999), st.integers(0, 3))
_guests = st.builds(
    Guest, vmid=st.integers(100, 999), node=st.sampled_from(["node1", "n-2"]), name=_names,
    template=st.booleans(), lock=_names, lock_job=_names,
    disks=st.dictionaries(st.sampled_from(["scsi0", "virtio1", "sata2"]), _volids, max_size=3),
    unused=st.lists(_volids, max_size=3).map(tuple),
    replicas=st.dictionaries(_volids, st.fixed_dictionaries(
        {"of": _volids, "identity": _names, "node": st.sampled_from(["node1", "n-2"])},
        optional={"own_identity": _names.filter(bool)}), max_size=2))


@given(_guests)
def test_a_config_as_stork_writes_it_is_read_quickly_and_as_tomllib_reads_it(guest):
    """The quick reading gives tomllib's data, or stands aside (None) for text with escapes."""
    text = dumps(guest)
    assert guests._canonical(text) in (None, tomllib.loads(text))
    assert guests._parse(guest.vmid, text) == guests._parse_toml(guest.vmid, text) == guest


@pytest.mark.parametrize(("is_base", "template", "why"), [
    (True, True, ""),
    (False, False, ""),
    (False, True, "is not a base image, and guest 7 is a template"),
    (True, False, "is a base image, and guest 7 is not a template"),
])
def test_a_templates_disks_are_bases_and_no_other_guests_are(is_base, template, why):
    assert guests.base_mismatch(is_base, template, "guest 7") == why


@given(st.text())
def test_a_string_needing_no_escape_is_written_as_the_escaping_writes_it(text):
    assert guests._toml_string(text) == guests._escaped(text)


NOT_AS_WRITTEN = [
    'name = "a"\nname = "b"\nnode = "n1"\ntemplate = false\n\n[disks]\n',  # a key twice: invalid TOML
    'name = "a"\nnode = "n1"\ntemplate = false\n\n[disks]\n\n[disks]\n',  # a table twice
    'node = "n1"\nname = "x" # a comment\n',
    'node = "n1"\n',  # valid, only not in the order and form stork writes
    'name = "a"\nnode = "n1"\ntemplate = false\n\n[disks]\nscsi0 = "local:1/vm-1-disk-0.raw"\nscsi0 = "x:y"\n',
    'name = "a"\nnode = "n1"\ntemplate = false\nunused = ["local:1/a.raw", "local:1/a.raw",]\n\n[disks]\n',
    'name = "a"\nnode = "n1"\ntemplate = "yes"\n\n[disks]\n',  # a wrong type
    'name = "a"\nnode = "../n1"\ntemplate = false\n\n[disks]\n',  # a bad node name
    'name = "a"\nnode = "n1"\ntemplate = false\n\n[disks]\nbogus = "local:1/vm-1-disk-0.raw"\n',
    'name = "a"\nnode = "n1"\ntemplate = false\nextra = "x"\n\n[disks]\n',
    'name = "a"\nnode = "n1"\ntemplate = false\n\n[disks]\n\n[replicas."local:base/b.raw"]\nof = "x:y"\n',
    'name = "a"\r\nnode = "n1"\r\ntemplate = false\r\n\r\n[disks]\r\n',
    # a table over a key of its name: invalid TOML (the quick reading raised TypeError, which
    # stopped the sweep for the whole cluster while the file was there)
    'node = "n1"\ndisks = "x"\n[disks]\nscsi0 = "local:1/vm-1-disk-0.raw"\n',
    'node = "n1"\nreplicas = "x"\n[replicas."a:b"]\nof = "x:y"\n',
]


@pytest.mark.parametrize("text", NOT_AS_WRITTEN)
def test_a_config_not_as_stork_writes_it_reads_as_tomllib_reads_it(text):
    """Whatever the quick reading makes of it, the answer (a guest, or the error) is tomllib's."""
    def outcome(parse):
        try:
            return parse(1, text)
        except guests._Broken as e:
            return f"broken: {e}"
    assert outcome(guests._parse) == outcome(guests._parse_toml)


# ---- the volume index: which guests name a volume ------------------------------------------


def _disk(n: int) -> str:
    return f"local:{n}/vm-{n}-disk-0.raw"


def _truth(store: GuestStore, volid: str) -> list[int]:
    return [g.vmid for g in store.list() if volid in g.volumes()]


def _named(store: GuestStore, volid: str) -> list[int]:
    """What a check concludes: the index's candidates, each confirmed by its config."""
    return [g.vmid for g in store.candidates(volid) if volid in g.volumes()]


@pytest.fixture
def no_margin(monkeypatch):
    """A refresh trusts every config older than its own start to the index (normally two
    minutes older: guest_index.MARGIN), so a test needs no configs two minutes old."""
    monkeypatch.setattr(guest_index, "MARGIN", 0)


def _settled() -> None:
    """Let the kernel's coarse file clock tick (a few ms), so configs written before a refresh
    have ctimes before its clock: one of the same tick is read again, as a safe check does."""
    time.sleep(0.03)


class _Counting(GuestStore):
    """Counts the configs read (by read(), list() and the refresh alike)."""

    reads = 0

    @staticmethod
    def _read_file(vmid: int, file: Path) -> Guest:
        _Counting.reads += 1
        return GuestStore._read_file(vmid, file)


def test_a_check_reads_the_volumes_users_and_the_configs_changed_since_the_refresh(tmp_path, no_margin):
    store = _Counting(tmp_path / "guests")
    for n in range(100, 140):  # each its own disk; 100..104 also share a base
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n), **({"scsi1": "local:base/b.raw"} if n < 105 else {})}))
    _settled()
    assert store.refresh_index() == 40 and store.refresh_index() == 0  # nothing changed since
    _Counting.reads = 0
    assert _named(store, "local:base/b.raw") == [100, 101, 102, 103, 104] and _Counting.reads == 5
    store.write(store.read(120).with_(unused=("local:base/b.raw",)))  # a stork write since the refresh
    _Counting.reads = 0
    assert _named(store, "local:base/b.raw") == [100, 101, 102, 103, 104, 120] and _Counting.reads == 6
    assert store.refresh_index() == 1  # only the changed config is read again
    assert _named(store, _disk(139)) == [139]


def _hand_edit_in_place(store: GuestStore, vmid: int, volid: str) -> None:
    """An editor that writes the file in place, then sets its times back (a restore that
    keeps times does as much): only its ctime tells it changed."""
    path = store.path(vmid)
    before = path.stat()
    with open(path, "a") as f:
        f.write(f'scsi9 = "{volid}"\n')
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("change", ["stork write", "hand edit, times kept", "new guest", "replaced by rename",
                                    "guest destroyed", "template replica", "written through its other name",
                                    "truncated and rewritten"])
def test_every_change_to_the_configs_is_seen_by_a_check_before_the_next_refresh(tmp_path, no_margin, change):
    store = GuestStore(tmp_path / "guests")
    for n in range(100, 110):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(store.path(106), elsewhere / "106.toml")  # a second name, in a directory nobody watches
    _settled()
    store.refresh_index()
    volid = _disk(105)
    assert _named(store, volid) == [105]  # this process now watches the directory: the change must reach it
    if change == "stork write":
        store.write(store.read(101).with_(unused=(volid,)))
    elif change == "hand edit, times kept":
        _hand_edit_in_place(store, 102, volid)
    elif change == "new guest":
        store.create(Guest(200, "n1", disks={"virtio0": volid}))
    elif change == "replaced by rename":
        temp = store.dir / "elsewhere.tmp"
        temp.write_text(dumps(Guest(103, "n1", disks={"scsi0": _disk(103), "scsi1": volid})))
        os.utime(temp, ns=(0, 0))  # an old file moved in: its rename still sets the ctime
        temp.rename(store.path(103))
    elif change == "guest destroyed":
        store.delete(105)
    elif change == "written through its other name":
        with open(elsewhere / "106.toml", "a") as f:
            f.write(f'scsi9 = "{volid}"\n')
    elif change == "truncated and rewritten":
        text = store.path(107).read_text()
        with open(store.path(107), "w") as f:
            f.write(text + f'scsi9 = "{volid}"\n')
    else:
        store.write(store.read(104).with_(template=True, replicas={volid: {"of": _disk(1), "identity": "i",
                                                                            "node": "n2"}}))
    assert _truth(store, volid) != [105]  # the change changed who names the volume
    assert _named(store, volid) == _truth(store, volid)  # before the refresh
    store.refresh_index()
    assert _named(store, volid) == _truth(store, volid)  # after it, from the markers
    assert sorted(VolumeIndex(store.dir).marked(volid)) == _truth(store, volid)


def test_a_broken_config_keeps_the_checks_reading_it_and_refusing(tmp_path, no_margin):
    store = GuestStore(tmp_path / "guests")
    store.create(Guest(100, "n1", disks={"scsi0": _disk(100)}))
    store.refresh_index()
    since = VolumeIndex(store.dir).since()
    store.path(101).write_text("disks = not toml\n")
    store.refresh_index()
    assert VolumeIndex(store.dir).since() == since  # not moved past a config it could not read
    with pytest.raises(ConfigError, match=r"101\.toml: broken guest config"):
        store.candidates(_disk(100))
    (store.dir / "0100.toml").write_text(dumps(Guest(100, "n1")))
    with pytest.raises(ConfigError, match=r"'0100\.toml' is not <vmid>\.toml"):
        store.candidates(_disk(100))


def test_a_directory_never_indexed_is_read_whole(tmp_path):
    store = GuestStore(tmp_path / "guests")
    store.create(Guest(100, "n1", disks={"scsi0": _disk(100)}))
    store.create(Guest(101, "n1"))
    assert VolumeIndex(store.dir).since() is None
    assert [g.vmid for g in store.candidates(_disk(100))] == [100, 101]  # every guest: none trusted to an index
    (store.dir / ".index").mkdir()
    (store.dir / ".index" / "since").write_text("not json")
    assert [g.vmid for g in store.candidates(_disk(100))] == [100, 101]


def test_on_a_user_space_file_system_every_check_reads_every_config(tmp_path, no_margin):
    """The same two guests, indexed, on a local file system and on a FUSE one (zfs-fuse here;
    sshfs, rclone and s3fs give a config the mtime for its ctime, which `cp -p` or `rsync -a`
    set back): only the first trusts the index, and the second reads every config."""
    from tests.conftest import NO_ZFS, ZFS

    if NO_ZFS:
        pytest.skip(f"zfs: {NO_ZFS}")
    dataset = f"{ZFS.name}/guests{tmp_path.name[-12:].replace('-', '')}"
    subprocess.run(["zfs", "create", dataset], check=True, capture_output=True)
    try:
        for where, expected in ((tmp_path, [100]), (ZFS.mount / dataset.split("/", 1)[1], [100, 101])):
            store = GuestStore(where / "guests")
            store.create(Guest(100, "n1", disks={"scsi0": _disk(100)}))
            store.create(Guest(101, "n1", disks={"scsi0": _disk(101)}))
            time.sleep(1.1)  # zfs-fuse's times are whole seconds
            store.refresh_index()
            assert [g.vmid for g in store.candidates(_disk(100))] == expected, guest_index.file_system(where)
    finally:
        subprocess.run(["zfs", "destroy", "-r", dataset], check=False, capture_output=True)


def test_a_refresh_already_under_way_elsewhere_is_left_to_it(tmp_path):
    store = GuestStore(tmp_path / "guests")
    store.create(Guest(100, "n1", disks={"scsi0": _disk(100)}))
    index = VolumeIndex(store.dir)
    with index.refreshing() as held:
        assert held is not None and store.refresh_index() is None
    assert store.refresh_index() == 1


def test_configs_changed_within_the_margin_before_a_refresh_are_still_read(tmp_path):
    """A config written just before a refresh (on another node whose clock is behind, say) is
    not trusted to the markers yet: a check reads it until a refresh two minutes later."""
    store = _Counting(tmp_path / "guests")
    for n in range(100, 110):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    assert store.refresh_index() == 10 and store.refresh_index() == 10  # all within the margin
    _Counting.reads = 0
    assert _named(store, _disk(100)) == [100] and _Counting.reads == 10


def test_a_clock_that_went_back_makes_the_checks_and_the_next_refresh_read_every_config(tmp_path, no_margin):
    store = _Counting(tmp_path / "guests")
    for n in range(100, 105):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    _settled()
    assert store.refresh_index() == 5 and store.refresh_index() == 0
    stamp = store.dir / ".index" / "since"
    now = json.loads(stamp.read_text())["clock"]
    future = now + 3600 * 10**9  # the last refresh ran by a clock an hour ahead: stepped back since
    stamp.write_text(json.dumps({"clock": future, "since": now - 10**9}))
    _Counting.reads = 0
    assert _named(store, _disk(100)) == [100] and _Counting.reads == 5  # its markers are trusted by none
    assert store.refresh_index() == 5  # read whole again
    assert VolumeIndex(store.dir).stamp()["clock"] < future


# ---- the watch: after one full stat, a check stats only the configs changed since ---------------


class _Listing(GuestStore):
    """Counts the full listings of the directory (each a stat of every config)."""

    listings = 0

    def _entries(self):  # type: ignore[no-untyped-def]
        _Listing.listings += 1
        return GuestStore._entries(self)


def _indexed(tmp_path: Path, count: int = 20) -> GuestStore:
    store = _Listing(tmp_path / "guests")
    for n in range(100, 100 + count):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    _settled()
    store.refresh_index()
    return store


def _refreshed_twice(store: GuestStore) -> None:
    """Two refreshes: `since` reaches the first one's clock (never past the refresh before)."""
    for _ in range(2):
        _settled()
        store.refresh_index()


def test_after_one_full_stat_a_check_stats_only_the_configs_the_watch_names(tmp_path, no_margin):
    store = _indexed(tmp_path)
    _Listing.listings = 0
    assert _named(store, _disk(105)) == [105] and _Listing.listings == 1
    store.write(store.read(110).with_(unused=(_disk(105),)))
    assert _named(store, _disk(105)) == [105, 110] and _Listing.listings == 1  # the watch named 110.toml
    assert guest_watch._current is not None and guest_watch._current.names == {"110.toml"}
    (store.dir / ".110.toml.swp").write_text("an editor's swap file")  # one link: no config by another name
    assert _named(store, _disk(105)) == [105, 110] and _Listing.listings == 1
    temp = store.dir / ".111.toml.0123abcd.tmp"  # stork's create, between its link and its temp's removal
    temp.write_text(store.path(111).read_text().replace(_disk(111), _disk(105)))
    store.path(111).unlink()
    os.link(temp, store.path(111))
    assert _named(store, _disk(105)) == [105, 110, 111] and _Listing.listings == 1  # 111.toml stat'd
    temp.unlink()
    assert _named(store, _disk(105)) == [105, 110, 111] and _Listing.listings == 1
    _refreshed_twice(store)  # 110's change indexed: its ctime is behind `since` now
    _Listing.listings = 0
    assert _named(store, _disk(105)) == [105, 110, 111] and _Listing.listings == 0  # from the markers
    assert guest_watch._current.names == set()  # stat'd older than `since`: no longer stat'd


def test_a_config_that_appears_broken_after_the_full_stat_is_refused(tmp_path, no_margin):
    store = _indexed(tmp_path)
    assert _named(store, _disk(105)) == [105]
    _Listing.listings = 0
    (store.dir / "0100.toml").write_text(dumps(Guest(100, "n1")))
    with pytest.raises(ConfigError, match=r"'0100\.toml' is not <vmid>\.toml"):
        store.candidates(_disk(105))
    (store.dir / "0100.toml").unlink()
    os.mkfifo(store.path(150))
    with pytest.raises(ConfigError, match=r"150\.toml: broken guest config: not a regular file"):
        store.candidates(_disk(105))
    store.path(150).unlink()
    assert _named(store, _disk(105)) == [105] and _Listing.listings == 0  # all told by the watch


@contextlib.contextmanager
def _retargeted_in_place(path: Path, old: int, new: int) -> Iterator[None]:
    """Point the config's disk at guest `new`'s through a writable mapping, bytes of the same
    length, held open while the caller checks: no event tells a write through a mapping (only
    the ctime does; closing the file would tell, so it is closed only after)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        at = mapped.find(f"{old}/vm-{old}".encode())
        mapped[at:at + len(f"{old}/vm-{old}")] = f"{new}/vm-{new}".encode()
        mapped.flush()
        yield


def _overflow_the_events(directory: Path) -> None:
    """More events than the kernel queues for a watch (alternating, so none merges with the last)."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    files = [directory / ".a", directory / ".b"]
    for f in files:
        f.touch()
    for i in range(limit + 2):
        os.utime(files[i % 2], ns=(i, i))


@pytest.mark.parametrize("loss", ["events overflowed", "moved, another put in its place", "another mounted over it",
                                  "linked under another name in it", "revalidation due", "since went back"])
def test_where_the_watch_cannot_tell_a_check_stats_every_config_again(tmp_path, no_margin, monkeypatch, loss):
    if loss == "another mounted over it" and os.geteuid() != 0:
        pytest.skip("mount needs root")
    store = _indexed(tmp_path)
    assert _named(store, _disk(105)) == [105]
    _Listing.listings = 0
    with contextlib.ExitStack() as cleanup:
        if loss == "events overflowed":
            _overflow_the_events(store.dir)
            _hand_edit_in_place(store, 107, _disk(105))  # its event is not queued: the queue is full
        elif loss == "moved, another put in its place":
            store.dir.rename(tmp_path / "old")
            shutil.copytree(tmp_path / "old", store.dir)
            _hand_edit_in_place(store, 107, _disk(105))
        elif loss == "another mounted over it":
            other = tmp_path / "other"
            shutil.copytree(store.dir, other)
            _hand_edit_in_place(GuestStore(other), 107, _disk(105))
            subprocess.run(["mount", "--bind", str(other), str(store.dir)], check=True)
            cleanup.callback(subprocess.run, ["umount", str(store.dir)], check=True)
        elif loss == "linked under another name in it":  # its events name the other name only
            os.link(store.path(107), store.dir / "107.toml.orig")
            with open(store.dir / "107.toml.orig", "a") as f:
                f.write(f'scsi9 = "{_disk(105)}"\n')
        elif loss == "revalidation due":
            cleanup.enter_context(_retargeted_in_place(store.path(107), 107, 105))  # no event tells this
            monkeypatch.setattr(guest_watch, "REVALIDATE", 0)
        else:
            cleanup.enter_context(_retargeted_in_place(store.path(107), 107, 105))  # no event tells this
            stamp = store.dir / ".index" / "since"
            old = json.loads(stamp.read_text())
            stamp.write_text(json.dumps({**old, "since": old["since"] - 1}))
        named = _named(store, _disk(105))
        assert _Listing.listings == 1
        assert named == _truth(store, _disk(105)) == [105, 107]


def test_a_config_written_through_a_descriptor_of_no_name_in_the_directory_is_seen(tmp_path, no_margin):
    """A file made with O_TMPFILE and linked in as a config: writes through its descriptor name
    no config (the kernel calls it #<inode>), so the watch cannot tell which config changed."""
    store = _indexed(tmp_path)
    fd = os.open(store.dir, os.O_TMPFILE | os.O_RDWR)
    try:
        os.write(fd, dumps(Guest(200, "n1", disks={"scsi0": _disk(200)})).encode())
        folder = os.open(store.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:  # linkat(2) with AT_SYMLINK_FOLLOW (which a dir_fd makes os.link use): the file, not the /proc link
            os.link(f"/proc/self/fd/{fd}", "200.toml", dst_dir_fd=folder)
        finally:
            os.close(folder)
        _refreshed_twice(store)  # 200 indexed as it was
        assert _named(store, _disk(105)) == [105]  # and settled: no longer stat'd
        _Listing.listings = 0
        os.write(fd, f'scsi9 = "{_disk(105)}"\n'.encode())
    finally:
        os.close(fd)
    named = _named(store, _disk(105))
    assert _Listing.listings == 1
    assert named == _truth(store, _disk(105)) == [105, 200]


def test_a_forked_process_watches_for_itself(tmp_path, no_margin):
    """Celery's pool forks its processes: parent and child must not share one queue of events
    (each would drain what the other needs)."""
    store = _indexed(tmp_path)
    assert _named(store, _disk(105)) == [105]
    go_read, go_write = os.pipe()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child checks once the parent has edited, draining what its watch saw
        try:
            os.close(reader)
            os.close(go_write)
            os.read(go_read, 1)
            os.write(writer, json.dumps(_named(store, _disk(105))).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.close(go_read)
    _hand_edit_in_place(store, 107, _disk(105))
    os.write(go_write, b"x")
    os.close(go_write)
    with os.fdopen(reader) as f:
        assert json.loads(f.read()) == [105, 107]
    os.waitpid(child, 0)
    assert _named(store, _disk(105)) == [105, 107]  # the parent's watch saw it too


EXPORTS = b"# Version 1.1\n# Path Client(Flags) # IPs\n/srv/nfs\t*(rw,sync)\n/srv/with\\040blank\t10.0.0.0/8(rw)\n"


def test_the_nfs_export_tables_are_read_as_the_kernel_writes_them():
    assert guest_watch.exported_paths(EXPORTS) == [Path("/srv/nfs"), Path("/srv/with blank")]
    assert guest_watch.exported_paths(b"") == []


@pytest.mark.parametrize("exports", ["the guests directory", "another folder on its file system", "nothing of it"])
def test_a_file_system_the_nfs_server_exports_is_not_watched(tmp_path, no_margin, monkeypatch, exports):
    """Its clients' writes reach the files through handles tied to no directory: no event. An
    export of any folder on the same file system takes handles of every file on it."""
    store = _indexed(tmp_path)
    exported = {"the guests directory": store.dir, "another folder on its file system": tmp_path,
                "nothing of it": Path("/proc")}[exports]
    table = tmp_path / "etab"
    table.write_bytes(str(exported).replace(" ", "\\040").encode() + b"\t*(rw,sync)\n")
    monkeypatch.setattr(guest_watch, "NFS_EXPORT_TABLES", (tmp_path / "absent", table))
    _Listing.listings = 0
    for _ in range(2):
        assert _named(store, _disk(105)) == [105]
    assert _Listing.listings == (1 if exports == "nothing of it" else 2)


def test_a_config_a_marker_names_that_is_missing_is_refused_and_one_stork_deleted_is_not(tmp_path, no_margin):
    """An editor that saves by renaming the old file away before it writes the new one (emacs,
    vim with backupcopy=no) leaves a moment with no config: a check then refuses (a guest the
    index says names the volume may name it still), where it took the guest for gone and the
    volume for unused. stork's own delete drops the guest's markers: no refusal after it."""
    from drivers.errors import ConfigError

    store = GuestStore(tmp_path / "guests")
    for n in (100, 101):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    _settled()
    store.refresh_index()
    path = store.path(100)
    path.rename(path.with_name("100.toml~"))  # the editor's save, halfway
    with pytest.raises(ConfigError, match=rf"guest 100's config is missing, though the volume index says it names "
                                          rf"{re.escape(_disk(100))}"):
        store.candidates(_disk(100))
    path.with_name("100.toml~").rename(path)  # and done
    assert _named(store, _disk(100)) == [100]
    store.delete(101)
    assert _named(store, _disk(101)) == []  # its markers went with it: no refusal
    store.create(Guest(102, "n1", disks={"scsi0": _disk(102)}))
    _settled()
    store.refresh_index()
    (tmp_path / "guests" / ".index" / "guests" / "102").unlink()  # a refresh cut off before its record, say
    store.path(102).unlink()
    assert _named(store, _disk(102)) == []  # a marker no record backs names a guest gone: no refusal for ever


def test_a_hand_edit_made_while_the_clock_was_set_back_is_read_by_the_next_refresh(tmp_path, no_margin,
                                                                                   monkeypatch):
    """Two sweeps by a clock running ahead, then the clock stepped back with no sweep while it
    is behind (the workers stopped), and a hand edit attaching a volume: its ctime is below the
    stamp's `since`. The next refresh, once time has passed the stamp, reads it all the same: a
    config whose ctime is not the one its markers were set at is read again, however old (it
    was skipped, and the index never learned of the disk)."""
    store = _Counting(tmp_path / "guests")
    for n in (100, 101):
        store.create(Guest(n, "n1", disks={"scsi0": _disk(n)}))
    _settled()
    real_clock = guest_index.Refresh._clock
    monkeypatch.setattr(guest_index.Refresh, "_clock", lambda self: real_clock(self) + 130 * 10**9)
    assert store.refresh_index() == 2 and store.refresh_index() == 0
    _hand_edit_in_place(store, 101, _disk(200))  # the clock is right again: the edit's ctime is below since
    ahead = VolumeIndex(store.dir).stamp()["clock"]
    monkeypatch.setattr(guest_index.Refresh, "_clock", lambda self: ahead + 10**9)  # time has caught up
    assert store.refresh_index() == 1
    assert VolumeIndex(store.dir).marked(_disk(200)) == {101}
