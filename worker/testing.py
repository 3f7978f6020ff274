"""A throw-away local cluster for tests and benchmarks: a real redis-server on a free port
and real `celery worker` processes, one per node, all in their own process groups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports. Each socket stays bound until all are picked: asked one at a
    time, the kernel may hand a port just released out again (two members of a group on one port)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _group_running(pgid: int) -> bool:
    """Does any process of the group still run (zombies do not)?"""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class RedisServer:
    """redis-server on 127.0.0.1:`port` (and the addresses `also_on`); with `durable`, an
    append-only file in `data_dir` keeps its data across `restart()`."""

    def __init__(self, port: int, data_dir: Path, durable: bool = False, also_on: tuple[str, ...] = (),
                 extra: tuple[str, ...] = (), **client: Any) -> None:
        """`client`: how the suite's own client connects (username, password, ssl options)."""
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.port = port
        # off the loopback only on a test's own link (a veth pair to a namespace): no password needed
        protected = ["--protected-mode", "no"] if also_on else []
        self.argv = [exe, "--port", str(port), "--bind", "127.0.0.1", *also_on, *protected, "--save", "",
                     "--appendonly", "yes" if durable else "no", "--maxmemory-policy", "noeviction",
                     "--dir", str(data_dir), *extra]
        import redis

        self.client = redis.Redis(port=port, decode_responses=True, **client)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._pings, 10, "redis-server")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}): {' '.join(self.argv)}")

    def restart(self, down: float = 0.0) -> None:
        self.stop()
        time.sleep(down)
        self.start()

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return self.proc.poll() is not None  # stop waiting if it died

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Worker:
    """A real `celery worker` process group for one node."""

    def __init__(self, node: str, log_dir: Path, concurrency: int = 4, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        """`prefix` runs it through another command (`ip netns exec NS`: a node of its own network)."""
        self.node = node
        self.log = log_dir / f"worker-{node}-{time.monotonic_ns()}.log"
        env = {**os.environ, **(env or {}), "STORK_NODE": node, "PYTHONUNBUFFERED": "1"}
        argv = [*prefix, sys.executable, "-m", "worker.run.main", "--without-mingle", "--without-gossip",
                "-c", str(concurrency)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            wait_for(lambda: '"worker_ready"' in self.log.read_text() or self.proc.poll() is not None,
                     60, f"worker {node} to start")
        except AssertionError:
            self.kill()  # a worker that never came up must not outlive the test that started it
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {node} died at start:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: the node dies with its step half done. Returns
        once no process of the group runs any more (a pool process can outlive the main one
        by a moment)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        wait_for(lambda: not _group_running(self.proc.pid), 10, f"worker {self.node}'s processes to die")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class SentinelGroup:
    """A replicated Redis on loopback as production runs it: a master and `replicas` replicas
    (append-only), watched by three sentinels that fail the master over one second after it
    stops answering. Members keep their port for life; `master()` says which one is the
    master now. (No min-replicas-to-write: stork WAITs for a replica where it matters, and a
    new master refusing every write until its replicas resync only makes Celery's consumers
    restart in a storm.)"""

    NAME = "stork"

    def __init__(self, data_dir: Path, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """`tls`: (CA, certificate, key) from `make_tls`: every member and sentinel then speaks
        only TLS, to clients and to each other, and asks each for a certificate the CA signed
        (Redis's default, tls-auth-clients yes; the suite's own clients show the server's)."""
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.dir = data_dir
        self.tls = tls
        ports = free_ports(replicas + 1 + sentinels)
        self.members: dict[int, RedisServer] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}
        try:
            self._start(exe, data_dir, ports[:replicas + 1], ports[replicas + 1:], down_after_ms)
        except BaseException:  # nothing left running behind a group that failed to start
            self.stop()
            raise

    def _start(self, exe: str, data_dir: Path, ports: list[int], sentinel_ports: list[int],
               down_after_ms: int) -> None:
        replicas = len(ports) - 1
        for i, port in enumerate(ports):
            home = data_dir / f"redis-{port}"
            home.mkdir(parents=True, exist_ok=True)
            follow = ("--replicaof", "127.0.0.1", str(ports[0])) if i else ()
            secure = ("--port", "0", "--tls-port", str(port), *self._tls_args()) if self.tls else ()
            self.members[port] = RedisServer(port, home, durable=True, extra=(*follow, *secure), **self._client_tls())
        for port in sentinel_ports:
            conf = data_dir / f"sentinel-{port}.conf"
            listen = f"port {port}\n"
            if self.tls:  # the members' TLS arguments as config lines ("--tls-port 1" -> "tls-port 1")
                args = self._tls_args()
                pairs = zip(args[::2], args[1::2], strict=True)
                listen = f"port 0\ntls-port {port}\n" + "".join(f"{k[2:]} {v}\n" for k, v in pairs)
            conf.write_text(f"{listen}bind 127.0.0.1\ndir {data_dir}\n"
                            f"sentinel monitor {self.NAME} 127.0.0.1 {ports[0]} 2\n"
                            f"sentinel down-after-milliseconds {self.NAME} {down_after_ms}\n"
                            f"sentinel failover-timeout {self.NAME} 10000\n")
            self.sentinels[port] = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
        wait_for(lambda: all(self._sentinel(p).sentinel_master(self.NAME)["num-slaves"] == replicas
                             for p in self.sentinels), 30, "the sentinels to see every replica", interval=0.2)
        self.settled(replicas)  # and every replica synced (the first sync waits repl-diskless-sync-delay)

    def _tls_args(self) -> tuple[str, ...]:
        assert self.tls
        ca, cert, key = self.tls
        return ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "yes", "--tls-replication", "yes")

    def _client_tls(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        ca, cert, key = self.tls
        return {"ssl": True, "ssl_ca_certs": str(ca), "ssl_certfile": str(cert), "ssl_keyfile": str(key),
                "host": "127.0.0.1"}

    def _sentinel(self, port: int):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=port, decode_responses=True, socket_timeout=2, **self._client_tls())

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinels]

    def master(self) -> int:
        """The port of the member the sentinels name master now."""
        for port in self.sentinels:
            try:
                return int(self._sentinel(port).sentinel_get_master_addr_by_name(self.NAME)[1])
            except Exception:
                continue
        raise AssertionError("no sentinel answers")

    def failover(self) -> int:
        """SENTINEL FAILOVER: promote a replica; returns the new master's port once it is master.
        Asked again (up to three times) when no new master came of it: on a machine busy with a
        backup's writes the sentinels can give up on a promotion (failover-timeout) or find no
        replica in sync yet (NOGOODSLAVE), and a forced failover is not retried by them."""
        import redis

        old = self.master()
        for attempt in range(3):
            with contextlib.suppress(redis.ResponseError):  # INPROG, NOGOODSLAVE: wait, then ask again
                self._sentinel(next(iter(self.sentinels))).execute_command("SENTINEL", "FAILOVER", self.NAME)
            try:
                return self.wait_for_new_master(old, timeout=20.0)
            except AssertionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def wait_for_new_master(self, old: int, timeout: float = 30.0) -> int:
        def promoted() -> int:
            port = self.master()
            if port == old:
                return 0
            try:
                return port if self.members[port].client.role()[0] == "master" else 0
            except Exception:
                return 0
        return wait_for(promoted, timeout, "a new master", interval=0.1)

    def settled(self, replicas: int, timeout: float = 60.0) -> int:
        """Wait until every sentinel names one master, none has a failover in progress, and
        the master has `replicas` replicas synced and online; its port."""
        def agreed() -> int:
            try:
                states = [self._sentinel(p).sentinel_master(self.NAME) for p in self.sentinels]
                ports = {int(s["port"]) for s in states}
                if len(ports) != 1 or any("failover_in_progress" in s["flags"] for s in states):
                    return 0
                port = ports.pop()
                info = self.members[port].client.info("replication")
                online = sum(1 for key, value in info.items()
                             if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")
                return port if online >= replicas else 0
            except Exception:
                return 0
        return wait_for(agreed, timeout, "the sentinels to settle", interval=0.2)

    def stop(self) -> None:
        for proc in self.sentinels.values():
            proc.terminate()
        for proc in self.sentinels.values():
            proc.wait(10)
        for member in self.members.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(member.proc.pid, signal.SIGCONT)  # a test may have left one stopped
            member.stop()


def make_tls(directory: Path, names: tuple[str, ...] = ("localhost",), addresses: tuple[str, ...] = ("127.0.0.1",),
             client: bool = False) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a server certificate it signed for `names` and `addresses`:
    the CA's certificate file, the server's certificate and its key (PEM, the key 0600). With
    `client`, also a client certificate it signed, `client.pem` and `client.key` beside them."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stork test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, alt: list[x509.GeneralName], stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_file, key_file

    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    server = issue(names[0], alt, "server")
    if client:
        issue("stork client", [x509.DNSName("stork-client")], "client")
    return directory / "ca.pem", *server


def ovf_text(disks: list[tuple[str, int, str, int]], name: str = "appliance", extra: str = "",
             prolog: str = "") -> str:
    """An OVF as VMware writes one: `disks` of (file name, capacity in bytes, controller kind:
    "6" SCSI, "5" IDE, "20" SATA, address on it), 2 CPUs, 4096 MB, one NIC."""
    files = "".join(f'<File ovf:href="{f}" ovf:id="file{i}"/>' for i, (f, _, _, _) in enumerate(disks))
    sections = "".join(f'<Disk ovf:capacity="{c}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk{i}" '
                       f'ovf:fileRef="file{i}" ovf:format="http://www.vmware.com/interfaces/specifications/'
                       f'vmdk.html#streamOptimized"/>' for i, (_, c, _, _) in enumerate(disks))
    controllers = "".join(f"<Item><rasd:InstanceID>{10 + int(kind)}</rasd:InstanceID><rasd:ResourceType>{kind}"
                          f"</rasd:ResourceType></Item>" for kind in sorted({k for _, _, k, _ in disks}))
    drives = "".join(f"<Item><rasd:AddressOnParent>{a}</rasd:AddressOnParent><rasd:ElementName>Hard disk {i}"
                     f"</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>"
                     f"<rasd:InstanceID>{100 + i}</rasd:InstanceID><rasd:Parent>{10 + int(k)}</rasd:Parent>"
                     f"<rasd:ResourceType>17</rasd:ResourceType></Item>" for i, (_, _, k, a) in enumerate(disks))
    return f"""<?xml version="1.0" encoding="UTF-8"?>{prolog}
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
<References>{files}</References><DiskSection><Info>disks</Info>{sections}</DiskSection>
<VirtualSystem ovf:id="vm"><Info>a VM</Info><Name>{name}</Name><VirtualHardwareSection><Info>hw</Info>
<Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:InstanceID>1</rasd:InstanceID>
<rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
<Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
<rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>4096</rasd:VirtualQuantity></Item>
<Item><rasd:Connection>VM Network</rasd:Connection><rasd:InstanceID>3</rasd:InstanceID>
<rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
{controllers}{drives}{extra}</VirtualHardwareSection></VirtualSystem></Envelope>
"""


def make_ova(path: Path, members: list[tuple[str, bytes | Path]]) -> Path:
    """A tar of these members (name, content or a file to add), the .ovf first as the spec wants."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            if isinstance(content, Path):
                tar.add(content, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


@contextlib.contextmanager
def bench_node(storages: str, concurrency: int) -> Iterator[tuple[Path, Worker]]:
    """One node for a benchmark: a folder of its own (under STORK_BENCH_DIR, else the temp
    folder) whose stork.toml is its own Redis, guests and locks there, then `storages` (TOML
    sections), with a redis-server and one worker (node `bench`); all stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="stork-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    port = free_port()
    (base / "stork.toml").write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\n'
                                     f'locks = "lock"\n{storages}')
    os.environ.update(STORK_CONFIG=str(base / "stork.toml"), STORK_NODE="bench")
    os.environ.pop("STORK_REDIS_URL", None)
    redis_server = RedisServer(port, base)
    try:
        worker = Worker("bench", base, concurrency=concurrency)
        try:
            yield base, worker
        finally:
            worker.stop()
    finally:
        redis_server.stop()
        subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
