"""The tiny network and schedule the tests run with, in one place (dotted config overrides)."""

TINY_NET = [
    "model.kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "head.num_prototypes=64",
    "head.hidden_dim=64",
    "head.bottleneck_dim=16",
    "data.crops.local_number=2",
    # the end-to-end runs' layout (the cpu_demo of 2026-12-03): 2 workers x 64 images, 10 steps per
    # epoch on the digits, a kNN every epoch (ASHA's rungs); the demo itself trains 1 worker x 32
    "data.batch_size_per_worker=64",
    "scaling.num_workers=2",
    "eval.every_epochs=1",
]
NO_WARMUP = [
    "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0",
    "loss.warmup_teacher_temp_epochs=0",
]
TINY_RUN = [*TINY_NET, *NO_WARMUP, "tracking.log_model=false"]
"""A tiny network with every warm-up and freeze off: what the end-to-end runs train. Without the MLflow
model (its torch.export costs the driver ~4 s of CPU per run, after training): the module fixture of
tests/test_pretrain_e2e.py logs it end to end, tests/test_mlflow_model.py tests it in depth."""
