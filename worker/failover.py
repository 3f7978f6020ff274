"""A worker's consumer through a Redis failover (Sentinel).

A master that dies outright resets its connections: kombu's BRPOP fails, Celery's consumer
reconnects, and the sentinels name the new master. A master whose host stops answering
(a hang, a cut network, SIGSTOP) resets nothing, and TCP keepalive cannot tell, since the
kernel still answers for the socket: the consumer waits on its BRPOP for ever, and the node
takes no step again (celery#6348, celery#10096). So a consumer bootstep asks the sentinels
every WATCH_INTERVAL seconds who the master is; a consumer connection to any other host is
shut down, and a connection error raised out of the event loop's timer makes Celery restart
the consumer (Celery propagates connection errors out of its loop), which reconnects to the master.
Sending a message rides out a failover too (`AMQP`), and is held by the replicas before it
counts as sent (`SentinelTransport`).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import redis
import structlog
from celery import bootsteps
from celery.app import amqp
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from kombu.utils.objects import cached_property
from redis.sentinel import Sentinel

from worker import connect

log = structlog.get_logger("stork.failover")
WATCH_INTERVAL = 2.0  # seconds between asks; a sentinel answers from memory


def stale_connections(channel: Any, master: tuple[str, int]) -> list[Any]:
    """The channel's connections (its BRPOP in flight, its pub/sub) to a host that is not `master`."""
    found = [channel._in_poll or None, getattr(getattr(channel, "subclient", None), "connection", None)]
    return [c for c in found if c is not None and getattr(c, "_sock", None) is not None and
            (str(c.host), int(c.port)) != (str(master[0]), int(master[1]))]


def cut(connection: Any) -> None:
    """End the connection so its reader sees EOF (closing the fd under kombu's hub would not)."""
    with contextlib.suppress(OSError, AttributeError):
        connection._sock.shutdown(socket.SHUT_RDWR)


class AMQP(amqp.AMQP):
    """Celery's message sending, made to ride out a failover. Every message stork sends (a
    job's first steps, the next step of a chain, an undo) goes through here. kombu retries a
    send on a lost connection, but without a pause while reconnecting works, so a new master
    that takes no write until a replica is with it (NOREPLICAS, a few seconds) fails the send;
    and a send whose retries ran out can leave the pooled producer on a closed channel, so the
    next send through it fails with AttributeError. Here a failed send is tried again for
    SEND_PATIENCE seconds, each time through a new connection pool. A message sent twice is
    harmless: a step runs once, at its turn."""

    @cached_property
    def send_task_message(self) -> Any:
        send = self._create_task_sender()

        def send_patiently(producer: Any, name: str, message: Any, **options: Any) -> Any:
            deadline = time.monotonic() + SEND_PATIENCE
            pause = 0.1
            with contextlib.ExitStack() as fresh:
                while True:
                    try:
                        return send(producer, name, message, **options)
                    # a lost connection, NOREPLICAS, kombu's closed channel; never a refusal (NOPERM, WRONGTYPE)
                    except (OperationalError, redis.ConnectionError, redis.TimeoutError, AttributeError) as e:
                        if time.monotonic() > deadline:
                            raise
                        log.warning("send_retried", task=name, error=str(e) or type(e).__name__)
                    time.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    self._fresh_pools()
                    producer = fresh.enter_context(self.app.producer_or_acquire())

        return send_patiently

    def _fresh_pools(self) -> None:
        """New connection and producer pools: the old ones may hold dead channels. Closed, not
        just dropped (Celery's own after-fork reset would also fire its signal)."""
        with contextlib.suppress(Exception):
            self.app.pool.force_close_all()
        self.app._pool = None
        self._producer_pool = None


SEND_PATIENCE = 30.0  # seconds a message is sent again while Redis fails over


class _PubSub(redis.client.PubSub):
    """The pub/sub client a channel consumes fanout messages with (Celery's remote control).
    kombu reads it when its socket is readable, calling parse_response(), which in redis-py 8
    blocks with no timeout. After a failover that read meets the closed socket, reconnects
    inside redis-py's retry (to the new master, subscribing again on a new socket) and waits
    there for a message, for ever: the worker's event loop with it, so the node takes no task
    again. Here it never blocks, and a subscription moved to a new socket, which kombu's poller
    does not watch, is a connection error: Celery restarts the consumer, as after any loss."""

    def parse_response(self, block: bool = False, timeout: float = 0) -> Any:
        before = getattr(self.connection, "_sock", None)
        response = super().parse_response(block=block, timeout=timeout)
        if before is not None and getattr(self.connection, "_sock", None) is not before:
            raise redis.ConnectionError("the pub/sub connection was made again on a new socket")
        return response


class _FailoverChannel:
    """A channel whose every message is held by the replicas before the send returns
    (`connect.write_replicated`, with the transport option `wait_replicas`; a message pushed
    to a master in its last moments is otherwise lost with it, and its job waits for the
    sweep), and whose fanout reads never block (`_PubSub`)."""

    wait_replicas = 0

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._opened_on = connection  # kept: a close after a failover drops it (see `_reachable`)
        self._opened_for = connection.client
        super().__init__(connection, **kwargs)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        with self._reachable():
            super().basic_ack(delivery_tag, multiple)  # type: ignore[misc]

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        with self._reachable():
            super().basic_reject(delivery_tag, requeue)  # type: ignore[misc]

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """A step that ends after a failover restarted its consumer acks on the channel that
        restart closed, and a close that failed half-way on the gone master leaves the channel
        without its transport, or the transport without its connection. kombu's ack then
        reaches for them to reach Redis and raises AttributeError ('hostname'), which Celery
        calls unrecoverable: the worker lives on and takes no task again. Dropping the ack
        instead would leave the message in kombu's unacked hash until the visibility timeout
        (12 h) while the sweep waits for its live worker to give it back. So for the ack the
        channel gets its transport and connection back, reaches the master there is now
        (through the sentinels, or the URL), and lets go of that connection again."""
        transport = self.connection  # type: ignore[attr-defined]
        if transport is not None and transport.client is not None:
            yield
            return
        client = self._opened_on.client
        self.connection, self._opened_on.client = self._opened_on, self._opened_for
        try:
            yield
        finally:
            self._disconnect_pools()  # type: ignore[attr-defined]
            self.connection, self._opened_on.client = transport, client

    @cached_property
    def subclient(self) -> _PubSub:
        pubsub = self._create_client(asynchronous=True).pubsub()  # type: ignore[attr-defined]
        pubsub.__class__ = _PubSub  # kombu builds it through the client: the same object, never blocking
        return pubsub

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if not self.wait_replicas:
            return super()._put(queue, message, **kwargs)  # type: ignore[misc]
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))  # type: ignore[attr-defined]
        body = dumps(message)
        with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
            connect.write_replicated(client, self.wait_replicas, lambda pinned: pinned.lpush(key, body))
        return None


class Channel(_FailoverChannel, kombu_redis.Channel):
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "wait_replicas")


class SentinelChannel(_FailoverChannel, kombu_redis.SentinelChannel):
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "wait_replicas")


class _Poller(kombu_redis.MultiChannelPoller):
    def maybe_check_subclient_health(self) -> None:
        """kombu's periodic health check of each channel's pub/sub client, but not of one that
        has subscribed to nothing since the consumer reconnected: redis-py raises for that
        (RuntimeError), which Celery logs as a traceback every 10 s for the worker's life."""
        for channel in self._channels:
            client = channel.__dict__.get("subclient")
            if client is not None and getattr(client, "connection", None) is not None:
                client.check_health()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, its sends replicated and its fanout reads never blocking
    (`_FailoverChannel`), its pub/sub health check fixed (`_Poller`)."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = _Poller()


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport, as `Transport`."""

    Channel = SentinelChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = _Poller()


class MasterWatch(bootsteps.StartStopStep):
    """Consumer bootstep: on every (re)connection, watch that the task consumer's channel
    talks to the master the sentinels name."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, c: Any) -> None:
        from worker.app import config

        settings = config().redis
        if not settings.sentinels:
            return
        sentinels = Sentinel(list(settings.sentinels), sentinel_kwargs=connect.sentinel_kwargs(settings))
        channel = c.task_consumer.channel

        def check() -> None:
            try:
                master = sentinels.discover_master(settings.master_name)
            except redis.RedisError:
                return  # no sentinel knows a master now: nothing to move to
            stale = stale_connections(channel, master)
            for connection in stale:
                log.warning("consumer_master_replaced", old=f"{connection.host}:{connection.port}",
                            master=f"{master[0]}:{master[1]}")
                cut(connection)
            if stale:  # a connection error out of a timer ends the event loop: the consumer reconnects
                raise redis.ConnectionError(f"the master moved to {master[0]}:{master[1]}")

        self.timer = c.timer.call_repeatedly(WATCH_INTERVAL, check)

    def stop(self, c: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
