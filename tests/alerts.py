"""Where the test session's alerts go: a real HTTP server recording every webhook POST, and a
real SMTP server (aiosmtpd) keeping every mail, both on 127.0.0.1, in threads of the test
process, for the session's [notify.hook] and [notify.mail] targets."""

from __future__ import annotations

import email
import json
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from worker.testing import free_port


class Webhook:
    """Every POST: its path, headers and body, kept in order."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.posts.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p["body"]) for p in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """Every mail the SMTP server took, parsed."""

    def __init__(self) -> None:
        self.mails: list[Message] = []
        box = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                box.mails.append(email.message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()
