import math

import pytest

from raydino.cli import main
from raydino.commands.compare import compare_runs, to_csv, to_markdown, write_plots
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
    c = compare_runs(uri, "cmp", ["loss.vmf"], ["final_knn_top1"], statuses=None)
    assert dict(zip(c.table["loss.vmf"], c.table["runs"])) == {"True": 4, "False": 3, "-": 1}


def test_only_finished_runs_are_compared_unless_asked(store, capsys):
    uri, parent = store  # the parent and "unrelated" never ended: RUNNING
    failed = create_run(uri, "cmp", "failed", {"loss.vmf": "True", "head.norm_last_layer": "False"}, parent_run_id=parent)
    RunLogger(uri, failed).log_metrics({"final_knn_top1": 0.0}, step=1)
    RunLogger(uri, failed).end("FAILED")
    c = compare_runs(uri, "cmp", ["loss.vmf"], ["final_knn_top1"])
    assert dict(zip(c.table["loss.vmf"], c.table["runs"])) == {"True": 3, "False": 3}
    assert "status" not in c.table and c.left_out == {"FAILED": 1, "RUNNING": 2}
    assert c.table.set_index("loss.vmf").loc["True", "final_knn_top1 mean"] == pytest.approx(62.0)  # not the 0.0
    every = compare_runs(uri, "cmp", ["loss.vmf"], ["final_knn_top1"], statuses=None).table.set_index("loss.vmf")
    assert every.loc["True", "status"] == "1 FAILED, 3 FINISHED, 1 RUNNING" and every.loc["True", "runs"] == 5

    args = ["compare", "--experiment", "cmp", "--group-by", "loss.vmf", "--metric", "final_knn_top1", "--format", "csv",
            "--plots", "", "--tracking-uri", uri]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "loss.vmf,runs,final_knn_top1 mean,final_knn_top1 std"
    assert "left out 1 FAILED, 2 RUNNING run(s); --status all" in err
    assert main([*args, "--status", "all"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "loss.vmf,runs,status,final_knn_top1 mean,final_knn_top1 std"
    assert main([*args, "--status", "failed", "running"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["-,1,1 RUNNING,,", "True,2,\"1 FAILED, 1 RUNNING\",0.0,"]
    with pytest.raises(ValueError, match="no KILLED runs under parent .*it has 1 FAILED, 6 FINISHED\\).*--status all"):
        compare_runs(uri, "cmp", [], parent_run_id=parent, statuses=["KILLED"])


def test_an_unknown_metric_is_named_with_the_known_ones(store, capsys):
    uri, _ = store
    with pytest.raises(ValueError, match="no run has metric.s. no_such_metric; known metrics: final_knn_top1, teacher_entropy$"):
        compare_runs(uri, "cmp", [], ["final_knn_top1", "no_such_metric"])
    assert main(["compare", "--experiment", "cmp", "--metric", "no_such_metric", "--plots", "", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_metric" in err and "known metrics: final_knn_top1" in err


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
