"""Alerts: what goes wrong while nobody watches reaches a webhook or a mailbox.

Events (drivers.config.NOTIFY_EVENTS): a job that failed, a schedule run that could not start
what it should (a guest refused, a crontab that does not parse), backups found damaged by
verify, and a guest whose newest backup is older than a target's `stale-after`. `announce`
sends one `stork.notify.send` task per target that takes the event, on the shared queue, so
the job or tick that noticed never waits for a slow server; the task delivers it and tries
again on a network error. The task's arguments are the target's name and the event, never a
secret: it reads the URL, secret or password from the config where it runs.

A webhook gets the event as a JSON POST with `X-Stork-Event` and `X-Stork-Signature:
sha256=<HMAC-SHA256 of the body under the target's secret>` (as GitHub signs its webhooks); a
mailbox gets a mail whose subject is the event's summary and whose body is the event.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from typing import Any

import redis
import structlog
from celery import Celery

from drivers.config import NOTIFY_EVENTS, Config
from drivers.errors import StorkError
from worker.queues import SHARED_QUEUE

log = structlog.get_logger("stork.notify")
TASK = "stork.notify.send"
TIMEOUT = 10.0  # seconds a server may take to answer one delivery
Event = dict[str, Any]


class DeliveryError(StorkError):
    """A target could not be reached or refused the event (a retry may go through)."""


def event(name: str, summary: str, **fields: Any) -> Event:
    """An event `name` (one of NOTIFY_EVENTS) with a one-line summary for people."""
    assert name in NOTIFY_EVENTS, name
    return {**fields, "event": name, "summary": summary, "time": time.time(), "host": socket.gethostname()}


def targets_for(cfg: Config, kind: str) -> list[str]:
    """The targets that take events of `kind` (backup-stale only where a stale-after is set)."""
    return sorted(name for name, t in cfg.notify.items()
                  if kind in t.get("events", NOTIFY_EVENTS) and (kind != "backup-stale" or "stale-after" in t))


def announce(cfg: Config, sender: Celery, ev: Event, only: list[str] | None = None) -> None:
    """Queue the event's delivery to each target that takes it (`only` these, where given).
    Never raises: an alert that cannot be queued is logged, and what noticed goes on."""
    for name in only if only is not None else targets_for(cfg, ev["event"]):
        try:
            sender.send_task(TASK, args=[name, ev], queue=SHARED_QUEUE)
        except Exception as e:  # Redis away: the job's own record still says what happened
            log.error("alert_not_queued", target=name, event=ev["event"], error=str(e))


def once(r: redis.Redis, key: str, seconds: int) -> bool:
    """True the first time in `seconds` this is asked for `key`: an alert said once, not at every tick."""
    return bool(r.set(f"stork:notify:{key}", "1", nx=True, ex=seconds))


def deliver(cfg: Config, name: str, ev: Event) -> None:
    """Send the event to the target `name`; DeliveryError if it could not be delivered."""
    target = cfg.notify.get(name)
    if target is None:
        raise StorkError(f"notify target {name!r} is no longer configured: the {ev.get('event')} alert is dropped")
    if target["type"] == "webhook":
        _post(target, ev)
    else:
        _mail(target, ev)


def _post(target: dict[str, Any], ev: Event) -> None:
    body = json.dumps(ev, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "stork", "X-Stork-Event": ev["event"]}
    if secret := target.get("secret"):
        headers["X-Stork-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(target["url"], data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # http(s) only: the config checked it
            answer.read()
    except urllib.error.HTTPError as e:
        raise DeliveryError(f"webhook {_where(target['url'])} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DeliveryError(f"webhook {_where(target['url'])}: {getattr(e, 'reason', e)}") from None
    except (http.client.HTTPException, ValueError) as e:  # their text may quote the URL: its kind only
        raise DeliveryError(f"webhook {_where(target['url'])}: {type(e).__name__}") from None


def _where(url: str) -> str:
    """A URL for messages: scheme, host and port, never a path or query that may hold a token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def _mail(target: dict[str, Any], ev: Event) -> None:
    message = EmailMessage()
    message["Subject"] = " ".join(f"stork: {ev['summary']}".split())[:200]  # a header is one line
    message["From"] = target["from"]
    message["To"] = ", ".join(target["to"])
    message.set_content(f"{ev['summary']}\n\n{json.dumps(ev, indent=1, sort_keys=True)}\n")
    host, port = target["host"], target.get("port", 25)
    try:
        with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
            if target.get("starttls"):
                smtp.starttls(context=ssl.create_default_context())  # the server's certificate checked
            if target.get("username"):
                smtp.login(target["username"], target.get("password", ""))
            smtp.send_message(message)
    except (smtplib.SMTPException, OSError) as e:
        raise DeliveryError(f"mail through {host}:{port}: {e}") from None
