"""Guest configs: one file per guest, atomic writes, exclusive creation, flock while editing."""

import threading

import pytest

from drivers.errors import AlreadyExists, LockTimeout, NotFound, Refused
from drivers.guests import Guest, GuestStore


@pytest.fixture
def store(tmp_path):
    return GuestStore(tmp_path / "guests", lock_timeout=0.3)


def test_a_guest_round_trips_through_its_file(store):
    """Everything written is read back the same."""
    guest = Guest(100, "node1", name="web", template=True, lock="clone",
                  disks={"scsi0": "local:base/base-100-disk-0.raw"}, unused=("local:100/vm-100-disk-1.raw",))
    store.create(guest)
    assert store.read(100) == guest
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
