"""Two worker processes as two nodes: node-local storage steps run on their node's worker,
shared-storage steps on any, and a storage is never used from a node it does not exist on."""

from __future__ import annotations

import json
import time

import pytest

from drivers.errors import Refused
from producer.client import JobTimeout
from worker import broker
from worker.runner import KINDS


def storage_steps(job):
    """The job's steps that touch storage (not those a job on one node goes without)."""
    kind = KINDS[job.kind]
    return [s.name for i, s in enumerate(kind.steps) if s.storage and i not in kind.skipped(job.params)]


def test_steps_on_node_local_storage_run_on_that_nodes_worker(client, vmid):
    """A guest on node2's local storage: every storage step ran on node2 (job record)."""
    g, c = vmid(), vmid()
    job = client.run("create", vmid=g, node="node2", disks={"scsi0": {"storage": "local2", "size": "32M"}})
    assert job.state == "succeeded", job.error
    assert {job.ran_on[s] for s in storage_steps(job)} == {"node2"}
    assert client.run("template", vmid=g).state == "succeeded"
    job = client.run("full_clone", vmid=g, newid=c)
    assert job.state == "succeeded", job.error
    assert {job.ran_on[s] for s in storage_steps(job)} == {"node2"}
    assert set(job.queues[i] for i, s in enumerate(job.steps) if s in storage_steps(job)) == {"node.node2"}
    assert client.guest(c).node == "node2"


def test_shared_storage_jobs_run_on_any_node(client, vmid):
    """Guests whose node has no worker at all still get shared-storage jobs done by others."""
    jobs = [client.run("create", vmid=vmid(), node="node3", disks={"scsi0": {"storage": "shared", "size": "8M"}})
            for _ in range(6)]
    assert [j.state for j in jobs] == ["succeeded"] * 6
    nodes = {node for j in jobs for node in j.ran_on.values()}
    assert nodes <= {"node1", "node2"} and nodes
    assert {q for j in jobs for q in j.queues} == {"shared"}


def test_a_guest_on_one_node_gets_no_disk_on_another_nodes_local_storage(client, vmid, stork):
    """A new disk of a guest on node1 cannot be made on node2's storage (copies between nodes
    are tests/engine/test_between_nodes.py's)."""
    message = r"storage 'local2' is local to node\(s\) node2: it does not exist on node 'node1'"
    with pytest.raises(Refused, match=message):
        client.submit("create", vmid=vmid(), node="node1", disks={"scsi0": {"storage": "local2", "size": "8M"}})
    g = vmid()
    assert client.run("create", vmid=g, node="node1", disks={"scsi0": {"storage": "local1", "size": "8M"}}).state \
        == "succeeded"
    code, _, err = stork("disk", "add", g, "scsi1=local2:8M")
    assert code == 1 and "does not exist on node 'node1'" in err


def test_reading_another_nodes_local_storage_is_refused(stork):
    """`volume list` of a storage that only exists on node2, asked on node1, says so."""
    code, _, err = stork("volume", "list", "local2")
    assert code == 1
    assert err.strip() == "stork: storage 'local2' is local to node(s) node2: it cannot be read from node 'node1'"


def test_ping_reaches_the_named_nodes_worker(stork, client):
    """`stork ping --node node2` runs its node step on node2 and its shared steps anywhere."""
    code, out, err = stork("--json", "ping", "--node", "node2")
    assert code == 0, err
    [answer] = json.loads(out)
    assert answer["node"] == "node2" and answer["ok"] and answer["queue"] is None and answer["seconds"] > 0
    job = client.job(answer["job"])
    assert job.ran_on["pong_node"] == "node2" and job.queues == ["shared", "node.node2", "shared"]
    assert job.result["pong_node"] == "node2"


def test_a_ping_nobody_answers_names_the_queue_and_leaves_no_message(stork, client):
    """A node without a worker: the answer comes within --timeout, names the queue nobody
    serves, and the ping's message is taken back out of that queue (none waits for a worker
    that starts later); the job ends cancelled, withdrawn."""
    started = time.monotonic()
    code, out, err = stork("ping", "--node", "node9", "--timeout", "1.5")
    assert code == 1 and time.monotonic() - started < 5
    assert "node9" in out and "no worker serves queue node.node9 (no answer in 1.5 s)" in out
    assert err == "stork: no answer from 1 of 1 node(s): node9\n"
    job = client.jobs(kind="ping", vmid=None, limit=1)[0]
    assert job.state == "cancelled" and job.error == "withdrawn: no worker took step pong_node from queue node.node9"
    assert job.id not in broker.pending_messages(client.r, {"node.node9"})
    assert client.r.llen("node.node9") == 0


def test_ping_with_no_node_asks_every_node_the_config_names(stork, client):
    """node1 and node2 answer; `crash` and `far` (storages' nodes whose workers run only in
    the crash and namespace tests) do not, and their queues are named. (The default 5 s: with
    2 s, a loaded machine once kept node2's answer past it.)"""
    code, out, err = stork("--json", "ping", "--timeout", "5")
    answers = {a["node"]: a for a in json.loads(out)}
    assert set(answers) == set(client.cfg.known_nodes()) == {"node1", "node2", "crash", "far"}
    assert answers["node1"]["ok"] and answers["node2"]["ok"]
    for silent in ("crash", "far"):
        assert not answers[silent]["ok"] and answers[silent]["queue"] == f"node.{silent}"
        assert client.r.llen(f"node.{silent}") == 0
    assert code == 1 and err == "stork: no answer from 2 of 4 node(s): crash, far\n"


@pytest.mark.parametrize("timeout", ["0", "-1", "soon", "nan", "7200"])
def test_a_ping_timeout_that_is_not_a_number_of_seconds_is_a_usage_error(stork, capsys, timeout):
    with pytest.raises(SystemExit) as stop:
        stork("ping", "--timeout", timeout)
    assert stop.value.code == 2
    assert f"argument --timeout: invalid value '{timeout}': expected seconds" in capsys.readouterr().err


def test_ping_of_a_node_without_a_worker_waits_and_can_be_cancelled(client):
    """A ping to a node nobody serves stays unfinished (it is not lost) until cancelled."""
    job = client.submit("ping", node="node9")
    with pytest.raises(JobTimeout):
        client.wait(job.id, timeout=1.5)
    client.cancel(job.id)
    assert client.wait(job.id, timeout=10).state == "cancelled"
