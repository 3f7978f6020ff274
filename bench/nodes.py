"""A copy between nodes, printed side by side with its peer measured in the same run.

    .venv/bin/python bench/nodes.py

Starts its own redis-server and two workers, node1 and node2, each with its own node-local
dir storage, and the cluster key, in a temporary directory; then, best of RUNS, interleaved,
each after a sync:
- a full clone of a 2 GiB mixed image (1 GiB random data, 512 MiB of one byte repeated,
  512 MiB zeros) from node1's storage onto node2's: the copy step and the whole job;
- the peer: the same volume exported by a hand-run `qemu-nbd` with the same TLS PSK
  credentials on the same loopback, read by a hand-run `qemu-img convert -t writeback`
  (flushed on close, as stork flushes every copy) into a fresh sparse file;
- the same hand-run pair without TLS, and stork's full clone on node1 alone, for scale.
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


def hand_run(src: Path, base: Path, tls: bool) -> float:
    """qemu-nbd + qemu-img convert as an operator would run them: seconds for the copy."""
    name, port, dst = secrets.token_hex(16), testing.free_port(), base / "node2/direct.raw"
    dst.parent.mkdir(exist_ok=True)
    keys = base / "psk"
    keys.mkdir(mode=0o700, exist_ok=True)
    (keys / "keys.psk").unlink(missing_ok=True)
    (keys / "keys.psk").symlink_to(base / "cluster.psk")
    server_tls = ["--object", f"tls-creds-psk,id=t,endpoint=server,dir={keys}", "--tls-creds", "t"] if tls else []
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
        client_tls = ["--object", f"tls-creds-psk,id=t,endpoint=client,dir={keys},username=stork"] if tls else []
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
        rows: dict[str, list[float]] = {k: [] for k in ("hand", "plain", "step", "job", "local")}
        for _ in range(RUNS):
            os.sync()
            rows["hand"].append(hand_run(src, base, tls=True))
            os.sync()
            job, step = via_stork(client, t, next(ids), "local2")
            rows["job"].append(job)
            rows["step"].append(step)
            os.sync()
            rows["plain"].append(hand_run(src, base, tls=False))
            os.sync()
            rows["local"].append(via_stork(client, t, next(ids), "local1")[0])
        best = {k: min(v) for k, v in rows.items()}
        print(f"\nfull clone of a {size_gib:.0f} GiB mixed image (1 GiB random, 512 MiB one byte, 512 MiB zeros), "
              f"node1 -> node2 over loopback (best of {RUNS})")
        print(f"   {'':<52}{'time':>9}{'GiB/s':>9}{'vs hand-run':>13}")
        for label, key in (("hand-run qemu-nbd (TLS PSK) + qemu-img convert", "hand"),
                           ("stork copy_data step (node2 reading node1's export)", "step"),
                           ("stork full clone job node1 -> node2, submit -> done", "job"),
                           ("hand-run qemu-nbd + qemu-img convert, no TLS", "plain"),
                           ("stork full clone job on node1 alone (local copy)", "local")):
            print(f"   {label:<52}{best[key]:>8.2f}s{size_gib / best[key]:>9.2f}{best['hand'] / best[key]:>13.2f}")
    finally:
        for worker in workers:
            worker.stop()
        redis_server.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
