"""eval and predict on checkpoints and inputs that are not as they should be: one line and exit status 2."""
from pathlib import Path

import pytest
import torch

from excite.cli import main
from excite.errors import ExciteError
from excite.inference import predict
from excite.models import create_model
from excite.train.checkpoint import save_weights

TINY = dict(layers=(1, 1, 1), widths=(4, 8, 8), num_classes=3)


def write_weights(path: Path, classes=("blue", "green", "red"), favourite: int | None = None) -> Path:
    """A tiny untrained ResNet-20 as a weights file; ``favourite`` gets every image's highest score."""
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", **TINY)
    if favourite is not None:
        with torch.no_grad():
            model.fc.bias[favourite] = 100.0
    save_weights(path, {"model": model.state_dict(), "model_name": "resnet20_cifar", "model_kwargs": TINY,
                        "classes": list(classes), "img_size": 16, "preset": "cifar"})
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


def test_predict_on_only_unreadable_inputs_is_an_error(image_folder, tmp_path, capsys):
    weights = write_weights(tmp_path / "w.safetensors")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image\n")
    status, out, err = run_cli(["predict", "--checkpoint", str(weights), str(tmp_path / "empty.png"),
                                str(tmp_path / "text.jpg")], capsys)
    assert status == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("excite: error: none of the 2 inputs could be read as an image (first "
                             f"{tmp_path / 'empty.png'}: "), err

    # One readable image is enough: the others are skipped with a warning, as before.
    status, out, err = run_cli(["predict", "--checkpoint", str(weights), str(tmp_path / "empty.png"),
                                str(image_folder / "red" / "000.png")], capsys)
    assert status == 0 and out.startswith(f"{image_folder / 'red' / '000.png'}: ")
    assert len(err) == 1 and err[0].startswith(f"excite: warning: skipping {tmp_path / 'empty.png'}: "), err


def test_predict_with_fewer_class_names_than_outputs_is_one_line_before_any_output(image_folder, tmp_path, capsys):
    # The model's favourite is its third output, which a list of two names has no name for.
    weights = write_weights(tmp_path / "w.safetensors", classes=("blue", "green"), favourite=2)
    status, out, err = run_cli(["predict", "--checkpoint", str(weights), str(image_folder / "red")], capsys)
    assert status == 2 and out == ""
    assert err == [f"excite: error: {weights} names 2 classes but its model has 3 outputs: the file was edited or "
                   "damaged; use the run's other checkpoint or retrain"]


@pytest.mark.parametrize("option", ["topk", "batch_size"])
def test_predict_refuses_sizes_below_one(option, image_folder, tmp_path):
    weights = write_weights(tmp_path / "w.safetensors")
    with pytest.raises(ExciteError, match=f"--{option.replace('_', '-')} must be at least 1, got 0"):
        list(predict(weights, [image_folder / "red" / "000.png"], **{option: 0}))


def test_eval_and_predict_refuse_a_damaged_weights_file(image_folder, tmp_path, capsys):
    weights = write_weights(tmp_path / "w.safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-200:-100] = bytes(b ^ 0xFF for b in raw[-200:-100])  # inverted bits in the last tensors' data
    weights.write_bytes(bytes(raw))
    damaged = f"excite: error: {weights} is damaged: its contents do not match the checksum stored when it was written"
    for argv in (["predict", "--checkpoint", str(weights), str(image_folder / "red" / "000.png")],
                 ["eval", "--checkpoint", str(weights), "--data", str(image_folder), "--out", str(tmp_path / "eval")]):
        status, out, err = run_cli(argv, capsys)
        assert status == 2 and out == "" and len(err) == 1 and err[0].startswith(damaged), err
