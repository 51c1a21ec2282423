"""The CLI's listing commands, and the promise that README, CI and the demo agree."""
import json
import re
from pathlib import Path

from excite.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_by_pattern(capsys):
    assert main(["models", "se_resnet*_cifar"]) == 0
    names = capsys.readouterr().out.split()
    assert names == ["se_resnet110_cifar", "se_resnet164_cifar", "se_resnet18_cifar", "se_resnet20_cifar",
                     "se_resnet56_cifar"]


def test_summary_prints_table_and_totals(capsys):
    assert main(["summary", "resnet18", "--img-size", "64", "--num-classes", "10", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "fc" in out
    # resnet18 with a 10-class head: 11,689,512 - 513,000 + 5,130 parameters.
    assert "11,181,642" in out


def test_unknown_model_is_one_line_with_suggestions(capsys):
    assert main(["summary", "densenet12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "densenet121" in err and "Traceback" not in err


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_commands) == 1
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert ci_commands[0] in [line for block in blocks for line in block.splitlines()]


def test_bench_command_reports_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "resnet20_cifar", "--device", "cpu", "--batch-size", "2", "--img-size", "32",
                 "--warmup", "1", "--iters", "2", "--repeats", "1", "--no-peers", "--json", str(out)]) == 0
    assert "resnet20_cifar" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())
    assert result["results"]["excite"]["train"]["img_per_s"] > 0


def test_unknown_device_is_one_line(capsys):
    assert main(["bench", "resnet20_cifar", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'tpu' is not a device here: choose one of auto, cpu, cuda[:index]" in err
