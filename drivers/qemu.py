"""qemu-img, always as an argv list and always on opened descriptors, plus a direct reader
for the qcow2 header.

Reading the header in Python (magic, backing file, virtual size) lets a storage list its
volumes and find a base's clones without starting one qemu-img per file.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import re
import select
import stat
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from drivers import safedir, sniff
from drivers.errors import InvalidName, ToolFailed
from drivers.tools import Reader, ToolError, dying_with_caller, run

QEMU_IMG = "qemu-img"
BACKED_FORMATS = ("qcow2", "qcow", "vmdk")  # formats whose header may name a backing file: opened as given, or none
QCOW2_MAGIC = b"QFI\xfb"
_PROGRESS = re.compile(rb"\(\s*([0-9.]+)/100%\)")

# progress(bytes_done, bytes_total); may raise (e.g. JobCancelled) to stop the copy.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int
    backing_file: str | None
    external_data_file: bool = False  # incompatible feature bit 2: the data lives in another file
    encrypted: bool = False  # crypt_method: its clusters hold ciphertext
    snapshots: int = 0  # internal snapshots (nb_snapshots): a copy through qemu-img convert has none


def read_qcow2_header(fd: int, offset: int = 0) -> Qcow2Header | None:
    """The qcow2 header of the opened file `fd` (of the image at `offset` in it), or None if it is not qcow2."""
    head = os.pread(fd, 80, offset)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return None
    version = struct.unpack(">I", head[4:8])[0]
    backing_offset, backing_size = struct.unpack(">QI", head[8:20])
    virtual_size, crypt_method = struct.unpack(">QI", head[24:36])
    snapshots = struct.unpack(">I", head[60:64])[0]
    incompatible = struct.unpack(">Q", head[72:80])[0] if version >= 3 and len(head) >= 80 else 0
    backing = None
    if backing_offset and backing_size:
        backing = os.pread(fd, min(backing_size, 1023), offset + backing_offset).decode("utf-8", "replace")
    return Qcow2Header(virtual_size, backing, bool(incompatible & 4), crypt_method != 0, snapshots)


@dataclass(frozen=True)
class Image:
    """An image as qemu-img is to open it: a format over a protocol layer (for a file, an
    opened descriptor named /proc/self/fd/N, so qemu opens the very file that was checked),
    and for qcow2 the backing image to use — None opens no backing file at all, whatever the
    header says. Commands get it as a `json:` spec, with its descriptors passed along."""

    fmt: str
    file: dict[str, Any]
    label: str  # for messages: a volume id or a path
    fds: tuple[int, ...] = ()
    backing: Image | None = None
    objects: tuple[str, ...] = ()  # --object definitions it needs (TLS credentials of an NBD image)

    @classmethod
    def of_fd(cls, fmt: str, fd: int, label: str, backing: Image | None = None,
              window: tuple[int, int] | None = None) -> Image:
        """The image in the opened file `fd`; or in its (offset, size) `window` (an archive's member)."""
        file: dict[str, Any] = {"driver": "file", "filename": f"/proc/self/fd/{fd}"}
        if window is not None:
            file = {"driver": "raw", "offset": window[0], "size": window[1], "file": file}
        return cls(fmt, file, label, (fd,), backing)

    @property
    def is_file(self) -> bool:
        """An opened file (not a block device, not a network image)."""
        return self.file.get("driver") == "file" and len(self.fds) == 1 and stat.S_ISREG(os.fstat(self.fds[0]).st_mode)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.fmt, "file": self.file}
        if self.fmt == "vpc":
            # the size a VHD's footer gives, not one qemu works out from its cylinders, heads and
            # sectors for a creator it does not know (VirtualBox's, say): that is smaller, by up
            # to a few MiB, and a copy of it loses the disk's end (a GPT's backup header)
            opts["force_size_calc"] = "current_size"
        if self.fmt in BACKED_FORMATS:
            opts["backing"] = self.backing.options() if self.backing else None
        return opts

    @property
    def spec(self) -> str:
        return "json:" + json.dumps(self.options())

    @property
    def all_fds(self) -> tuple[int, ...]:
        return self.fds + (self.backing.all_fds if self.backing else ())


def _objects(*images: Image) -> list[str]:
    """The `--object` arguments the images need, each once."""
    defined = dict.fromkeys(o for image in images for o in image.objects)
    return [arg for o in defined for arg in ("--object", o)]


def detect_image(fd: int, label: str, window: tuple[int, int] | None = None,
                 found: sniff.Sniffed | None = None, reader: Reader | None = None) -> tuple[str, int]:
    """Return (format, virtual size) of the opened file `fd`, which must be a disk image of a
    format stork imports (sniff.IMPORTABLE) that reads no other file.

    The format is told from the file's bytes here (drivers/sniff.py), never by qemu's probe,
    which opens the files a VMDK descriptor names; qemu-img is then told it, and reads the
    virtual size from the same descriptor. A raw image has no header: it must at least be
    non-empty and a whole number of 512-byte sectors. `window`: the (offset, size) of the file
    that holds the image (a member of an archive); `found`: what sniff told of it already;
    `reader`: the user qemu-img reads it as (reader_for).
    """
    found = found or sniff.sniff_file(fd, window)
    if found.refusal:
        raise InvalidName(f"{label}: {found.fmt} image refused: {found.refusal}")
    fmt = found.fmt
    refuse_external(fd, label, window[0] if window else 0)  # before qemu opens it at all
    image = Image.of_fd(fmt, fd, label, window=window)
    data = json.loads(run([QEMU_IMG, "info", "--output=json", "--", image.spec], f"reading {label}", (fd,),
                          reader=reader))
    if fmt == "raw":
        vsize = window[1] if window else os.fstat(fd).st_size  # qemu-img rounds a raw file's size up to a sector
        if vsize == 0 or vsize % 512:
            raise InvalidName(f"{label}: not a disk image (size {vsize} is not a multiple of 512 bytes)")
        return fmt, vsize
    return fmt, int(data.get("virtual-size", 0))


def recheck_external(image: Image) -> None:
    """refuse_external() of an opened import again (a qcow or qcow2: what it examines), at
    its offset in an archive."""
    if image.fmt in ("qcow", "qcow2") and image.fds:
        refuse_external(image.fds[0], image.label, int(image.file.get("offset", 0)))


def refuse_external(fd: int, label: str, offset: int = 0) -> None:
    """An image that reads another file (a backing or data file) would let its author copy
    that file — any the worker can read — into a guest disk."""
    header = read_qcow2_header(fd, offset)
    if header and (header.backing_file or header.external_data_file):
        raise InvalidName(f"{label}: images with a backing or data file cannot be imported")


class Imported(NamedTuple):
    image: Image  # what qemu-img reads: the file itself, or its owner's qemu-nbd serving it (reader_for)
    size: int  # bytes the guest sees
    fmt: str  # the file's own format


@contextlib.contextmanager
def open_import(path: Path, member: str | None = None) -> Iterator[Imported]:
    """Open an image file to import, once. The checks and the copy read the same descriptor, so
    swapping the path for a symlink or another file in between has no effect; the path itself
    must not be a symlink. `member`: the image is that member of the file, an OVA (a tar),
    found in the member table read from the same descriptor.

    The file's owner can still write it after the checks, and qemu reads its header again at
    each open: it could then name another file (a qcow2 data file, a VMDK's extents). So a file
    the worker reads with more rights than its owner has is read by its owner's rights alone,
    through a qemu-nbd run as that user (reader_for)."""
    with opened_input(path) as fd, contextlib.ExitStack() as stack:
        window, label = None, str(path)
        reader = reader_for(fd, label)
        if member is not None:
            from drivers import ova  # here: an XML parser only for a command that reads an OVA

            found = ova.members(fd, label).get(member)
            if found is None:
                raise InvalidName(f"{path}: the archive has no member {member!r}")
            window, label = (found.offset, found.size), f"{path}:{member}"
        sniffed = sniff.sniff_file(fd, window)
        if sniffed.fmt == sniff.VMDK_DESCRIPTOR and member is None:
            image, size = stack.enter_context(_described_vmdk(fd, path, reader))
        else:
            fmt, size = detect_image(fd, label, window, sniffed, reader)
            image = Image.of_fd(fmt, fd, label, window=window)
        fmt = image.fmt
        if reader is not None:
            from drivers import nbd  # here: nbd serves qemu's images, and imports this module

            image = stack.enter_context(nbd.read_as(image, reader))
        yield Imported(image, size, fmt)


def reader_for(fd: int, label: str) -> Reader | None:
    """Who reads the opened import file `fd`, and every file its header names: its owner, where
    this process is root and the owner is not; None where this process reads it as itself (its
    own file, or root's). Refused where another user could change it during the import, or
    where it cannot be read so."""
    mounted_by = _fuse_mounter(fd, label)
    if mounted_by is None:
        refuse_other_writers(fd, label)
    info = os.fstat(fd)
    owner = info.st_uid if mounted_by is None else mounted_by  # whoever answers for the file's bytes
    if owner in (0, os.geteuid()):
        return None
    if os.geteuid() != 0:
        raise InvalidName(f"{label}: belongs to uid {owner}, whose rights uid {os.geteuid()} cannot take to read it")
    if mounted_by is None and not info.st_mode & stat.S_IRUSR:
        raise InvalidName(f"{label}: its owner (uid {owner}) may not read it, and a user's file is read with "
                          "that user's rights")
    return Reader.of(owner)


FUSE_MAGIC = 0x65735546  # statfs f_type of every FUSE file system (fuseblk's too)


def _fuse_mounter(fd: int, label: str) -> int | None:
    """The user (not root) who mounted the FUSE file system holding `fd`: its daemon, theirs,
    makes up every file's owner, mode and bytes, root's too. None on any other file system."""
    try:
        if safedir.fs_magic(fd) != FUSE_MAGIC:
            return None
        st = os.fstat(fd)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return fuse_mounter(f.read().split("\n"), f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError as e:
        raise InvalidName(f"{label}: cannot tell which file system holds it: {e.strerror}") from None
    except LookupError:
        raise InvalidName(f"{label}: on a FUSE file system this process's mount table does not list") from None
    except ValueError:
        raise InvalidName(f"{label}: on a FUSE file system that does not say who mounted it") from None


def fuse_mounter(mountinfo: list[str], device: str) -> int | None:
    """In /proc/self/mountinfo's lines (split on newlines alone: the kernel escapes those in a
    path, not other line breaks), the `user_id` of the FUSE mount of `device` ("major:minor"),
    where it is not root's; None for another file system, or root's FUSE. LookupError: no
    line for `device`; ValueError: a FUSE mount without one user_id that reads as a number."""
    for line in mountinfo:
        fields = line.split(" ")
        if len(fields) < 10 or fields[2] != device or "-" not in fields[6:]:
            continue
        after = fields.index("-", 6)
        kind, options = fields[after + 1], fields[after + 3] if len(fields) > after + 3 else ""
        if kind not in ("fuse", "fuseblk") and not kind.startswith(("fuse.", "fuseblk.")):
            return None
        found = [o.removeprefix("user_id=") for o in options.split(",") if o.startswith("user_id=")]
        if len(found) != 1 or not found[0].isdigit():
            raise ValueError(f"no user_id in {options!r}")
        return int(found[0]) or None
    raise LookupError(device)


def refuse_other_writers(fd: int, label: str) -> None:
    """Refuse a file that a user other than its owner may write (and so rewrite once checked):
    writable by others, or by a group with other members than the owner (a user's own group,
    as umask 002 leaves a file, is the owner alone; a POSIX ACL's writers show in the group
    bits, as its mask)."""
    info = os.fstat(fd)
    mode = stat.S_IMODE(info.st_mode)
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and not _owners_own_group(info.st_uid, info.st_gid)):
        raise InvalidName(f"{label}: others than its owner may write it (mode {mode:04o}); "
                          "import a copy only its owner can write")


def _owners_own_group(uid: int, gid: int) -> bool:
    """Whether group `gid` is user `uid`'s primary group and names no other member."""
    try:
        user, group = pwd.getpwuid(uid), grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid and set(group.gr_mem) <= {user.pw_name}


def _require_extent_owner(fd: int, label: str, reader: Reader | None) -> None:
    """A VMDK extent must be the reader's own file (a root-opened descriptor of root's file
    handed to a process of the reader's could be taken from it), or, read as this process,
    root's or this process's: another user could rewrite it once checked."""
    if (mounted_by := _fuse_mounter(fd, label)) is not None:  # its owner and mode are made up there
        if reader is None or mounted_by != reader.uid:
            raise InvalidName(f"{label}: on a FUSE file system of uid {mounted_by}'s, not of the user whose "
                              "descriptor names it")
        return
    refuse_other_writers(fd, label)
    owner, me = os.fstat(fd).st_uid, os.geteuid()
    if reader is not None and owner != reader.uid:
        raise InvalidName(f"{label}: belongs to uid {owner}, not to uid {reader.uid}, whose descriptor names it")
    if reader is None and owner not in (0, me):
        raise InvalidName(f"{label}: belongs to uid {owner}, not to root{f' or uid {me}' if me else ''}")


@contextlib.contextmanager
def _described_vmdk(fd: int, path: Path, reader: Reader | None) -> Iterator[tuple[Image, int]]:
    """A VMDK whose descriptor `fd` names its extents as files beside it (drivers/vmdk.py):
    each opened here, checked, and read by qemu through a descriptor stork writes."""
    from drivers import vmdk  # here, as ova: only an import reads a descriptor

    descriptor = vmdk.parse(os.pread(fd, vmdk.MAX_DESCRIPTOR + 1, 0), str(path))
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(_folder_holding(fd, path))
        fds = []
        for extent in descriptor.extents:
            label = f"{path}: extent {extent.name}"
            extent_fd = stack.enter_context(opened_input(Path(extent.name), folder, label))
            _require_extent_owner(extent_fd, label, reader)
            if extent.kind == "SPARSE" and sniff.sniff_file(extent_fd) != sniff.Sniffed("vmdk"):
                raise InvalidName(f"{label}: a SPARSE extent is a sparse VMDK of its own, with no parent")
            if extent.kind == "FLAT" and os.fstat(extent_fd).st_size < (extent.offset + extent.sectors) * 512:
                raise InvalidName(f"{label}: shorter than the {extent.sectors} sectors the descriptor says")
            fds.append(extent_fd)
        written = stack.enter_context(vmdk.private_descriptor(descriptor, fds))
        image = Image("vmdk", {"driver": "file", "filename": str(written)}, str(path), tuple(fds))
        data = json.loads(run([QEMU_IMG, "info", "--output=json", "--", image.spec], f"reading {path}", image.fds,
                              reader=reader))
        if (read := int(data.get("virtual-size", 0))) != descriptor.size:  # qemu read another disk than stork did
            raise InvalidName(f"{path}: qemu reads {read} bytes, its extents hold {descriptor.size}")
        yield image, descriptor.size


@contextlib.contextmanager
def opened_input(path: Path, folder: int | None = None, label: str = "") -> Iterator[int]:
    """The regular file `path` (an image or archive to import; with `folder`, a name in that
    opened directory), opened read-only without following a link and without blocking on a FIFO."""
    label = label or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        raise InvalidName(f"{label}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidName(f"{label}: is a symbolic link (name the file it points to)") from None
        raise InvalidName(f"{label}: cannot be opened: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidName(f"{label}: not a regular file")
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_holding(fd: int, path: Path) -> Iterator[int]:
    """The directory `path` is in, opened, and holding the very file `fd` is (not one swapped in
    for it since): files beside it are then opened in it, by name, never through a path again."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        there = os.stat(path.name, dir_fd=folder, follow_symlinks=False)
        if (there.st_dev, there.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            raise InvalidName(f"{path}: changed while it was read")
        yield folder
    finally:
        os.close(folder)


def create(fd: int, fmt: str, size: int, label: str, backing: str | None = None, backing_fmt: str = "") -> None:
    """Make the opened, empty file `fd` an image of `size` bytes. A backing path is written
    into the header without being opened (-u), so nothing outside is followed."""
    if fmt == "raw":
        try:
            os.ftruncate(fd, size)  # what qemu-img does for raw, without a process
        except OSError as e:  # e.g. larger than the file system allows
            raise ToolFailed(f"creating {label} failed: {e.strerror}") from None
        return
    argv = [QEMU_IMG, "create", "-q", "-f", fmt, "-o", "lazy_refcounts=on"]
    if backing:
        argv += ["-u", "-b", backing, "-F", backing_fmt]
    run([*argv, "--", f"/proc/self/fd/{fd}", str(size)], f"creating {label}", (fd,))


def resize(image: Image, size: int) -> None:
    run([QEMU_IMG, "resize", "-q", "--", image.spec, str(size)], f"resizing {image.label}", image.all_fds)


def compare(a: Image, b: Image) -> None:
    """Raise ToolFailed unless the two images hold the same guest-visible data."""
    run([QEMU_IMG, "compare", "-q", *_objects(a, b), "--", a.spec, b.spec], f"comparing {a.label} with {b.label}",
        a.all_fds + b.all_fds)


def convert(src: Image, dst: Image, size: int, progress: Progress | None = None, interval: float = 0.25,
            target_is_zero: bool = True) -> None:
    """Copy src into the existing dst with `qemu-img convert -p -n`.

    Where dst is known to read as zeros (target_is_zero: a new file, a thin volume), zero
    areas are skipped, so a sparse target stays sparse; otherwise (a thick LV holding another
    volume's old blocks) qemu-img writes them, and nothing old shows through. Progress
    lines are parsed into progress(done, total) at most every `interval` seconds; if the
    callback raises, qemu-img is stopped and the exception propagates. qemu-img writes past the
    page cache (cache mode `none`) into a raw file or device that takes direct writes: a copy of
    gigabytes neither copies every page into the cache (on a virtual machine whose host takes
    back freed memory, 8-9 s against 1.6-1.8 s for 2 GiB measured here) nor flushes the host's
    cache out; elsewhere with `unsafe`. Either way the caller flushes dst before relying on it.
    """
    zero = ["--target-is-zero"] if target_is_zero else []
    cache = ["-t", "none"] if writes_direct(dst) else []
    argv = [QEMU_IMG, "convert", "-p", "-n", *zero, *cache, "-W", "-O", dst.fmt, *_objects(src, dst), "--", src.spec,
            dst.spec]
    proc = subprocess.Popen(dying_with_caller(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=src.all_fds + dst.all_fds)
    assert proc.stdout is not None and proc.stderr is not None
    last_report, done = 0.0, 0
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], interval)
            chunk = proc.stdout.read() if ready else b""
            if ready and not chunk:
                break  # EOF: qemu-img closed stdout
            if matches := _PROGRESS.findall(chunk or b""):
                done = min(int(float(matches[-1]) / 100 * size), size)
            now = time.monotonic()
            if progress and now - last_report >= interval:
                progress(done, size)
                last_report = now
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        last = (proc.stderr.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise ToolError(f"copying {src.label} to {dst.label}", argv, rc, last)
    if progress:
        progress(size, size)


DIRECT_ALIGN = 4096  # offsets, lengths and memory of direct I/O: a page, at least any disk's block


def writes_direct(image: Image) -> bool:
    """A raw image in one opened file or device, without backing, that opens with O_DIRECT and
    ends on a whole page: qemu pads a direct write out to a page, so the last one would grow a
    file whose size is not (a raw file's size is its guest's disk size)."""
    if image.fmt != "raw" or image.file.get("driver") not in ("file", "host_device") or len(image.fds) != 1 \
            or image.backing is not None:
        return False
    info = os.fstat(image.fds[0])
    if not stat.S_ISBLK(info.st_mode) and info.st_size % DIRECT_ALIGN:
        return False
    direct = reopen_direct(image.fds[0], write=True)
    if direct is None:
        return False
    os.close(direct)
    return True


def reopen_direct(fd: int, write: bool) -> int | None:
    """A second descriptor of fd's very file (through /proc/self/fd, which names the open file,
    not a path; checked to be the same inode) that reads or writes past the page cache; None
    where the file system has no direct I/O or /proc cannot tell."""
    try:
        direct = os.open(f"/proc/self/fd/{fd}", (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
    mine, reopened = os.fstat(fd), os.fstat(direct)
    if (mine.st_dev, mine.st_ino) != (reopened.st_dev, reopened.st_ino):
        os.close(direct)
        return None
    return direct


MAP_TIMEOUT = 60.0  # seconds a map may take before a copy goes on without knowing its data


def data_bytes(image: Image) -> int:
    """Bytes of the image that hold data, its backing chain's included (`qemu-img map`): what
    a copy moves; holes and zeros go fast. qemu-img's own progress is of these."""
    out = run([QEMU_IMG, "map", "--output=json", *_objects(image), "--", image.spec], f"mapping {image.label}",
              image.all_fds, timeout=MAP_TIMEOUT)
    try:
        return sum(int(e["length"]) for e in json.loads(out) if e.get("data") and not e.get("zero"))
    except (ValueError, KeyError, TypeError):
        raise ToolFailed(f"mapping {image.label}: qemu-img map answered something unexpected") from None


def _alone(image: Image) -> Image:
    """The image without its backing chain (`"backing": null`): bitmaps are the top image's
    own, and `qemu-img info` and `bitmap` refuse backing options they do not open."""
    return Image(image.fmt, image.file, image.label, image.fds)


def bitmaps(image: Image) -> dict[str, list[str]] | None:
    """A qcow2 image's persistent dirty bitmaps: name -> flags (`in-use` after an unclean
    close, `auto` while enabled); None for one that cannot hold any (qcow2 v2, compat 0.10)."""
    if image.fmt != "qcow2":
        return {}
    top = _alone(image)
    out = run([QEMU_IMG, "info", "--output=json", "--", top.spec], f"reading {image.label}", top.all_fds)
    try:
        data = json.loads(out).get("format-specific", {}).get("data", {})
        if data.get("compat") == "0.10":
            return None
        return {str(b["name"]): [str(f) for f in b.get("flags", [])] for b in data.get("bitmaps", [])}
    except (ValueError, AttributeError, KeyError, TypeError):
        raise ToolFailed(f"reading {image.label}: qemu-img info answered something unexpected") from None


def add_bitmap(image: Image, name: str) -> None:
    """Add an enabled persistent dirty bitmap (it records every write from now on)."""
    top = _alone(image)
    run([QEMU_IMG, "bitmap", "--add", "--enable", "--", top.spec, name], f"adding bitmap {name} to {image.label}",
        top.all_fds)


def remove_bitmap(image: Image, name: str) -> None:
    top = _alone(image)
    run([QEMU_IMG, "bitmap", "--remove", "--", top.spec, name], f"removing bitmap {name} from {image.label}",
        top.all_fds)
