"""The CLI's listing commands, and the promise that README, CI and the demo agree."""
import json
import re
from pathlib import Path

import pytest
import torch

from excite import cli
from excite.cli import main
from excite.train.config import DEVICE_HELP

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
    # The last command is the README's; the steps before it only prepare the machine (Chromium for a test).
    assert ci_commands[-1].startswith("python3 -m venv")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert ci_commands[-1] in [line for block in blocks for line in block.splitlines()]


def test_bench_command_reports_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "resnet20_cifar", "--device", "cpu", "--batch-size", "2", "--img-size", "32",
                 "--warmup", "1", "--iters", "2", "--repeats", "1", "--no-peers", "--json", str(out)]) == 0
    assert "resnet20_cifar" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())
    assert result["results"]["excite"]["train"]["img_per_s"] > 0


TINY_BENCH = ["--batch-size", "1", "--img-size", "32", "--mode", "infer", "--warmup", "0", "--iters", "2",
              "--repeats", "1", "--no-peers", "--no-fast"]
# Every command that takes --device, with the other arguments it needs to get as far as choosing the device.
DEVICE_COMMANDS = {
    "train": ["train"],
    "eval": ["eval", "--checkpoint", "no-such-run", "--data", "no-such-data"],
    "predict": ["predict", "--checkpoint", "no-such-run", "no-such-image.png"],
    "bench": ["bench", "resnet20_cifar", *TINY_BENCH],
}


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device", ["tpu", "cpu:0", "cuda:-1", "CUDA"])
def test_every_command_has_one_device_grammar(command, device, capsys):
    assert main([*DEVICE_COMMANDS[command], "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--device {device!r} is not valid: choose {DEVICE_HELP}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_index_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["train", "--device", "cuda:1", "--data", "digits", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda:1 was asked for but no CUDA GPU is visible" in err


def test_bench_refuses_mps_as_a_device_it_cannot_time(capsys):
    assert main(["bench", "resnet20_cifar", *TINY_BENCH, "--device", "mps"]) == 2
    assert "--device mps is not supported by this command (CPU and CUDA only)" in capsys.readouterr().err


def test_bad_model_arg_value_in_train_is_one_line(image_folder, tmp_path, capsys):
    argv = ["train", "--model", "resnet18", "--model-arg", "block=basik", "--data", str(image_folder),
            "--out", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1", "--img-size", "16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block must be one of basic, bottleneck, got 'basik'" in err


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_models", out_of_memory)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory; try a smaller --batch-size" in err
