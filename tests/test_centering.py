import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydino.objectives.centering import (
    LogitCentering,
    NoCentering,
    ProbabilityCentering,
    SinkhornCentering,
    entropy,
    make_centering,
)

K = 16


def _dominated_logits(n=64):
    logits = torch.randn(n, K) * 0.1
    logits[:, 0] += 4.0  # every sample prefers prototype 0
    return logits


def test_probability_centering_pushes_dominated_usage_toward_uniform():
    center = ProbabilityCentering(K, momentum=0.9)
    logits = _dominated_logits()
    before = center.targets(logits, 0.04)
    for _ in range(100):
        center.update(logits, 0.04)
    after = center.targets(logits, 0.04)
    assert before.mean(0)[0] > 0.7
    assert after.mean(0)[0] < 0.1
    assert entropy(after.mean(0)) > entropy(before.mean(0)) + 1.0
    assert entropy(after.mean(0)) > 0.99 * torch.log(torch.tensor(float(K)))


def test_logit_centering_cancels_constant_per_prototype_offset():
    offset = torch.randn(K) * 5.0  # what a vMF log-normaliser per prototype looks like to the center
    plain, shifted = LogitCentering(K, 0.9), LogitCentering(K, 0.9)
    for _ in range(200):
        logits = torch.randn(32, K)
        p_plain, p_shifted = plain.targets(logits, 0.1), shifted.targets(logits + offset, 0.1)
        plain.update(logits, 0.1)
        shifted.update(logits + offset, 0.1)
    assert (p_plain - p_shifted).abs().max() < 1e-4
    # and at the start (center 0) the offset did change the targets
    fresh = LogitCentering(K, 0.9)
    assert (fresh.targets(logits, 0.1) - fresh.targets(logits + offset, 0.1)).abs().max() > 0.1


def test_logit_center_is_in_temperature_one_units():
    center = LogitCentering(K, momentum=0.0)
    raw = torch.randn(8, K)
    center.update(raw / 0.04, 0.04)
    torch.testing.assert_close(center.center.squeeze(0), raw.mean(0), rtol=1e-5, atol=1e-6)


def test_sinkhorn_equipartitions_the_batch():
    logits = _dominated_logits(n=256) / 0.07
    q = SinkhornCentering(K, iterations=50).targets(logits, 0.07)
    torch.testing.assert_close(q.sum(1), torch.ones(256), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.mean(0), torch.full((K,), 1.0 / K), rtol=1e-3, atol=1e-4)
    assert torch.isfinite(q).all()


def test_sinkhorn_survives_extreme_logits():
    logits = torch.randn(32, K) * 3.0 / 0.04
    q = SinkhornCentering(K).targets(logits, 0.04)
    assert torch.isfinite(q).all()


def test_none_is_plain_softmax():
    logits = torch.randn(4, K)
    torch.testing.assert_close(NoCentering(K).targets(logits, 0.1), torch.softmax(logits, -1))


@pytest.mark.parametrize("mode,buffer", [("logit", "center"), ("probability", "center")])
def test_state_is_checkpointed(mode, buffer):
    a = make_centering(mode, K)
    a.update(torch.randn(8, K), 0.05)
    b = make_centering(mode, K)
    b.load_state_dict(a.state_dict())
    assert buffer in a.state_dict()
    torch.testing.assert_close(getattr(a, buffer), getattr(b, buffer))


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown centering mode 'foo'.*logit, probability, sinkhorn, none"):
        make_centering("foo", K)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, logits: torch.Tensor, out: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        shard = logits.chunk(2)[rank]
        result = {}
        for mode in ("logit", "probability"):
            c = make_centering(mode, K)
            c.update(shard, 0.05)
            result[mode] = c.center.clone()
        result["sinkhorn"] = SinkhornCentering(K).targets(shard, 0.05)
        out[rank] = result
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_statistics_are_all_reduced_across_workers():
    logits = torch.randn(12, K) * 3
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), logits, out), nprocs=2, join=True)
        results = dict(out)
    for mode in ("logit", "probability"):
        single = make_centering(mode, K)
        single.update(logits, 0.05)
        for rank in (0, 1):
            torch.testing.assert_close(results[rank][mode], single.center)
    full = SinkhornCentering(K).targets(logits, 0.05)
    torch.testing.assert_close(torch.cat([results[0]["sinkhorn"], results[1]["sinkhorn"]]), full)
