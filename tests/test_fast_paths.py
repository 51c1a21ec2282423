"""The fast paths compute what the plain ones do: the buffer DenseNet block, folded BatchNorm and the
on-device data cache."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as TF

from excite.data import gpu_cache
from excite.data.gpu_cache import CachedLoader, TensorCache, crop_flip
from excite.errors import DataError
from excite.models import create_model
from excite.models.densenet import DenseNet
from excite.nn.dense import DenseBlock
from excite.nn.dense_fast import FastDenseBlock, make_fast
from excite.nn.fold import fold_batchnorm


def tiny_densenet(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, stem="cifar", num_classes=5, **kwargs)


def train_step(model: DenseNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One SGD step from a fixed random state (so dropout masks match); returns the logits."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    out = model(x)
    F.cross_entropy(out, y).backward()
    optimizer.step()
    return out


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    # fp32 rounding differs between a concatenation and a buffer prefix: allow 1e-5 of the values' scale.
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(a.abs().max().item(), 1.0))


@pytest.mark.parametrize("kwargs", [
    {},
    {"attn_layer": "se", "attn_placement": "layer"},
    {"attn_layer": "se", "attn_placement": "block"},
    {"attn_layer": "eca", "drop_rate": 0.2},
])
def test_fast_densenet_trains_like_the_plain_one(kwargs):
    plain = tiny_densenet(**kwargs)
    fast = make_fast(copy.deepcopy(plain))
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])

    assert_same(train_step(fast, x, y), train_step(plain, x, y))
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert q.grad is not None, name
        assert_same(q.grad, p.grad)
    plain_state, fast_state = plain.state_dict(), fast.state_dict()
    assert list(fast_state) == list(plain_state)
    for name in plain_state:  # updated weights, BN running statistics and batch counts
        assert_same(fast_state[name].float(), plain_state[name].float())

    plain.eval(), fast.eval()
    with torch.no_grad():
        assert_same(fast(x), plain(x))
    x.requires_grad_(True)  # eval with autograd on takes the plain path
    assert_same(torch.autograd.grad(fast(x).sum(), x)[0], torch.autograd.grad(plain(x).sum(), x)[0])


def test_fast_densenet_updates_bn_statistics_without_autograd():
    # Recalibrating batch-norm statistics runs training-mode forwards under no_grad.
    plain = tiny_densenet(attn_layer="se")
    fast = make_fast(copy.deepcopy(plain))
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert_same(fast(x), plain(x))
    for name, value in plain.state_dict().items():
        assert_same(fast.state_dict()[name].float(), value.float())


def test_fast_densenet_in_channels_last():
    plain = tiny_densenet(attn_layer="se").to(memory_format=torch.channels_last)
    fast = make_fast(copy.deepcopy(plain))
    x = torch.randn(4, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    assert_same(train_step(fast, x, y), train_step(plain, x, y))
    for p, q in zip(plain.parameters(), fast.parameters()):
        assert_same(q.grad, p.grad)


def test_make_fast_only_changes_the_block_class():
    plain = tiny_densenet(attn_layer="se")
    fast = make_fast(copy.deepcopy(plain))
    assert [type(m) for m in fast.features if isinstance(m, DenseBlock)] == [FastDenseBlock, FastDenseBlock]
    assert fast.load_state_dict(plain.state_dict()) is not None  # strict: the same keys and shapes


def test_fast_block_without_bottleneck_is_the_plain_block():
    plain = tiny_densenet(bn_size=0)
    fast = make_fast(copy.deepcopy(plain))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    assert_same(train_step(fast, x, y), train_step(plain, x, y))


@pytest.mark.parametrize("change", [lambda out: out.mul_(2), lambda out: out.detach().mul_(2)])
def test_changing_the_fast_block_output_in_place_fails_loudly(change):
    # The layers' backward reads the block buffer, so an in-place change of it must not pass silently.
    block = make_fast(tiny_densenet()).features.denseblock1
    out = block(torch.randn(2, 8, 6, 6, requires_grad=True))
    loss = out.sum()  # saves nothing, so only the block itself can notice
    with pytest.raises(RuntimeError, match="inplace"):
        change(out)
        loss.backward()


def test_fast_densenet_under_bf16_autocast():
    plain = tiny_densenet(attn_layer="se")
    fast = make_fast(copy.deepcopy(plain))
    x, y = torch.randn(4, 3, 12, 12), torch.tensor([0, 1, 2, 3])

    def logits_and_grads(model, amp):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            F.cross_entropy(out, y).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        return out, torch.cat([p.grad.flatten() for p in model.parameters()])

    _, exact = logits_and_grads(copy.deepcopy(plain), amp=False)
    plain_out, plain_grads = logits_and_grads(plain, amp=True)
    fast_out, fast_grads = logits_and_grads(fast, amp=True)
    assert torch.equal(fast_out, plain_out)
    # bf16 gradients of so small a net are far from fp32 ones; the fast path must not be further off.
    def error(grads: torch.Tensor) -> float:
        return ((grads - exact).norm() / exact.norm()).item()
    assert error(fast_grads) <= 1.1 * error(plain_grads)


# --- the on-device data cache ---------------------------------------------------------------------------

def numbered_images(n: int, size: int = 10) -> TensorCache:
    """Image i is filled with the value 10 * i and has label i, so a batch shows whether labels match."""
    images = (torch.arange(n, dtype=torch.uint8) * 10)[:, None, None, None].expand(n, 3, size, size).clone()
    return TensorCache(images, torch.arange(n))


def test_tensor_cache_rejects_bad_tensors():
    with pytest.raises(DataError, match="uint8"):
        TensorCache(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    with pytest.raises(DataError, match="labels"):
        TensorCache(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3))


def test_tensor_cache_decodes_files_once(tmp_path, monkeypatch):
    torch.manual_seed(0)
    paths = []
    for i, (h, w) in enumerate([(8, 8), (12, 6), (8, 8)]):
        paths.append(tmp_path / f"{i}.png")
        write_png(torch.randint(256, (3, h, w), dtype=torch.uint8), str(paths[-1]))
    with pytest.raises(DataError, match="different sizes"):
        TensorCache.from_files(paths, [0, 1, 2])

    cache = TensorCache.from_files(paths, [0, 1, 2], size=8, cache_dir=tmp_path / "cache")
    assert cache.images.shape == (3, 3, 8, 8) and cache.labels.tolist() == [0, 1, 2]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    def no_decoding(path, *args):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(gpu_cache, "decode_image", no_decoding)
    again = TensorCache.from_files(paths, [0, 1, 2], size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, cache.images) and torch.equal(again.labels, cache.labels)
    with pytest.raises(AssertionError, match="decoded"):  # other labels: another key, so decoded afresh
        TensorCache.from_files(paths, [2, 1, 0], size=8, cache_dir=tmp_path / "cache")


def test_loader_batches_have_the_asked_shape_and_dtype():
    loader = CachedLoader(numbered_images(10), 4, train=True, dtype=torch.bfloat16, channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.shape == (4, 3, 10, 10) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert len(CachedLoader(numbered_images(10), 4, train=True, drop_last=True)) == 2


def test_loader_is_a_pure_function_of_seed_and_epoch():
    def epoch(seed, e):
        loader = CachedLoader(numbered_images(12), 5, train=True, seed=seed)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])
    assert torch.equal(epoch(0, 3), epoch(0, 3))
    assert not torch.equal(epoch(0, 3), epoch(0, 4))
    assert not torch.equal(epoch(0, 3), epoch(1, 3))


def test_crop_flip_matches_torchvision_image_by_image():
    torch.manual_seed(0)
    images = torch.randint(256, (6, 3, 7, 9), dtype=torch.uint8)
    top, left = torch.randint(9, (2, 6))
    flip = torch.tensor([True, False, True, False, False, True])
    expected = []
    for image, t, left_, f in zip(images, top.tolist(), left.tolist(), flip.tolist()):
        image = TF.crop(TF.pad(image, [4]), t, left_, 7, 9)
        expected.append(TF.horizontal_flip(image) if f else image)
    assert torch.equal(crop_flip(images, top, left, flip, pad=4), torch.stack(expected))


def test_loader_batches_follow_the_epoch_plan():
    torch.manual_seed(0)
    data = TensorCache(torch.randint(256, (7, 3, 8, 8), dtype=torch.uint8), torch.arange(7))
    loader = CachedLoader(data, 3, train=True, seed=5)
    loader.set_epoch(2)
    plan = loader.plan(2)
    expected = []
    for i, index in enumerate(plan.order.tolist()):
        image = TF.crop(TF.pad(data.images[index], [4]), plan.top[i].item(), plan.left[i].item(), 8, 8)
        image = TF.horizontal_flip(image) if plan.flip[i] else image
        expected.append(TF.normalize(TF.to_dtype(image, torch.float32, scale=True), loader.mean, loader.std))
    x, y = map(torch.cat, zip(*loader))
    assert torch.equal(x, torch.stack(expected))
    assert torch.equal(y, plan.order)
    assert plan.flip.any() and not plan.flip.all()


@pytest.mark.parametrize("train", [True, False])
def test_every_image_comes_once_per_epoch_with_its_label(train):
    loader = CachedLoader(numbered_images(11), 4, train=train, seed=1)
    seen = []
    for x, y in loader:
        # The centre pixel is never padding (pad 4 < half of 10): un-normalise it to recover the fill value.
        centre = x[:, 0, 5, 5] * loader.std[0] + loader.mean[0]
        torch.testing.assert_close(centre * 255, y.float() * 10, atol=1e-3, rtol=0)
        seen += y.tolist()
    assert sorted(seen) == list(range(11))
    assert (seen == list(range(11))) == (not train)


def test_impl_fast_builds_fast_blocks_with_plain_weights():
    fast = create_model("densenet_bc_100", num_classes=3, block_config=(2, 2, 2), impl="fast")
    plain = create_model("densenet_bc_100", num_classes=3, block_config=(2, 2, 2))
    assert all(type(m) is FastDenseBlock for m in fast.features if isinstance(m, DenseBlock))
    fast.load_state_dict(plain.state_dict())  # same keys and shapes
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fast.train()(x), plain.train()(x), rtol=1e-5, atol=1e-5)  # training: the buffer path


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_fast_densenet_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    plain = create_model("densenet_bc_100", num_classes=3, block_config=(2, 2, 2))
    fast = create_model("densenet_bc_100", num_classes=3, block_config=(2, 2, 2), impl="fast")
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    expected = plain.train()(x)
    torch.testing.assert_close(torch.compile(fast).train()(x), expected, rtol=1e-4, atol=1e-5)


def batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name, kwargs, left", [
    ("se_resnet20_cifar", {}, 0),  # conv -> BN everywhere: every BatchNorm folds
    ("resnet18", dict(attn_layer="cbam"), 0),
    # A dense layer is BN -> ReLU -> conv1 -> BN -> ReLU -> conv2: only its BN after conv1 folds, so the
    # 4 layers' first BNs, the transition's and the final one stay.
    ("densenet_bc_100", dict(block_config=(2, 2), attn_layer="se"), 4 + 1 + 1),
    ("dpn68", {}, None),
])
def test_folded_batchnorm_computes_the_same_function(name, kwargs, left):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):  # training steps' worth of running statistics, so folding has work to do
            model(x + torch.randn_like(x))
    model.eval()
    folded = fold_batchnorm(model)
    with torch.no_grad():
        expected, out = model(x), folded(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert batchnorms(folded) < batchnorms(model)
    if left is not None:
        assert batchnorms(folded) == left
    assert not folded.training


def test_fold_batchnorm_leaves_the_model_alone():
    model = create_model("resnet20_cifar", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    assert model.training and batchnorms(model) == 21
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class DataDependent(torch.nn.Module):
    """A layer torch.fx cannot trace: which branch runs depends on the values."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        return out if out.mean() > 0 else -out


def test_fold_batchnorm_falls_back_to_the_plain_model_with_a_warning():
    model = DataDependent()
    with pytest.warns(UserWarning, match="cannot be traced"):
        folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(folded, DataDependent) and not folded.training
    torch.testing.assert_close(folded(x), model.eval()(x))
