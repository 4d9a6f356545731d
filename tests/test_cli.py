import pytest

from raydino.cli import main
from tests.tiny import TINY_RUN

FAST = [*TINY_RUN, "optim.epochs=1", "data.batch_size_per_worker=16"]


@pytest.mark.timeout(120)
def test_pretrain_smoke_prints_knn_against_random_init(capsys):
    assert main(["pretrain", "--local", "--max-steps", "2", *FAST]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out
    assert "kNN top-1 (k=20) of the pretrained teacher" in out and "random initialisation" in out


def test_invalid_override_fails_fast_with_the_key(capsys):
    assert main(["pretrain", "loss.teacher_temp=2"]) == 2
    err = capsys.readouterr().err
    assert "loss.teacher_temp" in err and "allowed: 0.0 < value <= 1.0" in err


def test_help_explains_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "cpu_demo" in capsys.readouterr().out


def test_method_names_select_the_config_keys(capsys):
    from raydino.cli import _parser
    from raydino.config import METHODS

    args = _parser().parse_args(["pretrain", "--method", "ibot_vmf"])
    assert args.method == "ibot-vmf" and METHODS[args.method] == {"loss.method": "ibot", "loss.vmf": True}
    with pytest.raises(SystemExit):
        _parser().parse_args(["pretrain", "--method", "mae"])
