"""Spot interruption notices from a node's instance metadata service (AWS IMDSv2).

AWS gives a spot instance two minutes' notice: ``/latest/meta-data/spot/instance-action`` answers
404 until then, and then ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}``. Ray has no
watcher for it on a ``ray up`` cluster; this one polls it (AWS asks for every 5 s) and hands the
notice to a callback once (``raydino.train.preemption`` drains the node, so Ray Train's own
preemption handling takes over). Off AWS the service does not answer and the watcher stops after
its first try. Standard library only: two HTTP requests need no SDK.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

AWS_METADATA_ENDPOINT = "http://169.254.169.254"
ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"  # the variable AWS's SDKs and CLI read
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600


class MetadataUnavailable(OSError):
    """The metadata service did not answer as IMDSv2 does: not on EC2, or IMDS is switched off."""


@dataclass(frozen=True)
class SpotNotice:
    action: str
    time: datetime
    """When the instance is taken away (UTC)."""

    @property
    def deadline_ms(self) -> int:
        return int(self.time.timestamp() * 1000)

    def describe(self) -> str:
        return f"spot instance {self.action} at {self.time.strftime('%Y-%m-%d %H:%M:%S')} UTC"


def metadata_endpoint(configured: str | None = None) -> str:
    """The configured endpoint, else the node's AWS_EC2_METADATA_SERVICE_ENDPOINT, else AWS's address."""
    return (configured or os.environ.get(ENDPOINT_VARIABLE) or AWS_METADATA_ENDPOINT).rstrip("/")


def parse_notice(body: bytes) -> SpotNotice:
    """The instance-action document; its time is ISO 8601 in UTC (``2026-12-05T08:22:00Z``)."""
    try:
        doc = json.loads(body)
        when = datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        return SpotNotice(action=str(doc["action"]), time=when)
    except (ValueError, KeyError, TypeError) as exc:
        raise MetadataUnavailable(f"spot/instance-action answered something that is not a notice: {body[:200]!r}") from exc


class MetadataClient:
    """IMDSv2: a session token first (PUT), then GETs that carry it; a token that expired is renewed."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._token: str | None = None

    def _token_header(self) -> dict[str, str]:
        if self._token is None:
            request = urllib.request.Request(
                self.endpoint + TOKEN_PATH, method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    self._token = response.read().decode()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise MetadataUnavailable(f"no IMDSv2 token from {self.endpoint}: {exc}") from exc
        return {"X-aws-ec2-metadata-token": self._token}

    def spot_notice(self) -> SpotNotice | None:
        """The pending notice, or None while there is none (404)."""
        for _ in range(2):  # a second try only after a 401: the token expired
            request = urllib.request.Request(self.endpoint + NOTICE_PATH, headers=self._token_header())
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return parse_notice(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                if exc.code != 401:
                    raise MetadataUnavailable(f"{self.endpoint}{NOTICE_PATH} answered HTTP {exc.code}") from exc
                self._token = None
            except (urllib.error.URLError, OSError) as exc:
                raise MetadataUnavailable(f"{self.endpoint}{NOTICE_PATH}: {exc}") from exc
        raise MetadataUnavailable(f"{self.endpoint} refused a fresh IMDSv2 token")


class SpotWatcher:
    """A daemon thread that polls for a notice every ``poll_s`` and calls ``on_notice`` once.

    It stops for good when the service has not answered its first ``tries`` polls (not on EC2); once it
    has answered, a failed poll is retried at the next interval (a metadata hiccup must not end the watch).
    """

    def __init__(self, client: MetadataClient, on_notice: Callable[[SpotNotice], None], poll_s: float = 5.0,
                 on_unavailable: Callable[[MetadataUnavailable], None] | None = None, tries: int = 3) -> None:
        self.client = client
        self.on_notice = on_notice
        self.on_unavailable = on_unavailable
        self.poll_s = poll_s
        self.tries = tries
        self.notice: SpotNotice | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raydino-spot-watcher", daemon=True)

    def start(self) -> SpotWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        answered, failures = False, 0
        while not self._stop.is_set():
            try:
                notice = self.client.spot_notice()
                answered = True
            except MetadataUnavailable as exc:
                failures += 1
                if not answered and failures >= self.tries:
                    if self.on_unavailable is not None:
                        self.on_unavailable(exc)
                    return
                notice = None
            if notice is not None:
                self.notice = notice
                self.on_notice(notice)
                return
            self._stop.wait(self.poll_s)
