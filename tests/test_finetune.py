"""Fine-tuning controls: --freeze (no gradient, no decay and BatchNorm statistics kept while frozen, also across
a resume), --head-lr-mult through the whole schedule, the finetune recipe, and one line for bad values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import excite
from excite.cli import main
from excite.errors import ExciteError
from excite.models import create_model
from excite.train.checkpoint import load_checkpoint
from excite.train.config import TrainConfig, resolve_config
from excite.train.finetune import apply_freeze, param_groups
from excite.train.loop import Precision, train_one_epoch
from excite.train.optim import build_optimizer, build_scheduler, lr_factor

TINY = dict(model="resnet20_cifar", model_kwargs={"widths": [4, 8, 8]})


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20_cifar", widths=[4, 8, 8], num_classes=3)


def _batches(n: int = 2) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(n)]


def _train_epoch(model, optimizer, scheduler, epoch: int, config: TrainConfig) -> dict[str, bool]:
    """apply_freeze then one epoch of train_one_epoch (which calls model.train()); returns whether each
    BatchNorm ran in training mode."""
    apply_freeze(model, epoch, config)
    modes: dict[str, bool] = {}
    hooks = [m.register_forward_pre_hook(lambda m, _, name=name: modes.__setitem__(name, m.training))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    train_one_epoch(model, _batches(), optimizer, scheduler, Precision(torch.device("cpu")), epoch=epoch)
    for hook in hooks:
        hook.remove()
    return modes


def test_freeze_trains_the_classifier_alone_then_everything():
    config = TrainConfig(**TINY, epochs=4, freeze=2, weight_decay=0.1)
    model = _model()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, 2, config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for epoch in (1, 2):
        modes = _train_epoch(model, optimizer, scheduler, epoch, config)
        assert modes and not any(modes.values())  # model.train() did not put the frozen BatchNorms back in training
        for name, p in model.named_parameters():
            assert (p.grad is None) != name.startswith("fc."), name
    after = model.state_dict()
    for key in before:  # weights (decay 0.1 included) and BatchNorm statistics as they were; the head has learnt
        assert torch.equal(after[key], before[key]) != key.startswith("fc."), key

    modes = _train_epoch(model, optimizer, scheduler, 3, config)
    assert modes and all(modes.values())
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_freeze_all_keeps_the_backbone_for_the_whole_run():
    config = TrainConfig(**TINY, epochs=3, freeze=-1)
    model = _model()
    assert apply_freeze(model, 1, config).startswith("Epoch 1: only the classifier trains for the whole run")
    assert apply_freeze(model, 3, config) is None  # no change, nothing to say
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_head_lr_is_lr_times_the_multiplier_at_every_step_of_the_schedule():
    config = TrainConfig(**TINY, epochs=3, lr=0.02, head_lr_mult=10.0, warmup_epochs=1.0, sched="cosine")
    model = _model()
    optimizer = build_optimizer(model, config)
    head = {id(p) for p in model.fc.parameters()}
    assert [len(g["params"]) for g in optimizer.param_groups][2:] == [1, 1]  # fc.weight (decay), fc.bias (none)
    assert all(id(p) in head for g in optimizer.param_groups[2:] for p in g["params"])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [config.weight_decay, 0.0] * 2
    scheduler = build_scheduler(optimizer, 4, config)
    for step in range(12):
        expected = config.lr * lr_factor(step, 4, config)
        lrs = [g["lr"] for g in optimizer.param_groups]
        assert lrs == pytest.approx([expected, expected, 10 * expected, 10 * expected]), step
        optimizer.step()
        scheduler.step()
    # Without a multiplier the groups are as before (so older runs' optimizer states still resume).
    assert len(param_groups(model, TrainConfig(**TINY))) == 2


def test_resuming_inside_a_frozen_epoch_ends_like_the_uninterrupted_run(image_folder, tmp_path):
    def config(out):
        return TrainConfig(**TINY, data=str(image_folder), out=str(out), epochs=3, freeze=2, batch_size=8,
                           img_size=16, seed=3, checkpoint_minutes=0, head_lr_mult=5.0)
    full = excite.fit(config(tmp_path / "full"), log=lambda _: None)

    def stop_in_epoch_2(values):  # Ctrl-C at step 2 of epoch 2: last.pt holds step 1 of that frozen epoch
        if values["epoch"] == 2 and values["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(ExciteError, match="interrupted during epoch 2"):
        excite.fit(config(tmp_path / "split"), log=lambda _: None, on_step=stop_in_epoch_2)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["partial"]["progress"]["step"] == 1
    lines = []
    excite.fit(excite.resume_config(tmp_path / "split"), resume=True, log=lines.append)
    assert "Epoch 2: only the classifier trains for epoch 2 (--freeze 2); the rest is frozen, its BatchNorm " \
           "statistics as loaded" in lines
    assert "Epoch 3: the whole model trains from here on (--freeze 2)" in lines
    resumed, uninterrupted = (load_checkpoint(run / "last.pt")["model"] for run in (tmp_path / "split", full.run_dir))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=key)


def test_the_finetune_recipe_sets_a_fine_tuning_schedule_under_the_users_flags():
    config = resolve_config(None, recipe="finetune", epochs=4, freeze=1)
    assert (config.opt, config.lr, config.head_lr_mult, config.label_smoothing, config.sched) == \
        ("sgd", 0.01, 10.0, 0.1, "cosine")
    assert (config.epochs, config.freeze) == (4, 1)


@pytest.mark.parametrize("flags,message", [
    (["--freeze", "-2"], "--freeze must be a number of epochs, or -1 (all) for the whole run, got -2"),
    (["--freeze", "2", "--epochs", "2"], "--freeze 2 covers all 2 epochs: use --freeze all (-1)"),
    (["--head-lr-mult", "0"], "--head-lr-mult must be positive, got 0.0"),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1], got 1.5"),
    (["--std", "0.2", "0", "0.2"], "--std must be positive, got [0.2, 0.0, 0.2]"),
])
def test_bad_fine_tuning_values_are_one_line(flags, message, image_folder, tmp_path, capsys):
    status = main(["train", "--model", "resnet20_cifar", "--data", str(image_folder), "--out", str(tmp_path / "run"),
                   *flags])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"excite: error: {message}"), err
    assert not (tmp_path / "run").exists()


def test_freeze_all_is_minus_one(image_folder, tmp_path):
    from excite.cli import _train_overrides, build_parser
    args = build_parser().parse_args(["train", "--freeze", "all", "--mean", "0.5", "0.5", "0.5"])
    overrides = _train_overrides(args)
    assert overrides["freeze"] == -1 and overrides["mean"] == [0.5, 0.5, 0.5]
