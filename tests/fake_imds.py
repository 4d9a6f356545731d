"""A fake EC2 instance metadata service (IMDSv2) on loopback, for spot interruption notices.

It keeps IMDSv2's rules that a client can get wrong: a token from ``PUT /latest/api/token`` (with a
TTL header) must ride on every GET, a GET without a valid one is 401, and
``/latest/meta-data/spot/instance-action`` is 404 until a notice is given.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

NOTICE_PATH = "/latest/meta-data/spot/instance-action"


class FakeIMDS:
    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.notice: dict[str, str] | None = None
        self.requests: list[tuple[str, str, int]] = []
        self.first_served: float | None = None
        """time.time() when a notice was first answered with 200."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, code: int, body: bytes = b"") -> None:
                fake.requests.append((self.command, self.path, code))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._answer(400)
                token = secrets.token_hex(8)
                fake.tokens.add(token)
                return self._answer(200, token.encode())

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") not in fake.tokens:
                    return self._answer(401)
                if self.path != NOTICE_PATH or fake.notice is None:
                    return self._answer(404)
                if fake.first_served is None:
                    fake.first_served = time.time()
                return self._answer(200, json.dumps(fake.notice).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def give_notice(self, seconds: float, action: str = "terminate") -> datetime:
        """From now on, a notice that the instance goes in ``seconds`` (whole seconds, as AWS writes it)."""
        when = (datetime.now(timezone.utc) + timedelta(seconds=seconds)).replace(microsecond=0)
        self.notice = {"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return when

    def expire_tokens(self) -> None:
        self.tokens.clear()
