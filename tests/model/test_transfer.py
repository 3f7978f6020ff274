"""drivers/transfer.py on its own: the cluster key's checks, and `stop` acting only on the
very qemu-nbd an export record names (a copy's reading end is tested end to end in
tests/engine/test_between_nodes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest

from drivers import qemu, transfer
from drivers.errors import Refused
from drivers.tools import process_start


def test_a_made_key_is_one_line_for_its_owner_only_and_is_never_overwritten(tmp_path):
    key = tmp_path / "cluster.psk"
    transfer.make_key(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    transfer.check_key(key)
    assert key.read_text().startswith("stork:") and len(key.read_text().strip()) == len("stork:") + 64
    with pytest.raises(FileExistsError):
        transfer.make_key(key)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "cannot be read: No such file or directory"),
    ("loose", "readable by others than its owner (chmod 600 it)"),
    ("symlink", "cannot be read: Too many levels of symbolic links"),
    ("directory", "not a regular file"),
    ("garbage", "expected one line stork:<hex digits> ('stork cluster key' makes one)"),
    ("other identity", "expected one line stork:<hex digits> ('stork cluster key' makes one)"),
    ("open folder", "its folder is writable by others than its owner, who could replace it"),
])
def test_a_key_that_cannot_be_trusted_is_refused(tmp_path, setup, message):
    key = tmp_path / "cluster.psk"
    if setup == "open folder":  # the key is checked, then read by qemu by its name: it must stay the one checked
        transfer.make_key(key)
        tmp_path.chmod(0o777)
    elif setup == "loose":
        transfer.make_key(key)
        key.chmod(0o644)
    elif setup == "symlink":
        transfer.make_key(tmp_path / "real.psk")
        key.symlink_to(tmp_path / "real.psk")
    elif setup == "directory":
        key.mkdir(mode=0o700)
    elif setup in ("garbage", "other identity"):
        key.write_text("not a key\n" if setup == "garbage" else "admin:" + "ab" * 32 + "\n")
        key.chmod(0o600)
    with pytest.raises(Refused) as refused:
        transfer.check_key(key)
    assert str(refused.value) == f"cluster key {key}: {message}"


def test_the_keys_folder_is_one_per_key_used_again_by_every_process_and_never_anothers(tmp_path, monkeypatch):
    """qemu reads the key through <tmp>/stork-psk-<uid>-<hash>/keys.psk: made once, found again
    (no folder left behind per process), and refused where it is not this user's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    make = transfer._key_dir.__wrapped__  # not the per-process cache: as another process
    key = tmp_path / "cluster.psk"
    transfer.make_key(key)
    where = make(key)
    assert make(key) == where and os.readlink(os.path.join(where, "keys.psk")) == str(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.psk", os.path.basename(where)]
    other = tmp_path / "other.psk"
    transfer.make_key(other)
    assert make(other) != where
    os.chmod(where, 0o777)  # a folder others could swap the link in
    with pytest.raises(Refused, match="not a private directory of this user"):
        make(key)


def test_stop_leaves_alone_a_process_that_is_not_the_export_named(tmp_path):
    """A record naming another process (its pid reused, or a forged record) stops nothing."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start(other.pid)
        assert start is not None
        for record in (transfer.Export("127.0.0.1", 1, "ab" * 16, other.pid, start, 1),  # not qemu-nbd, not named
                       transfer.Export("127.0.0.1", 1, "ab" * 16, other.pid, str(int(start) + 1), 1)):
            assert not transfer.running(record)
            transfer.stop(record)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def _export_of(tmp_path):
    key = tmp_path / "cluster.psk"
    transfer.make_key(key)
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 65536)
    fd = os.open(image, os.O_RDONLY)
    try:
        return transfer.start(qemu.Image.of_fd("raw", fd, "disk"), 65536, "127.0.0.1", key)
    finally:
        os.close(fd)


def test_stop_acts_on_the_export_name_it_records_not_on_any_word_of_the_command_line(tmp_path):
    export = _export_of(tmp_path)
    try:
        for word in ("--read-only", "--persistent"):  # words of its argv, not its export name
            assert not transfer.running(transfer.Export(export.host, export.port, word, export.pid, export.started, 1))
        assert transfer.running(export)
    finally:
        transfer.stop(export)


def test_an_export_that_does_not_end_on_sigterm_is_killed(tmp_path, monkeypatch):
    import signal

    export = _export_of(tmp_path)
    os.kill(export.pid, signal.SIGSTOP)  # a stopped process does not act on TERM
    monkeypatch.setattr(transfer, "STOP_WAIT", 0.5)
    transfer.stop(export)
    assert not transfer.running(export)


def test_an_export_runs_until_stopped_and_dies_with_the_process_that_started_it(tmp_path):
    export = _export_of(tmp_path)
    key, image = tmp_path / "cluster.psk", tmp_path / "disk.raw"
    assert transfer.running(export)
    transfer.stop(export)
    transfer.stop(export)  # idempotent
    assert not transfer.running(export)

    # started by a process that then dies: the parent-death signal ends it
    script = ("import os, sys; from drivers import qemu, transfer; from pathlib import Path; "
              "fd = os.open(sys.argv[1], os.O_RDONLY); "
              "e = transfer.start(qemu.Image.of_fd('raw', fd, 'disk'), 65536, '127.0.0.1', Path(sys.argv[2])); "
              "print(e.pid, e.started, e.name, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", script, str(image), str(key)], capture_output=True, text=True,
                         check=True, cwd=os.getcwd()).stdout.split()
    orphan = transfer.Export("127.0.0.1", 1, out[2], int(out[0]), out[1], 65536)
    deadline = time.monotonic() + 10
    while transfer.running(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not transfer.running(orphan)


def test_an_address_this_machine_does_not_have_is_refused_naming_the_config_key(tmp_path):
    key = tmp_path / "cluster.psk"
    transfer.make_key(key)
    with pytest.raises(Refused, match=r"cannot serve on 203\.0\.113\.7, this node's \[nodes\.<name>\] address: "):
        transfer.start(qemu.Image("raw", {"driver": "null-co"}, "nothing"), 1 << 20, "203.0.113.7", key)
