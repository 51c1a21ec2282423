"""The parts of timm's model API that Grad-CAM, detection and segmentation code look for: ``feature_info``,
``forward_intermediates`` and ``reset_classifier(num_classes, global_pool)``, right for every registered model."""
import pytest
import torch

from excite.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_feature_info_lists_each_feature_map_size_ending_with_the_pooled_map(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=3)
    info = model.feature_info
    reductions = [stage["reduction"] for stage in info]
    assert reductions == sorted(set(reductions)) and len(info) >= 3  # one entry per size, shallow to deep
    assert info[-1]["num_chs"] == model.num_features
    modules = dict(model.named_modules())
    side = 64
    outputs = {}
    hooks = [modules[stage["module"]].register_forward_hook(
        lambda _m, _i, out, name=stage["module"]: outputs.setdefault(name, out.shape) and None) for stage in info]
    model.forward_features(torch.empty(2, 3, side, side, device="meta"))
    for hook in hooks:
        hook.remove()
    for stage in info:  # each named module really outputs a map of that width at that reduction
        assert tuple(outputs[stage["module"]][1:]) == (stage["num_chs"], side // stage["reduction"],
                                                        side // stage["reduction"])


def test_forward_intermediates_returns_the_feature_info_maps():
    torch.manual_seed(0)
    model = create_model("se_resnet20_cifar", layers=(1, 1, 1), widths=(4, 8, 8), num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    features, maps = model.forward_intermediates(x)
    torch.testing.assert_close(features, model.forward_features(x))
    assert [tuple(m.shape[1:]) for m in maps] == [(4, 16, 16), (8, 8, 8), (8, 4, 4)]
    torch.testing.assert_close(maps[-1], features)
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert len(only) == 1 and torch.equal(only[0], maps[1])
    assert not model.layer1._forward_hooks  # no hook left behind


def test_reset_classifier_takes_timm_arguments():
    model = create_model("resnet20_cifar", num_classes=3)
    model.reset_classifier(7, global_pool="avg")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(3, global_pool="max")
