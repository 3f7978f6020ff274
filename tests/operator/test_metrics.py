"""The node's Prometheus endpoint (`python -m worker.run.metrics`, worker/metrics.py) on the
session's Redis and stores: read over HTTP as Prometheus reads it, and scraped by a real
Prometheus server (Debian's `prometheus`; skipped without it) whose HTTP API gives a guest's
last backup time back."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import BASE, CONFIG, storage_path
from worker.testing import ROOT, free_port, wait_for


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def value(text: str, series: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(series + " ")).split()[-1])


def _answers(url: str) -> str | None:
    try:
        return _get(url)
    except OSError:
        return None


@pytest.fixture(scope="module")
def endpoint():
    """The endpoint, on a port of its own, with the session's config otherwise."""
    port = free_port()
    conf = BASE / f"metrics-{port}.toml"
    conf.write_text(CONFIG.read_text() + f"\n[metrics]\nport = {port}\n")
    conf.chmod(0o600)
    log = BASE / f"metrics-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.run.metrics"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", "STORK_CONFIG": str(conf),
                                                               "STORK_NODE": "node1"})
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: _answers(url), 30, f"the metrics endpoint ({log})")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture(scope="module")
def backed_up(client):
    """A guest backed up into `backup` (so its last backup is known), and its job's id."""
    from tests.conftest import _vmids

    g = next(_vmids)
    assert client.run("create", vmid=g, disks={"scsi0": {"storage": "local", "size": "8M"}}).state == "succeeded"
    with open(storage_path("local") / f"{g}/vm-{g}-disk-0.raw", "r+b") as f:
        f.write(b"stork " * 100_000)  # data of its own: chunk files to count
    job = client.run("backup", vmid=g, storage="backup")
    assert job.state == "succeeded", job.error
    return g, job


def test_the_endpoint_says_the_last_backup_jobs_and_stores(endpoint, backed_up):
    g, _ = backed_up
    text = _get(endpoint)
    line = next(x for x in text.splitlines() if x.startswith(
        f'stork_backup_last_success_timestamp_seconds{{storage="backup",vmid="{g}"}}'))
    assert abs(float(line.split()[-1]) - time.time()) < 600
    assert f'stork_backup_last_size_bytes{{storage="backup",vmid="{g}"}} 8.388608e+06' in text
    assert value(text, 'stork_jobs_ended_total{kind="backup",state="succeeded"}') >= 1
    assert value(text, 'stork_store_dedup_ratio{storage="backup"}') > 1  # zeros and shared chunks are not stored
    assert value(text, 'stork_store_up{storage="backup"}') == 1
    assert value(text, 'stork_store_backups{storage="backup",verify="none"}') >= 1


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")
def test_a_real_prometheus_scrapes_the_age_of_a_guests_last_backup(endpoint, backed_up, tmp_path):
    g, _ = backed_up
    target = urllib.parse.urlsplit(endpoint).netloc
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: stork\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    query = urllib.parse.quote(f'time() - stork_backup_last_success_timestamp_seconds{{vmid="{g}"}}')
    try:
        def age() -> float | None:
            answer = _answers(f"http://127.0.0.1:{port}/api/v1/query?query={query}")
            result = json.loads(answer)["data"]["result"] if answer else []
            return float(result[0]["value"][1]) if result else None

        seconds = wait_for(age, 60, f"Prometheus to scrape the endpoint ({log})")
        assert 0 <= seconds < 600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert Path(tmp_path / "data").is_dir()
