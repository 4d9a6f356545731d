"""`make gpu-check` (benchmarks/gpu_check.py) in its reduced CPU mode, so the script a GPU machine runs first
cannot rot: every check runs (gpu_step, a real pretrain with Ray Train, its resume (compiled on a GPU; eager
here: torch.compile's parity with eager is tests/test_training_step.py's), attention maps, export reloaded in
timm) and the report says what passed with its figures."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check

CHECKS = ["gpu_step", "pretrain", "resume", "attention", "export"]


def test_a_failing_check_is_one_line_in_the_report_and_the_next_still_runs(tmp_path):
    report = gpu_check.Report(tmp_path, {"date": "d", "device": "CPU", "mode": "cpu", "torch": "t", "ray": "r",
                                         "cpus": 2, "peak_tflops": None})

    def broken():
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    assert report.run("first", broken) is None
    assert report.run("second", lambda: {"images_per_s": 12.5}) == {"images_per_s": 12.5}
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in doc["checks"]] == ["fail", "pass"] and doc["failed"] == 1
    assert doc["checks"][0]["error"] == ("RuntimeError: CUDA error: out of memory CUDA kernel errors might be "
                                         "asynchronously reported")
    table = (tmp_path / "report.md").read_text()
    assert "| first | **FAIL**: RuntimeError: CUDA error: out of memory" in table
    assert "| second | pass |" in table and "images_per_s 12.5" in table


def test_the_peak_is_looked_up_by_device_name_and_can_be_overridden():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("NVIDIA A10G", None) == 70.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-40GB", None) == 312.0
    assert gpu_check.peak_tflops("Some Future GPU", None) is None
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cpu_mode_runs_every_check_and_reports_its_figures(ray_session, tmp_path, capsys):
    failed = gpu_check.main(["--cpu", "--out", str(tmp_path / "gpu_check"), "--workdir", str(tmp_path / "work")])
    doc = json.loads((tmp_path / "gpu_check" / "report.json").read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    assert failed == 0, [c.get("error") for c in doc["checks"]]
    assert list(checks) == CHECKS and all(c["status"] == "pass" for c in checks.values())
    assert doc["mode"] == "cpu" and doc["failed"] == 0
    step = checks["gpu_step"]["figures"]
    assert step["eager_fp32_images_per_s"] > 0 and step["adamw"] == "foreach"  # fused is the CUDA path
    run = checks["pretrain"]["figures"]
    assert run["mlflow_status"] == "FINISHED" and run["steps"] == 3 and run["checkpoint"] == "checkpoint_00000003"
    assert run["images_per_second"] > 0 and 0.0 <= run["data_wait_fraction"] <= 1.0 and run["step_seconds"] > 0
    assert run["seconds_to_first_step"] > 0
    resumed = checks["resume"]["figures"]
    assert resumed["steps"] == 6 and resumed["one_history"] and resumed["mlflow_status"] == "FINISHED"
    assert resumed["seconds_to_first_step"] > 0 and resumed["compiled"] is False
    assert "compile_overhead_s" not in resumed  # only a compiled resume has one
    assert checks["attention"]["figures"]["images"] == 2 and checks["attention"]["figures"]["device"] == "cpu"
    assert checks["export"]["figures"]["max_abs_diff"] <= 1e-4
    table = (tmp_path / "gpu_check" / "report.md").read_text()
    assert all(f"| {name} | pass |" in table for name in CHECKS)
    assert "5 of 5 checks passed" in capsys.readouterr().out
