"""Spot notices from the instance metadata service (raydino.train.spot), against a fake IMDSv2 on loopback.
The whole path (notice -> drain -> checkpoint -> node removed -> resume) is in tests/test_multinode.py."""

import socket
import threading
import time
from datetime import datetime, timezone

import pytest

from raydino.config import load_config
from raydino.train.spot import (
    AWS_METADATA_ENDPOINT,
    ENDPOINT_VARIABLE,
    MetadataClient,
    MetadataUnavailable,
    SpotWatcher,
    metadata_endpoint,
    parse_notice,
)
from tests.fake_imds import FakeIMDS


@pytest.fixture
def imds():
    with FakeIMDS() as fake:
        yield fake


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_no_notice_is_none_and_a_notice_is_read_with_its_deadline(imds):
    client = MetadataClient(imds.endpoint)
    assert client.spot_notice() is None
    when = imds.give_notice(120)
    notice = client.spot_notice()
    assert notice.action == "terminate" and notice.time == when
    assert notice.deadline_ms == int(when.timestamp() * 1000)
    # IMDSv2: one token, then GETs that carry it
    assert [(m, code) for m, _, code in imds.requests] == [("PUT", 200), ("GET", 404), ("GET", 200)]


def test_an_expired_token_is_renewed(imds):
    client = MetadataClient(imds.endpoint)
    assert client.spot_notice() is None
    imds.expire_tokens()
    imds.give_notice(60, action="stop")
    assert client.spot_notice().action == "stop"
    assert [code for _, _, code in imds.requests] == [200, 404, 401, 200, 200]


def test_a_service_that_does_not_answer_is_unavailable():
    with pytest.raises(MetadataUnavailable, match="no IMDSv2 token"):
        MetadataClient(_closed_port(), timeout_s=1).spot_notice()


@pytest.mark.parametrize("body", [b"<html>", b'{"action": "terminate"}', b'{"action": "stop", "time": "soon"}'])
def test_a_document_that_is_not_a_notice_is_refused(body):
    with pytest.raises(MetadataUnavailable, match="not a notice"):
        parse_notice(body)


def test_parse_reads_aws_example():
    notice = parse_notice(b'{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert notice.time == datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc)
    assert "terminate at 2017-09-18 08:22:00 UTC" in notice.describe()


def test_the_endpoint_is_the_configured_one_then_the_aws_variable_then_aws(monkeypatch):
    monkeypatch.delenv(ENDPOINT_VARIABLE, raising=False)
    assert metadata_endpoint() == AWS_METADATA_ENDPOINT
    monkeypatch.setenv(ENDPOINT_VARIABLE, "http://127.0.0.1:1/")
    assert metadata_endpoint() == "http://127.0.0.1:1"
    assert metadata_endpoint("http://10.0.0.1") == "http://10.0.0.1"


def test_the_watcher_hands_over_one_notice_and_stops(imds):
    seen, done = [], threading.Event()

    def on_notice(notice):
        seen.append(notice)
        done.set()

    watcher = SpotWatcher(MetadataClient(imds.endpoint), on_notice, poll_s=0.05).start()
    try:
        imds.give_notice(120)
        assert done.wait(10)
        watcher._thread.join(10)
        assert not watcher._thread.is_alive() and len(seen) == 1 and watcher.notice == seen[0]
    finally:
        watcher.stop()


def test_the_watcher_stops_quietly_off_ec2_and_says_why():
    reasons, notices = [], []
    closed = _closed_port()
    watcher = SpotWatcher(MetadataClient(closed, timeout_s=1), notices.append, poll_s=0.05,
                          on_unavailable=reasons.append, tries=3).start()
    watcher._thread.join(10)
    assert not watcher._thread.is_alive() and notices == [] and len(reasons) == 1
    assert "no IMDSv2 token" in str(reasons[0]) and closed in str(reasons[0])


def test_a_slow_first_answer_is_tried_again_before_the_watch_ends(imds):
    """A service that fails its first poll (a loaded node) and answers the next is watched."""
    done = threading.Event()
    client = MetadataClient(imds.endpoint)
    real, calls = client.spot_notice, []

    def first_fails():
        calls.append(1)
        if len(calls) == 1:
            raise MetadataUnavailable("timed out")
        return real()

    client.spot_notice = first_fails
    imds.give_notice(120)
    watcher = SpotWatcher(client, lambda n: done.set(), poll_s=0.05, tries=3).start()
    try:
        assert done.wait(10) and len(calls) == 2
    finally:
        watcher.stop()


def test_a_failed_poll_after_the_service_answered_keeps_the_watch(imds):
    """A metadata hiccup mid-run does not end the watch: the notice still arrives."""
    done = threading.Event()
    watcher = SpotWatcher(MetadataClient(imds.endpoint), lambda n: done.set(), poll_s=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while ("GET", 404) not in [(m, code) for m, _, code in imds.requests]:  # it has answered once
            assert time.monotonic() < deadline
            time.sleep(0.01)
        imds.notice = {"action": "terminate"}  # answered with 200 but no time: a poll that fails
        time.sleep(0.3)
        assert watcher._thread.is_alive() and not done.is_set()
        imds.give_notice(120)
        assert done.wait(10)
    finally:
        watcher.stop()


def test_spot_settings_are_validated():
    cfg = load_config(overrides=["checkpoint.notice_poll_s=1", "checkpoint.max_preemptions=3"])
    assert cfg.checkpoint.spot_notices and cfg.checkpoint.max_preemptions == 3
    with pytest.raises(ValueError, match="notice_poll_s"):
        load_config(overrides=["checkpoint.notice_poll_s=0"])
