"""Progress lines of a Ray Train worker reach the console once, under Ray Train's print patch."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

patch_print = pytest.importorskip("ray.train.v2._internal.logging.patch_print")

from raydino.train.loop import _say


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def ray_train_worker_streams() -> Iterator[tuple[io.StringIO, io.StringIO, _Records]]:
    """The streams of a Ray Train worker: Ray has wrapped sys.stdout, Train has patched print.

    Set inside the test body: pytest swaps sys.stdout between a fixture's set-up and the call.
    """
    console, wrapped, records = io.StringIO(), io.StringIO(), _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(logging.INFO)
    try:
        with (
            contextlib.ExitStack() as stack,
            patch_print.print_context_manager(patch_print.redirected_print),
        ):
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(sys, "__stdout__", console)
            mp.setattr(sys, "stdout", wrapped)
            yield console, wrapped, records
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)


def test_patched_print_would_say_it_twice():
    with ray_train_worker_streams() as (_console, wrapped, records):
        print("epoch 1/2", flush=True)  # the patched print: tee to the wrapped stream and log
    assert wrapped.getvalue() == "epoch 1/2\n" and records.messages == ["epoch 1/2"]


def test_progress_line_is_said_once():
    with ray_train_worker_streams() as (console, wrapped, records):
        _say("epoch 1/2  step 10/20")
    assert console.getvalue() == "epoch 1/2  step 10/20\n"
    assert wrapped.getvalue() == "" and records.messages == []


def test_the_report_log_quieted_is_still_where_ray_keeps_it():
    """``_quiet_report_logs`` is the one reach into ``ray.train.v2._internal`` (no public switch in
    Ray 2.60): if Ray moves the module, renames its logger or drops the line, this fails."""
    from ray.train.v2._internal.execution import context  # ImportError: Ray moved it; update loop._quiet_report_logs

    from raydino.train.loop import _quiet_report_logs

    assert "Reporting training result" in Path(context.__file__).read_text()
    assert context.logger.name == context.__file__
    level = context.logger.level
    try:
        _quiet_report_logs()
        assert not context.logger.isEnabledFor(logging.INFO)
    finally:
        context.logger.setLevel(level)
