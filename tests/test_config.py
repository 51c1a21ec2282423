import json

import pytest

from excite.cli import _train_overrides, build_parser
from excite.errors import ExciteError
from excite.train.config import TrainConfig, resolve_config
from excite.train.optim import lr_factor


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "resnet18"\nepochs = 7\nbatch-size = 16\nlr = 0.2\n[model_kwargs]\ndrop_rate = 0.1\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "3"])
    config = resolve_config(args.config, **_train_overrides(args))
    assert config.model == "resnet18"  # from the file
    assert config.batch_size == 16  # dashed keys are accepted in files
    assert config.model_kwargs == {"drop_rate": 0.1}
    assert config.epochs == 3  # the flag wins over the file
    assert config.lr == 0.2
    assert config.opt == TrainConfig.opt  # untouched default


def test_json_config_round_trip(tmp_path):
    original = TrainConfig(model="resnet20_cifar", epochs=2, model_kwargs={"drop_rate": 0.2})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(original.to_dict()))
    assert resolve_config(path) == original


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": -1}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size"),
    ({"opt": "rmsprop"}, "choose one of sgd, adam, adamw"),
    ({"val_split": 1.5}, "--val-split"),
    ({"tta": "rotate"}, "choose one of none, flip"),
    ({"tta": "flip", "hflip": False}, "--tta flip needs --hflip"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ExciteError, match=message) as info:
        resolve_config(None, **overrides)
    assert "\n" not in str(info.value)


def test_a_recipe_with_flip_tta_trains_without_flips_once_tta_is_off():
    with pytest.raises(ExciteError, match="add --tta none"):
        resolve_config(None, recipe="cifar-fast", hflip=False)
    config = resolve_config(None, recipe="cifar-fast", hflip=False, tta="none")
    assert (config.tta, config.hflip, config.model) == ("none", False, "se_resnet18_cifar")


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("epochz = 3\n")
    with pytest.raises(ExciteError, match="unknown option.*epochz"):
        resolve_config(path)


def test_model_arg_parses_literals():
    args = build_parser().parse_args(["train", "--model-arg", "block_config=[4,4,4]", "--model-arg", "attn_layer=eca"])
    assert _train_overrides(args)["model_kwargs"] == {"block_config": [4, 4, 4], "attn_layer": "eca"}


def test_step_schedule_matches_steplr():
    # Seed 002: StepLR(step_size=5, gamma=0.1) stepped once per epoch.
    config = TrainConfig(sched="step", step_size=5, gamma=0.1, epochs=12)
    factors = [lr_factor(epoch * 10, 10, config) for epoch in range(12)]
    assert factors == pytest.approx([1.0] * 5 + [0.1] * 5 + [0.01] * 2)


def test_warmup_then_cosine_ends_near_zero():
    config = TrainConfig(sched="cosine", epochs=10, warmup_epochs=2)
    assert lr_factor(0, 100, config) == pytest.approx(1 / 200)
    assert lr_factor(199, 100, config) == pytest.approx(1.0)
    assert lr_factor(999, 100, config) < 1e-4
    onecycle = TrainConfig(sched="onecycle", epochs=10)
    peak = max(lr_factor(s, 100, onecycle) for s in range(1000))
    assert peak == pytest.approx(1.0, abs=1e-3) and lr_factor(0, 100, onecycle) == pytest.approx(1 / 25)


def test_every_option_has_a_flag_and_every_flag_an_option():
    import argparse
    import dataclasses

    from excite.cli import CLI_ONLY_TRAIN_FLAGS

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in train.choices["train"]._actions if a.option_strings and a.dest != "help"]
    dests = [a.dest for a in actions]
    fields = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata["internal"]]
    assert sorted(dests) == sorted(fields + list(CLI_ONLY_TRAIN_FLAGS))
    assert len(dests) == len(set(dests))  # one flag per option
    # Each flag parses into its field's type: a config from every flag given is a valid config.
    by_dest = {a.dest: a for a in actions}
    assert by_dest["hflip"].option_strings == ["--hflip", "--no-hflip"] and by_dest["epochs"].type is int
    assert by_dest["lr"].type is float and by_dest["opt"].choices == ["sgd", "adam", "adamw"]
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))
