"""`make gpu-check`: every GPU-only path of raydino, run once, in one command, with a report.

A GPU machine is at hand only now and then, for minutes. This script is what to run there first (at
most ~8 minutes on one GPU with ~16 cores); it writes ``OUT/report.md`` and ``OUT/report.json``:

1. ``gpu_step``  benchmarks/gpu_step.py at the imagenet_vit_small geometry: eager and compiled, fp32
   and bf16: images/s, step time, peak memory, MFU against the device's peak dense bf16 TFLOP/s
   (``PEAK_BF16_TFLOPS`` by device name; ``--peak-tflops`` overrides); the optimiser's fused AdamW.
2. ``pretrain``  a real ``pretrain`` on generated ImageNet-geometry JPEGs (the rehearsal's generator)
   with ``scaling.use_gpu=true``, one GPU worker (NCCL), crop actors on the node's CPUs, bf16, pinned
   batches: images/s, data-wait share, step time, peak memory from the run's MLflow metrics; the MLflow
   run FINISHED and a checkpoint written.
3. ``resume``  the same run again with one more epoch and ``optim.compile=true``: it resumes
   from the eager checkpoint (``Module.compile`` keeps parameter names) into one history; its time from
   the call to its first new step against eager's (the compile overhead) and the steady step time. In the
   CPU mode the resumed run stays eager unless ``--compile``: inductor's CPU compile of even the 1-block model
   costs ~30 s there and says nothing of the GPU's (tests/test_training_step.py holds compiled to eager).
4. ``attention`` and ``export``: ``raydino attention`` on the checkpoint on the GPU; ``raydino export``,
   the file reloaded in timm on the GPU and its features against the teacher's.

A check that fails is recorded with its one-line cause and the rest still run; the exit code is the
number of failed checks. Without CUDA (or with ``--cpu``) every part runs reduced (a 1-block model at
32 px, a handful of steps, no compiling) so the script cannot rot: tests/test_gpu_check.py runs that in ``make test``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

# dense bf16 tensor TFLOP/s per device, by a fragment of torch.cuda.get_device_name (vendor sheets; first match wins)
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,  # AWS's variant of the A10 (125): fewer tensor TFLOP/s
    "A10": 125.0,
}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class Report:
    """The checks in order: name, pass/fail, seconds, figures, and a one-line cause for a failure."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta, self.checks = out, meta, []

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        started = time.monotonic()
        print(f"gpu-check: {name} ...", flush=True)
        try:
            figures = check()
            entry = {"name": name, "status": "pass", "figures": figures}
        except Exception as exc:  # noqa: BLE001 (every failure is recorded with its cause; the next check still runs)
            cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
            traceback.print_exc()
            entry, figures = {"name": name, "status": "fail", "figures": {}, "error": cause}, None
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.checks.append(entry)
        print(f"gpu-check: {name}: {entry['status']} ({entry['seconds']} s){': ' + entry['error'] if 'error' in entry else ''}",
              flush=True)
        self.write()
        return figures

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {**self.meta, "checks": self.checks, "failed": sum(c["status"] == "fail" for c in self.checks)}
        (self.out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        lines = [f"# raydino gpu-check, {self.meta['date']}", "",
                 (f"Device: {self.meta['device']} ({self.meta['mode']} mode); torch {self.meta['torch']}, "
                  f"Ray {self.meta['ray']}, {self.meta['cpus']} CPUs; peak bf16 {self.meta['peak_tflops'] or 'unknown'} "
                  "TFLOP/s."), "", "| check | result | seconds | figures |", "|---|---|---|---|"]
        for c in self.checks:
            figures = "; ".join(f"{k} {_fmt(v)}" for k, v in c["figures"].items())
            result = "pass" if c["status"] == "pass" else f"**FAIL**: {c['error']}"
            lines.append(f"| {c['name']} | {result} | {c['seconds']} | {figures} |")
        (self.out / "report.md").write_text("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def check_gpu_step(cuda: bool, peak: float | None) -> dict[str, Any]:
    import gpu_step

    from raydino.config import load_config
    from raydino.step import DINOStep

    args = ["--preset", "imagenet_vit_small", "--steps", "10", "--warmup", "3"]
    if not cuda:
        args = ["--preset", "imagenet_vit_small", "--steps", "2", "--warmup", "1", "--tiny", "--compile", "eager"]
    figures: dict[str, Any] = {}
    for row in gpu_step.main(args):  # eager and compiled x fp32 and (on CUDA) bf16
        key = f"{'compiled' if row['compile'] else 'eager'}_{row['precision']}"
        figures[f"{key}_images_per_s"] = round(row["images_per_second"], 1)
        figures[f"{key}_step_ms"] = round(row["step_seconds"] * 1000, 2)
        figures[f"{key}_peak_memory_gib"] = round(row["peak_memory_gib"], 2)
        if row["precision"] == "bf16" and peak:
            figures[f"{key}_mfu_percent"] = round(100 * row["tflops"] / peak, 1)
    step = DINOStep.build(load_config(overrides=gpu_step.TINY), torch.device("cuda" if cuda else "cpu"))
    defaults = step.optimizer.defaults
    figures["adamw"] = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
    if cuda and figures["adamw"] != "fused":
        raise AssertionError(f"AdamW on CUDA is {figures['adamw']}, not fused")
    return figures


def _run_figures(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Medians of the progress windows the run logged (the first window holds the start-up: left out when
    there are others) and its status."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    figures: dict[str, Any] = {"mlflow_status": client.get_run(run_id).info.status}
    for key in ("images_per_second", "step_seconds", "data_wait_fraction", "peak_memory_gib"):
        values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        if values:
            figures[key] = round(statistics.median(values[1:] if len(values) > 1 else values), 4)
    return figures


def _seconds_to_first_step(losses: list[Any], called: float, after_step: int = 0) -> float | None:
    """Seconds from ``called`` (``time.time()`` when ``pretrain`` was called) to the first of the run's logged
    ``losses`` after ``after_step``: Ray's start-up, the data's first batch and, with ``optim.compile``, the
    compiling."""
    times = [m.timestamp for m in losses if m.step > after_step]
    return round(min(times) / 1000 - called, 1) if times else None


class PretrainChecks:
    """The runs of checks 2-4 on one set of generated JPEGs and one tracking store."""

    def __init__(self, work: Path, cuda: bool, steps: int, compile_resumed: bool) -> None:
        from raydino.commands.rehearsal import imagenet_geometry_jpegs

        self.work, self.cuda, self.compile_resumed = work, cuda, compile_resumed
        self.batch = 64 if cuda else 4
        per_class = max(1, steps * self.batch // 2)
        self.data = imagenet_geometry_jpegs(work / "data", per_class)
        self.images = 2 * per_class
        self.uri = f"sqlite:///{work}/mlflow.db"
        self.checkpoint: Path | None = None
        self.first_step_s: float | None = None

    def overrides(self, name: str, epochs: int, *extra: str) -> list[str]:
        import gpu_step

        common = [
            "data.source=imagefolder", f"data.path={self.data}", f"data.batch_size_per_worker={self.batch}",
            "scaling.num_workers=1", f"scaling.use_gpu={str(self.cuda).lower()}", "optim.amp=true",
            f"optim.epochs={epochs}", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
            "loss.warmup_teacher_temp_epochs=0", "eval.every_epochs=0", "eval.max_images=64",
            f"eval.train_path={self.data}", f"eval.test_path={self.data}",
            f"tracking.uri={self.uri}", "tracking.experiment=gpu-check", f"tracking.run_name={name}",
            "tracking.log_every_steps=1", f"tracking.progress_seconds={5 if self.cuda else 1}",
            "tracking.log_model=false", f"checkpoint.storage_path={self.work / 'runs'}",
        ]
        if self.cuda:  # crop actors on the node's CPUs, as many as the run can feed
            cpus = os.cpu_count() or 2
            common += ["scaling.cpus_per_worker=2", "data.crop_actors_per_worker=null",
                       f"data.num_crop_actors={max(1, cpus - 4)}"]
        else:
            common += [*gpu_step.TINY, f"data.batch_size_per_worker={self.batch}", "data.crop_batch_size=8",
                       "scaling.cpus_per_worker=1", "data.crop_actors_per_worker=null", "data.num_crop_actors=1"]
        return [*common, *extra]

    def _pretrain(self, overrides: list[str], ray_first: bool = False) -> tuple[Any, float]:
        """The run's summary and ``time.time()`` when ``pretrain`` was called (after starting Ray with
        ``ray_first``, so that the first run's time to a first step is not also Ray's start-up)."""
        from raydino.config import load_config
        from raydino.pretrain import pretrain
        from raydino.train.driver import ensure_ray

        cfg = load_config(preset="imagenet_vit_small", overrides=overrides)
        if ray_first:
            ensure_ray(cfg)
        called = time.time()
        return pretrain(cfg, log=lambda line: print(line, flush=True)), called

    def pretrain(self) -> dict[str, Any]:
        from mlflow import MlflowClient

        summary, called = self._pretrain(self.overrides("eager", 1), ray_first=True)
        figures = _run_figures(summary.tracking_uri, summary.mlflow_run_id)
        steps = self.images // self.batch
        if summary.result.steps != steps or figures["mlflow_status"] != "FINISHED":
            raise AssertionError(f"{summary.result.steps} steps of {steps}, MLflow run {figures['mlflow_status']}")
        self.checkpoint = Path(summary.result.checkpoint_dir)
        if not (self.checkpoint / "state.pt").is_file():
            raise AssertionError(f"no checkpoint at {self.checkpoint}")
        losses = MlflowClient(summary.tracking_uri).get_metric_history(summary.mlflow_run_id, "loss")
        self.first_step_s = _seconds_to_first_step(losses, called)
        return {"steps": summary.result.steps, "batch": self.batch, **figures,
                "seconds_to_first_step": self.first_step_s, "checkpoint": self.checkpoint.name}

    def resume(self) -> dict[str, Any]:
        """The eager run continued for one more epoch, with ``optim.compile=true`` where ``compile_resumed``: a
        compiled model resumes from an eager checkpoint into the same history, and what compiling adds to the
        time to a first step."""
        from mlflow import MlflowClient

        compiled = str(self.compile_resumed).lower()
        summary, called = self._pretrain(self.overrides("eager", 2, f"optim.compile={compiled}"))
        steps = 2 * (self.images // self.batch)
        losses = MlflowClient(self.uri).get_metric_history(summary.mlflow_run_id, "loss")
        history = sorted(m.step for m in losses)
        if summary.result.steps != steps or history != list(range(1, steps + 1)):
            raise AssertionError(f"resumed run: {summary.result.steps} steps of {steps}; logged steps {history}")
        self.checkpoint = Path(summary.result.checkpoint_dir)
        figures = _run_figures(self.uri, summary.mlflow_run_id)
        if figures["mlflow_status"] != "FINISHED":
            raise AssertionError(f"MLflow run {figures['mlflow_status']}")
        first = _seconds_to_first_step(losses, called, after_step=steps // 2)
        figures["seconds_to_first_step"] = first
        if self.compile_resumed and self.first_step_s is not None and first is not None:
            figures["compile_overhead_s"] = round(first - self.first_step_s, 1)
        return {"steps": summary.result.steps, "compiled": self.compile_resumed, "one_history": True, **figures}

    def attention(self) -> dict[str, Any]:
        from raydino.commands.attention_maps import write_attention

        if self.checkpoint is None:
            raise RuntimeError("no checkpoint: the pretrain check failed")
        images = sorted(str(p) for p in self.data.rglob("*.jpg"))[:2]
        device = "cuda" if self.cuda else "cpu"
        started = time.perf_counter()
        folders = write_attention(self.checkpoint, images, self.work / "attention", device=device)
        pngs = sum(len(list(f.glob("*.png"))) for f in folders)
        if len(folders) != 2 or not pngs:
            raise AssertionError(f"{len(folders)} folders, {pngs} PNGs")
        return {"images": len(folders), "pngs": pngs, "device": device,
                "seconds": round(time.perf_counter() - started, 2)}

    def export(self) -> dict[str, Any]:
        import timm

        from raydino.train.export import export_backbone, load_teacher, timm_kwargs

        if self.checkpoint is None:
            raise RuntimeError("no checkpoint: the pretrain check failed")
        device = torch.device("cuda" if self.cuda else "cpu")
        path = export_backbone(self.checkpoint, self.work / "backbone.safetensors")
        teacher, cfg, _ = load_teacher(self.checkpoint)
        model = timm.create_model(cfg.model.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  **timm_kwargs(cfg)).to(device).eval()
        size = cfg.data.crops.global_size
        x = torch.randn(4, 3, size, size, device=device)
        with torch.no_grad():
            diff = (model(x) - teacher.backbone.to(device)(x)).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"the reloaded backbone's features differ from the teacher's by {diff:.3g}")
        return {"file_mib": round(path.stat().st_size / 2**20, 2), "max_abs_diff": diff, "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check", help="directory for report.md and report.json")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for MFU")
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU version even where CUDA is available")
    parser.add_argument("--steps", type=int, help="steps of the pretrain runs' epoch (default: 40 on GPU, 3 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the resumed run in the CPU mode too (on CUDA it always is)")
    parser.add_argument("--workdir", help="where the JPEGs, runs and MLflow store go (default: a temporary directory)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    import ray

    report = Report(Path(args.out), {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name, "mode": "gpu" if cuda else "cpu", "torch": torch.__version__, "ray": ray.__version__,
        "cpus": os.cpu_count(), "peak_tflops": peak,
    })
    report.run("gpu_step", lambda: check_gpu_step(cuda, peak))
    with tempfile.TemporaryDirectory(prefix="raydino-gpu-check-") as tmp:
        work = Path(args.workdir or tmp)
        checks = PretrainChecks(work, cuda, args.steps or (40 if cuda else 3), compile_resumed=cuda or args.compile)
        report.run("pretrain", checks.pretrain)
        report.run("resume", checks.resume)
        report.run("attention", checks.attention)
        report.run("export", checks.export)
    failed = sum(c["status"] == "fail" for c in report.checks)
    print(f"gpu-check: {len(report.checks) - failed} of {len(report.checks)} checks passed; "
          f"{report.out / 'report.md'}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
