"""How fast the `stork` command starts, beside `python3 -c pass`, in one run.

    .venv/bin/python bench/cli.py [--repeat N]

Each command is run N times (default 20) as a new process, as a user runs it; the median
wall time is printed. `stork job list` reads 10 jobs from a redis-server this script starts
(no workers needed: the jobs are recorded, not run); `stork guest list` reads 10,000 guest
configs as stork writes them, beside a bare `python3` that only parses the same files with the
standard library's tomllib (5 runs each)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import testing

ROOT = Path(__file__).resolve().parent.parent
GUESTS = 10_000


def median_s(argv: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stork-bench-", dir=os.environ.get("STORK_BENCH_DIR")))
    port = testing.free_port()
    (base / "stork.toml").write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n[paths]\nguests = "guests"\n'
                                     'locks = "lock"\n[storage.local]\ntype = "dir"\npath = "images"\n')
    env = {**os.environ, "STORK_CONFIG": str(base / "stork.toml"), "STORK_NODE": "bench"}
    env.pop("STORK_REDIS_URL", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: each module compiled once, not on every run
    subprocess.run([sys.executable, "-m", "compileall", "-q", "drivers", "worker", "producer"], cwd=ROOT, env=env,
                   check=True)
    server = testing.RedisServer(port, base)
    try:
        os.environ.update(STORK_CONFIG=env["STORK_CONFIG"], STORK_NODE="bench")
        from worker import events, records
        from worker.records import JobRecord, JobState

        for _ in range(10):
            job = JobRecord(id=records.new_id(), kind="ping", params={"node": "bench"}, node="bench",
                            steps=["pong_node"], queues=["node.bench"])
            records.create(server.client, job, events.make(job.id, "ping", "queued", state=JobState.QUEUED))
        python = [sys.executable]
        guests = base / "guests"
        guests.mkdir()
        from drivers.guests import Guest, dumps

        for vmid in range(100, 100 + GUESTS):
            disks = {"scsi0": f"local:{vmid}/vm-{vmid}-disk-0.raw", "scsi1": f"local:{vmid}/vm-{vmid}-disk-1.raw"}
            (guests / f"{vmid}.toml").write_text(dumps(Guest(vmid, "bench", name=f"guest-{vmid}", disks=disks)))
        tomllib_only = ("import pathlib, tomllib\n"
                        f"[tomllib.loads(p.read_text()) for p in pathlib.Path({str(guests)!r}).glob('*.toml')]")
        cli = [*python, "-m", "producer.cli"]
        few = max(1, args.repeat // 4)
        rows = [
            ("python3 -c pass", median_s([*python, "-c", "pass"], env, args.repeat)),
            ("stork --help", median_s([*python, "-m", "producer.cli", "--help"], env, args.repeat)),
            ("stork job list (10 jobs)", median_s([*python, "-m", "producer.cli", "job", "list"], env, args.repeat)),
            (f"stork guest list ({GUESTS:,} guests)", median_s([*cli, "guest", "list"], env, few)),
            (f"stork --json guest list ({GUESTS:,})", median_s([*cli, "--json", "guest", "list"], env, few)),
            (f"python3: tomllib of the {GUESTS:,}", median_s([*python, "-c", tomllib_only], env, few)),
        ]
        print(f"\nmedian wall time of {args.repeat} runs, each a new process")
        for name, seconds in rows:
            print(f"{name:34} {seconds * 1000:8.0f} ms {seconds / rows[0][1]:6.1f}x")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
