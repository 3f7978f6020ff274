"""Celery signals, connected once: log context per task, reconciliation at worker start; the
consumer bootstep that keeps malformed queue messages aside (worker/deadletter.py); and a
worker's `stats` reply without the broker's passwords."""

from __future__ import annotations

from typing import Any

import structlog
from celery import signals
from celery.app.utils import filter_hidden_settings
from celery.worker.consumer.connection import Connection as BrokerConnectionStep

from drivers.errors import StorkError
from worker import deadletter, failover, liveness, logs, records, recovery
from worker.app import app, config, redis_client

log = structlog.get_logger("stork.worker")

# A message no worker can turn into a task is kept in stork:dead instead of killing the
# consumer. Added here, before the worker builds its consumer blueprint (this module is
# imported through the app's `include` when the worker starts).
app.steps["consumer"].add(deadletter.DeadLetters)
# A consumer left talking to a replaced master (one that hangs rather than resets) is cut loose
app.steps["consumer"].add(failover.MasterWatch)
_celery_broker_info = BrokerConnectionStep.info


def _broker_info(step: Any, c: Any) -> dict[str, Any]:
    """The broker connection as a worker's `stats` reply shows it (`inspect stats`, Flower's
    Broker tab): Celery leaves out its `password` only, and stork's sentinel URLs (kombu's
    alternates) and sentinel login (in the transport options) hold passwords too."""
    shown = _celery_broker_info(step, c)
    if isinstance(params := shown.get("broker"), dict):
        params.pop("alternates", None)
        params.pop("credential_provider", None)
        params["transport_options"] = filter_hidden_settings(params.get("transport_options") or {})
    return shown


BrokerConnectionStep.info = _broker_info  # type: ignore[method-assign]


@signals.worker_process_init.connect
@signals.celeryd_init.connect
def _configure_logging(**_: Any) -> None:
    logs.configure()


@signals.worker_process_init.connect
def _start_heartbeat(**_: Any) -> None:
    liveness.start_heartbeat(redis_client())


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task=getattr(task, "name", None), task_id=task_id)


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


@signals.worker_ready.connect
def _reconcile(**_: Any) -> None:
    cfg = config()
    liveness.start_heartbeat(redis_client())  # the main process too: it holds the pool's messages
    records.set_keep(redis_client(), cfg.job_keep_days)
    records.index_all(redis_client())  # jobs recorded before the job indexes existed, once per cluster
    try:
        records.index_volumes(redis_client())  # and before the volume sets: until then checks read every job
    except StorkError as e:
        log.error("volume_index_not_built", error=str(e))
    acted = recovery.reconcile(redis_client(), cfg.node)
    recovery.start_sweeper()
    log.info("worker_ready", node=cfg.node, reconciled=acted)
