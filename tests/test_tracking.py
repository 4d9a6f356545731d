"""The MLflow store checks and lookups that take user text: real sqlite stores."""

import pytest

from raydino.cli import main
from raydino.tracking import TrackingError, check_tracking, create_run, equals_filter, find_run, search_runs
from tests.readonly import read_only


def test_run_names_with_quotes_are_created_and_found_again(tmp_path):
    """``tracking.run_name=bob's run``: pretrain looks the name up before creating the run and again when
    it is started a second time; the name goes into an MLflow filter string."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    create_run(uri, "e", "other run", {})
    for name in ["bob's run", 'say "hi"', "both ' and \"", "50%_done"]:
        assert find_run(uri, "e", name) is None
        run_id = create_run(uri, "e", name, {})
        create_run(uri, "e", name.replace("'", "x").replace('"', "y") + "!", {})  # close, but not the name
        assert find_run(uri, "e", name) == run_id
    assert equals_filter("k", "a'b") == 'k = "a\'b"'
    parent = create_run(uri, "e", "parent", {})
    child = create_run(uri, "e", "child", {}, parent_run_id=parent)
    assert [r["run_id"] for r in search_runs(uri, "e", parent)] == [child]
    assert search_runs(uri, "e", "it's") == []


def test_a_read_only_store_file_is_one_line(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    create_run(uri, "e", "r", {})
    with read_only(db):
        with pytest.raises(TrackingError, match=f"file {db} is not writable; make it writable"):
            check_tracking(uri)
        capsys.readouterr()
        assert main(["pretrain", f"tracking.uri={uri}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raydino: error: MLflow store") and "not writable" in err
