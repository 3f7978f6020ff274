"""A copy between nodes, printed side by side with its peer measured in the same run.

    .venv/bin/python bench/nodes.py

Starts its own redis-server and two workers, node1 and node2, each with its own node-local
dir storage, and the cluster key, in a temporary directory; then, best of RUNS, interleaved,
each after a sync:
- a full clone of a 2 GiB mixed image (1 GiB random data, 512 MiB of one byte repeated,
  512 MiB zeros) from node1's storage onto node2's: the copy step and the whole job;
- the peer: the same volume exported by a hand-run `qemu-nbd` with the same TLS PSK
  credentials and cipher priority on the same loopback, read by a hand-run `qemu-img convert
  -t writeback` (flushed on close, as stork flushes every copy) into a fresh sparse file;
- for scale: the hand-run pair with GnuTLS's default priority and without TLS, and stork's
  full clone on node1 alone.
Then linked clones of a 1 GiB template of node1: the first onto node2 (which copies the base
there as a replica), and LATENCY_SAMPLES more onto node2 (linked clones of the replica) next to
as many on node1 (linked clones of the base), submit -> succeeded, one at a time.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from drivers import transfer
from worker import testing

GIB = 1 << 30
RUNS = 3
LATENCY_SAMPLES = 30


def setup() -> tuple[Path, testing.RedisServer, list[testing.Worker]]:
    base = Path(tempfile.mkdtemp(prefix="stork-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    port = testing.free_port()
    transfer.make_key(base / "cluster.psk")
    (base / "stork.toml").write_text(f"""
[redis]
url = "redis://127.0.0.1:{port}/0"
[paths]
guests = "guests"
locks = "lock"
[cluster]
tls_psk_file = "cluster.psk"
[storage.local1]
type = "dir"
path = "node1"
nodes = ["node1"]
[storage.local2]
type = "dir"
path = "node2"
nodes = ["node2"]
""")
    os.environ.update(STORK_CONFIG=str(base / "stork.toml"), STORK_NODE="node1")
    redis_server = testing.RedisServer(port, base)
    return base, redis_server, [testing.Worker(node, base, concurrency=2) for node in ("node1", "node2")]


def mixed_guest(client, vmid: int, base: Path) -> Path:
    job = client.run("create", vmid=vmid, node="node1", disks={"scsi0": {"storage": "local1", "size": "2G"}})
    assert job.state == "succeeded", job.error
    path = base / f"node1/{vmid}/vm-{vmid}-disk-0.raw"
    with open(path, "r+b") as f:
        for _ in range(128):
            f.write(os.urandom(8 << 20))
        for _ in range(64):
            f.write(b"\x5a" * (8 << 20))
    return path


def hand_run(src: Path, base: Path, tls: bool, priority: str = transfer.PRIORITY) -> float:
    """qemu-nbd + qemu-img convert as an operator would run them: seconds for the copy."""
    name, port, dst = secrets.token_hex(16), testing.free_port(), base / "node2/direct.raw"
    dst.parent.mkdir(exist_ok=True)
    keys = base / "psk"
    keys.mkdir(mode=0o700, exist_ok=True)
    (keys / "keys.psk").unlink(missing_ok=True)
    (keys / "keys.psk").symlink_to(base / "cluster.psk")
    prio = f",priority={priority}" if priority else ""
    server_tls = ["--object", f"tls-creds-psk,id=t,endpoint=server,dir={keys}{prio}", "--tls-creds", "t"] if tls else []
    pid_file = base / "nbd.pid"
    pid_file.unlink(missing_ok=True)
    server = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared", "1", "--bind", "127.0.0.1",
                               "--port", str(port), "--export-name", name, *server_tls, "--pid-file", str(pid_file),
                               "-f", "raw", str(src)])
    try:
        while not pid_file.exists():
            time.sleep(0.01)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(dst), str(src.stat().st_size)], check=True)
        spec = ("json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
                f"\"host\":\"127.0.0.1\",\"port\":\"{port}\"}},\"export\":\"{name}\""
                + (",\"tls-creds\":\"t\"" if tls else "") + "}}")
        client_tls = ["--object", f"tls-creds-psk,id=t,endpoint=client,dir={keys},username=stork{prio}"] if tls else []
        start = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-n", "--target-is-zero", "-W", "-t", "writeback", "-O", "raw",
                        *client_tls, spec, str(dst)], check=True)
        return time.perf_counter() - start
    finally:
        server.terminate()
        server.wait()
        dst.unlink(missing_ok=True)


def via_stork(client, t: int, newid: int, storage: str) -> tuple[float, float]:
    times: dict[str, float] = {}

    def on_event(e: dict) -> None:
        if e.get("step") == "copy_data" and e["phase"] in ("start", "done"):
            times[e["phase"]] = e["time"]

    start = time.perf_counter()
    job = client.run("full_clone", vmid=t, newid=newid, storage=storage, on_event=on_event)
    elapsed = time.perf_counter() - start
    assert job.state == "succeeded", job.error
    assert client.run("destroy", vmid=newid).state == "succeeded"
    return elapsed, times["done"] - times["start"]


def bench_replica_clones(client, base: Path, ids) -> None:
    t = next(ids)
    mixed_guest(client, t, base)  # 2 GiB; the first clone onto node2 copies it
    assert client.run("template", vmid=t).state == "succeeded"
    steps: dict[str, dict[str, float]] = {}

    def on_event(e: dict) -> None:
        if e["phase"] in ("start", "done"):
            steps.setdefault(e["step"], {})[e["phase"]] = e["time"]

    start = time.perf_counter()
    first = client.run("linked_clone", vmid=t, newid=next(ids), storage="local2", on_event=on_event)
    made = time.perf_counter() - start
    assert first.state == "succeeded" and first.kind == "replica_clone", first.error
    times: dict[str, list[float]] = {"node1": [], "node2": []}
    for _ in range(LATENCY_SAMPLES):
        for node, storage in (("node1", "local1"), ("node2", "local2")):
            start = time.perf_counter()
            job = client.run("linked_clone", vmid=t, newid=next(ids), storage=storage)
            times[node].append(time.perf_counter() - start)
            assert job.state == "succeeded" and job.kind == "linked_clone", job.error
    p50 = {node: sorted(v)[len(v) // 2] for node, v in times.items()}
    print(f"\nlinked clones of a 2 GiB template of node1, submit -> succeeded, p50 of {LATENCY_SAMPLES}")
    print(f"   {'':<52}{'time':>9}{'vs local':>10}")
    print(f"   {'first onto node2 (copies the base: a replica)':<52}{made:>8.2f}s")
    print("      its steps: " + ", ".join(f"{name} {t['done'] - t['start']:.2f}s" for name, t in steps.items()
                                        if "done" in t and t["done"] - t["start"] >= 0.05))
    print(f"   {'on node1, of the base (local)':<52}{p50['node1'] * 1000:>7.1f}ms{1:>10.2f}")
    print(f"   {'on node2, of the replica':<52}{p50['node2'] * 1000:>7.1f}ms{p50['node2'] / p50['node1']:>10.2f}")


def main() -> None:
    base, redis_server, workers = setup()
    try:
        from producer.client import Client

        client = Client()
        ids = iter(range(1000, 10**6))
        t = next(ids)
        src = mixed_guest(client, t, base)
        size_gib = src.stat().st_size / GIB
        print(f"stork between-nodes benchmark: {os.cpu_count()} cores, two workers on this machine, "
              f"storages under {base}")
        hand_run(src, base, tls=True)  # warm the page cache for all
        rows: dict[str, list[float]] = {k: [] for k in ("hand", "default", "plain", "step", "job", "local")}
        for _ in range(RUNS):
            os.sync()
            rows["hand"].append(hand_run(src, base, tls=True))
            os.sync()
            job, step = via_stork(client, t, next(ids), "local2")
            rows["job"].append(job)
            rows["step"].append(step)
            os.sync()
            rows["default"].append(hand_run(src, base, tls=True, priority=""))
            os.sync()
            rows["plain"].append(hand_run(src, base, tls=False))
            os.sync()
            rows["local"].append(via_stork(client, t, next(ids), "local1")[0])
        best = {k: min(v) for k, v in rows.items()}
        print(f"\nfull clone of a {size_gib:.0f} GiB mixed image (1 GiB random, 512 MiB one byte, 512 MiB zeros), "
              f"node1 -> node2 over loopback (best of {RUNS})")
        print(f"   {'':<52}{'time':>9}{'GiB/s':>9}{'vs hand-run':>13}")
        for label, key in (("hand-run qemu-nbd + qemu-img convert, same TLS", "hand"),
                           ("stork copy_data step (node2 reading node1's export)", "step"),
                           ("stork full clone job node1 -> node2, submit -> done", "job"),
                           ("hand-run pair, GnuTLS's default TLS priority", "default"),
                           ("hand-run pair, no TLS", "plain"),
                           ("stork full clone job on node1 alone (local copy)", "local")):
            print(f"   {label:<52}{best[key]:>8.2f}s{size_gib / best[key]:>9.2f}{best['hand'] / best[key]:>13.2f}")
        bench_replica_clones(client, base, ids)
    finally:
        for worker in workers:
            worker.stop()
        redis_server.stop()
        subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True, check=False)  # bases are immutable
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
