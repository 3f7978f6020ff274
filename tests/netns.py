"""A node in a network namespace of its own, reached over a veth pair, so the tests' copies
between nodes cross a real link between two addresses (tests/engine/test_netns.py): node1's
exports listen on the host end, node `far`'s inside the namespace. Made at session start
where this machine can (root, `ip`, the kernel's namespaces and veth), else the reason why;
removed at the session's end."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

HOST_IP, NS_IP = "10.213.77.1", "10.213.77.2"  # a /30 of their own


@dataclass
class Netns:
    name: str
    host_if: str

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        """Delete the namespace (its end of the veth pair goes with it, and so the host's)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.name)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.host_if)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def make() -> Netns | str:
    """A namespace linked to this one by a veth pair (HOST_IP here, NS_IP there), or why none
    could be made."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip"):
        return "ip (iproute2) is not installed"
    tag = f"{os.getpid() % 100000}"
    made = Netns(f"stork-{tag}", f"skh{tag}")
    peer = f"skn{tag}"
    try:
        _ip("netns", "add", made.name)
        _ip("link", "add", made.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", made.name)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", made.host_if)
        _ip("link", "set", made.host_if, "up")
        for args in (("addr", "add", f"{NS_IP}/30", "dev", peer), ("link", "set", peer, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", made.name, "ip", *args)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        made.close()
        stderr = getattr(e, "stderr", "") or ""
        return f"no network namespace with a veth pair here: {stderr.strip() or e}"
    return made
