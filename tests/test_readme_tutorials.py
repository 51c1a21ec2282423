"""The README's "Reproducing the tutorials" commands give the tutorials' own input pipelines."""
import re
import shlex
from pathlib import Path

import pytest

from excite.cli import _train_overrides, build_parser
from excite.train.config import resolve_config

README = Path(__file__).resolve().parents[1] / "README.md"


def tutorial_commands() -> dict[str, str]:
    section = README.read_text().split("## Reproducing the tutorials", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| `(excite train [^`]+)`", section, flags=re.M)
    return {name: command for name, command in rows if "..." not in command}


# What each tutorial does to its images (../shared/seeds): Resize(224) + ImageNet Normalize without flips for
# the folders, a bare ToTensor() on 32-pixel CIFAR-10 for SE-ResNet-50.
EXPECTED = {"SE-DenseNet-121": ("imagenet", 224, False), "J4": ("imagenet", 224, False),
            "SE-ResNet-50": ("plain", 32, False)}


def test_every_tutorial_line_is_checked():
    assert {next(k for k in EXPECTED if name.startswith(k)) for name in tutorial_commands()} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(tutorial_commands()))
def test_a_tutorial_command_gives_the_tutorials_pipeline(name):
    args = build_parser().parse_args(shlex.split(tutorial_commands()[name])[1:])
    config = resolve_config(args.config, **_train_overrides(args))
    preset, size, hflip = next(v for k, v in EXPECTED.items() if name.startswith(k))
    assert (config.preset, config.img_size, config.hflip, config.augment) == (preset, size, hflip, None)
    assert config.mixup == config.cutmix == config.label_smoothing == 0


def test_the_plain_preset_is_a_bare_to_tensor():
    import torch

    from excite.data import build_transform

    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for train in (False, True):
        out = build_transform("plain", 32, train=train, hflip=False)(image)
        torch.testing.assert_close(out, image.float() / 255)
