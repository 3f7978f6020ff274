"""Backend tools (qemu-img, btrfs, lvm, zfs, rbd) run one way: an argv list, never a shell, with
a time limit, and a failure that keeps what a driver needs to tell one answer from another
(the exit status and the whole stderr), so it can turn "busy" or "has dependents" into stork's
own error type without job code ever reading a tool's text."""

from __future__ import annotations

import functools
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from drivers.errors import ToolFailed

TIMEOUT = 3600.0  # seconds: a data copy may be long; a tool hung on a dead device must still end
SETPRIV = "setpriv"  # util-linux: sets the parent-death signal (and the user to run as), then execs the tool
NO_GROUP = 65534  # the group of a user with no passwd entry: nogroup


class ToolError(ToolFailed):
    """A tool exited non-zero (or did not end in time): its argv, status and stderr."""

    def __init__(self, what: str, argv: list[str], status: int, stderr: str) -> None:
        last = (stderr.strip().splitlines() or ["no message"])[-1]
        super().__init__(f"{what} failed: {last}")
        self.argv, self.status, self.stderr = argv, status, stderr


@functools.cache
def _setpriv() -> str | None:
    return shutil.which(SETPRIV)


@dataclass(frozen=True)
class Reader:
    """A user a tool runs as, to read what a user handed in (an image to import) and whatever
    that names with the user's own rights and groups, never the worker's."""

    uid: int
    gid: int
    name: str | None  # its passwd name, whose groups it gets; None: no entry, and no groups

    @classmethod
    def of(cls, uid: int) -> Reader:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, NO_GROUP, None)
        return cls(uid, entry.pw_gid, entry.pw_name)

    def setpriv_options(self) -> list[str]:
        groups = "--init-groups" if self.name else "--clear-groups"
        return ["--reuid", str(self.uid), "--regid", str(self.gid), groups]


def dying_with_caller(argv: list[str], signal: str = "KILL", reader: Reader | None = None) -> list[str]:
    """`argv` run so that the tool gets `signal` when the thread that started it dies: a step
    SIGKILLed mid-copy never leaves a qemu-img writing into a target its undo has freed.
    (Through setpriv, not a preexec_fn: that is not safe in a process with threads.) With a
    `reader`, it runs as that user; setpriv sets the signal after the user, which clears it."""
    setpriv = _setpriv()
    if reader is not None:
        if setpriv is None:
            raise ToolError(f"running {argv[0]} as uid {reader.uid}", argv, 127, f"{SETPRIV} is not installed")
        return [setpriv, *reader.setpriv_options(), "--pdeathsig", signal, "--", *argv]
    return [setpriv, "--pdeathsig", signal, "--", *argv] if setpriv else argv


def process_start(pid: int | str) -> str | None:
    """The process's start time in clock ticks since boot, which tells it from a later process
    given the same pid; None if no such process runs (a zombie, killed but not yet reaped,
    does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # from field 3 on: the name before ')' may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """End a process we started: SIGTERM (it may clean up, as qemu-nbd removes its socket),
    SIGKILL if it is still there after `grace` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(argv: list[str], what: str, fds: tuple[int, ...] = (), timeout: float = TIMEOUT,
        env: dict[str, str] | None = None, reader: Reader | None = None) -> str:
    """Run a tool and return its stdout; ToolError if it exits non-zero or runs out of time.
    `what` says what was being done, for the message ("creating local:100/vm-100-disk-0.raw").
    The tool dies with its caller (dying_with_caller), as `reader` where one is given."""
    if shutil.which(argv[0], path=(env or {}).get("PATH")) is None:
        raise ToolError(what, argv, 127, f"{argv[0]} is not installed")
    try:
        proc = subprocess.run(dying_with_caller(argv, reader=reader), capture_output=True, text=True, check=False,
                              pass_fds=fds, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise ToolError(what, argv, -1, f"{argv[0]} did not end within {timeout:g} s") from e
    except FileNotFoundError:
        raise ToolError(what, argv, 127, f"{argv[0]} is not installed") from None
    if proc.returncode != 0:
        raise ToolError(what, argv, proc.returncode, proc.stderr)
    return proc.stdout
