import math

import pytest

from raydino.cli import main
from raydino.compare import compare_runs, to_csv, to_markdown, write_plots
from raydino.tracking import RunLogger, TrackingError, create_run

ARMS = {("True", "False"): [60.0, 62.0, 64.0], ("False", "True"): [50.0, 54.0], ("False", "False"): [40.0]}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = create_run(uri, "cmp", "parent", {})
    for (vmf, norm), values in ARMS.items():
        for seed, value in enumerate(values):
            run = create_run(uri, "cmp", f"{vmf}-{norm}-{seed}", {"loss.vmf": vmf, "head.norm_last_layer": norm,
                                                                  "seed": seed}, parent_run_id=parent)
            logger = RunLogger(uri, run)
            logger.log_metrics({"final_knn_top1": value, "teacher_entropy": value / 10}, step=1)
            logger.end()
    create_run(uri, "cmp", "unrelated", {"loss.vmf": "True", "head.norm_last_layer": "False"})
    return uri, parent


def test_groups_means_and_stds(store):
    uri, parent = store
    c = compare_runs(uri, "cmp", ["loss.vmf", "head.norm_last_layer"], ["final_knn_top1"], parent_run_id=parent)
    rows = {(r["loss.vmf"], r["head.norm_last_layer"]): r for _, r in c.table.iterrows()}
    assert set(rows) == set(ARMS)
    assert rows[("True", "False")]["runs"] == 3
    assert rows[("True", "False")]["final_knn_top1 mean"] == pytest.approx(62.0)
    assert rows[("True", "False")]["final_knn_top1 std"] == pytest.approx(2.0)
    assert rows[("False", "True")]["final_knn_top1 std"] == pytest.approx(math.sqrt(8.0))
    assert math.isnan(rows[("False", "False")]["final_knn_top1 std"])
    md = to_markdown(c)
    assert "| loss.vmf | head.norm_last_layer | runs | final_knn_top1 mean | final_knn_top1 std |" in md
    assert "| True | False | 3 | 62 | 2 |" in md
    assert to_csv(c).splitlines()[0] == "loss.vmf,head.norm_last_layer,runs,final_knn_top1 mean,final_knn_top1 std"


def test_without_parent_includes_every_run(store):
    uri, _ = store
    c = compare_runs(uri, "cmp", ["loss.vmf"], ["final_knn_top1"])
    assert dict(zip(c.table["loss.vmf"], c.table["runs"])) == {"True": 4, "False": 3, "-": 1}


def test_plots_and_cli(store, tmp_path, capsys):
    uri, parent = store
    comparison = compare_runs(uri, "cmp", ["loss.vmf"], ["final_knn_top1", "teacher_entropy"], parent)
    paths = write_plots(comparison, tmp_path / "p")
    assert [p.name for p in paths] == ["compare_final_knn_top1.png", "compare_teacher_entropy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    code = main(["compare", "--experiment", "cmp", "--parent", parent, "--group-by", "loss.vmf", "--metric",
                 "final_knn_top1", "--format", "csv", "--plots", "", "--tracking-uri", uri])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "loss.vmf,runs,final_knn_top1 mean,final_knn_top1 std" and len(out) == 3


def test_errors_name_the_problem(store, capsys):
    uri, _ = store
    with pytest.raises(TrackingError, match="no MLflow experiment 'nope'.*cmp"):
        compare_runs(uri, "nope", [])
    with pytest.raises(ValueError, match="no run has param.*loss.vmff.*known params: head.norm_last_layer"):
        compare_runs(uri, "cmp", ["loss.vmff"])
    assert main(["compare", "--experiment", "cmp", "--group-by", "bogus", "--tracking-uri", uri]) == 2
    assert "bogus" in capsys.readouterr().err
