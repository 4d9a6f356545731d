"""Spot notices into Ray's own preemption handling.

Ray Train 2.60 already reacts to a node being drained for preemption: its PreemptionWatcher polls
Ray Core's drain state, ``ray.train.get_preemption_info()`` tells every worker (the loop then writes
a checkpoint at the next step boundary), and when the node goes, the run restarts from the latest
checkpoint on ``FailureConfig.max_preemption_failures``' budget. What a ``ray up`` cluster on AWS
lacks is the link from the instance's two-minute notice to a drain: one watcher per node (the
node's first train worker) polls the metadata service and drains its own node with the notice's
deadline, as Ray's autoscaler does when it takes a node away.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray.core.generated import autoscaler_pb2

from raydino.train.spot import (
    AWS_METADATA_ENDPOINT,
    ENDPOINT_VARIABLE,
    MetadataClient,
    MetadataUnavailable,
    SpotNotice,
    SpotWatcher,
    metadata_endpoint,
)


def drain_this_node(notice: SpotNotice) -> tuple[bool, str]:
    """Mark this node as draining for preemption until the notice's deadline; (accepted, why not)."""
    ctx = ray.get_runtime_context()
    client = ray._raylet.GcsClient(address=ctx.gcs_address)
    accepted, rejection = client.drain_node(
        ctx.get_node_id(),  # hex, as drain_node expects
        autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
        f"raydino: {notice.describe()}",
        notice.deadline_ms,
        timeout=30,
    )
    return bool(accepted), str(rejection or "")


def start_spot_watcher(endpoint: str | None, poll_s: float, say: Callable[[str], None]) -> SpotWatcher:
    """Watch this node's metadata service; on a notice, drain the node and say so in one line."""
    resolved = metadata_endpoint(endpoint)
    node = ray.get_runtime_context().get_node_id()[:8]

    def on_notice(notice: SpotNotice) -> None:
        try:
            accepted, rejection = drain_this_node(notice)
        except (ray.exceptions.RayError, OSError) as exc:  # the GCS RPC: say it, the run goes on
            say(f"raydino: {notice.describe()} on node {node}, but draining it failed ({exc}); "
                "the run relies on its periodic checkpoints")
            return
        if accepted:
            say(f"raydino: {notice.describe()} on node {node}: node drained, the run checkpoints at its next step")
        else:
            say(f"raydino: {notice.describe()} on node {node}, but Ray refused to drain it ({rejection}); "
                "the run relies on its periodic checkpoints")

    def on_unavailable(exc: MetadataUnavailable) -> None:
        if resolved != AWS_METADATA_ENDPOINT:  # named by the user: say it does not answer; off EC2 AWS's stays quiet
            say(f"raydino: warning: the metadata service {resolved} (checkpoint.metadata_endpoint or "
                f"{ENDPOINT_VARIABLE}) does not answer as EC2's does ({exc}); spot notices are not watched on node {node}")

    return SpotWatcher(MetadataClient(resolved), on_notice, poll_s, on_unavailable).start()
