"""``raydino shard SRC DST``: pack an image folder into a shard set, on Ray (``raydino.data.shards``)."""

from __future__ import annotations

from collections.abc import Callable

from raydino.stores.shard_manifest import ShardManifest


def shard(src: str, dst: str, shard_mb: float, log: Callable[[str], None] = print) -> ShardManifest:
    """Start or join Ray as a run would (RAY_ADDRESS, a cluster on this machine, else a private Ray), then
    write the shard set; a re-run keeps the shards an earlier run finished."""
    from raydino.config import load_config
    from raydino.data.shards import write_shards
    from raydino.train.driver import ensure_ray

    if shard_mb <= 0:
        raise ValueError(f"--shard-mb must be positive, got {shard_mb:g}")
    ensure_ray(load_config())
    return write_shards(src, dst, shard_mb, log=log)
