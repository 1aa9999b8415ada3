"""The ``slothc`` command line."""

import pytest

from slothc.cli import main


def test_explain_prints_a_report_and_a_summary(capsys):
    assert main(["explain", "--arch", "llama", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "slothc fusion report" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("llama (1 layer, fp32, cpu"), summary
    assert "fused" in summary and "skipped" in summary


def test_unknown_arch_exits_2_and_names_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--arch", "lama"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown causal-LM architecture 'lama'" in err
    assert "did you mean llama" in err
    assert "valid:" in err and "qwen3" in err


def test_bad_backend_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--arch", "llama", "--option", "no_such_fusion=true"])
    assert exit_info.value.code == 2
    assert "valid options" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_explain_a_4bit_model(capsys):
    pytest.importorskip("bitsandbytes")
    assert main(["explain", "--arch", "llama", "--layers", "1", "--load-in-4bit"]) == 0
    out = capsys.readouterr().out
    assert "fused qlora_linear: 7 sites" in out, out
    assert "[nf4, double-quant, blocksize 64, peft]" in out
    assert "4-bit" in out.strip().splitlines()[-1]


def test_coverage_unknown_architecture_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["coverage", "--arch", "lama"])
    assert e.value.code == 2
    assert "did you mean llama" in capsys.readouterr().err


def test_bench_and_coverage_are_commands(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--workload" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["coverage", "--help"])
    assert "--budget-s" in capsys.readouterr().out
