"""Clone benchmarks, printed side by side with their peers measured in the same run.

    .venv/bin/python bench/clone.py          (or: make bench)

Starts its own redis-server and one worker (4 processes) in a temporary directory, then:
1. linked-clone latency, submit -> succeeded, from a 1 GiB and a 100 GiB (sparse) base, next
   to a bare Celery no-op chain of the same three hops;
2. throughput of 200 linked clones submitted at once, and of 200 `ping` jobs (the same
   three steps doing nothing: the job machinery alone), next to 200 bare Celery no-op chains
   of the same step count on the same queues;
3. full-clone and template-copy throughput of a 2 GiB template next to `qemu-img convert -t writeback` run
   directly on it (flushed on close, as stork flushes every copy before its step ends) and
   `-t none` (past the page cache, as stork writes a file or device that takes it), and the
   default unflushed `qemu-img convert` for scale, with the worker's peak RSS.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import testing

GIB = 1 << 30
LATENCY_SAMPLES = 40
BURST = 200
RUNS = 5


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1] if len(values) > 1 else values[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def template(client, vmid: int, size: str, fill: bool = False) -> None:
    job = client.run("create", vmid=vmid, disks={"scsi0": {"storage": "local", "size": size}})
    assert job.state == "succeeded", job.error
    if fill:  # non-zero data throughout, so that nothing is skipped as zeros
        path = Path(client.cfg.storage("local").path) / f"{vmid}/vm-{vmid}-disk-0.raw"
        block = os.urandom(1 << 20) * 8
        with open(path, "r+b") as f:
            for _ in range(path.stat().st_size // len(block)):
                f.write(block)
    assert client.run("template", vmid=vmid).state == "succeeded"


def noop_chain(app, queues: list[str], token: str):
    from celery import chain

    sigs = [app.signature("stork.noop", queue=q, immutable=True) for q in queues[:-1]]
    sigs.append(app.signature("stork.noop", kwargs={"token": token}, queue=queues[-1], immutable=True))
    return chain(*sigs)


def bench_latency(client, next_id) -> None:
    """One at a time, submit -> succeeded: linked clones of two bases, next to a bare Celery
    no-op chain of the same three hops on the same queues (its last task's signal seen)."""
    from worker.app import app

    print("\n1. linked clone latency (submit -> succeeded), one at a time")
    print(f"   {'':<38}{'p50':>12}{'p95':>12}{'p50 vs Celery':>15}")
    rows, queues = [], []
    for label, size in (("stork linked clone, 1 GiB base", "1G"), ("stork linked clone, 100 GiB sparse", "100G")):
        t = next_id()
        template(client, t, size)
        times = []
        for _ in range(LATENCY_SAMPLES):
            start = time.perf_counter()
            job = client.run("linked_clone", vmid=t, newid=next_id())
            times.append(time.perf_counter() - start)
            assert job.state == "succeeded", job.error
        rows.append((label, times))
        queues = job.queues
    times = []
    for i in range(LATENCY_SAMPLES):
        token = f"{os.getpid()}-latency-{i}"
        start = time.perf_counter()
        noop_chain(app, queues, token).apply_async()
        assert client.r.blpop([f"stork:noop:{token}"], timeout=60)
        times.append(time.perf_counter() - start)
    rows.append(("Celery no-op chain (reference)", times))
    reference = pct(times, 50)
    for label, times in rows:
        print(f"   {label:<38}{ms(pct(times, 50)):>12}{ms(pct(times, 95)):>12}{pct(times, 50) / reference:>14.2f}x")


def _burst(client, submit) -> tuple[float, float, list[str]]:
    """Submit BURST jobs at once and wait for all: (total seconds, submit seconds, queues)."""
    start = time.perf_counter()
    jobs = [submit() for _ in range(BURST)]
    submitted = time.perf_counter() - start
    results = [client.wait(j.id, timeout=600) for j in jobs]
    assert all(j.state == "succeeded" for j in results), {j.error for j in results}
    return time.perf_counter() - start, submitted, jobs[0].queues


def bench_burst(client, next_id) -> None:
    """Best of 3 rounds, each: linked clones, ping jobs, bare Celery no-op chains."""
    from worker.app import app

    t = next_id()
    template(client, t, "1G")
    runs: dict[str, list[tuple[float, float]]] = {"clone": [], "ping": [], "celery": []}
    for round_ in range(3):
        total, submitted, queues = _burst(client, lambda: client.submit("linked_clone", vmid=t, newid=next_id()))
        runs["clone"].append((total, submitted))
        total, submitted, ping_queues = _burst(client, lambda: client.submit("ping"))
        runs["ping"].append((total, submitted))
        assert ping_queues == queues
        start = time.perf_counter()
        tokens = [f"{os.getpid()}-{round_}-{i}" for i in range(BURST)]
        for token in tokens:
            noop_chain(app, queues, token).apply_async()
        submitted = time.perf_counter() - start
        for token in tokens:
            assert client.r.blpop([f"stork:noop:{token}"], timeout=600)
        runs["celery"].append((time.perf_counter() - start, submitted))

    best = {name: min(values) for name, values in runs.items()}
    print(f"\n2. {BURST} jobs submitted at once, 3 steps each on queues {', '.join(queues)} (best of 3)")
    print(f"   {'':<38}{'total':>8}{'jobs/s':>9}{'submit':>9}{'throughput vs Celery':>22}")
    rows = (("stork linked clones", "clone"), ("stork ping jobs (machinery only)", "ping"),
            ("Celery no-op chains (reference)", "celery"))
    for label, name in rows:
        total, submitted = best[name]
        print(f"   {label:<38}{total:>7.2f}s{BURST / total:>9.1f}{submitted:>8.2f}s{best['celery'][0] / total:>21.2f}x")


def rss_kib(pids: list[int]) -> dict[int, tuple[str, int]]:
    out = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            name = status.split("\n", 1)[0].split()[1]
            rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            out[pid] = (name, rss)
        except (OSError, StopIteration):
            pass
    return out


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def bench_full_clone(client, worker: testing.Worker, base: Path, next_id) -> None:
    t = next_id()
    template(client, t, "2G", fill=True)
    src = base / f"images/base/base-{t}-disk-0.raw"
    size_gib = src.stat().st_size / GIB

    def direct(*cache: str) -> float:
        dst = base / "direct.raw"
        dst.unlink(missing_ok=True)
        start = time.perf_counter()
        subprocess.run(["qemu-img", "convert", *cache, "-f", "raw", "-O", "raw", str(src), str(dst)], check=True)
        elapsed = time.perf_counter() - start
        dst.unlink()
        return elapsed

    peaks: dict[str, int] = {}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            for name, rss in rss_kib(group_pids(worker.proc.pid)).values():
                key = "qemu-img" if "qemu" in name else "worker (largest python process)"
                peaks[key] = max(peaks.get(key, 0), rss)
            time.sleep(0.02)

    def via_stork() -> tuple[float, float]:
        times: dict[str, float] = {}

        def on_event(e: dict) -> None:
            if e.get("step") == "copy_data" and e["phase"] in ("start", "done"):
                times[e["phase"]] = e["time"]

        start = time.perf_counter()
        job = client.run("full_clone", vmid=t, newid=next_id(), on_event=on_event)
        elapsed = time.perf_counter() - start
        assert job.state == "succeeded", job.error
        assert client.run("destroy", vmid=job.params["new_vmid"]).state == "succeeded"
        return elapsed, times["done"] - times["start"]

    def via_template_copy() -> float:
        start = time.perf_counter()
        job = client.run("template_copy", vmid=t, newid=next_id())
        elapsed = time.perf_counter() - start
        assert job.state == "succeeded", job.error
        assert client.run("destroy", vmid=job.params["new_vmid"]).state == "succeeded"
        return elapsed

    direct()  # warm the page cache for both
    sampler = threading.Thread(target=sample)
    sampler.start()
    stork_runs, direct_runs, uncached_runs, unflushed_runs, copy_runs = [], [], [], [], []
    for _ in range(RUNS):  # interleaved, each after a sync, so write-back hits all alike
        os.sync()
        direct_runs.append(direct("-t", "writeback"))
        os.sync()
        uncached_runs.append(direct("-t", "none"))
        os.sync()
        stork_runs.append(via_stork())
        os.sync()
        unflushed_runs.append(direct())
        os.sync()
        copy_runs.append(via_template_copy())
    sampling.set()
    sampler.join()
    best_direct, best_uncached, best_unflushed = min(direct_runs), min(uncached_runs), min(unflushed_runs)
    best_job, best_copy = min(r[0] for r in stork_runs), min(r[1] for r in stork_runs)
    print(f"\n3. full clone of a {size_gib:.0f} GiB image, raw -> raw, no zeros (best of {RUNS})")
    print(f"   {'':<40}{'time':>9}{'GiB/s':>9}{'vs qemu-img':>13}")
    print(f"   {'qemu-img convert -t writeback (flushed)':<40}{best_direct:>8.2f}s{size_gib / best_direct:>9.2f}"
          f"{'1.00':>13}")
    print(f"   {'qemu-img convert -t none (O_DIRECT)':<40}{best_uncached:>8.2f}s{size_gib / best_uncached:>9.2f}"
          f"{best_direct / best_uncached:>13.2f}")
    print(f"   {'stork copy_data step':<40}{best_copy:>8.2f}s{size_gib / best_copy:>9.2f}"
          f"{best_direct / best_copy:>13.2f}")
    print(f"   {'stork full clone job, submit -> done':<40}{best_job:>8.2f}s{size_gib / best_job:>9.2f}"
          f"{best_direct / best_job:>13.2f}")
    best_copy_job = min(copy_runs)
    print(f"   {'stork template copy (copy + make base)':<40}{best_copy_job:>8.2f}s{size_gib / best_copy_job:>9.2f}"
          f"{best_direct / best_copy_job:>13.2f}")
    print(f"   {'qemu-img convert (unflushed, for scale)':<40}{best_unflushed:>8.2f}s"
          f"{size_gib / best_unflushed:>9.2f}{best_direct / best_unflushed:>13.2f}")
    print("   peak RSS during the copies: " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in sorted(peaks.items())))


def main() -> None:
    with testing.bench_node('[storage.local]\ntype = "dir"\npath = "images"\n', concurrency=4) as (base, worker):
        from producer.client import Client

        client = Client()
        ids = iter(range(1000, 10**6))
        print(f"stork clone benchmark: {os.cpu_count()} cores, worker concurrency 4, storage on {base}")
        bench_latency(client, lambda: next(ids))
        bench_burst(client, lambda: next(ids))
        bench_full_clone(client, worker, base, lambda: next(ids))

if __name__ == "__main__":
    main()
