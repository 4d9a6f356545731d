import gc
import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default: every run's end (and every fault) is seen up to
# 2 s late. Tests run ~35 Train runs; at 0.5 s each run ends ~2.5 s sooner here (one run each way, 2026-12-05)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
torch.set_num_threads(2)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After pytest's own last garbage collection (its unraisable-exception check), freeze what is left, so the
    interpreter's exit skips collecting it: torch, MLflow, Ray and sympy's objects made exit take 4-5 s after the
    fast tier (0.3 s frozen; the operating system frees the memory either way)."""
    gc.freeze()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray for the whole session (``ray.init`` costs several seconds here).

    Logical CPUs (bookkeeping, not cores) fit 2 train workers, a crop actor and read tasks, or
    two small sweep trials at once, on this 2-core machine.
    Yields the address, so subprocesses can join the same instance.
    """
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        # the dashboard stays on: without it, Train runs of trials stopped by ASHA can keep their
        # resources (docs/architecture.md) and later trials wait forever
        # address="local": a new instance even where another Ray on this machine (a test's simulated
        # cluster) left its address behind
        # marked like a run's private Ray: a `raydino pretrain` subprocess without RAY_ADDRESS starts its own
        # task workers kept as a run's private Ray keeps them (PRIVATE_RAY_SYSTEM_CONFIG): ~10 s less per Train run
        from raydino.train.driver import PRIVATE_INSTANCE, PRIVATE_RAY_SYSTEM_CONFIG

        ray.init(address="local", num_cpus=8, resources={PRIVATE_INSTANCE: 1}, log_to_driver=True,
                 configure_logging=False, _system_config=PRIVATE_RAY_SYSTEM_CONFIG)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def s3(ray_session, tmp_path_factory) -> Iterator[str]:
    """A real S3 API (moto's server on 127.0.0.1) for one test module, reached the standard way:
    AWS_ENDPOINT_URL and AWS_* credentials in the environment (restored after). Ray starts first, so
    its workers never see these variables: as on a cluster whose nodes were not started with them,
    the endpoint must travel with the filesystem the driver resolved."""
    from tests.object_store import CREDENTIALS, moto_endpoint

    with moto_endpoint() as endpoint, pytest.MonkeyPatch.context() as mp:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(key, value)
        yield endpoint
