"""Checkpoint files: round trip, atomic writes, weights_only loading, clear errors for foreign files."""

import pickle
import random

import numpy as np
import pytest
import torch

from raydino.config import load_config
from raydino.step import CheckpointMismatchError, DINOStep
from raydino.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from tests.tiny import TINY_NET

TINY = [*TINY_NET, "head.num_prototypes=32"]  # 64 prototypes is the other architecture below


def _state(step_fn: DINOStep, **extra) -> TrainState:
    return TrainState(**step_fn.state_dict(), step=7, epoch=1, batch_in_epoch=3, steps_per_epoch=4,
                      rng=[rng_state()], latest_eval={"knn_top1": 12.5}, **extra)


def test_round_trip_restores_every_part(tmp_path):
    cfg = load_config(overrides=TINY)
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    write_checkpoint(tmp_path, _state(step_fn, nonfinite_skipped=2), cfg.to_yaml())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "manifest.json", STATE_FILE]  # no temp files
    state = read_checkpoint(tmp_path)
    assert (state.step, state.epoch, state.batch_in_epoch, state.nonfinite_skipped) == (7, 1, 3, 2)
    assert state.latest_eval == {"knn_top1": 12.5}
    other = DINOStep.build(load_config(overrides=[*TINY, "seed=1"]), torch.device("cpu"))
    before = next(iter(other.student_module.parameters())).detach().clone()
    assert not torch.equal(before, next(iter(step_fn.student_module.parameters())))  # seed 1: other weights
    other.load_state_dict(state.models())
    for (name, a), b in zip(step_fn.student_module.state_dict().items(), other.student_module.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    cfg = load_config(overrides=TINY)
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    write_checkpoint(tmp_path, _state(step_fn), cfg.to_yaml())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(read_checkpoint(tmp_path).rng_for(0))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_position_rescales_to_another_epoch_length():
    state = TrainState({}, {}, {}, {}, step=30, epoch=2, batch_in_epoch=5, steps_per_epoch=10)
    assert state.position(10) == (30, 2, 5)
    assert state.position(20) == (50, 2, 10)  # same fraction of the epoch, same schedules
    assert state.position(4) == (10, 2, 2)


def test_missing_state_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a raydino checkpoint"):
        read_checkpoint(tmp_path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a raydino checkpoint"):
        read_checkpoint(tmp_path)


class _Payload:  # any pickled object, as a malicious or foreign checkpoint could hold
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_not_loaded(tmp_path, capsys):
    torch.save({"format": "raydino-checkpoint/2", "student": _Payload()}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="tensors and plain values"):
        read_checkpoint(tmp_path)
    assert "this must never run" not in capsys.readouterr().out


def test_another_torch_file_is_refused_by_format(tmp_path):
    torch.save({"model": torch.zeros(2)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="format"):
        read_checkpoint(tmp_path)
    with (tmp_path / STATE_FILE).open("wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)


def test_a_checkpoint_of_another_architecture_is_named_as_such(tmp_path):
    cfg = load_config(overrides=TINY)
    write_checkpoint(tmp_path, _state(DINOStep.build(cfg, torch.device("cpu"))), cfg.to_yaml())
    wider = DINOStep.build(load_config(overrides=[*TINY, "head.num_prototypes=64"]), torch.device("cpu"))
    with pytest.raises(CheckpointMismatchError, match="another model, head or centering"):
        wider.load_state_dict(read_checkpoint(tmp_path).models())


def test_the_newest_complete_checkpoint_in_storage_is_the_fallback(tmp_path):
    """What workers restore from when Ray Train recorded no checkpoint (a run stopped between writing one and
    Ray recording it): the newest directory whose manifest's files are all there at full size. Copies cut
    short are passed over: a truncated state.pt, a copy the manifest has not reached yet."""
    import shutil

    from raydino.launch.plan import CHECKPOINT_MANIFEST, checkpoint_complete, plan_run
    from raydino.stores.locations import locate
    from raydino.train.driver import newest_checkpoint

    cfg = load_config(overrides=[*TINY_NET, "tracking.run_name=R", f"checkpoint.storage_path={tmp_path}"])
    plan = plan_run(cfg)
    assert newest_checkpoint(plan, str(tmp_path), None) is None  # no run directory yet
    state = _state(DINOStep.build(cfg, torch.device("cpu")))
    run = tmp_path / "R"
    for step in (5, 10):
        write_checkpoint(run / f"checkpoint_{step:08d}", state, cfg.to_yaml())
    truncated, unlisted = run / "checkpoint_00000020", run / "checkpoint_00000030"
    shutil.copytree(run / "checkpoint_00000010", truncated)
    data = (truncated / STATE_FILE).read_bytes()
    (truncated / STATE_FILE).write_bytes(data[: len(data) // 2])
    shutil.copytree(run / "checkpoint_00000010", unlisted)
    (unlisted / CHECKPOINT_MANIFEST).unlink()

    assert [checkpoint_complete(locate(run / f"checkpoint_{s:08d}")) for s in (5, 10, 20, 30)] == [True, True, False, False]
    found = newest_checkpoint(plan, str(tmp_path), None)
    assert found is not None and found.path == str(run / "checkpoint_00000010")
    assert read_checkpoint(found.path).step == state.step


def test_a_full_or_read_only_storage_is_named_with_the_last_good_checkpoint(tmp_path):
    import errno

    from raydino.launch.plan import plan_run
    from raydino.train.driver import storage_failure_message

    cfg = load_config(overrides=[*TINY_NET, "tracking.run_name=R", f"checkpoint.storage_path={tmp_path}"])
    plan = plan_run(cfg)
    full = OSError(errno.ENOSPC, "No space left on device")
    assert storage_failure_message(full, plan) == (
        f"checkpoint storage {tmp_path / 'R'} is full (No space left on device): the run stopped at its next "
        "checkpoint; it has no complete checkpoint yet. Free space there (or move the run directory to "
        "checkpoint.storage_path elsewhere) and run again with tracking.run_name=R to resume from it")
    write_checkpoint(tmp_path / "R" / "checkpoint_00000004", _state(DINOStep.build(cfg, torch.device("cpu"))), cfg.to_yaml())
    (tmp_path / "R" / "checkpoint_00000008").mkdir()  # the copy the full disk cut short
    message = storage_failure_message(OSError(errno.EROFS, "Read-only file system"), plan)
    assert message is not None and "is read-only (Read-only file system)" in message
    assert f"the last good checkpoint is {tmp_path / 'R' / 'checkpoint_00000004'}." in message
    assert storage_failure_message(OSError(errno.ECONNRESET, "reset"), plan) is None
    assert storage_failure_message(ValueError("no"), plan) is None
