"""The Celery app, configured from the cluster config (STORK_CONFIG).

The settings are the ones long storage jobs need (DESIGN.md "Celery settings"): JSON only,
late acks with one task prefetched, redelivery when a worker process is lost, a Redis
visibility timeout above the longest step (in all three places), time limits below it.
"""

from __future__ import annotations

from functools import cache

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from drivers import config as config_module
from drivers.config import Config
from worker.queues import SHARED_QUEUE


@cache
def config() -> Config:
    return config_module.load()


REDIS_OUTAGE = 60  # seconds a worker keeps retrying Redis (e.g. while it restarts)


@cache
def redis_client() -> redis.Redis:
    """This process's Redis client. It rides out a Redis restart: commands are retried with
    backoff for about REDIS_OUTAGE seconds. A retried state change whose first try went
    through fails its guard; the runner then checks whether the change is already there.
    redis-py's pool notices a fork and reconnects, so one client per process is safe."""
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=int(REDIS_OUTAGE / 2) + 5)
    return redis.Redis.from_url(
        config().redis_url, decode_responses=True, health_check_interval=30, retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def make_app(cfg: Config) -> Celery:
    app = Celery("stork", include=["worker.tasks", "worker.hooks"])
    vt = cfg.visibility_timeout
    app.conf.update(
        broker_url=cfg.redis_url,
        result_backend=cfg.redis_url,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": vt},
        result_backend_transport_options={"visibility_timeout": vt},
        visibility_timeout=vt,
        task_soft_time_limit=int(vt * 0.8),
        task_time_limit=int(vt * 0.9),
        # Cancelling on connection loss makes Celery 5.6 announce the cancel over the lost
        # connection and die. The step goes on instead; if its message comes back after the
        # visibility timeout, the step finds itself done and returns (see runner).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        # The job record in Redis is the truth; Celery's results would only cost writes.
        task_ignore_result=True,
        result_expires=86400,
        task_default_queue=SHARED_QUEUE,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # structlog writes JSON lines to stderr itself
    )
    return app


app = make_app(config())
