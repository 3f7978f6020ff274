"""qemu-img on opened descriptors: a copy into a target that does not read as zeros writes the
zeros too (a thick LV keeps old blocks), and a failing tool keeps its status and stderr."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers import qemu, tools

MIB = 1 << 20


def image(path: Path, write: bool = False) -> qemu.Image:
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    return qemu.Image.of_fd("raw", fd, str(path))


@pytest.mark.parametrize(("target_is_zero", "same"), [(False, True), (True, False)])
def test_a_copy_skips_zero_areas_only_into_a_target_that_reads_as_zeros(tmp_path, target_is_zero, same):
    """The source is data then zeros; the target holds old bytes (0xee) everywhere. Declared
    zero, the target keeps its old bytes where the source has zeros: exactly what a driver
    whose new volumes do not read as zeros must never declare."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    src.write_bytes(b"\x11" * MIB + b"\0" * 3 * MIB)
    dst.write_bytes(b"\xee" * 4 * MIB)
    a, b = image(src), image(dst, write=True)
    try:
        qemu.convert(a, b, 4 * MIB, target_is_zero=target_is_zero)
    finally:
        os.close(a.fds[0])
        os.close(b.fds[0])
    assert (dst.read_bytes() == src.read_bytes()) is same
    assert dst.read_bytes()[:MIB] == b"\x11" * MIB


def test_a_copy_into_a_file_is_written_past_the_page_cache(tmp_path):
    """Where the target takes direct writes, qemu-img writes it with cache mode none: the copy
    is right and leaves none of the target's pages in the cache. An image with a backing file,
    a qcow2, one that is no file or device of ours (say NBD), and a raw file that does not end
    on a whole page (qemu would pad its last write, growing the guest's disk) are written as
    before, and that last one keeps its size."""
    import subprocess

    from tests.helpers import resident_pages

    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip() \
            == "tmpfs":
        pytest.skip("tmpfs has no disk beneath its cache: its direct writes are cached")
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    src.write_bytes(os.urandom(8 * MIB))
    with open(dst, "wb") as f:
        f.truncate(8 * MIB)
    a, b = image(src), image(dst, write=True)
    try:
        assert qemu.writes_direct(b)
        assert not qemu.writes_direct(qemu.Image.of_fd("raw", b.fds[0], "top", backing=a))
        assert not qemu.writes_direct(qemu.Image.of_fd("qcow2", b.fds[0], "top"))
        assert not qemu.writes_direct(qemu.Image("raw", {"driver": "nbd", "path": "/nowhere"}, "nbd"))
        qemu.convert(a, b, 8 * MIB)
        os.fsync(b.fds[0])
    finally:
        os.close(a.fds[0])
        os.close(b.fds[0])
    assert resident_pages(dst) == 0
    assert dst.read_bytes() == src.read_bytes()

    odd_src, odd = tmp_path / "odd-src.raw", tmp_path / "odd.raw"
    odd_src.write_bytes(os.urandom(MIB + 512))
    with open(odd, "wb") as f:
        f.truncate(MIB + 512)
    a, b = image(odd_src), image(odd, write=True)
    try:
        assert not qemu.writes_direct(b)
        qemu.convert(a, b, MIB + 512)
    finally:
        os.close(a.fds[0])
        os.close(b.fds[0])
    assert odd.read_bytes() == odd_src.read_bytes()


def test_a_failing_tool_keeps_its_status_and_stderr(tmp_path):
    with pytest.raises(tools.ToolError) as failed:
        tools.run(["qemu-img", "info", "--", str(tmp_path / "none.raw")], "reading none.raw")
    assert failed.value.status == 1 and "none.raw" in failed.value.stderr
    assert str(failed.value).startswith("reading none.raw failed: qemu-img: Could not open")


@pytest.mark.parametrize(("argv", "status", "says"), [
    (["/nonexistent-tool"], 127, "/nonexistent-tool is not installed"),
    (["sleep", "5"], -1, "sleep did not end within 0.2 s"),
])
def test_a_tool_that_cannot_run_or_hangs_is_one_error(argv, status, says):
    with pytest.raises(tools.ToolError) as failed:
        tools.run(argv, "testing", timeout=0.2)
    assert failed.value.status == status and str(failed.value) == f"testing failed: {says}"


def _run_long_tool() -> None:
    tools.run(["sleep", "60"], "sleeping")


def test_a_tool_dies_with_the_process_that_started_it():
    """A step's process SIGKILLed mid-tool (a qemu-img mid-copy, say) leaves no tool running on
    behind it: the tool gets the parent-death signal."""
    import multiprocessing
    import signal

    from worker.testing import wait_for

    child = multiprocessing.get_context("fork").Process(target=_run_long_tool)
    child.start()

    def its_tool() -> int | None:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "comm").read_text().strip() == "sleep" and \
                        int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == child.pid:
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        return None

    tool = wait_for(its_tool, 10, "the tool to start")
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    wait_for(lambda: not Path(f"/proc/{tool}").exists() or "Z" in Path(f"/proc/{tool}/stat").read_text().split()[2],
             5, "the tool to die with its caller")


def test_data_bytes_are_what_an_image_holds_beyond_its_holes(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
        f.seek(4 << 20)
        f.write(b"x" * (1 << 20))
        f.seek(12 << 20)
        f.write(b"y" * (2 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert qemu.data_bytes(qemu.Image.of_fd("raw", fd, "sparse")) == 3 << 20
    finally:
        os.close(fd)
